//! The hot loops of bitnet-rs. Every optimised kernel has a scalar twin in the same file and a
//! test that compares the two on odd shapes. Kernels see only slices: no model files, no model.
//!
//! - [`quant`]: per-token int8 activation quantization (BitNet's absmax scheme).
//! - [`ternary`]: int8 x ternary matrix products in the runtime packed layout.
//! - [`tq1`]: the same products on TQ1_0 blocks as stored in the file (1.69 bits per weight).
//! - [`float`]: f32/f16 dot products for the output head, RMSNorm, softmax.
//! - [`q8`]: the output head requantized to 8-bit blocks (Q8_0 x Q8_0 products).
//! - [`q6k`]: the output head in ggml's 6-bit Q6_K blocks (Q6_K x int8 products).
//! - [`aligned`]: the cache-line-aligned buffer the int8 activations live in.
//! - [`pool`]: the persistent worker pool the kernels run on (`rayon::current_num_threads()`
//!   threads).

pub mod aligned;
#[cfg(test)]
mod emu512;
pub mod float;
pub mod pool;
pub mod q6k;
pub mod q8;
pub mod quant;
pub mod ternary;
pub mod tq1;

pub use ternary::Isa;

/// A raw pointer that may be shared across the rayon pool when tasks write disjoint parts.
#[derive(Clone, Copy)]
pub struct SyncPtr<T>(pub *mut T);
unsafe impl<T> Send for SyncPtr<T> {}
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    /// Accessor (a method, so closures capture the whole Send/Sync wrapper).
    #[inline]
    pub fn get(self) -> *mut T {
        self.0
    }
}

#[cfg(test)]
pub(crate) mod test_rng {
    /// Tiny deterministic generator for test data.
    pub struct Lcg(pub u64);
    impl Lcg {
        pub fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
        pub fn f32(&mut self) -> f32 {
            (self.next() % 2_000_001) as f32 / 1_000_000.0 - 1.0
        }
    }
}
