//! `xlstm logits`: the interface other tools check correctness through. The tokens go in exactly as
//! given (no BOS); the output is a safetensors file with `logits` [S, V] f32.
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use safetensors::tensor::TensorView;
use xlstm_core::{LogitRows, MlstmKernel};

use crate::load::{load, on_device, ModelArgs, OnBackend};
use xlstm_core::Backend;

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Mode {
    /// The whole sequence in one pass (chunkwise kernel).
    Parallel,
    /// One token at a time through the recurrent step.
    Step,
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Comma-separated token ids, e.g. 3,17,5.
    #[arg(long, value_delimiter = ',', required = true)]
    pub tokens: Vec<String>,
    /// Output safetensors file.
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "parallel")]
    pub mode: Mode,
}

pub fn run(a: Args) -> Result<()> {
    on_device(&a.model.device.clone(), a)
}

impl OnBackend for Args {
    fn run<B: Backend>(self, backend: B) -> Result<()> {
        logits_on(backend, self)
    }
}

fn logits_on<B: Backend>(backend: B, a: Args) -> Result<()> {
    let ids: Vec<u32> = a
        .tokens
        .iter()
        .filter(|t| !t.trim().is_empty())
        .map(|t| t.trim().parse::<u32>().with_context(|| format!("--tokens: `{t}` is not a token id (non-negative integer)")))
        .collect::<Result<_>>()?;
    if ids.is_empty() {
        bail!("--tokens is empty: give at least one token id");
    }
    let mut loaded = load(backend, &a.model)?;
    let m = &mut loaded.model;
    let mut state = m.new_state(1)?;
    let logits = match a.mode {
        Mode::Parallel => {
            let chunk = m.chunk_size;
            m.prefill(&ids, &mut state, MlstmKernel::Chunkwise { chunk }, LogitRows::All)?
        }
        Mode::Step => {
            let mut all = Vec::with_capacity(ids.len() * m.vocab_size());
            for &t in &ids {
                all.extend(m.step(&[t], &mut state)?);
            }
            all
        }
    };
    let view = TensorView::new(safetensors::Dtype::F32, vec![ids.len(), m.vocab_size()], bytemuck_cast(&logits))?;
    safetensors::serialize_to_file([("logits", view)], None, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!("wrote logits [{}, {}] to {}", ids.len(), m.vocab_size(), a.out.display());
    Ok(())
}

fn bytemuck_cast(x: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and u8 has alignment 1.
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, std::mem::size_of_val(x)) }
}
