//! Quick kernel timings on BitNet b1.58 2B4T shapes: `cargo run --release -p bitnet-kernels
//! --example kbench [-- filter]`. Prints time per call and weight bytes streamed per second for
//! every available ISA, on 1 and 2 threads, so speedups can be read as ratios within one run.

use bitnet_kernels::ternary::{self, padded_len, TernaryView};
use bitnet_kernels::Isa;
use std::time::Instant;

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

/// Median seconds per call of `f`, running it for about `budget` seconds.
fn time<F: FnMut()>(mut f: F, budget: f64) -> f64 {
    f();
    let mut samples = Vec::new();
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < budget || samples.len() < 5 {
        let t = Instant::now();
        f();
        samples.push(t.elapsed().as_secs_f64());
    }
    samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
    samples[samples.len() / 2]
}

/// The old dispatch (rayon chunks), for comparing the per-call overhead with the pool's.
fn gemm_rayon(isa: Isa, w: TernaryView, q: &[i8], qsum: &[i32], n_tok: usize, out: &mut [i32]) {
    use rayon::prelude::*;
    let rows = w.rows;
    let chunk = (rows / (rayon::current_num_threads() * 8)).clamp(8, 256);
    let out_ptr = bitnet_kernels::SyncPtr(out.as_mut_ptr());
    (0..rows.div_ceil(chunk)).into_par_iter().for_each(|c| {
        let r0 = c * chunk;
        let r1 = (r0 + chunk).min(rows);
        let out = unsafe { std::slice::from_raw_parts_mut(out_ptr.get(), n_tok * rows) };
        ternary::gemm_rows(isa, w, q, qsum, n_tok, r0..r1, out);
    });
}

fn main() {
    let filter = std::env::args().nth(1).unwrap_or_default();
    let mut rng = Lcg(7);
    let isas = Isa::all_available();
    // Weights are streamed from memory as in a real decode step: each call uses the next of
    // enough copies to exceed the last-level cache many times over.
    const STREAM_BYTES: usize = 256 << 20;
    for threads in [1usize, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            if "dispatch".contains(&filter) || filter.is_empty() {
                // Per-call overhead: a small GEMV (64 rows x 2560, in cache) through the
                // persistent pool and through rayon chunks.
                let (rows, kp) = (64usize, 2560usize);
                let w = vec![0x55u8; rows * kp / 4];
                let view = TernaryView::new(&w, rows, kp);
                let q = vec![1i8; kp];
                let mut out = vec![0i32; rows];
                let isa = Isa::detect();
                let a = time(|| ternary::gemm(isa, view, &q, &[kp as i32], 1, &mut out), 0.3);
                let b = time(|| gemm_rayon(isa, view, &q, &[kp as i32], 1, &mut out), 0.3);
                let c = time(
                    || ternary::gemm_rows(isa, view, &q, &[kp as i32], 1, 0..rows, &mut out),
                    0.3,
                );
                println!(
                    "t={threads} dispatch of a 64x2560 GEMV: pool {:.2} us, rayon {:.2} us, no threads {:.2} us",
                    a * 1e6,
                    b * 1e6,
                    c * 1e6
                );
            }
            for &(rows, k) in &[(2560usize, 2560usize), (6912, 2560), (2560, 6912)] {
                let kp = padded_len(k);
                let bytes = rows * kp / 4;
                let copies = STREAM_BYTES.div_ceil(bytes);
                let one: Vec<u8> = (0..bytes)
                    .map(|_| {
                        let mut b = 0u8;
                        for s in 0..4 {
                            b |= ((rng.next() % 3) as u8) << (2 * s);
                        }
                        b
                    })
                    .collect();
                let mut w = Vec::with_capacity(copies * bytes);
                for _ in 0..copies {
                    w.extend_from_slice(&one);
                }
                for n_tok in [1usize, 128] {
                    let name = format!("gemm {rows}x{k} n_tok={n_tok}");
                    if !name.contains(&filter) {
                        continue;
                    }
                    let q: Vec<i8> = (0..n_tok * kp).map(|_| rng.next() as i8).collect();
                    let qsum: Vec<i32> = (0..n_tok)
                        .map(|t| q[t * kp..(t + 1) * kp].iter().map(|&v| v as i32).sum())
                        .collect();
                    let mut out = vec![0i32; n_tok * rows];
                    let mut base = None;
                    for &isa in &isas {
                        if isa == Isa::Scalar && (n_tok > 1 || threads > 1) {
                            continue;
                        }
                        let mut i = 0;
                        let t = time(
                            || {
                                let view = TernaryView::new(&w[i * bytes..], rows, kp);
                                i = (i + 1) % copies;
                                ternary::gemm(isa, view, &q, &qsum, n_tok, &mut out)
                            },
                            if isa == Isa::Scalar { 0.3 } else { 0.6 },
                        );
                        let gbs = bytes as f64 / t / 1e9;
                        let ratio = base.map(|b: f64| b / t).unwrap_or(1.0);
                        base.get_or_insert(t);
                        println!(
                            "t={threads} {name:<28} {:<10} {:>9.1} us  {:>6.1} GB/s  {:>7.1} Gmac/s  x{ratio:.2}",
                            isa.name(),
                            t * 1e6,
                            gbs,
                            (rows * k * n_tok) as f64 / t / 1e9
                        );
                    }
                }
            }
        });
    }
}
