//! `bitnet info`: format, architecture, hyper-parameters, metadata and the tensor table.
//! Reads only headers (no weights are decoded), so it is instant on any model size.

use anyhow::{anyhow, Result};
use bitnet_engine::Config;
use bitnet_formats::gguf::is_gguf;
use bitnet_formats::safetensors_dir::{is_hf_dir, HfDir};
use bitnet_formats::GgufFile;
use clap::Args;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Model: a GGUF file, a Hugging Face model directory, or a Hub reference OWNER/REPO[:FILE][@REV].
    #[arg(short = 'm', long)]
    pub model: PathBuf,
}

fn print_config(c: &Config) {
    println!("architecture:      {}", c.arch);
    println!("layers:            {}", c.n_layer);
    println!("hidden size:       {}", c.n_embd);
    println!("FFN size:          {}", c.n_ff);
    println!(
        "heads / KV heads:  {} / {} (head dim {})",
        c.n_head, c.n_head_kv, c.head_dim
    );
    println!("vocabulary:        {}", c.n_vocab);
    println!("context:           {}", c.n_ctx_train);
    println!(
        "RoPE:              theta {} ({:?} pairing)",
        c.rope_theta, c.rope_style
    );
    println!("RMSNorm epsilon:   {}", c.rms_eps);
    println!("FFN activation:    {}", c.activation.name());
    println!(
        "sub-norms:         {}",
        if c.sub_norms { "yes" } else { "no" }
    );
    println!(
        "output head:       {}",
        if c.tied_head {
            "tied to the token embedding"
        } else {
            "separate"
        }
    );
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else if bytes >= 1 << 20 {
        format!("{:.2} MiB", bytes as f64 / (1u64 << 20) as f64)
    } else if bytes >= 1 << 10 {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    } else {
        format!("{bytes} B")
    }
}

pub fn run(a: InfoArgs) -> Result<()> {
    let path = &crate::args::resolve_model_path(&a.model)?;
    let ctx = |e: bitnet_engine::Error| e.context(path.display());
    if is_hf_dir(path) {
        let d = HfDir::open(path)?;
        println!(
            "file:              {} (Hugging Face directory, {} shard(s), {})",
            path.display(),
            d.shard_paths().len(),
            human(d.total_bytes())
        );
        print_config(&Config::from_hf(&d).map_err(ctx)?);
        if let Some(q) = d.config.get("quantization_config") {
            println!("quantization:      {q}");
        }
        println!(
            "\n{:<60} {:>6}  {:<18} {:>10}",
            "tensor", "dtype", "shape", "bytes"
        );
        for t in d.tensors() {
            println!(
                "{:<60} {:>6}  {:<18} {:>10}",
                t.name,
                format!("{:?}", t.dtype),
                format!("{:?}", t.shape),
                human(d.tensor_data(t).len() as u64)
            );
        }
    } else if is_gguf(path) {
        let g = GgufFile::open(path)?;
        let size = std::fs::metadata(path)?.len();
        println!(
            "file:              {} (GGUF v{}, {})",
            path.display(),
            g.version(),
            human(size)
        );
        print_config(&Config::from_gguf(&g).map_err(ctx)?);
        println!("\nmetadata:");
        for (k, v) in g.metadata() {
            println!("  {k} = {}", v.summary());
        }
        println!(
            "\n{:<36} {:>6}  {:<18} {:>10}",
            "tensor", "type", "dims (ne0 first)", "bytes"
        );
        let mut counts: Vec<(String, usize)> = Vec::new();
        for t in g.tensors() {
            println!(
                "{:<36} {:>6}  {:<18} {:>10}",
                t.name,
                t.dtype.name(),
                format!("{:?}", t.dims),
                human(t.size)
            );
            match counts.iter_mut().find(|(n, _)| n == t.dtype.name()) {
                Some((_, c)) => *c += 1,
                None => counts.push((t.dtype.name().to_string(), 1)),
            }
        }
        let summary: Vec<String> = counts.iter().map(|(n, c)| format!("{n} {c}")).collect();
        println!("\n{} tensors: {}", g.tensors().len(), summary.join(", "));
    } else if path.exists() {
        return Err(anyhow!(
            "{}: not a GGUF file or a Hugging Face model directory",
            path.display()
        ));
    } else {
        return Err(anyhow!("{}: no such file or directory", path.display()));
    }
    Ok(())
}
