//! Weights in their runtime form, and how each file format is turned into it.
//!
//! - Ternary (BitLinear) matrices become [`BitLinear`]: 2-bit codes in the kernels' row layout
//!   (see `bitnet_kernels::ternary`) and one f32 output scale `beta`. I2_S files whose rows are
//!   whole 128-blocks (2B4T) are used straight from the memory map; everything else is repacked
//!   once at load. No f32 copy of a ternary matrix is ever made.
//! - Embedding and output head stay in their stored float/quantized type ([`FloatMatrix`]);
//!   the head can also be requantized at load to 8-bit blocks ([`HeadType`], an owned copy).
//! - Norm weights are small and become `Vec<f32>`.

use crate::config::Config;
use crate::{bail, Error, Result};
use bitnet_formats::codecs::{self, ternary_row};
use bitnet_formats::safetensors_dir::{HfDir, HfTensor};
use bitnet_formats::{GgmlType, GgufFile, TensorInfo};
use bitnet_kernels::float::{dot_f32, matmul_f16, par_rows};
use bitnet_kernels::q8::Q8Matrix;
use bitnet_kernels::ternary::{self, padded_len, TernaryView};
use bitnet_kernels::Isa;
use memmap2::Mmap;
use rayon::prelude::*;
use std::ops::{Deref, Range};
use std::sync::Arc;

/// Bytes that are either owned or a range of a shared memory map.
pub enum Bytes {
    Owned(Vec<u8>),
    Mapped(Arc<Mmap>, Range<usize>),
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Owned(v) => v,
            Bytes::Mapped(m, r) => &m[r.clone()],
        }
    }
}

impl Bytes {
    pub fn is_mapped(&self) -> bool {
        matches!(self, Bytes::Mapped(..))
    }
}

/// A BitLinear weight: `y = (sum_k q_k * W[r, k]) * beta / s` for int8 activations q with
/// scale s.
pub struct BitLinear {
    /// Tensor name in the file, for messages.
    pub name: String,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    pub data: Bytes,
    pub beta: f32,
    /// How it was stored ("I2_S", "TQ2_0", "F16 ternary", "packed uint8", "BF16 absmean", ...).
    pub stored_as: String,
}

impl BitLinear {
    pub fn kp(&self) -> usize {
        padded_len(self.cols)
    }

    pub fn view(&self) -> TernaryView<'_> {
        TernaryView::new(&self.data, self.rows, self.kp())
    }

    /// Ternary value (-1, 0, 1) of one weight, for tests and tools.
    pub fn value(&self, r: usize, c: usize) -> i8 {
        ternary::code_at(self.view().row(r), c) as i8 - 1
    }

    /// Is every weight zero? (Some re-uploads of official checkpoints are broken that way.)
    pub fn all_zero(&self) -> bool {
        // Every code is 1 (weight 0) exactly when every byte is 0b01010101: padding codes are
        // 1 too. Byte comparisons vectorise; this runs at load over every ternary matrix.
        let n = self.rows * self.kp() / 4;
        self.data[..n]
            .par_chunks(1 << 16)
            .all(|c| c.iter().fold(true, |ok, &b| ok & (b == 0x55)))
    }
}

/// A plain float (or block-quantized float) matrix: the embedding and the output head.
pub struct FloatMatrix {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub dtype: GgmlType,
    pub data: Bytes,
    row_bytes: usize,
}

impl FloatMatrix {
    pub fn new(
        name: String,
        rows: usize,
        cols: usize,
        dtype: GgmlType,
        data: Bytes,
    ) -> Result<FloatMatrix> {
        if !matches!(
            dtype,
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0 | GgmlType::Q6_K
        ) {
            bail!("tensor {name:?}: type {dtype} is not supported for an embedding or output head");
        }
        let row_bytes = dtype
            .data_size(cols as u64, cols as u64)
            .map_err(|e| Error::from(e).context(format!("tensor {name:?}")))?
            as usize;
        if data.len() != rows * row_bytes {
            bail!(
                "tensor {name:?}: expected {} bytes, found {}",
                rows * row_bytes,
                data.len()
            );
        }
        Ok(FloatMatrix {
            name,
            rows,
            cols,
            dtype,
            data,
            row_bytes,
        })
    }

    fn row_bytes(&self, r: usize) -> &[u8] {
        &self.data[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// Decode row r (an embedding lookup).
    pub fn row(&self, r: usize, out: &mut [f32]) {
        codecs::dequantize_row(self.dtype, self.row_bytes(r), out)
            .expect("row size checked at load");
    }

    /// `out[t * rows + r] = row_r . x_t` for `n_tok` inputs of `cols` values (the output head).
    pub fn matmul(&self, isa: Isa, x: &[f32], n_tok: usize, out: &mut [f32]) {
        match self.dtype {
            GgmlType::F16 => matmul_f16(isa, &self.data, self.rows, self.cols, x, n_tok, out),
            _ => {
                // Decode the row into a per-thread buffer, then dot. Used for F32/BF16/Q8_0/Q6_K.
                thread_local! {
                    static ROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
                }
                par_rows(self.rows, n_tok, self.cols, x, out, |r, xt| {
                    ROW.with(|buf| {
                        let mut buf = buf.borrow_mut();
                        buf.resize(self.cols, 0.0);
                        self.row(r, &mut buf);
                        dot_f32(&buf, xt)
                    })
                })
            }
        }
    }
}

/// One transformer block.
pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub wq: BitLinear,
    pub wk: BitLinear,
    pub wv: BitLinear,
    pub wo: BitLinear,
    pub attn_sub_norm: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    pub w_gate: BitLinear,
    pub w_up: BitLinear,
    pub w_down: BitLinear,
    pub ffn_sub_norm: Option<Vec<f32>>,
}

pub struct Weights {
    pub embed: FloatMatrix,
    /// Untied output head; `None` means the embedding is the head.
    pub head: Option<FloatMatrix>,
    /// The head requantized at load ([`Weights::requantize_head`]); when present the logits
    /// are computed from it instead of [`Weights::head`].
    pub head_q8: Option<Q8Matrix>,
    pub output_norm: Vec<f32>,
    pub layers: Vec<Layer>,
}

/// How the output head is computed (`--head-type`). Names follow ggml's type names.
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadType {
    /// As stored in the file (F16 for the official 2B4T GGUF).
    F16,
    /// Requantized at load to 8-bit blocks of 32 (ggml's Q8_0 with f32 scales), multiplied
    /// with the final-norm output quantized the same way: about half the bytes of F16.
    Q8_0,
    /// 6-bit k-quants: accepted by the parser, not implemented yet (load fails clearly).
    Q6_K,
}

impl HeadType {
    pub fn name(self) -> &'static str {
        match self {
            HeadType::F16 => "f16",
            HeadType::Q8_0 => "q8_0",
            HeadType::Q6_K => "q6_k",
        }
    }
}

impl std::str::FromStr for HeadType {
    type Err = Error;
    fn from_str(s: &str) -> Result<HeadType> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f16" => Ok(HeadType::F16),
            "q8_0" | "q8" => Ok(HeadType::Q8_0),
            "q6_k" | "q6k" => Ok(HeadType::Q6_K),
            _ => Err(Error::new(format!(
                "unknown head type {s:?}: expected f16 (as stored in the file), q8_0 or q6_k"
            ))),
        }
    }
}

impl std::fmt::Display for HeadType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Weights {
    pub fn head(&self) -> &FloatMatrix {
        self.head.as_ref().unwrap_or(&self.embed)
    }

    /// Use `t` for the output head: `F16` keeps the stored matrix; `Q8_0` makes an owned
    /// 8-bit copy (the stored one stays, for embedding lookups when tied) and gives the
    /// memory-map pages read to build it back to the kernel.
    pub fn requantize_head(&mut self, t: HeadType) -> Result<()> {
        match t {
            HeadType::F16 => self.head_q8 = None,
            HeadType::Q8_0 => {
                let h = self.head();
                let q = Q8Matrix::from_rows(h.rows, h.cols, |r, out| h.row(r, out));
                if let Bytes::Mapped(map, range) = &h.data {
                    // SAFETY: a read-only file mapping: dropping its pages only means they are
                    // read from the file again if touched; no data is lost.
                    unsafe {
                        let _ = map.unchecked_advise_range(
                            memmap2::UncheckedAdvice::DontNeed,
                            range.start,
                            range.len(),
                        );
                    }
                }
                self.head_q8 = Some(q);
            }
            HeadType::Q6_K => bail!("--head-type q6_k is not implemented yet; use q8_0 or f16"),
        }
        Ok(())
    }

    /// The head's type as used: the stored type, or "Q8_0 (requantized)".
    pub fn head_type_name(&self) -> String {
        match &self.head_q8 {
            Some(_) => "Q8_0 (requantized)".to_string(),
            None => self.head().dtype.name().to_string(),
        }
    }

    /// Logits: `out[t * n_vocab + v] = head_v . x_t` for `n_tok` final-norm outputs.
    pub fn head_matmul(&self, isa: Isa, x: &[f32], n_tok: usize, out: &mut [f32]) {
        match &self.head_q8 {
            Some(q) => q.matmul(isa, x, n_tok, out),
            None => self.head().matmul(isa, x, n_tok, out),
        }
    }

    pub fn linears(&self) -> impl Iterator<Item = &BitLinear> {
        self.layers
            .iter()
            .flat_map(|l| [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down])
    }
}

/// Pack `rows` rows of codes produced by `row_codes(r, codes)` (codes are `w + 1`) into the
/// runtime layout, in parallel.
fn pack_rows<F>(rows: usize, cols: usize, row_codes: F) -> Result<Vec<u8>>
where
    F: Fn(usize, &mut [u8]) -> Result<()> + Sync,
{
    let rb = padded_len(cols) / 4;
    let mut out = vec![0u8; rows * rb];
    out.par_chunks_mut(rb.max(1))
        .enumerate()
        .try_for_each_init(
            || vec![0u8; cols],
            |codes, (r, dst)| {
                row_codes(r, codes)?;
                ternary::pack_row(codes, dst);
                Ok::<(), Error>(())
            },
        )?;
    Ok(out)
}

/// Ternarize float weights. `exact_ternary`: the tensor is expected to hold codes times one
/// scale (a converter's F16 fallback, REFERENCE.md trap 8), so beta = max|w|; if it is not
/// ternary after all we fall back to absmean and warn. Otherwise (master weights) absmean, as
/// transformers' `WeightQuant`: beta = mean|w| (clamped at 1e-5), codes = clamp(round(w *
/// f32(1/beta)), -1, 1), and the effective scale is 1 / f32(1/beta).
fn ternarize_floats<F>(
    name: &str,
    rows: usize,
    cols: usize,
    exact_ternary: bool,
    read_row: F,
    warnings: &mut Vec<String>,
) -> Result<(Vec<u8>, f32, String)>
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    let row_stats = |r: usize| {
        let mut buf = vec![0f32; cols];
        read_row(r, &mut buf);
        let mut sum = 0f64;
        let mut max = 0f32;
        for v in &buf {
            sum += v.abs() as f64;
            max = max.max(v.abs());
        }
        (sum, max)
    };
    let (sum, max) = (0..rows)
        .into_par_iter()
        .map(row_stats)
        .reduce(|| (0.0, 0.0), |a, b| (a.0 + b.0, a.1.max(b.1)));
    if !sum.is_finite() || !max.is_finite() {
        bail!("tensor {name:?} contains NaN or infinite values");
    }
    if exact_ternary {
        let is_ternary = (0..rows).into_par_iter().all(|r| {
            let mut buf = vec![0f32; cols];
            read_row(r, &mut buf);
            buf.iter().all(|&v| v == 0.0 || v.abs() == max)
        });
        if is_ternary && max > 0.0 {
            let data = pack_rows(rows, cols, |r, codes| {
                let mut buf = vec![0f32; cols];
                read_row(r, &mut buf);
                for (c, v) in codes.iter_mut().zip(&buf) {
                    *c = if *v == 0.0 {
                        1
                    } else if *v > 0.0 {
                        2
                    } else {
                        0
                    };
                }
                Ok(())
            })?;
            return Ok((data, max, "ternary x scale".into()));
        }
        warnings.push(format!("tensor {name:?} is a float BitLinear weight that is not ternary: quantized with absmean"));
    }
    let mean = ((sum / (rows * cols) as f64) as f32).max(1e-5);
    let inv = 1.0f32 / mean;
    let data = pack_rows(rows, cols, |r, codes| {
        let mut buf = vec![0f32; cols];
        read_row(r, &mut buf);
        for (c, v) in codes.iter_mut().zip(&buf) {
            *c = ((v * inv).round_ties_even().clamp(-1.0, 1.0) + 1.0) as u8;
        }
        Ok(())
    })?;
    Ok((data, 1.0 / inv, "absmean".into()))
}

// ---------------------------------------------------------------------------------------------
// GGUF

fn gguf_tensor<'a>(g: &'a GgufFile, name: &str) -> Result<&'a TensorInfo> {
    g.tensor(name)
        .ok_or_else(|| Error::new(format!("missing tensor {name:?}")))
}

fn check_dims(name: &str, got: &[u64], want: &[usize]) -> Result<()> {
    if got.len() != want.len() || got.iter().zip(want).any(|(&a, &b)| a != b as u64) {
        bail!("tensor {name:?} has shape {got:?}, expected {want:?} from the hyper-parameters");
    }
    Ok(())
}

/// A BitLinear slot of a GGUF file: `cols` inputs, `rows` outputs (GGUF dims `[cols, rows]`).
fn gguf_linear(
    g: &GgufFile,
    name: &str,
    rows: usize,
    cols: usize,
    warnings: &mut Vec<String>,
) -> Result<BitLinear> {
    let t = gguf_tensor(g, name)?;
    check_dims(name, &t.dims, &[cols, rows])?;
    let data = g.tensor_data(t);
    let n = rows * cols;
    let (bytes, mut beta, stored_as) = match t.dtype {
        GgmlType::I2_S if cols.is_multiple_of(ternary::BLOCK) => {
            // Rows are whole blocks: the file layout is the runtime layout. Only validate.
            let codes = &data[..n / 4];
            if codes
                .par_chunks(4096)
                // A branch-free fold per chunk (vectorised), not a byte-by-byte early exit.
                .any(|c| c.iter().fold(0u8, |acc, &b| acc | (b & (b >> 1) & 0x55)) != 0)
            {
                bail!("tensor {name:?} contains the invalid I2_S code 3");
            }
            let range = t.offset as usize..t.offset as usize + n / 4;
            (
                Bytes::Mapped(g.map(), range),
                codecs::i2s_scale(data, n),
                "I2_S".to_string(),
            )
        }
        GgmlType::I2_S | GgmlType::TQ2_0 | GgmlType::TQ1_0 => {
            let scales = std::sync::Mutex::new(Vec::<f32>::new());
            let packed = pack_rows(rows, cols, |r, codes| {
                let s = ternary_row(t.dtype, data, cols, n, r, codes)
                    .map_err(|e| Error::from(e).context(format!("tensor {name:?}")))?;
                let mut all = scales.lock().unwrap();
                for v in s {
                    if !all.contains(&v) {
                        all.push(v);
                    }
                }
                Ok(())
            })?;
            let scales = scales.into_inner().unwrap();
            let beta = match scales.as_slice() {
                [] => 0.0,
                [one] => *one,
                many => bail!("tensor {name:?}: its blocks have different scales ({} distinct, e.g. {} and {}), so it is not one ternary matrix", many.len(), many[0], many[1]),
            };
            (Bytes::Owned(packed), beta, t.dtype.name().to_string())
        }
        GgmlType::F16 | GgmlType::BF16 | GgmlType::F32 => {
            let dtype = t.dtype;
            let row_bytes = cols * if dtype == GgmlType::F32 { 4 } else { 2 };
            let read = |r: usize, out: &mut [f32]| {
                codecs::dequantize_row(dtype, &data[r * row_bytes..(r + 1) * row_bytes], out)
                    .expect("sizes checked");
            };
            let (packed, beta, how) = ternarize_floats(name, rows, cols, true, read, warnings)?;
            (Bytes::Owned(packed), beta, format!("{dtype} {how}"))
        }
        other => bail!("tensor {name:?}: type {other} cannot hold a ternary BitLinear weight"),
    };
    // Optional per-tensor output scale (llama.cpp's `blk.N.<name>.scale`).
    let scale_name = name.replace(".weight", ".scale");
    if let Some(st) = g.tensor(&scale_name) {
        if st.n_elements() != 1 || st.dtype != GgmlType::F32 {
            bail!(
                "tensor {scale_name:?} should be one F32 value, is {} {:?}",
                st.dtype,
                st.dims
            );
        }
        beta *= codecs::f32_at(g.tensor_data(st), 0);
    }
    let lin = BitLinear {
        name: name.to_string(),
        rows,
        cols,
        data: bytes,
        beta,
        stored_as,
    };
    if lin.all_zero() {
        warnings.push(format!("tensor {name:?} is all zeros: the file is probably broken (some re-uploads of the official checkpoints are); try another revision"));
    }
    Ok(lin)
}

fn gguf_floats(g: &GgufFile, name: &str, want: &[usize]) -> Result<Vec<f32>> {
    let t = gguf_tensor(g, name)?;
    check_dims(name, &t.dims, want)?;
    let mut out = vec![0f32; t.n_elements() as usize];
    codecs::dequantize_row(t.dtype, g.tensor_data(t), &mut out)
        .map_err(|e| Error::from(e).context(format!("tensor {name:?}")))?;
    Ok(out)
}

fn gguf_matrix(g: &GgufFile, name: &str, rows: usize, cols: usize) -> Result<FloatMatrix> {
    let t = gguf_tensor(g, name)?;
    check_dims(name, &t.dims, &[cols, rows])?;
    let range = t.offset as usize..(t.offset + t.size) as usize;
    FloatMatrix::new(
        name.to_string(),
        rows,
        cols,
        t.dtype,
        Bytes::Mapped(g.map(), range),
    )
}

pub fn load_gguf_weights(g: &GgufFile, c: &Config, warnings: &mut Vec<String>) -> Result<Weights> {
    let (e, f, q, kv) = (c.n_embd, c.n_ff, c.q_dim(), c.kv_dim());
    let mut layers = Vec::with_capacity(c.n_layer);
    for i in 0..c.n_layer {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        let sub = |s: &str, len: usize| -> Result<Option<Vec<f32>>> {
            if c.sub_norms {
                Ok(Some(gguf_floats(g, &n(s), &[len])?))
            } else {
                Ok(None)
            }
        };
        layers.push(Layer {
            attn_norm: gguf_floats(g, &n("attn_norm"), &[e])?,
            wq: gguf_linear(g, &n("attn_q"), q, e, warnings)?,
            wk: gguf_linear(g, &n("attn_k"), kv, e, warnings)?,
            wv: gguf_linear(g, &n("attn_v"), kv, e, warnings)?,
            wo: gguf_linear(g, &n("attn_output"), e, q, warnings)?,
            attn_sub_norm: sub("attn_sub_norm", q)?,
            ffn_norm: gguf_floats(g, &n("ffn_norm"), &[e])?,
            w_gate: gguf_linear(g, &n("ffn_gate"), f, e, warnings)?,
            w_up: gguf_linear(g, &n("ffn_up"), f, e, warnings)?,
            w_down: gguf_linear(g, &n("ffn_down"), e, f, warnings)?,
            ffn_sub_norm: sub("ffn_sub_norm", f)?,
        });
    }
    Ok(Weights {
        embed: gguf_matrix(g, "token_embd.weight", c.n_vocab, e)?,
        head: if c.tied_head {
            None
        } else {
            Some(gguf_matrix(g, "output.weight", c.n_vocab, e)?)
        },
        head_q8: None,
        output_norm: gguf_floats(g, "output_norm.weight", &[e])?,
        layers,
    })
}

// ---------------------------------------------------------------------------------------------
// Hugging Face directories

/// How a checkpoint's `weight_scale` is applied (REFERENCE.md trap 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleDirection {
    /// `linear_class: autobitlinear` (2B4T): y = (W_t x) * weight_scale.
    Multiply,
    /// `linear_class: bitlinear` (transformers' default; HF1BitLLM, Falcon3): y = (W_t x) / weight_scale.
    Divide,
}

pub fn hf_scale_direction(d: &HfDir) -> Result<ScaleDirection> {
    let qc = d.config.get("quantization_config");
    let class = qc
        .and_then(|q| q.get("linear_class"))
        .and_then(|v| v.as_str());
    Ok(match class {
        Some("autobitlinear") => ScaleDirection::Multiply,
        Some("bitlinear") | None => ScaleDirection::Divide,
        Some(other) => {
            bail!("config.json: quantization_config.linear_class {other:?} is not supported")
        }
    })
}

fn hf_tensor<'a>(d: &'a HfDir, name: &str) -> Result<&'a HfTensor> {
    d.tensor(name)
        .ok_or_else(|| Error::new(format!("missing tensor {name:?}")))
}

fn hf_shape(name: &str, t: &HfTensor, want: &[usize]) -> Result<()> {
    if t.shape != want {
        bail!(
            "tensor {name:?} has shape {:?}, expected {want:?} from config.json",
            t.shape
        );
    }
    Ok(())
}

fn st_float_type(name: &str, t: &HfTensor) -> Result<GgmlType> {
    Ok(match t.dtype {
        safetensors::Dtype::F32 => GgmlType::F32,
        safetensors::Dtype::F16 => GgmlType::F16,
        safetensors::Dtype::BF16 => GgmlType::BF16,
        other => bail!("tensor {name:?} has dtype {other:?}, expected F32, F16 or BF16"),
    })
}

fn hf_linear(
    d: &HfDir,
    prefix: &str,
    rows: usize,
    cols: usize,
    dir: ScaleDirection,
    warnings: &mut Vec<String>,
) -> Result<BitLinear> {
    let name = format!("{prefix}.weight");
    let t = hf_tensor(d, &name)?;
    let data = d.tensor_data(t);
    let lin = if t.dtype == safetensors::Dtype::U8 {
        // Packed along the output axis: W[i*R + r, c] = ((P[r, c] >> 2i) & 3) - 1, R = rows/4.
        if !rows.is_multiple_of(4) {
            bail!("tensor {name:?}: {rows} output features cannot be packed 4 per byte");
        }
        let rr = rows / 4;
        hf_shape(&name, t, &[rr, cols])?;
        let packed = pack_rows(rows, cols, |o, codes| {
            let (i, r) = (o / rr, o % rr);
            for (c, code) in codes.iter_mut().enumerate() {
                *code = (data[r * cols + c] >> (2 * i)) & 3;
                if *code == 3 {
                    bail!("tensor {name:?}: invalid packed code 3 at row {r}, column {c}");
                }
            }
            Ok(())
        })?;
        let scale_name = format!("{prefix}.weight_scale");
        let st = hf_tensor(d, &scale_name)?;
        let s = d.read_f32(st)?;
        if s.len() != 1 {
            bail!(
                "tensor {scale_name:?} should hold one value, has shape {:?}",
                st.shape
            );
        }
        let beta = match dir {
            ScaleDirection::Multiply => s[0],
            ScaleDirection::Divide => 1.0 / s[0],
        };
        if !(beta.is_finite()) {
            bail!("tensor {scale_name:?} = {} gives no usable scale", s[0]);
        }
        BitLinear {
            name,
            rows,
            cols,
            data: Bytes::Owned(packed),
            beta,
            stored_as: "packed uint8".into(),
        }
    } else {
        hf_shape(&name, t, &[rows, cols])?;
        let dtype = st_float_type(&name, t)?;
        let eb = if dtype == GgmlType::F32 { 4 } else { 2 };
        let read = |r: usize, out: &mut [f32]| {
            codecs::dequantize_row(dtype, &data[r * cols * eb..(r + 1) * cols * eb], out)
                .expect("sizes checked");
        };
        let (packed, beta, how) = ternarize_floats(&name, rows, cols, false, read, warnings)?;
        BitLinear {
            name,
            rows,
            cols,
            data: Bytes::Owned(packed),
            beta,
            stored_as: format!("{dtype} {how}"),
        }
    };
    if lin.all_zero() {
        warnings.push(format!("tensor {:?} is all zeros: the checkpoint is probably broken (some re-uploads of the official checkpoints are); try another revision", lin.name));
    }
    Ok(lin)
}

fn hf_floats(d: &HfDir, name: &str, len: usize) -> Result<Vec<f32>> {
    let t = hf_tensor(d, name)?;
    hf_shape(name, t, &[len])?;
    Ok(d.read_f32(t)?)
}

fn hf_matrix(d: &HfDir, name: &str, rows: usize, cols: usize) -> Result<FloatMatrix> {
    let t = hf_tensor(d, name)?;
    hf_shape(name, t, &[rows, cols])?;
    let dtype = st_float_type(name, t)?;
    let (map, range) = d.tensor_map(t);
    FloatMatrix::new(
        name.to_string(),
        rows,
        cols,
        dtype,
        Bytes::Mapped(map, range),
    )
}

pub fn load_hf_weights(d: &HfDir, c: &Config, warnings: &mut Vec<String>) -> Result<Weights> {
    let dir = hf_scale_direction(d)?;
    let (e, f, q, kv) = (c.n_embd, c.n_ff, c.q_dim(), c.kv_dim());
    let sub_names = crate::config::hf_sub_norm_names(d);
    let mut layers = Vec::with_capacity(c.n_layer);
    for i in 0..c.n_layer {
        let p = |s: &str| format!("model.layers.{i}.{s}");
        let mut lin = |s: &str, rows, cols| hf_linear(d, &p(s), rows, cols, dir, warnings);
        let (wq, wk, wv, wo) = (
            lin("self_attn.q_proj", q, e)?,
            lin("self_attn.k_proj", kv, e)?,
            lin("self_attn.v_proj", kv, e)?,
            lin("self_attn.o_proj", e, q)?,
        );
        let (w_gate, w_up, w_down) = (
            lin("mlp.gate_proj", f, e)?,
            lin("mlp.up_proj", f, e)?,
            lin("mlp.down_proj", e, f)?,
        );
        let sub = |s: &str, len| -> Result<Option<Vec<f32>>> {
            if c.sub_norms {
                Ok(Some(hf_floats(d, &p(s), len)?))
            } else {
                Ok(None)
            }
        };
        layers.push(Layer {
            attn_norm: hf_floats(d, &p("input_layernorm.weight"), e)?,
            wq,
            wk,
            wv,
            wo,
            attn_sub_norm: sub(sub_names.0, q)?,
            ffn_norm: hf_floats(d, &p("post_attention_layernorm.weight"), e)?,
            w_gate,
            w_up,
            w_down,
            ffn_sub_norm: sub(sub_names.1, f)?,
        });
    }
    Ok(Weights {
        embed: hf_matrix(d, "model.embed_tokens.weight", c.n_vocab, e)?,
        head: if c.tied_head {
            None
        } else {
            Some(hf_matrix(d, "lm_head.weight", c.n_vocab, e)?)
        },
        head_q8: None,
        output_norm: hf_floats(d, "model.norm.weight", e)?,
        layers,
    })
}
