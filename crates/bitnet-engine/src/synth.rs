//! Synthetic models for benchmarks and tests (`bitnet synth`): a GGUF file with the exact
//! shapes of a real model, random ternary weights, a random F16 embedding and a synthetic
//! byte-level BPE tokenizer, laid out as bitnet.cpp (I2_S) and llama.cpp (TQ1_0, TQ2_0) write
//! their own files, so that anyone can benchmark any engine without downloading a model.
//!
//! - Ternary codes are drawn independently, each about a third -1 / 0 / +1 (probabilities
//!   86/256, 85/256, 85/256). The per-tensor scale `beta = 1/sqrt(2/3 * in_features)` (rounded
//!   to f16 so that every format stores it exactly) keeps activations near unit size, so the
//!   forward pass of even the 30-layer shapes stays finite.
//! - Matrices whose rows do not fit the block size are stored as F16 holding `code * beta`, as
//!   the converters do (REFERENCE.md trap 8): TQ types need rows that are multiples of 256;
//!   I2_S blocks run across rows, so it needs only a multiple of 128 elements in all.
//! - The same seed gives the same codes, scales and float tensors for every `--type`, so files
//!   of different types are the same model (their logits agree exactly).
//! - The file is streamed tensor by tensor through `bitnet_formats::gguf::GgufStreamWriter`
//!   (to `FILE.partial`, renamed at the end); at most one ternary tensor or 32 MB of embedding
//!   rows is in memory at a time.
//!   Random numbers come from xoshiro256++ streams seeded per tensor row, so the output does not
//!   depend on the number of threads.

use crate::chat::BITNET_TEMPLATE;
use crate::{bail, Error, Result};
use bitnet_formats::codecs;
use bitnet_formats::gguf::{GgufStreamWriter, MetaValue};
use bitnet_formats::GgmlType;
use half::f16;
use rayon::prelude::*;
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// Random numbers

/// xoshiro256++ (Blackman and Vigna): fast, good enough for synthetic weights and test data.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng::stream(seed, 0, 0)
    }

    /// An independent stream for (seed, a, b), e.g. (seed, tensor, row).
    pub fn stream(seed: u64, a: u64, b: u64) -> Rng {
        let mut x = seed;
        let h1 = splitmix64(&mut x);
        let mut x = h1 ^ a.wrapping_mul(0xD1B5_4A32_D192_ED03);
        let h2 = splitmix64(&mut x);
        let mut x = h2 ^ b.wrapping_mul(0x8CB9_2BA7_2F3D_8DD7);
        Rng {
            s: [
                splitmix64(&mut x),
                splitmix64(&mut x),
                splitmix64(&mut x),
                splitmix64(&mut x),
            ],
        }
    }

    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in 0..n (n > 0; the tiny modulo bias does not matter here).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() >> 32) * n) >> 32
    }

    /// Uniform in [0, 1).
    pub fn unit_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }

    /// About normal with mean 0 and standard deviation `std` (sum of four 16-bit uniforms:
    /// one draw per value, bounded at 3.5 std).
    #[inline]
    pub fn normal_f32(&mut self, std: f32) -> f32 {
        let r = self.next_u64();
        let s = (r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48);
        // Mean 2 * 65535, standard deviation sqrt(4/12) * 65536.
        (s as f32 - 131070.0) * (std / (0.577_350_3 * 65536.0))
    }

    /// Ternary codes (`w + 1`, 0..=2), each about a third: byte b gives (3b) >> 8.
    pub fn fill_codes(&mut self, out: &mut [u8]) {
        for chunk in out.chunks_mut(8) {
            let r = self.next_u64().to_le_bytes();
            for (c, b) in chunk.iter_mut().zip(r) {
                *c = ((b as u16 * 3) >> 8) as u8;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Shapes and types

/// The model family a shape belongs to: decides architecture name, activation, sub-norms and
/// head tying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// BitNet b1.58 2B4T: relu², sub-norms, head tied to the embedding. Architecture
    /// `bitnet-b1.58` for I2_S (bitnet.cpp), `bitnet` for TQ1_0/TQ2_0 (llama.cpp).
    BitNet,
    /// 1bitLLM bitnet_b1_58: SiLU with sub-norms; architecture `bitnet` with
    /// `bitnet.hidden_activation = "silu"` (our tokenizer is byte-level BPE, so the
    /// SentencePiece rule of REFERENCE.md section 2 would not pick SiLU by itself). The head is
    /// tied: llama.cpp's `bitnet` graph has no `output` tensor (it multiplies by `token_embd`)
    /// and refuses a file with an extra one.
    BitNetSilu,
    /// Llama-architecture ternary models (Falcon3 1.58-bit, Llama3-8B-1.58): SiLU, no
    /// sub-norms, untied F16 `output.weight`; architecture `llama`.
    Llama,
}

/// Dimensions and hyper-parameters of a synthetic model.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub name: String,
    pub family: Family,
    pub n_embd: usize,
    pub n_ff: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    /// Explicit head dimension (Llama family); `None` = `n_embd / n_head`.
    pub head_dim: Option<usize>,
    pub n_vocab: usize,
    pub n_ctx: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
}

/// Names accepted by [`Shape::named`].
pub const SHAPE_NAMES: &[&str] = &[
    "2b4t",
    "tiny",
    "falcon3-1b",
    "falcon3-3b",
    "llama3-8b-1.58",
    "bitnet_b1_58-3b",
];

impl Shape {
    /// A named shape (see [`SHAPE_NAMES`]).
    pub fn named(name: &str) -> Result<Shape> {
        use Family::*;
        // [hidden, ffn, layers, heads, kv heads, vocab, context], head dim (0 = hidden / heads),
        // RoPE base, RMSNorm epsilon.
        let s = |family, d: [usize; 7], hd: usize, rope_theta, rms_eps| Shape {
            name: name.to_string(),
            family,
            n_embd: d[0],
            n_ff: d[1],
            n_layer: d[2],
            n_head: d[3],
            n_head_kv: d[4],
            head_dim: (hd > 0).then_some(hd),
            n_vocab: d[5],
            n_ctx: d[6],
            rope_theta,
            rms_eps,
        };
        const F3: f32 = 1000042.0; // Falcon3's RoPE base
        Ok(match name {
            "2b4t" => s(BitNet, [2560, 6912, 30, 20, 5, 128256, 4096], 0, 5e5, 1e-5),
            "tiny" => s(BitNet, [256, 688, 4, 8, 2, 1024, 4096], 0, 5e5, 1e-5),
            "falcon3-1b" => s(Llama, [2048, 8192, 18, 8, 4, 131072, 8192], 256, F3, 1e-6),
            "falcon3-3b" => s(Llama, [3072, 9216, 22, 12, 4, 131072, 32768], 256, F3, 1e-6),
            "llama3-8b-1.58" => s(
                Llama,
                [4096, 14336, 32, 32, 8, 128256, 8192],
                128,
                5e5,
                1e-5,
            ),
            "bitnet_b1_58-3b" => s(
                BitNetSilu,
                [3200, 8640, 26, 32, 32, 32002, 2048],
                0,
                1e4,
                1e-5,
            ),
            other => bail!(
                "unknown shape {other:?} (expected one of {})",
                SHAPE_NAMES.join(", ")
            ),
        })
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.n_embd / self.n_head.max(1))
    }

    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim()
    }

    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim()
    }

    pub fn sub_norms(&self) -> bool {
        self.family != Family::Llama
    }

    pub fn tied_head(&self) -> bool {
        self.family != Family::Llama
    }

    /// Total number of weights (every tensor's elements).
    pub fn n_params(&self) -> u64 {
        let (e, f, q, kv) = (
            self.n_embd as u64,
            self.n_ff as u64,
            self.q_dim() as u64,
            self.kv_dim() as u64,
        );
        let mut per_layer = 2 * e + e * q + 2 * e * kv + q * e + 3 * e * f;
        if self.sub_norms() {
            per_layer += q + f;
        }
        let heads = if self.tied_head() { 1 } else { 2 };
        self.n_layer as u64 * per_layer + heads * self.n_vocab as u64 * e + e
    }

    pub fn validate(&self) -> Result<()> {
        for (what, v) in [
            ("--hidden", self.n_embd),
            ("--ffn", self.n_ff),
            ("--layers", self.n_layer),
            ("--heads", self.n_head),
            ("--kv-heads", self.n_head_kv),
            ("--ctx", self.n_ctx),
        ] {
            if v == 0 || v > 1 << 20 {
                bail!("{what} {v} is out of range");
            }
        }
        if self.head_dim.is_none() && !self.n_embd.is_multiple_of(self.n_head) {
            bail!(
                "hidden size {} is not a multiple of the head count {}",
                self.n_embd,
                self.n_head
            );
        }
        let hd = self.head_dim();
        if hd == 0 || !hd.is_multiple_of(2) {
            bail!("head dimension {hd} must be even and non-zero");
        }
        if !self.n_head.is_multiple_of(self.n_head_kv) {
            bail!(
                "head count {} is not a multiple of the KV head count {}",
                self.n_head,
                self.n_head_kv
            );
        }
        if self.n_vocab < MIN_VOCAB || self.n_vocab > 1 << 22 {
            bail!(
                "--vocab {} is out of range ({MIN_VOCAB} to {})",
                self.n_vocab,
                1 << 22
            );
        }
        Ok(())
    }
}

/// The storage type of the ternary matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthType {
    I2S,
    Tq2_0,
    Tq1_0,
}

impl SynthType {
    pub fn parse(s: &str) -> Result<SynthType> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "i2_s" | "i2s" => SynthType::I2S,
            "tq2_0" => SynthType::Tq2_0,
            "tq1_0" => SynthType::Tq1_0,
            other => bail!("unknown type {other:?} (expected i2_s, tq2_0 or tq1_0)"),
        })
    }

    pub fn ggml(self) -> GgmlType {
        match self {
            SynthType::I2S => GgmlType::I2_S,
            SynthType::Tq2_0 => GgmlType::TQ2_0,
            SynthType::Tq1_0 => GgmlType::TQ1_0,
        }
    }

    /// `general.file_type`: bitnet.cpp's I2_S 40, llama.cpp's MOSTLY_TQ1_0 36 / MOSTLY_TQ2_0 37.
    pub fn file_type(self) -> u32 {
        match self {
            SynthType::I2S => 40,
            SynthType::Tq1_0 => 36,
            SynthType::Tq2_0 => 37,
        }
    }

    /// Can a `rows x cols` ternary matrix be stored in this type (else F16 fallback)?
    pub fn fits(self, rows: usize, cols: usize) -> bool {
        match self {
            SynthType::I2S => (rows * cols).is_multiple_of(128),
            SynthType::Tq2_0 | SynthType::Tq1_0 => cols.is_multiple_of(256),
        }
    }
}

/// The architecture string written for a family and type.
pub fn arch_name(family: Family, ty: SynthType) -> &'static str {
    match (family, ty) {
        (Family::BitNet, SynthType::I2S) => "bitnet-b1.58",
        (Family::BitNet | Family::BitNetSilu, _) => "bitnet",
        (Family::Llama, _) => "llama",
    }
}

// ---------------------------------------------------------------------------------------------
// Tokenizer

/// Smallest vocabulary: 256 byte tokens and the ten Llama 3 special tokens up to `<|eot_id|>`.
pub const MIN_VOCAB: usize = 266;

/// A synthetic byte-level BPE vocabulary in GGUF form.
#[derive(Debug, Clone)]
pub struct SynthVocab {
    pub tokens: Vec<String>,
    /// GGUF token types: 1 normal, 3 control.
    pub types: Vec<i32>,
    pub merges: Vec<String>,
    pub bos: u32,
    pub eos: u32,
    pub eot: u32,
}

/// Original text (no third-party vocabulary) from which the first merges are learned, so that
/// English text gets some multi-byte tokens.
const CORPUS: &str = "The little engine ran all night through the hills and the valleys. \
It carried bread, letters and a few tired travellers who wanted to be home before the morning. \
When the sun came up over the river, the driver stopped the train at the old station and \
everyone stepped out into the cold air. There was tea on the table and a fire in the corner. \
The children were the first to find the garden behind the house, where the apples were ripe \
and the grass was still wet. They counted the trees, they named the birds, and they promised \
to come back in the summer. In the evening the engine was ready again, and the people who had \
been strangers in the morning were now talking and laughing together like old friends. \
Numbers matter too: 1, 2, 3, 10, 20, 100, 2024 and 3.14 are written in many documents, \
and so are questions, answers, lists of things, and the names of places and of people.";

/// GPT-2's byte-to-unicode map: printable bytes stand for themselves, the others for 256 + n.
pub fn byte_to_unicode() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut n = 0u32;
    for (b, slot) in map.iter_mut().enumerate() {
        let b = b as u32;
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            b
        } else {
            n += 1;
            255 + n
        };
        *slot = char::from_u32(c).expect("valid char");
    }
    map
}

/// Name of special token k (0-based from the first special id), as in Llama 3.
fn special_name(k: usize) -> String {
    match k {
        0 => "<|begin_of_text|>".into(),
        1 => "<|end_of_text|>".into(),
        2..=5 => format!("<|reserved_special_token_{}|>", k - 2),
        6 => "<|start_header_id|>".into(),
        7 => "<|end_header_id|>".into(),
        8 => "<|reserved_special_token_4|>".into(),
        9 => "<|eot_id|>".into(),
        _ => format!("<|reserved_special_token_{}|>", k - 5),
    }
}

/// Learn up to `max` BPE merges from `text` (words with their leading space, as GPT-2
/// pre-tokenizes), most frequent pair first, ties broken by the pair's text.
fn learn_merges(text: &str, b2u: &[char; 256], max: usize) -> Vec<(String, String)> {
    // Pre-tokenize: [space]letters | digits | any other single char.
    let mut words: BTreeMap<Vec<String>, usize> = BTreeMap::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        if bytes[i] == b' ' && i + 1 < bytes.len() && bytes[i + 1].is_ascii_alphabetic() {
            i += 1;
        }
        if bytes[i].is_ascii_alphabetic() {
            while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
                i += 1;
            }
        } else if bytes[i].is_ascii_digit() {
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
        } else {
            i += 1;
        }
        let word: Vec<String> = bytes[start..i]
            .iter()
            .map(|&b| b2u[b as usize].to_string())
            .collect();
        *words.entry(word).or_default() += 1;
    }
    let mut merges = Vec::new();
    while merges.len() < max {
        let mut counts: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        for (w, &n) in &words {
            for p in w.windows(2) {
                *counts.entry((&p[0], &p[1])).or_default() += n;
            }
        }
        // Highest count; among equal counts the smallest pair (BTreeMap order, strict >).
        let mut best: Option<((&str, &str), usize)> = None;
        for (&pair, &n) in &counts {
            if best.is_none_or(|(_, b)| n > b) {
                best = Some((pair, n));
            }
        }
        let Some(((a, b), n)) = best else { break };
        if n < 2 {
            break;
        }
        let (a, b) = (a.to_string(), b.to_string());
        let joined = format!("{a}{b}");
        let mut next = BTreeMap::new();
        for (w, n) in words {
            let mut out = Vec::with_capacity(w.len());
            let mut j = 0;
            while j < w.len() {
                if j + 1 < w.len() && w[j] == a && w[j + 1] == b {
                    out.push(joined.clone());
                    j += 2;
                } else {
                    out.push(w[j].clone());
                    j += 1;
                }
            }
            *next.entry(out).or_default() += n;
        }
        words = next;
        merges.push((a, b));
    }
    merges
}

/// A byte-level BPE vocabulary of exactly `n_vocab` tokens: the 256 byte tokens (ids 0..255,
/// in byte order), merges (first learned from a built-in text, then random pairs), and at the
/// top the special tokens as in Llama 3 (`<|begin_of_text|>` = first special id,
/// `<|end_of_text|>` + 1, `<|eot_id|>` + 9, the rest `<|reserved_special_token_N|>`): 256 of
/// them for a vocabulary of 1024 or more (so a 128256 vocabulary has BOS 128000, EOS 128001
/// and EOT 128009, as Llama 3), fewer for smaller ones. It depends only on `n_vocab` (not on
/// the weights' seed), so models of one shape share their tokenizer.
pub fn synth_vocab(n_vocab: usize) -> Result<SynthVocab> {
    if n_vocab < MIN_VOCAB {
        bail!("a vocabulary needs at least {MIN_VOCAB} tokens, got {n_vocab}");
    }
    let n_special = ((n_vocab - 256) / 3).clamp(10, 256);
    let n_merges = n_vocab - 256 - n_special;
    let b2u = byte_to_unicode();
    let mut tokens: Vec<String> = b2u.iter().map(|c| c.to_string()).collect();
    let mut seen: HashSet<String> = tokens.iter().cloned().collect();
    let specials: Vec<String> = (0..n_special).map(special_name).collect();
    seen.extend(specials.iter().cloned());
    let mut merges = Vec::with_capacity(n_merges);
    for (a, b) in learn_merges(CORPUS, &b2u, n_merges) {
        let joined = format!("{a}{b}");
        if seen.insert(joined.clone()) {
            tokens.push(joined);
            merges.push(format!("{a} {b}"));
        }
    }
    // Fill with random pairs: an existing token followed by a letter, digit or short token.
    let mut rng = Rng::new(0x5EED_70C3);
    let alphabet: Vec<String> = (b'a'..=b'z')
        .chain(b'0'..=b'9')
        .map(|b| b2u[b as usize].to_string())
        .collect();
    let mut attempts = 0u64;
    while merges.len() < n_merges {
        attempts += 1;
        if attempts > 100 * n_merges as u64 + 1_000_000 {
            bail!("could not generate {n_merges} distinct merges");
        }
        let a = tokens[rng.below(tokens.len() as u64) as usize].clone();
        let b = if rng.below(4) == 0 {
            tokens[rng.below(tokens.len() as u64) as usize].clone()
        } else {
            alphabet[rng.below(alphabet.len() as u64) as usize].clone()
        };
        if a.chars().count() + b.chars().count() > 12 {
            continue;
        }
        let joined = format!("{a}{b}");
        if seen.insert(joined.clone()) {
            tokens.push(joined);
            merges.push(format!("{a} {b}"));
        }
    }
    let first_special = tokens.len();
    tokens.extend(specials);
    debug_assert_eq!(tokens.len(), n_vocab);
    let mut types = vec![1i32; first_special];
    types.resize(n_vocab, 3);
    Ok(SynthVocab {
        tokens,
        types,
        merges,
        bos: first_special as u32,
        eos: first_special as u32 + 1,
        eot: first_special as u32 + 9,
    })
}

/// Meta-Llama-3-8B-Instruct's chat template (also HF1BitLLM Llama3-8B-1.58), used for the
/// Llama-family shapes: our vocabulary has its header tokens.
pub const LLAMA3_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

// ---------------------------------------------------------------------------------------------
// The file

/// What a tensor holds, generated when it is written.
#[derive(Debug, Clone)]
enum Fill {
    /// A BitLinear weight, `rows` outputs of `cols` inputs, stored in `dtype` (the requested
    /// ternary type, or F16 holding `code * beta`).
    Ternary { rows: usize, cols: usize, beta: f32 },
    /// A float matrix (embedding, untied head): F16, about normal with std 0.1.
    Float { rows: usize, cols: usize },
    /// A norm weight: F32, uniform in [0.9, 1.1].
    Norm { len: usize },
}

#[derive(Debug, Clone)]
struct Planned {
    name: String,
    dims: Vec<u64>,
    dtype: GgmlType,
    size: u64,
    fill: Fill,
}

/// What [`write_model`] wrote.
#[derive(Debug, Clone)]
pub struct SynthReport {
    pub path: PathBuf,
    pub arch: String,
    pub n_tensors: usize,
    pub file_bytes: u64,
    pub n_params: u64,
    /// Ternary slots stored as F16 because their rows do not fit the block size.
    pub f16_fallback: Vec<String>,
}

/// Standard deviation of the F16 embedding / head.
pub const EMBED_STD: f32 = 0.1;

/// The scale of a ternary matrix with `cols` inputs: keeps outputs near unit size for
/// unit-size int8-quantized inputs; f16-representable so every format stores it exactly.
pub fn ternary_beta(cols: usize) -> f32 {
    f16::from_f32(1.0 / (cols as f32 * 2.0 / 3.0).sqrt()).to_f32()
}

fn plan(shape: &Shape, ty: SynthType) -> Result<Vec<Planned>> {
    let (e, f, q, kv, v) = (
        shape.n_embd,
        shape.n_ff,
        shape.q_dim(),
        shape.kv_dim(),
        shape.n_vocab,
    );
    let mut out = Vec::new();
    let float = |name: &str, rows: usize, cols: usize| Planned {
        name: name.to_string(),
        dims: vec![cols as u64, rows as u64],
        dtype: GgmlType::F16,
        size: (rows * cols * 2) as u64,
        fill: Fill::Float { rows, cols },
    };
    let norm = |name: String, len: usize| Planned {
        name,
        dims: vec![len as u64],
        dtype: GgmlType::F32,
        size: (len * 4) as u64,
        fill: Fill::Norm { len },
    };
    let ternary = |name: String, rows: usize, cols: usize| -> Result<Planned> {
        let dtype = if ty.fits(rows, cols) {
            ty.ggml()
        } else {
            GgmlType::F16
        };
        let size = dtype.data_size(cols as u64, (rows * cols) as u64)?;
        Ok(Planned {
            name,
            dims: vec![cols as u64, rows as u64],
            dtype,
            size,
            fill: Fill::Ternary {
                rows,
                cols,
                beta: ternary_beta(cols),
            },
        })
    };
    out.push(float("token_embd.weight", v, e));
    for i in 0..shape.n_layer {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        out.push(norm(n("attn_norm"), e));
        out.push(ternary(n("attn_q"), q, e)?);
        out.push(ternary(n("attn_k"), kv, e)?);
        out.push(ternary(n("attn_v"), kv, e)?);
        if shape.sub_norms() {
            out.push(norm(n("attn_sub_norm"), q));
        }
        out.push(ternary(n("attn_output"), e, q)?);
        out.push(norm(n("ffn_norm"), e));
        out.push(ternary(n("ffn_gate"), f, e)?);
        out.push(ternary(n("ffn_up"), f, e)?);
        if shape.sub_norms() {
            out.push(norm(n("ffn_sub_norm"), f));
        }
        out.push(ternary(n("ffn_down"), e, f)?);
    }
    out.push(norm("output_norm.weight".into(), e));
    if !shape.tied_head() {
        out.push(float("output.weight", v, e));
    }
    Ok(out)
}

fn metadata(shape: &Shape, ty: SynthType, seed: u64) -> Result<Vec<(String, MetaValue)>> {
    let arch = arch_name(shape.family, ty);
    let mut md: Vec<(String, MetaValue)> = Vec::new();
    let mut put = |k: &str, v: MetaValue| md.push((k.to_string(), v));
    let u = |x: usize| MetaValue::U32(x as u32);
    put("general.architecture", MetaValue::Str(arch.into()));
    put("general.type", MetaValue::Str("model".into()));
    put(
        "general.name",
        MetaValue::Str(format!(
            "synthetic {} (bitnet synth, seed {seed})",
            shape.name
        )),
    );
    put("general.file_type", MetaValue::U32(ty.file_type()));
    put("general.quantization_version", MetaValue::U32(2));
    let key = |k: &str| format!("{arch}.{k}");
    // llama.cpp's `bitnet` files have neither vocab_size nor rope.dimension_count.
    if arch != "bitnet" {
        put(&key("vocab_size"), u(shape.n_vocab));
    }
    put(&key("context_length"), u(shape.n_ctx));
    put(&key("embedding_length"), u(shape.n_embd));
    put(&key("block_count"), u(shape.n_layer));
    put(&key("feed_forward_length"), u(shape.n_ff));
    if arch != "bitnet" {
        put(&key("rope.dimension_count"), u(shape.head_dim()));
    }
    put(&key("attention.head_count"), u(shape.n_head));
    put(&key("attention.head_count_kv"), u(shape.n_head_kv));
    if shape.family == Family::Llama {
        put(&key("attention.key_length"), u(shape.head_dim()));
        put(&key("attention.value_length"), u(shape.head_dim()));
    }
    put(
        &key("attention.layer_norm_rms_epsilon"),
        MetaValue::F32(shape.rms_eps),
    );
    put(&key("rope.freq_base"), MetaValue::F32(shape.rope_theta));
    if arch == "bitnet" {
        put(&key("rope.scaling.type"), MetaValue::Str("linear".into()));
        put(&key("rope.scaling.factor"), MetaValue::F32(1.0));
    }
    if shape.family == Family::BitNetSilu {
        put(&key("hidden_activation"), MetaValue::Str("silu".into()));
    }

    let voc = synth_vocab(shape.n_vocab)?;
    put("tokenizer.ggml.model", MetaValue::Str("gpt2".into()));
    put("tokenizer.ggml.pre", MetaValue::Str("llama-bpe".into()));
    put(
        "tokenizer.ggml.tokens",
        MetaValue::Array(voc.tokens.into_iter().map(MetaValue::Str).collect()),
    );
    put(
        "tokenizer.ggml.token_type",
        MetaValue::Array(voc.types.into_iter().map(MetaValue::I32).collect()),
    );
    put(
        "tokenizer.ggml.merges",
        MetaValue::Array(voc.merges.into_iter().map(MetaValue::Str).collect()),
    );
    put("tokenizer.ggml.bos_token_id", MetaValue::U32(voc.bos));
    put("tokenizer.ggml.eos_token_id", MetaValue::U32(voc.eos));
    put("tokenizer.ggml.add_bos_token", MetaValue::Bool(true));
    match shape.family {
        Family::BitNet => put(
            "tokenizer.chat_template",
            MetaValue::Str(BITNET_TEMPLATE.into()),
        ),
        Family::Llama => put(
            "tokenizer.chat_template",
            MetaValue::Str(LLAMA3_TEMPLATE.into()),
        ),
        Family::BitNetSilu => {}
    }
    Ok(md)
}

/// I2_S blocks of whole 128-code groups (the fast twin of `codecs::encode_i2s` without the
/// scale): byte j of a block holds code j in bits 7-6, 32+j in 5-4, 64+j in 3-2, 96+j in 1-0.
fn pack_i2s_blocks(codes: &[u8], out: &mut [u8]) {
    for (blk, dst) in codes.chunks_exact(128).zip(out.chunks_exact_mut(32)) {
        for j in 0..32 {
            dst[j] = (blk[j] << 6) | (blk[32 + j] << 4) | (blk[64 + j] << 2) | blk[96 + j];
        }
    }
}

/// Bytes of one ternary tensor in its planned type.
fn ternary_bytes(
    t: &Planned,
    rows: usize,
    cols: usize,
    beta: f32,
    seed: u64,
    tid: u64,
) -> Result<Vec<u8>> {
    let mut codes = vec![0u8; rows * cols];
    codes
        .par_chunks_mut(cols)
        .enumerate()
        .for_each(|(r, row)| Rng::stream(seed, tid, r as u64).fill_codes(row));
    let mut out = vec![0u8; t.size as usize];
    match t.dtype {
        GgmlType::I2_S => {
            // Blocks of 128 run across rows: pack the flattened codes block by block, then the
            // scale after the codes (`pack_i2s_blocks` is checked against codecs::encode_i2s).
            let n = rows * cols;
            out[..n / 4]
                .par_chunks_mut(32 * 512)
                .zip(codes.par_chunks(128 * 512))
                .for_each(|(dst, src)| pack_i2s_blocks(src, dst));
            out[n / 4..n / 4 + 4].copy_from_slice(&beta.to_le_bytes());
        }
        GgmlType::TQ2_0 | GgmlType::TQ1_0 => {
            let row_bytes = t.size as usize / rows;
            let dtype = t.dtype;
            out.par_chunks_mut(row_bytes)
                .zip(codes.par_chunks(cols))
                .try_for_each_init(Vec::new, |buf, (dst, src)| -> Result<()> {
                    buf.clear();
                    if dtype == GgmlType::TQ2_0 {
                        codecs::encode_tq2_0_row(src, beta, buf)?;
                    } else {
                        codecs::encode_tq1_0_row(src, beta, buf)?;
                    }
                    dst.copy_from_slice(buf);
                    Ok(())
                })?;
        }
        GgmlType::F16 => {
            let vals = [
                f16::from_f32(-beta).to_le_bytes(),
                [0, 0],
                f16::from_f32(beta).to_le_bytes(),
            ];
            out.par_chunks_mut(2 * cols)
                .zip(codes.par_chunks(cols))
                .for_each(|(dst, src)| {
                    for (d, &c) in dst.chunks_exact_mut(2).zip(src) {
                        d.copy_from_slice(&vals[c as usize]);
                    }
                });
        }
        other => bail!("internal error: ternary tensor planned as {other}"),
    }
    Ok(out)
}

/// Write a synthetic model of `shape` with ternary weights in `ty` to `path` (through
/// `PATH.partial`, renamed when complete).
pub fn write_model(shape: &Shape, ty: SynthType, seed: u64, path: &Path) -> Result<SynthReport> {
    shape.validate()?;
    let tensors = plan(shape, ty)?;
    let md = metadata(shape, ty, seed)?;
    let table: Vec<(String, Vec<u64>, GgmlType)> = tensors
        .iter()
        .map(|t| (t.name.clone(), t.dims.clone(), t.dtype))
        .collect();

    let partial = PathBuf::from(format!("{}.partial", path.display()));
    let ctx = |e: Error| e.context(partial.display());
    let file = std::fs::File::create(&partial).map_err(|e| ctx(e.into()))?;
    let result = (|| -> Result<()> {
        let out = std::io::BufWriter::with_capacity(1 << 22, file);
        let mut w = GgufStreamWriter::new(out, &md, &table)?;
        for (tid, t) in tensors.iter().enumerate() {
            let tid = tid as u64;
            match t.fill {
                Fill::Ternary { rows, cols, beta } => {
                    w.write_data(&ternary_bytes(t, rows, cols, beta, seed, tid)?)?;
                }
                Fill::Float { rows, cols } => {
                    // In pieces of about 32 MB: the 2B4T embedding alone is 657 MB.
                    let rows_per_piece = ((32 << 20) / (2 * cols)).max(1);
                    let mut buf = Vec::new();
                    for r0 in (0..rows).step_by(rows_per_piece) {
                        let r1 = (r0 + rows_per_piece).min(rows);
                        buf.resize((r1 - r0) * cols * 2, 0);
                        buf.par_chunks_mut(2 * cols)
                            .enumerate()
                            .for_each(|(i, dst)| {
                                let mut rng = Rng::stream(seed, tid, (r0 + i) as u64);
                                for d in dst.chunks_exact_mut(2) {
                                    let x = rng.normal_f32(EMBED_STD);
                                    d.copy_from_slice(&f16::from_f32(x).to_le_bytes());
                                }
                            });
                        w.write_data(&buf)?;
                    }
                }
                Fill::Norm { len } => {
                    let mut rng = Rng::stream(seed, tid, 0);
                    let mut buf = Vec::with_capacity(len * 4);
                    for _ in 0..len {
                        let x = 0.9 + 0.2 * rng.unit_f32();
                        buf.extend_from_slice(&x.to_le_bytes());
                    }
                    w.write_data(&buf)?;
                }
            }
            w.end_tensor()?;
        }
        w.finish()?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(ctx(e));
    }
    std::fs::rename(&partial, path).map_err(|e| Error::from(e).context(path.display()))?;
    let file_bytes = std::fs::metadata(path)
        .map_err(|e| Error::from(e).context(path.display()))?
        .len();
    let f16_fallback = tensors
        .iter()
        .filter(|t| matches!(t.fill, Fill::Ternary { .. }) && t.dtype == GgmlType::F16)
        .map(|t| t.name.clone())
        .collect();
    Ok(SynthReport {
        path: path.to_path_buf(),
        arch: arch_name(shape.family, ty).to_string(),
        n_tensors: tensors.len(),
        file_bytes,
        n_params: shape.n_params(),
        f16_fallback,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_about_a_third_each() {
        let mut rng = Rng::new(7);
        let mut codes = vec![0u8; 300_000];
        rng.fill_codes(&mut codes);
        let mut n = [0usize; 4];
        for c in codes {
            n[c as usize] += 1;
        }
        assert_eq!(n[3], 0);
        for &k in &n[..3] {
            let frac = k as f64 / 300_000.0;
            assert!((frac - 1.0 / 3.0).abs() < 0.01, "{n:?}");
        }
    }

    #[test]
    fn fast_i2s_packing_matches_the_reference_encoder() {
        let mut codes = vec![0u8; 128 * 37];
        Rng::new(3).fill_codes(&mut codes);
        let mut fast = vec![0u8; codes.len() / 4];
        pack_i2s_blocks(&codes, &mut fast);
        let reference = codecs::encode_i2s(&codes, 0.0).unwrap();
        assert_eq!(fast[..], reference[..codes.len() / 4]);
    }

    #[test]
    fn normal_has_the_requested_spread() {
        let mut rng = Rng::new(1);
        let xs: Vec<f32> = (0..200_000).map(|_| rng.normal_f32(0.1)).collect();
        let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!(mean.abs() < 0.002, "{mean}");
        assert!((var.sqrt() - 0.1).abs() < 0.002, "{}", var.sqrt());
    }

    #[test]
    fn streams_differ_and_repeat() {
        let a: Vec<u64> = (0..4).map(|_| Rng::stream(1, 2, 3).next_u64()).collect();
        assert!(a.iter().all(|&x| x == a[0]));
        assert_ne!(
            Rng::stream(1, 2, 3).next_u64(),
            Rng::stream(1, 2, 4).next_u64()
        );
        assert_ne!(
            Rng::stream(1, 2, 3).next_u64(),
            Rng::stream(1, 3, 3).next_u64()
        );
    }

    #[test]
    fn vocab_has_llama3_specials_at_the_top() {
        let v = synth_vocab(128256).unwrap();
        assert_eq!(v.tokens.len(), 128256);
        assert_eq!(v.merges.len(), 128256 - 256 - 256);
        assert_eq!(v.bos, 128000);
        assert_eq!(v.tokens[128000], "<|begin_of_text|>");
        assert_eq!(v.tokens[128001], "<|end_of_text|>");
        assert_eq!(v.tokens[128009], "<|eot_id|>");
        assert_eq!(v.tokens[128255], "<|reserved_special_token_250|>");
        let distinct: HashSet<&String> = v.tokens.iter().collect();
        assert_eq!(distinct.len(), v.tokens.len());
        let small = synth_vocab(MIN_VOCAB).unwrap();
        assert_eq!(small.tokens[small.eot as usize], "<|eot_id|>");
        assert!(synth_vocab(MIN_VOCAB - 1).is_err());
    }

    #[test]
    fn shapes_have_the_published_sizes() {
        let s = Shape::named("2b4t").unwrap();
        assert_eq!((s.head_dim(), s.kv_dim()), (128, 640));
        // 2B4T: 2.41 B weights with the tied embedding.
        assert!((2_400_000_000..2_420_000_000).contains(&s.n_params()));
        for name in SHAPE_NAMES {
            Shape::named(name).unwrap().validate().unwrap();
        }
        let mut bad = Shape::named("tiny").unwrap();
        bad.n_head = 7;
        assert!(bad.validate().is_err());
    }
}
