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
//!
//! llama.cpp's TQ2_0 (`Layout::Tq2`) is the same code in the same bytes with two differences,
//! so the same kernels run it from the memory map: its 256-weight blocks are two such 32-byte
//! halves followed by an f16 scale (66 bytes), and a byte holds its four weights in the
//! opposite order (j in bits 1-0 ... 96+j in bits 7-6), so the code vectors meet the
//! activation chunks in reverse order.

use crate::SyncPtr;

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
    let whole = codes.len() / BLOCK;
    // Whole blocks: one output byte from four codes 32 apart (vectorises).
    for (src, dst) in codes.chunks_exact(BLOCK).zip(out.chunks_exact_mut(32)) {
        for (m, o) in dst.iter_mut().enumerate() {
            *o = src[m] << 6 | src[32 + m] << 4 | src[64 + m] << 2 | src[96 + m];
        }
    }
    // The last, partial block: padding is code 1.
    if let Some(dst) = out.chunks_exact_mut(32).nth(whole) {
        let tail = &codes[whole * BLOCK..];
        dst.fill(0);
        for j in 0..BLOCK {
            let c = tail.get(j).copied().unwrap_or(1);
            dst[j % 32] |= c << (6 - 2 * (j / 32));
        }
    }
}

/// Code (0..=3) of element `e` of a packed row.
#[inline]
pub fn code_at(row: &[u8], e: usize) -> u8 {
    let (block, j) = (e / BLOCK, e % BLOCK);
    (row[block * 32 + j % 32] >> (6 - 2 * (j / 32))) & 3
}

/// Bytes of one TQ2_0 block of 256 weights: two 32-byte halves of codes, then the f16 scale.
pub const TQ2_BLOCK_BYTES: usize = 66;

/// Where 128-weight block `b` of a row starts: `32 b` in row-I2S, half `b % 2` of TQ2_0 block
/// `b / 2` in TQ2_0.
#[inline(always)]
pub(crate) fn block_offset<const TQ2: bool>(b: usize) -> usize {
    if TQ2 {
        TQ2_BLOCK_BYTES * (b / 2) + 32 * (b % 2)
    } else {
        32 * b
    }
}

/// Code (0..=3) of element `e` of a TQ2_0 row.
#[inline]
pub fn tq2_code_at(row: &[u8], e: usize) -> u8 {
    let (block, j) = (e / BLOCK, e % BLOCK);
    (row[block_offset::<true>(block) + j % 32] >> (2 * (j / 32))) & 3
}

/// Scalar reference: `sum_e (code_e - 1) * q_e` over one row, whose codes `code(row, e)`
/// reads (its layout's [`TernaryView::code_reader`]).
pub fn dot_scalar(code: fn(&[u8], usize) -> u8, row: &[u8], q: &[i8]) -> i32 {
    (0..q.len())
        .map(|e| (code(row, e) as i32 - 1) * q[e] as i32)
        .sum()
}

/// How a matrix's codes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Row-I2S (this module): 2 bits per weight, rows padded to 128.
    I2s,
    /// llama.cpp's TQ1_0 blocks as in the file ([`crate::tq1`]): 1.69 bits per weight, rows
    /// of whole 256-blocks.
    Tq1,
    /// llama.cpp's TQ2_0 blocks as in the file (module docs): 2.06 bits per weight, rows of
    /// whole 256-blocks.
    Tq2,
}

/// A ternary matrix, borrowed.
#[derive(Clone, Copy)]
pub struct TernaryView<'a> {
    pub data: &'a [u8],
    pub rows: usize,
    /// Padded row length (multiple of 128; of 256 for TQ1_0), the activations' row length.
    pub kp: usize,
    pub layout: Layout,
}

impl<'a> TernaryView<'a> {
    /// A matrix in the row-I2S layout.
    pub fn new(data: &'a [u8], rows: usize, kp: usize) -> Self {
        assert!(
            kp.is_multiple_of(BLOCK) && data.len() >= rows * kp / 4,
            "ternary view out of bounds"
        );
        TernaryView {
            data,
            rows,
            kp,
            layout: Layout::I2s,
        }
    }

    /// A matrix of TQ1_0 blocks, `kp` weights per row.
    pub fn tq1(data: &'a [u8], rows: usize, kp: usize) -> Self {
        assert!(
            kp.is_multiple_of(crate::tq1::BLOCK) && data.len() >= rows * crate::tq1::row_bytes(kp),
            "TQ1_0 view out of bounds"
        );
        TernaryView {
            data,
            rows,
            kp,
            layout: Layout::Tq1,
        }
    }

    /// A matrix of TQ2_0 blocks, `kp` weights per row.
    pub fn tq2(data: &'a [u8], rows: usize, kp: usize) -> Self {
        assert!(
            kp.is_multiple_of(2 * BLOCK) && data.len() >= rows * kp / 256 * TQ2_BLOCK_BYTES,
            "TQ2_0 view out of bounds"
        );
        TernaryView {
            data,
            rows,
            kp,
            layout: Layout::Tq2,
        }
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        match self.layout {
            Layout::I2s => self.kp / 4,
            Layout::Tq1 => crate::tq1::row_bytes(self.kp),
            Layout::Tq2 => self.kp / 256 * TQ2_BLOCK_BYTES,
        }
    }

    #[inline]
    pub fn row(&self, r: usize) -> &'a [u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// The scalar reader of this layout: code (`w + 1`) of element `e` of a row.
    pub fn code_reader(&self) -> fn(&[u8], usize) -> u8 {
        match self.layout {
            Layout::I2s => code_at,
            Layout::Tq1 => crate::tq1::code_at,
            Layout::Tq2 => tq2_code_at,
        }
    }

    /// Code (`w + 1`) of element `e` of row `r`.
    #[inline]
    pub fn code(&self, r: usize, e: usize) -> u8 {
        self.code_reader()(self.row(r), e)
    }
}

/// Which implementation to use. Chosen once by CPU feature detection; tests force each one.
/// Ordered from the slowest (the scalar reference) to the fastest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Scalar,
    Avx2,
    /// AVX-512 F/BW/VNNI: `vpdpbusd` multiplies the unsigned codes by the signed activations
    /// and accumulates in i32 in one instruction.
    Avx512Vnni,
}

impl Isa {
    /// The fastest implementation this CPU runs, unless the environment forces one:
    /// `BITNET_FORCE_SCALAR` (any value) or `BITNET_ISA=scalar|avx2|avx512` (an ISA the CPU
    /// lacks falls back to the best one it has). Read once per process.
    pub fn detect() -> Isa {
        use std::sync::OnceLock;
        static DETECTED: OnceLock<Isa> = OnceLock::new();
        *DETECTED.get_or_init(|| {
            let best = Isa::best_available();
            if std::env::var_os("BITNET_FORCE_SCALAR").is_some() {
                return Isa::Scalar;
            }
            match std::env::var("BITNET_ISA") {
                Ok(v) => match Isa::parse(&v) {
                    Some(want) => Isa::all_available()
                        .into_iter()
                        .filter(|&i| i <= want)
                        .max()
                        .unwrap_or(Isa::Scalar),
                    None => {
                        eprintln!("warning: BITNET_ISA={v:?} is not one of scalar, avx2, avx512; using {}", best.name());
                        best
                    }
                },
                Err(_) => best,
            }
        })
    }

    /// Parse "scalar", "avx2", "avx512" (also "avx512vnni", "avx512_vnni").
    pub fn parse(s: &str) -> Option<Isa> {
        match s
            .trim()
            .to_ascii_lowercase()
            .replace(['-', '_'], "")
            .as_str()
        {
            "scalar" => Some(Isa::Scalar),
            "avx2" => Some(Isa::Avx2),
            "avx512" | "avx512vnni" => Some(Isa::Avx512Vnni),
            _ => None,
        }
    }

    /// Can this CPU run it?
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every implementation this CPU runs, slowest (the scalar reference) first.
    pub fn all_available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni]
            .into_iter()
            .filter(|i| i.is_available())
            .collect()
    }

    fn best_available() -> Isa {
        *Isa::all_available().last().expect("scalar is always there")
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512vnni",
        }
    }
}

/// Tokens per cache block of the GEMM: the activations of this many tokens stay in L2 while
/// every row of the thread's range streams past them.
const TOKEN_BLOCK: usize = 32;

/// Integer products of `n_tok` token rows of activations (`q`: `n_tok * kp` int8, each row
/// padded with zeros) with every weight row: `out[t * w.rows + r] = sum_e w[r, e] * q[t, e]`.
/// `qsum[t]` is the sum of token t's activations. Runs on the worker pool ([`crate::pool`]),
/// one contiguous range of rows per thread.
pub fn gemm(isa: Isa, w: TernaryView, q: &[i8], qsum: &[i32], n_tok: usize, out: &mut [i32]) {
    assert!(q.len() >= n_tok * w.kp && qsum.len() >= n_tok && out.len() >= n_tok * w.rows);
    let out_ptr = SyncPtr(out.as_mut_ptr());
    let out_len = n_tok * w.rows;
    crate::pool::for_ranges(w.rows, 4, 16, |rows| {
        // SAFETY: each part writes only the elements of its own rows for every token, which
        // no other part touches; `out` outlives the job.
        let out = unsafe { std::slice::from_raw_parts_mut(out_ptr.get(), out_len) };
        match w.layout {
            Layout::I2s | Layout::Tq2 => gemm_rows(isa, w, q, qsum, n_tok, rows, out),
            Layout::Tq1 => crate::tq1::gemm_rows(isa, w, q, qsum, n_tok, rows, out),
        }
    });
}

/// [`drive`] over the AVX-512 tiles of `$m` (the real or the emulated ones): R rows (4 for
/// prompts, 1 for decoding) x 4 tokens, the narrower tiles for leftovers.
macro_rules! avx512_drive {
    ($m:ident, $r:literal, $tq2:literal, $w:expr, $q:expr, $qsum:expr, $n:expr, $rows:expr, $out:expr) => {
        drive::<$r, 4>(
            $m::tile::<$r, 4, $tq2>,
            $m::tile::<$r, 1, $tq2>,
            $m::tile::<1, 4, $tq2>,
            $m::tile::<1, 1, $tq2>,
            $w,
            $q,
            $qsum,
            $n,
            $rows,
            $out,
        )
    };
}

/// Single-threaded kernel over a range of rows of a 2-bit layout (row-I2S or TQ2_0; `gemm`
/// picks the kernels of each layout).
pub fn gemm_rows(
    isa: Isa,
    w: TernaryView,
    q: &[i8],
    qsum: &[i32],
    n_tok: usize,
    rows: std::ops::Range<usize>,
    out: &mut [i32],
) {
    assert!(rows.end <= w.rows && q.len() >= n_tok * w.kp && qsum.len() >= n_tok);
    assert!(out.len() >= n_tok * w.rows);
    assert_ne!(w.layout, Layout::Tq1, "2-bit kernel on TQ1_0 blocks");
    let tq2 = w.layout == Layout::Tq2;
    match isa {
        Isa::Scalar => gemm_rows_scalar(w, q, n_tok, rows, out),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            assert!(
                Isa::Avx2.is_available(),
                "AVX2 kernel on a CPU without AVX2"
            );
            // SAFETY: the CPU has AVX2 and every pointer the kernels form stays inside `w`,
            // `q` (rows of kp bytes) and `out` (checked above).
            unsafe {
                if n_tok < 4 {
                    // Decode: one row at a time, so the weights are one sequential stream (two
                    // interleaved 640-byte rows defeat the hardware prefetcher: half the speed
                    // when streaming from memory).
                    let gemv: Gemv = if tq2 {
                        avx2::gemv_row::<true>
                    } else {
                        avx2::gemv_row::<false>
                    };
                    drive_gemv(gemv, w, q, qsum, n_tok, rows, out)
                } else if tq2 {
                    avx2::gemm_blocked::<{ avx2::TQ2 }>(w, q, qsum, n_tok, rows, out)
                } else {
                    avx2::gemm_blocked::<{ avx2::I2S }>(w, q, qsum, n_tok, rows, out)
                }
            }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni => {
            assert!(
                Isa::Avx512Vnni.is_available(),
                "AVX-512 VNNI kernel on a CPU without it"
            );
            // SAFETY: as above, for AVX-512 F/BW/VNNI.
            unsafe {
                match (n_tok < 4, tq2) {
                    // Decode: one row at a time, one sequential weight stream, as for AVX2.
                    (true, false) => {
                        drive_gemv(avx512::gemv::<false>, w, q, qsum, n_tok, rows, out)
                    }
                    (true, true) => drive_gemv(avx512::gemv::<true>, w, q, qsum, n_tok, rows, out),
                    (false, false) => avx512_drive!(avx512, 4, false, w, q, qsum, n_tok, rows, out),
                    (false, true) => avx512_drive!(avx512, 4, true, w, q, qsum, n_tok, rows, out),
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("x86 kernel selected on a non-x86 CPU"),
    }
}

/// The scalar reference for either layout: one row's dot product per token.
pub(crate) fn gemm_rows_scalar(
    w: TernaryView,
    q: &[i8],
    n_tok: usize,
    rows: std::ops::Range<usize>,
    out: &mut [i32],
) {
    let code = w.code_reader();
    for r in rows {
        let row = w.row(r);
        for t in 0..n_tok {
            out[t * w.rows + r] = dot_scalar(code, row, &q[t * w.kp..(t + 1) * w.kp]);
        }
    }
}

/// A kernel computing `sum c*q` for one row and one token over `nb` blocks.
type Gemv = unsafe fn(*const u8, *const i8, usize) -> i32;

/// The loop around a one-row, one-token kernel (decoding, AVX2 and AVX-512): each row once,
/// against every token.
///
/// # Safety
/// The kernel must be runnable on this CPU; `w`, `q`, `out` sizes as checked by `gemm_rows`.
unsafe fn drive_gemv(
    gemv: Gemv,
    w: TernaryView,
    q: &[i8],
    qsum: &[i32],
    n_tok: usize,
    rows: std::ops::Range<usize>,
    out: &mut [i32],
) {
    let nb = w.kp / BLOCK;
    for r in rows {
        let row = w.row(r).as_ptr();
        for t in 0..n_tok {
            out[t * w.rows + r] = gemv(row, q.as_ptr().add(t * w.kp), nb) - qsum[t];
        }
    }
}

/// A kernel computing `sum c*q` (codes, not weights) for R rows x T tokens over `nb` blocks.
/// Pointers are to the start of each row / token.
type Tile<const R: usize, const T: usize> =
    unsafe fn(&[*const u8; R], &[*const i8; T], usize) -> [[i32; T]; R];

/// The loops around the tiles: token blocks that stay in cache, then groups of R rows, then
/// groups of T tokens; leftover rows and tokens use the narrower tiles.
///
/// # Safety
/// The tiles must be runnable on this CPU; `w`, `q`, `out` sizes as checked by `gemm_rows`.
#[allow(clippy::too_many_arguments)]
unsafe fn drive<const R: usize, const T: usize>(
    tile: Tile<R, T>,
    tile_r1: Tile<R, 1>,
    tile_1t: Tile<1, T>,
    tile_11: Tile<1, 1>,
    w: TernaryView,
    q: &[i8],
    qsum: &[i32],
    n_tok: usize,
    rows: std::ops::Range<usize>,
    out: &mut [i32],
) {
    let nb = w.kp / BLOCK;
    let rowp = |r: usize| w.row(r).as_ptr();
    let tokp = |t: usize| q.as_ptr().add(t * w.kp);
    let mut put = |r: usize, t: usize, v: i32| out[t * w.rows + r] = v - qsum[t];
    let mut t0 = 0;
    while t0 < n_tok {
        let t1 = (t0 + TOKEN_BLOCK).min(n_tok);
        let mut r = rows.start;
        while r < rows.end {
            let nr = if r + R <= rows.end { R } else { 1 };
            let mut t = t0;
            while t < t1 {
                let nt = if t + T <= t1 { T } else { 1 };
                match (nr == R, nt == T) {
                    (true, true) => {
                        let s = tile(
                            &std::array::from_fn(|i| rowp(r + i)),
                            &std::array::from_fn(|j| tokp(t + j)),
                            nb,
                        );
                        for (i, sr) in s.iter().enumerate() {
                            for (j, &v) in sr.iter().enumerate() {
                                put(r + i, t + j, v);
                            }
                        }
                    }
                    (true, false) => {
                        let s = tile_r1(&std::array::from_fn(|i| rowp(r + i)), &[tokp(t)], nb);
                        for (i, sr) in s.iter().enumerate() {
                            put(r + i, t, sr[0]);
                        }
                    }
                    (false, true) => {
                        let s = tile_1t(&[rowp(r)], &std::array::from_fn(|j| tokp(t + j)), nb);
                        for (j, &v) in s[0].iter().enumerate() {
                            put(r, t + j, v);
                        }
                    }
                    (false, false) => put(r, t, tile_11(&[rowp(r)], &[tokp(t)], nb)[0][0]),
                }
                t += nt;
            }
            r += nr;
        }
        t0 = t1;
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn hsum_epi32(v: __m256i) -> i32 {
        let lo = _mm256_castsi256_si128(v);
        let hi = _mm256_extracti128_si256(v, 1);
        let s = _mm_add_epi32(lo, hi);
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }

    /// Blocks accumulated in i16 before widening. Per block and lane the four `maddubs`
    /// add at most 4 * 2 * 2 * 128 = 2048 in magnitude: 8 blocks stay within i16.
    const FLUSH: usize = 8;

    /// Blocks per k-chunk of the blocked GEMM. Two reasons: the products of one chunk stay
    /// within i16 (each block adds at most 4 * 2 * 2 * 128 = 2048 in magnitude per lane, and
    /// 15 * 2048 = 30720), so a chunk needs no i32 accumulators; and eight tokens' activations
    /// for one chunk (15 KiB) stay in L1 while the rows stream past them.
    const CHUNK: usize = 15;

    /// Rows per row chunk of the blocked GEMM: their weights for one k-chunk (256 * 15 * 32
    /// bytes = 120 KiB) stay in L2 while every group of eight tokens passes over them.
    const ROW_CHUNK: usize = 256;

    /// How many rows ahead the blocked GEMM prefetches.
    const PREFETCH_ROWS: usize = 4;

    /// The layouts of the blocked GEMM (a const parameter): row-I2S, TQ1_0, TQ2_0.
    pub(crate) const I2S: u8 = 0;
    pub(crate) const TQ1: u8 = 1;
    pub(crate) const TQ2: u8 = 2;

    /// Sum of eight i32 vectors' lanes, one sum per vector, in order.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn hsum8(v: &[__m256i; 8]) -> __m256i {
        let a = _mm256_hadd_epi32(v[0], v[1]);
        let b = _mm256_hadd_epi32(v[2], v[3]);
        let c = _mm256_hadd_epi32(v[4], v[5]);
        let d = _mm256_hadd_epi32(v[6], v[7]);
        let ab = _mm256_hadd_epi32(a, b); // low lanes: v0..v3 (low halves), high: (high halves)
        let cd = _mm256_hadd_epi32(c, d);
        _mm256_add_epi32(
            _mm256_permute2x128_si256::<0x20>(ab, cd),
            _mm256_permute2x128_si256::<0x31>(ab, cd),
        )
    }

    /// One row x T tokens (T <= 8) over blocks `b0..b1` (at most `CHUNK`): `sum c*q` per
    /// token. Each block is loaded once and unpacked into four code vectors (shift, mask);
    /// each code vector meets every token's activations (`maddubs`, the activations straight
    /// from L1), into one i16 accumulator per token: T + 3 registers, no spills for T = 8.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn row_tokens<const T: usize, const TQ2: bool>(
        w: *const u8,
        q: &[*const i8; T],
        b0: usize,
        b1: usize,
    ) -> [i32; 8] {
        debug_assert!(T <= 8 && b1 - b0 <= CHUNK);
        let mask = _mm256_set1_epi8(3);
        let mut acc = [_mm256_setzero_si256(); T];
        for b in b0..b1 {
            let wv = _mm256_loadu_si256(w.add(super::block_offset::<TQ2>(b)) as *const __m256i);
            macro_rules! step {
                ($k:expr, $c:expr) => {
                    let c = _mm256_and_si256($c, mask);
                    // TQ2_0 holds the four code vectors in the opposite order.
                    let k = if TQ2 { 3 - $k } else { $k };
                    for j in 0..T {
                        let qv = _mm256_loadu_si256(q[j].add(128 * b + 32 * k) as *const __m256i);
                        acc[j] = _mm256_add_epi16(acc[j], _mm256_maddubs_epi16(c, qv));
                    }
                };
            }
            step!(0, _mm256_srli_epi16::<6>(wv));
            step!(1, _mm256_srli_epi16::<4>(wv));
            step!(2, _mm256_srli_epi16::<2>(wv));
            step!(3, wv);
        }
        let ones = _mm256_set1_epi16(1);
        let mut wide = [_mm256_setzero_si256(); 8];
        for j in 0..T {
            wide[j] = _mm256_madd_epi16(acc[j], ones);
        }
        let mut out = [0i32; 8];
        _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, hsum8(&wide));
        out
    }

    /// The blocked GEMM's view of layout `L`: weights per block, blocks per k-chunk.
    #[inline(always)]
    fn geometry<const L: u8>() -> (usize, usize) {
        if L == TQ1 {
            (crate::tq1::BLOCK, crate::tq1::avx2::CHUNK)
        } else {
            (super::BLOCK, CHUNK)
        }
    }

    /// Where block `b` of a row of layout `L` starts.
    #[inline(always)]
    fn offset<const L: u8>(b: usize) -> usize {
        match L {
            TQ1 => crate::tq1::BLOCK_BYTES * b,
            TQ2 => super::block_offset::<true>(b),
            _ => super::block_offset::<false>(b),
        }
    }

    /// Every row of `rows` against T tokens from `t`, over blocks `b0..b1`: the first chunk
    /// (`first`) writes `sum - qsum`, later ones add.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn pass<const T: usize, const L: u8>(
        w: super::TernaryView,
        q: &[i8],
        qsum: &[i32],
        t: usize,
        rows: std::ops::Range<usize>,
        (b0, b1, first): (usize, usize, bool),
        out: &mut [i32],
    ) {
        let rb = w.row_bytes();
        let tok: [*const i8; T] = std::array::from_fn(|j| q.as_ptr().add((t + j) * w.kp));
        for r in rows.clone() {
            // This chunk's part of a row a few rows ahead: the rows are read piecewise (one
            // k-chunk at a time), a pattern the hardware prefetchers follow poorly.
            if r + PREFETCH_ROWS < rows.end {
                let ahead = w
                    .data
                    .as_ptr()
                    .add((r + PREFETCH_ROWS) * rb + offset::<L>(b0));
                let mut off = 0;
                while off < offset::<L>(b1) - offset::<L>(b0) {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.add(off) as *const i8);
                    off += 64;
                }
            }
            let row = w.data.as_ptr().add(r * rb);
            let s = match L {
                TQ1 => crate::tq1::avx2::chunk_sums::<T>(row, &tok, b0, b1),
                TQ2 => row_tokens::<T, true>(row, &tok, b0, b1),
                _ => row_tokens::<T, false>(row, &tok, b0, b1),
            };
            for j in 0..T {
                let o = &mut out[(t + j) * w.rows + r];
                *o = if first { s[j] - qsum[t + j] } else { *o + s[j] };
            }
        }
    }

    /// The GEMM for four or more tokens, blocked for the caches: row chunks whose weights
    /// stay in L2, k-chunks whose products stay in i16, groups of eight tokens (then 4, 2, 1)
    /// whose activations stay in L1. Each weight byte comes from memory once per call. For
    /// both layouts (`TQ1`: [`crate::tq1`]'s).
    ///
    /// # Safety
    /// AVX2; sizes as checked by `gemm_rows`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn gemm_blocked<const L: u8>(
        w: super::TernaryView,
        q: &[i8],
        qsum: &[i32],
        n_tok: usize,
        rows: std::ops::Range<usize>,
        out: &mut [i32],
    ) {
        let (block, chunk) = geometry::<L>();
        let nb = w.kp / block;
        let n_chunks = nb.div_ceil(chunk);
        let mut r0 = rows.start;
        while r0 < rows.end {
            let rc = r0..(r0 + ROW_CHUNK).min(rows.end);
            for ci in 0..n_chunks {
                // Near-equal chunks, each at most CHUNK blocks.
                let ch = (ci * nb / n_chunks, (ci + 1) * nb / n_chunks, ci == 0);
                let mut t = 0;
                while t < n_tok {
                    let left = n_tok - t;
                    let rc = rc.clone();
                    t += if left >= 8 {
                        pass::<8, L>(w, q, qsum, t, rc, ch, out);
                        8
                    } else if left >= 4 {
                        pass::<4, L>(w, q, qsum, t, rc, ch, out);
                        4
                    } else if left >= 2 {
                        pass::<2, L>(w, q, qsum, t, rc, ch, out);
                        2
                    } else {
                        pass::<1, L>(w, q, qsum, t, rc, ch, out);
                        1
                    };
                }
            }
            r0 = rc.end;
        }
    }

    /// [`gemv`] for one row, in the shape `drive_gemv` takes ([`super::Gemv`]).
    #[target_feature(enable = "avx2")]
    pub unsafe fn gemv_row<const TQ2: bool>(w: *const u8, q: *const i8, nb: usize) -> i32 {
        gemv::<1, TQ2>(&[w], &[q], nb)[0][0]
    }

    /// One token, R rows: fewer operations per block than `row_tokens`. With `s = w >> 4`, the
    /// masks `0x0C` and `0x03` give all four code vectors from one shift: `s & 0x0C` = 4 * c0,
    /// `s & 0x03` = c1, `w & 0x0C` = 4 * c2, `w & 0x03` = c3. Products of the two scaled
    /// vectors go to their own i16 accumulator (at most 2 * 2 * 8 * 128 = 4096 per block, so 8
    /// blocks reach exactly i16::MIN at worst), and the total is `acc4 / 4 + acc1` (exact: every
    /// term of acc4 is a multiple of 4).
    #[target_feature(enable = "avx2")]
    pub unsafe fn gemv<const R: usize, const TQ2: bool>(
        w: &[*const u8; R],
        q: &[*const i8; 1],
        nb: usize,
    ) -> [[i32; 1]; R] {
        let m12 = _mm256_set1_epi8(0x0C);
        let m3 = _mm256_set1_epi8(0x03);
        let ones = _mm256_set1_epi16(1);
        let mut a4 = [_mm256_setzero_si256(); R];
        let mut a1 = [_mm256_setzero_si256(); R];
        let q = q[0];
        let mut b = 0;
        while b < nb {
            let end = (b + FLUSH).min(nb);
            let mut s4 = [_mm256_setzero_si256(); R];
            let mut s1 = [_mm256_setzero_si256(); R];
            while b < end {
                let qb = q.add(128 * b);
                // TQ2_0 holds the four code vectors in the opposite order.
                let chunk = |k: usize| {
                    let k = if TQ2 { 3 - k } else { k };
                    _mm256_loadu_si256(qb.add(32 * k) as *const __m256i)
                };
                let (q0, q1, q2, q3) = (chunk(0), chunk(1), chunk(2), chunk(3));
                let at = super::block_offset::<TQ2>(b);
                for i in 0..R {
                    let wv = _mm256_loadu_si256(w[i].add(at) as *const __m256i);
                    let sh = _mm256_srli_epi16::<4>(wv);
                    let p4 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(_mm256_and_si256(sh, m12), q0),
                        _mm256_maddubs_epi16(_mm256_and_si256(wv, m12), q2),
                    );
                    let p1 = _mm256_add_epi16(
                        _mm256_maddubs_epi16(_mm256_and_si256(sh, m3), q1),
                        _mm256_maddubs_epi16(_mm256_and_si256(wv, m3), q3),
                    );
                    s4[i] = _mm256_add_epi16(s4[i], p4);
                    s1[i] = _mm256_add_epi16(s1[i], p1);
                }
                b += 1;
            }
            for i in 0..R {
                a4[i] = _mm256_add_epi32(a4[i], _mm256_madd_epi16(s4[i], ones));
                a1[i] = _mm256_add_epi32(a1[i], _mm256_madd_epi16(s1[i], ones));
            }
        }
        let mut out = [[0i32; 1]; R];
        for i in 0..R {
            out[i][0] = hsum_epi32(_mm256_add_epi32(_mm256_srai_epi32::<2>(a4[i]), a1[i]));
        }
        out
    }
}

/// The AVX-512 VNNI tile, written once and instantiated twice: with the real intrinsics, and
/// in tests with a scalar emulation of the same intrinsics (`crate::emu512`), so the kernel's
/// logic is checked even on CPUs without AVX-512.
///
/// One 32-byte block is broadcast to both halves of a zmm register; per-half variable shifts
/// (`vpsrlvw` by 6|4 and 2|0) and a mask give two 64-code vectors whose halves are codes
/// 0..31|32..63 and 64..95|96..127: they line up with two plain 64-byte activation loads. Then
/// `vpdpbusd` multiplies unsigned codes by signed activations and accumulates in i32.
macro_rules! avx512_tile {
    ($(#[$attr:meta])*) => {
        /// Per-16-bit-lane shift counts: the low half of the register gets the first count.
        static SHIFT_A: [u16; 32] = [6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6,
                                     4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4];
        static SHIFT_B: [u16; 32] = [2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2,
                                     0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        /// TQ2_0: codes 0..31 in bits 1-0, 32..63 in 3-2, 64..95 in 5-4, 96..127 in 7-6.
        static SHIFT_A_TQ2: [u16; 32] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                         2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2];
        static SHIFT_B_TQ2: [u16; 32] = [4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4,
                                         6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6];

        /// `sum c*q` for R rows x T tokens over `nb` blocks (`TQ2`: of the TQ2_0 layout).
        $(#[$attr])*
        pub unsafe fn tile<const R: usize, const T: usize, const TQ2: bool>(
            w: &[*const u8; R],
            q: &[*const i8; T],
            nb: usize,
        ) -> [[i32; T]; R] {
            let mask = _mm512_set1_epi8(3);
            let (sa, sb) = if TQ2 { (&SHIFT_A_TQ2, &SHIFT_B_TQ2) } else { (&SHIFT_A, &SHIFT_B) };
            let sa = _mm512_loadu_si512(sa.as_ptr() as *const _);
            let sb = _mm512_loadu_si512(sb.as_ptr() as *const _);
            let mut acc = [[_mm512_setzero_si512(); T]; R];
            for b in 0..nb {
                let mut c01 = [_mm512_setzero_si512(); R];
                let mut c23 = [_mm512_setzero_si512(); R];
                for i in 0..R {
                    if R > 1 && b % 2 == 0 {
                        // R rows side by side are R interleaved streams, which Zen 4's
                        // prefetchers follow poorly when the weights come from memory (a few
                        // tokens: batched decoding, short prompts; pp4-pp16 5-20% faster).
                        // Past a row's end this only touches a line nobody needs.
                        _mm_prefetch::<_MM_HINT_T0>(
                            w[i].wrapping_add(super::block_offset::<TQ2>(b) + super::TILE_PREFETCH)
                                as *const i8,
                        );
                    }
                    let wb = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                        w[i].add(super::block_offset::<TQ2>(b)) as *const __m256i,
                    ));
                    c01[i] = _mm512_and_si512(_mm512_srlv_epi16(wb, sa), mask);
                    c23[i] = _mm512_and_si512(_mm512_srlv_epi16(wb, sb), mask);
                }
                for j in 0..T {
                    let qa = _mm512_loadu_si512(q[j].add(128 * b) as *const _);
                    let qb = _mm512_loadu_si512(q[j].add(128 * b + 64) as *const _);
                    for i in 0..R {
                        acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], c01[i], qa);
                        acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], c23[i], qb);
                    }
                }
            }
            if R * T == 16 {
                // Sixteen sums at once: a transposing tree of 15 adds (about 45 instructions)
                // instead of sixteen separate reductions (about 150), which cost the 4x4 tile
                // of a 2560-wide row (20 blocks, 640 `vpdpbusd`) a tenth of its time.
                let mut flat = [0i32; 16];
                let sums = reduce16(&std::array::from_fn(|k| acc[k / T][k % T]));
                _mm512_storeu_si512(flat.as_mut_ptr() as *mut __m512i, sums);
                return std::array::from_fn(|i| std::array::from_fn(|j| flat[i * T + j]));
            }
            let mut out = [[0i32; T]; R];
            for i in 0..R {
                for j in 0..T {
                    out[i][j] = _mm512_reduce_add_epi32(acc[i][j]);
                }
            }
            out
        }

        /// Lane k of the result is the sum of the sixteen lanes of `v[k]`.
        $(#[$attr])*
        unsafe fn reduce16(v: &[__m512i; 16]) -> __m512i {
            // Pairs: within each 128-bit lane, v[2m]'s partial sums in elements 0 and 2, v[2m+1]'s
            // in 1 and 3.
            let p: [__m512i; 8] = std::array::from_fn(|m| {
                let (a, b) = (v[2 * m], v[2 * m + 1]);
                _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b))
            });
            // Quads: each 128-bit lane holds one partial sum of v[4m..4m+4] in order.
            let q: [__m512i; 4] = std::array::from_fn(|m| {
                let (a, b) = (p[2 * m], p[2 * m + 1]);
                _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b))
            });
            // Fold the four 128-bit lanes twice: lanes (0, 2) + (1, 3) of two quads.
            let fold = |a: __m512i, b: __m512i| {
                _mm512_add_epi32(
                    _mm512_shuffle_i32x4::<0b10_00_10_00>(a, b),
                    _mm512_shuffle_i32x4::<0b11_01_11_01>(a, b),
                )
            };
            // Lanes of fold(q0, q1): v[0..4] half-sums, v[0..4] other half, v[4..8], v[4..8].
            fold(fold(q[0], q[1]), fold(q[2], q[3]))
        }

        /// `sum c*q` for one row and one token (decoding): the tile's unpacking, two blocks
        /// per step into four accumulators (`tile::<1, 1>` chains two `vpdpbusd` per block on
        /// one register and waits on their latency).
        $(#[$attr])*
        pub unsafe fn gemv<const TQ2: bool>(w: *const u8, q: *const i8, nb: usize) -> i32 {
            let mask = _mm512_set1_epi8(3);
            let (sa, sb) = if TQ2 { (&SHIFT_A_TQ2, &SHIFT_B_TQ2) } else { (&SHIFT_A, &SHIFT_B) };
            let sa = _mm512_loadu_si512(sa.as_ptr() as *const _);
            let sb = _mm512_loadu_si512(sb.as_ptr() as *const _);
            let mut acc = [_mm512_setzero_si512(); 4];
            let mut b = 0;
            while b < nb {
                for u in 0..2.min(nb - b) {
                    let wb = _mm512_broadcast_i64x4(_mm256_loadu_si256(
                        w.add(super::block_offset::<TQ2>(b + u)) as *const __m256i,
                    ));
                    let c01 = _mm512_and_si512(_mm512_srlv_epi16(wb, sa), mask);
                    let c23 = _mm512_and_si512(_mm512_srlv_epi16(wb, sb), mask);
                    let qa = _mm512_loadu_si512(q.add(128 * (b + u)) as *const _);
                    let qb = _mm512_loadu_si512(q.add(128 * (b + u) + 64) as *const _);
                    acc[2 * u] = _mm512_dpbusd_epi32(acc[2 * u], c01, qa);
                    acc[2 * u + 1] = _mm512_dpbusd_epi32(acc[2 * u + 1], c23, qb);
                }
                b += 2;
            }
            _mm512_reduce_add_epi32(_mm512_add_epi32(
                _mm512_add_epi32(acc[0], acc[1]),
                _mm512_add_epi32(acc[2], acc[3]),
            ))
        }
    };
}

/// How far ahead, in bytes, the AVX-512 tile prefetches each of its rows. The one-row GEMVs
/// (AVX2 and AVX-512) have no software prefetch: the hardware prefetcher follows one row
/// stream, and on Zen 4 a prefetch 1024 bytes ahead cut one thread's GEMV from 18-24 to 14-18
/// GB/s (`kbench n=1`, weights streamed from memory).
const TILE_PREFETCH: usize = 1024;

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;
    avx512_tile!(#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]);
}

/// The same tile over the emulated intrinsics (tests only).
#[cfg(test)]
mod avx512_emu {
    use crate::emu512::*;
    avx512_tile!();
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::test_rng::Lcg;

    fn random_matrix(rng: &mut Lcg, rows: usize, k: usize) -> (Vec<Vec<u8>>, Vec<u8>) {
        let kp = padded_len(k);
        let codes: Vec<Vec<u8>> = (0..rows)
            .map(|_| (0..k).map(|_| (rng.next() % 3) as u8).collect())
            .collect();
        let mut packed = vec![0xAAu8; rows * kp / 4]; // pack_row must write every byte
        for (r, c) in codes.iter().enumerate() {
            pack_row(c, &mut packed[r * kp / 4..(r + 1) * kp / 4]);
        }
        (codes, packed)
    }

    #[test]
    fn pack_then_read_back() {
        let mut rng = Lcg(1);
        for k in [300, 256, 128, 1, 127, 129] {
            let (codes, packed) = random_matrix(&mut rng, 3, k);
            let kp = padded_len(k);
            for (r, c) in codes.iter().enumerate() {
                for e in 0..kp {
                    assert_eq!(
                        code_at(&packed[r * kp / 4..], e),
                        c.get(e).copied().unwrap_or(1),
                        "k {k} row {r} element {e}"
                    );
                }
            }
        }
    }

    /// Odd shapes: rows and token counts that are not multiples of any tile (1x8, 4x4) nor of
    /// the token block, row lengths that need padding, long rows that cross several i16 flushes.
    const SHAPES: &[(usize, usize, usize)] = &[
        (1, 1, 1),
        (7, 129, 3),
        (13, 688, 5),
        (33, 256, 9),
        (5, 2560, 4),
        (64, 640, 1),
        (6, 2048, 7),
        (3, 130 * 17, 2),
        (9, 384, 37),
        (2, 6912, 1),
        // The AVX2 blocked GEMM: more rows than one row chunk (256), several k-chunks (16, 54
        // blocks), token groups of 8 + 2 + 1 and 4 + 2.
        (300, 2000, 11),
        (4, 6912, 8),
        (261, 130, 6),
    ];

    struct Case {
        rows: usize,
        kp: usize,
        n_tok: usize,
        layout: Layout,
        packed: Vec<u8>,
        q: Vec<i8>,
        qsum: Vec<i32>,
        want: Vec<i32>,
    }

    impl Case {
        fn view(&self) -> TernaryView<'_> {
            match self.layout {
                Layout::I2s => TernaryView::new(&self.packed, self.rows, self.kp),
                Layout::Tq2 => TernaryView::tq2(&self.packed, self.rows, self.kp),
                Layout::Tq1 => unreachable!("TQ1_0 cases are in crate::tq1"),
            }
        }
    }

    /// Random codes and activations (10% each of the extremes -128 and 127), with the plain
    /// sum over the unpacked codes as the expected result: every shape in row-I2S, and the
    /// shapes of whole 256-blocks also as TQ2_0 (encoded by the format crate, so the kernels
    /// and llama.cpp's layout as the format tests pin it agree).
    fn cases() -> Vec<Case> {
        let mut rng = Lcg(42);
        let mut all = Vec::new();
        for (&(rows, k, n_tok), layout) in SHAPES.iter().map(|s| (s, Layout::I2s)).chain(
            SHAPES
                .iter()
                .filter(|s| s.1 % 256 == 0)
                .map(|s| (s, Layout::Tq2)),
        ) {
            let kp = padded_len(k);
            let (codes, mut packed) = random_matrix(&mut rng, rows, k);
            if layout == Layout::Tq2 {
                packed.clear();
                for c in &codes {
                    bitnet_formats::codecs::encode_tq2_0_row(c, 0.5, &mut packed).unwrap();
                }
            }
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
            all.push(Case {
                rows,
                kp,
                n_tok,
                layout,
                packed,
                q,
                qsum,
                want,
            });
        }
        all
    }

    /// Every implementation this CPU runs against a plain sum over the unpacked codes, on
    /// 1, 2 and 3 threads.
    #[test]
    fn all_kernels_match_the_naive_sum() {
        let isas = Isa::all_available();
        assert_eq!(isas[0], Isa::Scalar);
        for threads in [1, 2, 3] {
            let tp = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for c in cases() {
                for &isa in &isas {
                    let mut got = vec![0i32; c.n_tok * c.rows];
                    tp.install(|| gemm(isa, c.view(), &c.q, &c.qsum, c.n_tok, &mut got));
                    assert_eq!(
                        got,
                        c.want,
                        "{} {:?} t={threads} rows={} kp={} n_tok={}",
                        isa.name(),
                        c.layout,
                        c.rows,
                        c.kp,
                        c.n_tok
                    );
                }
            }
        }
    }

    /// Worst-case accumulation: all codes +1 (2) or -1 (0) against all -128 or 127, on long
    /// rows, to exercise the i16 accumulators at their limits.
    #[test]
    fn extreme_values_do_not_overflow() {
        let (rows, kp) = (5, 6912);
        let build = |code: u8| {
            let mut packed = vec![0u8; rows * kp / 4];
            for r in 0..rows {
                pack_row(&vec![code; kp], &mut packed[r * kp / 4..(r + 1) * kp / 4]);
            }
            packed
        };
        assert_extremes_exact(rows, kp, build, |d, r, k| TernaryView::new(d, r, k));
        let build_tq2 = |code: u8| {
            let mut data = Vec::new();
            for _ in 0..rows {
                bitnet_formats::codecs::encode_tq2_0_row(&vec![code; kp], 1.0, &mut data).unwrap();
            }
            data
        };
        assert_extremes_exact(rows, kp, build_tq2, |d, r, k| TernaryView::tq2(d, r, k));
    }

    /// Every kernel on `rows` rows of `kp` weights all equal to `code - 1` (the matrix
    /// `build(code)` in the layout `view` reads) against activations all -128 or 127, for 1 to
    /// 9 tokens: the exact product.
    pub(crate) fn assert_extremes_exact(
        rows: usize,
        kp: usize,
        build: impl Fn(u8) -> Vec<u8>,
        view: for<'a> fn(&'a [u8], usize, usize) -> TernaryView<'a>,
    ) {
        for (code, act) in [(2u8, -128i8), (2, 127), (0, -128), (0, 127)] {
            let data = build(code);
            for n_tok in [1, 4, 5, 8, 9] {
                let q = vec![act; n_tok * kp];
                let qsum = vec![act as i32 * kp as i32; n_tok];
                let want = (code as i32 - 1) * act as i32 * kp as i32;
                for isa in Isa::all_available() {
                    let mut got = vec![0i32; n_tok * rows];
                    gemm(isa, view(&data, rows, kp), &q, &qsum, n_tok, &mut got);
                    assert!(
                        got.iter().all(|&v| v == want),
                        "{} {:?} code {code} act {act} n_tok {n_tok}",
                        isa.name(),
                        view(&data, rows, kp).layout
                    );
                }
            }
        }
    }

    /// The AVX-512 VNNI tile's logic through the emulated intrinsics, so it is checked on CPUs
    /// without AVX-512 too (the real one is in `all_kernels_match_the_naive_sum` when present).
    #[test]
    fn avx512_tile_logic_matches_the_naive_sum_emulated() {
        for c in cases() {
            let (w, tq2) = (c.view(), c.layout == Layout::Tq2);
            // The three configurations: 4x4 tiles (prompts, what `gemm_rows` uses), one row
            // at a time through the tiles, and the GEMV (decode, what `gemm_rows` uses).
            for config in 0..3 {
                let mut got = vec![0i32; c.n_tok * c.rows];
                let (q, qsum, n, rows, out) = (&c.q, &c.qsum, c.n_tok, 0..c.rows, &mut got);
                // SAFETY: the emulated kernels are plain Rust; sizes are consistent.
                unsafe {
                    match (config, tq2) {
                        (0, false) => avx512_drive!(avx512_emu, 4, false, w, q, qsum, n, rows, out),
                        (0, true) => avx512_drive!(avx512_emu, 4, true, w, q, qsum, n, rows, out),
                        (1, false) => avx512_drive!(avx512_emu, 1, false, w, q, qsum, n, rows, out),
                        (1, true) => avx512_drive!(avx512_emu, 1, true, w, q, qsum, n, rows, out),
                        (_, false) => {
                            drive_gemv(avx512_emu::gemv::<false>, w, q, qsum, n, rows, out)
                        }
                        (_, true) => drive_gemv(avx512_emu::gemv::<true>, w, q, qsum, n, rows, out),
                    }
                };
                assert_eq!(
                    got, c.want,
                    "config {config} {:?} rows={} kp={} n_tok={}",
                    c.layout, c.rows, c.kp, c.n_tok
                );
            }
        }
    }

    #[test]
    fn isa_names_parse_back() {
        for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni] {
            assert_eq!(Isa::parse(isa.name()), Some(isa));
        }
        assert_eq!(Isa::parse("AVX512"), Some(Isa::Avx512Vnni));
        assert_eq!(Isa::parse("neon"), None);
        assert!(Isa::detect().is_available());
    }
}
