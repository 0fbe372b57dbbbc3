//! The output head in ggml's Q6_K blocks: 256 weights in 210 bytes (`ql[128]` low nibbles,
//! `qh[64]` high 2-bit pairs, 16 int8 sub-block scales, one f16 `d`), weight
//! `w = d * sc[p / 16] * (q - 32)` with a 6-bit code `q`. Used for heads stored that way in a
//! file (llama.cpp's quantizer writes them) and for `--head-type q6_k` (requantized at load):
//! 0.82 bytes per weight, against 1.125 for the Q8_0 head and 2 for F16.
//!
//! The head input is quantized per 256 values to int8 with one f32 scale (ggml's Q8_K idea),
//! plus the sum of every 16 values, which carries the `- 32` offset: per block
//! `d_w * d_x * (sum_j sc_j * sum_i q_i x_i - 32 * sum_j sc_j * bsum_j)`, exact in i32.

use crate::float::has_f16c;
use crate::{pool, q8::round_to_i8, Isa, SyncPtr};
use std::cell::RefCell;

/// Weights per block.
pub const QK_K: usize = 256;
/// Bytes per block.
pub const BLOCK_BYTES: usize = 210;

/// Head inputs quantized per 256-block: int8 values, one scale per block and the sum of
/// each 16 values (`bsums[16 * block + j]`).
#[derive(Default)]
pub struct InputQ8K {
    pub qs: Vec<i8>,
    pub d: Vec<f32>,
    pub bsums: Vec<i16>,
}

impl InputQ8K {
    /// Quantize `n_tok` rows of `cols` values (`cols` a multiple of 256): `d = amax / 127`,
    /// values rounded half away from zero.
    pub fn quantize(&mut self, x: &[f32], n_tok: usize, cols: usize) {
        assert!(cols.is_multiple_of(QK_K) && x.len() >= n_tok * cols);
        let nb = n_tok * cols / QK_K;
        self.qs.resize(nb * QK_K, 0);
        self.d.resize(nb, 0.0);
        self.bsums.resize(nb * 16, 0);
        for (b, xb) in x[..n_tok * cols].chunks_exact(QK_K).enumerate() {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let q = &mut self.qs[b * QK_K..(b + 1) * QK_K];
            for (qi, &v) in q.iter_mut().zip(xb) {
                *qi = round_to_i8(v * id);
            }
            for (j, s) in self.bsums[16 * b..16 * (b + 1)].iter_mut().enumerate() {
                *s = q[16 * j..16 * (j + 1)].iter().map(|&v| v as i16).sum();
            }
            self.d[b] = d;
        }
    }
}

/// `out[t * rows + r] = row_r . x_t` for a `rows x cols` Q6_K matrix (`cols` a multiple of
/// 256) and `n_tok` inputs of `cols` values. Rows are split over the worker pool and read one
/// after another, one sequential stream (four rows side by side ran at 6 GB/s: each row's
/// 2 KB is too short a stream for the hardware prefetcher); every token passes over a row
/// while it is in L1.
pub fn matmul(
    isa: Isa,
    data: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    n_tok: usize,
    out: &mut [f32],
) {
    assert!(cols.is_multiple_of(QK_K), "Q6_K rows are whole 256-blocks");
    let (nb, row_bytes) = (cols / QK_K, cols / QK_K * BLOCK_BYTES);
    assert!(data.len() >= rows * row_bytes);
    assert!(x.len() >= n_tok * cols && out.len() >= n_tok * rows);
    thread_local! {
        static XQ: RefCell<InputQ8K> = RefCell::new(InputQ8K::default());
    }
    let avx2 = isa != Isa::Scalar && has_f16c();
    XQ.with(|buf| {
        let mut buf = buf.borrow_mut();
        buf.quantize(x, n_tok, cols);
        let xq = &*buf;
        let out_ptr = SyncPtr(out.as_mut_ptr());
        pool::for_ranges(rows, 1, 256, |range| {
            let p = out_ptr.get();
            for r in range {
                let row = &data[r * row_bytes..(r + 1) * row_bytes];
                let mut t = 0;
                while t < n_tok {
                    // Up to four tokens per pass over the row: its codes are unpacked once.
                    let n = if avx2 {
                        [4, 2, 1].into_iter().find(|&n| t + n <= n_tok).unwrap()
                    } else {
                        1
                    };
                    let mut v = [0f32; 4];
                    if avx2 {
                        #[cfg(target_arch = "x86_64")]
                        {
                            let x = |i: usize| {
                                let u = t + i;
                                (
                                    xq.qs[u * cols..].as_ptr(),
                                    xq.d[u * nb..].as_ptr(),
                                    xq.bsums[16 * u * nb..].as_ptr(),
                                )
                            };
                            // SAFETY: a row of nb blocks; each x of nb 256-blocks, scales and
                            // sums (tokens t..t + n exist).
                            unsafe {
                                match n {
                                    4 => {
                                        v = dot_avx2::<4>(row.as_ptr(), std::array::from_fn(x), nb)
                                    }
                                    2 => v[..2].copy_from_slice(&dot_avx2::<2>(
                                        row.as_ptr(),
                                        std::array::from_fn(x),
                                        nb,
                                    )),
                                    _ => v[0] = dot_avx2::<1>(row.as_ptr(), [x(0)], nb)[0],
                                }
                            }
                        }
                    } else {
                        v[0] = dot_scalar(
                            row,
                            &xq.qs[t * cols..(t + 1) * cols],
                            &xq.d[t * nb..(t + 1) * nb],
                        );
                    }
                    for (i, &vi) in v.iter().enumerate().take(n) {
                        // SAFETY: (t + i, r) pairs are disjoint between parts.
                        unsafe { *p.add((t + i) * rows + r) = vi };
                    }
                    t += n;
                }
            }
        });
    });
}

/// The 6-bit code (0..=63) of weight `p` in a block: its low nibble is in `ql`, its high two
/// bits in `qh`, interleaved as ggml's `dequantize_row_q6_K` reads them.
#[inline]
fn code(blk: &[u8], p: usize) -> i32 {
    let (half, k, l) = (p / 128, p % 128 / 32, p % 32);
    let lo = (blk[64 * half + 32 * (k & 1) + l] >> (4 * (k >> 1))) & 0xF;
    let hi = (blk[128 + 32 * half + l] >> (2 * k)) & 3;
    (lo | hi << 4) as i32
}

/// Scalar reference: one row against one input, block by block with exact integer sums.
pub fn dot_scalar(row: &[u8], xq: &[i8], xd: &[f32]) -> f32 {
    let mut sum = 0f32;
    for (b, blk) in row.chunks_exact(BLOCK_BYTES).enumerate() {
        let x = &xq[b * QK_K..(b + 1) * QK_K];
        let d = half::f16::from_le_bytes([blk[208], blk[209]]).to_f32();
        let mut isum = 0i32;
        for j in 0..16 {
            let g: i32 = (16 * j..16 * (j + 1))
                .map(|p| (code(blk, p) - 32) * x[p] as i32)
                .sum();
            isum += blk[192 + j] as i8 as i32 * g;
        }
        sum += d * xd[b] * isum as f32;
    }
    sum
}

/// How many blocks ahead of the current one each row is prefetched.
#[cfg(target_arch = "x86_64")]
const PREFETCH_BLOCKS: usize = 2;

/// One row, `N` inputs (`(qs, d, bsums)` pointers). Per 128 weights, the four 32-code vectors
/// are rebuilt once for all `N` tokens from two `ql` loads and one `qh` load (nibble masks and
/// shifts; the 16-bit shifts leak bits between bytes only where the masks clear them), then
/// multiplied with each token's values by `maddubs` (codes <= 63 and |x| <= 127 keep each
/// pair sum inside i16) and weighted by the sub-block scales with `madd`: a shuffle spreads
/// scale `2k` over the low and `2k + 1` over the high 128 bits, the two 16-code groups of
/// vector `k`. The offset term starts each block's i32 sum; one FMA per block and token
/// applies `d_w * d_x`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2<const N: usize>(
    w: *const u8,
    x: [(*const i8, *const f32, *const i16); N],
    nb: usize,
) -> [f32; N] {
    use std::arch::x86_64::*;
    let m4 = _mm256_set1_epi8(0x0F);
    let m30 = _mm256_set1_epi8(0x30);
    // Byte pairs of i16 lane 2k (low 128 bits) and 2k + 1 (high 128 bits), repeated.
    let mask = |k: i8| {
        let (a, b) = (4 * k, 4 * k + 2);
        _mm256_setr_epi8(
            a,
            a + 1,
            a,
            a + 1,
            a,
            a + 1,
            a,
            a + 1,
            a,
            a + 1,
            a,
            a + 1,
            a,
            a + 1,
            a,
            a + 1,
            b,
            b + 1,
            b,
            b + 1,
            b,
            b + 1,
            b,
            b + 1,
            b,
            b + 1,
            b,
            b + 1,
            b,
            b + 1,
            b,
            b + 1,
        )
    };
    let masks = [mask(0), mask(1), mask(2), mask(3)];
    let mut acc = [_mm256_setzero_ps(); N];
    for b in 0..nb {
        let blk = w.add(BLOCK_BYTES * b);
        let ahead = blk.wrapping_add(PREFETCH_BLOCKS * BLOCK_BYTES) as *const i8;
        for line in 0..4 {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line));
        }
        let sc = _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(192) as *const __m128i));
        let mut isum: [__m256i; N] = std::array::from_fn(|t| {
            let bs = _mm256_loadu_si256(x[t].2.add(16 * b) as *const __m256i);
            let offset = _mm256_slli_epi32(_mm256_madd_epi16(sc, bs), 5);
            _mm256_sub_epi32(_mm256_setzero_si256(), offset)
        });
        for h in 0..2 {
            let ql0 = _mm256_loadu_si256(blk.add(64 * h) as *const __m256i);
            let ql1 = _mm256_loadu_si256(blk.add(64 * h + 32) as *const __m256i);
            let qh = _mm256_loadu_si256(blk.add(128 + 32 * h) as *const __m256i);
            let sc8 = _mm256_broadcastsi128_si256(_mm_cvtepi8_epi16(_mm_loadl_epi64(
                blk.add(192 + 8 * h) as *const __m128i,
            )));
            let q = [
                _mm256_or_si256(
                    _mm256_and_si256(ql0, m4),
                    _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(ql1, m4),
                    _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4),
                    _mm256_and_si256(qh, m30),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                    _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30),
                ),
            ];
            let s: [__m256i; 4] = std::array::from_fn(|k| _mm256_shuffle_epi8(sc8, masks[k]));
            for (t, it) in isum.iter_mut().enumerate() {
                let xt = x[t].0.add(QK_K * b + 128 * h);
                for k in 0..4 {
                    let xv = _mm256_loadu_si256(xt.add(32 * k) as *const __m256i);
                    let p = _mm256_maddubs_epi16(q[k], xv);
                    *it = _mm256_add_epi32(*it, _mm256_madd_epi16(p, s[k]));
                }
            }
        }
        let d = (blk.add(208) as *const u16).read_unaligned();
        let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(d as i32)));
        for t in 0..N {
            let scale = _mm256_set1_ps(dw * *x[t].1.add(b));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), scale, acc[t]);
        }
    }
    std::array::from_fn(|t| {
        let a = acc[t];
        let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Lcg;

    /// A random but valid matrix: any ql/qh/scale bytes are valid codes; `d` is a small
    /// positive or negative f16 (never NaN or infinite).
    fn random_rows(rng: &mut Lcg, rows: usize, cols: usize) -> Vec<u8> {
        let mut data = vec![0u8; rows * cols / QK_K * BLOCK_BYTES];
        for blk in data.chunks_exact_mut(BLOCK_BYTES) {
            for v in &mut blk[..208] {
                *v = rng.next() as u8;
            }
            let d = half::f16::from_f32(rng.f32() * 0.01);
            blk[208..].copy_from_slice(&d.to_le_bytes());
        }
        data
    }

    /// Weight p of a block, decoded the way ggml's `dequantize_row_q6_K` spells it out.
    fn ggml_weight(blk: &[u8], p: usize) -> f32 {
        let (half, r) = (p / 128, p % 128);
        let (ql, qh, sc) = (
            &blk[64 * half..],
            &blk[128 + 32 * half..],
            &blk[192 + 8 * half..],
        );
        let (l, is) = (r % 32, r % 32 / 16);
        let d = half::f16::from_le_bytes([blk[208], blk[209]]).to_f32();
        let q = match r / 32 {
            0 => (ql[l] & 0xF) | ((qh[l] & 3) << 4),
            1 => (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4),
            2 => (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4),
            _ => (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4),
        } as i32
            - 32;
        d * sc[is + 2 * (r / 32)] as i8 as f32 * q as f32
    }

    /// The scalar twin against the f64 product of ggml's decoded weights and the dequantized
    /// input, and every ISA against the scalar twin, on odd row counts, one to eleven blocks,
    /// and 1 to 8 tokens (the AVX2 kernel's passes of 4, 2 and 1 tokens). Extreme codes and
    /// scales (all bits set: code 63, scale -1; all clear: code 0) are included.
    #[test]
    fn q6k_matmul_kernels_agree_with_the_scalar_twin() {
        let mut rng = Lcg(23);
        for (rows, cols, n_tok) in [
            (1, 256, 1),
            (5, 512, 2),
            (13, 2816, 3),
            (8, 256, 5),
            (7, 768, 1),
            (3, 512, 7),
            (2, 256, 8),
        ] {
            let mut data = random_rows(&mut rng, rows, cols);
            let blk = &mut data[..BLOCK_BYTES];
            blk[..192].fill(0xFF);
            blk[192..208].fill(0x80); // scale -128
            let last = data.len() - BLOCK_BYTES;
            let blk = &mut data[last..];
            blk[..192].fill(0);
            let x: Vec<f32> = (0..n_tok * cols).map(|_| rng.f32()).collect();
            let mut reference = vec![0f32; n_tok * rows];
            matmul(Isa::Scalar, &data, rows, cols, &x, n_tok, &mut reference);
            let row_bytes = cols / QK_K * BLOCK_BYTES;
            let mut xq = InputQ8K::default();
            xq.quantize(&x, n_tok, cols);
            let mut bounds = vec![0f64; n_tok * rows];
            for t in 0..n_tok {
                for r in 0..rows {
                    let row = &data[r * row_bytes..(r + 1) * row_bytes];
                    let (mut exact, mut bound) = (0f64, 0f64);
                    for c in 0..cols {
                        let wv = ggml_weight(&row[c / QK_K * BLOCK_BYTES..], c % QK_K) as f64;
                        let i = t * cols + c;
                        let xv = xq.qs[i] as f64 * xq.d[i / QK_K] as f64;
                        exact += wv * xv;
                        bound += (wv * xv).abs();
                    }
                    // Against the dequantized input in f64: only f32 rounding remains.
                    let got = reference[t * rows + r] as f64;
                    assert!(
                        (got - exact).abs() <= 1e-5 * bound,
                        "row {r} token {t}: {got} vs {exact}"
                    );
                    bounds[t * rows + r] = bound;
                }
            }
            for isa in Isa::all_available() {
                let mut got = vec![0f32; n_tok * rows];
                matmul(isa, &data, rows, cols, &x, n_tok, &mut got);
                // Only the float sums' order differs (exact i32 block sums either way).
                for ((g, w), b) in got.iter().zip(&reference).zip(&bounds) {
                    assert!(
                        ((g - w).abs() as f64) <= 1e-5 * b,
                        "{}: {g} vs {w}",
                        isa.name()
                    );
                }
            }
        }
    }

    #[test]
    fn input_quantization_keeps_block_sums() {
        let mut rng = Lcg(5);
        let x: Vec<f32> = (0..512).map(|_| rng.f32() * 3.0).collect();
        let mut q = InputQ8K::default();
        q.quantize(&x, 1, 512);
        for b in 0..2 {
            for j in 0..16 {
                let s: i32 = q.qs[b * 256 + 16 * j..][..16]
                    .iter()
                    .map(|&v| v as i32)
                    .sum();
                assert_eq!(s, q.bsums[16 * b + j] as i32);
            }
            for i in 0..256 {
                let (v, d) = (x[b * 256 + i], q.d[b]);
                assert!((q.qs[b * 256 + i] as f32 * d - v).abs() <= d / 2.0 * 1.0001);
            }
        }
        // An all-zero block gets scale 0 and zero codes, not NaN.
        q.quantize(&[0.0; 256], 1, 256);
        assert_eq!(q.d[0], 0.0);
        assert!(q.qs.iter().all(|&v| v == 0));
    }
}
