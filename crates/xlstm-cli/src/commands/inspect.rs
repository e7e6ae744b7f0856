//! `xlstm inspect`
use anyhow::Result;
use xlstm_core::config::ModelConfig;
use xlstm_core::hub;
use xlstm_core::weights::Checkpoint;

#[derive(clap::Args)]
pub struct Args {
    /// Model directory or hub id.
    #[arg(long)]
    pub model: String,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let dir = hub::resolve(&a.model)?;
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let ckpt = Checkpoint::open(&dir)?;
    let tensors = ckpt.describe()?;
    let params: usize = tensors.values().map(|(_, s)| s.iter().product::<usize>()).sum();
    let mut dtypes: std::collections::BTreeMap<String, usize> = Default::default();
    for (d, s) in tensors.values() {
        *dtypes.entry(d.clone()).or_default() += s.iter().product::<usize>();
    }
    let report = serde_json::json!({
        "dir": dir,
        "family": config.family(),
        "config": config.to_json(),
        "tensors": tensors.len(),
        "parameters": params,
        "stored_dtypes": dtypes,
        "bytes_on_disk": ckpt.bytes_on_disk(),
        "memory_f32_bytes": params * 4,
        "memory_bf16_bytes": params * 2,
        "shards": ckpt.shards.len(),
        "tokenizer": if dir.join("tokenizer.json").is_file() { "tokenizer.json" } else { "bytes (no tokenizer.json)" },
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("model       {}", dir.display());
    println!("family      {}", config.family());
    println!("parameters  {} ({:.3} B)", params, params as f64 / 1e9);
    println!("stored      {:?} in {} shard(s), {:.2} GB on disk", dtypes, ckpt.shards.len(), ckpt.bytes_on_disk() as f64 / 1e9);
    println!("memory      {:.2} GB as f32, {:.2} GB as bf16/f16 (+ state and activations)", params as f64 * 4e-9, params as f64 * 2e-9);
    println!("tokenizer   {}", report["tokenizer"].as_str().unwrap_or(""));
    println!("config      {}", serde_json::to_string(&config.to_json())?);
    Ok(())
}
