//! Float kernels: dot products against f32 / f16 rows (the output head), RMSNorm, softmax.

use crate::{pool, Isa, SyncPtr};
use half::f16;

/// f32 dot product with eight independent accumulators (the compiler vectorises it).
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    dot_kv(a, b)
}

/// Element types of a KV cache: f32, or f16 (half the memory, and half the bytes each decoded
/// token reads from the cache; llama.cpp's default). The attention kernels below take either.
pub trait KvElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;

    /// The AVX2 + FMA (+ F16C for f16) kernels for this element type.
    #[cfg(target_arch = "x86_64")]
    #[doc(hidden)]
    unsafe fn scores_avx2(q: &[f32], keys: &[Self], stride: usize, scale: f32, scores: &mut [f32]);
    #[cfg(target_arch = "x86_64")]
    #[doc(hidden)]
    unsafe fn values_avx2(p: &[f32], values: &[Self], stride: usize, out: &mut [f32]);
}

impl KvElem for f32 {
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn scores_avx2(q: &[f32], keys: &[f32], stride: usize, scale: f32, scores: &mut [f32]) {
        for (j, sc) in scores.iter_mut().enumerate() {
            *sc = dot_f32_avx2(q, keys.get_unchecked(j * stride..j * stride + q.len())) * scale;
        }
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn values_avx2(p: &[f32], values: &[f32], stride: usize, out: &mut [f32]) {
        attn_values_f32_avx2(p, values, stride, out)
    }
}

impl KvElem for f16 {
    #[inline]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn scores_avx2(q: &[f32], keys: &[f16], stride: usize, scale: f32, scores: &mut [f32]) {
        for (j, sc) in scores.iter_mut().enumerate() {
            let row = keys.as_ptr().add(j * stride) as *const u8;
            *sc = dot_f16_avx2(std::slice::from_raw_parts(row, 2 * q.len()), q) * scale;
        }
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn values_avx2(p: &[f32], values: &[f16], stride: usize, out: &mut [f32]) {
        attn_values_f16_avx2(p, values, stride, out)
    }
}

/// Attention scores of one query head: `scores[j] = scale * (q . key_j)`, where key j is
/// `keys[j * stride..][..q.len()]` (a KV cache row). One call per (token, head), so the loop
/// over keys runs inside the SIMD code.
pub fn attn_scores<T: KvElem>(
    isa: Isa,
    q: &[f32],
    keys: &[T],
    stride: usize,
    scale: f32,
    scores: &mut [f32],
) {
    let hd = q.len();
    if let Some(j) = scores.len().checked_sub(1) {
        assert!(keys.len() >= j * stride + hd);
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni if has_f16c() => unsafe {
            T::scores_avx2(q, keys, stride, scale, scores)
        },
        _ => {
            for (j, sc) in scores.iter_mut().enumerate() {
                *sc = dot_kv(q, &keys[j * stride..][..hd]) * scale;
            }
        }
    }
}

/// Dot product of f32 values with a row of the cache's element type, eight independent
/// accumulators (vectorised); [`dot_f32`] is this for f32 rows.
fn dot_kv<T: KvElem>(a: &[f32], b: &[T]) -> f32 {
    let n = a.len().min(b.len());
    let mut acc = [0f32; 8];
    let chunks = n / 8;
    for c in 0..chunks {
        for i in 0..8 {
            acc[i] += a[c * 8 + i] * b[c * 8 + i].to_f32();
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..n {
        s += a[i] * b[i].to_f32();
    }
    s
}

/// Attention output of one head: `out = sum_j p[j] * value_j`, value j being
/// `values[j * stride..][..out.len()]`.
pub fn attn_values<T: KvElem>(isa: Isa, p: &[f32], values: &[T], stride: usize, out: &mut [f32]) {
    let hd = out.len();
    if let Some(j) = p.len().checked_sub(1) {
        assert!(values.len() >= j * stride + hd);
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni if has_f16c() => unsafe {
            T::values_avx2(p, values, stride, out)
        },
        _ => {
            out.fill(0.0);
            for (j, &pj) in p.iter().enumerate() {
                for (o, v) in out.iter_mut().zip(&values[j * stride..][..hd]) {
                    *o += pj * v.to_f32();
                }
            }
        }
    }
}

/// The AVX2 value accumulation, for f32 rows and (with F16C) f16 rows: `$load(ptr)` reads
/// eight elements as f32.
macro_rules! attn_values_avx2 {
    ($name:ident, $t:ty, $features:literal, $load:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $name(p: &[f32], values: &[$t], stride: usize, out: &mut [f32]) {
            use std::arch::x86_64::*;
            let load = $load;
            let hd = out.len();
            let pv = values.as_ptr();
            // 32 outputs at a time stay in four registers while every value row streams past.
            let mut c = 0;
            while c + 32 <= hd {
                let mut acc = [_mm256_setzero_ps(); 4];
                for (j, &pj) in p.iter().enumerate() {
                    let w = _mm256_set1_ps(pj);
                    let row = pv.add(j * stride + c);
                    for (k, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm256_fmadd_ps(w, load(row.add(8 * k)), *acc);
                    }
                }
                for (k, acc) in acc.iter().enumerate() {
                    _mm256_storeu_ps(out.as_mut_ptr().add(c + 8 * k), *acc);
                }
                c += 32;
            }
            // The tail (head sizes that are not multiples of 32), one element at a time.
            if c < hd {
                out[c..].fill(0.0);
                for (j, &pj) in p.iter().enumerate() {
                    for (i, o) in out[c..].iter_mut().enumerate() {
                        *o += pj * KvElem::to_f32(*pv.add(j * stride + c + i));
                    }
                }
            }
        }
    };
}

attn_values_avx2!(attn_values_f32_avx2, f32, "avx2,fma", |r: *const f32| {
    _mm256_loadu_ps(r)
});
attn_values_avx2!(
    attn_values_f16_avx2,
    f16,
    "avx2,fma,f16c",
    |r: *const f16| _mm256_cvtph_ps(_mm_loadu_si128(r as *const __m128i))
);

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_f32_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            let (x, y) = (
                _mm256_loadu_ps(pa.add(i + 8 * k)),
                _mm256_loadu_ps(pb.add(i + 8 * k)),
            );
            *acc = _mm256_fmadd_ps(x, y, *acc);
        }
        i += 32;
    }
    while i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(
            _mm256_loadu_ps(pa.add(i)),
            _mm256_loadu_ps(pb.add(i)),
            acc[0],
        );
        i += 8;
    }
    let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    let mut s = _mm_cvtss_f32(h);
    while i < n {
        s += a[i] * b[i];
        i += 1;
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
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => unsafe { avx512::dot_f16::<1>(&[row.as_ptr()], x.as_ptr(), x.len())[0] },
        _ => dot_f16_scalar(row, x),
    }
}

/// Rows of an f16 matrix per kernel call: the activation loads are shared by these rows.
const F16_ROWS: usize = 4;

/// `out[t * rows + r] = row_r . x_t` for a row-major little-endian f16 matrix (`data`:
/// `rows * cols * 2` bytes) and `n_tok` inputs of `cols` values: the F16 output head. Rows are
/// split over the worker pool; each kernel call reads four rows against one input.
pub fn matmul_f16(
    isa: Isa,
    data: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    n_tok: usize,
    out: &mut [f32],
) {
    assert!(data.len() >= rows * cols * 2 && x.len() >= n_tok * cols && out.len() >= n_tok * rows);
    let out_ptr = SyncPtr(out.as_mut_ptr());
    pool::for_ranges(rows, F16_ROWS, 256, |range| {
        let p = out_ptr.get();
        let row = |r: usize| data[r * cols * 2..(r + 1) * cols * 2].as_ptr();
        let mut r = range.start;
        while r < range.end {
            let n = F16_ROWS.min(range.end - r);
            for t in 0..n_tok {
                let xt = &x[t * cols..(t + 1) * cols];
                let mut v = [0f32; F16_ROWS];
                if n == F16_ROWS {
                    v = dot4_f16(isa, std::array::from_fn(|i| row(r + i)), xt);
                } else {
                    for (i, vi) in v.iter_mut().enumerate().take(n) {
                        *vi = dot_f16(isa, &data[(r + i) * cols * 2..(r + i + 1) * cols * 2], xt);
                    }
                }
                for (i, &vi) in v.iter().enumerate().take(n) {
                    // SAFETY: (t, r + i) pairs are disjoint between parts; `out` outlives the job.
                    unsafe { *p.add(t * rows + r + i) = vi };
                }
            }
            r += n;
        }
    });
}

/// Four f16 rows (pointers to `x.len()` values each) dotted with x.
fn dot4_f16(isa: Isa, rows: [*const u8; F16_ROWS], x: &[f32]) -> [f32; F16_ROWS] {
    match isa {
        // SAFETY: the caller passes rows of x.len() f16 values; the CPU features are checked.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if has_f16c() => unsafe { dot4_f16_avx2(&rows, x.as_ptr(), x.len()) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => unsafe { avx512::dot_f16::<F16_ROWS>(&rows, x.as_ptr(), x.len()) },
        _ => rows.map(|p| {
            // SAFETY: as above.
            dot_f16_scalar(unsafe { std::slice::from_raw_parts(p, 2 * x.len()) }, x)
        }),
    }
}

/// FMA and F16C, detected once: what the AVX2 kernels of the float and block-quantized heads
/// (here, `q8`, `q6k`) need on top of the AVX2 that `Isa::Avx2` and `Isa::Avx512Vnni`
/// guarantee. Always false on other architectures.
pub(crate) fn has_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static F16C: OnceLock<bool> = OnceLock::new();
        *F16C.get_or_init(|| is_x86_feature_detected!("f16c") && is_x86_feature_detected!("fma"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
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

/// Four rows at once: each 16-value chunk of x is loaded once for the four rows.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c,fma")]
unsafe fn dot4_f16_avx2(rows: &[*const u8; F16_ROWS], xp: *const f32, n: usize) -> [f32; F16_ROWS] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; F16_ROWS];
    let mut i = 0;
    while i + 16 <= n {
        let x0 = _mm256_loadu_ps(xp.add(i));
        let x1 = _mm256_loadu_ps(xp.add(i + 8));
        for (a, &hp) in acc.iter_mut().zip(rows) {
            let h0 = _mm256_cvtph_ps(_mm_loadu_si128(hp.add(2 * i) as *const __m128i));
            let h1 = _mm256_cvtph_ps(_mm_loadu_si128(hp.add(2 * i + 16) as *const __m128i));
            a[0] = _mm256_fmadd_ps(h0, x0, a[0]);
            a[1] = _mm256_fmadd_ps(h1, x1, a[1]);
        }
        i += 16;
    }
    let mut out = [0f32; F16_ROWS];
    for (o, (a, &hp)) in out.iter_mut().zip(acc.iter().zip(rows)) {
        let v = _mm256_add_ps(a[0], a[1]);
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        let mut sum = _mm_cvtss_f32(s);
        for j in i..n {
            sum += f16::from_le_bytes([*hp.add(2 * j), *hp.add(2 * j + 1)]).to_f32() * *xp.add(j);
        }
        *o = sum;
    }
    out
}

/// The AVX-512 f16 dot for R rows, written once and instantiated with the real intrinsics and,
/// in tests, with the emulated ones (`crate::emu512`). 32 values per step: two `vcvtph2ps zmm`
/// per row, the x loads shared by the rows; the tail (fewer than 32 values) in scalar code.
macro_rules! avx512_f16 {
    ($(#[$attr:meta])*) => {
        $(#[$attr])*
        pub unsafe fn dot_f16<const R: usize>(rows: &[*const u8; R], xp: *const f32, n: usize) -> [f32; R] {
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            let mut i = 0;
            while i + 32 <= n {
                let x0 = _mm512_loadu_ps(xp.add(i));
                let x1 = _mm512_loadu_ps(xp.add(i + 16));
                for r in 0..R {
                    let hp = rows[r];
                    let h0 = _mm512_cvtph_ps(_mm256_loadu_si256(hp.add(2 * i) as *const __m256i));
                    let h1 = _mm512_cvtph_ps(_mm256_loadu_si256(hp.add(2 * i + 32) as *const __m256i));
                    acc[r][0] = _mm512_fmadd_ps(h0, x0, acc[r][0]);
                    acc[r][1] = _mm512_fmadd_ps(h1, x1, acc[r][1]);
                }
                i += 32;
            }
            let mut out = [0f32; R];
            for r in 0..R {
                let hp = rows[r];
                let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
                for j in i..n {
                    sum += half::f16::from_le_bytes([*hp.add(2 * j), *hp.add(2 * j + 1)]).to_f32()
                        * *xp.add(j);
                }
                out[r] = sum;
            }
            out
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    avx512_f16!(#[target_feature(enable = "avx512f")]);
}

#[cfg(test)]
mod avx512_emu {
    use crate::emu512::*;
    avx512_f16!();
}

/// `out[t * rows + r] = row_dot(r, x_t)` for every row r and token t, split by rows over the
/// worker pool. `row_dot` gets the row index and one token's input.
pub fn par_rows<F>(rows: usize, n_tok: usize, cols: usize, x: &[f32], out: &mut [f32], row_dot: F)
where
    F: Fn(usize, &[f32]) -> f32 + Sync,
{
    assert!(x.len() >= n_tok * cols);
    par_row_tokens(rows, n_tok, out, |r, t| {
        row_dot(r, &x[t * cols..(t + 1) * cols])
    })
}

/// `out[t * rows + r] = row_tok(r, t)` for every row r and token t, split by rows over the
/// worker pool; each part reads its rows one after another (one sequential stream) and calls
/// every token on a row while it is in L1.
pub fn par_row_tokens<F>(rows: usize, n_tok: usize, out: &mut [f32], row_tok: F)
where
    F: Fn(usize, usize) -> f32 + Sync,
{
    assert!(out.len() >= n_tok * rows);
    let out_ptr = SyncPtr(out.as_mut_ptr());
    pool::for_ranges(rows, 1, 64, |range| {
        let p = out_ptr.get();
        for r in range {
            for t in 0..n_tok {
                // SAFETY: (t, r) pairs are disjoint between parts; `out` outlives the job.
                unsafe { *p.add(t * rows + r) = row_tok(r, t) };
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
            for isa in Isa::all_available() {
                let got = dot_f16(isa, &bytes, &x);
                assert!(
                    (got as f64 - want).abs() < 1e-4 * (n as f64).sqrt(),
                    "{} n={n}: {got} vs {want}",
                    isa.name()
                );
            }
        }
    }

    /// The multi-row head kernel on every ISA (and the AVX-512 one emulated), odd row counts
    /// and lengths, several tokens, against an f64 reference.
    #[test]
    fn f16_matmul_kernels_agree() {
        let mut rng = Lcg(9);
        for (rows, cols, n_tok) in [
            (1, 1, 1),
            (7, 33, 2),
            (13, 100, 3),
            (9, 2560, 1),
            (4, 64, 5),
        ] {
            let h: Vec<f16> = (0..rows * cols).map(|_| f16::from_f32(rng.f32())).collect();
            let bytes: Vec<u8> = h.iter().flat_map(|v| v.to_le_bytes()).collect();
            let x: Vec<f32> = (0..n_tok * cols).map(|_| rng.f32()).collect();
            let want: Vec<f64> = (0..n_tok * rows)
                .map(|i| {
                    let (t, r) = (i / rows, i % rows);
                    (0..cols)
                        .map(|c| h[r * cols + c].to_f32() as f64 * x[t * cols + c] as f64)
                        .sum()
                })
                .collect();
            let tol = 1e-4 * (cols as f64).sqrt();
            for isa in Isa::all_available() {
                let mut got = vec![0f32; n_tok * rows];
                matmul_f16(isa, &bytes, rows, cols, &x, n_tok, &mut got);
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (*g as f64 - w).abs() < tol,
                        "{} {rows}x{cols}: {g} vs {w}",
                        isa.name()
                    );
                }
            }
            for r0 in (0..rows.saturating_sub(3)).step_by(4) {
                let ptrs: [*const u8; 4] =
                    std::array::from_fn(|i| bytes[(r0 + i) * cols * 2..].as_ptr());
                for t in 0..n_tok {
                    // SAFETY: emulated kernel, rows of `cols` values.
                    let got =
                        unsafe { avx512_emu::dot_f16::<4>(&ptrs, x[t * cols..].as_ptr(), cols) };
                    for i in 0..4 {
                        let w = want[t * rows + r0 + i];
                        assert!(
                            (got[i] as f64 - w).abs() < tol,
                            "emulated avx512: {} vs {w}",
                            got[i]
                        );
                    }
                }
            }
        }
    }

    /// The F16 head of several tokens at once gives, bit for bit, what each token gives alone:
    /// batching (serve's streams) must not change a logit. Odd shapes: row counts across the
    /// four-row groups and the thread split, lengths with a tail of fewer than 16 values.
    #[test]
    fn f16_head_of_a_batch_equals_each_token_alone() {
        let mut rng = Lcg(21);
        for (rows, cols, n_tok) in [(1, 7, 3), (7, 33, 2), (67, 100, 5), (130, 2560, 4)] {
            let bytes: Vec<u8> = (0..rows * cols)
                .flat_map(|_| f16::from_f32(rng.f32()).to_le_bytes())
                .collect();
            let x: Vec<f32> = (0..n_tok * cols).map(|_| rng.f32()).collect();
            for isa in Isa::all_available() {
                for threads in [1, 2] {
                    let tp = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let mut batched = vec![0f32; n_tok * rows];
                    tp.install(|| matmul_f16(isa, &bytes, rows, cols, &x, n_tok, &mut batched));
                    for t in 0..n_tok {
                        let mut alone = vec![0f32; rows];
                        let xt = &x[t * cols..(t + 1) * cols];
                        tp.install(|| matmul_f16(isa, &bytes, rows, cols, xt, 1, &mut alone));
                        let got: Vec<u32> = batched[t * rows..(t + 1) * rows]
                            .iter()
                            .map(|v| v.to_bits())
                            .collect();
                        let want: Vec<u32> = alone.iter().map(|v| v.to_bits()).collect();
                        assert_eq!(got, want, "{} {rows}x{cols} token {t}", isa.name());
                    }
                }
            }
        }
    }

    /// Whole-head attention kernels on every ISA against f64, for f32 and f16 caches, head
    /// sizes with and without a tail of 32, strided rows as in a KV cache.
    #[test]
    fn attention_kernels_agree() {
        let mut rng = Lcg(12);
        for (hd, n_keys, stride) in [
            (128, 1, 128),
            (128, 37, 640),
            (64, 5, 80),
            (40, 9, 41),
            (7, 3, 7),
        ] {
            let q: Vec<f32> = (0..hd).map(|_| rng.f32()).collect();
            let kv: Vec<f32> = (0..n_keys * stride).map(|_| rng.f32()).collect();
            let p: Vec<f32> = (0..n_keys).map(|_| rng.f32()).collect();
            check_attention(&q, &kv, &p, stride);
            let kv16: Vec<f16> = kv.iter().map(|&v| f16::from_f32(v)).collect();
            check_attention(&q, &kv16, &p, stride);
        }
    }

    fn check_attention<T: KvElem>(q: &[f32], kv: &[T], p: &[f32], stride: usize) {
        let (hd, n_keys) = (q.len(), p.len());
        let kv64 = |i: usize| kv[i].to_f32() as f64;
        for isa in Isa::all_available() {
            let what = format!("{} {}", isa.name(), std::any::type_name::<T>());
            let mut scores = vec![0f32; n_keys];
            attn_scores(isa, q, kv, stride, 0.5, &mut scores);
            let mut out = vec![f32::NAN; hd];
            attn_values(isa, p, kv, stride, &mut out);
            for (j, &sj) in scores.iter().enumerate() {
                let w: f64 = 0.5
                    * (0..hd)
                        .map(|i| q[i] as f64 * kv64(j * stride + i))
                        .sum::<f64>();
                assert!((sj as f64 - w).abs() < 1e-5, "{what} scores hd={hd} j={j}");
            }
            for (i, &oi) in out.iter().enumerate() {
                let w: f64 = (0..n_keys)
                    .map(|j| p[j] as f64 * kv64(j * stride + i))
                    .sum();
                assert!((oi as f64 - w).abs() < 1e-5, "{what} values hd={hd} i={i}");
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
