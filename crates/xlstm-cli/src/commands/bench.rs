//! `xlstm bench`: prefill and decode timings as JSON, with the floors they are measured against.
use anyhow::{bail, Result};
use serde_json::json;
use xlstm_core::bench;
use xlstm_core::config::{LargeConfig, ModelConfig};
use xlstm_core::{DType, MlstmKernel, Model};

use crate::load::{configure, init_workers, load, on_device, set_state_dtype, ModelArgs, OnBackend};
use xlstm_core::Backend;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// A named shape with random weights instead of --model: tiny, 125m, 350m, 1.3b, 7b.
    #[arg(long)]
    pub config: Option<String>,
    /// Use random weights of the model's shape (implied by --config).
    #[arg(long)]
    pub random_weights: bool,
    #[arg(long, default_value_t = 512)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 32)]
    pub gen_len: usize,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Timed prefills (after one warm-up); the best is reported.
    #[arg(long, default_value_t = 1)]
    pub prefill_reps: usize,
    /// Idle this many ms before each timed prefill (a lone request on an idle GPU; by default they
    /// run back to back, as on a loaded server, where a GPU at its power limit clocks lower).
    #[arg(long, default_value_t = 0)]
    pub prefill_rest_ms: u64,
    /// Print one JSON object (otherwise a readable summary too).
    #[arg(long)]
    pub json: bool,
}

/// Named xLSTM-7B-architecture shapes: (blocks, width, heads, vocab).
pub fn named_shape(name: &str) -> Result<LargeConfig> {
    Ok(match name {
        "7b" => LargeConfig::xlstm_7b(),
        "1.3b" => LargeConfig::with_shape(24, 2048, 4, 50304),
        "350m" => LargeConfig::with_shape(24, 1024, 4, 50304),
        "125m" => LargeConfig::with_shape(12, 768, 4, 50304),
        "tiny" => LargeConfig::with_shape(2, 128, 2, 512),
        other => bail!("unknown --config `{other}`: use tiny, 125m, 350m, 1.3b or 7b"),
    })
}

pub fn run(a: Args) -> Result<()> {
    on_device(&a.model.device.clone(), a)
}

impl OnBackend for Args {
    fn run<B: Backend>(self, backend: B) -> Result<()> {
        bench_on(backend, self)
    }
}

fn bench_on<B: Backend>(backend: B, a: Args) -> Result<()> {
    init_workers(&a.model.runtime.resolve()?)?;
    if a.batch == 0 || a.prompt_len == 0 {
        bail!("--batch and --prompt-len must be at least 1");
    }
    let mut model = match &a.config {
        Some(name) => {
            let cfg = named_shape(name)?;
            let dtype = if a.model.dtype == "auto" { DType::BF16 } else { DType::parse(&a.model.dtype)? };
            eprintln!("bench: {name} shape, random weights, {dtype}");
            Model::random(backend, ModelConfig::Large(cfg), dtype, 0)?
        }
        None if a.random_weights && a.model.model.is_some() => {
            let dir = xlstm_core::hub::resolve(a.model.model.as_deref().unwrap_or_default())?;
            let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
            let dtype = if a.model.dtype == "auto" { DType::BF16 } else { DType::parse(&a.model.dtype)? };
            Model::random(backend, cfg, dtype, 0)?
        }
        None => load(backend, &a.model)?.model,
    };
    set_state_dtype(&mut model, &a.model.state_dtype)?;
    let params = match &model.config {
        ModelConfig::Large(c) => c.num_params(),
        ModelConfig::Lm(c) => c.num_params(),
    };
    // The floor uses the memory the weights live in: the GPU's measured copy bandwidth on a device
    // backend, the host's otherwise.
    let bw = match model.backend.device_bandwidth()? {
        Some(b) => b,
        None => bench::host_bandwidth(),
    };
    let mut settings = a.model.runtime.resolve()?;
    configure(&mut model, &mut settings)?;
    let warmup = settings.warmup().max(1);
    let kernel = MlstmKernel::Chunkwise { chunk: model.chunk_size };
    let prefill = bench::prefill(&mut model, a.prompt_len, kernel, a.prefill_reps, a.prefill_rest_ms)?;
    // Decode as greedy generation runs it: the fused head's top-1 unless --fast-head 0.
    let head = settings.fast_head().then_some(1);
    let decode = bench::decode(&mut model, a.batch, a.gen_len, warmup, head)?;
    let floor_ms = decode.weight_bytes_per_step as f64 / (bw.copy_gb_s * 1e9) * 1e3;
    // The same weights at the read probe's rate (decode only reads them; on some devices, e.g.
    // wgpu through Vulkan, the copy probe reads far below what the kernels stream).
    let read_floor_ms = decode.weight_bytes_per_step as f64 / (bw.read_gb_s * 1e9) * 1e3;
    // With the recurrent state read and written too (every sequence's): a large batch's floor.
    let state_floor_ms = (decode.weight_bytes_per_step + decode.state_bytes_per_step) as f64 / (bw.copy_gb_s * 1e9) * 1e3;
    let decode_1 = if a.batch == 1 { decode.clone() } else { bench::decode(&mut model, 1, a.gen_len, warmup, head)? };
    // Device memory in use after the runs (weights, states, cached activation buffers, the
    // runtime's own), where the backend has memory of its own.
    let device_memory = model.backend.memory_probe().and_then(|p| p()).map(|(used, total)| json!({ "used_mb": used as f64 / 1e6, "total_mb": total as f64 / 1e6 }));
    let report = json!({
        "device": model.backend_name(),
        "family": model.config.family(),
        "parameters": params,
        "dtype": model.dtype.name(),
        "state_dtype": model.state_dtype().name(),
        "threads": rayon_threads(),
        "prompt_len": a.prompt_len,
        "gen_len": a.gen_len,
        "batch": a.batch,
        "chunk_size": match kernel { MlstmKernel::Chunkwise { chunk } => chunk, MlstmKernel::Sequence => 0 },
        "bandwidth": bw,
        "prefill": prefill,
        "decode": decode,
        "decode_head": if head.is_some() { "fused top-1" } else { "full logits" },
        "decode_floor_ms_per_step": floor_ms,
        "decode_ratio_to_floor": floor_ms / decode.ms_per_step,
        "decode_read_floor_ms_per_step": read_floor_ms,
        "decode_ratio_to_read_floor": read_floor_ms / decode.ms_per_step,
        "decode_floor_with_state_ms_per_step": state_floor_ms,
        "decode_ratio_to_floor_with_state": state_floor_ms / decode.ms_per_step,
        "prefill_vs_decode_per_token": prefill.tok_s / decode_1.tok_s,
        "peak_rss_mb": xlstm_core::sys::peak_rss_bytes() as f64 / 1e6,
        "device_memory": device_memory,
    });
    println!("{}", serde_json::to_string(&report)?);
    if !a.json {
        eprintln!(
            "prefill {:.1} tok/s | decode {:.2} ms/step ({:.1} tok/s, batch {}) | floor {:.2} ms ({:.1} GB/s copy) | ratio {:.0}% | prefill/decode per token {:.1}x",
            prefill.tok_s, decode.ms_per_step, decode.tok_s, a.batch, floor_ms, bw.copy_gb_s, 100.0 * floor_ms / decode.ms_per_step, prefill.tok_s / decode_1.tok_s
        );
    }
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
