//! `xlstm tune`: probe the speed knobs on this machine and model shape; store the best.
use anyhow::Result;
use serde_json::json;
use xlstm_core::{tune, Backend};

use crate::load::{load, on_device, ModelArgs, OnBackend};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens each prefill probe runs.
    #[arg(long, default_value_t = 256)]
    pub prompt_len: usize,
    /// Decode steps each decode probe runs.
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
}

pub fn run(a: Args) -> Result<()> {
    on_device(&a.model.device.clone(), a)
}

impl OnBackend for Args {
    fn run<B: Backend>(self, backend: B) -> Result<()> {
        let mut model_args = self.model.clone();
        model_args.runtime.use_best = Some("0".into()); // probe from the defaults, not a stored tuning
        let mut loaded = load(backend, &model_args)?;
        let key = tune::key(&loaded.model);
        let (best, trials) = tune::tune(&mut loaded.model, self.prompt_len.max(16), self.steps.max(1))?;
        let path = tune::store(&key, &best)?;
        println!("{}", serde_json::to_string_pretty(&json!({"key": key, "best": best, "trials": trials, "stored_in": path}))?);
        Ok(())
    }
}
