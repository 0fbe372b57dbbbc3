//! `bitnet`: run BitNet b1.58 ternary models on the CPU. Each subcommand is a thin layer over
//! `bitnet-engine`; see README.md for examples.

mod args;
mod cmd_bench;
mod cmd_chat;
mod cmd_convert;
mod cmd_info;
mod cmd_list;
mod cmd_logits;
mod cmd_perplexity;
mod cmd_pull;
mod cmd_run;
mod cmd_serve;
mod cmd_synth;
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
    /// Copy the weights each token reads (ternary matrices, output head) into memory with huge
    /// pages instead of reading them from the memory-mapped file (as llama.cpp's --no-mmap):
    /// same resident memory, slower to load, faster generation on some machines
    /// (docs/PERFORMANCE.md).
    #[arg(long, global = true)]
    no_mmap: bool,
    /// Element type of the KV cache: f32 (keys and values kept exactly) or f16 (half the
    /// cache's memory and of the bytes each token reads from it, as llama.cpp's default; logits
    /// move slightly).
    #[arg(long, global = true, default_value = "f32")]
    kv_type: String,
    /// Use TQ1_0 weights as stored (1.69 bits per weight: memory stays at the file's size)
    /// instead of repacking them to 2 bits at load (19% more memory for the ternary weights,
    /// about twice as fast to generate with; docs/PERFORMANCE.md).
    #[arg(long, global = true)]
    tq1_native: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streamed to stdout.
    Run(cmd_run::RunArgs),
    /// Chat with a model in the terminal (or line by line through a pipe).
    Chat(cmd_chat::ChatArgs),
    /// Serve the model over an OpenAI-compatible HTTP API, with continuous batching.
    Serve(cmd_serve::ServeArgs),
    /// Show a model's architecture, hyper-parameters and tensors.
    Info(cmd_info::InfoArgs),
    /// Print the logits for exactly the given token ids, as JSON.
    Logits(cmd_logits::LogitsArgs),
    /// Tokenize text read from stdin and print the ids as a JSON array.
    Tokenize(cmd_tokenize::TokenizeArgs),
    /// Write a synthetic model (random ternary weights, a real model's shapes) for benchmarks.
    Synth(cmd_synth::SynthArgs),
    /// Measure prompt processing and generation speed (the llama-bench equivalent).
    Bench(cmd_bench::BenchArgs),
    /// Perplexity over a text file, and KL divergence against a reference run's saved logits.
    Perplexity(cmd_perplexity::PerplexityArgs),
    /// Download a model from the Hugging Face Hub into its cache; prints the local path.
    Pull(cmd_pull::PullArgs),
    /// List the models in the Hugging Face cache, with their sizes.
    List(cmd_list::ListArgs),
    /// Remove a model (or one revision of it) from the Hugging Face cache.
    Rm(cmd_list::RmArgs),
    /// Convert a Hugging Face directory or a GGUF file to GGUF I2_S, TQ2_0 or TQ1_0.
    Convert(cmd_convert::ConvertArgs),
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
    let kv_type = match cli.kv_type.parse() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: --kv-type: {e}");
            return ExitCode::FAILURE;
        }
    };
    args::set_global_load_options(cli.no_mmap, kv_type, cli.tq1_native);
    let result = match cli.command {
        Command::Run(a) => cmd_run::run(a),
        Command::Chat(a) => cmd_chat::run(a),
        Command::Serve(a) => cmd_serve::run(a),
        Command::Info(a) => cmd_info::run(a),
        Command::Logits(a) => cmd_logits::run(a),
        Command::Tokenize(a) => cmd_tokenize::run(a),
        Command::Synth(a) => cmd_synth::run(a),
        Command::Bench(a) => cmd_bench::run(a),
        Command::Perplexity(a) => cmd_perplexity::run(a),
        Command::Pull(a) => cmd_pull::run(a),
        Command::List(a) => cmd_list::run_list(a),
        Command::Rm(a) => cmd_list::run_rm(a),
        Command::Convert(a) => cmd_convert::run(a),
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
