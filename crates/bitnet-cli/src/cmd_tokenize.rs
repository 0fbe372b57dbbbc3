//! `bitnet tokenize`: text on stdin (exactly as given) to a JSON array of token ids.

use anyhow::{anyhow, Result};
use bitnet_engine::tokenizer::Tokenizer;
use bitnet_formats::gguf::is_gguf;
use bitnet_formats::GgufFile;
use clap::Args;
use std::io::Read;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// A GGUF file, a Hugging Face model directory, a tokenizer.json, or a Hub reference.
    #[arg(short = 'm', long)]
    pub model: PathBuf,
    /// Never add the BOS token.
    #[arg(long)]
    pub no_bos: bool,
}

/// The tokenizer alone, without loading any weights.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    let ctx = || path.display().to_string();
    if path.is_dir() {
        Tokenizer::from_hf_dir(path)?
            .ok_or_else(|| anyhow!("{}: no tokenizer.json in this directory", ctx()))
    } else if is_gguf(path) {
        let g = GgufFile::open(path)?;
        Ok(Tokenizer::from_gguf(&g).map_err(|e| e.context(ctx()))?)
    } else if path.is_file() {
        Ok(Tokenizer::from_tokenizer_json(path).map_err(|e| e.context(ctx()))?)
    } else {
        Err(anyhow!("{}: no such file or directory", ctx()))
    }
}

pub fn run(a: TokenizeArgs) -> Result<()> {
    let tok = load_tokenizer(&crate::args::resolve_model_path(&a.model)?)?;
    let mut bytes = Vec::new();
    std::io::stdin().read_to_end(&mut bytes)?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow!(
            "stdin is not valid UTF-8 (byte {})",
            e.utf8_error().valid_up_to()
        )
    })?;
    let ids = tok.encode(&text, !a.no_bos)?;
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}
