//! Float kernels: dot products against f32 / f16 rows (the output head), RMSNorm, softmax.

use crate::{Isa, SyncPtr};
use half::f16;
use rayon::prelude::*;

/// f32 dot product with eight independent accumulators (the compiler vectorises it).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = [0f32; 8];
    let chunks = n / 8;
    for c in 0..chunks {
        for i in 0..8 {
            acc[i] += a[c * 8 + i] * b[c * 8 + i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..n {
        s += a[i] * b[i];
    }
    s
}

/// Scalar reference: dot product of a little-endian f16 row (`2 * x.len()` bytes) with x.
pub fn dot_f16_scalar(row: &[u8], x: &[f32]) -> f32 {
    x.iter()
        .enumerate()
        .map(|(i, &xi)| f16::from_le_bytes([row[2 * i], row[2 * i + 1]]).to_f32() * xi)
        .sum()
}

/// Dot product of an f16 row with x, using F16C + FMA when `isa` allows it.
pub fn dot_f16(isa: Isa, row: &[u8], x: &[f32]) -> f32 {
    assert!(row.len() >= 2 * x.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if has_f16c() => unsafe { dot_f16_avx2(row, x) },
        _ => dot_f16_scalar(row, x),
    }
}

#[cfg(target_arch = "x86_64")]
fn has_f16c() -> bool {
    use std::sync::OnceLock;
    static F16C: OnceLock<bool> = OnceLock::new();
    *F16C.get_or_init(|| is_x86_feature_detected!("f16c") && is_x86_feature_detected!("fma"))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c,fma")]
unsafe fn dot_f16_avx2(row: &[u8], x: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = x.len();
    let (hp, xp) = (row.as_ptr(), x.as_ptr());
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        let h0 = _mm256_cvtph_ps(_mm_loadu_si128(hp.add(2 * i) as *const __m128i));
        let h1 = _mm256_cvtph_ps(_mm_loadu_si128(hp.add(2 * i + 16) as *const __m128i));
        acc0 = _mm256_fmadd_ps(h0, _mm256_loadu_ps(xp.add(i)), acc0);
        acc1 = _mm256_fmadd_ps(h1, _mm256_loadu_ps(xp.add(i + 8)), acc1);
        i += 16;
    }
    let acc = _mm256_add_ps(acc0, acc1);
    let lo = _mm256_castps256_ps128(acc);
    let hi = _mm256_extractf128_ps(acc, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    let mut sum = _mm_cvtss_f32(s);
    while i < n {
        sum += f16::from_le_bytes([row[2 * i], row[2 * i + 1]]).to_f32() * x[i];
        i += 1;
    }
    sum
}

/// `out[t * rows + r] = row_dot(r, x_t)` for every row r and token t, split by rows over the
/// rayon pool. `row_dot` gets the row index and one token's input.
pub fn par_rows<F>(rows: usize, n_tok: usize, cols: usize, x: &[f32], out: &mut [f32], row_dot: F)
where
    F: Fn(usize, &[f32]) -> f32 + Sync,
{
    assert!(x.len() >= n_tok * cols && out.len() >= n_tok * rows);
    let chunk = (rows / (rayon::current_num_threads() * 8)).clamp(16, 1024);
    let out_ptr = SyncPtr(out.as_mut_ptr());
    (0..rows.div_ceil(chunk)).into_par_iter().for_each(|c| {
        let p = out_ptr.get();
        for r in c * chunk..((c + 1) * chunk).min(rows) {
            for t in 0..n_tok {
                // SAFETY: (t, r) pairs are disjoint between tasks; `out` outlives the loop.
                unsafe { *p.add(t * rows + r) = row_dot(r, &x[t * cols..(t + 1) * cols]) };
            }
        }
    });
}

/// RMSNorm: `out = x / sqrt(mean(x^2) + eps) * w`, in f32 (the mean accumulated in f64).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ms = (x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / x.len() as f64) as f32;
    let r = 1.0 / (ms + eps).sqrt();
    for ((o, &xi), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = xi * r * wi;
    }
}

/// In-place softmax (max-subtracted).
pub fn softmax(x: &mut [f32]) {
    let m = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    x.iter_mut().for_each(|v| *v *= inv);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Lcg;

    #[test]
    fn f16_dot_kernels_agree_on_odd_lengths() {
        let mut rng = Lcg(5);
        for n in [1, 7, 15, 16, 17, 33, 256, 1000] {
            let h: Vec<f16> = (0..n).map(|_| f16::from_f32(rng.f32())).collect();
            let bytes: Vec<u8> = h.iter().flat_map(|v| v.to_le_bytes()).collect();
            let x: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
            let want: f64 = h
                .iter()
                .zip(&x)
                .map(|(a, b)| a.to_f32() as f64 * *b as f64)
                .sum();
            for isa in [Isa::Scalar, Isa::detect()] {
                let got = dot_f16(isa, &bytes, &x);
                assert!(
                    (got as f64 - want).abs() < 1e-4 * (n as f64).sqrt(),
                    "{} n={n}: {got} vs {want}",
                    isa.name()
                );
            }
        }
    }

    #[test]
    fn dot_f32_and_par_rows() {
        let a: Vec<f32> = (0..19).map(|i| i as f32).collect();
        assert_eq!(
            dot_f32(&a, &a),
            (0..19).map(|i| (i * i) as f32).sum::<f32>()
        );
        let x = vec![1.0f32, 2.0, 3.0, 4.0];
        let mut out = vec![0f32; 2 * 37];
        par_rows(37, 2, 2, &x, &mut out, |r, xt| r as f32 * xt[0] + xt[1]);
        assert_eq!(out[5], 5.0 + 2.0);
        assert_eq!(out[37 + 5], 15.0 + 4.0);
    }

    #[test]
    fn rms_norm_and_softmax() {
        let mut out = [0f32; 2];
        rms_norm(&[3.0, 4.0], &[1.0, 2.0], 0.0, &mut out);
        let r = 1.0 / 12.5f32.sqrt();
        assert_eq!(out, [3.0 * r, 8.0 * r]);
        let mut p = [1.0f32, 1.0, f32::NEG_INFINITY];
        softmax(&mut p);
        assert_eq!(p, [0.5, 0.5, 0.0]);
    }
}
