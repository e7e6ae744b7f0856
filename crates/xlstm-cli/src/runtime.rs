//! The runtime knobs as flags. Each maps to one key of `xlstm_core::settings::KNOBS` (which holds the
//! environment variable, default and meaning); precedence flag > environment > profile > default.
use std::collections::BTreeMap;

use anyhow::Result;
use clap::Args;
use xlstm_core::settings::Settings;

#[derive(Args, Clone, Debug, Default)]
pub struct RuntimeArgs {
    /// Named settings bundle: default, high-memory (warn only near the cliff, no shrinking, large
    /// chunks), low-memory.
    #[arg(long, env = "XLSTM_PROFILE")]
    pub profile: Option<String>,
    /// Memory watchdog on (1) or off (0) [env XLSTM_MEM_WATCHDOG, default 1].
    #[arg(long)]
    pub mem_watchdog: Option<String>,
    /// Watchdog sampling period in ms, at least 50 [XLSTM_MEM_POLL_MS, 200].
    #[arg(long)]
    pub mem_poll_ms: Option<String>,
    /// Soft limit as a fraction of system/device memory in use [XLSTM_MEM_SOFT_PCT, 0.85].
    #[arg(long)]
    pub mem_soft_pct: Option<String>,
    /// Hard limit as a fraction of system/device memory in use [XLSTM_MEM_HARD_PCT, 0.92].
    #[arg(long)]
    pub mem_hard_pct: Option<String>,
    /// Soft limit on this process's memory, MB; wins over the fraction [XLSTM_MEM_SOFT_MB].
    #[arg(long)]
    pub mem_soft_mb: Option<String>,
    /// Hard limit on this process's memory, MB; wins over the fraction [XLSTM_MEM_HARD_MB].
    #[arg(long)]
    pub mem_hard_mb: Option<String>,
    /// Soft-limit actions, comma-separated: warn, empty_cache, shrink [XLSTM_MEM_ACTION, all three].
    #[arg(long)]
    pub mem_action: Option<String>,
    /// Never shrink the prefill chunk at the soft limit [XLSTM_SHRINK_ON_SOFT=0].
    #[arg(long)]
    pub no_mem_shrink: bool,
    /// Smallest chunk shrinking may reach [XLSTM_MIN_CHUNK, 8].
    #[arg(long)]
    pub min_chunk: Option<String>,
    /// Prefill chunk size [XLSTM_CHUNK_SIZE, the model's].
    #[arg(long)]
    pub chunk_size: Option<String>,
    /// Prompt tokens per prefill pass [XLSTM_PREFILL_SEGMENT, the backend's: 512 CPU, 2048 CUDA and wgpu GPUs].
    #[arg(long)]
    pub prefill_segment: Option<String>,
    /// A prompt's activation buffers for up to this many tokens per prefill pass are kept for the
    /// next prompt; larger ones are freed when it is done [XLSTM_KEEP_PROMPT_BUFFERS, 2048].
    #[arg(long)]
    pub keep_prompt_buffers: Option<String>,
    /// Heads per kernel launch / CPU task [XLSTM_HEADS_PER_BAND, 1: each head its own task].
    #[arg(long)]
    pub heads_per_band: Option<String>,
    /// CPU worker threads [XLSTM_WORKERS, one per core].
    #[arg(long)]
    pub workers: Option<String>,
    /// GPU streams [XLSTM_STREAMS, 1].
    #[arg(long)]
    pub streams: Option<String>,
    /// Warm-up passes [XLSTM_WARMUP, 1].
    #[arg(long)]
    pub warmup: Option<String>,
    /// Probe the knobs first and keep the best [XLSTM_AUTOSCALE, 0].
    #[arg(long)]
    pub autoscale: Option<String>,
    /// Apply stored tuning (0 ignores it) [XLSTM_USE_BEST, 1].
    #[arg(long)]
    pub use_best: Option<String>,
    /// Fused LM head, 1 or 0 [XLSTM_FAST_HEAD, 1].
    #[arg(long)]
    pub fast_head: Option<String>,
    /// Matrix-product tile ROWSxCOLS, e.g. 64x32 [XLSTM_GEMM_TILE].
    #[arg(long)]
    pub gemm_tile: Option<String>,
}

impl RuntimeArgs {
    pub fn flags(&self) -> BTreeMap<&'static str, String> {
        let mut m = BTreeMap::new();
        let mut put = |k: &'static str, v: &Option<String>| {
            if let Some(v) = v {
                m.insert(k, v.clone());
            }
        };
        put("mem_watchdog", &self.mem_watchdog);
        put("mem_poll_ms", &self.mem_poll_ms);
        put("mem_soft_pct", &self.mem_soft_pct);
        put("mem_hard_pct", &self.mem_hard_pct);
        put("mem_soft_mb", &self.mem_soft_mb);
        put("mem_hard_mb", &self.mem_hard_mb);
        put("mem_action", &self.mem_action);
        put("min_chunk", &self.min_chunk);
        put("chunk_size", &self.chunk_size);
        put("prefill_segment", &self.prefill_segment);
        put("keep_prompt_buffers", &self.keep_prompt_buffers);
        put("heads_per_band", &self.heads_per_band);
        put("workers", &self.workers);
        put("streams", &self.streams);
        put("warmup", &self.warmup);
        put("autoscale", &self.autoscale);
        put("use_best", &self.use_best);
        put("fast_head", &self.fast_head);
        put("gemm_tile", &self.gemm_tile);
        if self.no_mem_shrink {
            m.insert("shrink_on_soft", "0".into());
        }
        m
    }

    pub fn resolve(&self) -> Result<Settings> {
        Ok(Settings::resolve(&self.flags(), self.profile.as_deref(), |k| std::env::var(k).ok())?)
    }
}
