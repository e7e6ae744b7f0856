//! `xlstm config`: the effective settings and where each comes from.
use anyhow::Result;

use crate::runtime::RuntimeArgs;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let s = a.runtime.resolve()?;
    if a.json {
        let rows: Vec<_> = s
            .table()
            .into_iter()
            .map(|(k, v, src)| serde_json::json!({"key": k.key, "value": v, "source": src, "env": k.env, "flag": k.flag, "default": k.default}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!("{:<16} {:<24} {:<8} {:<22} {}", "setting", "value", "source", "environment", "meaning");
    for (k, v, src) in s.table() {
        let v = if v.is_empty() { "(auto)".to_string() } else { v };
        println!("{:<16} {:<24} {:<8} {:<22} {}", k.key, v, format!("{src:?}").to_lowercase(), k.env, k.help);
    }
    Ok(())
}
