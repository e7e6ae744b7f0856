//! `xlstm generate`
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use xlstm_core::generate::{generate, GenerateParams};
use xlstm_core::sampling::SamplingParams;
use xlstm_core::live::{live_dir, Live};
use xlstm_core::watchdog::sample;
use xlstm_core::MlstmKernel;

use crate::load::{load, on_device, ModelArgs, OnBackend};
use xlstm_core::Backend;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text.
    #[arg(long, short)]
    pub prompt: String,
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// 0 = off.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// 1 = off.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 1 = off.
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when this text appears (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Keep generating past the EOS token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Refuse prompts longer than this many tokens.
    #[arg(long)]
    pub max_prompt_tokens: Option<usize>,
    /// A CSV row per prefill segment and per generated token (time, tokens, tok/s, memory).
    #[arg(long)]
    pub stats_log: Option<PathBuf>,
    /// Also write the stats as JSON to this file.
    #[arg(long)]
    pub stats_json: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<()> {
    on_device(&a.model.device.clone(), a)
}

impl OnBackend for Args {
    fn run<B: Backend>(self, backend: B) -> Result<()> {
        generate_on(backend, self)
    }
}

fn generate_on<B: Backend>(backend: B, a: Args) -> Result<()> {
    let mut loaded = load(backend, &a.model)?;
    let live = Live::new(a.model.model.as_deref().unwrap_or("built-in default"), &loaded.model.backend_name());
    let _published = {
        let probe = loaded.model.backend.memory_probe();
        live.publish(&live_dir(), std::time::Duration::from_millis(loaded.settings.mem_poll_ms()?), move || sample(probe.as_ref()))?
    };
    let params = GenerateParams {
        max_new_tokens: a.max_new_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            repetition_penalty: a.repetition_penalty,
            seed: a.seed,
        },
        stop_strings: a.stop.clone(),
        stop_on_eos: !a.ignore_eos,
        prefill_kernel: Some(MlstmKernel::Chunkwise { chunk: loaded.model.chunk_size }),
        max_prompt_tokens: a.max_prompt_tokens,
        stats_log: a.stats_log.clone(),
        live: Some(live.clone()),
        fast_head: loaded.settings.fast_head(),
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let gen = generate(&mut loaded.model, &loaded.tokenizer, &a.prompt, &params, |piece| {
        let _ = out.write_all(piece.as_bytes());
        let _ = out.flush();
    })?;
    writeln!(out)?;
    for e in &gen.stats.memory_events {
        eprintln!("memory watchdog: {e}");
    }
    eprintln!("{}", gen.stats.line());
    if let Some(path) = a.stats_json {
        std::fs::write(&path, serde_json::to_string_pretty(&gen.stats)?).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
