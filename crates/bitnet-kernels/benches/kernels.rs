//! Per-kernel timings on BitNet b1.58 2B4T shapes: `cargo bench -p bitnet-kernels`.
//!
//! Every kernel runs for every implementation this CPU has (`Isa::all_available()`, the scalar
//! reference first) in the same run, so results can be read as ratios to the scalar baseline
//! on the same machine. The kernels run on one thread (a one-thread rayon pool sizes the
//! kernels' worker pool); set `BITNET_BENCH_THREADS=N` for N. divan prints the time per call
//! and, with its counters, the weight bytes streamed per second (per call: divide by the
//! token count for bytes per token). Each benchmark runs at most about 2 s; the whole run takes
//! a few minutes. `cargo bench -p bitnet-kernels --bench kernels -- ternary` runs a subset.
//!
//! - `quantize`: per-token int8 activation quantization of 2560 and 6912 values;
//! - `ternary_gemm`: int8 x ternary products on the three 2B4T matrix shapes (rows x cols:
//!   2560x2560 q/o, 6912x2560 gate/up, 2560x6912 down) for 1 token (GEMV), 8 and 64 tokens
//!   (the scalar reference for 1 token only: it does not batch); the benchmark cycles through
//!   128 MB of copies of the matrix, so the weights stream from memory as in decoding;
//! - `tq1_gemm`: the same products on TQ1_0 blocks as stored in the file (`--tq1-native`);
//! - `head_f16`: the F16 output head's dot products for 1 and 8 tokens (16384 rows of 2560, 84 MB: streamed from
//!   memory like the real 128256-row head), per-row `dot_f16` and the blocked `matmul_f16`;
//! - `head_q8`: the same rows requantized to 8-bit blocks (`--head-type q8_0`);
//! - `head_q6k`: the same shape in ggml's 6-bit Q6_K blocks (`--head-type q6_k`);
//! - `mem_read`: summing a 256 MB buffer on the kernels' worker pool: the machine's read
//!   bandwidth with this many threads, the bound for batch-1 decoding.

use bitnet_kernels::q6k;
use bitnet_kernels::q8::Q8Matrix;
use bitnet_kernels::ternary::{self, padded_len, TernaryView};
use bitnet_kernels::tq1;
use bitnet_kernels::{float, quant, Isa};
use divan::counter::BytesCount;
use divan::{black_box, Bencher};
use std::fmt;

fn main() {
    let threads = std::env::var("BITNET_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1usize)
        .max(1);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("thread pool");
    pool.install(divan::main);
}

/// A deterministic stream of test data.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    fn f32(&mut self) -> f32 {
        (self.next() % 2_000_001) as f32 / 1_000_000.0 - 1.0
    }
}

/// One benchmark case: an implementation, a matrix shape and a token count.
#[derive(Clone, Copy)]
struct Case {
    isa: Isa,
    rows: usize,
    cols: usize,
    n_tok: usize,
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}x{} t{}",
            self.isa.name(),
            self.rows,
            self.cols,
            self.n_tok
        )
    }
}

impl fmt::Debug for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The ternary matrix shapes of one 2B4T layer (rows = outputs, cols = inputs).
const SHAPES: [(usize, usize); 3] = [(2560, 2560), (6912, 2560), (2560, 6912)];

/// Every available implementation on every shape for 1, 8 and 64 tokens, except the scalar
/// reference beyond one token: it has no batching (its cost is linear in tokens) and would
/// take minutes.
fn gemm_cases() -> Vec<Case> {
    let mut v = Vec::new();
    for n_tok in [1, 8, 64] {
        for (rows, cols) in SHAPES {
            for isa in Isa::all_available() {
                if isa == Isa::Scalar && n_tok > 1 {
                    continue;
                }
                v.push(Case {
                    isa,
                    rows,
                    cols,
                    n_tok,
                });
            }
        }
    }
    v
}

fn isa_cases(rows: usize, cols: usize) -> Vec<Case> {
    Isa::all_available()
        .into_iter()
        .map(|isa| Case {
            isa,
            rows,
            cols,
            n_tok: 1,
        })
        .collect()
}

#[divan::bench(args = [2560, 6912])]
fn quantize(bencher: Bencher, n: usize) {
    let mut rng = Lcg(1);
    let x: Vec<f32> = (0..n).map(|_| rng.f32()).collect();
    let mut q = vec![0i8; padded_len(n)];
    bencher
        .counter(BytesCount::new(4 * n))
        .bench_local(|| quant::quantize_row(black_box(&x), &mut q));
}

#[divan::bench(args = gemm_cases(), max_time = 2)]
fn ternary_gemm(bencher: Bencher, c: &Case) {
    let mut rng = Lcg(2);
    let kp = padded_len(c.cols);
    let mut codes = vec![0u8; c.cols];
    let one = c.rows * kp / 4;
    // Enough copies of the matrix to overflow the last-level cache, used in turn, so the
    // weights stream from memory as they do when decoding.
    let copies = STREAM_BYTES.div_ceil(one);
    let mut data = vec![0u8; one * copies];
    for row in data[..one].chunks_mut(kp / 4) {
        for x in codes.iter_mut() {
            *x = (rng.next() % 3) as u8;
        }
        ternary::pack_row(&codes, row);
    }
    for i in 1..copies {
        data.copy_within(..one, i * one);
    }
    let (q, qsum) = activations(&mut rng, c.n_tok, c.cols, kp);
    let mut out = vec![0i32; c.n_tok * c.rows];
    let mut next = 0;
    bencher.counter(BytesCount::new(one)).bench_local(|| {
        let w = TernaryView::new(&data[next * one..(next + 1) * one], c.rows, kp);
        next = (next + 1) % copies;
        ternary::gemm(c.isa, w, black_box(&q), &qsum, c.n_tok, &mut out)
    });
}

/// Random int8 activations for `n_tok` tokens (rows of `kp`, zero past `cols`) and their sums.
fn activations(rng: &mut Lcg, n_tok: usize, cols: usize, kp: usize) -> (Vec<i8>, Vec<i32>) {
    let mut q = vec![0i8; n_tok * kp];
    let mut qsum = vec![0i32; n_tok];
    for t in 0..n_tok {
        for e in 0..cols {
            q[t * kp + e] = (rng.next() % 255) as i8;
        }
        qsum[t] = q[t * kp..(t + 1) * kp].iter().map(|&v| v as i32).sum();
    }
    (q, qsum)
}

/// The same products on TQ1_0 blocks used as stored (`--tq1-native`; AVX-512 CPUs run the
/// AVX2 kernel): compare with `ternary_gemm` of the same shape and token count.
#[divan::bench(args = gemm_cases(), max_time = 2)]
fn tq1_gemm(bencher: Bencher, c: &Case) {
    let mut rng = Lcg(4);
    let one = c.rows * tq1::row_bytes(c.cols);
    let copies = STREAM_BYTES.div_ceil(one);
    // Any byte is five valid trits; the scales are not read by the kernels.
    let data: Vec<u8> = (0..one * copies).map(|_| rng.next() as u8).collect();
    let (q, qsum) = activations(&mut rng, c.n_tok, c.cols, c.cols);
    let mut out = vec![0i32; c.n_tok * c.rows];
    let mut next = 0;
    bencher.counter(BytesCount::new(one)).bench_local(|| {
        let w = TernaryView::tq1(&data[next * one..(next + 1) * one], c.rows, c.cols);
        next = (next + 1) % copies;
        ternary::gemm(c.isa, w, black_box(&q), &qsum, c.n_tok, &mut out)
    });
}

/// Weight bytes cycled through by the GEMM benchmark: more than any last-level cache here.
const STREAM_BYTES: usize = 128 << 20;

/// Rows of the benchmark head: enough to stream from memory (84 MB of F16, 47 MB as Q8_0), as
/// the real head (128256 rows, 657 MB) does.
const HEAD_ROWS: usize = 16384;
const HEAD_COLS: usize = 2560;

fn head_data() -> (Vec<u8>, Vec<f32>) {
    let mut rng = Lcg(3);
    let data: Vec<u8> = (0..HEAD_ROWS * HEAD_COLS)
        .flat_map(|_| half::f16::from_f32(rng.f32() * 0.1).to_le_bytes())
        .collect();
    let x: Vec<f32> = (0..HEAD_COLS).map(|_| rng.f32()).collect();
    (data, x)
}

/// One dot product per row, row after row: `dot_f16` (F16C + FMA where `isa` allows) and the
/// scalar `dot_f16_scalar` under the name `scalar`.
#[divan::bench(args = isa_cases(HEAD_ROWS, HEAD_COLS), max_time = 2)]
fn head_f16_rows(bencher: Bencher, c: &Case) {
    let (data, x) = head_data();
    let mut out = vec![0f32; HEAD_ROWS];
    bencher
        .counter(BytesCount::new(data.len()))
        .bench_local(|| {
            for (r, o) in out.iter_mut().enumerate() {
                let row = &data[r * HEAD_COLS * 2..(r + 1) * HEAD_COLS * 2];
                *o = if c.isa == Isa::Scalar {
                    float::dot_f16_scalar(row, black_box(&x))
                } else {
                    float::dot_f16(c.isa, row, black_box(&x))
                };
            }
        });
}

/// The head as the engine runs it: `matmul_f16`, four rows per kernel call, for one token
/// (decoding) and for 8 at once (a batched step of 8 `serve` streams, or 8 scored positions of
/// `perplexity`: compare with 8 times one token).
#[divan::bench(args = head_cases(), max_time = 2)]
fn head_f16_matmul(bencher: Bencher, c: &Case) {
    let (data, x1) = head_data();
    let x: Vec<f32> = (0..c.n_tok)
        .flat_map(|t| x1.iter().map(move |v| v * (t + 1) as f32))
        .collect();
    let mut out = vec![0f32; c.n_tok * HEAD_ROWS];
    bencher
        .counter(BytesCount::new(data.len()))
        .bench_local(|| {
            float::matmul_f16(
                c.isa,
                &data,
                HEAD_ROWS,
                HEAD_COLS,
                black_box(&x),
                c.n_tok,
                &mut out,
            )
        });
}

fn head_cases() -> Vec<Case> {
    [1, 8]
        .into_iter()
        .flat_map(|n_tok| {
            isa_cases(HEAD_ROWS, HEAD_COLS)
                .into_iter()
                .map(move |c| Case { n_tok, ..c })
        })
        .collect()
}

/// The same head requantized to 8-bit blocks (about half the bytes of F16).
#[divan::bench(args = isa_cases(HEAD_ROWS, HEAD_COLS), max_time = 2)]
fn head_q8(bencher: Bencher, c: &Case) {
    let (data, x) = head_data();
    let m = Q8Matrix::from_rows(HEAD_ROWS, HEAD_COLS, |r, buf| {
        for (i, v) in buf.iter_mut().enumerate() {
            let o = (r * HEAD_COLS + i) * 2;
            *v = half::f16::from_le_bytes([data[o], data[o + 1]]).to_f32();
        }
    });
    let mut out = vec![0f32; HEAD_ROWS];
    bencher
        .counter(BytesCount::new(m.bytes()))
        .bench_local(|| m.matmul(c.isa, black_box(&x), 1, &mut out));
}

/// The same head shape in ggml's Q6_K blocks (`--head-type q6_k`, 0.82 bytes per weight),
/// for 1 and 8 tokens like `head_f16_matmul`; random codes and scales, which cost what real
/// ones do.
#[divan::bench(args = head_cases(), max_time = 2)]
fn head_q6k(bencher: Bencher, c: &Case) {
    let (_, x1) = head_data();
    let x: Vec<f32> = (0..c.n_tok)
        .flat_map(|t| x1.iter().map(move |v| v * (t + 1) as f32))
        .collect();
    let mut rng = Lcg(3);
    let mut data = vec![0u8; HEAD_ROWS * HEAD_COLS / q6k::QK_K * q6k::BLOCK_BYTES];
    for blk in data.chunks_exact_mut(q6k::BLOCK_BYTES) {
        blk[..208].iter_mut().for_each(|v| *v = rng.next() as u8);
        blk[208..].copy_from_slice(&half::f16::from_f32(0.001).to_le_bytes());
    }
    let mut out = vec![0f32; c.n_tok * HEAD_ROWS];
    bencher
        .counter(BytesCount::new(data.len()))
        .bench_local(|| {
            q6k::matmul(
                c.isa,
                &data,
                HEAD_ROWS,
                HEAD_COLS,
                black_box(&x),
                c.n_tok,
                &mut out,
            )
        });
}

/// Read bandwidth: sum a 256 MB buffer of u64 split over the worker pool (as the kernels
/// split their rows).
#[divan::bench(max_time = 2)]
fn mem_read(bencher: Bencher) {
    const N: usize = 32 << 20;
    let data: Vec<u64> = (0..N as u64).collect();
    let sums: Vec<std::sync::atomic::AtomicU64> = (0..64)
        .map(|_| std::sync::atomic::AtomicU64::new(0))
        .collect();
    bencher.counter(BytesCount::new(8 * N)).bench_local(|| {
        bitnet_kernels::pool::for_ranges(N, 4096, 1 << 16, |r| {
            let mut acc = [0u64; 8];
            for c in data[r.clone()].chunks_exact(8) {
                for i in 0..8 {
                    acc[i] = acc[i].wrapping_add(c[i]);
                }
            }
            let s = acc.iter().fold(0u64, |a, &b| a.wrapping_add(b));
            sums[(r.start / 4096) % 64].fetch_add(s, std::sync::atomic::Ordering::Relaxed);
        });
        black_box(&sums);
    });
}
