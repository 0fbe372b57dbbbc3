//! `bitnet synth`: write a synthetic model (random ternary weights, the exact shapes of a real
//! model) for benchmarks and tests. The generator is `bitnet_engine::synth`.

use anyhow::Result;
use bitnet_engine::synth::{self, Shape, SynthType};
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Shape: 2b4t, tiny, falcon3-1b, falcon3-3b, llama3-8b-1.58 or bitnet_b1_58-3b.
    #[arg(long, default_value = "2b4t")]
    pub shape: String,
    /// Storage type of the ternary matrices: i2_s (bitnet.cpp), tq2_0 or tq1_0 (llama.cpp).
    #[arg(long = "type", default_value = "i2_s")]
    pub ty: String,
    /// Output GGUF file.
    #[arg(short = 'o', long)]
    pub output: PathBuf,
    /// Random seed: the same seed gives the same weights for every --type.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Override the hidden size.
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Override the feed-forward size.
    #[arg(long)]
    pub ffn: Option<usize>,
    /// Override the number of layers.
    #[arg(long)]
    pub layers: Option<usize>,
    /// Override the number of attention heads.
    #[arg(long)]
    pub heads: Option<usize>,
    /// Override the number of KV heads.
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Override the head dimension (default: the shape's, else hidden / heads).
    #[arg(long)]
    pub head_dim: Option<usize>,
    /// Override the vocabulary size (at least 266).
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Override the training context length.
    #[arg(long)]
    pub ctx: Option<usize>,
    /// Compute threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
}

pub fn run(a: SynthArgs) -> Result<()> {
    let mut shape = Shape::named(&a.shape)?;
    let ty = SynthType::parse(&a.ty)?;
    let set = |slot: &mut usize, v: Option<usize>| {
        if let Some(v) = v {
            *slot = v;
        }
    };
    set(&mut shape.n_embd, a.hidden);
    set(&mut shape.n_ff, a.ffn);
    set(&mut shape.n_layer, a.layers);
    set(&mut shape.n_head, a.heads);
    set(&mut shape.n_head_kv, a.kv_heads);
    set(&mut shape.n_vocab, a.vocab);
    set(&mut shape.n_ctx, a.ctx);
    if a.head_dim.is_some() {
        shape.head_dim = a.head_dim;
    }
    shape.validate()?;
    crate::args::init_threads(a.threads)?;
    let t0 = Instant::now();
    let r = synth::write_model(&shape, ty, a.seed, &a.output)?;
    let fallback = if r.f16_fallback.is_empty() {
        String::new()
    } else {
        format!(
            "; {} ternary matrices stored as F16 (rows do not fit the block size)",
            r.f16_fallback.len()
        )
    };
    eprintln!(
        "wrote {}: {} {} ({} layers, hidden {}, ffn {}, heads {}/{}, head dim {}, vocab {}), {} tensors, {:.1} M params, {:.1} MiB in {:.1} s{fallback}",
        r.path.display(),
        r.arch,
        ty.ggml(),
        shape.n_layer,
        shape.n_embd,
        shape.n_ff,
        shape.n_head,
        shape.n_head_kv,
        shape.head_dim(),
        shape.n_vocab,
        r.n_tensors,
        r.n_params as f64 / 1e6,
        r.file_bytes as f64 / (1u64 << 20) as f64,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
