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

    /// The AVX2 + FMA (+ F16C for f16) version of [`attention_rows`] for this element type.
    #[cfg(target_arch = "x86_64")]
    #[doc(hidden)]
    unsafe fn rows_avx2(a: &AttnArgs<Self>, scores: &mut [f32], out: &mut [f32]);
}

impl KvElem for f32 {
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn rows_avx2(a: &AttnArgs<f32>, scores: &mut [f32], out: &mut [f32]) {
        attn_f32_avx2::rows(a, scores, out)
    }
}

impl KvElem for f16 {
    #[inline]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    unsafe fn rows_avx2(a: &AttnArgs<f16>, scores: &mut [f32], out: &mut [f32]) {
        attn_f16_avx2::rows(a, scores, out)
    }
}

/// One call of [`attention_rows`]: query rows that read the same keys and values (the query
/// heads of one KV head, for one or more tokens of one sequence).
pub struct AttnArgs<'a, T> {
    /// Head size.
    pub hd: usize,
    /// Row r's query is `q[q_off[r]..][..hd]` ...
    pub q: &'a [f32],
    pub q_off: &'a [usize],
    /// ... and it attends to keys and values `0..n_keys[r]` (at least one).
    pub n_keys: &'a [usize],
    /// Key j is `keys[j * stride..][..hd]`, value j `values[j * stride..][..hd]` (KV cache
    /// rows, already offset to this KV head).
    pub keys: &'a [T],
    pub values: &'a [T],
    pub stride: usize,
    /// Multiplies every score (1 / sqrt(hd)).
    pub scale: f32,
}

/// Causal attention of several query rows against the same keys and values:
/// `out[r * hd..][..hd] = softmax(scale * q_r K^T) V` over row r's first `n_keys[r]` keys.
///
/// The SIMD kernel works on tiles of four rows, so each key and value element is loaded once
/// for four rows instead of once per row (grouped-query attention shares every KV head between
/// several query heads, and the tokens of a prompt share the keys before them). A row's result
/// is bit-for-bit the same whichever other rows share the call, so batching stays invariant.
/// `scores` is scratch, resized here.
pub fn attention_rows<T: KvElem>(
    isa: Isa,
    a: &AttnArgs<T>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let (hd, rows) = (a.hd, a.n_keys.len());
    let max_keys = a.n_keys.iter().copied().max().unwrap_or(0);
    // Checked arithmetic: the SIMD code relies on these bounds.
    let fits =
        |start: Option<usize>, len: usize| start.and_then(|s| s.checked_add(hd)) <= Some(len);
    assert_eq!(a.q_off.len(), rows);
    assert!(rows.checked_mul(hd).is_some_and(|n| n <= out.len()));
    assert!(a.q_off.iter().all(|&o| fits(Some(o), a.q.len())));
    assert!(a.n_keys.iter().all(|&n| n >= 1));
    if let Some(j) = max_keys.checked_sub(1) {
        let last = j.checked_mul(a.stride);
        assert!(fits(last, a.keys.len()) && fits(last, a.values.len()));
    }
    let Some(n_scores) = rows.checked_mul(max_keys) else {
        panic!("attention_rows: {rows} rows x {max_keys} keys overflow")
    };
    scores.resize(n_scores, 0.0);
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512Vnni if has_f16c() => unsafe { T::rows_avx2(a, scores, out) },
        _ => attention_rows_scalar(a, scores, out),
    }
}

/// The scalar reference: one row at a time, every product in order.
fn attention_rows_scalar<T: KvElem>(a: &AttnArgs<T>, scores: &mut [f32], out: &mut [f32]) {
    let (hd, stride) = (a.hd, a.stride);
    for (r, &n) in a.n_keys.iter().enumerate() {
        let q = &a.q[a.q_off[r]..][..hd];
        let p = &mut scores[..n];
        for (j, sc) in p.iter_mut().enumerate() {
            *sc = dot_kv(q, &a.keys[j * stride..][..hd]) * a.scale;
        }
        softmax(p);
        let o = &mut out[r * hd..][..hd];
        o.fill(0.0);
        for (j, &pj) in p.iter().enumerate() {
            for (o, v) in o.iter_mut().zip(&a.values[j * stride..][..hd]) {
                *o += pj * v.to_f32();
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

/// The AVX2 [`attention_rows`] for one cache element type; `$load(ptr)` reads eight elements
/// as f32. Every (row, key) score and every output element is computed by the same sequence
/// of operations whatever tile it falls in (batch invariance).
macro_rules! attn_rows_avx2 {
    ($module:ident, $t:ty, $features:literal, $load:expr) => {
        #[cfg(target_arch = "x86_64")]
        mod $module {
            use super::{softmax_avx2, AttnArgs, KvElem};
            #[allow(unused_imports)]
            use half::f16;
            use std::arch::x86_64::*;

            /// Rows per tile: four rows' accumulators for three keys, or for 16 outputs, fit
            /// in the 16 vector registers with the shared loads.
            const TILE_ROWS: usize = 4;
            const TILE_KEYS: usize = 3;
            /// Keys per block of the value pass: 32 values of a 128-wide head are 16 KiB in
            /// f32, half of a 32 KiB L1.
            const KEY_BLOCK: usize = 32;
            /// How many keys ahead the score pass prefetches.
            const KEY_PREFETCH: usize = 12;

            /// Every cache line of one head's key or value row (`hd` elements). A head's rows
            /// are a few hundred bytes at the cache's row stride (all heads' rows of one
            /// position), a pattern the hardware prefetchers follow poorly: at 2048 positions
            /// of 2B4T's f32 cache, attention waited on these misses for half of a token.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn prefetch_row(row: *const $t, hd: usize) {
                let bytes = hd * std::mem::size_of::<$t>();
                for off in (0..bytes).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>((row as *const i8).wrapping_add(off));
                }
            }

            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn load8(p: *const $t) -> __m256 {
                let load = $load;
                load(p)
            }

            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn hsum(v: __m256) -> f32 {
                let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
                let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
                _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)))
            }

            /// `K` keys against `R` query rows, each key chunk loaded once for all rows.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn score_tile<const R: usize, const K: usize>(
                hd: usize,
                q: [*const f32; R],
                k: [*const $t; K],
                scale: f32,
                scores: [*mut f32; R],
            ) {
                let mut acc = [[_mm256_setzero_ps(); K]; R];
                let mut d = 0;
                while d + 8 <= hd {
                    let mut kv = [_mm256_setzero_ps(); K];
                    for (i, kv) in kv.iter_mut().enumerate() {
                        *kv = load8(k[i].add(d));
                    }
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let qv = _mm256_loadu_ps(q[r].add(d));
                        for (acc, kv) in acc.iter_mut().zip(&kv) {
                            *acc = _mm256_fmadd_ps(qv, *kv, *acc);
                        }
                    }
                    d += 8;
                }
                for (r, acc) in acc.iter().enumerate() {
                    for (i, acc) in acc.iter().enumerate() {
                        let mut s = hsum(*acc);
                        for e in d..hd {
                            s += *q[r].add(e) * KvElem::to_f32(*k[i].add(e));
                        }
                        *scores[r].add(i) = s * scale;
                    }
                }
            }

            /// Scores of `R` rows against keys `0..n`, three keys at a time.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn score_rows<const R: usize>(
                a: &AttnArgs<$t>,
                q: [*const f32; R],
                n: usize,
                scores: [*mut f32; R],
            ) {
                let key = |j: usize| a.keys.as_ptr().add(j * a.stride);
                let at = |j: usize| scores.map(|s| s.add(j));
                let mut j = 0;
                while j + TILE_KEYS <= n {
                    for ahead in j + KEY_PREFETCH..(j + KEY_PREFETCH + TILE_KEYS).min(n) {
                        prefetch_row(key(ahead), a.hd);
                    }
                    score_tile::<R, 3>(a.hd, q, [key(j), key(j + 1), key(j + 2)], a.scale, at(j));
                    j += TILE_KEYS;
                }
                match n - j {
                    2 => score_tile::<R, 2>(a.hd, q, [key(j), key(j + 1)], a.scale, at(j)),
                    1 => score_tile::<R, 1>(a.hd, q, [key(j)], a.scale, at(j)),
                    _ => {}
                }
            }

            /// `out_r = sum_j p_r[j] value_j` for `R` rows, row r over values `0..n[r]`; each
            /// value chunk is loaded once for all rows, 16 outputs at a time, then 8, then one
            /// by one. A row never touches a value past its own keys (a masked-out value may be
            /// inf, and 0 * inf would poison the sum), and its sum runs in the same order
            /// whatever rows share the tile.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn value_rows<const R: usize>(
                a: &AttnArgs<$t>,
                p: [*const f32; R],
                n: [usize; R],
                out: [*mut f32; R],
            ) {
                let (hd, v) = (a.hd, a.values.as_ptr());
                let shared = n.iter().copied().min().unwrap_or(0);
                let longest = n.iter().copied().max().unwrap_or(0);
                // 16 outputs of R rows fill the registers, so the values are passed once per
                // 16 columns (8 times for a 128-wide head). Over keys in blocks whose values
                // stay in L1, only the first pass reads them from memory; the running sums go
                // through `out` between blocks (exact f32, the same additions in the same
                // order: ascending keys per output element).
                let wide = hd / 16 * 16;
                let value = |j: usize| v.add(j * a.stride);
                for j in 0..KEY_BLOCK.min(longest) {
                    prefetch_row(value(j), hd);
                }
                let mut j0 = 0;
                while j0 < longest && wide > 0 {
                    let j1 = (j0 + KEY_BLOCK).min(longest);
                    for c in (0..wide).step_by(16) {
                        let mut acc = [[_mm256_setzero_ps(); 2]; R];
                        if j0 > 0 {
                            for (r, acc) in acc.iter_mut().enumerate() {
                                acc[0] = _mm256_loadu_ps(out[r].add(c));
                                acc[1] = _mm256_loadu_ps(out[r].add(c + 8));
                            }
                        }
                        for j in j0..j1.min(shared) {
                            // The same columns of the next block's values, a block ahead.
                            if j + KEY_BLOCK < longest {
                                let ahead = value(j + KEY_BLOCK).add(c);
                                _mm_prefetch::<_MM_HINT_T0>(ahead as *const i8);
                            }
                            let row = value(j).add(c);
                            let (v0, v1) = (load8(row), load8(row.add(8)));
                            for (r, acc) in acc.iter_mut().enumerate() {
                                let w = _mm256_broadcast_ss(&*p[r].add(j));
                                acc[0] = _mm256_fmadd_ps(w, v0, acc[0]);
                                acc[1] = _mm256_fmadd_ps(w, v1, acc[1]);
                            }
                        }
                        for (r, acc) in acc.iter_mut().enumerate() {
                            for j in j0.max(shared)..j1.min(n[r]) {
                                let row = value(j).add(c);
                                let w = _mm256_broadcast_ss(&*p[r].add(j));
                                acc[0] = _mm256_fmadd_ps(w, load8(row), acc[0]);
                                acc[1] = _mm256_fmadd_ps(w, load8(row.add(8)), acc[1]);
                            }
                            _mm256_storeu_ps(out[r].add(c), acc[0]);
                            _mm256_storeu_ps(out[r].add(c + 8), acc[1]);
                        }
                    }
                    j0 = j1;
                }
                let mut c = wide;
                if c + 8 <= hd {
                    for r in 0..R {
                        let mut acc = _mm256_setzero_ps();
                        for j in 0..n[r] {
                            let w = _mm256_broadcast_ss(&*p[r].add(j));
                            acc = _mm256_fmadd_ps(w, load8(v.add(j * a.stride + c)), acc);
                        }
                        _mm256_storeu_ps(out[r].add(c), acc);
                    }
                    c += 8;
                }
                for e in c..hd {
                    for r in 0..R {
                        let mut o = 0f32;
                        for j in 0..n[r] {
                            o += *p[r].add(j) * KvElem::to_f32(*v.add(j * a.stride + e));
                        }
                        *out[r].add(e) = o;
                    }
                }
            }

            /// One tile: scores (up to the tile's longest row; a row's scores past its own
            /// keys are never read), softmax over each row's own keys, values.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn tile<const R: usize>(
                a: &AttnArgs<$t>,
                r0: usize,
                scores: &mut [f32],
                ld: usize,
                out: &mut [f32],
            ) {
                let n_keys = &a.n_keys[r0..r0 + R];
                let n = n_keys.iter().copied().max().unwrap_or(0);
                let q: [*const f32; R] = std::array::from_fn(|i| a.q.as_ptr().add(a.q_off[r0 + i]));
                let sp = scores.as_mut_ptr();
                let s_rows: [*mut f32; R] = std::array::from_fn(|i| sp.add((r0 + i) * ld));
                score_rows::<R>(a, q, n, s_rows);
                for (i, &ni) in n_keys.iter().enumerate() {
                    softmax_avx2(&mut scores[(r0 + i) * ld..][..ni]);
                }
                let sp = scores.as_ptr();
                let p: [*const f32; R] = std::array::from_fn(|i| sp.add((r0 + i) * ld));
                let op = out.as_mut_ptr();
                let o: [*mut f32; R] = std::array::from_fn(|i| op.add((r0 + i) * a.hd));
                value_rows::<R>(a, p, std::array::from_fn(|i| n_keys[i]), o);
            }

            /// [`super::attention_rows`] on AVX2: the arguments are checked there.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn rows(a: &AttnArgs<$t>, scores: &mut [f32], out: &mut [f32]) {
                let rows = a.n_keys.len();
                let ld = scores.len() / rows.max(1);
                let mut r0 = 0;
                while r0 + TILE_ROWS <= rows {
                    tile::<4>(a, r0, scores, ld, out);
                    r0 += TILE_ROWS;
                }
                match rows - r0 {
                    3 => tile::<3>(a, r0, scores, ld, out),
                    2 => tile::<2>(a, r0, scores, ld, out),
                    1 => tile::<1>(a, r0, scores, ld, out),
                    _ => {}
                }
            }
        }
    };
}

attn_rows_avx2!(attn_f32_avx2, f32, "avx2,fma", |r: *const f32| {
    _mm256_loadu_ps(r)
});
attn_rows_avx2!(attn_f16_avx2, f16, "avx2,fma,f16c", |r: *const f16| {
    _mm256_cvtph_ps(_mm_loadu_si128(r as *const __m128i))
});

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
    // SAFETY: the row holds x.len() f16 values (checked above).
    unsafe { dot_f16_tokens::<1>(isa, row.as_ptr(), &[x.as_ptr()], x.len())[0] }
}

/// One f16 row dotted with T inputs of `n` values: each chunk of the row is converted once for
/// the T inputs. Every input's arithmetic is that of [`dot_f16`] (same accumulators, same
/// order), so a token's logits do not depend on how many tokens share the call.
///
/// # Safety
/// `row` holds `n` f16 values and each `xs[j]` `n` f32 values.
unsafe fn dot_f16_tokens<const T: usize>(
    isa: Isa,
    row: *const u8,
    xs: &[*const f32; T],
    n: usize,
) -> [f32; T] {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if has_f16c() => dot_f16_avx2::<T>(row, xs, n),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => avx512::dot_f16::<T>(row, xs, n),
        _ => xs.map(|x| {
            dot_f16_scalar(
                std::slice::from_raw_parts(row, 2 * n),
                std::slice::from_raw_parts(x, n),
            )
        }),
    }
}

/// Inputs per kernel call of the f16 head with several tokens (batched decoding, perplexity):
/// each row is converted from f16 once for this many inputs, whose f32 values (2 x 10 KB for
/// 2B4T) stay in L1 with the row. On AVX-512 the call takes [`F16_TILE_ROWS`] rows.
const F16_TOKENS: usize = 2;

/// Rows per chunk of the f16 head with several tokens: the chunk (320 KB for 2B4T) comes from
/// memory once and from L2 for each later pair of tokens. (`kbench head`, eight tokens, one
/// thread on Zen 4: 170-203 ms with one row against every token in turn, 140-150 ms so.)
const F16_ROW_CHUNK: usize = 64;

/// `out[t * rows + r] = row_r . x_t` for a row-major little-endian f16 matrix (`data`:
/// `rows * cols * 2` bytes) and `n_tok` inputs of `cols` values: the F16 output head. Rows are
/// split over the worker pool and read one after another: one sequential stream from memory.
/// (Four rows side by side, sharing the input loads, read 14 GB/s on a Zen 4 core where one
/// row at a time reads 23: four interleaved 5 KB streams are too many for its prefetchers; the
/// Q8_0 and Q6_K heads found the same.) Several inputs pass over chunks of
/// [`F16_ROW_CHUNK`] rows two at a time ([`F16_TOKENS`]); on AVX-512 in register tiles of
/// four rows ([`F16_TILE_ROWS`]), four interleaved streams only on the chunk's first pass (the
/// later passes read it from L2).
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
    pool::for_ranges(rows, 4, 256, |range| {
        let p = out_ptr.get();
        let xp = |t: usize| x[t * cols..(t + 1) * cols].as_ptr();
        let mut r0 = range.start;
        while r0 < range.end {
            let chunk = r0..(r0 + F16_ROW_CHUNK).min(range.end);
            let mut t = 0;
            while t < n_tok {
                let nt = if t + F16_TOKENS <= n_tok {
                    F16_TOKENS
                } else {
                    1
                };
                #[cfg(target_arch = "x86_64")]
                if isa == Isa::Avx512Vnni && nt == F16_TOKENS {
                    // SAFETY: as below; the CPU has AVX-512 F (Isa::Avx512Vnni).
                    unsafe { f16_tile_rows(data, rows, cols, chunk.clone(), &xp, t, p) };
                    t += nt;
                    continue;
                }
                for r in chunk.clone() {
                    let row = data[r * cols * 2..(r + 1) * cols * 2].as_ptr();
                    // SAFETY: rows of `cols` f16 values and inputs of `cols` f32 (checked
                    // above); (t, r) pairs are disjoint between parts; `out` outlives the job.
                    unsafe {
                        if nt == F16_TOKENS {
                            let xs = std::array::from_fn(|j| xp(t + j));
                            let v = dot_f16_tokens::<F16_TOKENS>(isa, row, &xs, cols);
                            for (j, &vj) in v.iter().enumerate() {
                                *p.add((t + j) * rows + r) = vj;
                            }
                        } else {
                            *p.add(t * rows + r) = dot_f16_tokens::<1>(isa, row, &[xp(t)], cols)[0];
                        }
                    }
                }
                t += nt;
            }
            r0 = chunk.end;
        }
    });
}

/// Rows of the AVX-512 register tile of the f16 head with several tokens (this many rows x
/// [`F16_TOKENS`] inputs). 16 accumulators, 8 converted row and 2 input registers fit the 32
/// zmm registers; each loaded input value serves four rows, each converted row value two
/// inputs, and two inputs (20 KB for 2B4T) stay in L1. `kbench head`, eight tokens, Zen 4:
/// 137-147 ms with one row at a time, 100 ms so (one thread); 62-72 → 51 ms (two). Four
/// inputs x two rows measured 125-132 ms (four inputs no longer fit L1).
const F16_TILE_ROWS: usize = 4;

/// Tokens `t..t + F16_TOKENS` against the rows of `chunk`, in AVX-512 tiles of
/// [`F16_TILE_ROWS`] rows (a last odd row alone), results into `out` (`t * rows + r`).
///
/// # Safety
/// The CPU has AVX-512 F; `data` holds `rows` rows of `cols` f16 values, `xp(t)` `cols` f32;
/// `out` holds `n_tok * rows` values, and no other thread writes these (t, r) pairs.
#[cfg(target_arch = "x86_64")]
unsafe fn f16_tile_rows(
    data: &[u8],
    rows: usize,
    cols: usize,
    chunk: std::ops::Range<usize>,
    xp: &impl Fn(usize) -> *const f32,
    t: usize,
    out: *mut f32,
) {
    const T: usize = F16_TOKENS;
    let xs: [*const f32; T] = std::array::from_fn(|j| xp(t + j));
    let row = |r: usize| data[r * cols * 2..(r + 1) * cols * 2].as_ptr();
    let mut r = chunk.start;
    while r < chunk.end {
        if r + F16_TILE_ROWS <= chunk.end {
            let hp: [*const u8; F16_TILE_ROWS] = std::array::from_fn(|i| row(r + i));
            let v = avx512::dot_f16_tile::<F16_TILE_ROWS, T>(&hp, &xs, cols);
            for (i, vr) in v.iter().enumerate() {
                for (j, &vj) in vr.iter().enumerate() {
                    *out.add((t + j) * rows + r + i) = vj;
                }
            }
            r += F16_TILE_ROWS;
        } else {
            let v = avx512::dot_f16::<T>(row(r), &xs, cols);
            for (j, &vj) in v.iter().enumerate() {
                *out.add((t + j) * rows + r) = vj;
            }
            r += 1;
        }
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

/// [`dot_f16_tokens`] on AVX2: 16 values per step, two accumulators per input.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c,fma")]
unsafe fn dot_f16_avx2<const T: usize>(hp: *const u8, xs: &[*const f32; T], n: usize) -> [f32; T] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); 2]; T];
    let mut i = 0;
    while i + 16 <= n {
        let h0 = _mm256_cvtph_ps(_mm_loadu_si128(hp.add(2 * i) as *const __m128i));
        let h1 = _mm256_cvtph_ps(_mm_loadu_si128(hp.add(2 * i + 16) as *const __m128i));
        for (a, &xp) in acc.iter_mut().zip(xs) {
            a[0] = _mm256_fmadd_ps(h0, _mm256_loadu_ps(xp.add(i)), a[0]);
            a[1] = _mm256_fmadd_ps(h1, _mm256_loadu_ps(xp.add(i + 8)), a[1]);
        }
        i += 16;
    }
    let mut out = [0f32; T];
    for (o, (a, &xp)) in out.iter_mut().zip(acc.iter().zip(xs)) {
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

/// The AVX-512 f16 dots of R rows with T inputs ([`dot_f16_tokens`] is one row), written
/// once and instantiated with the real intrinsics and, in tests, with the emulated ones
/// (`crate::emu512`). 32 values per step: two `vcvtph2ps zmm` per row shared by the T inputs,
/// two input loads per token shared by the R rows, two accumulators per row and input; the
/// tail (fewer than 32 values) in scalar code. Every (row, input) pair gets the same
/// operations in the same order whatever R and T are (batch invariance).
macro_rules! avx512_f16 {
    ($(#[$attr:meta])*) => {
        $(#[$attr])*
        pub unsafe fn dot_f16_tile<const R: usize, const T: usize>(
            hp: &[*const u8; R],
            xs: &[*const f32; T],
            n: usize,
        ) -> [[f32; T]; R] {
            let mut acc = [[[_mm512_setzero_ps(); 2]; T]; R];
            let mut i = 0;
            while i + 32 <= n {
                let mut h = [[_mm512_setzero_ps(); 2]; R];
                for r in 0..R {
                    let at = hp[r].add(2 * i);
                    h[r][0] = _mm512_cvtph_ps(_mm256_loadu_si256(at as *const __m256i));
                    h[r][1] = _mm512_cvtph_ps(_mm256_loadu_si256(at.add(32) as *const __m256i));
                }
                for j in 0..T {
                    let x0 = _mm512_loadu_ps(xs[j].add(i));
                    let x1 = _mm512_loadu_ps(xs[j].add(i + 16));
                    for r in 0..R {
                        acc[r][j][0] = _mm512_fmadd_ps(h[r][0], x0, acc[r][j][0]);
                        acc[r][j][1] = _mm512_fmadd_ps(h[r][1], x1, acc[r][j][1]);
                    }
                }
                i += 32;
            }
            let mut out = [[0f32; T]; R];
            for r in 0..R {
                for j in 0..T {
                    let xp = xs[j];
                    let mut sum = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][j][0], acc[r][j][1]));
                    for k in i..n {
                        let hk = half::f16::from_le_bytes([*hp[r].add(2 * k), *hp[r].add(2 * k + 1)]);
                        sum += hk.to_f32() * *xp.add(k);
                    }
                    out[r][j] = sum;
                }
            }
            out
        }

        /// One row with T inputs.
        $(#[$attr])*
        pub unsafe fn dot_f16<const T: usize>(hp: *const u8, xs: &[*const f32; T], n: usize) -> [f32; T] {
            dot_f16_tile::<1, T>(&[hp], xs, n)[0]
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

/// `f(t, row)` for the rows of tokens `0..nt` of `buf` (`width` values each), tokens split
/// across the pool's threads when there are enough of them to pay for it. Each token's work
/// is the same however the tokens are split.
pub fn par_token_rows<T: Send>(
    buf: &mut [T],
    nt: usize,
    width: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    /// Tokens per part at least: one token's norm or quantization is a few microseconds.
    const MIN_TOKENS: usize = 4;
    assert!(buf.len() >= nt * width);
    // An address, so the closure is Sync whatever T is.
    let base = buf.as_mut_ptr() as usize;
    pool::for_ranges(nt, 1, MIN_TOKENS, |tokens| {
        for t in tokens {
            // SAFETY: the ranges are disjoint, so each token's row is lent to one call.
            let row =
                unsafe { std::slice::from_raw_parts_mut((base as *mut T).add(t * width), width) };
            f(t, row);
        }
    });
}

/// RMSNorm: `out = x / sqrt(mean(x^2) + eps) * w`, in f32 (the mean accumulated in f64).
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let r = inv_rms(x, eps);
    for ((o, &xi), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = xi * r * wi;
    }
}

/// [`rms_norm`] with the output over its input (the same values, without a copy).
pub fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let r = inv_rms(x, eps);
    for (xi, &wi) in x.iter_mut().zip(w) {
        *xi = *xi * r * wi;
    }
}

fn inv_rms(x: &[f32], eps: f32) -> f32 {
    // Eight running sums: one serial f64 sum waited on the add latency for every value (about
    // 3% of a prompt's time in norms). Each square is exact in f64, so only the order of the
    // additions changes, far below f32's resolution; the order is the same for every call.
    let mut acc = [0f64; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v as f64 * v as f64;
        }
    }
    for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
        *a += v as f64 * v as f64;
    }
    let sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    let ms = (sum / x.len() as f64) as f32;
    1.0 / (ms + eps).sqrt()
}

/// `exp(x)` of eight values at once, for x <= 0 (softmax after subtracting the maximum):
/// Cephes' `expf` (2^n times a degree-6 polynomial on |r| <= ln2/2, within 2 ulp); x below
/// -87.3 gives 0, as the true value is below f32's normal range.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_nonpositive_avx2(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3), _CMP_LT_OQ);
    let x = _mm256_max_ps(x, _mm256_set1_ps(-87.3));
    let n = _mm256_round_ps(
        _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
    );
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm256_set1_ps(1.987_569_1e-4);
    for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let y = _mm256_fmadd_ps(
        _mm256_mul_ps(p, r),
        r,
        _mm256_add_ps(r, _mm256_set1_ps(1.0)),
    );
    let pow2 = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
        23,
    );
    let e = _mm256_mul_ps(y, _mm256_castsi256_ps(pow2));
    _mm256_andnot_ps(underflow, e)
}

/// [`softmax`] with the exponentials eight at a time (the tail as in [`softmax`]); used by
/// the AVX2 attention kernel, the same way for every row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_avx2(x: &mut [f32]) {
    use std::arch::x86_64::*;
    softmax_with(x, |x, m| {
        let (mv, n8) = (_mm256_set1_ps(m), x.len() / 8 * 8);
        let mut acc = _mm256_setzero_ps();
        for c in x[..n8].chunks_exact_mut(8) {
            let e = exp_nonpositive_avx2(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), mv));
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            acc = _mm256_add_ps(acc, e);
        }
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        lanes.iter().sum::<f32>() + exp_shifted(&mut x[n8..], m)
    })
}

/// In-place softmax (max-subtracted).
pub fn softmax(x: &mut [f32]) {
    softmax_with(x, exp_shifted)
}

/// The steps of a softmax around `exps`, which replaces each value v by `exp(v - max)` and
/// returns their sum.
#[inline(always)]
fn softmax_with(x: &mut [f32], exps: impl FnOnce(&mut [f32], f32) -> f32) {
    let m = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let inv = 1.0 / exps(x, m);
    x.iter_mut().for_each(|v| *v *= inv);
}

/// `v = exp(v - m)` for every value, and their sum.
fn exp_shifted(x: &mut [f32], m: f32) -> f32 {
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    sum
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

    /// The head kernel on every ISA (and the AVX-512 one emulated), odd row counts and lengths,
    /// several tokens (pairs and leftovers), against an f64 reference.
    #[test]
    fn f16_matmul_kernels_agree() {
        let mut rng = Lcg(9);
        for (rows, cols, n_tok) in [
            (1, 1, 1),
            (7, 33, 2),
            (13, 100, 3),
            (9, 2560, 1),
            (4, 64, 5),
            (3, 70, 9),
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
            for r in 0..rows {
                let row = bytes[r * cols * 2..].as_ptr();
                for t0 in (0..n_tok.saturating_sub(2)).step_by(3) {
                    let xs: [*const f32; 3] =
                        std::array::from_fn(|j| x[(t0 + j) * cols..].as_ptr());
                    // SAFETY: emulated kernel, a row of `cols` values, inputs of `cols` values.
                    let got = unsafe { avx512_emu::dot_f16::<3>(row, &xs, cols) };
                    for (j, g) in got.iter().enumerate() {
                        let w = want[(t0 + j) * rows + r];
                        assert!((*g as f64 - w).abs() < tol, "emulated avx512: {g} vs {w}");
                    }
                }
            }
            // The register tile (3 rows x 2 inputs here): each (row, input) bit for bit what
            // one row with one input gives.
            for r0 in (0..rows.saturating_sub(2)).step_by(3) {
                let hp: [*const u8; 3] =
                    std::array::from_fn(|i| bytes[(r0 + i) * cols * 2..].as_ptr());
                for t0 in (0..n_tok.saturating_sub(1)).step_by(2) {
                    let xs: [*const f32; 2] =
                        std::array::from_fn(|j| x[(t0 + j) * cols..].as_ptr());
                    // SAFETY: emulated kernel, rows of `cols` values, inputs of `cols` values.
                    let tile = unsafe { avx512_emu::dot_f16_tile::<3, 2>(&hp, &xs, cols) };
                    for (i, tr) in tile.iter().enumerate() {
                        for (j, g) in tr.iter().enumerate() {
                            // SAFETY: as above.
                            let alone =
                                unsafe { avx512_emu::dot_f16::<1>(hp[i], &[xs[j]], cols)[0] };
                            assert_eq!(g.to_bits(), alone.to_bits(), "emulated tile {rows}x{cols}");
                        }
                    }
                }
            }
        }
    }

    /// The F16 head of several tokens at once gives, bit for bit, what each token gives alone:
    /// batching (serve's streams) must not change a logit. Odd shapes: token counts across the
    /// token pairs, row counts across the row chunks and the thread split, lengths with a tail
    /// of fewer than 16 values.
    #[test]
    fn f16_head_of_a_batch_equals_each_token_alone() {
        let mut rng = Lcg(21);
        for (rows, cols, n_tok) in [
            (1, 7, 3),
            (7, 33, 2),
            (67, 100, 5),
            (130, 2560, 4),
            (200, 40, 3),
            (70, 96, 9), // AVX-512: tiles of 4 rows x 2 tokens, a last row and token alone
        ] {
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

    /// Random attention problems: `rows` query rows (offsets into one q buffer, as query heads
    /// of several tokens), each with its own number of keys; KV rows strided as in a cache.
    fn attention_case(
        rng: &mut Lcg,
        hd: usize,
        n_keys: &[usize],
        stride: usize,
    ) -> (Vec<f32>, Vec<usize>, Vec<f32>, Vec<f32>) {
        let rows = n_keys.len();
        let q: Vec<f32> = (0..rows * hd + 3).map(|_| rng.f32()).collect();
        let q_off: Vec<usize> = (0..rows).map(|r| r * hd + (r % 2) * 3 / 2).collect();
        let n = n_keys.iter().copied().max().unwrap_or(1);
        let k: Vec<f32> = (0..n * stride).map(|_| 2.0 * rng.f32()).collect();
        let v: Vec<f32> = (0..n * stride).map(|_| rng.f32()).collect();
        (q, q_off, k, v)
    }

    /// Every ISA against f64 math, for f32 and f16 caches: head sizes with and without tails
    /// of 16 and 8, 1 to 9 rows with different numbers of keys, strided rows.
    #[test]
    fn attention_rows_agree_with_f64() {
        let mut rng = Lcg(12);
        for (hd, stride) in [(128, 640), (64, 80), (40, 41), (24, 24), (13, 20), (7, 7)] {
            for rows in 1..=9 {
                let n_keys: Vec<usize> = (0..rows)
                    .map(|r| 1 + (r * 7 + hd) % 23 + if rows > 6 { 40 * r } else { 0 })
                    .collect();
                let (q, q_off, k, v) = attention_case(&mut rng, hd, &n_keys, stride);
                check_attention(hd, &q, &q_off, &n_keys, &k, &v, stride);
                let k16: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
                let v16: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
                check_attention(hd, &q, &q_off, &n_keys, &k16, &v16, stride);
            }
        }
    }

    fn check_attention<T: KvElem>(
        hd: usize,
        q: &[f32],
        q_off: &[usize],
        n_keys: &[usize],
        k: &[T],
        v: &[T],
        stride: usize,
    ) {
        let scale = 1.0 / (hd as f32).sqrt();
        let args = AttnArgs {
            hd,
            q,
            q_off,
            n_keys,
            keys: k,
            values: v,
            stride,
            scale,
        };
        for isa in Isa::all_available() {
            let what = format!("{} {} hd={hd}", isa.name(), std::any::type_name::<T>());
            let mut out = vec![f32::NAN; n_keys.len() * hd];
            attention_rows(isa, &args, &mut Vec::new(), &mut out);
            for (r, &n) in n_keys.iter().enumerate() {
                let qr = &q[q_off[r]..][..hd];
                let s: Vec<f64> = (0..n)
                    .map(|j| {
                        let dot: f64 = (0..hd)
                            .map(|i| qr[i] as f64 * k[j * stride + i].to_f32() as f64)
                            .sum();
                        dot * scale as f64
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for i in 0..hd {
                    let want: f64 = (0..n)
                        .map(|j| e[j] / z * v[j * stride + i].to_f32() as f64)
                        .sum();
                    // Outputs are convex combinations of values in [-1, 1): f32 rounding of a
                    // few hundred terms stays far below 1e-5.
                    let got = out[r * hd + i] as f64;
                    assert!(
                        (got - want).abs() < 1e-5,
                        "{what} row {r} ({n} keys) out[{i}]: {got} vs {want}"
                    );
                }
            }
        }
    }

    /// Runs the rows `pick` (indices into `q_off` / `n_keys`) in one call; their outputs in order.
    #[allow(clippy::too_many_arguments)]
    fn run_rows<T: KvElem>(
        isa: Isa,
        hd: usize,
        q: &[f32],
        q_off: &[usize],
        n_keys: &[usize],
        (keys, values, stride): (&[T], &[T], usize),
        pick: &[usize],
    ) -> Vec<f32> {
        let q_off: Vec<usize> = pick.iter().map(|&r| q_off[r]).collect();
        let n_keys: Vec<usize> = pick.iter().map(|&r| n_keys[r]).collect();
        let (q_off, n_keys) = (&q_off[..], &n_keys[..]);
        let args = AttnArgs {
            hd,
            q,
            q_off,
            n_keys,
            keys,
            values,
            stride,
            scale: 0.3,
        };
        let mut out = vec![0f32; pick.len() * hd];
        attention_rows(isa, &args, &mut Vec::new(), &mut out);
        out
    }

    fn same_bits(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    }

    /// A row's output is bit-for-bit the same alone or in any group of rows (tiles of four,
    /// partial tiles, rows with more keys beside it): what keeps batched serving invariant.
    #[test]
    fn attention_rows_are_batch_invariant() {
        let mut rng = Lcg(33);
        for (hd, stride) in [(128, 640), (40, 48), (13, 13)] {
            // Up to 100 keys: the value pass's key blocks (32) end inside the shared keys
            // of a tile, inside one row's own keys, and exactly at a row's end.
            let n_keys = [5, 1, 17, 17, 3, 30, 2, 9, 16, 100, 64, 33, 70, 32, 96];
            let (q, q_off, k, v) = attention_case(&mut rng, hd, &n_keys, stride);
            for isa in Isa::all_available() {
                let run = |pick: &[usize]| {
                    run_rows(isa, hd, &q, &q_off, &n_keys, (&k[..], &v[..], stride), pick)
                };
                let all: Vec<usize> = (0..n_keys.len()).collect();
                let together = run(&all);
                for r in 0..n_keys.len() {
                    let want = &together[r * hd..][..hd];
                    assert!(
                        same_bits(&run(&[r]), want),
                        "{} hd={hd} row {r}",
                        isa.name()
                    );
                }
                let shuffled = [8, 2, 5, 0, 7, 1];
                let out = run(&shuffled);
                for (i, &r) in shuffled.iter().enumerate() {
                    assert!(same_bits(&out[i * hd..][..hd], &together[r * hd..][..hd]));
                }
            }
        }
    }

    /// Keys and values past a row's own keys are never read: with inf in them (a later token's
    /// f16 cache entry that overflowed), the rows that do not see them are exact and finite.
    #[test]
    fn attention_rows_never_read_past_a_rows_keys() {
        let mut rng = Lcg(9);
        for (hd, stride) in [(128, 128), (24, 30), (13, 13)] {
            let n_keys = [2, 5, 2, 5, 1, 2];
            let (q, q_off, k, v) = attention_case(&mut rng, hd, &n_keys, stride);
            let (mut k_inf, mut v_inf) = (k.clone(), v.clone());
            k_inf[2 * stride..].fill(f32::INFINITY);
            v_inf[2 * stride..].fill(f32::INFINITY);
            let all: Vec<usize> = (0..n_keys.len()).collect();
            for isa in Isa::all_available() {
                let clean = run_rows(isa, hd, &q, &q_off, &n_keys, (&k[..], &v[..], stride), &all);
                let inf = (&k_inf[..], &v_inf[..], stride);
                let out = run_rows(isa, hd, &q, &q_off, &n_keys, inf, &all);
                for r in [0, 2, 4, 5] {
                    let row = &out[r * hd..][..hd];
                    assert!(row.iter().all(|x| x.is_finite()), "{} row {r}", isa.name());
                    assert!(
                        same_bits(row, &clean[r * hd..][..hd]),
                        "{} row {r}",
                        isa.name()
                    );
                }
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

    /// Every token's row is handed to `f` exactly once, with its own index, and nothing past
    /// `nt` rows is touched; token counts around the per-part minimum.
    #[test]
    fn par_token_rows_covers_each_row_once() {
        for nt in [0, 1, 3, 4, 5, 9, 17, 64] {
            let width = 7;
            let mut buf = vec![0u32; nt * width + 3];
            par_token_rows(&mut buf, nt, width, |t, row| {
                assert_eq!(row.len(), width);
                for (i, v) in row.iter_mut().enumerate() {
                    *v += (t * width + i) as u32 + 1;
                }
            });
            for (i, &v) in buf.iter().enumerate() {
                let want = if i < nt * width { i as u32 + 1 } else { 0 };
                assert_eq!(v, want, "nt {nt} index {i}");
            }
        }
    }

    /// The vector exp against f64 over softmax's whole input range: within 3 ulp where the
    /// result is a normal f32 above 1.3e-38; near and below f32's smallest normal (1.18e-38,
    /// the cut at x = -87.3) either that tiny value or 0.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp_avx2_is_within_a_few_ulp() {
        if !(Isa::Avx2.is_available() && has_f16c()) {
            return; // no AVX2 + FMA: the scalar softmax is used
        }
        let mut x: Vec<f32> = (0..200_000).map(|i| -(i as f32) * 5e-4).collect();
        x.extend([
            0.0,
            -0.0,
            -1e-30,
            -87.0,
            -87.3,
            -88.0,
            -103.0,
            -1e4,
            f32::NEG_INFINITY,
        ]);
        for c in x.chunks(8) {
            let mut lane = [0f32; 8];
            lane[..c.len()].copy_from_slice(c);
            let mut got = [0f32; 8];
            unsafe {
                use std::arch::x86_64::*;
                let e = exp_nonpositive_avx2(_mm256_loadu_ps(lane.as_ptr()));
                _mm256_storeu_ps(got.as_mut_ptr(), e);
            }
            for (&xi, &g) in lane.iter().zip(&got).take(c.len()) {
                let want = (xi as f64).exp();
                if want < 1.3e-38 {
                    assert!(g < 1.3e-38, "exp({xi}) = {g}");
                } else {
                    let ulp = (want as f32).to_bits().abs_diff(g.to_bits());
                    assert!(ulp <= 3, "exp({xi}) = {g}, want {want} ({ulp} ulp)");
                }
            }
        }
    }

    /// RMSNorm (both forms) against f64 on lengths around the eight running sums, with
    /// values spanning six orders of magnitude: within 2 ulp-sized steps (4e-7 relative).
    #[test]
    fn rms_norm_matches_f64() {
        let mut rng = Lcg(3);
        for n in [1usize, 2, 7, 8, 9, 15, 16, 17, 255, 2560, 6913] {
            let x: Vec<f32> = (0..n)
                .map(|i| rng.f32() * [1e-3f32, 1.0, 1e3][i % 3])
                .collect();
            let w: Vec<f32> = (0..n).map(|_| rng.f32() + 1.5).collect();
            let ms = x.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / n as f64;
            let r = 1.0 / (ms + 1e-5).sqrt();
            let mut out = vec![0f32; n];
            rms_norm(&x, &w, 1e-5, &mut out);
            let mut inplace = x.clone();
            rms_norm_in_place(&mut inplace, &w, 1e-5);
            assert_eq!(out, inplace, "n={n}");
            for i in 0..n {
                let want = x[i] as f64 * r * w[i] as f64;
                let err = (out[i] as f64 - want).abs();
                assert!(
                    err <= 4e-7 * want.abs() + 1e-30,
                    "n={n} i={i}: {} vs {want}",
                    out[i]
                );
            }
        }
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

    /// Both softmaxes against f64 on every length up to 40 (every remainder of eight), with
    /// -inf entries (masked keys) and a wide spread of scores: each probability within 1e-6
    /// absolute and 1e-5 relative (a few ulp of the exponential, then one division).
    #[test]
    fn softmaxes_match_f64_on_every_tail() {
        let mut rng = Lcg(11);
        for n in 1..=40 {
            let x: Vec<f32> = (0..n)
                .map(|i| match i % 7 {
                    6 if i > 0 => f32::NEG_INFINITY,
                    _ => rng.f32() * 30.0,
                })
                .collect();
            let m = x.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let e: Vec<f64> = x.iter().map(|&v| (v as f64 - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            type Softmax = fn(&mut [f32]);
            let mut kernels: Vec<(&str, Softmax)> = vec![("scalar", softmax)];
            #[cfg(target_arch = "x86_64")]
            if Isa::Avx2.is_available() && has_f16c() {
                // SAFETY: the CPU has AVX2 and FMA.
                kernels.push(("avx2", |p| unsafe { softmax_avx2(p) }));
            }
            for (name, f) in kernels {
                let mut p = x.clone();
                f(&mut p);
                for (i, (&got, &want)) in p.iter().zip(&e).enumerate() {
                    let want = want / sum;
                    let err = (got as f64 - want).abs();
                    assert!(
                        err <= 1e-6_f64.max(1e-5 * want),
                        "{name} n={n} i={i}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
