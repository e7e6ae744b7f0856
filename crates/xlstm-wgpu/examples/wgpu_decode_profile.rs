//! Where a batch-1 greedy decode step's time goes on the wgpu backend, at the xLSTM-7B shape (random
//! bf16 weights) or a smaller one. First the wall time per token for several submission pacings
//! (`SUBMISSIONS=every:first:ramp,...`, see `WgpuBackend::set_submission`), then, at the
//! backend's defaults: wall time per token, host time (recording, submitting, waiting), and with
//! `XLSTM_WGPU_PROFILE=1` on an adapter with timestamp queries inside passes, the device time of
//! every kernel summed per kernel, the submissions' first dispatches apart (they carry any time
//! the device waited for the host). Prints one JSON object per line.
//!
//!   XLSTM_WGPU_PROFILE=1 cargo run --release -p xlstm-wgpu --example wgpu_decode_profile -- \
//!       [vulkan|metal|dx12|gpu] [--layers N] [--steps N] [--prefill TOKENS]
//!
//! With `--prefill TOKENS` it profiles one chunkwise prefill of that many tokens instead (after an
//! unprofiled one): wall time, and device time per kernel summed over the prefill.
use std::collections::BTreeMap;
use std::time::Instant;

use xlstm_core::backend::{Backend, MlstmKernel};
use xlstm_core::LogitRows;
use xlstm_core::config::{LargeConfig, ModelConfig};
use xlstm_core::tensor::DType;
use xlstm_core::Model;
use xlstm_wgpu::{Api, WgpuBackend};

fn arg(name: &str) -> Option<usize> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok())
}

fn main() {
    let api = match std::env::args().nth(1).as_deref() {
        Some("metal") => Api::Metal,
        Some("dx12") => Api::Dx12,
        Some("gpu") => Api::Any,
        _ => Api::Vulkan,
    };
    // The profiler holds ~80 steps' timestamps of the 7B shape; read once, after the timed steps.
    let steps = arg("--steps").unwrap_or(16).max(1);
    let mut cfg = LargeConfig::xlstm_7b();
    if let Some(n) = arg("--layers") {
        cfg.num_hidden_layers = n;
    }
    let layers = cfg.num_hidden_layers;
    let backend = match WgpuBackend::new(api) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let mut model = Model::random(backend, ModelConfig::Large(cfg), DType::BF16, 0).expect("random model");
    let mut state = model.new_state(1).expect("state");
    if let Some(tokens) = arg("--prefill") {
        profile_prefill(&mut model, layers, tokens);
        return;
    }
    let mut token = 1u32;
    // Greedy as generation runs it: each step recorded before the previous token is read back.
    let mut greedy = |model: &mut Model<WgpuBackend>, n: usize| {
        let mut ticket = model.pipe_step(Some(token), &mut state).expect("step");
        for i in 0..n {
            let ahead = (i + 1 < n).then(|| model.pipe_step(None, &mut state).expect("step"));
            token = model.pipe_token(ticket).expect("token");
            match ahead {
                Some(a) => ticket = a,
                None => break,
            }
        }
    };
    // Pacings, unprofiled; each after a warm-up (pipelines, bind groups, clocks).
    model.backend.set_profiling(false);
    let defaults = (model.backend.submit_every(), model.backend.submit_first(), model.backend.submit_ramp());
    let list = std::env::var("SUBMISSIONS").unwrap_or_else(|_| "128:2:1,128:2:1,256:2:1,64:2:1,32:2:1,128:2:0".into());
    for setting in list.split(',').filter(|s| !s.is_empty()) {
        let v: Vec<u64> = setting.split(':').filter_map(|x| x.parse().ok()).collect();
        if v.len() != 3 {
            continue;
        }
        model.backend.set_submission(v[0], v[1], v[2] == 1);
        greedy(&mut model, 8);
        let t = Instant::now();
        greedy(&mut model, 2 * steps);
        let ms = t.elapsed().as_secs_f64() * 1e3 / (2 * steps) as f64;
        println!("{{\"submissions\":\"every {} first {} ramp {}\",\"wall_ms_per_token\":{ms:.3}}}", v[0], v[1], v[2] == 1);
    }
    model.backend.set_submission(defaults.0, defaults.1, defaults.2);
    greedy(&mut model, 8);
    let _ = model.backend.profile_take();
    model.backend.set_profiling(true);
    let (s0, d0) = model.backend.counters();
    let h0 = model.backend.host_times();
    let t = Instant::now();
    greedy(&mut model, steps);
    let wall = t.elapsed().as_secs_f64() * 1e3 / steps as f64;
    let samples = model.backend.profile_take().expect("profile");
    let (s1, d1) = model.backend.counters();
    let h1 = model.backend.host_times();
    let per = |a: std::time::Duration, b: std::time::Duration| (a - b).as_secs_f64() * 1e3 / steps as f64;
    let (kernels, device) = per_kernel(&samples, steps as f64, "token");
    println!(
        "{{\"device\":\"{}\",\"layers\":{},\"steps\":{steps},\"profiled\":{},\"wall_ms_per_token\":{wall:.3},\"submissions_per_token\":{:.1},\"dispatches_per_token\":{:.1},\"host_ms_per_token\":{{\"record\":{:.3},\"submit\":{:.3},\"wait\":{:.3}}},\"device_ms_per_token_between_timestamps\":{device:.3},\"kernels\":[{}]}}",
        model.backend.name(),
        layers,
        model.backend.profiling(),
        (s1 - s0) as f64 / steps as f64,
        (d1 - d0) as f64 / steps as f64,
        per(h1.record, h0.record),
        per(h1.submit, h0.submit),
        per(h1.wait, h0.wait),
        kernels.join(",")
    );
}

/// Device time per kernel (ms per `unit`, calls per `unit`), first-of-submission dispatches apart,
/// largest first; and the total.
fn per_kernel(samples: &[xlstm_wgpu::profile::Sample], units: f64, unit: &str) -> (Vec<String>, f64) {
    let mut kernels: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    let mut device = 0.0;
    for s in samples {
        if let Some(ns) = s.ns {
            let key = if s.opens_submission { format!("{} (opens a submission)", s.entry) } else { s.entry.to_string() };
            let e = kernels.entry(key).or_default();
            e.0 += ns / 1e6 / units;
            e.1 += 1;
            device += ns / 1e6 / units;
        }
    }
    let mut list: Vec<_> = kernels.into_iter().collect();
    list.sort_by(|a, b| b.1 .0.total_cmp(&a.1 .0));
    let lines = list
        .iter()
        .map(|(k, (ms, n))| format!("{{\"kernel\":\"{k}\",\"ms_per_{unit}\":{ms:.4},\"per_{unit}\":{:.1}}}", *n as f64 / units))
        .collect();
    (lines, device)
}

/// One profiled chunkwise prefill of `tokens` tokens (after an unprofiled one of the same length).
fn profile_prefill(model: &mut Model<WgpuBackend>, layers: usize, tokens: usize) {
    let ids: Vec<u32> = (0..tokens as u32).map(|i| 1 + i % 1000).collect();
    let kernel = MlstmKernel::Chunkwise { chunk: model.chunk_size };
    let run = |model: &mut Model<WgpuBackend>| {
        let mut state = model.new_state(1).expect("state");
        let t = Instant::now();
        model.prefill(&ids, &mut state, kernel, LogitRows::Last).expect("prefill");
        t.elapsed().as_secs_f64() * 1e3
    };
    model.backend.set_profiling(false);
    let warm = run(model);
    let _ = model.backend.profile_take();
    model.backend.set_profiling(true);
    let profiled = run(model);
    let samples = model.backend.profile_take().expect("profile");
    let (kernels, device) = per_kernel(&samples, 1.0, "prefill");
    println!(
        "{{\"device\":\"{}\",\"layers\":{layers},\"prefill_tokens\":{tokens},\"wall_ms\":{warm:.1},\"profiled_wall_ms\":{profiled:.1},\"device_ms_between_timestamps\":{device:.1},\"dispatches\":{},\"kernels\":[{}]}}",
        model.backend.name(),
        samples.len(),
        kernels.join(",")
    );
}
