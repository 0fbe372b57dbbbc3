//! Weights in their runtime form, and how each file format is turned into it.
//!
//! - Ternary (BitLinear) matrices become [`BitLinear`]: codes in one of the kernels' layouts
//!   (see `bitnet_kernels::ternary`) and one f32 output scale `beta`. I2_S files whose rows are
//!   whole 128-blocks (2B4T), TQ2_0 files, and TQ1_0 files with `--tq1-native` are used
//!   straight from the memory map (only validated); everything else is repacked once at load
//!   into the 2-bit row layout. No f32 copy of a ternary matrix is ever made. A lazy load (for
//!   converters) keeps each matrix as its [`LinearSource`] and decodes it on demand, one at a
//!   time.
//! - Embedding and output head stay in their stored float/quantized type ([`FloatMatrix`]);
//!   the head can also be requantized at load to 8-bit or 6-bit blocks ([`HeadType`], an owned
//!   copy).
//! - Norm weights are small and become `Vec<f32>`.

use crate::config::Config;
use crate::{bail, Error, Result};
use bitnet_formats::codecs::{self, ternary_row};
use bitnet_formats::safetensors_dir::{HfDir, HfTensor};
use bitnet_formats::{GgmlType, GgufFile, TensorInfo};
use bitnet_kernels::float::{dot_f32, matmul_f16, par_rows};
use bitnet_kernels::q8::{self, Q8Matrix};
use bitnet_kernels::ternary::{self, padded_len, Layout, TernaryView};
use bitnet_kernels::tq1;
use bitnet_kernels::Isa;
use bitnet_kernels::{pool, q6k, SyncPtr};
use memmap2::Mmap;
use rayon::prelude::*;
use std::ops::{Deref, Range};
use std::sync::Arc;

/// Bytes that are either owned or a range of a shared memory map.
pub enum Bytes {
    Owned(Vec<u8>),
    Mapped(Arc<Mmap>, Range<usize>),
    /// Part of an anonymous mapping (`--no-mmap`, [`Weights::copy_to_memory`]).
    Anon(Arc<Mmap>, Range<usize>),
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Owned(v) => v,
            Bytes::Mapped(m, r) | Bytes::Anon(m, r) => &m[r.clone()],
        }
    }
}

impl Bytes {
    pub fn is_mapped(&self) -> bool {
        matches!(self, Bytes::Mapped(..))
    }

    /// Bytes of owned (heap or anonymous) storage; file-mapped bytes count 0.
    pub fn owned_len(&self) -> usize {
        match self {
            Bytes::Owned(v) => v.len(),
            Bytes::Anon(_, r) => r.len(),
            Bytes::Mapped(..) => 0,
        }
    }

    /// [`Bytes::release_pages`] for the pages that lie wholly inside `range` only: a page
    /// shared with bytes outside it (another thread's rows, not read yet) stays.
    pub fn release_whole_pages(&self, range: Range<usize>) {
        if let Some((map, r)) = self.file_range(range) {
            let (start, end) = (r.start.next_multiple_of(PAGE), r.end / PAGE * PAGE);
            if start < end {
                release_map_range(map, start..end);
            }
        }
    }

    /// Map the file pages of `range` in one call (`MADV_POPULATE_READ`) rather than one page
    /// fault at a time: a hint, ignored where unsupported.
    pub fn populate(&self, range: Range<usize>) {
        #[cfg(target_os = "linux")]
        if let Some((map, r)) = self.file_range(range) {
            // Page-aligned start, as madvise requires.
            let page = r.start / PAGE * PAGE;
            let _ = map.advise_range(memmap2::Advice::PopulateRead, page, r.end - page);
        }
    }

    /// Give the memory-map pages of `range` (byte offsets into these bytes) back to the kernel:
    /// they are read from the file again if touched. Nothing for owned or anonymous bytes
    /// (dropping those would lose them).
    pub fn release_pages(&self, range: Range<usize>) {
        if let Some((map, r)) = self.file_range(range) {
            release_map_range(map, r);
        }
    }

    /// The file map and the offsets in it of `range` (offsets into these bytes, clamped to
    /// them); `None` unless the bytes are file-mapped.
    fn file_range(&self, range: Range<usize>) -> Option<(&Mmap, Range<usize>)> {
        let Bytes::Mapped(map, r) = self else {
            return None;
        };
        let start = r.start + range.start.min(r.len());
        let end = r.start + range.end.min(r.len());
        Some((map, start..end.max(start)))
    }
}

/// Page size assumed when rounding to whole pages (madvise itself checks alignment).
const PAGE: usize = 4096;

/// `madvise(DONTNEED)` on part of a read-only file mapping (rounded out to whole pages).
pub(crate) fn release_map_range(map: &Mmap, range: Range<usize>) {
    if range.is_empty() {
        return;
    }
    // SAFETY: a read-only file mapping: dropping its pages only means they are read from the
    // file again if touched; no data is lost.
    unsafe {
        let _ = map.unchecked_advise_range(
            memmap2::UncheckedAdvice::DontNeed,
            range.start,
            range.len(),
        );
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
    /// How `data` holds the codes: the 2-bit row layout, or TQ2_0 / TQ1_0 blocks as in the file.
    pub layout: Layout,
    /// Lazy loads only ([`crate::Model::load_lazy`]): where to read the matrix from. Such a
    /// BitLinear holds no codes (`data` is empty, `beta` NaN) and cannot be multiplied; decode
    /// it with [`LinearSource::decode`].
    pub source: Option<LinearSource>,
}

impl BitLinear {
    pub fn kp(&self) -> usize {
        padded_len(self.cols)
    }

    /// Loaded lazily: only the [`BitLinear::source`], no codes.
    pub fn is_lazy(&self) -> bool {
        self.source.is_some()
    }

    pub fn view(&self) -> TernaryView<'_> {
        match self.layout {
            Layout::I2s => TernaryView::new(&self.data, self.rows, self.kp()),
            Layout::Tq1 => TernaryView::tq1(&self.data, self.rows, self.kp()),
            Layout::Tq2 => TernaryView::tq2(&self.data, self.rows, self.kp()),
        }
    }

    /// Ternary value (-1, 0, 1) of one weight, for tests and tools.
    pub fn value(&self, r: usize, c: usize) -> i8 {
        self.view().code(r, c) as i8 - 1
    }

    /// Is every weight zero? (Some re-uploads of official checkpoints are broken that way.)
    pub fn all_zero(&self) -> bool {
        let data = &self.data[..self.rows * self.view().row_bytes()];
        match self.layout {
            // Every code is 1 (weight 0) exactly when every byte is 0b01010101: padding codes
            // are 1 too. Byte comparisons vectorise; this runs at load over every matrix.
            Layout::I2s => data
                .par_chunks(1 << 16)
                .all(|c| c.iter().fold(true, |ok, &b| ok & (b == 0x55))),
            Layout::Tq2 => data
                .par_chunks(ternary::TQ2_BLOCK_BYTES * 1024)
                .all(|c| c.chunks_exact(ternary::TQ2_BLOCK_BYTES).all(tq2_zero_block)),
            Layout::Tq1 => data
                .par_chunks(tq1::BLOCK_BYTES * 1024)
                .all(tq1::all_codes_one),
        }
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
            GgmlType::Q6_K => q6k::matmul(isa, &self.data, self.rows, self.cols, x, n_tok, out),
            GgmlType::Q8_0 => q8::matmul_ggml(isa, &self.data, self.rows, self.cols, x, n_tok, out),
            _ => {
                // Decode the row into a per-thread buffer, then dot. Used for F32/BF16.
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

impl Layer {
    /// The seven ternary matrices, in file order.
    pub fn linears(&self) -> [&BitLinear; 7] {
        [
            &self.wq,
            &self.wk,
            &self.wv,
            &self.wo,
            &self.w_gate,
            &self.w_up,
            &self.w_down,
        ]
    }

    pub fn linears_mut(&mut self) -> [&mut BitLinear; 7] {
        [
            &mut self.wq,
            &mut self.wk,
            &mut self.wv,
            &mut self.wo,
            &mut self.w_gate,
            &mut self.w_up,
            &mut self.w_down,
        ]
    }
}

/// The output head requantized at load, an owned copy ([`HeadType`]).
#[allow(non_camel_case_types)]
pub enum RequantizedHead {
    Q8_0(Q8Matrix),
    /// Stored in ggml's Q6_K blocks, computed like a Q6_K head read from a file.
    Q6_K(FloatMatrix),
}

pub struct Weights {
    pub embed: FloatMatrix,
    /// Untied output head; `None` means the embedding is the head.
    pub head: Option<FloatMatrix>,
    /// The head requantized at load ([`Weights::requantize_head`]); when present the logits
    /// are computed from it instead of [`Weights::head`].
    pub head_requantized: Option<RequantizedHead>,
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
    /// Requantized at load to ggml's Q6_K (6-bit codes, 16 int8 scales and one f16 scale per
    /// 256 values), multiplied with the input quantized to int8 per 256: 0.82 bytes per
    /// weight. Needs a hidden size that is a multiple of 256 (2B4T: 2560).
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

    /// Use `t` for the output head: `F16` keeps the stored matrix; `Q8_0` and `Q6_K` make an
    /// owned copy in that type (the stored one stays, for embedding lookups when tied) and give
    /// the memory-map pages read to build it back to the kernel. A head already stored in the
    /// requested type is used as it is (requantizing it again would only add error).
    pub fn requantize_head(&mut self, t: HeadType) -> Result<()> {
        let h = self.head();
        // Give the stored pages back as the rows are done, not after the whole head (peak
        // RSS: the F16 head and its copy would otherwise be resident together).
        const RELEASE_ROWS: usize = 256;
        let read_row = |r: usize, out: &mut [f32]| {
            h.row(r, out);
            if (r + 1).is_multiple_of(RELEASE_ROWS) {
                let rows = r + 1 - RELEASE_ROWS..r + 1;
                h.data
                    .release_whole_pages(rows.start * h.row_bytes..rows.end * h.row_bytes);
            }
        };
        let requantized = match t {
            HeadType::F16 => None,
            HeadType::Q6_K if h.dtype == GgmlType::Q6_K => None,
            HeadType::Q8_0 if h.dtype == GgmlType::Q8_0 => None,
            HeadType::Q8_0 => Some(RequantizedHead::Q8_0(Q8Matrix::from_rows(
                h.rows, h.cols, read_row,
            ))),
            HeadType::Q6_K => {
                if !h.cols.is_multiple_of(q6k::QK_K) {
                    bail!(
                        "--head-type q6_k needs a hidden size that is a multiple of {}, this \
                         model's is {}; use q8_0",
                        q6k::QK_K,
                        h.cols
                    );
                }
                let row_bytes = GgmlType::Q6_K.data_size(h.cols as u64, h.cols as u64)? as usize;
                let mut data = vec![0u8; h.rows * row_bytes];
                let dst = SyncPtr(data.as_mut_ptr());
                pool::for_ranges(h.rows, 1, 256, |range| {
                    let (mut x, mut q) = (vec![0f32; h.cols], Vec::with_capacity(row_bytes));
                    for r in range {
                        read_row(r, &mut x);
                        q.clear();
                        codecs::quantize_row_q6_k(&x, &mut q).expect("whole 256-blocks");
                        // SAFETY: each part writes only its own rows; `data` outlives the job.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                q.as_ptr(),
                                dst.get().add(r * row_bytes),
                                row_bytes,
                            )
                        };
                    }
                });
                let m = FloatMatrix::new(
                    format!("{} (Q6_K)", h.name),
                    h.rows,
                    h.cols,
                    GgmlType::Q6_K,
                    Bytes::Owned(data),
                )?;
                Some(RequantizedHead::Q6_K(m))
            }
        };
        if requantized.is_some() {
            h.data.release_pages(0..h.data.len());
        }
        self.head_requantized = requantized;
        Ok(())
    }

    /// `--no-mmap`: move the weights a decode step streams (every ternary matrix, and the
    /// output head unless it was requantized) into one anonymous region, asking for
    /// transparent huge pages (2 MiB pages spare the TLB over a 1 GB stream). File pages are
    /// released as they are copied and heap copies (repacked TQ matrices) freed, so resident
    /// memory does not grow by more than one tensor.
    pub fn copy_to_memory(&mut self) -> Result<()> {
        let requantized = self.head_requantized.is_some();
        let mut parts: Vec<&mut Bytes> = Vec::new();
        for l in &mut self.layers {
            parts.extend(l.linears_mut().into_iter().map(|lin| &mut lin.data));
        }
        if !requantized {
            // The head: the untied one, or the embedding (then every row is read per token).
            match &mut self.head {
                Some(h) => parts.push(&mut h.data),
                None => parts.push(&mut self.embed.data),
            }
        }
        parts.retain(|b| !matches!(b, Bytes::Anon(..)) && !b.is_empty());
        let total: usize = parts.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Ok(());
        }
        let err =
            |e: std::io::Error| Error::new(format!("cannot copy the weights into memory: {e}"));
        let mut anon = memmap2::MmapMut::map_anon(total).map_err(err)?;
        #[cfg(target_os = "linux")]
        let _ = anon.advise(memmap2::Advice::HugePage); // a hint: fine if refused
        let mut ranges = Vec::with_capacity(parts.len());
        let mut at = 0;
        const CHUNK: usize = 16 << 20; // copy and release in steps, so the peak stays flat
        for b in parts.iter_mut() {
            let n = b.len();
            for c in (0..n).step_by(CHUNK) {
                let c = c..(c + CHUNK).min(n);
                b.populate(c.clone());
                anon[at + c.start..at + c.end].copy_from_slice(&b[c.clone()]);
                b.release_pages(c);
            }
            if let Bytes::Owned(v) = &mut **b {
                *v = Vec::new(); // free the heap copy now, not after the whole loop
            }
            ranges.push(at..at + n);
            at += n;
        }
        let anon = Arc::new(anon.make_read_only().map_err(err)?);
        for (b, r) in parts.into_iter().zip(ranges) {
            *b = Bytes::Anon(anon.clone(), r);
        }
        Ok(())
    }

    /// The head's type as used: the stored type, or "Q8_0 (requantized)" / "Q6_K (requantized)".
    pub fn head_type_name(&self) -> String {
        match &self.head_requantized {
            Some(RequantizedHead::Q8_0(_)) => "Q8_0 (requantized)".to_string(),
            Some(RequantizedHead::Q6_K(_)) => "Q6_K (requantized)".to_string(),
            None => self.head().dtype.name().to_string(),
        }
    }

    /// Logits: `out[t * n_vocab + v] = head_v . x_t` for `n_tok` final-norm outputs.
    pub fn head_matmul(&self, isa: Isa, x: &[f32], n_tok: usize, out: &mut [f32]) {
        match &self.head_requantized {
            Some(RequantizedHead::Q8_0(q)) => q.matmul(isa, x, n_tok, out),
            Some(RequantizedHead::Q6_K(m)) => m.matmul(isa, x, n_tok, out),
            None => self.head().matmul(isa, x, n_tok, out),
        }
    }

    pub fn linears(&self) -> impl Iterator<Item = &BitLinear> {
        self.layers.iter().flat_map(|l| l.linears())
    }

    /// Bytes of heap memory holding ternary codes (repacked matrices; the ones used straight
    /// from the memory map, and lazily loaded ones, count 0).
    pub fn ternary_bytes_held(&self) -> usize {
        self.linears().map(|l| l.data.owned_len()).sum()
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
// Ternary sources

/// Where a ternary matrix is read from: one tensor of a memory-mapped GGUF file or safetensors
/// shard, already checked (shape, type, scale) but not decoded. [`LinearSource::decode`] makes
/// the [`BitLinear`]. A normal load decodes every matrix at once; a lazy load
/// ([`crate::Model::load_lazy`], for converters) keeps only the source in each
/// [`BitLinear`], so that the matrices can be decoded one at a time.
pub struct LinearSource {
    name: String,
    rows: usize,
    cols: usize,
    map: Arc<Mmap>,
    /// The tensor's bytes in `map`.
    range: Range<usize>,
    kind: SourceKind,
}

enum SourceKind {
    /// A GGUF tensor (a ternary or a float type) and the value of its optional `.scale` tensor.
    Gguf {
        dtype: GgmlType,
        scale_mult: Option<f32>,
        /// TQ1_0 only: keep the file's blocks (`--tq1-native`) instead of repacking to 2 bits.
        tq1_native: bool,
    },
    /// Hugging Face uint8 codes packed 4 per byte along the output axis, with the output scale
    /// from `weight_scale`.
    HfPacked { beta: f32 },
    /// Hugging Face float weights (master weights, or a converter's ternary x scale).
    HfFloat { dtype: GgmlType },
}

impl LinearSource {
    /// The tensor's bytes in the memory map.
    pub fn data(&self) -> &[u8] {
        &self.map[self.range.clone()]
    }

    /// Hand the memory-map pages of the tensor back to the kernel (after decoding it for a
    /// conversion): they are read from the file again if touched.
    pub fn release_pages(&self) {
        release_map_range(&self.map, self.range.clone());
    }

    /// A [`BitLinear`] holding only this source: no codes, an unknown (NaN) scale.
    fn into_lazy(self) -> BitLinear {
        BitLinear {
            name: self.name.clone(),
            rows: self.rows,
            cols: self.cols,
            data: Bytes::Owned(Vec::new()),
            beta: f32::NAN,
            stored_as: "not decoded (lazy load)".to_string(),
            layout: Layout::I2s,
            source: Some(self),
        }
    }

    /// Read the matrix: validate its codes and bring them to a runtime layout (used straight
    /// from the memory map where the kernels read the file's layout: I2_S with whole
    /// 128-blocks per row, TQ2_0, TQ1_0 with `--tq1-native`; repacked otherwise). Warns about
    /// an all-zero matrix and about float weights that are not ternary.
    pub fn decode(&self, warnings: &mut Vec<String>) -> Result<BitLinear> {
        let (name, rows, cols) = (self.name.as_str(), self.rows, self.cols);
        let data = self.data();
        let n = rows * cols;
        let mut layout = Layout::I2s;
        let (bytes, beta, stored_as, what) = match self.kind {
            SourceKind::Gguf {
                dtype,
                scale_mult,
                tq1_native,
            } => {
                let (bytes, beta, stored_as) = match dtype {
                    GgmlType::TQ1_0 if tq1_native => {
                        // `--tq1-native`: used as it is from the memory map by the TQ1_0
                        // kernels (the 2-bit copy holds 19% more than the file, and decodes
                        // about twice as fast). Every byte decodes to valid trits; only the
                        // block scales need checking.
                        layout = Layout::Tq1;
                        let rb = tq1::row_bytes(cols);
                        let blocks = &data[..rows * rb];
                        let scales = par_block_scales(blocks, tq1::BLOCK_BYTES, |b| {
                            Ok(tq1::all_codes_one(b))
                        })
                        .expect("TQ1_0 blocks have no invalid codes");
                        let range = self.range.start..self.range.start + rows * rb;
                        (
                            Bytes::Mapped(self.map.clone(), range),
                            one_scale(name, &scales)?,
                            "TQ1_0".to_string(),
                        )
                    }
                    GgmlType::TQ2_0 => {
                        // Used as it is from the memory map: the 2-bit kernels read TQ2_0
                        // blocks (kernels' ternary.rs). Only validated: no code 3, one scale.
                        layout = Layout::Tq2;
                        let bb = ternary::TQ2_BLOCK_BYTES;
                        let blocks = &data[..rows * cols / 256 * bb];
                        let scales = par_block_scales(blocks, bb, |b| {
                            if codecs::has_code_3(&b[..64]) {
                                Err(())
                            } else {
                                Ok(tq2_zero_block(b))
                            }
                        })
                        .map_err(|bi| {
                            let (r, b) = (bi / (cols / 256), bi % (cols / 256));
                            let blk = &blocks[bi * bb..(bi + 1) * bb];
                            let e = (0..256).find(|&e| codecs::tq2_code(blk, e) == 3);
                            Error::new(format!(
                                "tensor {name:?}: invalid TQ2_0 code 3 at element {} of block {b} of row {r}",
                                e.unwrap_or(0)
                            ))
                        })?;
                        let range = self.range.start..self.range.start + blocks.len();
                        (
                            Bytes::Mapped(self.map.clone(), range),
                            one_scale(name, &scales)?,
                            "TQ2_0".to_string(),
                        )
                    }
                    GgmlType::I2_S if cols.is_multiple_of(ternary::BLOCK) => {
                        // Rows are whole blocks: the file layout is the runtime layout. Only
                        // validate.
                        let codes = &data[..n / 4];
                        if codes.par_chunks(4096).any(codecs::has_code_3) {
                            bail!("tensor {name:?} contains the invalid I2_S code 3");
                        }
                        let range = self.range.start..self.range.start + n / 4;
                        (
                            Bytes::Mapped(self.map.clone(), range),
                            codecs::i2s_scale(data, n),
                            "I2_S".to_string(),
                        )
                    }
                    GgmlType::I2_S | GgmlType::TQ1_0 => {
                        let scales = std::sync::Mutex::new(Vec::<f32>::new());
                        let add_scales = |s: Vec<f32>| {
                            let mut all = scales.lock().unwrap();
                            for v in s {
                                if !all.contains(&v) {
                                    all.push(v);
                                }
                            }
                        };
                        let ctx = |e: bitnet_formats::FormatError| {
                            Error::from(e).context(format!("tensor {name:?}"))
                        };
                        let packed = pack_rows(rows, cols, |r, codes| {
                            add_scales(ternary_row(dtype, data, cols, n, r, codes).map_err(ctx)?);
                            Ok(())
                        })?;
                        let scales = scales.into_inner().unwrap();
                        let beta = one_scale(name, &scales)?;
                        (Bytes::Owned(packed), beta, dtype.name().to_string())
                    }
                    GgmlType::F16 | GgmlType::BF16 | GgmlType::F32 => {
                        let row_bytes = cols * if dtype == GgmlType::F32 { 4 } else { 2 };
                        let read = |r: usize, out: &mut [f32]| {
                            codecs::dequantize_row(
                                dtype,
                                &data[r * row_bytes..(r + 1) * row_bytes],
                                out,
                            )
                            .expect("sizes checked");
                        };
                        let (packed, beta, how) =
                            ternarize_floats(name, rows, cols, true, read, warnings)?;
                        (Bytes::Owned(packed), beta, format!("{dtype} {how}"))
                    }
                    _ => unreachable!("the type was checked when the source was made"),
                };
                let beta = match scale_mult {
                    Some(m) => beta * m,
                    None => beta,
                };
                (bytes, beta, stored_as, "file")
            }
            SourceKind::HfPacked { beta } => {
                let rr = rows / 4;
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
                (
                    Bytes::Owned(packed),
                    beta,
                    "packed uint8".to_string(),
                    "checkpoint",
                )
            }
            SourceKind::HfFloat { dtype } => {
                let eb = if dtype == GgmlType::F32 { 4 } else { 2 };
                let read = |r: usize, out: &mut [f32]| {
                    codecs::dequantize_row(dtype, &data[r * cols * eb..(r + 1) * cols * eb], out)
                        .expect("sizes checked");
                };
                let (packed, beta, how) =
                    ternarize_floats(name, rows, cols, false, read, warnings)?;
                (
                    Bytes::Owned(packed),
                    beta,
                    format!("{dtype} {how}"),
                    "checkpoint",
                )
            }
        };
        if !bytes.is_mapped() {
            // Decoded into a copy: the file's pages of this tensor are not read again, so give
            // them back now rather than hold the file and the copy (TQ files: +0.5 GiB).
            self.release_pages();
        }
        let lin = BitLinear {
            name: name.to_string(),
            rows,
            cols,
            data: bytes,
            beta,
            stored_as,
            layout,
            source: None,
        };
        if lin.all_zero() {
            warnings.push(format!("tensor {name:?} is all zeros: the {what} is probably broken (some re-uploads of the official checkpoints are); try another revision"));
        }
        Ok(lin)
    }
}

// ---------------------------------------------------------------------------------------------
// GGUF

/// The one scale of a ternary matrix from its blocks' distinct scales (none: an empty matrix).
fn one_scale(name: &str, scales: &[f32]) -> Result<f32> {
    match scales {
        [] => Ok(0.0),
        [one] => Ok(*one),
        many => bail!("tensor {name:?}: its blocks have different scales ({} distinct, e.g. {} and {}), so it is not one ternary matrix", many.len(), many[0], many[1]),
    }
}

/// Does this TQ2_0 block hold only zero weights (every code 1: bytes 0b01010101)?
fn tq2_zero_block(block: &[u8]) -> bool {
    block[..64].iter().all(|&x| x == 0x55)
}

/// The distinct scales of whole blocks of `block_bytes` that end in their f16 scale (TQ1_0,
/// TQ2_0), as `codecs::ternary_row` reports them: blocks of only zero weights, or with a zero
/// scale, do not count. `zero(block)` says whether a block is all zeros, or fails for an
/// invalid block: the index of one such block is the error. In parallel.
fn par_block_scales(
    blocks: &[u8],
    block_bytes: usize,
    zero: impl Fn(&[u8]) -> std::result::Result<bool, ()> + Sync,
) -> std::result::Result<Vec<f32>, usize> {
    const PER_JOB: usize = 4096;
    let add = |seen: &mut Vec<f32>, v: f32| {
        if !seen.contains(&v) {
            seen.push(v);
        }
    };
    blocks
        .par_chunks(block_bytes * PER_JOB)
        .enumerate()
        .map(|(job, part)| {
            let (mut seen, mut last) = (Vec::new(), None);
            for (i, b) in part.chunks_exact(block_bytes).enumerate() {
                let bits = u16::from_le_bytes([b[block_bytes - 2], b[block_bytes - 1]]);
                let all_zero = zero(b).map_err(|()| job * PER_JOB + i)?;
                if last == Some(bits) {
                    continue; // the common case: the scale of the previous counted block
                }
                let d = half::f16::from_bits(bits).to_f32();
                if d != 0.0 && !all_zero {
                    last = Some(bits);
                    add(&mut seen, d);
                }
            }
            Ok(seen)
        })
        .try_reduce(Vec::new, |mut a, b| {
            b.into_iter().for_each(|v| add(&mut a, v));
            Ok(a)
        })
}

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
/// Checked here (shape, type, scale tensor); the codes are read by [`LinearSource::decode`].
fn gguf_linear_source(
    g: &GgufFile,
    name: &str,
    (rows, cols): (usize, usize),
    tq1_native: bool,
) -> Result<LinearSource> {
    let t = gguf_tensor(g, name)?;
    check_dims(name, &t.dims, &[cols, rows])?;
    if !matches!(
        t.dtype,
        GgmlType::I2_S
            | GgmlType::TQ2_0
            | GgmlType::TQ1_0
            | GgmlType::F16
            | GgmlType::BF16
            | GgmlType::F32
    ) {
        bail!(
            "tensor {name:?}: type {} cannot hold a ternary BitLinear weight",
            t.dtype
        );
    }
    // Optional per-tensor output scale (llama.cpp's `blk.N.<name>.scale`).
    let scale_name = name.replace(".weight", ".scale");
    let scale_mult = match g.tensor(&scale_name) {
        Some(st) => {
            if st.n_elements() != 1 || st.dtype != GgmlType::F32 {
                bail!(
                    "tensor {scale_name:?} should be one F32 value, is {} {:?}",
                    st.dtype,
                    st.dims
                );
            }
            Some(codecs::f32_at(g.tensor_data(st), 0))
        }
        None => None,
    };
    Ok(LinearSource {
        name: name.to_string(),
        rows,
        cols,
        map: g.map(),
        range: t.offset as usize..(t.offset + t.size) as usize,
        kind: SourceKind::Gguf {
            dtype: t.dtype,
            scale_mult,
            tq1_native,
        },
    })
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

/// The file ranges of the ternary matrices decoded into a copy (TQ1_0 by default, I2_S with
/// partial blocks, Hugging Face checkpoints), given back once more when the whole model is
/// loaded. Each was released right after its decode, but the page cache holds a file in large
/// folios (2 MiB here) and reading the next tensor maps its whole folio again, the previous
/// tensor's tail included: 109 MB of a 2B4T TQ2_0 file stayed resident beside the repacked
/// copy without this pass.
#[derive(Default)]
struct RepackedSources(Vec<(Arc<Mmap>, Range<usize>)>);

impl RepackedSources {
    /// Decode `src` now (noting its range if it was copied) or keep it (`lazy`).
    fn load(
        &mut self,
        src: LinearSource,
        lazy: bool,
        warnings: &mut Vec<String>,
    ) -> Result<BitLinear> {
        if lazy {
            return Ok(src.into_lazy());
        }
        let lin = src.decode(warnings)?;
        if !lin.data.is_mapped() {
            self.0.push((src.map.clone(), src.range.clone()));
        }
        Ok(lin)
    }

    fn release(self) {
        for (map, range) in self.0 {
            release_map_range(&map, range);
        }
    }
}

/// The weights of a GGUF file. `lazy`: keep each ternary matrix as its [`LinearSource`]
/// instead of decoding it (see [`crate::Model::load_lazy`]). `tq1_native`: TQ1_0 matrices are
/// used as stored rather than repacked (see [`crate::model::LoadOptions::tq1_native`]).
pub fn load_gguf_weights(
    g: &GgufFile,
    c: &Config,
    lazy: bool,
    tq1_native: bool,
    warnings: &mut Vec<String>,
) -> Result<Weights> {
    let (e, f, q, kv) = (c.n_embd, c.n_ff, c.q_dim(), c.kv_dim());
    let mut layers = Vec::with_capacity(c.n_layer);
    let mut repacked = RepackedSources::default();
    for i in 0..c.n_layer {
        let n = |s: &str| format!("blk.{i}.{s}.weight");
        let mut lin = |s: &str, rows, cols| {
            let src = gguf_linear_source(g, &n(s), (rows, cols), tq1_native)?;
            repacked.load(src, lazy, warnings)
        };
        let sub = |s: &str, len: usize| -> Result<Option<Vec<f32>>> {
            if c.sub_norms {
                Ok(Some(gguf_floats(g, &n(s), &[len])?))
            } else {
                Ok(None)
            }
        };
        layers.push(Layer {
            attn_norm: gguf_floats(g, &n("attn_norm"), &[e])?,
            wq: lin("attn_q", q, e)?,
            wk: lin("attn_k", kv, e)?,
            wv: lin("attn_v", kv, e)?,
            wo: lin("attn_output", e, q)?,
            attn_sub_norm: sub("attn_sub_norm", q)?,
            ffn_norm: gguf_floats(g, &n("ffn_norm"), &[e])?,
            w_gate: lin("ffn_gate", f, e)?,
            w_up: lin("ffn_up", f, e)?,
            w_down: lin("ffn_down", e, f)?,
            ffn_sub_norm: sub("ffn_sub_norm", f)?,
        });
    }
    repacked.release();
    Ok(Weights {
        embed: gguf_matrix(g, "token_embd.weight", c.n_vocab, e)?,
        head: if c.tied_head {
            None
        } else {
            Some(gguf_matrix(g, "output.weight", c.n_vocab, e)?)
        },
        head_requantized: None,
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

/// A BitLinear slot of a Hugging Face checkpoint (`{prefix}.weight`, and `weight_scale` when
/// packed). Checked here (shape, dtype, scale); the codes are read by [`LinearSource::decode`].
fn hf_linear_source(
    d: &HfDir,
    prefix: &str,
    rows: usize,
    cols: usize,
    dir: ScaleDirection,
) -> Result<LinearSource> {
    let name = format!("{prefix}.weight");
    let t = hf_tensor(d, &name)?;
    let kind = if t.dtype == safetensors::Dtype::U8 {
        // Packed along the output axis: W[i*R + r, c] = ((P[r, c] >> 2i) & 3) - 1, R = rows/4.
        if !rows.is_multiple_of(4) {
            bail!("tensor {name:?}: {rows} output features cannot be packed 4 per byte");
        }
        hf_shape(&name, t, &[rows / 4, cols])?;
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
        SourceKind::HfPacked { beta }
    } else {
        hf_shape(&name, t, &[rows, cols])?;
        SourceKind::HfFloat {
            dtype: st_float_type(&name, t)?,
        }
    };
    let (map, range) = d.tensor_map(t);
    Ok(LinearSource {
        name,
        rows,
        cols,
        map,
        range,
        kind,
    })
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

/// The weights of a Hugging Face directory. `lazy`: keep each ternary matrix as its
/// [`LinearSource`] instead of decoding it (see [`crate::Model::load_lazy`]).
pub fn load_hf_weights(
    d: &HfDir,
    c: &Config,
    lazy: bool,
    warnings: &mut Vec<String>,
) -> Result<Weights> {
    let dir = hf_scale_direction(d)?;
    let (e, f, q, kv) = (c.n_embd, c.n_ff, c.q_dim(), c.kv_dim());
    let sub_names = crate::config::hf_sub_norm_names(d);
    let mut layers = Vec::with_capacity(c.n_layer);
    let mut repacked = RepackedSources::default();
    for i in 0..c.n_layer {
        let p = |s: &str| format!("model.layers.{i}.{s}");
        let mut lin = |s: &str, rows, cols| {
            repacked.load(hf_linear_source(d, &p(s), rows, cols, dir)?, lazy, warnings)
        };
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
    repacked.release();
    Ok(Weights {
        embed: hf_matrix(d, "model.embed_tokens.weight", c.n_vocab, e)?,
        head: if c.tied_head {
            None
        } else {
            Some(hf_matrix(d, "lm_head.weight", c.n_vocab, e)?)
        },
        head_requantized: None,
        output_norm: hf_floats(d, "model.norm.weight", e)?,
        layers,
    })
}

#[cfg(test)]
mod tests {
    use crate::Model;
    use std::path::PathBuf;

    fn data(rel: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/data")
            .join(rel)
    }

    /// A lazy load holds no ternary codes at all, and decoding each matrix gives exactly what a
    /// normal load holds (codes, scale, mapped or not), with the same warnings.
    #[test]
    fn lazy_load_holds_no_codes_and_decodes_to_the_loaded_matrices() {
        for rel in [
            "tiny/checkpoint_master_bf16",
            "tiny/checkpoint_packed",
            "tiny/gguf/tiny-i2_s.gguf",
            "tiny/gguf/tiny-tq2_0.gguf",
            "tiny/gguf/tiny-tq1_0.gguf",
            "falcon-tiny/checkpoint_master_bf16",
            "falcon-tiny/checkpoint_packed",
            "falcon-tiny/falcon-tiny-TQ2_0.gguf",
        ] {
            let (eager, lazy) = (
                Model::load(&data(rel)).unwrap(),
                Model::load_lazy(&data(rel)).unwrap(),
            );
            // Every matrix holds codes (mapped or on the heap); the lazy load none.
            assert!(eager.weights.linears().all(|l| !l.data.is_empty()), "{rel}");
            assert_eq!(lazy.weights.ternary_bytes_held(), 0, "{rel}");
            let mut s = lazy.new_session(8);
            let e = lazy.forward(&mut s, &[1], false).unwrap_err().to_string();
            assert!(e.contains("conversion only"), "{rel}: {e}");
            let mut warnings = lazy.warnings.clone();
            for (a, b) in eager.weights.linears().zip(lazy.weights.linears()) {
                assert!(!a.is_lazy(), "{rel}: {}", a.name);
                assert!(b.is_lazy() && b.data.is_empty() && b.beta.is_nan());
                let d = b.source.as_ref().unwrap().decode(&mut warnings).unwrap();
                assert!(!d.is_lazy());
                assert_eq!(
                    (&d.name, d.rows, d.cols, d.beta.to_bits(), &d.stored_as),
                    (&a.name, a.rows, a.cols, a.beta.to_bits(), &a.stored_as),
                    "{rel}"
                );
                assert_eq!(d.data.is_mapped(), a.data.is_mapped(), "{rel}: {}", a.name);
                assert!(*d.data == *a.data, "{rel}: {}: codes differ", a.name);
            }
            assert_eq!(warnings, eager.warnings, "{rel}");
        }
    }

    /// Checks that need no decoding (shapes, types) still fail a lazy load.
    #[test]
    fn lazy_load_still_checks_shapes() {
        let tmp = tempfile::tempdir().unwrap();
        let src = data("tiny/gguf/tiny-tq2_0.gguf");
        let g = bitnet_formats::GgufFile::open(&src).unwrap();
        let t = g.tensor("blk.0.ffn_down.weight").unwrap();
        // Swap the two dims of one matrix in the header: the dims are stored as u64s right
        // after the name, so find them by value.
        let bytes = std::fs::read(&src).unwrap();
        let (c, r) = (t.dims[0], t.dims[1]);
        assert_ne!(c, r);
        let mut pat = Vec::new();
        pat.extend_from_slice(&(t.name.len() as u64).to_le_bytes());
        pat.extend_from_slice(t.name.as_bytes());
        pat.extend_from_slice(&2u32.to_le_bytes());
        let at = bytes
            .windows(pat.len())
            .position(|w| w == pat.as_slice())
            .unwrap()
            + pat.len();
        let mut bad = bytes.clone();
        bad[at..at + 8].copy_from_slice(&r.to_le_bytes());
        bad[at + 8..at + 16].copy_from_slice(&c.to_le_bytes());
        let path = tmp.path().join("bad.gguf");
        std::fs::write(&path, bad).unwrap();
        let e = Model::load_lazy(&path).unwrap_err().to_string();
        assert!(
            e.contains("blk.0.ffn_down.weight") && e.contains("shape"),
            "{e}"
        );
    }
}
