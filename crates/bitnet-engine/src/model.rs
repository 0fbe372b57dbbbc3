//! The BitNet b1.58 forward pass, in one place (REFERENCE.md section 1):
//!
//! ```text
//! n     = RMSNorm(x) * attn_norm
//! q,k,v = BitLinear_{q,k,v}(n)                      one activation quantization shared
//! q,k   = RoPE(q), RoPE(k)
//! a     = softmax(q k^T / sqrt(head_dim) + causal) v   grouped-query attention
//! h     = x + BitLinear_o(RMSNorm(a) * attn_sub_norm)  (sub-norm only in BitNet proper)
//! m     = RMSNorm(h) * ffn_norm
//! f     = act(BitLinear_gate(m)) * BitLinear_up(m)      act = relu^2 (BitNet) or SiLU (Llama-style)
//! out   = h + BitLinear_down(RMSNorm(f) * ffn_sub_norm)
//! ```
//! then `logits = head . (RMSNorm(x) * output_norm)`.
//!
//! A forward call takes a chunk of tokens (the whole prompt at once, or one token while
//! decoding) and runs every layer over all of them, so each weight row is unpacked once per
//! chunk. Every position's arithmetic is independent of how the tokens were chunked: the ternary
//! products are exact integer sums and everything else is per token, so feeding a prompt in
//! pieces gives bit-identical results.

use crate::config::{Activation, Config, RopeStyle};
use crate::tokenizer::Tokenizer;
pub use crate::weights::HeadType;
use crate::weights::{self, BitLinear, Weights};
use crate::{bail, Error, Result};
use bitnet_formats::safetensors_dir::{is_hf_dir, HfDir};
use bitnet_formats::{gguf, GgufFile};
use bitnet_kernels::aligned::AlignedI8;
use bitnet_kernels::float::{
    attention_rows, par_token_rows, rms_norm, rms_norm_in_place, AttnArgs, KvElem,
};
use bitnet_kernels::quant::quantize_row;
use bitnet_kernels::ternary::{self, padded_len};
use bitnet_kernels::{pool, Isa, SyncPtr};
use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Largest number of tokens pushed through the layers at once; longer prompts are split.
/// Bounds the scratch memory (about 16 * chunk * n_ff bytes: 6.6 MiB for 2B4T). 64 tokens
/// already make the ternary GEMM compute-bound (each weight read from memory is used 64
/// times): 128 and 256 were no faster (pp128 and pp512, one and two threads) and cost 6.7 and
/// 25 MiB more peak RSS.
pub const MAX_CHUNK: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelFormat {
    Gguf { version: u32 },
    HuggingFace,
}

/// Options for [`Model::load_with`]; the default is what [`Model::load`] does.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Compute the output head in this type: `None` or `Some(HeadType::F16)` use it as stored;
    /// `Some(HeadType::Q8_0)` requantizes an owned copy at load (see [`HeadType`]).
    pub head_type: Option<HeadType>,
    /// Copy the weights a decode step streams from the file map into anonymous memory with
    /// huge pages, and drop the file's pages (llama.cpp's `--no-mmap`; see
    /// [`Weights::copy_to_memory`]). Same resident memory, faster generation where huge pages
    /// are granted (docs/PERFORMANCE.md), at the cost of about a second of load and memory the
    /// kernel cannot drop under pressure.
    pub no_mmap: bool,
    /// Element type of the KV cache of every session (`--kv-type`; default f32).
    pub kv_type: KvType,
    /// Use TQ1_0 ternary matrices as stored, 1.69 bits per weight (`--tq1-native`), instead of
    /// repacking them to the 2-bit layout at load. Resident memory then stays at the file's size
    /// (2B4T: 80 MiB less), but matrix products decode 5 trits per byte: on an AVX2 CPU about
    /// half the speed for one token at a time and 0.6-0.8x for prompts (docs/PERFORMANCE.md).
    pub tq1_native: bool,
}

/// Element type of the KV cache (`--kv-type`). f32, the default, keeps keys and values
/// exactly: the reference logits (tests/data goldens) are met at their strictest bar. f16
/// (llama.cpp's default) halves the cache's memory (2B4T: 75 KiB instead of 150 KiB per
/// token of context, 300 MiB instead of 600 MiB at 4096) and the bytes each decoded token
/// reads from it, at the cost of rounding keys and values to 11 significant bits: the int8
/// activations that follow attention can then round the other way, so logits move by up to
/// about 0.1 on the tiny test models (within the multi-token golden bars; tested).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvType {
    F16,
    #[default]
    F32,
}

impl KvType {
    pub fn name(self) -> &'static str {
        match self {
            KvType::F16 => "f16",
            KvType::F32 => "f32",
        }
    }
}

impl std::str::FromStr for KvType {
    type Err = Error;
    fn from_str(s: &str) -> Result<KvType> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f16" => Ok(KvType::F16),
            "f32" => Ok(KvType::F32),
            _ => Err(Error::new(format!(
                "unknown KV cache type {s:?}: expected f16 or f32"
            ))),
        }
    }
}

pub struct Model {
    pub path: PathBuf,
    pub format: ModelFormat,
    pub config: Config,
    pub weights: Weights,
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// Problems found while loading that did not stop it (all-zero tensors, ...).
    pub warnings: Vec<String>,
    pub isa: Isa,
    /// Element type of the KV cache of new sessions (from [`LoadOptions::kv_type`]).
    pub kv_type: KvType,
    inv_freq: Vec<f32>,
}

impl Model {
    /// Load a GGUF file or a Hugging Face model directory; the format is detected from the
    /// content. Errors name the path.
    pub fn load(path: &Path) -> Result<Model> {
        Self::load_with(path, &LoadOptions::default())
    }

    /// [`Model::load`] with options (output head type).
    pub fn load_with(path: &Path, opts: &LoadOptions) -> Result<Model> {
        Self::load_checked(path, opts, false)
    }

    /// Load for conversion: everything as [`Model::load`] does (config, tokenizer, embedding,
    /// head and norms; the shapes, types and scale tensors of the ternary matrices are checked)
    /// except that the ternary matrices are not read: each [`BitLinear`] keeps only its
    /// [`weights::LinearSource`] (see [`BitLinear::is_lazy`]), to be decoded one at a time with
    /// [`weights::LinearSource::decode`], so that beyond the memory map the model takes almost
    /// no memory. Such a model cannot run: its ternary matrices hold no codes.
    pub fn load_lazy(path: &Path) -> Result<Model> {
        Self::load_checked(path, &LoadOptions::default(), true)
    }

    fn load_checked(path: &Path, opts: &LoadOptions, lazy: bool) -> Result<Model> {
        Self::load_inner(path, opts, lazy).map_err(|e| {
            if e.message.starts_with(&path.display().to_string()) {
                e
            } else {
                e.context(path.display())
            }
        })
    }

    fn load_inner(path: &Path, opts: &LoadOptions, lazy: bool) -> Result<Model> {
        let mut warnings = Vec::new();
        let (format, config, weights, tokenizer) = if is_hf_dir(path) {
            let d = HfDir::open(path)?;
            let config = Config::from_hf(&d)?;
            let weights = weights::load_hf_weights(&d, &config, lazy, &mut warnings)?;
            (
                ModelFormat::HuggingFace,
                config,
                weights,
                Tokenizer::from_hf_dir(path)?,
            )
        } else if path.is_file() && gguf::is_gguf(path) {
            let g = GgufFile::open(path)?;
            let config = Config::from_gguf(&g)?;
            let weights =
                weights::load_gguf_weights(&g, &config, lazy, opts.tq1_native, &mut warnings)?;
            let tokenizer = if g.get("tokenizer.ggml.tokens").is_some() {
                Some(Tokenizer::from_gguf(&g)?)
            } else {
                None
            };
            // The metadata (for 2B4T, mostly the tokenizer's 128k tokens and 280k merges: about
            // 7 MB) has been parsed: its file pages need not stay resident.
            weights::release_map_range(&g.map(), 0..g.header.data_offset as usize);
            (
                ModelFormat::Gguf {
                    version: g.version(),
                },
                config,
                weights,
                tokenizer,
            )
        } else if path.is_dir() {
            bail!("a directory without config.json is not a Hugging Face model directory");
        } else if !path.exists() {
            bail!("no such file or directory");
        } else {
            bail!("not a model: expected a GGUF file or a Hugging Face model directory");
        };
        if let Some(t) = &tokenizer {
            if t.n_vocab() > config.n_vocab {
                bail!(
                    "the tokenizer has {} tokens but the model only {} embedding rows",
                    t.n_vocab(),
                    config.n_vocab
                );
            }
        }
        let mut weights = weights;
        if let Some(t) = opts.head_type {
            weights.requantize_head(t)?;
        }
        if opts.no_mmap && !lazy {
            weights.copy_to_memory()?;
        }
        let hd = config.head_dim;
        let inv_freq = (0..hd / 2)
            .map(|i| 1.0f32 / config.rope_theta.powf((2 * i) as f32 / hd as f32))
            .collect();
        Ok(Model {
            path: path.to_path_buf(),
            format,
            config,
            weights,
            tokenizer: tokenizer.map(Arc::new),
            warnings,
            isa: Isa::detect(),
            kv_type: opts.kv_type,
            inv_freq,
        })
    }

    /// A fresh sequence with room for `n_ctx` tokens (capped at the training context).
    pub fn new_session(&self, n_ctx: usize) -> Session {
        let n_ctx = n_ctx.clamp(1, self.config.n_ctx_train);
        let kv = self.config.n_layer * n_ctx * self.config.kv_dim();
        Session {
            n_ctx,
            pos: 0,
            tokens: Vec::new(),
            kv: KvCache::new(self.kv_type, kv),
            scratch: Scratch::default(),
            logits: Vec::new(),
        }
    }

    /// Run `tokens` at the next positions of the session and return logits: one row of
    /// `n_vocab` per token when `all_logits`, else only the last token's row.
    pub fn forward<'s>(
        &self,
        s: &'s mut Session,
        tokens: &[u32],
        all_logits: bool,
    ) -> Result<&'s [f32]> {
        self.check_tokens(s, tokens)?;
        let v = self.config.n_vocab;
        let mut sc = std::mem::take(&mut s.scratch);
        let mut logits = std::mem::take(&mut s.logits);
        logits.resize(if all_logits { tokens.len() * v } else { v }, 0.0);
        for (ci, chunk) in tokens.chunks(MAX_CHUNK).enumerate() {
            let last_chunk = (ci + 1) * MAX_CHUNK >= tokens.len();
            let mut items = [BatchItem {
                session: &mut *s,
                tokens: chunk,
            }];
            if all_logits {
                let off = ci * MAX_CHUNK * v;
                self.forward_core(
                    &mut sc,
                    &mut items,
                    Want::All,
                    &mut logits[off..off + chunk.len() * v],
                );
            } else if last_chunk {
                self.forward_core(&mut sc, &mut items, Want::LastOfEach, &mut logits);
            } else {
                self.forward_core(&mut sc, &mut items, Want::None, &mut []);
            }
        }
        s.scratch = sc;
        s.logits = logits;
        Ok(&s.logits)
    }

    /// Several sequences in one pass (continuous batching): every weight row is unpacked once
    /// for all their tokens, while each sequence attends only to its own cache. Returns the
    /// logits of each item's last token, `n_vocab` per item, in order. Each sequence gets
    /// exactly the numbers it would get alone: nothing per token depends on the batch.
    pub fn forward_batch<'w>(
        &self,
        ws: &'w mut Workspace,
        items: &mut [BatchItem],
    ) -> Result<&'w [f32]> {
        for it in items.iter() {
            self.check_tokens(it.session, it.tokens)?;
        }
        let v = self.config.n_vocab;
        ws.logits.resize(items.len() * v, 0.0);
        self.forward_core(&mut ws.scratch, items, Want::LastOfEach, &mut ws.logits);
        Ok(&ws.logits)
    }

    fn check_tokens(&self, s: &Session, tokens: &[u32]) -> Result<()> {
        let v = self.config.n_vocab;
        if tokens.is_empty() {
            bail!("no tokens to run");
        }
        if self.weights.layers.first().is_some_and(|l| l.wq.is_lazy()) {
            bail!("this model was loaded for conversion only (Model::load_lazy) and cannot run");
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= v) {
            bail!("token id {bad} is outside the vocabulary (0..{v})");
        }
        if s.kv.kv_type() != self.kv_type {
            bail!(
                "this session's KV cache holds {} but the model now runs with {}: start a new session",
                s.kv.kv_type().name(),
                self.kv_type.name()
            );
        }
        if s.pos + tokens.len() > s.n_ctx {
            bail!(
                "{} tokens do not fit in the context: {} already used of {}",
                tokens.len(),
                s.pos,
                s.n_ctx
            );
        }
        Ok(())
    }

    /// The forward pass over the tokens of every item at once (see the module docs).
    fn forward_core(
        &self,
        sc: &mut Scratch,
        items: &mut [BatchItem],
        want: Want,
        logits: &mut [f32],
    ) {
        let c = &self.config;
        let (e, hd) = (c.n_embd, c.head_dim);
        let (q_dim, kv_dim) = (c.q_dim(), c.kv_dim());
        let nt: usize = items.iter().map(|it| it.tokens.len()).sum();
        sc.ensure(c, nt);

        // Which sequence and position each token of the batch belongs to.
        sc.tok_seq.clear();
        sc.tok_pos.clear();
        for (i, it) in items.iter().enumerate() {
            for j in 0..it.tokens.len() {
                sc.tok_seq.push(i);
                sc.tok_pos.push(it.session.pos + j);
            }
        }
        // Token embeddings.
        for (t, &tok) in items.iter().flat_map(|it| it.tokens.iter()).enumerate() {
            self.weights
                .embed
                .row(tok as usize, &mut sc.x[t * e..(t + 1) * e]);
        }
        // RoPE angles for these positions, shared by every layer and head.
        let half = hd / 2;
        for t in 0..nt {
            for i in 0..half {
                let angle = sc.tok_pos[t] as f32 * self.inv_freq[i];
                sc.cos[t * half + i] = angle.cos();
                sc.sin[t * half + i] = angle.sin();
            }
        }

        for (l, w) in self.weights.layers.iter().enumerate() {
            // Attention.
            let x = &sc.x;
            par_token_rows(&mut sc.xn, nt, e, |t, xn| {
                rms_norm(&x[t * e..(t + 1) * e], &w.attn_norm, c.rms_eps, xn)
            });
            sc.acts.quantize(&sc.xn, nt, e);
            self.bitlinear(&w.wq, &sc.acts, &mut sc.q);
            self.bitlinear(&w.wk, &sc.acts, &mut sc.k);
            self.bitlinear(&w.wv, &sc.acts, &mut sc.v);
            for t in 0..nt {
                let (cos, sin) = (
                    &sc.cos[t * half..(t + 1) * half],
                    &sc.sin[t * half..(t + 1) * half],
                );
                for h in 0..c.n_head {
                    rope(
                        c.rope_style,
                        &mut sc.q[t * q_dim + h * hd..][..hd],
                        cos,
                        sin,
                    );
                }
                for h in 0..c.n_head_kv {
                    rope(
                        c.rope_style,
                        &mut sc.k[t * kv_dim + h * hd..][..hd],
                        cos,
                        sin,
                    );
                }
            }
            // Append this layer's keys and values to each sequence's cache.
            let mut t0 = 0;
            for it in items.iter_mut() {
                let (s, n) = (&mut *it.session, it.tokens.len());
                let off = l * s.n_ctx * kv_dim + s.pos * kv_dim;
                let rows = t0 * kv_dim..(t0 + n) * kv_dim;
                s.kv.write(off, &sc.k[rows.clone()], &sc.v[rows]);
                t0 += n;
            }
            let (q, seq, pos, att) = (&sc.q, &sc.tok_seq, &sc.tok_pos, &mut sc.att);
            // Every session of the batch has the model's cache type (`check_tokens`).
            match self.kv_type {
                KvType::F32 => {
                    let caches = layer_caches(items, l, kv_dim, KvCache::f32);
                    attention(c, self.isa, q, &caches, seq, pos, att)
                }
                KvType::F16 => {
                    let caches = layer_caches(items, l, kv_dim, KvCache::f16);
                    attention(c, self.isa, q, &caches, seq, pos, att)
                }
            }
            if let Some(norm) = &w.attn_sub_norm {
                par_token_rows(&mut sc.att, nt, q_dim, |_, a| {
                    rms_norm_in_place(a, norm, c.rms_eps)
                });
            }
            sc.acts.quantize(&sc.att, nt, q_dim);
            self.bitlinear(&w.wo, &sc.acts, &mut sc.xn);
            sc.x[..nt * e]
                .iter_mut()
                .zip(&sc.xn)
                .for_each(|(x, o)| *x += o);

            // Feed-forward.
            let x = &sc.x;
            par_token_rows(&mut sc.xn, nt, e, |t, xn| {
                rms_norm(&x[t * e..(t + 1) * e], &w.ffn_norm, c.rms_eps, xn)
            });
            sc.acts.quantize(&sc.xn, nt, e);
            self.bitlinear(&w.w_gate, &sc.acts, &mut sc.gate);
            self.bitlinear(&w.w_up, &sc.acts, &mut sc.up);
            let (f, up) = (c.n_ff, &sc.up);
            // The gated activation, then the sub-norm, token by token.
            par_token_rows(&mut sc.gate, nt, f, |t, gate| {
                let pairs = gate.iter_mut().zip(&up[t * f..(t + 1) * f]);
                // One loop per activation: with the match inside, the compiler computed both
                // arms and selected, calling `expf` for every value of a ReLU² model too.
                match c.activation {
                    Activation::Relu2 => pairs.for_each(|(g, u)| {
                        let r = g.max(0.0);
                        *g = r * r * u
                    }),
                    Activation::Silu => pairs.for_each(|(g, u)| *g = *g / (1.0 + (-*g).exp()) * u),
                }
                if let Some(norm) = &w.ffn_sub_norm {
                    rms_norm_in_place(gate, norm, c.rms_eps);
                }
            });
            sc.acts.quantize(&sc.gate, nt, f);
            self.bitlinear(&w.w_down, &sc.acts, &mut sc.xn);
            sc.x[..nt * e]
                .iter_mut()
                .zip(&sc.xn)
                .for_each(|(x, o)| *x += o);
        }

        for it in items.iter_mut() {
            it.session.pos += it.tokens.len();
            it.session.tokens.extend_from_slice(it.tokens);
        }
        // Final norm of the tokens whose logits are wanted, then the output head.
        let rows: Vec<usize> = match want {
            Want::None => return,
            Want::All => (0..nt).collect(),
            Want::LastOfEach => {
                let mut end = 0;
                items
                    .iter()
                    .map(|it| {
                        end += it.tokens.len();
                        end - 1
                    })
                    .collect()
            }
        };
        for (r, &t) in rows.iter().enumerate() {
            rms_norm(
                &sc.x[t * e..(t + 1) * e],
                &self.weights.output_norm,
                c.rms_eps,
                &mut sc.xn[r * e..(r + 1) * e],
            );
        }
        let v = c.n_vocab;
        self.weights.head_matmul(
            self.isa,
            &sc.xn[..rows.len() * e],
            rows.len(),
            &mut logits[..rows.len() * v],
        );
    }

    /// Apply one BitLinear to `nt` rows of f32 input, quantizing them as the forward pass does
    /// (for per-op tests and tools).
    pub fn apply_bitlinear(&self, lin: &BitLinear, x: &[f32], nt: usize) -> Vec<f32> {
        let mut acts = QuantizedActs::default();
        acts.quantize(x, nt, lin.cols);
        let mut out = vec![0.0; nt * lin.rows];
        self.bitlinear(lin, &acts, &mut out);
        out
    }

    /// `out[t, r] = isum[t, r] * beta / s_t` for every token of the quantized input, where the
    /// integer sums `isum` are written to `out` itself and turned into floats in place: no
    /// separate i32 buffer (1.7 MiB of scratch at a 64-token prompt chunk of 2B4T).
    fn bitlinear(&self, lin: &BitLinear, a: &QuantizedActs, out: &mut [f32]) {
        let nt = a.n_tok;
        debug_assert_eq!(a.kp, lin.kp());
        let out = &mut out[..nt * lin.rows];
        // SAFETY: i32 and f32 have the same size and alignment and every bit pattern is valid
        // for both; `isum` is the only use of `out` until the GEMM returns.
        let isum =
            unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut i32, out.len()) };
        ternary::gemm(self.isa, lin.view(), &a.q, &a.sum, nt, isum);
        for (t, row) in out.chunks_exact_mut(lin.rows).enumerate() {
            let s = a.scale[t];
            for o in row {
                *o = o.to_bits() as i32 as f32 / s * lin.beta;
            }
        }
    }
}

/// Rotate one head's vector in place.
fn rope(style: RopeStyle, x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    match style {
        RopeStyle::Neox => {
            for i in 0..half {
                let (a, b) = (x[i], x[i + half]);
                x[i] = a * cos[i] - b * sin[i];
                x[i + half] = b * cos[i] + a * sin[i];
            }
        }
        RopeStyle::Adjacent => {
            for i in 0..half {
                let (a, b) = (x[2 * i], x[2 * i + 1]);
                x[2 * i] = a * cos[i] - b * sin[i];
                x[2 * i + 1] = b * cos[i] + a * sin[i];
            }
        }
    }
}

/// Keys and values of one layer of one sequence.
type LayerKv<'a, T> = (&'a [T], &'a [T]);

/// Layer `l`'s keys and values of every sequence of the batch, as `get` reads them.
fn layer_caches<'a, T>(
    items: &'a [BatchItem],
    l: usize,
    kv_dim: usize,
    get: fn(&'a KvCache, std::ops::Range<usize>) -> LayerKv<'a, T>,
) -> Vec<LayerKv<'a, T>> {
    items
        .iter()
        .map(|it| {
            let s = &*it.session;
            get(&s.kv, l * s.n_ctx * kv_dim..(l + 1) * s.n_ctx * kv_dim)
        })
        .collect()
}

/// Causal grouped-query attention for a batch of new tokens whose keys and values are already
/// in their sequences' caches: token t belongs to sequence `tok_seq[t]` at position
/// `tok_pos[t]` and attends to positions 0..=tok_pos[t] of that cache. Query head h reads KV
/// head h / (n_head / n_kv).
///
/// One job is a block of consecutive tokens of one sequence and the query heads of one KV head
/// (or a part of them when there would be too few jobs for the threads): its rows share every
/// key and value load ([`attention_rows`]), and a row's result does not depend on the job's
/// shape, so how tokens are batched never changes an answer.
fn attention<T: KvElem>(
    c: &Config,
    isa: Isa,
    q: &[f32],
    caches: &[(&[T], &[T])],
    tok_seq: &[usize],
    tok_pos: &[usize],
    out: &mut [f32],
) {
    /// Rows (query heads x tokens) per job at most, when the heads allow it: 32 rows of 512
    /// keys are 64 KiB of scores.
    const MAX_ROWS: usize = 32;
    let (hd, q_dim, kv_dim) = (c.head_dim, c.q_dim(), c.kv_dim());
    let group = c.n_head / c.n_head_kv;
    let scale = 1.0 / (hd as f32).sqrt();
    let nt = tok_seq.len();
    let out_ptr = SyncPtr(out.as_mut_ptr());
    thread_local! {
        /// Token blocks of one call (on the calling thread) and each worker's scratch; the
        /// pool's threads persist, so decoding allocates nothing here after the first token.
        static BLOCKS: std::cell::RefCell<Vec<(usize, usize)>> = const { std::cell::RefCell::new(Vec::new()) };
        static SCRATCH: std::cell::RefCell<AttnScratch> = std::cell::RefCell::new(AttnScratch::default());
    }
    // Query heads per job: the whole group, unless that leaves fewer than 4 jobs per thread
    // (decoding one token: one block per KV head). `nt` bounds the number of blocks.
    let mut split = 1;
    while group.is_multiple_of(split * 2) && nt * c.n_head_kv * split < 4 * pool::threads() {
        split *= 2;
    }
    let heads = group / split;
    let block_tokens = (MAX_ROWS / heads).max(1);
    BLOCKS.with(|blocks| {
        let blocks = &mut *blocks.borrow_mut();
        blocks.clear();
        let mut t0 = 0;
        while t0 < nt {
            let mut t1 = t0 + 1;
            while t1 < nt && t1 - t0 < block_tokens && tok_seq[t1] == tok_seq[t0] {
                t1 += 1;
            }
            blocks.push((t0, t1));
            t0 = t1;
        }
        let blocks = &*blocks;
        let jobs = blocks.len() * c.n_head_kv * split;
        // Later tokens attend to more keys: several ranges per thread, claimed as threads free up.
        pool::for_ranges_split(jobs, 1, 1, 4, |range| {
            SCRATCH.with(|scratch| {
                let s = &mut *scratch.borrow_mut();
                for job in range {
                    let (b, rest) = (job / (c.n_head_kv * split), job % (c.n_head_kv * split));
                    let (kvh, part) = (rest / split, rest % split);
                    let (t0, t1) = blocks[b];
                    let (kc, vc) = caches[tok_seq[t0]];
                    let h0 = kvh * group + part * heads;
                    // Rows token-major: a tile of four rows is four heads of one token.
                    s.q_off.clear();
                    s.n_keys.clear();
                    for (t, &pos) in tok_pos.iter().enumerate().take(t1).skip(t0) {
                        for h in h0..h0 + heads {
                            s.q_off.push(t * q_dim + h * hd);
                            s.n_keys.push(pos + 1);
                        }
                    }
                    let args = AttnArgs {
                        hd,
                        q,
                        q_off: &s.q_off,
                        n_keys: &s.n_keys,
                        keys: &kc[kvh * hd..],
                        values: &vc[kvh * hd..],
                        stride: kv_dim,
                        scale,
                    };
                    s.out.resize(s.q_off.len() * hd, 0.0);
                    attention_rows(isa, &args, &mut s.scores, &mut s.out);
                    for (r, &off) in s.q_off.iter().enumerate() {
                        // SAFETY: each (token, head) row of `out` belongs to exactly one job.
                        let o =
                            unsafe { std::slice::from_raw_parts_mut(out_ptr.get().add(off), hd) };
                        o.copy_from_slice(&s.out[r * hd..][..hd]);
                    }
                }
            })
        });
    });
}

/// A worker's attention scratch (see [`attention`]).
#[derive(Default)]
struct AttnScratch {
    q_off: Vec<usize>,
    n_keys: Vec<usize>,
    scores: Vec<f32>,
    out: Vec<f32>,
}

/// int8 activations of several tokens, each row padded to a multiple of 128.
#[derive(Default)]
struct QuantizedActs {
    q: AlignedI8,
    scale: Vec<f32>,
    sum: Vec<i32>,
    n_tok: usize,
    kp: usize,
}

impl QuantizedActs {
    /// Tokens split across the pool's threads when there are several.
    fn quantize(&mut self, x: &[f32], nt: usize, cols: usize) {
        let kp = padded_len(cols);
        self.q.resize(nt * kp);
        self.scale.resize(nt, 0.0);
        self.sum.resize(nt, 0);
        let (scale, sum) = (
            SyncPtr(self.scale.as_mut_ptr()),
            SyncPtr(self.sum.as_mut_ptr()),
        );
        par_token_rows(&mut self.q, nt, kp, |t, q| {
            let (s, total) = quantize_row(&x[t * cols..(t + 1) * cols], q);
            // SAFETY: token t's scale and sum are written by this call only.
            unsafe {
                *scale.get().add(t) = s;
                *sum.get().add(t) = total;
            }
        });
        self.n_tok = nt;
        self.kp = kp;
    }
}

/// Work buffers of a forward pass, grown on first use and then reused (no allocation per token).
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    acts: QuantizedActs,
    tok_seq: Vec<usize>,
    tok_pos: Vec<usize>,
}

impl Scratch {
    fn ensure(&mut self, c: &Config, nt: usize) {
        let grow = |v: &mut Vec<f32>, n: usize| {
            if v.len() < n {
                v.resize(n, 0.0)
            }
        };
        grow(&mut self.x, nt * c.n_embd);
        grow(&mut self.xn, nt * c.n_embd.max(c.q_dim()));
        grow(&mut self.q, nt * c.q_dim());
        grow(&mut self.k, nt * c.kv_dim());
        grow(&mut self.v, nt * c.kv_dim());
        grow(&mut self.att, nt * c.q_dim());
        grow(&mut self.gate, nt * c.n_ff);
        grow(&mut self.up, nt * c.n_ff);
        grow(&mut self.cos, nt * c.head_dim / 2);
        grow(&mut self.sin, nt * c.head_dim / 2);
    }
}

/// Which logits a forward pass computes.
#[derive(Clone, Copy)]
enum Want {
    None,
    LastOfEach,
    All,
}

/// One sequence's part of a batched forward pass.
pub struct BatchItem<'a> {
    pub session: &'a mut Session,
    pub tokens: &'a [u32],
}

/// Reusable buffers for [`Model::forward_batch`] (the scheduler keeps one).
#[derive(Default)]
pub struct Workspace {
    scratch: Scratch,
    logits: Vec<f32>,
}

/// One sequence: its KV cache, the tokens it has seen, and reusable buffers.
pub struct Session {
    pub n_ctx: usize,
    pos: usize,
    tokens: Vec<u32>,
    kv: KvCache,
    scratch: Scratch,
    logits: Vec<f32>,
}

/// Keys and values of every layer and position: `[layer][position][kv_dim]`. f16 is kept as
/// its bits in a `u16` vector: a zeroed vector of a primitive type is allocated lazily
/// (calloc), so an unused context costs no resident memory, which `vec![f16::ZERO; n]` would.
enum KvCache {
    F32 { k: Vec<f32>, v: Vec<f32> },
    F16 { k: Vec<u16>, v: Vec<u16> },
}

impl KvCache {
    fn new(t: KvType, n: usize) -> KvCache {
        match t {
            KvType::F32 => KvCache::F32 {
                k: vec![0.0; n],
                v: vec![0.0; n],
            },
            KvType::F16 => KvCache::F16 {
                k: vec![0; n],
                v: vec![0; n],
            },
        }
    }

    fn kv_type(&self) -> KvType {
        match self {
            KvCache::F32 { .. } => KvType::F32,
            KvCache::F16 { .. } => KvType::F16,
        }
    }

    /// Store keys and values from element `off` on.
    fn write(&mut self, off: usize, keys: &[f32], values: &[f32]) {
        let n = keys.len();
        match self {
            KvCache::F32 { k, v } => {
                k[off..off + n].copy_from_slice(keys);
                v[off..off + n].copy_from_slice(values);
            }
            KvCache::F16 { k, v } => {
                k[off..off + n]
                    .reinterpret_cast_mut::<f16>()
                    .convert_from_f32_slice(keys);
                v[off..off + n]
                    .reinterpret_cast_mut::<f16>()
                    .convert_from_f32_slice(values);
            }
        }
    }

    fn f32(&self, r: std::ops::Range<usize>) -> (&[f32], &[f32]) {
        match self {
            KvCache::F32 { k, v } => (&k[r.clone()], &v[r]),
            KvCache::F16 { .. } => unreachable!("cache type checked before the forward pass"),
        }
    }

    fn f16(&self, r: std::ops::Range<usize>) -> (&[f16], &[f16]) {
        match self {
            KvCache::F16 { k, v } => (
                k[r.clone()].reinterpret_cast::<f16>(),
                v[r].reinterpret_cast::<f16>(),
            ),
            KvCache::F32 { .. } => unreachable!("cache type checked before the forward pass"),
        }
    }
}

impl Session {
    /// Element type of this session's KV cache.
    pub fn kv_type(&self) -> KvType {
        self.kv.kv_type()
    }

    /// Number of positions used.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// The tokens in the cache, in order.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Forget everything after the first `n` positions (the cache beyond is simply
    /// overwritten later). Used to reuse a shared prefix.
    pub fn truncate(&mut self, n: usize) {
        if n < self.pos {
            self.pos = n;
            self.tokens.truncate(n);
        }
    }

    pub fn reset(&mut self) {
        self.truncate(0);
    }
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("path", &self.path)
            .field("config", &self.config)
            .finish()
    }
}
