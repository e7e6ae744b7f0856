//! The tuner: times candidate settings of the knobs that change speed but not results (prefill
//! chunk, heads per band, matrix-product tile) on this machine and model shape, and stores the best
//! in a tuning file keyed by device and shape, applied automatically next time (`XLSTM_USE_BEST`).
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::backend::cpu::{matmul, mlstm};
use crate::backend::{Backend, MlstmKernel};
use crate::error::{Error, Result};
use crate::model::{LogitRows, Model};
use crate::settings::Settings;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Tuned {
    pub chunk_size: usize,
    pub heads_per_band: usize,
    /// (GEMV weight rows per task, GEMM rows per block; 0 = automatic)
    pub gemm_tile: (usize, usize),
    pub prefill_tok_s: f64,
    pub decode_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Trial {
    pub knob: &'static str,
    pub value: String,
    pub seconds: f64,
}

/// `XLSTM_TUNING_FILE`, else `~/.cache/xlstm/tuning.json`.
pub fn tuning_file() -> PathBuf {
    if let Some(p) = std::env::var_os("XLSTM_TUNING_FILE") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(std::env::temp_dir);
    home.join(".cache/xlstm/tuning.json")
}

/// What a tuning is keyed by: the device, the model's shape and the weight dtype.
pub fn key<B: Backend>(model: &Model<B>) -> String {
    format!("{}|{}|{}", model.backend_name(), model.fingerprint(), model.dtype)
}

pub fn load_all() -> BTreeMap<String, Tuned> {
    std::fs::read(tuning_file()).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

pub fn store(key: &str, t: &Tuned) -> Result<PathBuf> {
    let path = tuning_file();
    let mut all = load_all();
    all.insert(key.to_string(), t.clone());
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    }
    std::fs::write(&path, serde_json::to_vec_pretty(&all).expect("serialisable")).map_err(|e| Error::file(&path, e))?;
    Ok(path)
}

/// Applies a stored tuning to `settings` (never over a flag or an environment variable).
pub fn apply(settings: &mut Settings, t: &Tuned) {
    settings.apply_tuned("chunk_size", t.chunk_size.to_string());
    settings.apply_tuned("heads_per_band", t.heads_per_band.to_string());
    settings.apply_tuned("gemm_tile", format!("{}x{}", t.gemm_tile.0, t.gemm_tile.1.max(1)));
}

fn time_prefill<B: Backend>(model: &mut Model<B>, ids: &[u32], chunk: usize) -> Result<f64> {
    let mut best = f64::MAX;
    for _ in 0..2 {
        let mut st = model.new_state(1)?;
        let t = Instant::now();
        model.prefill(ids, &mut st, MlstmKernel::Chunkwise { chunk }, LogitRows::Last)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

fn time_decode<B: Backend>(model: &mut Model<B>, steps: usize) -> Result<f64> {
    let mut st = model.new_state(1)?;
    model.step(&[1], &mut st)?;
    let t = Instant::now();
    for i in 0..steps {
        model.step(&[(i % model.vocab_size()) as u32], &mut st)?;
    }
    Ok(t.elapsed().as_secs_f64() / steps.max(1) as f64)
}

/// Probes the candidates (prefill of `prompt_len` tokens, `steps` decode steps) and returns the best
/// with every trial. Leaves the CPU knobs set to the winners.
pub fn tune<B: Backend>(model: &mut Model<B>, prompt_len: usize, steps: usize) -> Result<(Tuned, Vec<Trial>)> {
    let ids: Vec<u32> = (0..prompt_len).map(|i| (i * 7919 % model.vocab_size()) as u32).collect();
    let mut trials = Vec::new();
    let mut best_chunk = (model.chunk_size, f64::MAX);
    for chunk in [16usize, 32, 64, 128] {
        let s = time_prefill(model, &ids, chunk)?;
        trials.push(Trial { knob: "chunk_size", value: chunk.to_string(), seconds: s });
        if s < best_chunk.1 {
            best_chunk = (chunk, s);
        }
    }
    let mut best_band = (1usize, f64::MAX);
    for band in [1usize, 2, 4] {
        mlstm::set_heads_per_band(band);
        let s = time_prefill(model, &ids, best_chunk.0)?;
        trials.push(Trial { knob: "heads_per_band", value: band.to_string(), seconds: s });
        if s < best_band.1 {
            best_band = (band, s);
        }
    }
    mlstm::set_heads_per_band(best_band.0);
    let mut best_tile = ((32usize, 0usize), f64::MAX);
    for rows in [8usize, 32, 128] {
        matmul::set_tile(rows, 0);
        let s = time_decode(model, steps)?;
        trials.push(Trial { knob: "gemm_tile", value: format!("{rows}x0"), seconds: s });
        if s < best_tile.1 {
            best_tile = ((rows, 0), s);
        }
    }
    matmul::set_tile(best_tile.0 .0, best_tile.0 .1);
    model.chunk_size = best_chunk.0;
    let tuned = Tuned {
        chunk_size: best_chunk.0,
        heads_per_band: best_band.0,
        gemm_tile: best_tile.0,
        prefill_tok_s: prompt_len as f64 / best_band.1.min(best_chunk.1),
        decode_ms: best_tile.1 * 1e3,
    };
    Ok((tuned, trials))
}
