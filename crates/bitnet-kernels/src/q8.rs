//! The output head requantized to 8 bits (ggml's Q8_0 scheme, with f32 block scales): each row
//! is cut into blocks of 32 values, each stored as `d = max|x| / 127` and `round(x / d)` in
//! int8. The head input (the final-norm output) is quantized the same way per token, and the
//! product is computed as ggml's Q8_0 x Q8_0 dot: `sum_b d_w[b] * d_x[b] * sum_i w_i x_i`,
//! with exact integer block sums. It reads about half the bytes of an F16 head per token.

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
    /// per 32-block. Rows are split over the worker pool, four rows per kernel call.
    pub fn matmul(&self, isa: Isa, x: &[f32], n_tok: usize, out: &mut [f32]) {
        let (rows, cols, cp, nb) = (self.rows, self.cols, self.cp, self.cp / QK);
        assert!(x.len() >= n_tok * cols && out.len() >= n_tok * rows);
        thread_local! {
            static XQ: RefCell<(Vec<i8>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
        }
        XQ.with(|buf| {
            let mut buf = buf.borrow_mut();
            let (xq, xd) = &mut *buf;
            xq.resize(n_tok * cp, 0);
            xd.resize(n_tok * nb, 0.0);
            for t in 0..n_tok {
                let xt = &x[t * cols..(t + 1) * cols];
                for b in 0..nb {
                    let blk = &xt[(b * QK).min(cols)..((b + 1) * QK).min(cols)];
                    xd[t * nb + b] = quantize_block(blk, &mut xq[t * cp + b * QK..][..QK]);
                }
            }
            let (xq, xd) = (&xq[..], &xd[..]);
            let out_ptr = SyncPtr(out.as_mut_ptr());
            pool::for_ranges(rows, 4, 256, |range| {
                let p = out_ptr.get();
                let mut r = range.start;
                while r < range.end {
                    let n = 4.min(range.end - r);
                    for t in 0..n_tok {
                        let (xt, dt) = (&xq[t * cp..(t + 1) * cp], &xd[t * nb..(t + 1) * nb]);
                        let v = self.dot4(isa, r, n, xt, dt);
                        for (i, &vi) in v.iter().enumerate().take(n) {
                            // SAFETY: (t, r + i) pairs are disjoint between parts.
                            unsafe { *p.add(t * rows + r + i) = vi };
                        }
                    }
                    r += n;
                }
            });
        });
    }

    /// Rows r..r+n (n <= 4) against one quantized input.
    fn dot4(&self, isa: Isa, r: usize, n: usize, xq: &[i8], xd: &[f32]) -> [f32; 4] {
        let (cp, nb) = (self.cp, self.cp / QK);
        let mut v = [0f32; 4];
        #[cfg(target_arch = "x86_64")]
        if n == 4 && isa != Isa::Scalar && has_avx2_fma() {
            let w = std::array::from_fn(|i| self.qs[(r + i) * cp..].as_ptr());
            let d = std::array::from_fn(|i| self.d[(r + i) * nb..].as_ptr());
            // SAFETY: four full rows of cp values and nb scales; x of cp values, nb scales.
            return unsafe { dot4_avx2(&w, &d, xq.as_ptr(), xd.as_ptr(), nb) };
        }
        let _ = isa;
        for (i, vi) in v.iter_mut().enumerate().take(n) {
            let w = &self.qs[(r + i) * cp..(r + i + 1) * cp];
            let d = &self.d[(r + i) * nb..(r + i + 1) * nb];
            *vi = dot_scalar(w, d, xq, xd);
        }
        v
    }
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

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// Four rows, one input: per 32-block `maddubs(|w|, sign(x, w))` (|w|, |x| <= 127, so the pair
/// sums stay below i16 range), widened with `madd`, converted to f32 and scaled by
/// `d_w * d_x` with one FMA. The input's loads and scale are shared by the four rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot4_avx2(
    w: &[*const i8; 4],
    d: &[*const f32; 4],
    xq: *const i8,
    xd: *const f32,
    nb: usize,
) -> [f32; 4] {
    use std::arch::x86_64::*;
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); 4];
    for b in 0..nb {
        let xv = _mm256_loadu_si256(xq.add(QK * b) as *const __m256i);
        let dx = _mm256_set1_ps(*xd.add(b));
        for i in 0..4 {
            let wv = _mm256_loadu_si256(w[i].add(QK * b) as *const __m256i);
            let p = _mm256_maddubs_epi16(_mm256_abs_epi8(wv), _mm256_sign_epi8(xv, wv));
            let s = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
            let scale = _mm256_mul_ps(_mm256_set1_ps(*d[i].add(b)), dx);
            acc[i] = _mm256_fmadd_ps(s, scale, acc[i]);
        }
    }
    let mut out = [0f32; 4];
    for (o, a) in out.iter_mut().zip(acc) {
        let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        *o = _mm_cvtss_f32(s);
    }
    out
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
            let mut row = vec![0f32; cols];
            q.row(rows - 1, &mut row);
            for (a, b) in row.iter().zip(&m[(rows - 1) * cols..]) {
                assert!((a - b).abs() <= 1.0 / 127.0);
            }
        }
    }
}
