//! Kernel timings on BitNet b1.58 2B4T shapes, every kernel next to its baselines in the same
//! run: `cargo run --release -p bitnet-kernels --example kbench [-- FILTER [cache|stream]]`.
//!
//! - ternary GEMV/GEMM (2560x2560, 6912x2560, 2560x6912; 1 and 128 tokens): scalar, the
//!   previous AVX2 kernel (copied below as the baseline), every ISA this CPU runs, and the
//!   AVX2 kernel with activations 16 bytes past a cache line (the engine aligns them);
//! - `peak`: the core's AVX2 int8 ceiling (hand-scheduled `vpmaddubsw` + `vpaddw`), the
//!   compute bound of the ternary GEMM on AVX2, and the AVX-512 VNNI one (`vpdpbusd`);
//! - the output head (128256 x 2560): F16 one row per call on rayon (the first version) and on
//!   the pool, `matmul_f16` for every ISA (one row at a time since four rows side by side
//!   were slower on Zen 4), and the Q8_0 requantized head;
//! - TQ1_0 blocks used as stored (`tq1`) next to the 2-bit layout of the same shape;
//! - per-call dispatch cost of the worker pool against rayon.
//!
//! `stream` (default) cycles through enough copies of each matrix to exceed the last-level
//! cache, as a decode step does; `cache` reuses one copy (compute-bound throughput).
//! Prints median microseconds per call, weight GB/s and the ratio to the first line of each
//! group, for 1 and 2 threads.

use bitnet_kernels::aligned::AlignedI8;
use bitnet_kernels::float::{dot_f16, matmul_f16, par_rows};
use bitnet_kernels::q8::Q8Matrix;
use bitnet_kernels::ternary::{self, padded_len, TernaryView};
use bitnet_kernels::tq1;
use bitnet_kernels::{Isa, SyncPtr};
use std::time::Instant;

fn wall() -> f64 {
    use std::sync::OnceLock;
    static T0: OnceLock<Instant> = OnceLock::new();
    T0.get_or_init(Instant::now).elapsed().as_secs_f64()
}

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}
extern "C" {
    fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
}

/// CPU time of the calling thread (Linux CLOCK_THREAD_CPUTIME_ID): on a busy machine this
/// leaves out the time the thread waited for a core.
fn thread_cpu() -> f64 {
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: plain libc call with a valid pointer.
    unsafe { clock_gettime(3, &mut ts) };
    ts.sec as f64 + ts.nsec as f64 * 1e-9
}

/// Median seconds per call of `f`, running it for about `budget` seconds. With one thread
/// the thread's CPU time is measured (robust to other processes); with more, wall time.
fn time<F: FnMut()>(mut f: F, budget: f64) -> f64 {
    f();
    let cpu = rayon::current_num_threads() == 1;
    let now = || if cpu { thread_cpu() } else { wall() };
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < budget || samples.len() < 5 {
        let t = now();
        f();
        samples.push(now() - t);
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    samples[samples.len() / 2]
}

/// The AVX2 kernel before this change (rayon chunks, 4 tokens per unpack, i32 widening every
/// block), kept here as the baseline.
mod old {
    use super::*;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2")]
    unsafe fn hsum(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }

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

    #[target_feature(enable = "avx2")]
    unsafe fn rows(
        w: TernaryView,
        q: &[i8],
        qsum: &[i32],
        n_tok: usize,
        rr: std::ops::Range<usize>,
        out: &mut [i32],
    ) {
        let nb = w.kp / 128;
        let qp = q.as_ptr();
        for r in rr {
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
                    out[(t + i) * w.rows + r] = hsum(*a) - qsum[t + i];
                }
                t += 4;
            }
            while t < n_tok {
                let mut acc = _mm256_setzero_si256();
                for b in 0..nb {
                    let c = unpack(row.add(32 * b));
                    acc = _mm256_add_epi32(acc, block_dot(&c, qp.add(t * w.kp + 128 * b)));
                }
                out[t * w.rows + r] = hsum(acc) - qsum[t];
                t += 1;
            }
        }
    }

    pub fn gemm(w: TernaryView, q: &[i8], qsum: &[i32], n_tok: usize, out: &mut [i32]) {
        use rayon::prelude::*;
        let nrows = w.rows;
        let chunk = (nrows / (rayon::current_num_threads() * 8)).clamp(8, 256);
        let out_ptr = SyncPtr(out.as_mut_ptr());
        (0..nrows.div_ceil(chunk)).into_par_iter().for_each(|c| {
            let r0 = c * chunk;
            let r1 = (r0 + chunk).min(nrows);
            let out = unsafe { std::slice::from_raw_parts_mut(out_ptr.get(), n_tok * nrows) };
            unsafe { rows(w, q, qsum, n_tok, r0..r1, out) };
        });
    }

    /// The previous F16 head: one row per `dot_f16` call, rayon chunks.
    pub fn head_f16(isa: Isa, data: &[u8], rows: usize, cols: usize, x: &[f32], out: &mut [f32]) {
        use rayon::prelude::*;
        let chunk = (rows / (rayon::current_num_threads() * 8)).clamp(16, 1024);
        let out_ptr = SyncPtr(out.as_mut_ptr());
        (0..rows.div_ceil(chunk)).into_par_iter().for_each(|c| {
            let p = out_ptr.get();
            for r in c * chunk..((c + 1) * chunk).min(rows) {
                unsafe { *p.add(r) = dot_f16(isa, &data[r * cols * 2..(r + 1) * cols * 2], x) };
            }
        });
    }
}

fn line(
    threads: usize,
    name: &str,
    kernel: &str,
    t: f64,
    bytes: usize,
    macs: usize,
    base: &mut Option<f64>,
) {
    let ratio = base.map(|b| b / t).unwrap_or(1.0);
    base.get_or_insert(t);
    println!(
        "t={threads} {name:<26} {kernel:<14} {:>10.1} us {:>6.1} GB/s {:>7.1} Gmac/s  x{ratio:.2}",
        t * 1e6,
        bytes as f64 / t / 1e9,
        macs as f64 / t / 1e9
    );
}

/// The AVX2 int8 ceiling of this core: 32 independent `vpmaddubsw` + `vpaddw` pairs per
/// iteration (eight accumulators, operands from L1), the instructions the ternary GEMM is made
/// of, in hand-scheduled assembly. Returns multiply-adds per second, for the GEMM's fraction
/// of it.
#[cfg(target_arch = "x86_64")]
fn maddubs_peak() -> Option<f64> {
    use std::arch::asm;
    if !std::arch::is_x86_feature_detected!("avx2") {
        return None;
    }
    macro_rules! pair {
        ($off:literal, $code:literal, $tmp:literal, $acc:literal) => {
            concat!(
                "vpmaddubsw ymm",
                $tmp,
                ", ymm",
                $code,
                ", [{q} + ",
                $off,
                "]\n",
                "vpaddw ymm",
                $acc,
                ", ymm",
                $acc,
                ", ymm",
                $tmp,
                "\n"
            )
        };
    }
    #[repr(align(64))]
    struct Acts([i8; 1024]);
    let acts = Acts([1; 1024]);
    let iters: u64 = 2_000_000;
    let run = || {
        // SAFETY: AVX2 is present; the loads stay within `acts` (offsets < 1024); every
        // register written is declared clobbered.
        unsafe {
            asm!(
                "vpcmpeqb ymm8, ymm8, ymm8",
                "vpabsb ymm8, ymm8",
                "vmovdqa ymm9, ymm8",
                "vmovdqa ymm10, ymm8",
                "vmovdqa ymm11, ymm8",
                "2:",
                pair!("0", "8", "12", "0"),
                pair!("128", "8", "13", "1"),
                pair!("256", "8", "14", "2"),
                pair!("384", "8", "15", "3"),
                pair!("512", "8", "12", "4"),
                pair!("640", "8", "13", "5"),
                pair!("768", "8", "14", "6"),
                pair!("896", "8", "15", "7"),
                pair!("32", "9", "12", "0"),
                pair!("160", "9", "13", "1"),
                pair!("288", "9", "14", "2"),
                pair!("416", "9", "15", "3"),
                pair!("544", "9", "12", "4"),
                pair!("672", "9", "13", "5"),
                pair!("800", "9", "14", "6"),
                pair!("928", "9", "15", "7"),
                pair!("64", "10", "12", "0"),
                pair!("192", "10", "13", "1"),
                pair!("320", "10", "14", "2"),
                pair!("448", "10", "15", "3"),
                pair!("576", "10", "12", "4"),
                pair!("704", "10", "13", "5"),
                pair!("832", "10", "14", "6"),
                pair!("960", "10", "15", "7"),
                pair!("96", "11", "12", "0"),
                pair!("224", "11", "13", "1"),
                pair!("352", "11", "14", "2"),
                pair!("480", "11", "15", "3"),
                pair!("608", "11", "12", "4"),
                pair!("736", "11", "13", "5"),
                pair!("864", "11", "14", "6"),
                pair!("992", "11", "15", "7"),
                "dec {n}",
                "jnz 2b",
                q = in(reg) acts.0.as_ptr(),
                n = inout(reg) iters => _,
                out("ymm0") _, out("ymm1") _, out("ymm2") _, out("ymm3") _,
                out("ymm4") _, out("ymm5") _, out("ymm6") _, out("ymm7") _,
                out("ymm8") _, out("ymm9") _, out("ymm10") _, out("ymm11") _,
                out("ymm12") _, out("ymm13") _, out("ymm14") _, out("ymm15") _,
                options(nostack, readonly),
            );
        }
    };
    let t = time(run, 0.3);
    Some(iters as f64 * 1024.0 / t)
}

#[cfg(not(target_arch = "x86_64"))]
fn maddubs_peak() -> Option<f64> {
    None
}

/// The AVX-512 VNNI ceiling of this core: `vpdpbusd` on 512-bit registers, eight independent
/// accumulators, no loads (the tile's activation loads are shared by its four rows). The
/// compute bound of the AVX-512 ternary GEMM (64 multiply-adds per instruction).
#[cfg(target_arch = "x86_64")]
fn vnni_peak() -> Option<f64> {
    use std::arch::asm;
    if !bitnet_kernels::Isa::Avx512Vnni.is_available() {
        return None;
    }
    let iters: u64 = 4_000_000;
    let run = || {
        // SAFETY: AVX-512 F/VNNI are present; no memory is touched; every register written is
        // declared clobbered.
        unsafe {
            asm!(
                "vpternlogd zmm8, zmm8, zmm8, 0xff",
                "vpabsb zmm9, zmm8",
                "2:",
                "vpdpbusd zmm0, zmm8, zmm9",
                "vpdpbusd zmm1, zmm8, zmm9",
                "vpdpbusd zmm2, zmm8, zmm9",
                "vpdpbusd zmm3, zmm8, zmm9",
                "vpdpbusd zmm4, zmm8, zmm9",
                "vpdpbusd zmm5, zmm8, zmm9",
                "vpdpbusd zmm6, zmm8, zmm9",
                "vpdpbusd zmm7, zmm8, zmm9",
                "dec {n}",
                "jnz 2b",
                n = inout(reg) iters => _,
                out("zmm0") _, out("zmm1") _, out("zmm2") _, out("zmm3") _,
                out("zmm4") _, out("zmm5") _, out("zmm6") _, out("zmm7") _,
                out("zmm8") _, out("zmm9") _,
                options(nostack, nomem),
            );
        }
    };
    let t = time(run, 0.3);
    Some(iters as f64 * 8.0 * 64.0 / t)
}

#[cfg(not(target_arch = "x86_64"))]
fn vnni_peak() -> Option<f64> {
    None
}

/// Random int8 activations, cache-line aligned as the engine's are.
fn random_acts(rng: &mut Lcg, n: usize) -> AlignedI8 {
    let mut q = AlignedI8::default();
    q.resize(n);
    q.iter_mut().for_each(|v| *v = rng.next() as i8);
    q
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let filter = args.get(1).cloned().unwrap_or_default();
    let stream = args.get(2).map(|s| s != "cache").unwrap_or(true);
    let stream_bytes: usize = if stream { 256 << 20 } else { 0 };
    let mut rng = Lcg(7);
    let isas = Isa::all_available();
    println!(
        "kernels: {:?}; weights {}",
        isas.iter().map(|i| i.name()).collect::<Vec<_>>(),
        if stream {
            "streamed (> LLC)"
        } else {
            "cache-resident"
        }
    );
    let has = |n: &str| filter.is_empty() || n.contains(&filter);
    if has("peak") || has("ternary") {
        if let Some(p) = maddubs_peak() {
            println!(
                "t=1 AVX2 int8 ceiling (vpmaddubsw + vpaddw, from L1): {:.1} Gmac/s",
                p / 1e9
            );
        }
        if let Some(p) = vnni_peak() {
            println!(
                "t=1 AVX-512 VNNI int8 ceiling (vpdpbusd zmm, registers): {:.1} Gmac/s",
                p / 1e9
            );
        }
    }
    for threads in [1usize, 2] {
        let tp = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        tp.install(|| {
            if has("dispatch") {
                let (rows, kp) = (64usize, 2560usize);
                let w = vec![0x55u8; rows * kp / 4];
                let view = TernaryView::new(&w, rows, kp);
                let q = vec![1i8; kp];
                let mut out = vec![0i32; rows];
                let isa = Isa::detect();
                let a = time(|| ternary::gemm(isa, view, &q, &[kp as i32], 1, &mut out), 0.3);
                let b = time(|| old::gemm(view, &q, &[kp as i32], 1, &mut out), 0.3);
                let c = time(
                    || ternary::gemm_rows(isa, view, &q, &[kp as i32], 1, 0..rows, &mut out),
                    0.3,
                );
                println!(
                    "t={threads} dispatch, 64x2560 GEMV: pool {:.2} us, rayon chunks {:.2} us, one thread no dispatch {:.2} us",
                    a * 1e6,
                    b * 1e6,
                    c * 1e6
                );
            }
            for &(rows, k) in &[(2560usize, 2560usize), (6912, 2560), (2560, 6912)] {
                let kp = padded_len(k);
                let bytes = rows * kp / 4;
                let copies = stream_bytes.div_ceil(bytes).max(1);
                let one: Vec<u8> = (0..bytes)
                    .map(|_| {
                        let mut b = 0u8;
                        for s in 0..4 {
                            b |= ((rng.next() % 3) as u8) << (2 * s);
                        }
                        b
                    })
                    .collect();
                let w = one.repeat(copies);
                for n_tok in [1usize, 128] {
                    let name = format!("ternary {rows}x{k} n={n_tok}");
                    if !has(&name) {
                        continue;
                    }
                    let q = random_acts(&mut rng, n_tok * kp);
                    let qsum: Vec<i32> = (0..n_tok)
                        .map(|t| q[t * kp..(t + 1) * kp].iter().map(|&v| v as i32).sum())
                        .collect();
                    let mut out = vec![0i32; n_tok * rows];
                    let mut want = vec![0i32; n_tok * rows];
                    let mut base = None;
                    let macs = rows * k * n_tok;
                    let mut i = 0;
                    let mut next = || {
                        let v = TernaryView::new(&w[i * bytes..], rows, kp);
                        i = (i + 1) % copies;
                        v
                    };
                    if n_tok == 1 && threads == 1 {
                        let t = time(|| ternary::gemm(Isa::Scalar, next(), &q, &qsum, n_tok, &mut want), 0.3);
                        line(threads, &name, "scalar", t, bytes, macs, &mut base);
                    }
                    let t = time(|| old::gemm(next(), &q, &qsum, n_tok, &mut out), 0.6);
                    line(threads, &name, "avx2 (before)", t, bytes, macs, &mut base);
                    for &isa in isas.iter().filter(|&&i| i != Isa::Scalar) {
                        let t = time(|| ternary::gemm(isa, next(), &q, &qsum, n_tok, &mut out), 0.6);
                        line(threads, &name, isa.name(), t, bytes, macs, &mut base);
                    }
                    // The engine's activations start on a cache line; what a start 16 bytes
                    // past one (a plain Vec of this size from glibc) would cost.
                    let mut off = AlignedI8::default();
                    off.resize(q.len() + 16);
                    off[16..].copy_from_slice(&q);
                    let (q16, isa) = (&off[16..], Isa::detect());
                    let t = time(|| ternary::gemm(isa, next(), q16, &qsum, n_tok, &mut out), 0.6);
                    line(threads, &name, "(16 mod 64)", t, bytes, macs, &mut base);
                }
            }
            // TQ1_0 blocks as stored in the file, next to the 2-bit layout of the same shape.
            for &(rows, k) in &[(2560usize, 2560usize), (6912, 2560), (2560, 6912)] {
                let (b2, b1) = (rows * k / 4, rows * tq1::row_bytes(k));
                let copies = stream_bytes.div_ceil(b1).max(1);
                let two: Vec<u8> = (0..b2 * copies).map(|_| rng.next() as u8 & 0x55).collect();
                let one: Vec<u8> = (0..b1 * copies).map(|_| rng.next() as u8).collect();
                for n_tok in [1usize, 128] {
                    let name = format!("tq1 {rows}x{k} n={n_tok}");
                    if !has(&name) {
                        continue;
                    }
                    let q = random_acts(&mut rng, n_tok * k);
                    let qsum = vec![0i32; n_tok];
                    let mut out = vec![0i32; n_tok * rows];
                    let (mut base, macs, isa) = (None, rows * k * n_tok, Isa::detect());
                    let mut i = 0;
                    type View = for<'a> fn(&'a [u8], usize, usize) -> TernaryView<'a>;
                    let layouts: [(&str, &[u8], usize, View); 2] = [
                        ("2-bit", &two, b2, |d, r, k| TernaryView::new(d, r, k)),
                        ("tq1_0", &one, b1, |d, r, k| TernaryView::tq1(d, r, k)),
                    ];
                    for (label, data, bytes, view) in layouts {
                        let t = time(
                            || {
                                i = (i + 1) % copies;
                                let v = view(&data[i * bytes..], rows, k);
                                ternary::gemm(isa, v, &q, &qsum, n_tok, &mut out)
                            },
                            0.6,
                        );
                        line(threads, &name, label, t, bytes, macs, &mut base);
                    }
                }
            }
            let (rows, cols) = (128256usize, 2560usize);
            let name = format!("head {rows}x{cols}");
            if has(&name) {
                let f16: Vec<u8> = (0..rows * cols)
                    .flat_map(|_| half::f16::from_f32((rng.next() % 2001) as f32 / 1000.0 - 1.0).to_le_bytes())
                    .collect();
                let x: Vec<f32> = (0..cols).map(|_| (rng.next() % 2001) as f32 / 1000.0 - 1.0).collect();
                let mut out = vec![0f32; rows];
                let mut base = None;
                let isa = Isa::detect();
                let macs = rows * cols;
                let t = time(|| old::head_f16(isa, &f16, rows, cols, &x, &mut out), 1.0);
                line(threads, &name, "f16 (before)", t, f16.len(), macs, &mut base);
                let t = time(
                    || {
                        par_rows(rows, 1, cols, &x, &mut out, |r, xt| {
                            dot_f16(isa, &f16[r * cols * 2..(r + 1) * cols * 2], xt)
                        })
                    },
                    1.0,
                );
                line(threads, &name, "f16 1row pool", t, f16.len(), macs, &mut base);
                for &isa in &isas {
                    let t = time(|| matmul_f16(isa, &f16, rows, cols, &x, 1, &mut out), 1.0);
                    line(threads, &name, &format!("f16 {}", isa.name()), t, f16.len(), macs, &mut base);
                }
                // Eight tokens at once (serve's batched steps): per-token cost against one.
                let x8: Vec<f32> = x.iter().cycle().take(8 * cols).copied().collect();
                let mut out8 = vec![0f32; 8 * rows];
                let isa = Isa::detect();
                let t = time(|| matmul_f16(isa, &f16, rows, cols, &x8, 8, &mut out8), 1.0);
                line(threads, &name, "f16 8 tokens", t, f16.len(), 8 * macs, &mut base);
                let t = time(|| matmul_f16(isa, &f16, rows, cols, &x8, 2, &mut out8), 1.0);
                line(threads, &name, "f16 2 tokens", t, f16.len(), 2 * macs, &mut base);
                let q8 = Q8Matrix::from_rows(rows, cols, |r, o| {
                    for (c, v) in o.iter_mut().enumerate() {
                        *v = half::f16::from_le_bytes([f16[2 * (r * cols + c)], f16[2 * (r * cols + c) + 1]]).to_f32();
                    }
                });
                drop(f16);
                for &isa in &isas {
                    let t = time(|| q8.matmul(isa, &x, 1, &mut out), 1.0);
                    line(threads, &name, &format!("q8_0 {}", isa.name()), t, q8.bytes(), macs, &mut base);
                }
                for &isa in &isas[1..] {
                    let t = time(|| q8.matmul(isa, &x8, 8, &mut out8), 1.0);
                    line(threads, &name, &format!("q8_0 8 tok {}", isa.name()), t, q8.bytes(), 8 * macs, &mut base);
                }
            }
        });
    }
}
