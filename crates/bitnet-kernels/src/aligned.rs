//! A buffer of int8 activations that starts on a cache line.

use std::ops::{Deref, DerefMut};

/// Cache line: the unit the buffer grows by and aligns to.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([i8; 64]);

/// A resizable `[i8]` whose first element is 64-byte aligned. The kernels load activations 32
/// (AVX2) or 64 (AVX-512) bytes at a time from rows that are multiples of 128 long, so with an
/// aligned start no load straddles two cache lines. A plain `Vec` left that to the allocator:
/// glibc happened to align the prompt buffers but put one-token ones 16 bytes past a line, and
/// the AVX2 prompt GEMM runs about 25% slower from such a start (`kbench`, docs/PERFORMANCE.md).
#[derive(Clone, Default)]
pub struct AlignedI8 {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedI8 {
    /// Set the length to `len`; elements past the old length are 0 (as `Vec::resize(len, 0)`).
    pub fn resize(&mut self, len: usize) {
        let old = self.len;
        self.lines.resize(len.div_ceil(64), Line([0; 64]));
        self.len = len;
        if len > old {
            self[old..].fill(0);
        }
    }
}

impl Deref for AlignedI8 {
    type Target = [i8];
    fn deref(&self) -> &[i8] {
        // SAFETY: `lines` holds at least `len` initialised i8 (64 per line, no padding).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const i8, self.len) }
    }
}

impl DerefMut for AlignedI8 {
    fn deref_mut(&mut self) -> &mut [i8] {
        // SAFETY: as in `deref`, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut i8, self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Aligned at every size, values kept across growth, new elements 0 after a shrink.
    #[test]
    fn aligned_and_resizes_like_a_vec() {
        let mut a = AlignedI8::default();
        let mut v: Vec<i8> = Vec::new();
        for (step, len) in [0usize, 1, 63, 64, 65, 1000, 7, 130, 4096]
            .into_iter()
            .enumerate()
        {
            a.resize(len);
            v.resize(len, 0);
            assert_eq!(&a[..], &v[..], "len {len}");
            assert_eq!(a.as_ptr() as usize % 64, 0, "len {len}");
            for (i, (x, y)) in a.iter_mut().zip(v.iter_mut()).enumerate() {
                let val = (i * 31 + step) as i8;
                *x = val;
                *y = val;
            }
        }
    }
}
