//! `bitnet`: run BitNet b1.58 ternary models on the CPU. Each subcommand is a thin layer over
//! `bitnet-engine`; see README.md for examples.

mod args;
mod cmd_chat;
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
    /// Chat with a model in the terminal (or line by line through a pipe).
    Chat(cmd_chat::ChatArgs),
    /// Show a model's architecture, hyper-parameters and tensors.
    Info(cmd_info::InfoArgs),
    /// Print the logits for exactly the given token ids, as JSON.
    Logits(cmd_logits::LogitsArgs),
    /// Tokenize text read from stdin and print the ids as a JSON array.
    Tokenize(cmd_tokenize::TokenizeArgs),
}

fn main() -> ExitCode {
    // llama.cpp spells some long options with one dash (`-sys`, `-np`); clap only knows
    // one-letter short options, so rewrite them first.
    let args = std::env::args_os().map(|a| match a.to_str() {
        Some("-sys") => "--system-prompt".into(),
        Some("-np") => "--parallel".into(),
        _ => a,
    });
    let cli = Cli::parse_from(args);
    let result = match cli.command {
        Command::Run(a) => cmd_run::run(a),
        Command::Chat(a) => cmd_chat::run(a),
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
