//! `xlstm`: run xLSTM language models. Thin on purpose: each subcommand parses its flags and calls the
//! library (`xlstm-core`); errors print as one line and exit non-zero.
mod commands;
mod load;
mod runtime;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xlstm", version, about = "Fast inference for xLSTM language models (xLSTM-7B architecture and the original mLSTM/sLSTM stack)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streaming tokens as they come.
    Generate(commands::generate::Args),
    /// Write the logits of a token sequence to a safetensors file (for correctness checks).
    Logits(commands::logits::Args),
    /// Time prefill and decode; print JSON with the memory-bandwidth floor and the ratio to it.
    Bench(commands::bench::Args),
    /// Show a model's config, parameter count, dtypes and memory needs.
    Inspect(commands::inspect::Args),
    /// Print the effective runtime settings (memory watchdog, tuning knobs) and where each comes from.
    Config(commands::config::Args),
    /// Live terminal monitor of a running xlstm process (memory, tok/s, watchdog).
    Top(commands::top::Args),
    /// Time the speed knobs on this machine and model shape; store the best for next time.
    Tune(commands::tune::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => commands::generate::run(a),
        Command::Logits(a) => commands::logits::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::Inspect(a) => commands::inspect::run(a),
        Command::Config(a) => commands::config::run(a),
        Command::Top(a) => commands::top::run(a),
        Command::Tune(a) => commands::tune::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
