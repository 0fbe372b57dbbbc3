//! `bitnet convert INPUT -o OUT.gguf --type i2_s|tq2_0|tq1_0 [--head-type f16|q8_0|q6_k]`:
//! a Hugging Face directory (packed or master weights), another GGUF file, or a Hub reference,
//! to a GGUF file that this engine, bitnet.cpp (I2_S) and llama.cpp (TQ types) all read.
//!
//! - I2_S is written exactly as bitnet.cpp lays it out: architecture `bitnet-b1.58`,
//!   `general.file_type` 40, the whole tensor as one flat run of 128-weight blocks, then the f32
//!   scale and 28 zero bytes. Matrices whose rows are not a multiple of 128 are written
//!   correctly, but bitnet.cpp misreads them (REFERENCE.md trap 7): a warning says so, and
//!   `--bitnet-cpp-compat` stores them as F16 (ternary x scale) instead.
//! - TQ2_0 / TQ1_0 as llama.cpp writes them: architecture `bitnet`, `general.file_type` 37 /
//!   36, the scale as every 256-block's f16 `d` (0 for an all-zero block); matrices whose rows
//!   are not a multiple of 256 become F16 ternary x scale (trap 8).
//! - Llama-architecture ternary models (Falcon3 1.58-bit, Llama3-8B-1.58) become architecture
//!   `llama` with the q/k rows permuted as llama.cpp's converter does (`LlamaModel.permute`),
//!   which this engine and llama.cpp run with adjacent-pair RoPE.
//! - The scale is the checkpoint's own: `weight_scale` of packed checkpoints (multiplying or
//!   dividing as its config says), mean|W| of master weights computed exactly as the C++ tools'
//!   Python converters do (so the files are bit-identical), or the scale of the input GGUF.
//! - The tokenizer (`tokenizer.ggml.*` from a GGUF, or built from `tokenizer.json`) and the
//!   chat template are carried over; bitnet.cpp's placeholder template (trap 9) never is: a
//!   BitNet model gets the 2B4T template instead.
//!
//! Memory: the input is memory-mapped and loaded lazily ([`Model::load_lazy`]): its ternary
//! matrices are decoded one at a time while the output is streamed to disk, and the map pages of
//! each tensor are given back once it is written, so beyond the map a conversion holds about one
//! tensor (its codes, one byte per weight, and its encoding; for master weights also its f32
//! values) plus small per-thread buffers.

use crate::args::{init_threads, print_warnings, resolve_model};
use anyhow::{anyhow, bail, Context, Result};
use bitnet_engine::chat::{is_placeholder_template, BITNET_TEMPLATE};
use bitnet_engine::config::{Activation, RopeStyle};
use bitnet_engine::tokenizer::Tokenizer;
use bitnet_engine::weights::{BitLinear, Bytes, FloatMatrix};
use bitnet_engine::Model;
use bitnet_formats::codecs;
use bitnet_formats::gguf::{is_gguf, GgufStreamWriter};
use bitnet_formats::safetensors_dir::{is_hf_dir, HfDir};
use bitnet_formats::{GgmlType, GgufFile, MetaValue};
use clap::{Args, ValueEnum};
use rayon::prelude::*;
use std::io::{BufWriter, IsTerminal};
use std::ops::Range;
use std::path::{Path, PathBuf};

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutType {
    /// bitnet.cpp's 2-bit type (128-weight blocks across the tensor, one f32 scale).
    #[value(name = "i2_s")]
    I2S,
    /// llama.cpp's 2-bit type (256-weight blocks with an f16 scale each).
    #[value(name = "tq2_0")]
    Tq2_0,
    /// llama.cpp's 1.6-bit type (base-3 packing, 256-weight blocks).
    #[value(name = "tq1_0")]
    Tq1_0,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadType {
    F16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q6_k")]
    Q6K,
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// A Hugging Face model directory (packed or master weights), a GGUF file, or a Hub
    /// reference OWNER/REPO[:FILE][@REVISION].
    pub input: String,
    /// The GGUF file to write.
    #[arg(short = 'o', long)]
    pub output: PathBuf,
    /// Storage type of the ternary matrices.
    #[arg(long = "type", value_name = "TYPE", value_enum, ignore_case = true)]
    pub out_type: OutType,
    /// Type of the token embedding and of an untied output head.
    #[arg(long, value_enum, ignore_case = true, default_value = "f16")]
    pub head_type: HeadType,
    /// I2_S: store matrices whose rows are not a multiple of 128 as F16 (ternary x scale),
    /// which bitnet.cpp reads correctly, instead of I2_S, which it misreads.
    #[arg(long)]
    pub bitnet_cpp_compat: bool,
    /// Compute threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
}

/// Where a tensor's bytes come from.
enum Data<'a> {
    /// A BitLinear slot of the (lazily) loaded model, decoded when it is written, in output row
    /// order (`heads`: permute the rows of a q/k matrix with this many heads for llama's
    /// adjacent-pair RoPE).
    Linear {
        lin: &'a BitLinear,
        heads: Option<usize>,
    },
    Matrix(&'a FloatMatrix),
    Vector(&'a [f32]),
}

struct Planned<'a> {
    name: String,
    /// GGUF order: innermost first.
    dims: Vec<u64>,
    ty: GgmlType,
    data: Data<'a>,
}

/// GGUF row `r` of a q/k matrix for adjacent-pair RoPE holds Hugging Face row
/// `h*hd + s*hd/2 + j` where `r = h*hd + 2j + s` (llama.cpp's `LlamaModel.permute`).
fn permuted_source_row(r: usize, heads: usize, rows: usize) -> usize {
    let hd = rows / heads;
    let (h, rem) = (r / hd, r % hd);
    h * hd + (rem % 2) * (hd / 2) + rem / 2
}

/// The codes (`w + 1`) of a BitLinear, row-major, in output row order.
fn linear_codes(lin: &BitLinear, heads: Option<usize>) -> Vec<u8> {
    let (rows, cols) = (lin.rows, lin.cols);
    let mut codes = vec![0u8; rows * cols];
    let view = lin.view();
    codes
        .par_chunks_mut(cols.max(1))
        .enumerate()
        .for_each(|(r, dst)| {
            let src = heads.map_or(r, |h| permuted_source_row(r, h, rows));
            for (c, d) in dst.iter_mut().enumerate() {
                *d = view.code(src, c);
            }
        });
    codes
}

/// Encode a BitLinear as `ty`. `master`: the float weights it was ternarized from (Hugging Face
/// order), whose signs the zeros of an F16 fallback keep, as torch's `round(w * s) / s` does
/// in the reference converters (so even those bytes match).
fn encode_linear(
    lin: &BitLinear,
    ty: GgmlType,
    scale: f32,
    heads: Option<usize>,
    master: Option<&Master>,
) -> Result<Vec<u8>> {
    let codes = linear_codes(lin, heads);
    let cols = lin.cols;
    let mut out = Vec::new();
    match ty {
        GgmlType::I2_S => out = codecs::encode_i2s(&codes, scale)?,
        GgmlType::TQ2_0 => {
            for row in codes.chunks_exact(cols) {
                codecs::encode_tq2_0_row(row, scale, &mut out)?;
            }
        }
        GgmlType::TQ1_0 => {
            for row in codes.chunks_exact(cols) {
                codecs::encode_tq1_0_row(row, scale, &mut out)?;
            }
        }
        GgmlType::F16 => {
            let mut vals = vec![0f32; cols];
            for (r, row) in codes.chunks_exact(cols).enumerate() {
                let src = heads.map_or(r, |h| permuted_source_row(r, h, lin.rows));
                for (i, (v, &c)) in vals.iter_mut().zip(row).enumerate() {
                    let negative = |m: &Master| m.value(src * cols + i).is_sign_negative();
                    *v = if c == 1 && master.is_some_and(negative) {
                        -0.0
                    } else {
                        (c as f32 - 1.0) * scale
                    };
                }
                codecs::quantize_row(GgmlType::F16, &vals, &mut out)?;
            }
        }
        other => bail!("cannot store a ternary matrix as {other}"),
    }
    Ok(out)
}

/// Write a float matrix (embedding or head) as `ty`, row by row, giving the map pages of the
/// rows written back to the kernel as it goes.
fn write_matrix<W: std::io::Write>(
    w: &mut GgufStreamWriter<W>,
    m: &FloatMatrix,
    ty: GgmlType,
) -> Result<()> {
    let row_bytes = m.data.len() / m.rows.max(1);
    if m.dtype == ty {
        const CHUNK_BYTES: usize = 16 << 20;
        for start in (0..m.data.len()).step_by(CHUNK_BYTES) {
            let end = (start + CHUNK_BYTES).min(m.data.len());
            w.write_data(&m.data[start..end])?;
            m.data.release_pages(start..end);
        }
        return Ok(w.end_tensor()?);
    }
    const CHUNK: usize = 256;
    let mut buf = Vec::new();
    let mut row = vec![0f32; m.cols];
    for start in (0..m.rows).step_by(CHUNK) {
        let end = (start + CHUNK).min(m.rows);
        buf.clear();
        for r in start..end {
            m.row(r, &mut row);
            codecs::quantize_row(ty, &row, &mut buf)?;
        }
        w.write_data(&buf)?;
        m.data.release_pages(start * row_bytes..end * row_bytes);
    }
    Ok(w.end_tensor()?)
}

/// `sum |x|` in the order of PyTorch's CPU float32 sum over a contiguous tensor (ATen's
/// `SumKernel` cascade: 8-lane vectors, 4 interleaved chains, a 4-level cascade, then the tail
/// and the lanes left to right), so that a scale computed from it is bit-identical to what the
/// Python converters of bitnet.cpp and llama.cpp (which call `weight.abs().mean()` in torch)
/// store. A plain or f64 sum differs from it in the last bit for about a third of the tensors.
// Index loops keep the accumulation order (level, chain, lane) of the reference visible.
#[allow(clippy::needless_range_loop)]
fn torch_sum_abs(x: &[f32]) -> f32 {
    const WIDTH: usize = 8;
    const ILP: usize = 4;
    const LEVELS: usize = 4;
    let n_vec = x.len() / WIDTH;
    let groups = n_vec / ILP;
    let ceil_log2 = |v: usize| {
        if v <= 1 {
            0
        } else {
            (usize::BITS - (v - 1).leading_zeros()) as usize
        }
    };
    let level_power = (ceil_log2(groups) / LEVELS).max(4);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0f32; WIDTH]; ILP]; LEVELS];
    let add_group = |acc: &mut [[f32; WIDTH]; ILP], g: usize| {
        for (chain, a) in acc.iter_mut().enumerate() {
            let v = &x[(g * ILP + chain) * WIDTH..][..WIDTH];
            for (s, e) in a.iter_mut().zip(v) {
                *s += e.abs();
            }
        }
    };
    let drain = |acc: &mut [[[f32; WIDTH]; ILP]; LEVELS], level: usize, reset: bool| {
        for chain in 0..ILP {
            for lane in 0..WIDTH {
                let v = acc[level - 1][chain][lane];
                acc[level][chain][lane] += v;
                if reset {
                    acc[level - 1][chain][lane] = 0.0;
                }
            }
        }
    };
    let mut g = 0;
    while g + level_step <= groups {
        for _ in 0..level_step {
            add_group(&mut acc[0], g);
            g += 1;
        }
        for level in 1..LEVELS {
            drain(&mut acc, level, true);
            if g & (level_mask << (level * level_power)) != 0 {
                break;
            }
        }
    }
    while g < groups {
        add_group(&mut acc[0], g);
        g += 1;
    }
    for level in 1..LEVELS {
        drain(&mut acc, level, false);
    }
    let mut p = acc[LEVELS - 1];
    for v in groups * ILP..n_vec {
        for lane in 0..WIDTH {
            p[0][lane] += x[v * WIDTH + lane].abs();
        }
    }
    for chain in 1..ILP {
        for lane in 0..WIDTH {
            let v = p[chain][lane];
            p[0][lane] += v;
        }
    }
    let mut sum = 0f32;
    for v in &x[n_vec * WIDTH..] {
        sum += v.abs();
    }
    for v in p[0] {
        sum += v;
    }
    sum
}

/// A master-weight (float) tensor of a Hugging Face checkpoint, read in place from the
/// checkpoint's memory map.
struct Master {
    data: Bytes,
    dtype: safetensors::Dtype,
    len: usize,
}

impl Master {
    /// The tensor `name` when it holds floats; None for packed tensors.
    fn get(hf: &HfDir, name: &str) -> Option<Master> {
        let t = hf.tensor(name)?;
        if !matches!(
            t.dtype,
            safetensors::Dtype::BF16 | safetensors::Dtype::F16 | safetensors::Dtype::F32
        ) {
            return None;
        }
        let (map, range) = hf.tensor_map(t);
        Some(Master {
            data: Bytes::Mapped(map, range),
            dtype: t.dtype,
            len: t.n_elements(),
        })
    }

    /// Element `i` as f32 (as `HfDir::read_f32` converts it).
    fn value(&self, i: usize) -> f32 {
        match self.dtype {
            safetensors::Dtype::BF16 => codecs::bf16_at(&self.data, i),
            safetensors::Dtype::F16 => codecs::f16_at(&self.data, i),
            _ => codecs::f32_at(&self.data, i),
        }
    }

    /// The scale as the reference converters compute it: `s = 1 / max(mean|W|, 1e-5)`, weights
    /// `round(W * s) / s`, so the stored scale is `1 / s` (all in f32, the mean in torch's
    /// summation order). Converts one of torch's chunks to f32 at a time.
    fn scale(&self) -> f32 {
        let sum = torch_parallel_sum_abs(self.len, |r| r.map(|i| self.value(i)).collect());
        let mean = (sum / self.len.max(1) as f32).max(1e-5);
        1.0 / (1.0 / mean)
    }

    /// Give the tensor's map pages back to the kernel.
    fn release_pages(&self) {
        self.data.release_pages(0..self.data.len());
    }
}

/// Intra-op threads of the torch run that made the reference files (`tests/data/tiny/gguf`,
/// made on a 2-core machine). Torch splits a sum of at least 32768 elements into one contiguous
/// chunk per thread and adds the chunk sums, so the thread count changes the last bit of the
/// mean (the C++ tools' own output varies the same way between machines); 2 makes this
/// converter reproduce those files bit for bit.
const TORCH_THREADS: usize = 2;

/// [`torch_sum_abs`] of `n` values as torch's `parallel_reduce` runs it: `min(threads, ceil(n /
/// 32768))` contiguous chunks of `ceil(n / chunks)` elements, summed separately, then added in
/// order. `read` gives the values of one chunk (so only one chunk is in memory at a time).
fn torch_parallel_sum_abs(n: usize, read: impl Fn(Range<usize>) -> Vec<f32>) -> f32 {
    const GRAIN: usize = 32768;
    let tasks = TORCH_THREADS.min(n.div_ceil(GRAIN));
    if n < GRAIN || tasks <= 1 {
        return torch_sum_abs(&read(0..n));
    }
    let chunk = n.div_ceil(tasks);
    (0..n).step_by(chunk).fold(0f32, |acc, s| {
        acc + torch_sum_abs(&read(s..(s + chunk).min(n)))
    })
}

fn meta_str(k: &str, v: &str) -> (String, MetaValue) {
    (k.to_string(), MetaValue::Str(v.to_string()))
}

fn meta_u32(k: &str, v: usize) -> (String, MetaValue) {
    (k.to_string(), MetaValue::U32(v as u32))
}

fn meta_f32(k: &str, v: f32) -> (String, MetaValue) {
    (k.to_string(), MetaValue::F32(v))
}

/// A model name for `general.name`: the repository name for a Hub cache snapshot, else the
/// file or directory name.
fn model_name(path: &Path) -> String {
    let parts: Vec<String> = path
        .components()
        .map(|c| c.as_os_str().to_string_lossy().to_string())
        .collect();
    if let Some(i) = parts.iter().rposition(|p| p == "snapshots") {
        if let Some(repo) = i
            .checked_sub(1)
            .and_then(|j| parts[j].strip_prefix("models--"))
        {
            if let Some((_, name)) = repo.split_once("--") {
                return name.to_string();
            }
        }
    }
    let p = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    };
    p.map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "model".into())
}

/// GGUF `token_type` values.
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;

/// `tokenizer.ggml.*` built from a Hugging Face `tokenizer.json` (byte-level BPE only), as
/// llama.cpp's converter does: tokens by id (holes padded with `[PAD<id>]`), token types
/// (special added tokens are control tokens, other added tokens user-defined), merges as
/// `"a b"`, BOS/EOS/padding ids and whether to add BOS.
fn tokenizer_from_json(
    dir: &Path,
    tok: &Tokenizer,
    n_vocab: usize,
    notes: &mut Vec<String>,
) -> Result<Vec<(String, MetaValue)>> {
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).with_context(|| path.display().to_string())?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let model = &v["model"];
    if model["type"].as_str() != Some("BPE") {
        bail!(
            "{}: only byte-level BPE tokenizers can be carried over (this one is {})",
            path.display(),
            model["type"]
        );
    }
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| anyhow!("{}: no model.vocab", path.display()))?;
    let mut by_id: Vec<Option<String>> = Vec::new();
    let mut types: Vec<i32> = Vec::new();
    let mut put = |id: usize, text: &str, ty: i32| {
        if id >= by_id.len() {
            by_id.resize(id + 1, None);
            types.resize(id + 1, TOKEN_UNUSED);
        }
        by_id[id] = Some(text.to_string());
        types[id] = ty;
    };
    for (t, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| anyhow!("{}: bad id for token {t:?}", path.display()))?;
        put(id as usize, t, TOKEN_NORMAL);
    }
    if let Some(added) = v["added_tokens"].as_array() {
        for a in added {
            let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else {
                continue;
            };
            let special = a["special"].as_bool().unwrap_or(false);
            put(
                id as usize,
                content,
                if special {
                    TOKEN_CONTROL
                } else {
                    TOKEN_USER_DEFINED
                },
            );
        }
    }
    let n = by_id.len().max(n_vocab);
    let mut tokens = Vec::with_capacity(n);
    let mut token_types = Vec::with_capacity(n);
    for i in 0..n {
        match by_id.get(i).cloned().flatten() {
            Some(t) => {
                tokens.push(MetaValue::Str(t));
                token_types.push(MetaValue::I32(
                    types.get(i).copied().unwrap_or(TOKEN_NORMAL),
                ));
            }
            None => {
                tokens.push(MetaValue::Str(format!("[PAD{i}]")));
                token_types.push(MetaValue::I32(TOKEN_UNUSED));
            }
        }
    }
    let merges: Vec<MetaValue> = model["merges"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|x| match x {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Array(p) if p.len() == 2 => {
                        Some(format!("{} {}", p[0].as_str()?, p[1].as_str()?))
                    }
                    _ => None,
                })
                .map(MetaValue::Str)
                .collect()
        })
        .unwrap_or_default();
    let mut out = vec![meta_str("tokenizer.ggml.model", "gpt2")];
    // llama.cpp names pre-tokenizers by hash; ours and its Llama 3 one share this regex.
    if v["pre_tokenizer"].to_string().contains("p{N}{1,3}") {
        out.push(meta_str("tokenizer.ggml.pre", "llama-bpe"));
    } else {
        notes.push("the tokenizer's pre-tokenizer is not Llama 3's: tokenizer.ggml.pre is left out, so other engines may split text differently".into());
    }
    out.push(("tokenizer.ggml.tokens".into(), MetaValue::Array(tokens)));
    out.push((
        "tokenizer.ggml.token_type".into(),
        MetaValue::Array(token_types),
    ));
    out.push(("tokenizer.ggml.merges".into(), MetaValue::Array(merges)));
    if let Some(b) = tok.bos_id() {
        out.push(meta_u32("tokenizer.ggml.bos_token_id", b as usize));
    }
    if let Some(e) = tok.eos_id() {
        out.push(meta_u32("tokenizer.ggml.eos_token_id", e as usize));
    }
    let cfg_path = dir.join("tokenizer_config.json");
    if let Ok(cfg) = std::fs::read_to_string(&cfg_path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .ok_or(())
    {
        let pad = match &cfg["pad_token"] {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o
                .get("content")
                .and_then(|c| c.as_str())
                .map(str::to_string),
            _ => None,
        };
        if let Some(id) = pad.and_then(|p| tok.token_id(&p)) {
            out.push(meta_u32("tokenizer.ggml.padding_token_id", id as usize));
        }
    }
    out.push((
        "tokenizer.ggml.add_bos_token".into(),
        MetaValue::Bool(tok.add_bos()),
    ));
    out.push((
        "tokenizer.ggml.add_eos_token".into(),
        MetaValue::Bool(false),
    ));
    Ok(out)
}

/// The input, loaded lazily: its ternary matrices are decoded one at a time as they are written.
fn load_input(input: &Path) -> Result<Model> {
    Ok(Model::load_lazy(input)?)
}

pub fn run(a: ConvertArgs) -> Result<()> {
    init_threads(a.threads)?;
    let input = resolve_model(&a.input)?;
    if a.output.exists()
        && std::fs::canonicalize(&a.output).ok() == std::fs::canonicalize(&input).ok()
    {
        bail!(
            "{}: the output would overwrite the input",
            a.output.display()
        );
    }
    let model = load_input(&input)?;
    print_warnings(&model.warnings);
    let (hf, gguf) = if is_hf_dir(&input) {
        (Some(HfDir::open(&input)?), None)
    } else if is_gguf(&input) {
        (None, Some(GgufFile::open(&input)?))
    } else {
        bail!(
            "{}: not a GGUF file or a Hugging Face model directory",
            input.display()
        );
    };
    let c = &model.config;
    let llama = c.arch == "llama";
    let (arch, file_type) = match (llama, a.out_type) {
        (true, OutType::I2S) => ("llama", 40),
        (false, OutType::I2S) => ("bitnet-b1.58", 40),
        (true, OutType::Tq2_0) => ("llama", 37),
        (false, OutType::Tq2_0) => ("bitnet", 37),
        (true, OutType::Tq1_0) => ("llama", 36),
        (false, OutType::Tq1_0) => ("bitnet", 36),
    };
    if llama && c.sub_norms {
        bail!("a Llama-architecture model with BitNet sub-norms cannot be written as `llama`");
    }
    if !llama && !c.sub_norms {
        bail!(
            "architecture {} without sub-norms is not supported by `bitnet convert`",
            c.arch
        );
    }
    // Llama GGUFs use adjacent-pair RoPE: permute q/k rows that are in Hugging Face order.
    let permute = llama && c.rope_style == RopeStyle::Neox;
    let tern_type = match a.out_type {
        OutType::I2S => GgmlType::I2_S,
        OutType::Tq2_0 => GgmlType::TQ2_0,
        OutType::Tq1_0 => GgmlType::TQ1_0,
    };
    let head_type = match a.head_type {
        HeadType::F16 => GgmlType::F16,
        HeadType::Q8_0 => GgmlType::Q8_0,
        HeadType::Q6K => GgmlType::Q6_K,
    };
    let mut notes: Vec<String> = Vec::new();

    // ---- the tensor plan
    let mut plan: Vec<Planned> = Vec::new();
    let mut misread_by_bitnet_cpp: Vec<(String, usize)> = Vec::new();
    let mut f16_fallback: Vec<(String, usize, &str)> = Vec::new();
    let embd_type = |cols: usize, name: &str, notes: &mut Vec<String>| {
        let (bs, _) = head_type.block();
        if !(cols as u64).is_multiple_of(bs) {
            notes.push(format!(
                "{name}: rows of {cols} are not whole {head_type} blocks, stored as F16"
            ));
            GgmlType::F16
        } else {
            head_type
        }
    };
    let w = &model.weights;
    plan.push(Planned {
        name: "token_embd.weight".into(),
        dims: vec![w.embed.cols as u64, w.embed.rows as u64],
        ty: embd_type(w.embed.cols, "token_embd.weight", &mut notes),
        data: Data::Matrix(&w.embed),
    });
    plan.push(Planned {
        name: "output_norm.weight".into(),
        dims: vec![w.output_norm.len() as u64],
        ty: GgmlType::F32,
        data: Data::Vector(&w.output_norm),
    });
    if let Some(head) = &w.head {
        plan.push(Planned {
            name: "output.weight".into(),
            dims: vec![head.cols as u64, head.rows as u64],
            ty: embd_type(head.cols, "output.weight", &mut notes),
            data: Data::Matrix(head),
        });
        if a.out_type == OutType::I2S && !llama {
            notes.push("the model has an untied output head (output.weight), which bitnet.cpp ignores for bitnet-b1.58 (it uses the embedding instead); this engine and llama.cpp use it".into());
        }
    }
    for (i, l) in w.layers.iter().enumerate() {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        plan.push(Planned {
            name: n("attn_norm"),
            dims: vec![l.attn_norm.len() as u64],
            ty: GgmlType::F32,
            data: Data::Vector(&l.attn_norm),
        });
        let linears: [(&str, &BitLinear, Option<usize>); 7] = [
            ("attn_q", &l.wq, permute.then_some(c.n_head)),
            ("attn_k", &l.wk, permute.then_some(c.n_head_kv)),
            ("attn_v", &l.wv, None),
            ("attn_output", &l.wo, None),
            ("ffn_gate", &l.w_gate, None),
            ("ffn_up", &l.w_up, None),
            ("ffn_down", &l.w_down, None),
        ];
        for (slot, lin, heads) in linears {
            let name = n(slot);
            let (rows, cols) = (lin.rows, lin.cols);
            let ty = match tern_type {
                GgmlType::I2_S if !(rows * cols).is_multiple_of(128) => {
                    f16_fallback.push((
                        name.clone(),
                        cols,
                        "I2_S needs a multiple of 128 weights in all",
                    ));
                    GgmlType::F16
                }
                GgmlType::I2_S if !cols.is_multiple_of(128) => {
                    if a.bitnet_cpp_compat {
                        f16_fallback.push((name.clone(), cols, "--bitnet-cpp-compat"));
                        GgmlType::F16
                    } else {
                        misread_by_bitnet_cpp.push((name.clone(), cols));
                        GgmlType::I2_S
                    }
                }
                GgmlType::TQ2_0 | GgmlType::TQ1_0 if !cols.is_multiple_of(256) => {
                    f16_fallback.push((
                        name.clone(),
                        cols,
                        "TQ types need rows of whole 256-weight blocks",
                    ));
                    GgmlType::F16
                }
                t => t,
            };
            plan.push(Planned {
                name,
                dims: vec![cols as u64, rows as u64],
                ty,
                data: Data::Linear { lin, heads },
            });
        }
        if let Some(v) = &l.attn_sub_norm {
            plan.push(Planned {
                name: n("attn_sub_norm"),
                dims: vec![v.len() as u64],
                ty: GgmlType::F32,
                data: Data::Vector(v),
            });
        }
        plan.push(Planned {
            name: n("ffn_norm"),
            dims: vec![l.ffn_norm.len() as u64],
            ty: GgmlType::F32,
            data: Data::Vector(&l.ffn_norm),
        });
        if let Some(v) = &l.ffn_sub_norm {
            plan.push(Planned {
                name: n("ffn_sub_norm"),
                dims: vec![v.len() as u64],
                ty: GgmlType::F32,
                data: Data::Vector(v),
            });
        }
    }
    if !misread_by_bitnet_cpp.is_empty() {
        let (ex, cols) = &misread_by_bitnet_cpp[0];
        eprintln!(
            "warning: {} I2_S matrices (e.g. {ex}, rows of {cols}) have rows that are not a multiple of 128: they are written correctly (the 128-weight blocks run across rows), but bitnet.cpp misreads them; use --bitnet-cpp-compat to store them as F16 for bitnet.cpp",
            misread_by_bitnet_cpp.len()
        );
    }
    if !f16_fallback.is_empty() {
        let (ex, cols, why) = &f16_fallback[0];
        notes.push(format!(
            "{} matrices (e.g. {ex}, rows of {cols}) are stored as F16 ternary x scale ({why})",
            f16_fallback.len()
        ));
    }

    // ---- metadata
    let key = |k: &str| format!("{arch}.{k}");
    let name = gguf
        .as_ref()
        .and_then(|g| g.get_str("general.name").ok().flatten().map(str::to_string))
        .unwrap_or_else(|| model_name(&input));
    let mut meta = vec![
        meta_str("general.architecture", arch),
        meta_str("general.name", &name),
        meta_u32("general.file_type", file_type),
        meta_u32("general.quantization_version", 2),
    ];
    if arch != "bitnet" {
        meta.push(meta_u32(&key("vocab_size"), c.n_vocab));
    }
    meta.push(meta_u32(&key("context_length"), c.n_ctx_train));
    meta.push(meta_u32(&key("embedding_length"), c.n_embd));
    meta.push(meta_u32(&key("block_count"), c.n_layer));
    meta.push(meta_u32(&key("feed_forward_length"), c.n_ff));
    meta.push(meta_u32(&key("attention.head_count"), c.n_head));
    meta.push(meta_u32(&key("attention.head_count_kv"), c.n_head_kv));
    if c.head_dim * c.n_head != c.n_embd {
        meta.push(meta_u32(&key("attention.key_length"), c.head_dim));
        meta.push(meta_u32(&key("attention.value_length"), c.head_dim));
    }
    if arch != "bitnet" {
        meta.push(meta_u32(&key("rope.dimension_count"), c.head_dim));
    }
    meta.push(meta_f32(&key("rope.freq_base"), c.rope_theta));
    meta.push(meta_f32(
        &key("attention.layer_norm_rms_epsilon"),
        c.rms_eps,
    ));
    if arch == "bitnet" {
        // As llama.cpp's converter writes them (a no-op scaling).
        meta.push(meta_str(&key("rope.scaling.type"), "linear"));
        meta.push(meta_f32(&key("rope.scaling.factor"), 1.0));
    }

    // Tokenizer and chat template.
    let mut tok_meta: Vec<(String, MetaValue)> = Vec::new();
    let mut template: Option<String> = None;
    if let Some(g) = &gguf {
        for (k, v) in g.metadata() {
            if k.starts_with("tokenizer.") && !k.starts_with("tokenizer.chat_template") {
                tok_meta.push((k.clone(), v.clone()));
            }
        }
        template = g
            .get_str("tokenizer.chat_template")
            .ok()
            .flatten()
            .map(str::to_string);
    } else if let Some(tok) = &model.tokenizer {
        match tokenizer_from_json(&input, tok, c.n_vocab, &mut notes) {
            Ok(m) => tok_meta = m,
            Err(e) => notes.push(format!("the tokenizer is not carried over: {e:#}")),
        }
        template = tok.chat_template().map(str::to_string);
    }
    if tok_meta.is_empty() {
        eprintln!("warning: {} has no tokenizer, so the output has none either: it can run token ids (`bitnet logits`) but not text", input.display());
    }
    let tok_model = tok_meta
        .iter()
        .find(|(k, _)| k == "tokenizer.ggml.model")
        .and_then(|(_, v)| v.as_str().map(str::to_string));
    // The activation the output architecture implies; write it when the model differs.
    let implied = match arch {
        "llama" => Activation::Silu,
        "bitnet" if tok_model.as_deref() == Some("llama") => Activation::Silu,
        _ => Activation::Relu2,
    };
    if c.activation != implied {
        meta.push(meta_str(&key("hidden_activation"), c.activation.name()));
    }
    meta.extend(tok_meta);
    match template {
        Some(t) if !is_placeholder_template(&t) => {
            meta.push(meta_str("tokenizer.chat_template", &t));
        }
        other => {
            if !llama {
                if other.is_some() {
                    notes.push("the input's chat template is bitnet.cpp's placeholder (Human: ... BITNETAssistant:): replaced by the BitNet b1.58 2B4T template".into());
                }
                meta.push(meta_str("tokenizer.chat_template", BITNET_TEMPLATE));
            } else if other.is_some() {
                notes
                    .push("the input's chat template is bitnet.cpp's placeholder: left out".into());
            }
        }
    }

    // The input's parsed metadata (its tokenizer, tens of MB for a 128k vocabulary) is in `meta`
    // now: no need to keep a second copy while writing.
    drop(gguf);

    // ---- write, to a temporary file renamed at the end
    let out_dir = a
        .output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = out_dir.join(format!(
        ".{}.partial-{}",
        a.output
            .file_name()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_else(|| "out.gguf".into()),
        std::process::id()
    ));
    let result = write_file(&tmp, &meta, &plan, hf.as_ref(), &input);
    drop(meta);
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        let disk_full = e
            .downcast_ref::<std::io::Error>()
            .is_some_and(bitnet_hub::is_disk_full)
            || format!("{e:#}").contains("No space left");
        if disk_full {
            bail!(
                "disk full while writing {}: free some space and run the command again",
                a.output.display()
            );
        }
        return Err(e.context(format!("writing {}", a.output.display())));
    }
    std::fs::rename(&tmp, &a.output).with_context(|| a.output.display().to_string())?;

    // ---- check what was written: it parses, and its tokenizer encodes like the input's
    let g = GgufFile::open(&a.output)?;
    let cfg = bitnet_engine::Config::from_gguf(&g).map_err(|e| e.context(a.output.display()))?;
    if (
        cfg.n_embd,
        cfg.n_layer,
        cfg.n_head,
        cfg.n_head_kv,
        cfg.n_vocab,
        cfg.activation,
    ) != (
        c.n_embd,
        c.n_layer,
        c.n_head,
        c.n_head_kv,
        c.n_vocab,
        c.activation,
    ) {
        bail!("{}: the written hyper-parameters do not read back as the input's (a bug: please report it)", a.output.display());
    }
    if let Some(src_tok) = &model.tokenizer {
        if g.get("tokenizer.ggml.tokens").is_some() {
            let t = Tokenizer::from_gguf(&g)?;
            let sample = "Hello world! It's 2025: 12345 tokens, naïve café 😀\n  <|eot_id|>";
            if t.encode(sample, true)? != src_tok.encode(sample, true)? {
                notes.push("the written tokenizer splits a sample text differently from the input's: check the output with `bitnet tokenize`".into());
            }
        }
    }
    for n in &notes {
        eprintln!("note: {n}");
    }
    let mut counts: Vec<(GgmlType, usize)> = Vec::new();
    for t in &plan {
        match counts.iter_mut().find(|(ty, _)| *ty == t.ty) {
            Some((_, n)) => *n += 1,
            None => counts.push((t.ty, 1)),
        }
    }
    let size = std::fs::metadata(&a.output).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "wrote {} ({}, {} {arch}, {} tensors: {})",
        a.output.display(),
        bitnet_hub::client::human_bytes(size),
        match a.out_type {
            OutType::I2S => "I2_S",
            OutType::Tq2_0 => "TQ2_0",
            OutType::Tq1_0 => "TQ1_0",
        },
        plan.len(),
        counts
            .iter()
            .map(|(t, n)| format!("{t} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

fn write_file(
    path: &Path,
    meta: &[(String, MetaValue)],
    plan: &[Planned],
    hf: Option<&HfDir>,
    input: &Path,
) -> Result<()> {
    let file = std::fs::File::create(path).with_context(|| path.display().to_string())?;
    let table: Vec<(String, Vec<u64>, GgmlType)> = plan
        .iter()
        .map(|t| (t.name.clone(), t.dims.clone(), t.ty))
        .collect();
    let mut w = GgufStreamWriter::new(BufWriter::with_capacity(1 << 20, file), meta, &table)?;
    let pb = if std::io::stderr().is_terminal() {
        let pb = indicatif::ProgressBar::new(plan.len() as u64);
        if let Ok(s) =
            indicatif::ProgressStyle::with_template("converting [{bar:30}] {pos}/{len} {msg}")
        {
            pb.set_style(s.progress_chars("=> "));
        }
        pb
    } else {
        indicatif::ProgressBar::hidden()
    };
    for t in plan {
        pb.set_message(t.name.clone());
        match &t.data {
            Data::Linear { lin: held, heads } => {
                let held: &BitLinear = held;
                // Master weights: the scale (and the signs of an F16 fallback's zeros) come from
                // the float values, read from the map.
                let master = hf.and_then(|d| Master::get(d, &held.name));
                let master_scale = master.as_ref().map(Master::scale);
                // One matrix decoded at a time (the lazy load holds no codes).
                let mut warnings = Vec::new();
                let decoded;
                let lin = match &held.source {
                    Some(src) => {
                        decoded = src
                            .decode(&mut warnings)
                            .map_err(|e| anyhow!("{}: {e}", input.display()))?;
                        &decoded
                    }
                    None => held,
                };
                if !warnings.is_empty() {
                    pb.suspend(|| print_warnings(&warnings));
                }
                let scale = master_scale.unwrap_or(lin.beta);
                if !scale.is_finite() {
                    bail!(
                        "tensor {:?}: scale {scale} is not a finite number",
                        lin.name
                    );
                }
                let bytes = encode_linear(lin, t.ty, scale, *heads, master.as_ref())
                    .with_context(|| format!("tensor {}", t.name))?;
                w.write_tensor(&bytes)?;
                // Done with this tensor: its codes are dropped here, its map pages given back.
                if let Some(src) = &held.source {
                    src.release_pages();
                }
                if let Some(m) = &master {
                    m.release_pages();
                }
            }
            Data::Matrix(m) => write_matrix(&mut w, m, t.ty)?,
            Data::Vector(v) => {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                w.write_tensor(&bytes)?;
            }
        }
        pb.inc(1);
    }
    pb.finish_and_clear();
    let out = w.finish()?;
    let file = out
        .into_inner()
        .map_err(|e| anyhow!("{}: {}", path.display(), e.error()))?;
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q_k_permutation_is_llama_cpps() {
        // Two heads of dim 4: GGUF row h*4 + 2j + s = HF row h*4 + s*2 + j.
        let got: Vec<usize> = (0..8).map(|r| permuted_source_row(r, 2, 8)).collect();
        assert_eq!(got, vec![0, 2, 1, 3, 4, 6, 5, 7]);
    }

    /// Converting holds the input's ternary matrices as sources only (each is decoded while it
    /// is written, then dropped), never all of them decoded at once.
    #[test]
    fn the_input_is_loaded_without_its_ternary_codes() {
        let data = |rel: &str| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/data")
                .join(rel)
        };
        for rel in [
            "tiny/checkpoint_master_bf16",
            "tiny/checkpoint_packed",
            "tiny/gguf/tiny-tq2_0.gguf",
            "falcon-tiny/checkpoint_packed",
        ] {
            let m = load_input(&data(rel)).unwrap();
            assert_eq!(m.weights.ternary_bytes_held(), 0, "{rel}");
            assert!(m.weights.linears().all(BitLinear::is_lazy), "{rel}");
        }
    }

    #[test]
    fn model_names() {
        assert_eq!(
            model_name(Path::new(
                "/c/hub/models--microsoft--bitnet-b1.58-2B-4T/snapshots/abc"
            )),
            "bitnet-b1.58-2B-4T"
        );
        assert_eq!(
            model_name(Path::new("/x/ggml-model-i2_s.gguf")),
            "ggml-model-i2_s"
        );
    }
}
