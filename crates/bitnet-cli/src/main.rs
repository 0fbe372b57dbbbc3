//! `bitnet`: run BitNet b1.58 ternary models on the CPU. Each subcommand is a thin layer over
//! `bitnet-engine`; see README.md for examples.

mod args;
mod cmd_info;
mod cmd_logits;
mod cmd_run;
mod cmd_tokenize;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "bitnet",
    version,
    about = "Run BitNet b1.58 ternary language models on the CPU",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streamed to stdout.
    Run(cmd_run::RunArgs),
    /// Show a model's architecture, hyper-parameters and tensors.
    Info(cmd_info::InfoArgs),
    /// Print the logits for exactly the given token ids, as JSON.
    Logits(cmd_logits::LogitsArgs),
    /// Tokenize text read from stdin and print the ids as a JSON array.
    Tokenize(cmd_tokenize::TokenizeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(a) => cmd_run::run(a),
        Command::Info(a) => cmd_info::run(a),
        Command::Logits(a) => cmd_logits::run(a),
        Command::Tokenize(a) => cmd_tokenize::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, no backtrace: errors are for users.
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
