//! Benchmark measurements: timed prefill and decode after warm-up, and the floors to compare them
//! with (the machine's measured memory bandwidth for decode, FLOPs for prefill).
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::backend::{Backend, MlstmKernel};
use crate::error::Result;
use crate::model::{LogitRows, Model};

#[derive(Clone, Debug, Serialize)]
pub struct Bandwidth {
    /// STREAM-style copy: (bytes read + bytes written) / time.
    pub copy_gb_s: f64,
    /// Read-only streaming (a sum over a buffer).
    pub read_gb_s: f64,
}

/// Measures host memory bandwidth with all rayon threads on buffers far larger than the caches.
pub fn host_bandwidth() -> Bandwidth {
    let n = 64 << 20; // 64 Mi f32 = 256 MiB per buffer
    let src: Vec<f32> = (0..n).into_par_iter().map(|i| i as f32).collect();
    let mut dst = vec![0f32; n];
    let part = n / (rayon::current_num_threads() * 8);
    let mut best_copy = f64::MAX;
    let mut best_read = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        dst.par_chunks_mut(part).zip(src.par_chunks(part)).for_each(|(d, s)| d.copy_from_slice(s));
        best_copy = best_copy.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        // 16 independent lanes so the sum vectorises and the loop is bound by memory, not by adds.
        let s: f32 = src
            .par_chunks(part)
            .map(|c| {
                let mut lanes = [0f32; 16];
                for v in c.chunks_exact(16) {
                    for l in 0..16 {
                        lanes[l] += v[l];
                    }
                }
                lanes.iter().sum::<f32>()
            })
            .sum();
        std::hint::black_box(s);
        best_read = best_read.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    let bytes = (n * 4) as f64;
    Bandwidth { copy_gb_s: 2.0 * bytes / best_copy / 1e9, read_gb_s: bytes / best_read / 1e9 }
}

#[derive(Clone, Debug, Serialize)]
pub struct PrefillResult {
    pub tokens: usize,
    pub ms: f64,
    pub tok_s: f64,
    /// 2 × parameters-in-matrices per token.
    pub gflop_per_token: f64,
    pub achieved_gflop_s: f64,
    /// Idle time before each timed prefill, ms (0: back to back).
    pub rest_ms: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct DecodeResult {
    pub batch: usize,
    pub steps: usize,
    pub ms_per_step: f64,
    pub tok_s: f64,
    /// Weight bytes one step reads (every matrix once, whatever the batch).
    pub weight_bytes_per_step: usize,
    /// Recurrent-state bytes one step reads and writes (every sequence's state once each way, C
    /// in its element type, written once per `Backend::mlstm_steps_per_write` steps where the
    /// backend defers its updates): with the weights, what bounds a large batch's step.
    pub state_bytes_per_step: usize,
    pub achieved_gb_s: f64,
    /// Greedy steps recorded before the previous token was read back (`Model::pipe_step`), as
    /// greedy generation runs them on such a backend.
    pub pipelined: bool,
    /// Device memory the backend held at the end of the timed steps, the states still live
    /// (`Backend::allocated_bytes`; None where it keeps no count), MB.
    pub device_allocated_mb: Option<f64>,
}

fn tokens(n: usize, vocab: usize, seed: u64) -> Vec<u32> {
    (0..n as u64).map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed)) % vocab as u64) as u32).collect()
}

/// Times a prefill of `len` tokens (after one warm-up prefill of the same length). With `rest_ms`
/// > 0 each timed one follows that long idle, as a lone request finds a GPU (below its power
/// limit); with 0 they run back to back, as on a loaded server, which holds a GPU at that limit.
pub fn prefill<B: Backend>(model: &mut Model<B>, len: usize, kernel: MlstmKernel, reps: usize, rest_ms: u64) -> Result<PrefillResult> {
    let ids = tokens(len, model.vocab_size(), 7);
    let mut best = f64::MAX;
    for rep in 0..reps.max(1) + 1 {
        let mut st = model.new_state(1)?;
        if rep > 0 && rest_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(rest_ms));
        }
        let t = Instant::now();
        model.prefill(&ids, &mut st, kernel, LogitRows::Last)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    let gflop = 2.0 * model.weight_bytes_per_token() as f64 / model.dtype.size() as f64 / 1e9;
    Ok(PrefillResult { tokens: len, ms: best * 1e3, tok_s: len as f64 / best, gflop_per_token: gflop, achieved_gflop_s: gflop * len as f64 / best, rest_ms })
}

/// Times `steps` decode steps of a batch (after `warmup` untimed steps). `top_k`: each step ends in
/// the fused LM head's selection of that many candidates per sequence (what greedy or top-k
/// generation runs); None: each step returns the full logits.
pub fn decode<B: Backend>(model: &mut Model<B>, batch: usize, steps: usize, warmup: usize, top_k: Option<usize>) -> Result<DecodeResult> {
    let mut st = model.new_state(batch)?;
    let ids = tokens(batch, model.vocab_size(), 3);
    let pipelined = top_k == Some(1) && batch == 1 && model.can_pipe_greedy();
    if pipelined {
        // Greedy as generation runs it here: step i + 1 is under way before step i's token is read.
        let run = |model: &mut Model<B>, st: &mut crate::state::State<B>, n: usize| -> Result<()> {
            let mut ticket = model.pipe_step(Some(ids[0]), st)?;
            for i in 0..n {
                let ahead = if i + 1 < n { Some(model.pipe_step(None, st)?) } else { None };
                model.pipe_token(ticket)?;
                match ahead {
                    Some(a) => ticket = a,
                    None => break,
                }
            }
            Ok(())
        };
        run(model, &mut st, warmup.max(1))?;
        let t = Instant::now();
        run(model, &mut st, steps.max(1))?;
        let per = t.elapsed().as_secs_f64() / steps.max(1) as f64;
        return Ok(decode_result(model, &st, steps, per, true));
    }
    let step = |model: &mut Model<B>, st: &mut crate::state::State<B>| -> Result<()> {
        match top_k {
            Some(k) => model.step_top_k(&ids, st, k).map(drop),
            None => model.step(&ids, st).map(drop),
        }
    };
    for _ in 0..warmup {
        step(model, &mut st)?;
    }
    let t = Instant::now();
    for _ in 0..steps.max(1) {
        step(model, &mut st)?;
    }
    let per = t.elapsed().as_secs_f64() / steps.max(1) as f64;
    Ok(decode_result(model, &st, steps, per, false))
}

/// Read while the caller's decode state is still alive, so the backend's memory count includes it.
fn decode_result<B: Backend>(model: &Model<B>, st: &crate::state::State<B>, steps: usize, per: f64, pipelined: bool) -> DecodeResult {
    let (bytes, batch) = (model.weight_bytes_per_token(), st.batch);
    DecodeResult {
        batch,
        steps: steps.max(1),
        ms_per_step: per * 1e3,
        tok_s: batch as f64 / per,
        weight_bytes_per_step: bytes,
        state_bytes_per_step: st.step_traffic(&model.backend) as usize,
        achieved_gb_s: bytes as f64 / per / 1e9,
        pipelined,
        device_allocated_mb: model.backend.allocated_bytes().map(|b| b as f64 / 1e6),
    }
}
