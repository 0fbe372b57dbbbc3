//! Model hyper-parameters, read from the file (GGUF metadata or `config.json`). Nothing about
//! any particular model is hard-coded: the family differences (activation, sub-norms, scale
//! direction, RoPE pairing) are fields here, and one forward pass reads them.

use crate::{bail, Result};
use bitnet_formats::safetensors_dir::HfDir;
use bitnet_formats::GgufFile;

/// The FFN gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// BitNet b1.58 (2B4T): `relu(x)^2`.
    Relu2,
    /// Llama-style ternary models (Falcon3 1.58-bit, Llama3-8B-1.58, 1bitLLM): `x * sigmoid(x)`.
    Silu,
}

impl Activation {
    pub fn parse(s: &str) -> Option<Activation> {
        match s.to_ascii_lowercase().as_str() {
            "relu2" | "relu_squared" | "squared_relu" => Some(Activation::Relu2),
            "silu" | "swish" => Some(Activation::Silu),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu2 => "relu2",
            Activation::Silu => "silu",
        }
    }
}

/// Which elements RoPE rotates together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs (i, i + d/2): transformers' `rotate_half`, llama.cpp's NEOX. BitNet GGUFs and every
    /// Hugging Face checkpoint.
    Neox,
    /// Adjacent pairs (2i, 2i+1): llama.cpp's `llama` architecture, whose converter permutes the
    /// q/k rows to match.
    Adjacent,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Architecture as the file names it (`bitnet-b1.58`, `bitnet-25`, `bitnet`, `llama`,
    /// or the Hugging Face `model_type`).
    pub arch: String,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_vocab: usize,
    /// Training context length (the largest context we allow).
    pub n_ctx_train: usize,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    pub rms_eps: f32,
    pub activation: Activation,
    /// BitNet's extra RMSNorms before o_proj and down_proj.
    pub sub_norms: bool,
    /// Whether the output head is the token embedding.
    pub tied_head: bool,
}

impl Config {
    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// Check the numbers are consistent and bounded, so that nothing later can overflow or
    /// allocate absurd amounts because of a bad file.
    pub fn validate(&self) -> Result<()> {
        let dims = [
            ("embedding length", self.n_embd),
            ("feed-forward length", self.n_ff),
            ("block count", self.n_layer),
            ("head count", self.n_head),
            ("KV head count", self.n_head_kv),
            ("head dimension", self.head_dim),
            ("vocabulary size", self.n_vocab),
            ("context length", self.n_ctx_train),
        ];
        for (name, v) in dims {
            if v == 0 || v > 1 << 24 {
                bail!("{name} {v} is out of range");
            }
        }
        if self.n_layer > 1024 || self.n_head > 4096 {
            bail!(
                "implausible layer/head count ({} layers, {} heads)",
                self.n_layer,
                self.n_head
            );
        }
        if !self.n_head.is_multiple_of(self.n_head_kv) {
            bail!(
                "head count {} is not a multiple of the KV head count {}",
                self.n_head,
                self.n_head_kv
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!("head dimension {} must be even for RoPE", self.head_dim);
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            bail!("RoPE base {} is not a positive number", self.rope_theta);
        }
        if !(self.rms_eps.is_finite() && self.rms_eps >= 0.0 && self.rms_eps < 1.0) {
            bail!("RMSNorm epsilon {} is out of range", self.rms_eps);
        }
        Ok(())
    }

    /// From GGUF metadata. `n_vocab` comes from the embedding tensor (the caller checks it).
    pub fn from_gguf(g: &GgufFile) -> Result<Config> {
        let arch = g
            .get_str("general.architecture")?
            .ok_or_else(|| crate::Error::new("missing metadata key \"general.architecture\""))?;
        let arch = arch.to_string();
        let (default_act, rope_style, sub_norms) = match arch.as_str() {
            "bitnet-b1.58" | "bitnet-25" => (Activation::Relu2, RopeStyle::Neox, true),
            "bitnet" => {
                // No converter writes the activation; llama.cpp also uses this name for 1bitLLM's
                // SentencePiece models, which use SiLU (REFERENCE.md section 2).
                let act = if g.get_str("tokenizer.ggml.model")? == Some("llama") { Activation::Silu } else { Activation::Relu2 };
                (act, RopeStyle::Neox, true)
            }
            "llama" => (Activation::Silu, RopeStyle::Adjacent, false),
            other => bail!("architecture {other:?} is not supported (expected bitnet-b1.58, bitnet-25, bitnet or llama)"),
        };
        let key = |k: &str| format!("{arch}.{k}");
        let req = |k: &str| -> Result<usize> {
            let full = key(k);
            match g.get_u64(&full)? {
                Some(v) => usize::try_from(v).map_err(|_| {
                    crate::Error::new(format!("metadata key {full:?} = {v} is too large"))
                }),
                None => bail!("missing metadata key {full:?}"),
            }
        };
        let n_embd = req("embedding_length")?;
        let n_head = req("attention.head_count")?;
        if n_head == 0 {
            bail!("metadata key {:?} is 0", key("attention.head_count"));
        }
        let n_head_kv = match g.get_u64(&key("attention.head_count_kv"))? {
            Some(v) => v as usize,
            None => n_head,
        };
        let head_dim = match g.get_u64(&key("attention.key_length"))? {
            Some(v) => v as usize,
            None => n_embd / n_head,
        };
        if let Some(rd) = g.get_u64(&key("rope.dimension_count"))? {
            if rd as usize != head_dim {
                bail!("partial rotary embeddings (rope.dimension_count {rd} != head dimension {head_dim}) are not supported");
            }
        }
        if let Some(t) = g.get_str(&key("rope.scaling.type"))? {
            let factor = g.get_f64(&key("rope.scaling.factor"))?.unwrap_or(1.0);
            if !(t == "none" || (t == "linear" && factor == 1.0)) {
                bail!("RoPE scaling {t:?} with factor {factor} is not supported");
            }
        }
        let activation = match g.get_str(&key("hidden_activation"))? {
            Some(s) => Activation::parse(s).ok_or_else(|| {
                crate::Error::new(format!(
                    "unknown activation {s:?} in {:?}",
                    key("hidden_activation")
                ))
            })?,
            None => default_act,
        };
        let has_sub_norm = g.tensor("blk.0.attn_sub_norm.weight").is_some();
        if sub_norms && !has_sub_norm {
            bail!(
                "missing tensor \"blk.0.attn_sub_norm.weight\" (architecture {arch} has sub-norms)"
            );
        }
        let embd = g
            .tensor("token_embd.weight")
            .ok_or_else(|| crate::Error::new("missing tensor \"token_embd.weight\""))?;
        if embd.dims.len() != 2 {
            bail!(
                "tensor \"token_embd.weight\" should have 2 dimensions, has {:?}",
                embd.dims
            );
        }
        let n_vocab = embd.dims[1] as usize;
        if let Some(v) = g.get_u64(&key("vocab_size"))? {
            if v as usize != n_vocab {
                bail!(
                    "metadata key {:?} = {v} does not match token_embd rows {n_vocab}",
                    key("vocab_size")
                );
            }
        }
        let cfg = Config {
            n_embd,
            n_ff: req("feed_forward_length")?,
            n_layer: req("block_count")?,
            n_head,
            n_head_kv,
            head_dim,
            n_vocab,
            n_ctx_train: req("context_length")?,
            rope_theta: g.get_f64(&key("rope.freq_base"))?.unwrap_or(10000.0) as f32,
            rope_style,
            rms_eps: g
                .get_f64(&key("attention.layer_norm_rms_epsilon"))?
                .unwrap_or(1e-5) as f32,
            activation,
            sub_norms,
            tied_head: g.tensor("output.weight").is_none(),
            arch,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// From a Hugging Face `config.json`.
    pub fn from_hf(d: &HfDir) -> Result<Config> {
        let mut model_type = d.config_str("model_type")?.unwrap_or("").to_string();
        let (sub_norms, default_act) = match model_type.as_str() {
            "bitnet" => (true, Activation::Relu2),
            "llama" => {
                // 1bitLLM's bitnet_b1_58 models say `llama` (architecture BitnetForCausalLM,
                // custom code) but carry sub-norms under their older names; they are the
                // BitNet graph with SiLU, so they run (and convert) as such.
                let legacy = hf_sub_norm_names(d) == HF_SUB_NORMS_1BITLLM;
                let declared = hf_declares_1bitllm_arch(d);
                if legacy != declared {
                    bail!(
                        "config.json: {}, but the layers {} 1bitLLM sub-norms (inner_attn_ln, ffn_layernorm)",
                        if declared { "architectures names BitnetForCausalLM" } else { "a plain llama model" },
                        if legacy { "have" } else { "lack" },
                    );
                }
                if legacy {
                    model_type = "bitnet".to_string();
                }
                (legacy, Activation::Silu)
            }
            other => {
                bail!("model_type {other:?} is not supported (expected \"bitnet\" or \"llama\")")
            }
        };
        let req = |k: &str| -> Result<usize> {
            match d.config_u64(k)? {
                Some(v) => Ok(v as usize),
                None => bail!("config.json has no {k:?}"),
            }
        };
        let n_embd = req("hidden_size")?;
        let n_head = req("num_attention_heads")?;
        if n_head == 0 {
            bail!("config.json: num_attention_heads is 0");
        }
        let activation = match d.config_str("hidden_act")? {
            Some(s) => Activation::parse(s).ok_or_else(|| {
                crate::Error::new(format!("config.json: unknown hidden_act {s:?}"))
            })?,
            None => default_act,
        };
        let rope_theta = match d.config_f64("rope_theta")? {
            Some(t) => t,
            None => d
                .config
                .get("rope_parameters")
                .and_then(|p| p.get("rope_theta"))
                .and_then(|t| t.as_f64())
                .unwrap_or(10000.0),
        };
        if let Some(scaling) = d.config.get("rope_scaling").filter(|v| !v.is_null()) {
            let ty = scaling
                .get("rope_type")
                .or_else(|| scaling.get("type"))
                .and_then(|t| t.as_str())
                .unwrap_or("");
            let factor = scaling
                .get("factor")
                .and_then(|f| f.as_f64())
                .unwrap_or(1.0);
            if !(ty == "default" || (ty == "linear" && factor == 1.0)) {
                bail!("config.json: rope_scaling {scaling} is not supported");
            }
        }
        let head_dim = match d.config_u64("head_dim")? {
            Some(h) => h as usize,
            None => n_embd / n_head,
        };
        let cfg = Config {
            arch: model_type,
            n_embd,
            n_ff: req("intermediate_size")?,
            n_layer: req("num_hidden_layers")?,
            n_head,
            n_head_kv: d
                .config_u64("num_key_value_heads")?
                .map(|v| v as usize)
                .unwrap_or(n_head),
            head_dim,
            n_vocab: req("vocab_size")?,
            n_ctx_train: d
                .config_u64("max_position_embeddings")?
                .map(|v| v as usize)
                .unwrap_or(2048),
            rope_theta: rope_theta as f32,
            rope_style: RopeStyle::Neox,
            rms_eps: d.config_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            activation,
            sub_norms,
            // transformers ties when asked; without a head tensor it falls back to the embedding.
            tied_head: d.config_bool("tie_word_embeddings")?.unwrap_or(false)
                || d.tensor("lm_head.weight").is_none(),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Sub-norm tensor names (attention, FFN) under `model.layers.N.`: transformers' BitNet
/// (2B4T) names, and 1bitLLM's bitnet_b1_58 names (which llama.cpp's tensor map also knows).
pub const HF_SUB_NORMS: (&str, &str) =
    ("self_attn.attn_sub_norm.weight", "mlp.ffn_sub_norm.weight");
pub const HF_SUB_NORMS_1BITLLM: (&str, &str) =
    ("self_attn.inner_attn_ln.weight", "mlp.ffn_layernorm.weight");

/// The sub-norm names this directory uses: transformers' unless layer 0 has 1bitLLM's.
pub fn hf_sub_norm_names(d: &HfDir) -> (&'static str, &'static str) {
    if d.tensor(&format!("model.layers.0.{}", HF_SUB_NORMS_1BITLLM.0))
        .is_some()
    {
        HF_SUB_NORMS_1BITLLM
    } else {
        HF_SUB_NORMS
    }
}

/// `architectures` names 1bitLLM's `BitnetForCausalLM` (lower-case "n"; transformers' own
/// 2B4T class is `BitNetForCausalLM`, with `model_type: bitnet`).
fn hf_declares_1bitllm_arch(d: &HfDir) -> bool {
    d.config
        .get("architectures")
        .and_then(|a| a.as_array())
        .is_some_and(|a| a.iter().any(|v| v.as_str() == Some("BitnetForCausalLM")))
}
