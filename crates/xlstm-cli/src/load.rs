//! What every subcommand shares: resolving `--model` (a directory, a hub id, or the built-in default),
//! choosing the device and the weight dtype.


use anyhow::{bail, Context, Result};
use clap::Args;
use xlstm_core::config::{LargeConfig, ModelConfig};
use xlstm_core::tokenizer::Tokenizer;
use xlstm_core::weights::Checkpoint;
use xlstm_core::settings::Settings;
use xlstm_core::watchdog::Watchdog;
use xlstm_core::{hub, Backend, CpuBackend, DType, Model};

#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// Model directory (config.json + safetensors) or Hugging Face hub id (e.g. NX-AI/xLSTM-7b).
    /// Without it, a built-in randomly initialised model of the shape given below.
    #[arg(long, env = "XLSTM_MODEL")]
    pub model: Option<String>,
    /// Weight dtype in memory: f32, bf16 or f16; `auto` keeps 16-bit checkpoints in 16 bits and
    /// loads f32 checkpoints as f32 unless they would not fit in half the machine's memory.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Element type of the mLSTM states' C matrices: f32, or bf16 on CUDA (half the state's memory
    /// and per-step traffic, as NX-AI's `inference_state_dtype`; each step's update is rounded to
    /// bf16, so long generations drift from the f32 state's).
    #[arg(long, default_value = "f32")]
    pub state_dtype: String,
    /// Where to run: cpu (default), cuda (cuda:N for GPU N), vulkan / metal / dx12 (the wgpu backend
    /// on that API), gpu (CUDA if usable, else wgpu), or auto (CUDA, then a wgpu GPU, else CPU).
    #[arg(long, default_value = "cpu", env = "XLSTM_DEVICE")]
    pub device: String,
    /// Built-in default model: number of blocks.
    #[arg(long, default_value_t = 6)]
    pub layers: usize,
    /// Built-in default model: embedding width.
    #[arg(long, default_value_t = 512)]
    pub model_dim: usize,
    /// Built-in default model: heads.
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    /// Built-in default model: vocabulary (256 = the byte tokenizer's).
    #[arg(long, default_value_t = 256)]
    pub vocab_size: usize,
    /// Built-in default model: blocks that are sLSTM (e.g. 1,3), making it an xlstm-lm model.
    #[arg(long, value_delimiter = ',')]
    pub slstm_at: Vec<usize>,
    /// Seed of the built-in model's random weights.
    #[arg(long, default_value_t = 0)]
    pub weight_seed: u64,
    #[command(flatten)]
    pub runtime: crate::runtime::RuntimeArgs,
}

pub struct Loaded<B: Backend> {
    pub model: Model<B>,
    pub tokenizer: Tokenizer,
    pub settings: Settings,
}

/// Applies the settings that act on the model: a stored (or, with autoscale, a fresh) tuning for
/// this device and shape, the chunk size, the CPU tile and band knobs, and the memory watchdog.
pub fn configure<B: Backend>(model: &mut Model<B>, settings: &mut Settings) -> Result<()> {
    let key = xlstm_core::tune::key(model);
    if settings.use_best() {
        let stored = xlstm_core::tune::load_all().remove(&key);
        let tuned = match stored {
            Some(t) => Some(t),
            None if settings.autoscale() => {
                eprintln!("autoscale: probing chunk size, heads per band and tile for this machine and model...");
                let (t, _) = xlstm_core::tune::tune(model, 256, 8)?;
                let path = xlstm_core::tune::store(&key, &t)?;
                eprintln!("autoscale: stored in {}", path.display());
                Some(t)
            }
            None => None,
        };
        if let Some(t) = tuned {
            xlstm_core::tune::apply(settings, &t);
        }
    }
    if let Some(chunk) = settings.chunk_size()? {
        model.chunk_size = chunk;
    }
    if let Some(tokens) = settings.prefill_segment()? {
        model.prefill_segment = tokens;
    }
    model.keep_prompt_rows = settings.keep_prompt_buffers()?;
    model.watchdog = Watchdog::start(settings, model.backend.memory_probe())?;
    if let Some((gemv_rows, gemm_rows)) = settings.gemm_tile()? {
        xlstm_core::backend::cpu::matmul::set_tile(gemv_rows, gemm_rows);
    }
    if let Some(band) = settings.heads_per_band()? {
        xlstm_core::backend::cpu::mlstm::set_heads_per_band(band);
    }
    Ok(())
}

/// Worker threads for the CPU backend: set once, before the first parallel section.
pub fn init_workers(settings: &Settings) -> Result<()> {
    if let Some(n) = settings.workers()? {
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().ok();
    }
    Ok(())
}

/// A command body that runs on whichever backend `--device` names.
pub trait OnBackend {
    fn run<B: Backend>(self, backend: B) -> Result<()>;
}

/// Runs `job` on the device named; a device that is not there is an error, never a silent fall-back.
/// `cuda` (alias `gpu`, or `cuda:N` for GPU N) needs a build with the `cuda` feature (the default) and
/// a usable NVIDIA driver, GPU, NVRTC and cuBLAS at run time; `auto` takes CUDA when all of that is
/// there and the CPU otherwise (it says which on stderr).
pub fn on_device(device: &str, job: impl OnBackend) -> Result<()> {
    match device {
        "cpu" => job.run(CpuBackend::new()),
        "auto" => {
            #[cfg(feature = "cuda")]
            if xlstm_cuda::probe().is_ok() {
                if let Ok(b) = xlstm_cuda::CudaBackend::new(0) {
                    eprintln!("device: auto -> cuda ({})", b.device_name());
                    return job.run(b);
                }
            }
            // Then wgpu, on a real GPU adapter only (lavapipe, a CPU adapter, is slower than the CPU backend).
            #[cfg(feature = "wgpu")]
            if xlstm_wgpu::probe_gpu(xlstm_wgpu::Api::Any).is_ok() {
                if let Ok(b) = xlstm_wgpu::WgpuBackend::new(xlstm_wgpu::Api::Any) {
                    eprintln!("device: auto -> {}", b.name());
                    return job.run(b);
                }
            }
            job.run(CpuBackend::new())
        }
        // `gpu`: CUDA where it is usable, else the wgpu backend (any API).
        #[cfg(feature = "wgpu")]
        "gpu" if !cuda_usable() => wgpu_device(device, job),
        d if d == "cuda" || d == "gpu" || d.starts_with("cuda:") => cuda(d, job),
        "metal" | "vulkan" | "dx12" => wgpu_device(device, job),
        other => bail!("unknown device `{other}`: use cpu, cuda, cuda:N, gpu, vulkan, metal, dx12 or auto"),
    }
}

#[cfg(feature = "wgpu")]
fn cuda_usable() -> bool {
    #[cfg(feature = "cuda")]
    return xlstm_cuda::probe().is_ok();
    #[cfg(not(feature = "cuda"))]
    false
}

/// The wgpu backend (WGSL kernels): `vulkan`, `metal`, `dx12` ask for that API, `gpu` for any.
#[cfg(feature = "wgpu")]
fn wgpu_device(device: &str, job: impl OnBackend) -> Result<()> {
    let api = match device {
        "vulkan" => xlstm_wgpu::Api::Vulkan,
        "metal" => xlstm_wgpu::Api::Metal,
        "dx12" => xlstm_wgpu::Api::Dx12,
        _ => xlstm_wgpu::Api::Any,
    };
    let backend = xlstm_wgpu::WgpuBackend::new(api).map_err(|e| anyhow::anyhow!("--device {device}: {e}"))?;
    job.run(backend)
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_device(device: &str, _job: impl OnBackend) -> Result<()> {
    bail!("device `{device}` is not available: this xlstm was built without the `wgpu` feature; use --device cpu")
}

#[cfg(feature = "cuda")]
fn cuda(device: &str, job: impl OnBackend) -> Result<()> {
    let ordinal = match device.strip_prefix("cuda:") {
        Some(n) => n.parse::<usize>().map_err(|_| anyhow::anyhow!("`{device}`: the GPU index after `cuda:` must be a number"))?,
        None => 0,
    };
    if let Err(why) = xlstm_cuda::probe() {
        bail!("--device {device}: CUDA is not usable here: {why}");
    }
    let backend = xlstm_cuda::CudaBackend::new(ordinal).with_context(|| format!("--device {device}"))?;
    job.run(backend)
}

#[cfg(not(feature = "cuda"))]
fn cuda(device: &str, _job: impl OnBackend) -> Result<()> {
    bail!("device `{device}` is not available: this xlstm was built without the `cuda` feature; use --device cpu")
}

fn total_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<u64>().ok()))
        .map_or(u64::MAX, |kb| kb * 1024)
}

/// The dtype `--dtype` asks for, with `auto` resolved against the checkpoint.
pub fn weight_dtype(flag: &str, ckpt: Option<&Checkpoint>) -> Result<DType> {
    if flag != "auto" {
        return Ok(DType::parse(flag)?);
    }
    let Some(ckpt) = ckpt else { return Ok(DType::F32) };
    let stored = ckpt.describe()?;
    if stored.values().any(|(d, _)| d == "BF16") {
        return Ok(DType::BF16);
    }
    if stored.values().any(|(d, _)| d == "F16") {
        return Ok(DType::F16);
    }
    if ckpt.bytes_on_disk() > total_memory_bytes() / 2 {
        eprintln!("note: the f32 checkpoint is large for this machine; keeping weights in bf16 (pass --dtype f32 to override)");
        return Ok(DType::BF16);
    }
    Ok(DType::F32)
}

/// The built-in default config from the shape flags.
pub fn default_config(a: &ModelArgs) -> Result<ModelConfig> {
    if a.layers == 0 || a.model_dim == 0 || a.heads == 0 || a.vocab_size == 0 {
        bail!("--layers, --model-dim, --heads and --vocab-size must be positive");
    }
    if a.model_dim % a.heads != 0 || (a.model_dim / 2) % 64 != 0 {
        bail!("--model-dim must be a multiple of 128 and of --heads (got {} with {} heads)", a.model_dim, a.heads);
    }
    if !a.slstm_at.is_empty() {
        return lm_default_config(a);
    }
    Ok(ModelConfig::Large(LargeConfig::with_shape(a.layers, a.model_dim, a.heads, a.vocab_size)))
}

fn lm_default_config(a: &ModelArgs) -> Result<ModelConfig> {
    if let Some(bad) = a.slstm_at.iter().find(|&&i| i >= a.layers) {
        bail!("--slstm-at {bad} is not a block index (the model has {} blocks)", a.layers);
    }
    let c = xlstm_core::model::lm::LmConfig::with_shape(a.layers, a.model_dim, a.heads, a.vocab_size, &a.slstm_at, 4096)?;
    Ok(ModelConfig::Lm(c))
}

pub fn load<B: Backend>(backend: B, a: &ModelArgs) -> Result<Loaded<B>> {
    let settings = a.runtime.resolve()?;
    init_workers(&settings)?;
    let (mut model, tokenizer) = match &a.model {
        Some(spec) => {
            let dir = hub::resolve(spec)?;
            let ckpt = Checkpoint::open(&dir)?;
            let dtype = weight_dtype(&a.dtype, Some(&ckpt))?;
            let model = Model::load(backend, &dir, dtype).with_context(|| format!("loading {}", dir.display()))?;
            let tokenizer = Tokenizer::for_model_dir(&dir)?;
            (model, tokenizer)
        }
        None => {
            let config = default_config(a)?;
            let dtype = weight_dtype(&a.dtype, None)?;
            eprintln!(
                "note: no --model given: running the built-in {} model ({} blocks, width {}, {} heads, vocab {}) with RANDOM weights, so its text is noise",
                config.family(), a.layers, a.model_dim, a.heads, a.vocab_size
            );
            let model = Model::random(backend, config, dtype, a.weight_seed)?;
            (model, Tokenizer::Bytes)
        }
    };
    set_state_dtype(&mut model, &a.state_dtype)?;
    let mut settings = settings;
    configure(&mut model, &mut settings)?;
    Ok(Loaded { model, tokenizer, settings })
}

/// Applies `--state-dtype` (f32 or bf16; which ones the device offers is the model's check).
pub fn set_state_dtype<B: Backend>(model: &mut Model<B>, flag: &str) -> Result<()> {
    let dtype = match flag.to_ascii_lowercase().as_str() {
        "f32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        other => bail!("unknown --state-dtype `{other}`: use f32 or bf16"),
    };
    Ok(model.set_state_dtype(dtype)?)
}
