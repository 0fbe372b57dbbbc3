//! int8 activations x ternary weights kept in llama.cpp's TQ1_0 form (1.69 bits per weight),
//! used straight from the file.
//!
//! Layout (ggml's `block_tq1_0`): 256 weights in 54 bytes, `qs[48]`, `qh[4]`, f16 `d`. Byte m
//! of `qs[0..32]` holds the trits of weights m, 32+m, ..., 128+m; byte m of `qs[32..48]` those
//! of 160+m, 176+m, ..., 224+m; byte m of `qh` those of 240+m, 244+m, 248+m, 252+m. A byte is
//! its trits as a base-3 number scaled by 256/243 and rounded up, most significant first, so
//! trit n of byte x is `((x * 3^n mod 256) * 3) >> 8`. The trit is the weight's code `w + 1`,
//! as in the 2-bit layout of [`crate::ternary`], so `sum w*q = sum c*q - sum q` here too.
//!
//! By default the engine repacks TQ1_0 to the 2-bit layout at load, which is faster to compute
//! with; `--tq1-native` uses these kernels instead, for people who picked TQ1_0 for its size:
//! the 2-bit copy holds 0.31 bits per weight more than the file (80 MiB for 2B4T). The price
//! is decode work: about ten vector operations per 32 weights instead of about four.
//!
//! Decoding without multiplies (AVX2): with `x' = x ^ 0x80` read as i8, `x * 3 mod 256` in
//! that flipped form is just `x' * 3 mod 256` (because 3 * 128 = 128 mod 256): two byte adds.
//! The top trit `(3x) >> 8` is `[x >= 86] + [x >= 171]`, that is `[x' > -43] + [x' > 42]`:
//! two signed byte compares, whose masks (0 or -1) add to minus the trit.

use crate::ternary::{Isa, TernaryView};

/// Weights per block.
pub const BLOCK: usize = 256;
/// Bytes per block: 48 + 4 bytes of trits and the f16 scale.
pub const BLOCK_BYTES: usize = 54;

/// Bytes of one row of `k` weights (`k` a multiple of [`BLOCK`]).
pub fn row_bytes(k: usize) -> usize {
    k / BLOCK * BLOCK_BYTES
}

const POW3: [u8; 5] = [1, 3, 9, 27, 81];

/// Code (trit 0..=2) of element `e` of a row.
#[inline]
pub fn code_at(row: &[u8], e: usize) -> u8 {
    let blk = &row[e / BLOCK * BLOCK_BYTES..];
    let e = e % BLOCK;
    let (byte, n) = if e < 160 {
        (blk[e % 32], e / 32)
    } else if e < 240 {
        (blk[32 + (e - 160) % 16], (e - 160) / 16)
    } else {
        (blk[48 + (e - 240) % 4], (e - 240) / 4)
    };
    trit(byte, n)
}

/// Trit n of byte x.
const fn trit(x: u8, n: usize) -> u8 {
    ((x.wrapping_mul(POW3[n]) as u16 * 3) >> 8) as u8
}

/// Which bytes hold only ones (weight 0) in their first `n` trits: `ONES[0]` for the 5-trit
/// `qs` bytes, `ONES[1]` for the 4-trit `qh` bytes.
const ONES: [[bool; 256]; 2] = {
    let mut t = [[false; 256]; 2];
    let mut x = 0;
    while x < 256 {
        let mut n = 0;
        while n < 5 && trit(x as u8, n) == 1 {
            n += 1;
        }
        t[0][x] = n == 5;
        t[1][x] = n >= 4;
        x += 1;
    }
    t
};

/// Do these whole blocks hold only zero weights (every code 1)? Their scales are ignored.
pub fn all_codes_one(blocks: &[u8]) -> bool {
    blocks.chunks_exact(BLOCK_BYTES).all(|b| {
        b[..48].iter().all(|&x| ONES[0][x as usize])
            && b[48..52].iter().all(|&x| ONES[1][x as usize])
    })
}

/// [`crate::ternary::gemm_rows`] for this layout. AVX-512 CPUs run the AVX2 kernel.
pub(crate) fn gemm_rows(
    isa: Isa,
    w: TernaryView,
    q: &[i8],
    qsum: &[i32],
    n_tok: usize,
    rows: std::ops::Range<usize>,
    out: &mut [i32],
) {
    match isa {
        Isa::Scalar => crate::ternary::gemm_rows_scalar(w, q, n_tok, rows, out),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni => {
            assert!(
                Isa::Avx2.is_available(),
                "AVX2 kernel on a CPU without AVX2"
            );
            // SAFETY: the CPU has AVX2; `gemm_rows` checked that `w` holds `w.rows` rows of
            // `kp / 256` blocks, `q` `n_tok` rows of `kp` and `out` `n_tok * w.rows` values.
            unsafe { avx2::gemm(w, q, qsum, n_tok, rows, out) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("x86 kernel selected on a non-x86 CPU"),
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::{BLOCK, BLOCK_BYTES};
    use crate::ternary::avx2::{hsum8, hsum_epi32};
    use crate::ternary::TernaryView;
    use std::arch::x86_64::*;

    /// Blocks per k-chunk of the blocked GEMM (`ternary::avx2::gemm_blocked`): one block adds
    /// at most 8 * 2 * 2 * 128 = 4096 in magnitude to a lane of an i16 accumulator, so 7
    /// blocks (28672) need no widening; eight tokens' activations for a chunk (14 KiB) stay in
    /// L1, and 256 rows' bytes for it (95 KiB) in L2.
    pub(crate) const CHUNK: usize = 7;

    /// The codes of the top trit of every byte of `s` (flipped form, see the module docs).
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn top_trits(s: __m256i) -> __m256i {
        let lo = _mm256_cmpgt_epi8(s, _mm256_set1_epi8(-43));
        let hi = _mm256_cmpgt_epi8(s, _mm256_set1_epi8(42));
        _mm256_abs_epi8(_mm256_add_epi8(lo, hi))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn times3(s: __m256i) -> __m256i {
        _mm256_add_epi8(_mm256_add_epi8(s, s), s)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn times3_128(s: __m128i) -> __m128i {
        _mm_add_epi8(_mm_add_epi8(s, s), s)
    }

    /// `sum c*q` of one row against T tokens over blocks `b0..b1` (at most [`CHUNK`]), as
    /// i32 vectors (one per token, to be summed across lanes). Each block is decoded once into
    /// eight vectors of 32 codes that line up with eight consecutive 32-activation chunks.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn chunk<const T: usize>(
        w: *const u8,
        q: &[*const i8; T],
        b0: usize,
        b1: usize,
    ) -> [__m256i; T] {
        debug_assert!(b1 - b0 <= CHUNK);
        let flip = _mm256_set1_epi8(-128);
        let mut acc = [_mm256_setzero_si256(); T];
        for b in b0..b1 {
            let blk = w.add(BLOCK_BYTES * b);
            let off = BLOCK * b;
            let mut mac = |c: __m256i, at: usize| {
                for j in 0..T {
                    let qv = _mm256_loadu_si256(q[j].add(off + at) as *const __m256i);
                    acc[j] = _mm256_add_epi16(acc[j], _mm256_maddubs_epi16(c, qv));
                }
            };
            // qs[0..32]: trits 0..4 -> weights 0..160, 32 at a time.
            let mut s = _mm256_xor_si256(_mm256_loadu_si256(blk as *const __m256i), flip);
            for g in 0..5 {
                mac(top_trits(s), 32 * g);
                if g < 4 {
                    s = times3(s);
                }
            }
            // qs[32..48] in both halves, the high half one trit ahead: trits (0, 1) -> weights
            // 160..192, (2, 3) -> 192..224.
            let h = _mm_xor_si128(
                _mm_loadu_si128(blk.add(32) as *const __m128i),
                _mm256_castsi256_si128(flip),
            );
            let mut s = _mm256_set_m128i(times3_128(h), h);
            mac(top_trits(s), 160);
            s = times3(times3(s));
            mac(top_trits(s), 192);
            // Weights 224..240 (trit 4 of qs[32..48]: the low half times 9) and 240..256: qh's
            // four bytes repeated, each 32-bit group one trit further (times 1, 3, 9, 27).
            // Bytes times per-group constants: 16-bit products, even and odd bytes apart.
            let t4 = times3_128(times3_128(_mm256_castsi256_si128(s)));
            let qh = _mm_xor_si128(
                _mm_set1_epi32(std::ptr::read_unaligned(blk.add(48) as *const i32)),
                _mm256_castsi256_si128(flip),
            );
            let pow = _mm_set_epi16(27, 27, 9, 9, 3, 3, 1, 1);
            let odd_mask = _mm_set1_epi16(0xFF00u16 as i16);
            let even = _mm_andnot_si128(odd_mask, _mm_mullo_epi16(qh, pow));
            let odd = _mm_mullo_epi16(_mm_and_si128(qh, odd_mask), pow);
            let qh = _mm_or_si128(even, odd);
            mac(top_trits(_mm256_set_m128i(qh, t4)), 224);
        }
        let ones = _mm256_set1_epi16(1);
        let mut wide = [_mm256_setzero_si256(); T];
        for j in 0..T {
            wide[j] = _mm256_madd_epi16(acc[j], ones);
        }
        wide
    }

    /// [`chunk`] summed across lanes: one i32 per token (the blocked GEMM's row kernel).
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn chunk_sums<const T: usize>(
        w: *const u8,
        q: &[*const i8; T],
        b0: usize,
        b1: usize,
    ) -> [i32; 8] {
        let mut all = [_mm256_setzero_si256(); 8];
        all[..T].copy_from_slice(&chunk::<T>(w, q, b0, b1));
        let mut s = [0i32; 8];
        _mm256_storeu_si256(s.as_mut_ptr() as *mut __m256i, hsum8(&all));
        s
    }

    /// Decode (fewer than four tokens): one row at a time, so the weights are one sequential
    /// stream. Prompts: the 2-bit layout's blocked GEMM over these blocks, so each block is
    /// decoded once per group of up to eight tokens.
    ///
    /// # Safety
    /// AVX2; sizes as checked by `ternary::gemm_rows`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn gemm(
        w: TernaryView,
        q: &[i8],
        qsum: &[i32],
        n_tok: usize,
        rows: std::ops::Range<usize>,
        out: &mut [i32],
    ) {
        let nb = w.kp / BLOCK;
        let rb = super::row_bytes(w.kp);
        if n_tok < 4 {
            for r in rows {
                let row = w.data.as_ptr().add(r * rb);
                for t in 0..n_tok {
                    let tok = [q.as_ptr().add(t * w.kp)];
                    let mut sum = _mm256_setzero_si256();
                    for b0 in (0..nb).step_by(CHUNK) {
                        let b1 = (b0 + CHUNK).min(nb);
                        sum = _mm256_add_epi32(sum, chunk::<1>(row, &tok, b0, b1)[0]);
                    }
                    out[t * w.rows + r] = hsum_epi32(sum) - qsum[t];
                }
            }
        } else {
            crate::ternary::avx2::gemm_blocked::<{ crate::ternary::avx2::TQ1 }>(
                w, q, qsum, n_tok, rows, out,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ternary::gemm;
    use crate::test_rng::Lcg;
    use bitnet_formats::codecs;

    /// Every byte value and trit position agrees with the format crate's decoder (which the
    /// format tests check against ggml's encoder).
    #[test]
    fn code_at_matches_the_format_decoder() {
        let mut rng = Lcg(5);
        let blk: Vec<u8> = (0..2 * BLOCK_BYTES)
            .map(|i| if i < 256 { i as u8 } else { rng.next() as u8 })
            .collect();
        for b in 0..2 {
            for e in 0..BLOCK {
                assert_eq!(
                    code_at(&blk, b * BLOCK + e),
                    codecs::tq1_code(&blk[b * BLOCK_BYTES..], e),
                    "block {b} element {e}"
                );
            }
        }
    }

    /// `all_codes_one` is exactly "every code decodes to 1", on blocks of all ones with one
    /// byte changed to every other value.
    #[test]
    fn zero_blocks_are_recognised() {
        let mut zero = Vec::new();
        codecs::encode_tq1_0_row(&[1; BLOCK], 0.0, &mut zero).unwrap();
        assert!(all_codes_one(&zero));
        for at in 0..52 {
            for x in 0..=255u8 {
                let mut b = zero.clone();
                b[at] = x;
                let ones = (0..BLOCK).all(|e| code_at(&b, e) == 1);
                assert_eq!(all_codes_one(&b), ones, "byte {at} = {x}");
            }
        }
    }

    /// Rows of `k` random codes (a third each) encoded with the format crate's TQ1_0 encoder.
    fn random_matrix(
        rng: &mut Lcg,
        rows: usize,
        k: usize,
        pick: impl Fn(u64) -> u8,
    ) -> (Vec<Vec<u8>>, Vec<u8>) {
        let codes: Vec<Vec<u8>> = (0..rows)
            .map(|_| (0..k).map(|_| pick(rng.next())).collect())
            .collect();
        let mut data = Vec::new();
        for c in &codes {
            codecs::encode_tq1_0_row(c, 0.5, &mut data).unwrap();
        }
        assert_eq!(data.len(), rows * row_bytes(k));
        (codes, data)
    }

    /// Odd shapes: row counts that are not multiples of a row chunk, one block and long rows
    /// (several k-chunks, uneven), token counts of every token-group remainder.
    const SHAPES: &[(usize, usize, usize)] = &[
        (1, 256, 1),
        (7, 512, 3),
        (13, 2560, 5),
        (33, 256, 9),
        (5, 6912, 4),
        (64, 1792, 1),
        (6, 2048, 7),
        (2, 6912, 2),
        (300, 2304, 11),
        (261, 768, 6),
        (9, 1024, 37),
    ];

    /// Every implementation this CPU runs against a plain sum over the codes the encoder was
    /// given (so the kernels and the encoder agree on the layout), on 1, 2 and 3 threads.
    #[test]
    fn all_kernels_match_the_naive_sum() {
        let mut rng = Lcg(42);
        let cases: Vec<_> = SHAPES
            .iter()
            .map(|&(rows, k, n_tok)| {
                let (codes, data) = random_matrix(&mut rng, rows, k, |x| (x % 3) as u8);
                let q: Vec<i8> = (0..n_tok * k)
                    .map(|_| match rng.next() % 10 {
                        0 => -128,
                        1 => 127,
                        _ => (rng.next() % 255) as i32 as i8,
                    })
                    .collect();
                (rows, k, n_tok, codes, data, q)
            })
            .collect();
        for threads in [1, 2, 3] {
            let tp = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for (rows, k, n_tok, codes, data, q) in &cases {
                let (rows, k, n_tok) = (*rows, *k, *n_tok);
                let qsum: Vec<i32> = q
                    .chunks(k)
                    .map(|t| t.iter().map(|&v| v as i32).sum())
                    .collect();
                let mut want = vec![0i32; n_tok * rows];
                for t in 0..n_tok {
                    for r in 0..rows {
                        want[t * rows + r] = (0..k)
                            .map(|e| (codes[r][e] as i32 - 1) * q[t * k + e] as i32)
                            .sum();
                    }
                }
                for isa in Isa::all_available() {
                    let mut got = vec![0i32; n_tok * rows];
                    tp.install(|| {
                        gemm(
                            isa,
                            TernaryView::tq1(data, rows, k),
                            q,
                            &qsum,
                            n_tok,
                            &mut got,
                        )
                    });
                    assert_eq!(
                        got,
                        want,
                        "{} t={threads} rows={rows} k={k} n_tok={n_tok}",
                        isa.name()
                    );
                }
            }
        }
    }

    /// Worst-case accumulation: all codes +1 or -1 against all -128 or 127 on long rows, at
    /// the i16 accumulators' limits (a whole k-chunk of 7 blocks).
    #[test]
    fn extreme_values_do_not_overflow() {
        let (rows, k) = (3, 6912);
        let build = |code| random_matrix(&mut Lcg(1), rows, k, |_| code).1;
        crate::ternary::tests::assert_extremes_exact(rows, k, build, |d, r, k| {
            TernaryView::tq1(d, r, k)
        });
    }
}
