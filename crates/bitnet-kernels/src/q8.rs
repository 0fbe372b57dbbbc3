//! The output head requantized to 8 bits (ggml's Q8_0 scheme, with f32 block scales): each row
//! is cut into blocks of 32 values, each stored as `d = max|x| / 127` and `round(x / d)` in
//! int8. The head input (the final-norm output) is quantized the same way per token, and the
//! product is computed as ggml's Q8_0 x Q8_0 dot: `sum_b d_w[b] * d_x[b] * sum_i w_i x_i`,
//! with exact integer block sums. It reads about half the bytes of an F16 head per token.

use crate::float::{has_f16c, par_row_tokens};
use crate::{pool, Isa, SyncPtr};
use std::cell::RefCell;

/// Values per block.
pub const QK: usize = 32;

/// Quantize one block (`x.len() <= 32`, missing values are zero) into `q`; returns `d`.
/// ggml's reference rounding: `d = amax / 127`, `q = round(x * (1 / d))`, halves away from 0.
pub fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
    // A whole block of 32 in a fixed-size array, so the loops below vectorise.
    let mut b = [0f32; QK];
    b[..x.len()].copy_from_slice(x);
    let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    for (qi, &v) in q[..QK].iter_mut().zip(&b) {
        *qi = round_to_i8(v * id);
    }
    d
}

/// `x.round().clamp(-127.0, 127.0) as i8` (halves away from zero, NaN to 0) in a form that
/// vectorises: no libm `round` call (15% of requantizing the head), no saturating casts.
/// Clamping first changes nothing (the bounds are integers), and then `x - trunc(x)` is exact,
/// so comparing it with 0.5 decides the rounding exactly.
#[inline]
pub(crate) fn round_to_i8(x: f32) -> i8 {
    let x = if x.is_nan() {
        0.0
    } else {
        x.clamp(-127.0, 127.0)
    };
    let t = x as i32; // truncates; in range
    let f = x - t as f32;
    (t + (f >= 0.5) as i32 - (f <= -0.5) as i32) as i8
}

/// A row-major matrix in 8-bit blocks: row r is `qs[r * cp..(r + 1) * cp]` (cp = cols rounded
/// up to 32, padding zero) with block scales `d[r * cp / 32..]`.
pub struct Q8Matrix {
    pub rows: usize,
    pub cols: usize,
    cp: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
}

impl Q8Matrix {
    /// Quantize `rows` rows produced by `read_row(r, buf)` (`cols` values), on the pool.
    pub fn from_rows<F>(rows: usize, cols: usize, read_row: F) -> Q8Matrix
    where
        F: Fn(usize, &mut [f32]) + Sync,
    {
        let cp = cols.div_ceil(QK) * QK;
        let mut qs = vec![0i8; rows * cp];
        let mut d = vec![0f32; rows * cp / QK];
        let (qp, dp) = (SyncPtr(qs.as_mut_ptr()), SyncPtr(d.as_mut_ptr()));
        pool::for_ranges(rows, 1, 256, |range| {
            let mut buf = vec![0f32; cols];
            for r in range {
                read_row(r, &mut buf);
                // SAFETY: each part writes only its own rows; the vectors outlive the job.
                let (q, dr) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(qp.get().add(r * cp), cp),
                        std::slice::from_raw_parts_mut(dp.get().add(r * cp / QK), cp / QK),
                    )
                };
                for (b, db) in dr.iter_mut().enumerate() {
                    let x = &buf[(b * QK).min(cols)..((b + 1) * QK).min(cols)];
                    *db = quantize_block(x, &mut q[b * QK..(b + 1) * QK]);
                }
            }
        });
        Q8Matrix {
            rows,
            cols,
            cp,
            qs,
            d,
        }
    }

    /// Memory held, in bytes.
    pub fn bytes(&self) -> usize {
        self.qs.len() + 4 * self.d.len()
    }

    /// Decode row r.
    pub fn row(&self, r: usize, out: &mut [f32]) {
        let q = &self.qs[r * self.cp..];
        let d = &self.d[r * self.cp / QK..];
        for (i, o) in out.iter_mut().enumerate().take(self.cols) {
            *o = q[i] as f32 * d[i / QK];
        }
    }

    /// `out[t * rows + r] = row_r . x_t` for `n_tok` inputs of `cols` values, with x quantized
    /// per 32-block. Rows are split over the worker pool and read one after another (one
    /// sequential stream; four rows side by side were 10% slower), every token passing over a
    /// row while it is in L1.
    pub fn matmul(&self, isa: Isa, x: &[f32], n_tok: usize, out: &mut [f32]) {
        let (rows, cols, cp, nb) = (self.rows, self.cols, self.cp, self.cp / QK);
        assert!(x.len() >= n_tok * cols && out.len() >= n_tok * rows);
        let avx2 = isa != Isa::Scalar && has_f16c();
        with_quantized_input(x, n_tok, cols, |input| {
            par_row_tokens(rows, n_tok, out, |r, t| {
                let (w, wd) = (
                    &self.qs[r * cp..(r + 1) * cp],
                    &self.d[r * nb..(r + 1) * nb],
                );
                let (xt, dt, xsum) = input.token(t);
                #[cfg(target_arch = "x86_64")]
                if isa == Isa::Avx512Vnni {
                    // SAFETY: a row of nb blocks and scales; the input padded as dot_q8 needs.
                    return unsafe { avx512::dot_q8(w.as_ptr(), wd.as_ptr(), xt, dt, xsum, nb) };
                }
                if avx2 {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: a row of nb blocks and scales; x the same.
                    return unsafe {
                        dot_avx2(w.as_ptr(), wd.as_ptr(), xt.as_ptr(), dt.as_ptr(), nb)
                    };
                }
                dot_scalar(w, wd, &xt[..cp], &dt[..nb])
            })
        });
    }
}

/// Blocks per group of the AVX-512 kernels: one 512-bit vector of f32 scales.
const GROUP: usize = 16;

/// Inputs quantized per 32-block for the product kernels. Each token's part is padded with
/// zeros to whole groups of 16 blocks, so the AVX-512 kernels load whole vectors past a row's
/// last block without reading another token's values.
struct QuantInput<'a> {
    /// int8 codes, `nbp * 32` per token.
    xq: &'a [i8],
    /// Block scales, `nbp` per token.
    xd: &'a [f32],
    /// For the AVX-512 kernels, `-128 *` the sum of each block's codes: it cancels what
    /// `vpdpbusd` over the weights offset by +128 (unsigned) adds to the block's sum.
    xsum: &'a [i32],
    /// Blocks per token, padded to whole groups.
    nbp: usize,
}

impl QuantInput<'_> {
    fn token(&self, t: usize) -> (&[i8], &[f32], &[i32]) {
        let n = self.nbp;
        (
            &self.xq[t * n * QK..(t + 1) * n * QK],
            &self.xd[t * n..(t + 1) * n],
            &self.xsum[t * n..(t + 1) * n],
        )
    }
}

/// Quantize `n_tok` inputs of `cols` values per 32-block (padded as [`QuantInput`] says) into a
/// per-thread buffer and run `f` on it.
fn with_quantized_input<R>(
    x: &[f32],
    n_tok: usize,
    cols: usize,
    f: impl FnOnce(&QuantInput) -> R,
) -> R {
    type Buffers = (Vec<i8>, Vec<f32>, Vec<i32>);
    thread_local! {
        static XQ: RefCell<Buffers> = const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
    }
    let nb = cols.div_ceil(QK);
    let nbp = nb.div_ceil(GROUP) * GROUP;
    XQ.with(|buf| {
        let mut buf = buf.borrow_mut();
        let (xq, xd, xsum) = &mut *buf;
        // Padding must be zero: clear what an earlier call left.
        xq.clear();
        xq.resize(n_tok * nbp * QK, 0);
        xd.clear();
        xd.resize(n_tok * nbp, 0.0);
        xsum.clear();
        xsum.resize(n_tok * nbp, 0);
        for t in 0..n_tok {
            let xt = &x[t * cols..(t + 1) * cols];
            for b in 0..nb {
                let blk = &xt[(b * QK).min(cols)..((b + 1) * QK).min(cols)];
                let q = &mut xq[(t * nbp + b) * QK..][..QK];
                xd[t * nbp + b] = quantize_block(blk, q);
                xsum[t * nbp + b] = -128 * q.iter().map(|&v| v as i32).sum::<i32>();
            }
        }
        f(&QuantInput { xq, xd, xsum, nbp })
    })
}

/// Bytes of one block of ggml's own Q8_0, as stored in GGUF files: an f16 scale, then 32 int8.
pub const GGML_BLOCK_BYTES: usize = 34;

/// `out[t * rows + r] = row_r . x_t` for a `rows x cols` matrix in ggml's Q8_0 blocks as
/// stored in a file (`cols` a multiple of 32; bitnet.cpp and llama.cpp write Q8_0 embeddings),
/// used from the memory map without a copy. Same product as [`Q8Matrix::matmul`]; rows are
/// read one after another, one sequential stream.
pub fn matmul_ggml(
    isa: Isa,
    data: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    n_tok: usize,
    out: &mut [f32],
) {
    assert!(cols.is_multiple_of(QK), "Q8_0 rows are whole 32-blocks");
    let (nb, row_bytes) = (cols / QK, cols / QK * GGML_BLOCK_BYTES);
    assert!(data.len() >= rows * row_bytes);
    assert!(x.len() >= n_tok * cols && out.len() >= n_tok * rows);
    let avx2 = isa != Isa::Scalar && has_f16c();
    with_quantized_input(x, n_tok, cols, |input| {
        par_row_tokens(rows, n_tok, out, |r, t| {
            let row = &data[r * row_bytes..(r + 1) * row_bytes];
            let (xt, dt, xsum) = input.token(t);
            #[cfg(target_arch = "x86_64")]
            if isa == Isa::Avx512Vnni {
                // SAFETY: a row of nb blocks; the input padded as dot_ggml needs.
                return unsafe { avx512::dot_ggml(row.as_ptr(), xt, dt, xsum, nb) };
            }
            if avx2 {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: a row of nb blocks; x of nb blocks and scales.
                return unsafe { dot_ggml_avx2(row.as_ptr(), xt.as_ptr(), dt.as_ptr(), nb) };
            }
            dot_ggml_scalar(row, &xt[..cols], &dt[..nb])
        })
    })
}

/// Scalar reference for one row of ggml Q8_0 blocks against one quantized input.
pub fn dot_ggml_scalar(row: &[u8], xq: &[i8], xd: &[f32]) -> f32 {
    row.chunks_exact(GGML_BLOCK_BYTES)
        .enumerate()
        .map(|(b, blk)| {
            let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            let s: i32 = (0..QK)
                .map(|i| blk[2 + i] as i8 as i32 * xq[b * QK + i] as i32)
                .sum();
            d * xd[b] * s as f32
        })
        .sum()
}

/// One row of ggml Q8_0 blocks, one input: the f16 scale of each block converted by F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_ggml_avx2(w: *const u8, xq: *const i8, xd: *const f32, nb: usize) -> f32 {
    use std::arch::x86_64::*;
    let blk = |b: usize| w.add(GGML_BLOCK_BYTES * b);
    dot_blocks_avx2(
        nb,
        xq,
        |b| blk(b).add(2) as *const i8,
        |b| {
            let d = (blk(b) as *const u16).read_unaligned() as i32;
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(d))) * *xd.add(b)
        },
    )
}

/// Scalar reference: `sum_b d_w[b] * d_x[b] * sum_i w_i x_i` (integer block sums).
pub fn dot_scalar(w: &[i8], wd: &[f32], x: &[i8], xd: &[f32]) -> f32 {
    wd.iter()
        .zip(xd)
        .enumerate()
        .map(|(b, (&dw, &dx))| {
            let s: i32 = (0..QK)
                .map(|i| w[b * QK + i] as i32 * x[b * QK + i] as i32)
                .sum();
            dw * dx * s as f32
        })
        .sum()
}

/// The AVX2 product of one row and one input, over blocks `b` whose weights start at
/// `w(b)` and whose combined scale is `scale(b)`: per 32-block `maddubs(|w|, sign(x, w))`
/// (|w| <= 128, |x| <= 127, so the pair sums stay inside i16), widened with `madd`, converted
/// to f32 and scaled with one FMA. Four accumulators: with one, each block waited for the
/// previous FMA.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_blocks_avx2(
    nb: usize,
    xq: *const i8,
    w: impl Fn(usize) -> *const i8,
    scale: impl Fn(usize) -> f32,
) -> f32 {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let block = |b: usize, acc: __m256| {
        let wv = _mm256_loadu_si256(w(b) as *const __m256i);
        let xv = _mm256_loadu_si256(xq.add(QK * b) as *const __m256i);
        let p = _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
        let s = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
        _mm256_fmadd_ps(s, _mm256_set1_ps(scale(b)), acc)
    };
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut b = 0;
    while b + 4 <= nb {
        for (i, a) in acc.iter_mut().enumerate() {
            *a = block(b + i, *a);
        }
        b += 4;
    }
    while b < nb {
        acc[0] = block(b, acc[0]);
        b += 1;
    }
    let acc = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// One row of a [`Q8Matrix`] (int8 values and f32 scales apart), one input.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(w: *const i8, wd: *const f32, xq: *const i8, xd: *const f32, nb: usize) -> f32 {
    dot_blocks_avx2(nb, xq, |b| w.add(QK * b), |b| *wd.add(b) * *xd.add(b))
}

/// The AVX-512 VNNI products of one row and one quantized input ([`QuantInput::token`]), for
/// a [`Q8Matrix`] row (`dot_q8`) and a row of ggml's stored blocks (`dot_ggml`). Written once
/// and instantiated with the real intrinsics and, in tests, with the emulated ones.
///
/// Two blocks per step: `vpdpbusd` multiplies the weights flipped to unsigned (`w ^ 0x80` =
/// `w + 128`) by the signed input codes, starting from `-128 * sum(x)` of each block in the
/// block's first lane, so the block's eight i32 lanes add up to its exact integer sum. The
/// lanes (each below 2^20 in magnitude, so exact in f32) are converted to f32 and multiplied
/// by their block's combined scale; the f32 sums round values up to `128 * |sum(x)|` instead
/// of the block sum alone, an error around 1e-6 of a logit, far below that of the 8-bit
/// quantization itself. Both per-block values are picked out of the group's 16 by one
/// permute index. Scales past the row's last block load as zero, and the
/// input is zero there, so a last odd block needs no separate path.
macro_rules! avx512_q8 {
    ($(#[$attr:meta])*) => {
        use super::{GROUP, GGML_BLOCK_BYTES, QK};

        /// The permute indices of the k-th pair of a group: lanes 0-7 take the scale of block
        /// 2k, lanes 8-15 that of block 2k + 1.
        static PAIR_SCALE: [[i32; 16]; GROUP / 2] = {
            let mut t = [[0; 16]; GROUP / 2];
            let mut k = 0;
            while k < GROUP / 2 {
                let mut l = 0;
                while l < 16 {
                    t[k][l] = (2 * k + l / 8) as i32;
                    l += 1;
                }
                k += 1;
            }
            t
        };

        /// The shared loop: `pair(b, both)` loads blocks b and b + 1 (only b, upper half zero,
        /// when `both` is false); `scales(g, n)` the combined scales of the n (1 to 16) blocks
        /// of group g, zero in the lanes past n.
        #[inline(always)]
        unsafe fn dot_pairs(
            nb: usize,
            xq: &[i8],
            xsum: &[i32],
            pair: impl Fn(usize, bool) -> __m512i,
            scales: impl Fn(usize, usize) -> __m512,
        ) -> f32 {
            debug_assert!(xq.len() >= nb.div_ceil(GROUP) * GROUP * QK);
            debug_assert!(xsum.len() * QK >= xq.len());
            let flip = _mm512_set1_epi8(-128);
            // The first lane of each block (0 and 8) takes the block's -128 * sum(x).
            const FIRST_LANES: u16 = 0x0101;
            let step = |b: usize, both: bool, s: __m512, c: __m512i, k: usize, acc: __m512| {
                let w = _mm512_xor_si512(pair(b, both), flip);
                let idx = _mm512_loadu_si512(PAIR_SCALE[k].as_ptr() as *const _);
                let init = _mm512_maskz_permutexvar_epi32(FIRST_LANES, idx, c);
                let x = _mm512_loadu_si512(xq.as_ptr().add(b * QK) as *const _);
                let sums = _mm512_dpbusd_epi32(init, w, x);
                _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_permutexvar_ps(idx, s), acc)
            };
            let corrections = |g: usize| _mm512_loadu_si512(xsum.as_ptr().add(g * GROUP) as *const _);
            // Whole groups with the pair index known at compile time, so the four accumulators
            // stay in registers; then the last, partial group.
            let mut acc = [_mm512_setzero_ps(); 4];
            let whole = nb / GROUP;
            for g in 0..whole {
                let (s, c) = (scales(g, GROUP), corrections(g));
                for k in 0..GROUP / 2 {
                    acc[k % 4] = step(g * GROUP + 2 * k, true, s, c, k, acc[k % 4]);
                }
            }
            let n = nb - whole * GROUP;
            if n > 0 {
                let (s, c) = (scales(whole, n), corrections(whole));
                for k in 0..n.div_ceil(2) {
                    acc[0] = step(whole * GROUP + 2 * k, 2 * k + 1 < n, s, c, k, acc[0]);
                }
            }
            let acc = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
            _mm512_reduce_add_ps(acc)
        }

        /// `n` lanes set.
        #[inline(always)]
        fn lanes(n: usize) -> u16 {
            (((1u32) << n) - 1) as u16
        }

        /// One [`super::Q8Matrix`] row (`nb` blocks at `w`, scales at `wd`).
        $(#[$attr])*
        pub unsafe fn dot_q8(w: *const i8, wd: *const f32, xq: &[i8], xd: &[f32], xsum: &[i32], nb: usize) -> f32 {
            dot_pairs(
                nb,
                xq,
                xsum,
                |b, both| {
                    if both {
                        _mm512_loadu_si512(w.add(b * QK) as *const _)
                    } else {
                        _mm512_zextsi256_si512(_mm256_loadu_si256(w.add(b * QK) as *const __m256i))
                    }
                },
                |g, n| {
                    let dw = _mm512_maskz_loadu_ps(lanes(n), wd.add(g * GROUP));
                    _mm512_mul_ps(dw, _mm512_loadu_ps(xd.as_ptr().add(g * GROUP)))
                },
            )
        }

        /// One row of ggml's stored Q8_0 blocks (34 bytes: an f16 scale, 32 codes).
        $(#[$attr])*
        pub unsafe fn dot_ggml(row: *const u8, xq: &[i8], xd: &[f32], xsum: &[i32], nb: usize) -> f32 {
            let codes = |b: usize| _mm256_loadu_si256(row.add(b * GGML_BLOCK_BYTES + 2) as *const __m256i);
            dot_pairs(
                nb,
                xq,
                xsum,
                |b, both| {
                    let lo = _mm512_zextsi256_si512(codes(b));
                    if both {
                        _mm512_inserti64x4::<1>(lo, codes(b + 1))
                    } else {
                        lo
                    }
                },
                |g, n| {
                    let mut d = [0u16; GROUP];
                    for (i, v) in d.iter_mut().enumerate().take(n) {
                        *v = (row.add((g * GROUP + i) * GGML_BLOCK_BYTES) as *const u16).read_unaligned();
                    }
                    let dw = _mm512_cvtph_ps(_mm256_loadu_si256(d.as_ptr() as *const __m256i));
                    _mm512_mul_ps(dw, _mm512_loadu_ps(xd.as_ptr().add(g * GROUP)))
                },
            )
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    avx512_q8!(#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]);
}

/// The same kernels over the emulated intrinsics (tests only).
#[cfg(test)]
mod avx512_emu {
    use crate::emu512::*;
    avx512_q8!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Lcg;

    /// Equal to the plain `round`, clamp and cast on every float near a half in -128..=128, a
    /// dense sweep, out-of-range values, infinities and NaN.
    #[test]
    fn round_to_i8_is_round_clamp_cast() {
        let mut xs: Vec<f32> = (-128 * 2..=128 * 2).map(|i| i as f32 / 2.0).collect();
        for &h in xs.clone().iter() {
            xs.push(f32::from_bits(h.to_bits() + 1));
            xs.push(f32::from_bits(h.to_bits().wrapping_sub(1)));
        }
        xs.extend((0..1_000_000).map(|i| -128.0 + i as f32 * 256.0 / 1_000_000.0));
        xs.extend([0.0, -0.0, 0.49999997, -0.49999997, 1e-30, -1e-30]);
        xs.extend([
            127.5,
            -127.5,
            128.0,
            -129.0,
            1e9,
            -1e9,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ]);
        xs.push(f32::NAN);
        for x in xs {
            assert_eq!(
                round_to_i8(x),
                x.round().clamp(-127.0, 127.0) as i8,
                "{x:e}"
            );
        }
    }

    #[test]
    fn blocks_round_trip_within_half_a_step() {
        let mut rng = Lcg(3);
        let x: Vec<f32> = (0..32).map(|_| rng.f32() * 3.0).collect();
        let mut q = [0i8; 32];
        let d = quantize_block(&x, &mut q);
        for (v, &qi) in x.iter().zip(&q) {
            assert!((v - qi as f32 * d).abs() <= d * 0.5 + 1e-6);
        }
        assert_eq!(quantize_block(&[0.0; 5], &mut q), 0.0);
        assert!(q.iter().all(|&v| v == 0));
    }

    /// Every ISA against the scalar twin (odd row counts and lengths, several tokens), and the
    /// quantized product against the exact f32 one within the quantization error.
    #[test]
    fn q8_matmul_kernels_agree_with_the_scalar_twin() {
        let mut rng = Lcg(11);
        for (rows, cols, n_tok) in [
            (1, 1, 1),
            (5, 33, 2),
            (13, 100, 3),
            (9, 2560, 1),
            (8, 64, 5),
            (4, 32 * 17 + 5, 2), // an odd block count past a whole group
            (3, 32 * 35, 1),
        ] {
            let m: Vec<f32> = (0..rows * cols).map(|_| rng.f32()).collect();
            let x: Vec<f32> = (0..n_tok * cols).map(|_| rng.f32()).collect();
            let q = Q8Matrix::from_rows(rows, cols, |r, out| {
                out.copy_from_slice(&m[r * cols..(r + 1) * cols])
            });
            let mut reference = vec![0f32; n_tok * rows];
            q.matmul(Isa::Scalar, &x, n_tok, &mut reference);
            for t in 0..n_tok {
                for r in 0..rows {
                    let exact: f32 = (0..cols).map(|c| m[r * cols + c] * x[t * cols + c]).sum();
                    let got = reference[t * rows + r];
                    assert!(
                        (got - exact).abs() < 0.02 * (cols as f32).sqrt(),
                        "{got} vs {exact}"
                    );
                }
            }
            for isa in Isa::all_available() {
                let mut got = vec![0f32; n_tok * rows];
                q.matmul(isa, &x, n_tok, &mut got);
                for (g, w) in got.iter().zip(&reference) {
                    assert!(
                        (g - w).abs() <= 1e-4 * (cols as f32).sqrt(),
                        "{}: {g} vs {w}",
                        isa.name()
                    );
                }
            }
            // The AVX-512 kernel's logic on any CPU, through the emulated intrinsics.
            let (cp, nb) = (q.cp, q.cp / QK);
            with_quantized_input(&x, n_tok, cols, |input| {
                for t in 0..n_tok {
                    let (xt, dt, xsum) = input.token(t);
                    for r in 0..rows {
                        let (w, wd) = (q.qs[r * cp..].as_ptr(), q.d[r * nb..].as_ptr());
                        // SAFETY: row r of q; the input as with_quantized_input pads it.
                        let got = unsafe { avx512_emu::dot_q8(w, wd, xt, dt, xsum, nb) };
                        let want = reference[t * rows + r];
                        assert!(
                            (got - want).abs() <= 1e-4 * (cols as f32).sqrt(),
                            "emulated avx512: {got} vs {want}"
                        );
                    }
                }
            });
            let mut row = vec![0f32; cols];
            q.row(rows - 1, &mut row);
            for (a, b) in row.iter().zip(&m[(rows - 1) * cols..]) {
                assert!((a - b).abs() <= 1.0 / 127.0);
            }
        }
    }

    /// ggml's stored Q8_0 blocks: the scalar twin against the f64 product of the decoded
    /// weights and the dequantized input, and every ISA against the scalar twin; rows of one
    /// to 80 blocks, several tokens, and the code -128 (which ggml's quantizer never writes but
    /// a file may hold).
    #[test]
    fn ggml_q8_0_matmul_agrees_with_the_scalar_twin() {
        let mut rng = Lcg(17);
        for (rows, cols, n_tok) in [
            (1, 32, 1),
            (5, 64, 2),
            (13, 2560, 3),
            (8, 96, 4),
            (3, 32 * 35, 2),
        ] {
            let mut data = vec![0u8; rows * cols / QK * GGML_BLOCK_BYTES];
            for blk in data.chunks_exact_mut(GGML_BLOCK_BYTES) {
                let d = half::f16::from_f32(rng.f32() * 0.02);
                blk[..2].copy_from_slice(&d.to_le_bytes());
                blk[2..].iter_mut().for_each(|v| *v = rng.next() as u8);
            }
            data[2..34].fill(0x80); // -128 everywhere in the first block
            let x: Vec<f32> = (0..n_tok * cols).map(|_| rng.f32()).collect();
            let mut reference = vec![0f32; n_tok * rows];
            matmul_ggml(Isa::Scalar, &data, rows, cols, &x, n_tok, &mut reference);
            let mut bounds = vec![0f64; n_tok * rows];
            with_quantized_input(&x, n_tok, cols, |input| {
                for t in 0..n_tok {
                    let (xq, xd, xsum) = input.token(t);
                    for r in 0..rows {
                        let (mut exact, mut bound) = (0f64, 0f64);
                        for c in 0..cols {
                            let blk = &data[(r * cols + c) / QK * GGML_BLOCK_BYTES..];
                            let d = half::f16::from_le_bytes([blk[0], blk[1]]).to_f64();
                            let w = blk[2 + c % QK] as i8 as f64 * d;
                            let v = w * xq[c] as f64 * xd[c / QK] as f64;
                            exact += v;
                            bound += v.abs();
                        }
                        let got = reference[t * rows + r] as f64;
                        assert!((got - exact).abs() <= 1e-5 * bound, "{got} vs {exact}");
                        bounds[t * rows + r] = bound;
                        let row = data[r * cols / QK * GGML_BLOCK_BYTES..].as_ptr();
                        // SAFETY: row r of data; the input as with_quantized_input pads it.
                        let emu = unsafe { avx512_emu::dot_ggml(row, xq, xd, xsum, cols / QK) };
                        assert!(
                            ((emu - got as f32).abs() as f64) <= 1e-5 * bound,
                            "emulated avx512: {emu} vs {got}"
                        );
                    }
                }
            });
            for isa in Isa::all_available() {
                let mut got = vec![0f32; n_tok * rows];
                matmul_ggml(isa, &data, rows, cols, &x, n_tok, &mut got);
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
}
