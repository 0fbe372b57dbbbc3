//! Scalar codecs for the tensor types we read. These are the reference decoders: simple,
//! obviously correct, and used by the engine to repack ternary weights at load and to read
//! float matrices (embeddings, heads, norms).
//!
//! Layouts (REFERENCE.md section 2):
//! - I2_S: the flattened tensor in 128-weight blocks of 32 bytes; byte j holds weight j in bits
//!   7-6, 32+j in 5-4, 64+j in 3-2, 96+j in 1-0; code 0 = -1, 1 = 0, 2 = +1; then an f32 scale.
//! - TQ2_0: 256-weight blocks of 66 bytes: qs[64], f16 d.
//! - TQ1_0: 256-weight blocks of 54 bytes: qs[48] (5 trits/byte), qh[4] (4 trits/byte), f16 d.
//! - Q8_0: 32-weight blocks of 34 bytes: f16 d, i8 qs[32].
//! - Q6_K: 256-weight blocks of 210 bytes: ql[128], qh[64], i8 scales[16], f16 d.

use crate::bail;
use crate::error::Result;
use crate::gguf::GgmlType;
use half::{bf16, f16};

#[inline]
pub fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32()
}

/// A row of little-endian F16 to f32. Rows in a mapped file are 2-byte aligned (GGUF aligns
/// tensor data to 32 bytes), so on a little-endian CPU the bytes are read as `f16` in place
/// and converted with `half`'s slice conversion (F16C, 8 at a time, where the CPU has it:
/// about 10x faster than element by element); anything else takes the element-wise path.
fn f16_row(row: &[u8], out: &mut [f32]) {
    // SAFETY: every bit pattern is a valid f16; `align_to` only returns the aligned middle.
    let (head, mid, tail) = unsafe { row.align_to::<f16>() };
    if cfg!(target_endian = "little") && head.is_empty() && tail.is_empty() {
        use half::slice::HalfFloatSliceExt;
        mid.convert_to_f32_slice(out);
    } else {
        out.iter_mut()
            .enumerate()
            .for_each(|(i, o)| *o = f16_at(row, i));
    }
}

#[inline]
pub fn bf16_at(b: &[u8], i: usize) -> f32 {
    bf16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32()
}

#[inline]
pub fn f32_at(b: &[u8], i: usize) -> f32 {
    f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
}

/// The 2-bit I2_S code (0, 1, 2; 3 is invalid) of flattened element `e`.
#[inline]
pub fn i2s_code(data: &[u8], e: usize) -> u8 {
    let (block, j) = (e / 128, e % 128);
    let byte = data[block * 32 + j % 32];
    (byte >> (6 - 2 * (j / 32))) & 3
}

/// The f32 scale stored after the codes of an I2_S tensor of `n` elements.
pub fn i2s_scale(data: &[u8], n: usize) -> f32 {
    f32_at(&data[n / 4..n / 4 + 4], 0)
}

/// Ternary value (-1, 0, +1) of element `e` of one TQ2_0 block, and its code.
#[inline]
pub fn tq2_code(block: &[u8], e: usize) -> u8 {
    (block[(e / 128) * 32 + e % 32] >> (2 * ((e % 128) / 32))) & 3
}

/// Trit (0, 1, 2) of element `e` of one TQ1_0 block.
#[inline]
pub fn tq1_code(block: &[u8], e: usize) -> u8 {
    let (byte, n) = if e < 160 {
        (block[e % 32], e / 32)
    } else if e < 240 {
        (block[32 + (e - 160) % 16], (e - 160) / 16)
    } else {
        (block[48 + (e - 240) % 4], (e - 240) / 4)
    };
    TQ1_TRITS[byte as usize][n]
}

/// The five trits of every TQ1_0 byte, as llama.cpp extracts them: trit n of byte x is
/// `((x * 3^n mod 256) * 3) >> 8`.
const TQ1_TRITS: [[u8; 5]; 256] = {
    const POW3: [u8; 5] = [1, 3, 9, 27, 81];
    let mut t = [[0u8; 5]; 256];
    let mut x = 0;
    while x < 256 {
        let mut n = 0;
        while n < 5 {
            let q = (x as u8).wrapping_mul(POW3[n]);
            t[x][n] = ((q as u16 * 3) >> 8) as u8;
            n += 1;
        }
        x += 1;
    }
    t
};

/// Decode one row of a row-blocked or plain float type into f32. `row` holds exactly the bytes
/// of `out.len()` elements. I2_S is not row-blocked: use [`i2s_code`].
pub fn dequantize_row(dtype: GgmlType, row: &[u8], out: &mut [f32]) -> Result<()> {
    let n = out.len();
    let (bs, bb) = dtype.block();
    if dtype == GgmlType::I2_S
        || !(n as u64).is_multiple_of(bs)
        || row.len() as u64 != n as u64 / bs * bb
    {
        bail!(
            "cannot decode a {n}-element row of {dtype} from {} bytes",
            row.len()
        );
    }
    match dtype {
        GgmlType::F32 => out
            .iter_mut()
            .enumerate()
            .for_each(|(i, o)| *o = f32_at(row, i)),
        GgmlType::F16 => f16_row(row, out),
        GgmlType::BF16 => out
            .iter_mut()
            .enumerate()
            .for_each(|(i, o)| *o = bf16_at(row, i)),
        GgmlType::Q8_0 => {
            for (blk, o) in row.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
                let d = f16_at(blk, 0);
                for i in 0..32 {
                    o[i] = blk[2 + i] as i8 as f32 * d;
                }
            }
        }
        GgmlType::Q6_K => {
            for (blk, o) in row.chunks_exact(210).zip(out.chunks_exact_mut(256)) {
                dequantize_q6k_block(blk, o);
            }
        }
        GgmlType::TQ2_0 => {
            for (blk, o) in row.chunks_exact(66).zip(out.chunks_exact_mut(256)) {
                let d = f16_at(&blk[64..66], 0);
                for (e, v) in o.iter_mut().enumerate() {
                    *v = (tq2_code(blk, e) as f32 - 1.0) * d;
                }
            }
        }
        GgmlType::TQ1_0 => {
            for (blk, o) in row.chunks_exact(54).zip(out.chunks_exact_mut(256)) {
                let d = f16_at(&blk[52..54], 0);
                for (e, v) in o.iter_mut().enumerate() {
                    *v = (tq1_code(blk, e) as f32 - 1.0) * d;
                }
            }
        }
        GgmlType::I2_S => unreachable!(),
    }
    Ok(())
}

/// ggml's `dequantize_row_q6_K` for one 256-element block.
fn dequantize_q6k_block(blk: &[u8], out: &mut [f32]) {
    let (ql, rest) = blk.split_at(128);
    let (qh, rest) = rest.split_at(64);
    let (sc, d) = rest.split_at(16);
    let d = f16_at(d, 0);
    for half in 0..2 {
        let ql = &ql[64 * half..];
        let qh = &qh[32 * half..];
        let sc = &sc[8 * half..];
        let y = &mut out[128 * half..];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            y[l] = d * (sc[is] as i8 as f32) * q1 as f32;
            y[l + 32] = d * (sc[is + 2] as i8 as f32) * q2 as f32;
            y[l + 64] = d * (sc[is + 4] as i8 as f32) * q3 as f32;
            y[l + 96] = d * (sc[is + 6] as i8 as f32) * q4 as f32;
        }
    }
}

/// Ternary codes (value + 1: 0, 1, 2) of one row of a ternary-typed tensor, and the scale of
/// every 256-block for TQ types (one scale for I2_S). `ne0` is the row length.
pub struct TernaryRow {
    pub codes: Vec<u8>,
    /// Distinct non-zero block scales seen in this row (I2_S: its one tensor scale).
    pub scales: Vec<f32>,
}

/// Read the codes of row `r` of a ternary tensor (I2_S, TQ2_0 or TQ1_0) into `codes`
/// (len = ne0), returning the block scales seen. Code 3 in I2_S (never written by any
/// converter) is an error. TQ1_0 trits above 2 cannot occur.
pub fn ternary_row(
    dtype: GgmlType,
    data: &[u8],
    ne0: usize,
    n_total: usize,
    r: usize,
    codes: &mut [u8],
) -> Result<Vec<f32>> {
    debug_assert_eq!(codes.len(), ne0);
    match dtype {
        GgmlType::I2_S => {
            let base = r * ne0;
            for (i, c) in codes.iter_mut().enumerate() {
                *c = i2s_code(data, base + i);
                if *c == 3 {
                    bail!("invalid I2_S code 3 at element {}", base + i);
                }
            }
            Ok(vec![i2s_scale(data, n_total)])
        }
        GgmlType::TQ2_0 | GgmlType::TQ1_0 => {
            let bb = dtype.block().1 as usize;
            let blocks_per_row = ne0 / 256;
            let mut scales = Vec::new();
            for b in 0..blocks_per_row {
                let blk = &data[(r * blocks_per_row + b) * bb..][..bb];
                let d = f16_at(&blk[bb - 2..], 0);
                let out = &mut codes[b * 256..(b + 1) * 256];
                if dtype == GgmlType::TQ1_0 {
                    // Byte by byte through the trit table (the order of `tq1_code`); trits
                    // are at most 2 by construction.
                    for (first, count, bytes, trits) in
                        [(0, 32, 0..32, 5), (160, 16, 32..48, 5), (240, 4, 48..52, 4)]
                    {
                        for (m, &x) in blk[bytes].iter().enumerate() {
                            for n in 0..trits {
                                out[first + count * n + m] = TQ1_TRITS[x as usize][n];
                            }
                        }
                    }
                } else {
                    for (e, c) in out.iter_mut().enumerate() {
                        *c = tq2_code(blk, e);
                        if *c > 2 {
                            bail!("invalid {dtype} code {} in block {b} of row {r}", *c);
                        }
                    }
                }
                let nonzero = out.iter().any(|&c| c != 1);
                if nonzero && d != 0.0 && !scales.contains(&d) {
                    scales.push(d);
                }
            }
            Ok(scales)
        }
        _ => bail!("{dtype} is not a ternary type"),
    }
}

/// Whether any 2-bit field of `bytes` holds 3 (0b11, invalid in I2_S and TQ2_0): a branch-free
/// fold (vectorised), not a byte-by-byte early exit.
pub fn has_code_3(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .fold(0u8, |acc, &b| acc | (b & (b >> 1) & 0x55))
        != 0
}

// ---------------------------------------------------------------------------------------------
// Encoders (used by `bitnet convert`). Ternary codes are `w + 1` in {0, 1, 2}.

/// I2_S bytes of a whole tensor: `codes` is the flattened tensor (row-major, `n` a multiple of
/// 128), cut into 128-weight blocks of 32 bytes that run across row boundaries, then the f32
/// `scale` and 28 zero bytes (`n/4 + 32` bytes), exactly as bitnet.cpp lays it out.
pub fn encode_i2s(codes: &[u8], scale: f32) -> Result<Vec<u8>> {
    let n = codes.len();
    if !n.is_multiple_of(128) {
        bail!("I2_S needs a multiple of 128 elements, got {n}");
    }
    let mut out = vec![0u8; n / 4 + 32];
    for (e, &c) in codes.iter().enumerate() {
        if c > 2 {
            bail!("invalid ternary code {c} at element {e}");
        }
        let (block, j) = (e / 128, e % 128);
        out[block * 32 + j % 32] |= c << (6 - 2 * (j / 32));
    }
    out[n / 4..n / 4 + 4].copy_from_slice(&scale.to_le_bytes());
    Ok(out)
}

/// The f16 `d` of one ternary block: the scale, or 0 for an all-zero block (what ggml's
/// reference quantizers write, since `d` is the block's max |w|).
fn block_d(codes: &[u8], scale: f32) -> [u8; 2] {
    let d = if codes.iter().all(|&c| c == 1) {
        0.0
    } else {
        scale
    };
    f16::from_f32(d).to_le_bytes()
}

fn check_ternary_row(codes: &[u8], dtype: GgmlType) -> Result<()> {
    if !codes.len().is_multiple_of(256) {
        bail!(
            "{dtype} needs rows that are a multiple of 256 elements, got {}",
            codes.len()
        );
    }
    if let Some(i) = codes.iter().position(|&c| c > 2) {
        bail!("invalid ternary code {} at element {i}", codes[i]);
    }
    Ok(())
}

/// Append one row of TQ2_0 blocks (66 bytes per 256 weights: qs[64], f16 d), as ggml's
/// `quantize_row_tq2_0_ref` writes a row holding `(code - 1) * scale`.
pub fn encode_tq2_0_row(codes: &[u8], scale: f32, out: &mut Vec<u8>) -> Result<()> {
    check_ternary_row(codes, GgmlType::TQ2_0)?;
    for blk in codes.chunks_exact(256) {
        let mut qs = [0u8; 64];
        for (e, &c) in blk.iter().enumerate() {
            qs[(e / 128) * 32 + e % 32] |= c << (2 * ((e % 128) / 32));
        }
        out.extend_from_slice(&qs);
        out.extend_from_slice(&block_d(blk, scale));
    }
    Ok(())
}

/// Append one row of TQ1_0 blocks (54 bytes per 256 weights: qs[48], qh[4], f16 d), packed as
/// ggml's `quantize_row_tq1_0_ref`: 5 trits per byte (4 in `qh`) as a base-3 number, most
/// significant trit first, scaled to 256/243 and rounded up.
pub fn encode_tq1_0_row(codes: &[u8], scale: f32, out: &mut Vec<u8>) -> Result<()> {
    check_ternary_row(codes, GgmlType::TQ1_0)?;
    fn pack(trits: impl Iterator<Item = u8>, n: usize) -> u8 {
        let mut q: u16 = 0;
        for t in trits {
            q = q * 3 + t as u16;
        }
        for _ in n..5 {
            q *= 3;
        }
        (q * 256).div_ceil(243) as u8
    }
    for t in codes.chunks_exact(256) {
        let mut bytes = [0u8; 54];
        for m in 0..32 {
            bytes[m] = pack((0..5).map(|n| t[n * 32 + m]), 5);
        }
        for m in 0..16 {
            bytes[32 + m] = pack((0..5).map(|n| t[160 + n * 16 + m]), 5);
        }
        for j in 0..4 {
            bytes[48 + j] = pack((0..4).map(|n| t[240 + n * 4 + j]), 4);
        }
        bytes[52..54].copy_from_slice(&block_d(t, scale));
        out.extend_from_slice(&bytes);
    }
    Ok(())
}

/// Append one row as Q8_0 (32-element blocks: f16 d = max|x| / 127, i8 q = round(x / d), ties
/// away from zero), as ggml's `quantize_row_q8_0_ref`.
pub fn quantize_row_q8_0(x: &[f32], out: &mut Vec<u8>) -> Result<()> {
    if !x.len().is_multiple_of(32) {
        bail!(
            "Q8_0 needs rows that are a multiple of 32 elements, got {}",
            x.len()
        );
    }
    for blk in x.chunks_exact(32) {
        let amax = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        out.extend(blk.iter().map(|&v| (v * id).round() as i8 as u8));
    }
    Ok(())
}

/// ggml's `nearest_int`: round to nearest, ties to even, by ggml's own trick: adding 1.5 * 2^23
/// leaves the rounded integer in the low mantissa bits. It is exact for |v| < 2^22, where the
/// argument is clamped first (the callers clamp the result to a few bits anyway), and unlike
/// `round_ties_even` it is not a libm call without SSE4.1: the Q6_K quantizer calls it about
/// 40 times per weight (20 s to requantize the 2B4T head with the call, see `--head-type`).
#[inline]
fn nearest_int(v: f32) -> i32 {
    let v = v.clamp(-4_194_303.0, 4_194_303.0);
    ((v + 12_582_912.0).to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// Groups searched side by side by [`make_qx_quants16x8`]: one lane each.
const LANES: usize = 8;
type Lanes = [f32; LANES];

/// `max(lo, y)` then `min(hi, y)` as x86's `maxps` / `minps` compute them (a NaN `y` passes
/// through, as with `f32::clamp`), written as selects so that both builds vectorise them.
#[inline(always)]
fn clamp_lane(y: f32, lo: f32, hi: f32) -> f32 {
    let y = if lo > y { lo } else { y };
    if hi < y {
        hi
    } else {
        y
    }
}

/// `nearest_int(y.clamp(-nmax, nmax - 1))` as a float: clamping first gives the same integer
/// (the bounds are integers), and adding and subtracting 1.5 * 2^23 rounds half to even
/// without a libm call, so the loops below vectorise.
#[inline(always)]
fn round_clamped(y: f32, nmax: f32) -> f32 {
    (clamp_lane(y, -nmax, nmax - 1.0) + 12_582_912.0) - 12_582_912.0
}

/// ggml's first guess (`is` = 0), then -0.9 .. +0.9 around nmax: the candidate inverse
/// scales are `-(nmax + 0.1 is) / max`.
const CANDIDATES: [i8; 19] = [
    0, -9, -8, -7, -6, -5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 6, 7, 8, 9,
];

/// ggml's `make_qx_quants` with `rmse_type = 1` and no importance weights (the form Q6_K's
/// reference quantizer uses) for eight groups of 16 (`x`: 128 values, group g at `16 g..`):
/// each group's scale and the inverse scale of the winning candidate, from which
/// [`qx_levels`] gives its levels. Each group runs in its own lane with ggml's operations in
/// ggml's order (serial sums, the 19 candidates in turn, the same comparisons), so the results
/// are ggml's bit for bit; side by side, eight groups cost about what one did alone. `AVX2`
/// selects the intrinsics twin of the search (the same operations in the same order), which
/// keeps four candidates' sums in registers: each sum is a serial chain of 16 adds, so one
/// candidate at a time would wait on the add latency; the compiler's own vectorisation of the
/// portable loop was up to 2x slower and changed with unrelated edits.
#[inline(always)]
fn make_qx_quants16x8<const AVX2: bool>(nmax: i32, x: &[f32; 16 * LANES]) -> (Lanes, Lanes) {
    // Transposed: xt[i][g] is value i of group g.
    let xt: [Lanes; 16] = std::array::from_fn(|i| std::array::from_fn(|g| x[16 * g + i]));
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        // SAFETY: AVX2 = true only in the AVX2 build of the quantizer.
        return unsafe { search16x8_avx2(nmax as f32, &xt) };
    }
    search16x8(nmax as f32, &xt)
}

/// The portable search of [`make_qx_quants16x8`] over transposed groups.
#[inline(always)]
fn search16x8(nmax: f32, xt: &[Lanes; 16]) -> (Lanes, Lanes) {
    let (mut max, mut amax) = ([0f32; LANES], [0f32; LANES]);
    for row in xt {
        for g in 0..LANES {
            let bigger = row[g].abs() > amax[g];
            amax[g] = if bigger { row[g].abs() } else { amax[g] };
            max[g] = if bigger { row[g] } else { max[g] };
        }
    }
    let w: [Lanes; 16] = std::array::from_fn(|i| std::array::from_fn(|g| xt[i][g] * xt[i][g]));
    let wx: [Lanes; 16] = std::array::from_fn(|i| std::array::from_fn(|g| w[i][g] * xt[i][g]));
    let (mut scale, mut best, mut best_iscale) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
    for (k, &is) in CANDIDATES.iter().enumerate() {
        let iscale: Lanes = std::array::from_fn(|g| -(nmax + 0.1 * is as f32) / max[g]);
        let (mut slx, mut sl2) = ([0f32; LANES], [0f32; LANES]);
        for i in 0..16 {
            for g in 0..LANES {
                let l = round_clamped(iscale[g] * xt[i][g], nmax);
                slx[g] += wx[i][g] * l;
                sl2[g] += w[i][g] * l * l;
            }
        }
        for g in 0..LANES {
            let take = k == 0 || (sl2[g] > 0.0 && slx[g] * slx[g] > best[g] * sl2[g]);
            if take {
                scale[g] = if sl2[g] != 0.0 { slx[g] / sl2[g] } else { 0.0 };
                best[g] = scale[g] * slx[g];
                best_iscale[g] = iscale[g];
            }
        }
    }
    for g in 0..LANES {
        // ggml's GROUP_MAX_EPS: an all-(near-)zero group has scale 0 and levels 0.
        if amax[g] < 1e-15 {
            scale[g] = 0.0;
            best_iscale[g] = 0.0;
        }
    }
    (scale, best_iscale)
}

/// The AVX2 twin of [`search16x8`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn search16x8_avx2(nmax: f32, xt: &[Lanes; 16]) -> (Lanes, Lanes) {
    use std::arch::x86_64::*;
    let x: [__m256; 16] = std::array::from_fn(|i| _mm256_loadu_ps(xt[i].as_ptr()));
    let sign = _mm256_set1_ps(-0.0);
    let (mut max, mut amax) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for &v in &x {
        let a = _mm256_andnot_ps(sign, v);
        let bigger = _mm256_cmp_ps::<_CMP_GT_OQ>(a, amax);
        amax = _mm256_blendv_ps(amax, a, bigger);
        max = _mm256_blendv_ps(max, v, bigger);
    }
    let w: [__m256; 16] = std::array::from_fn(|i| _mm256_mul_ps(x[i], x[i]));
    let wx: [__m256; 16] = std::array::from_fn(|i| _mm256_mul_ps(w[i], x[i]));
    let (lo, hi) = (_mm256_set1_ps(-nmax), _mm256_set1_ps(nmax - 1.0));
    let zero = _mm256_setzero_ps();
    let (mut scale, mut best, mut best_iscale) = (zero, zero, zero);
    let mut k = 0;
    while k < CANDIDATES.len() {
        // Up to four candidates per pass over the values, their sums in registers.
        const K: usize = 4;
        let n = K.min(CANDIDATES.len() - k);
        let is: [__m256; K] = std::array::from_fn(|j| {
            let c = CANDIDATES[(k + j).min(CANDIDATES.len() - 1)];
            _mm256_div_ps(_mm256_set1_ps(-(nmax + 0.1 * c as f32)), max)
        });
        let (mut slx, mut sl2) = ([zero; K], [zero; K]);
        for i in 0..16 {
            for j in 0..K {
                // `clamp_lane`: maxps / minps with the bound first, as the portable selects;
                // then `round_clamped`'s rounding to nearest even in one instruction.
                let y = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_mul_ps(is[j], x[i])));
                let l = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(y);
                slx[j] = _mm256_add_ps(slx[j], _mm256_mul_ps(wx[i], l));
                sl2[j] = _mm256_add_ps(sl2[j], _mm256_mul_ps(_mm256_mul_ps(w[i], l), l));
            }
        }
        for j in 0..n {
            let (slx, sl2) = (slx[j], sl2[j]);
            // `if sl2 != 0 { slx / sl2 } else { 0 }` (`!=` is true for NaN, as NEQ_UQ), and
            // the candidate's `best`: neither waits on the previous candidate.
            let s = _mm256_and_ps(
                _mm256_cmp_ps::<_CMP_NEQ_UQ>(sl2, zero),
                _mm256_div_ps(slx, sl2),
            );
            let b = _mm256_mul_ps(s, slx);
            if k + j == 0 {
                (scale, best, best_iscale) = (s, b, is[j]);
                continue;
            }
            let take = _mm256_and_ps(
                _mm256_cmp_ps::<_CMP_GT_OQ>(sl2, zero),
                _mm256_cmp_ps::<_CMP_GT_OQ>(_mm256_mul_ps(slx, slx), _mm256_mul_ps(best, sl2)),
            );
            scale = _mm256_blendv_ps(scale, s, take);
            best = _mm256_blendv_ps(best, b, take);
            best_iscale = _mm256_blendv_ps(best_iscale, is[j], take);
        }
        k += n;
    }
    // ggml's GROUP_MAX_EPS: an all-(near-)zero group has scale 0 and levels 0.
    let live = _mm256_cmp_ps::<_CMP_NLT_UQ>(amax, _mm256_set1_ps(1e-15));
    let mut out = ([0f32; LANES], [0f32; LANES]);
    _mm256_storeu_ps(out.0.as_mut_ptr(), _mm256_and_ps(live, scale));
    _mm256_storeu_ps(out.1.as_mut_ptr(), _mm256_and_ps(live, best_iscale));
    out
}

/// The levels (offset by `nmax`) of one group for the inverse scale `make_qx_quants16x8`
/// chose; 0 for an all-zero group (`iscale` = 0), as ggml leaves them.
fn qx_levels(nmax: i32, iscale: f32, x: &[f32]) -> [i8; 16] {
    if iscale == 0.0 {
        return [0; 16];
    }
    std::array::from_fn(|i| (nmax + round_clamped(iscale * x[i], nmax as f32) as i32) as i8)
}

/// Append one row as Q6_K (256-element blocks of 210 bytes: ql[128], qh[64], i8 scales[16],
/// f16 d), following ggml's `quantize_row_q6_K_ref`: the same bytes (the group search and the
/// levels have AVX2 twins, with the same operations in the same order and no FMA). The output
/// head of 2B4T (328 M weights) is requantized at load with it: 4.4-5.9 ns per weight on one
/// core of the Zen 3 development VM, against 18 searching one group at a time
/// (`--head-type q6_k`, docs/PERFORMANCE.md).
pub fn quantize_row_q6_k(x: &[f32], out: &mut Vec<u8>) -> Result<()> {
    if !x.len().is_multiple_of(256) {
        bail!(
            "Q6_K needs rows that are a multiple of 256 elements, got {}",
            x.len()
        );
    }
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        unsafe { quantize_q6_k_avx2(x, out) };
        return Ok(());
    }
    quantize_q6_k_blocks::<false>(x, out);
    Ok(())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_q6_k_avx2(x: &[f32], out: &mut Vec<u8>) {
    quantize_q6_k_blocks::<true>(x, out)
}

#[inline(always)]
fn quantize_q6_k_blocks<const AVX2: bool>(x: &[f32], out: &mut Vec<u8>) {
    for xb in x.chunks_exact(256) {
        let (mut scales, mut iscales) = ([0f32; 16], [0f32; 16]);
        for (half, x) in xb.chunks_exact(16 * LANES).enumerate() {
            let (s, is) = make_qx_quants16x8::<AVX2>(32, x.try_into().expect("128 values"));
            scales[LANES * half..][..LANES].copy_from_slice(&s);
            iscales[LANES * half..][..LANES].copy_from_slice(&is);
        }
        let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
        for &s in &scales {
            if s.abs() > max_abs_scale {
                max_abs_scale = s.abs();
                max_scale = s;
            }
        }
        let mut l = [[0i8; 16]; 16];
        let mut blk = [0u8; 210];
        if max_abs_scale < 1e-15 {
            out.extend_from_slice(&blk);
            continue;
        }
        let iscale = -128.0 / max_scale;
        let d = f16::from_f32(1.0 / iscale);
        blk[208..210].copy_from_slice(&d.to_le_bytes());
        let (d, mut dj) = (d.to_f32(), [0f32; 16]);
        for j in 0..16 {
            let sc = nearest_int(iscale * scales[j]).min(127) as i8;
            blk[192 + j] = sc as u8;
            dj[j] = d * sc as f32;
        }
        // Every value's level (the groups whose dj is 0 divide by zero here, and are redone
        // below).
        q6_k_levels::<AVX2>(xb, &dj, &mut l);
        for j in 0..16 {
            if dj[j] == 0.0 {
                // ggml keeps the group search's levels here (they decode to 0 all the same).
                l[j] = qx_levels(32, iscales[j], &xb[16 * j..16 * j + 16]);
            }
        }
        let l: &[i8; 256] = l.as_flattened().try_into().expect("256 levels");
        let (ql, qh) = blk[..192].split_at_mut(128);
        for (half, j) in [0usize, 128].into_iter().enumerate() {
            let ql = &mut ql[64 * half..];
            let qh = &mut qh[32 * half..];
            for i in 0..32 {
                let q = |k: usize| l[j + i + k] as u8;
                ql[i] = (q(0) & 0xF) | ((q(64) & 0xF) << 4);
                ql[i + 32] = (q(32) & 0xF) | ((q(96) & 0xF) << 4);
                qh[i] =
                    (q(0) >> 4) | ((q(32) >> 4) << 2) | ((q(64) >> 4) << 4) | ((q(96) >> 4) << 6);
            }
        }
        out.extend_from_slice(&blk);
    }
}

/// Each value's Q6_K level for its group's step `dj`: `round(clamp(x / dj, -32, 31)) + 32`, and
/// 32 for a NaN. `AVX2` selects the intrinsics twin (the compiler gathered across groups and
/// converted one value at a time: half of the quantizer's time).
#[inline(always)]
fn q6_k_levels<const AVX2: bool>(xb: &[f32], dj: &[f32; 16], l: &mut [[i8; 16]; 16]) {
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        // SAFETY: AVX2 = true only in the AVX2 build of the quantizer.
        unsafe { q6_k_levels_avx2(xb, dj, l) };
        return;
    }
    for (j, (l, x)) in l.iter_mut().zip(xb.chunks_exact(16)).enumerate() {
        for (q, &v) in l.iter_mut().zip(x) {
            *q = (round_clamped(v / dj[j], 32.0) as i32 + 32) as i8;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn q6_k_levels_avx2(xb: &[f32], dj: &[f32; 16], l: &mut [[i8; 16]; 16]) {
    use std::arch::x86_64::*;
    let (lo, hi) = (_mm256_set1_ps(-32.0), _mm256_set1_ps(31.0));
    let offset = _mm256_set1_epi32(32);
    let level = |v: __m256, d: __m256| {
        let y = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_div_ps(v, d)));
        // NaN to 0, as `as i32` converts it.
        let y = _mm256_and_ps(_mm256_cmp_ps::<_CMP_ORD_Q>(y, y), y);
        let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(y);
        _mm256_add_epi32(_mm256_cvtps_epi32(r), offset)
    };
    assert!(xb.len() >= 256);
    for (j, out) in l.iter_mut().enumerate() {
        let d = _mm256_set1_ps(dj[j]);
        let p = xb.as_ptr().add(16 * j);
        let a = level(_mm256_loadu_ps(p), d);
        let b = level(_mm256_loadu_ps(p.add(8)), d);
        // 0..=63 as i32 -> i16 -> u8; the packs work per 128-bit half, hence the permute.
        let w = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(a, b));
        let bytes = _mm_packus_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
        _mm_storeu_si128(out.as_mut_ptr() as *mut __m128i, bytes);
    }
}

/// Append one row of f32 values in a float or block-quantized type (F32, F16, BF16, Q8_0,
/// Q6_K): the embedding and output head of a converted model.
pub fn quantize_row(dtype: GgmlType, x: &[f32], out: &mut Vec<u8>) -> Result<()> {
    match dtype {
        GgmlType::F32 => x
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        GgmlType::F16 => x
            .iter()
            .for_each(|&v| out.extend_from_slice(&f16::from_f32(v).to_le_bytes())),
        GgmlType::BF16 => x
            .iter()
            .for_each(|&v| out.extend_from_slice(&bf16::from_f32(v).to_le_bytes())),
        GgmlType::Q8_0 => quantize_row_q8_0(x, out)?,
        GgmlType::Q6_K => quantize_row_q6_k(x, out)?,
        other => bail!("cannot quantize floats to {other}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bit trick equals `round_ties_even` on every quarter step in -300..300 (halves
    /// included), near the edge of its exact range and on its neighbours; beyond it the
    /// argument is clamped, and NaN gives 0.
    #[test]
    fn nearest_int_is_round_ties_even() {
        for i in -1200..=1200 {
            let v = i as f32 / 4.0;
            assert_eq!(nearest_int(v), v.round_ties_even() as i32, "{v}");
            for w in [v.next_up(), v.next_down()] {
                assert_eq!(nearest_int(w), w.round_ties_even() as i32, "{w}");
            }
        }
        for v in [
            4_194_302.5f32,
            -4_194_302.5,
            4_194_303.0,
            1e-30,
            -0.49999997,
        ] {
            assert_eq!(nearest_int(v), v.round_ties_even() as i32, "{v}");
        }
        assert_eq!(nearest_int(1e9), 4_194_303);
        assert_eq!(nearest_int(f32::NEG_INFINITY), -4_194_303);
        assert_eq!(nearest_int(f32::NAN), 0);
    }

    /// The public encoders, taking values in {-1, 0, 1}.
    fn codes(vals: &[i8]) -> Vec<u8> {
        vals.iter().map(|&v| (v + 1) as u8).collect()
    }

    fn encode_i2s(vals: &[i8], scale: f32) -> Vec<u8> {
        super::encode_i2s(&codes(vals), scale).unwrap()
    }

    fn encode_tq2(vals: &[i8], d: f32) -> Vec<u8> {
        let mut out = Vec::new();
        encode_tq2_0_row(&codes(vals), d, &mut out).unwrap();
        out
    }

    fn encode_tq1(vals: &[i8], d: f32) -> Vec<u8> {
        let mut out = Vec::new();
        encode_tq1_0_row(&codes(vals), d, &mut out).unwrap();
        out
    }

    fn pseudo_ternary(n: usize, seed: u32) -> Vec<i8> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                ((s >> 16) % 3) as i8 - 1
            })
            .collect()
    }

    #[test]
    fn i2s_rows_follow_the_flat_layout_across_row_boundaries() {
        // Rows of 688: blocks of 128 run straight across rows (REFERENCE.md trap 7).
        let (ne0, rows) = (688usize, 2usize);
        let n = ne0 * rows;
        let n = n.div_ceil(128) * 128; // flattened length must be a multiple of 128
        let vals = pseudo_ternary(n, 7);
        let data = encode_i2s(&vals, 0.25);
        assert_eq!(i2s_scale(&data, n), 0.25);
        let mut codes = vec![0u8; ne0];
        for r in 0..rows {
            let scales = ternary_row(GgmlType::I2_S, &data, ne0, n, r, &mut codes).unwrap();
            assert_eq!(scales, vec![0.25]);
            for i in 0..ne0 {
                assert_eq!(codes[i] as i8 - 1, vals[r * ne0 + i], "row {r} col {i}");
            }
        }
    }

    #[test]
    fn i2s_code_3_is_rejected() {
        let mut data = encode_i2s(&[0; 128], 1.0);
        data[5] = 0xC0 | 0x15;
        let mut codes = vec![0u8; 128];
        assert!(ternary_row(GgmlType::I2_S, &data, 128, 128, 0, &mut codes).is_err());
    }

    /// `ternary_row` reads TQ1_0 byte by byte; `tq1_code` element by element: same codes,
    /// and both give back what was encoded.
    #[test]
    fn tq1_rows_read_every_element() {
        let (rows, ne0) = (2, 768);
        let vals = pseudo_ternary(rows * ne0, 5);
        let mut data = Vec::new();
        for row in vals.chunks(ne0) {
            encode_tq1_0_row(&codes(row), 0.5, &mut data).unwrap();
        }
        let bb = GgmlType::TQ1_0.block().1 as usize;
        for r in 0..rows {
            let mut out = vec![9u8; ne0];
            ternary_row(GgmlType::TQ1_0, &data, ne0, rows * ne0, r, &mut out).unwrap();
            for (e, &c) in out.iter().enumerate() {
                let blk = &data[(r * ne0 / 256 + e / 256) * bb..][..bb];
                assert_eq!(c, tq1_code(blk, e % 256), "row {r} element {e}");
                assert_eq!(c as i8 - 1, vals[r * ne0 + e], "row {r} element {e}");
            }
        }
    }

    #[test]
    fn tq2_and_tq1_decode_their_encodings() {
        let vals = pseudo_ternary(512, 3);
        for (dtype, data) in [
            (GgmlType::TQ2_0, encode_tq2(&vals, 0.5)),
            (GgmlType::TQ1_0, encode_tq1(&vals, 0.5)),
        ] {
            let mut out = vec![0f32; 512];
            dequantize_row(dtype, &data, &mut out).unwrap();
            for i in 0..512 {
                assert_eq!(out[i], vals[i] as f32 * 0.5, "{dtype} element {i}");
            }
            let mut codes = vec![0u8; 512];
            let scales = ternary_row(dtype, &data, 512, 512, 0, &mut codes).unwrap();
            assert_eq!(scales, vec![0.5]);
        }
    }

    /// The F16 row decoder, on an aligned and a misaligned copy of the same bytes (the
    /// slice-conversion and the element-wise paths), equals the element-wise decoder bit for
    /// bit on every 16-bit pattern (normals, subnormals, infinities, NaNs).
    #[test]
    fn f16_rows_decode_every_pattern_on_both_paths() {
        let bytes: Vec<u8> = (0..=u16::MAX).flat_map(|v| v.to_le_bytes()).collect();
        let n = bytes.len() / 2;
        let mut buf = vec![0u8; bytes.len() + 1];
        for shift in [0, 1] {
            // One of the two offsets is 2-byte aligned and the other is not.
            buf[shift..shift + bytes.len()].copy_from_slice(&bytes);
            let mut out = vec![0f32; n];
            dequantize_row(GgmlType::F16, &buf[shift..shift + bytes.len()], &mut out).unwrap();
            for (i, o) in out.iter().enumerate() {
                assert_eq!(o.to_bits(), f16_at(&bytes, i).to_bits(), "pattern {i:#06x}");
            }
        }
    }

    #[test]
    fn q8_0_and_floats() {
        let mut blk = f16::from_f32(0.5).to_le_bytes().to_vec();
        blk.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let mut out = vec![0f32; 32];
        dequantize_row(GgmlType::Q8_0, &blk, &mut out).unwrap();
        assert_eq!(out[0], -8.0);
        assert_eq!(out[31], 7.5);
        let bytes: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut out = vec![0f32; 2];
        dequantize_row(GgmlType::F32, &bytes, &mut out).unwrap();
        assert_eq!(out, vec![1.5, -2.0]);
        assert!(dequantize_row(GgmlType::F32, &bytes[..7], &mut out).is_err());
    }

    #[test]
    fn q6_k_decodes_a_hand_built_block() {
        // All 6-bit quants = 33 (value +1), scales[i] = i + 1, d = 0.5.
        let mut blk = vec![0u8; 210];
        for b in &mut blk[..128] {
            *b = 0x11; // low nibbles 1
        }
        for b in &mut blk[128..192] {
            *b = 0b10_10_10_10; // high 2 bits = 2 -> q = 1 | 32 = 33
        }
        for i in 0..16 {
            blk[192 + i] = (i + 1) as u8;
        }
        blk[208..210].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
        let mut out = vec![0f32; 256];
        dequantize_row(GgmlType::Q6_K, &blk, &mut out).unwrap();
        // Element e = 128*half + 32*k + l uses scales[8*half + l/16 + 2*k] (ggml's sc[is + 2k]).
        for (e, &v) in out.iter().enumerate() {
            let half = e / 128;
            let k = (e % 128) / 32;
            let l = e % 32;
            let sc = (8 * half + l / 16 + 2 * k + 1) as f32;
            assert_eq!(v, 0.5 * sc, "element {e}");
        }
    }

    #[test]
    fn encoders_match_the_layout_description() {
        // I2_S: element j of a block in byte j % 32 at bits 6 - 2 * (j / 32); scale; zeros.
        let mut vals = vec![0i8; 256];
        vals[0] = 1;
        vals[33] = -1;
        vals[128 + 127] = 1;
        let d = encode_i2s(&vals, 0.5);
        assert_eq!(d.len(), 64 + 32);
        assert_eq!(d[0], 0b10_01_01_01);
        assert_eq!(d[1], 0b01_00_01_01);
        assert_eq!(d[32 + 31], 0b01_01_01_10);
        assert_eq!(f32_at(&d[64..68], 0), 0.5);
        assert!(d[68..].iter().all(|&b| b == 0));
        assert!(super::encode_i2s(&[1; 100], 1.0).is_err());
        // An all-zero TQ block stores d = 0, like ggml's reference quantizer.
        let mut vals = pseudo_ternary(512, 9);
        vals[256..].iter_mut().for_each(|v| *v = 0);
        for data in [encode_tq2(&vals, 0.25), encode_tq1(&vals, 0.25)] {
            let bb = data.len() / 2;
            assert_eq!(f16_at(&data[bb - 2..bb], 0), 0.25);
            assert_eq!(f16_at(&data[2 * bb - 2..], 0), 0.0);
        }
    }

    #[test]
    fn q8_0_and_q6_k_quantizers_round_trip_closely() {
        let mut s = 11u32;
        let x: Vec<f32> = (0..512)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                ((s >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 0.2
            })
            .collect();
        for (dtype, tol) in [
            (GgmlType::Q8_0, 0.2 / 2.0 / 127.0),
            (GgmlType::Q6_K, 0.1 / 28.0),
        ] {
            let mut q = Vec::new();
            quantize_row(dtype, &x, &mut q).unwrap();
            assert_eq!(q.len() as u64, dtype.data_size(512, 512).unwrap());
            let mut y = vec![0f32; 512];
            dequantize_row(dtype, &q, &mut y).unwrap();
            let err = x
                .iter()
                .zip(&y)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(err <= tol, "{dtype}: max error {err}");
        }
        // Q8_0 errors stay within half a step plus the f16 rounding of d.
        let x: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * 0.5).collect();
        let mut q = Vec::new();
        quantize_row_q8_0(&x, &mut q).unwrap();
        let mut y = vec![0f32; 32];
        dequantize_row(GgmlType::Q8_0, &q, &mut y).unwrap();
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() <= 8.0 / 127.0 / 2.0 + 8.0 * 2e-3, "{a} {b}");
        }
        // All zeros stay zeros.
        let mut q = Vec::new();
        quantize_row_q6_k(&[0.0; 256], &mut q).unwrap();
        assert!(q.iter().all(|&b| b == 0));
    }

    /// The AVX2 level twin gives the portable levels, rounding halves to even, clamping both
    /// ends, and for NaN and infinite values too.
    #[test]
    fn q6_k_levels_twins_agree() {
        let mut xb: Vec<f32> = (0..256).map(|i| (i as f32 - 128.0) * 0.25).collect();
        (xb[5], xb[77], xb[200]) = (f32::NAN, f32::INFINITY, f32::NEG_INFINITY);
        let dj: [f32; 16] = std::array::from_fn(|j| [0.5, 1.0, 0.25, -0.75][j % 4]);
        let mut portable = [[0i8; 16]; 16];
        q6_k_levels::<false>(&xb, &dj, &mut portable);
        assert_eq!(portable[0][5], 32, "NaN");
        assert_eq!(portable[0][0], 0, "clamped to -32");
        assert_eq!(portable[8][0], 32, "0 / dj");
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            let mut fast = [[0i8; 16]; 16];
            q6_k_levels::<true>(&xb, &dj, &mut fast);
            assert_eq!(fast, portable);
        }
    }

    /// ggml's `make_qx_quants` (rmse_type 1, no importance weights) as ggml writes it: serial
    /// sums, `nearest_int`, levels rewritten at every improvement.
    fn make_qx_quants_serial(nmax: i32, x: &[f32], l_out: &mut [i8]) -> f32 {
        let max = x
            .iter()
            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        if max.abs() < 1e-15 {
            l_out.fill(0);
            return 0.0;
        }
        let quant = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        let (mut scale, mut best) = (0f32, 0f32);
        for is in [0].into_iter().chain((-9..=9).filter(|&i| i != 0)) {
            let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
            let (mut slx, mut sl2) = (0f32, 0f32);
            for &v in x {
                let (l, w) = (quant(iscale, v) as f32, v * v);
                slx += w * v * l;
                sl2 += w * l * l;
            }
            if is == 0 || (sl2 > 0.0 && slx * slx > best * sl2) {
                scale = if sl2 != 0.0 { slx / sl2 } else { 0.0 };
                best = scale * slx;
                for (o, &v) in l_out.iter_mut().zip(x) {
                    *o = (nmax + quant(iscale, v)) as i8;
                }
            }
        }
        scale
    }

    /// The lane-parallel group search gives what ggml's serial one gives, bit for bit: the
    /// same scales and levels for every group. And the AVX2 build of the row quantizer writes
    /// the portable one's bytes.
    #[test]
    fn q6_k_group_search_matches_ggml() {
        let mut s = 7u32;
        let mut rnd = || {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        let n = 4000;
        let mut row = Vec::new();
        for g in 0..n {
            let mut x: [f32; 16] = std::array::from_fn(|_| rnd());
            if g % 3 == 0 {
                x[g % 16] *= 20.0; // an outlier
            }
            if g % 5 == 0 {
                x.iter_mut().for_each(|v| *v = v.abs()); // all one sign
            }
            if g % 7 == 0 {
                x[(g + 3) % 16] = -x[g % 16]; // a tie for the largest magnitude
            }
            if g % 97 == 0 {
                x = [0.0; 16]; // below ggml's GROUP_MAX_EPS
                x[g % 16] = 1e-16;
            }
            row.extend_from_slice(&x);
        }
        for (k, x) in row.chunks_exact(16 * LANES).enumerate() {
            let (scales, iscales) = make_qx_quants16x8::<false>(32, x.try_into().unwrap());
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") {
                let fast = make_qx_quants16x8::<true>(32, x.try_into().unwrap());
                assert_eq!(fast.0.map(f32::to_bits), scales.map(f32::to_bits));
                assert_eq!(fast.1.map(f32::to_bits), iscales.map(f32::to_bits));
            }
            for g in 0..LANES {
                let group = &x[16 * g..16 * g + 16];
                let mut want = [0i8; 16];
                let s = make_qx_quants_serial(32, group, &mut want);
                let at = k * LANES + g;
                assert_eq!(scales[g].to_bits(), s.to_bits(), "group {at}: scale");
                assert_eq!(qx_levels(32, iscales[g], group), want, "group {at}: levels");
            }
        }
        // Non-finite values (a hostile file's F16 head) give the same bytes in both builds.
        let mut odd = row[..512].to_vec();
        (odd[3], odd[40], odd[300]) = (f32::NAN, f32::INFINITY, f32::NEG_INFINITY);
        odd[256..272].fill(f32::NAN);
        row.extend_from_slice(&odd);
        let (mut fast, mut portable) = (Vec::new(), Vec::new());
        quantize_row_q6_k(&row, &mut fast).unwrap();
        quantize_q6_k_blocks::<false>(&row, &mut portable);
        assert_eq!(fast, portable);
    }
}
