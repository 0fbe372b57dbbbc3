//! `bitnet logits`: run exactly the given token ids (no BOS added) and print
//! `{"n_vocab": V, "logits": [[...], ...]}`: one row per position with `--all`, else only the
//! last position's row. Numbers are the shortest decimal form that round-trips to the f32.
//! Conformance checks depend on this interface: keep it stable.

use crate::args::{init_threads, load_model};
use anyhow::{anyhow, Result};
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct LogitsArgs {
    /// Model: a GGUF file or a Hugging Face model directory.
    #[arg(short = 'm', long)]
    pub model: PathBuf,
    /// Comma-separated token ids, e.g. 1,17,42.
    #[arg(long)]
    pub tokens: String,
    /// Print every position's logits, not only the last.
    #[arg(long)]
    pub all: bool,
    /// Compute threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
}

pub fn parse_tokens(s: &str) -> Result<Vec<u32>> {
    let ids = s
        .split(',')
        .map(|p| {
            let p = p.trim();
            p.parse::<u32>().map_err(|_| anyhow!("--tokens: {p:?} is not a token id (expected comma-separated non-negative integers)"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ids)
}

pub fn run(a: LogitsArgs) -> Result<()> {
    let tokens = parse_tokens(&a.tokens)?;
    init_threads(a.threads)?;
    let model = load_model(&a.model, &Default::default())?;
    let v = model.config.n_vocab;
    if tokens.len() > model.config.n_ctx_train {
        return Err(anyhow!(
            "{} tokens exceed the model's context of {}",
            tokens.len(),
            model.config.n_ctx_train
        ));
    }
    let mut session = model.new_session(tokens.len());
    let logits = model
        .forward(&mut session, &tokens, a.all)
        .map_err(|e| e.context(a.model.display()))?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    write!(out, "{{\"n_vocab\": {v}, \"logits\": [")?;
    for (r, row) in logits.chunks(v).enumerate() {
        out.write_all(if r == 0 { b"[" } else { b", [" })?;
        for (i, x) in row.iter().enumerate() {
            if i > 0 {
                out.write_all(b", ")?;
            }
            // serde_json writes the shortest representation that parses back to the same f32
            // (and null for non-finite values, which JSON cannot hold).
            serde_json::to_writer(&mut out, x)?;
        }
        out.write_all(b"]")?;
    }
    writeln!(out, "]}}")?;
    out.flush()?;
    Ok(())
}
