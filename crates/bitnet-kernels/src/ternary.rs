//! int8 activations x ternary weights.
//!
//! Runtime layout ("row-I2S"): every row is padded to `kp`, a multiple of 128 weights, and cut
//! into 128-weight blocks of 32 bytes exactly as bitnet.cpp's I2_S blocks: byte j holds weight
//! j in bits 7-6, 32+j in bits 5-4, 64+j in 3-2 and 96+j in 1-0, as the code `w + 1` (0, 1, 2).
//! Row r starts at byte `r * kp / 4`. A file whose rows are already multiples of 128 (2B4T's
//! I2_S) is used as it is, straight from the memory map. Padding weights are code 1 (zero) and
//! padding activations are zero.
//!
//! One 32-byte load gives four vectors of 32 codes that line up with four consecutive
//! 32-activation chunks, so the AVX2 kernel needs only shifts and masks to unpack. With codes
//! `c = w + 1`, `sum w*q = sum c*q - sum q`, and `c*q` is an unsigned-by-signed byte product
//! (`maddubs`).

use crate::SyncPtr;
use rayon::prelude::*;

/// Weights per block.
pub const BLOCK: usize = 128;

/// Row length rounded up to whole blocks.
pub fn padded_len(k: usize) -> usize {
    k.div_ceil(BLOCK) * BLOCK
}

/// Pack one row of codes (`w + 1`, each 0..=2) into `out` (`padded_len(codes.len()) / 4` bytes).
pub fn pack_row(codes: &[u8], out: &mut [u8]) {
    let kp = padded_len(codes.len());
    debug_assert_eq!(out.len(), kp / 4);
    out.fill(0);
    for e in 0..kp {
        let c = codes.get(e).copied().unwrap_or(1);
        let (block, j) = (e / BLOCK, e % BLOCK);
        out[block * 32 + j % 32] |= c << (6 - 2 * (j / 32));
    }
}

/// Code (0..=3) of element `e` of a packed row.
#[inline]
pub fn code_at(row: &[u8], e: usize) -> u8 {
    let (block, j) = (e / BLOCK, e % BLOCK);
    (row[block * 32 + j % 32] >> (6 - 2 * (j / 32))) & 3
}

/// Scalar reference: `sum_e (code_e - 1) * q_e` over one packed row.
pub fn dot_scalar(row: &[u8], q: &[i8]) -> i32 {
    (0..q.len())
        .map(|e| (code_at(row, e) as i32 - 1) * q[e] as i32)
        .sum()
}

/// A ternary matrix in the runtime layout, borrowed.
#[derive(Clone, Copy)]
pub struct TernaryView<'a> {
    pub data: &'a [u8],
    pub rows: usize,
    /// Padded row length (multiple of 128).
    pub kp: usize,
}

impl<'a> TernaryView<'a> {
    pub fn new(data: &'a [u8], rows: usize, kp: usize) -> Self {
        assert!(
            kp.is_multiple_of(BLOCK) && data.len() >= rows * kp / 4,
            "ternary view out of bounds"
        );
        TernaryView { data, rows, kp }
    }

    #[inline]
    pub fn row(&self, r: usize) -> &'a [u8] {
        &self.data[r * self.kp / 4..(r + 1) * self.kp / 4]
    }
}

/// Which implementation to use. Chosen once by CPU feature detection; tests force each one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
}

impl Isa {
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::env::var_os("BITNET_FORCE_SCALAR").is_none() && is_x86_feature_detected!("avx2")
            {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
        }
    }
}

/// Integer products of `n_tok` token rows of activations (`q`: `n_tok * kp` int8, each row
/// padded with zeros) with every weight row: `out[t * w.rows + r] = sum_e w[r, e] * q[t, e]`.
/// `qsum[t]` is the sum of token t's activations. Runs on the rayon pool, split by rows.
pub fn gemm(isa: Isa, w: TernaryView, q: &[i8], qsum: &[i32], n_tok: usize, out: &mut [i32]) {
    assert!(q.len() >= n_tok * w.kp && qsum.len() >= n_tok && out.len() >= n_tok * w.rows);
    let rows = w.rows;
    // Chunks big enough to amortise scheduling, small enough to balance two or more threads.
    let chunk = (rows / (rayon::current_num_threads() * 8)).clamp(8, 256);
    let out_ptr = SyncPtr(out.as_mut_ptr());
    (0..rows.div_ceil(chunk)).into_par_iter().for_each(|c| {
        let r0 = c * chunk;
        let r1 = (r0 + chunk).min(rows);
        // SAFETY: each task writes only the elements of its own rows [r0, r1) for every token,
        // which no other task touches; `out` outlives the parallel loop.
        let out = unsafe { std::slice::from_raw_parts_mut(out_ptr.get(), n_tok * rows) };
        gemm_rows(isa, w, q, qsum, n_tok, r0..r1, out);
    });
}

/// Single-threaded kernel over a range of rows.
pub fn gemm_rows(
    isa: Isa,
    w: TernaryView,
    q: &[i8],
    qsum: &[i32],
    n_tok: usize,
    rows: std::ops::Range<usize>,
    out: &mut [i32],
) {
    match isa {
        Isa::Scalar => {
            for r in rows {
                let row = w.row(r);
                for t in 0..n_tok {
                    out[t * w.rows + r] = dot_scalar(row, &q[t * w.kp..(t + 1) * w.kp]);
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { avx2::gemm_rows(w, q, qsum, n_tok, rows, out) },
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Avx2 => unreachable!("AVX2 selected on a non-x86 CPU"),
    }
    let _ = qsum;
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::TernaryView;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn hsum_epi32(v: __m256i) -> i32 {
        let lo = _mm256_castsi256_si128(v);
        let hi = _mm256_extracti128_si256(v, 1);
        let s = _mm_add_epi32(lo, hi);
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }

    /// The four 32-code vectors of one 32-byte block.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn unpack(p: *const u8) -> [__m256i; 4] {
        let mask = _mm256_set1_epi8(3);
        let w = _mm256_loadu_si256(p as *const __m256i);
        [
            _mm256_and_si256(_mm256_srli_epi16(w, 6), mask),
            _mm256_and_si256(_mm256_srli_epi16(w, 4), mask),
            _mm256_and_si256(_mm256_srli_epi16(w, 2), mask),
            _mm256_and_si256(w, mask),
        ]
    }

    /// `sum c*q` for one block, as 8 i32 partial sums. Each i16 lane holds at most
    /// 4 * 2 * (2 * 128) = 2048 in magnitude, far from overflow.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn block_dot(c: &[__m256i; 4], q: *const i8) -> __m256i {
        let ld = |i: usize| _mm256_loadu_si256(q.add(32 * i) as *const __m256i);
        let s01 = _mm256_add_epi16(
            _mm256_maddubs_epi16(c[0], ld(0)),
            _mm256_maddubs_epi16(c[1], ld(1)),
        );
        let s23 = _mm256_add_epi16(
            _mm256_maddubs_epi16(c[2], ld(2)),
            _mm256_maddubs_epi16(c[3], ld(3)),
        );
        _mm256_madd_epi16(_mm256_add_epi16(s01, s23), _mm256_set1_epi16(1))
    }

    /// Tokens are processed four at a time so each unpacked weight block is reused four times.
    #[target_feature(enable = "avx2")]
    pub unsafe fn gemm_rows(
        w: TernaryView,
        q: &[i8],
        qsum: &[i32],
        n_tok: usize,
        rows: std::ops::Range<usize>,
        out: &mut [i32],
    ) {
        let nb = w.kp / 128;
        let qp = q.as_ptr();
        for r in rows {
            let row = w.row(r).as_ptr();
            let mut t = 0;
            while t + 4 <= n_tok {
                let mut acc = [_mm256_setzero_si256(); 4];
                for b in 0..nb {
                    let c = unpack(row.add(32 * b));
                    for (i, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_add_epi32(*a, block_dot(&c, qp.add((t + i) * w.kp + 128 * b)));
                    }
                }
                for (i, a) in acc.iter().enumerate() {
                    out[(t + i) * w.rows + r] = hsum_epi32(*a) - qsum[t + i];
                }
                t += 4;
            }
            while t < n_tok {
                let mut acc = _mm256_setzero_si256();
                for b in 0..nb {
                    let c = unpack(row.add(32 * b));
                    acc = _mm256_add_epi32(acc, block_dot(&c, qp.add(t * w.kp + 128 * b)));
                }
                out[t * w.rows + r] = hsum_epi32(acc) - qsum[t];
                t += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::Lcg;

    fn random_matrix(rng: &mut Lcg, rows: usize, k: usize) -> (Vec<Vec<u8>>, Vec<u8>) {
        let kp = padded_len(k);
        let codes: Vec<Vec<u8>> = (0..rows)
            .map(|_| (0..k).map(|_| (rng.next() % 3) as u8).collect())
            .collect();
        let mut packed = vec![0u8; rows * kp / 4];
        for (r, c) in codes.iter().enumerate() {
            pack_row(c, &mut packed[r * kp / 4..(r + 1) * kp / 4]);
        }
        (codes, packed)
    }

    #[test]
    fn pack_then_read_back() {
        let mut rng = Lcg(1);
        let (codes, packed) = random_matrix(&mut rng, 3, 300);
        let kp = padded_len(300);
        for (r, c) in codes.iter().enumerate() {
            for e in 0..kp {
                assert_eq!(
                    code_at(&packed[r * kp / 4..], e),
                    c.get(e).copied().unwrap_or(1)
                );
            }
        }
    }

    /// Every implementation against a plain sum over the unpacked codes, on odd shapes
    /// (rows and token counts that are not multiples of any tile, row lengths that need padding)
    /// and extreme activations (-128 and 127).
    #[test]
    fn all_kernels_match_the_naive_sum() {
        let mut rng = Lcg(42);
        let mut isas = vec![Isa::Scalar];
        if Isa::detect() != Isa::Scalar {
            isas.push(Isa::detect());
        }
        for &(rows, k, n_tok) in &[
            (1, 1, 1),
            (7, 129, 3),
            (13, 688, 5),
            (33, 256, 9),
            (5, 2560, 4),
            (64, 640, 1),
        ] {
            let kp = padded_len(k);
            let (codes, packed) = random_matrix(&mut rng, rows, k);
            let mut q = vec![0i8; n_tok * kp];
            for t in 0..n_tok {
                for e in 0..k {
                    q[t * kp + e] = match rng.next() % 10 {
                        0 => -128,
                        1 => 127,
                        _ => (rng.next() % 255) as i32 as i8,
                    };
                }
            }
            let qsum: Vec<i32> = (0..n_tok)
                .map(|t| q[t * kp..(t + 1) * kp].iter().map(|&v| v as i32).sum())
                .collect();
            let mut want = vec![0i32; n_tok * rows];
            for t in 0..n_tok {
                for r in 0..rows {
                    want[t * rows + r] = (0..k)
                        .map(|e| (codes[r][e] as i32 - 1) * q[t * kp + e] as i32)
                        .sum();
                }
            }
            for &isa in &isas {
                let mut got = vec![0i32; n_tok * rows];
                gemm(
                    isa,
                    TernaryView::new(&packed, rows, kp),
                    &q,
                    &qsum,
                    n_tok,
                    &mut got,
                );
                assert_eq!(got, want, "{} rows={rows} k={k} n_tok={n_tok}", isa.name());
            }
        }
    }
}
