//! Scalar emulation of the few AVX-512 intrinsics our kernels use (tests only), with the same
//! names and signatures as `std::arch::x86_64`. Each AVX-512 kernel is written once in a macro
//! and also instantiated over this module, so its logic (layouts, index arithmetic, tails) is
//! tested against the scalar reference on any CPU. Semantics follow Intel's pseudo-code.
#![allow(non_camel_case_types, clippy::missing_safety_doc)]

#[derive(Clone, Copy)]
pub struct __m512i([u8; 64]);
#[derive(Clone, Copy)]
pub struct __m256i([u8; 32]);
#[derive(Clone, Copy)]
pub struct __m512([f32; 16]);

pub const _MM_HINT_T0: i32 = 3;

/// A hint with no effect on results: nothing to emulate.
pub unsafe fn _mm_prefetch<const STRATEGY: i32>(_p: *const i8) {}

impl __m512i {
    fn i16(&self, i: usize) -> i16 {
        i16::from_le_bytes([self.0[2 * i], self.0[2 * i + 1]])
    }
    fn u16(&self, i: usize) -> u16 {
        self.i16(i) as u16
    }
    fn i32(&self, i: usize) -> i32 {
        i32::from_le_bytes(self.0[4 * i..4 * i + 4].try_into().unwrap())
    }
    fn set_u16(&mut self, i: usize, v: u16) {
        self.0[2 * i..2 * i + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn set_i32(&mut self, i: usize, v: i32) {
        self.0[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes());
    }
}

pub unsafe fn _mm512_setzero_si512() -> __m512i {
    __m512i([0; 64])
}

pub unsafe fn _mm512_set1_epi8(a: i8) -> __m512i {
    __m512i([a as u8; 64])
}

pub unsafe fn _mm512_set1_epi32(a: i32) -> __m512i {
    let mut r = __m512i([0; 64]);
    (0..16).for_each(|i| r.set_i32(i, a));
    r
}

pub unsafe fn _mm512_loadu_si512<T>(p: *const T) -> __m512i {
    __m512i(std::ptr::read_unaligned(p as *const [u8; 64]))
}

pub unsafe fn _mm256_loadu_si256(p: *const __m256i) -> __m256i {
    __m256i(std::ptr::read_unaligned(p as *const [u8; 32]))
}

pub unsafe fn _mm512_broadcast_i64x4(a: __m256i) -> __m512i {
    let mut r = [0u8; 64];
    r[..32].copy_from_slice(&a.0);
    r[32..].copy_from_slice(&a.0);
    __m512i(r)
}

pub unsafe fn _mm512_and_si512(a: __m512i, b: __m512i) -> __m512i {
    __m512i(std::array::from_fn(|i| a.0[i] & b.0[i]))
}

pub unsafe fn _mm512_xor_si512(a: __m512i, b: __m512i) -> __m512i {
    __m512i(std::array::from_fn(|i| a.0[i] ^ b.0[i]))
}

/// Per 16-bit lane logical right shift; counts above 15 give 0.
pub unsafe fn _mm512_srlv_epi16(a: __m512i, count: __m512i) -> __m512i {
    let mut r = __m512i([0; 64]);
    for i in 0..32 {
        let c = count.u16(i);
        r.set_u16(i, if c > 15 { 0 } else { a.u16(i) >> c });
    }
    r
}

/// Per 32-bit lane: src + sum of four u8(a) * i8(b) products (wrapping, no saturation).
pub unsafe fn _mm512_dpbusd_epi32(src: __m512i, a: __m512i, b: __m512i) -> __m512i {
    let mut r = src;
    for i in 0..16 {
        let mut s = src.i32(i);
        for k in 0..4 {
            s = s.wrapping_add(a.0[4 * i + k] as i32 * b.0[4 * i + k] as i8 as i32);
        }
        r.set_i32(i, s);
    }
    r
}

pub unsafe fn _mm512_add_epi32(a: __m512i, b: __m512i) -> __m512i {
    let mut r = a;
    (0..16).for_each(|i| r.set_i32(i, a.i32(i).wrapping_add(b.i32(i))));
    r
}

/// Per 128-bit lane: the low (`HI` false) or high two 32-bit elements of a and b, interleaved.
fn unpack_epi32<const HI: bool>(a: __m512i, b: __m512i) -> __m512i {
    let mut r = __m512i([0; 64]);
    for l in 0..4 {
        for k in 0..2 {
            let src = 4 * l + k + if HI { 2 } else { 0 };
            r.set_i32(4 * l + 2 * k, a.i32(src));
            r.set_i32(4 * l + 2 * k + 1, b.i32(src));
        }
    }
    r
}

pub unsafe fn _mm512_unpacklo_epi32(a: __m512i, b: __m512i) -> __m512i {
    unpack_epi32::<false>(a, b)
}

pub unsafe fn _mm512_unpackhi_epi32(a: __m512i, b: __m512i) -> __m512i {
    unpack_epi32::<true>(a, b)
}

/// Per 128-bit lane: the low (`HI` false) or high 64-bit element of a, then that of b.
fn unpack_epi64<const HI: bool>(a: __m512i, b: __m512i) -> __m512i {
    let mut r = __m512i([0; 64]);
    for l in 0..4 {
        let at = 16 * l + if HI { 8 } else { 0 };
        r.0[16 * l..16 * l + 8].copy_from_slice(&a.0[at..at + 8]);
        r.0[16 * l + 8..16 * l + 16].copy_from_slice(&b.0[at..at + 8]);
    }
    r
}

pub unsafe fn _mm512_unpacklo_epi64(a: __m512i, b: __m512i) -> __m512i {
    unpack_epi64::<false>(a, b)
}

pub unsafe fn _mm512_unpackhi_epi64(a: __m512i, b: __m512i) -> __m512i {
    unpack_epi64::<true>(a, b)
}

/// 128-bit lanes: the low two picked from a, the high two from b, by 2-bit fields of MASK.
pub unsafe fn _mm512_shuffle_i32x4<const MASK: i32>(a: __m512i, b: __m512i) -> __m512i {
    let mut r = __m512i([0; 64]);
    for l in 0..4 {
        let src = (MASK as usize >> (2 * l)) & 3;
        let from = if l < 2 { &a } else { &b };
        r.0[16 * l..16 * l + 16].copy_from_slice(&from.0[16 * src..16 * src + 16]);
    }
    r
}

pub unsafe fn _mm512_storeu_si512<T>(p: *mut T, a: __m512i) {
    std::ptr::write_unaligned(p as *mut [u8; 64], a.0)
}

pub unsafe fn _mm512_reduce_add_epi32(a: __m512i) -> i32 {
    (0..16).fold(0i32, |s, i| s.wrapping_add(a.i32(i)))
}

pub unsafe fn _mm512_cvtepi32_ps(a: __m512i) -> __m512 {
    __m512(std::array::from_fn(|i| a.i32(i) as f32))
}

pub unsafe fn _mm512_setzero_ps() -> __m512 {
    __m512([0.0; 16])
}

pub unsafe fn _mm512_set1_ps(a: f32) -> __m512 {
    __m512([a; 16])
}

pub unsafe fn _mm512_loadu_ps(p: *const f32) -> __m512 {
    __m512(std::ptr::read_unaligned(p as *const [f32; 16]))
}

/// Only the lanes whose mask bit is set are read (no fault past them); the others are zero.
pub unsafe fn _mm512_maskz_loadu_ps(k: u16, p: *const f32) -> __m512 {
    __m512(std::array::from_fn(|i| {
        if k >> i & 1 == 1 {
            *p.add(i)
        } else {
            0.0
        }
    }))
}

/// Lane i of the result is lane `idx[i] & 15` of a.
pub unsafe fn _mm512_permutexvar_ps(idx: __m512i, a: __m512) -> __m512 {
    __m512(std::array::from_fn(|i| a.0[(idx.i32(i) & 15) as usize]))
}

/// Lane i is lane `idx[i] & 15` of a where mask bit i is set, zero elsewhere.
pub unsafe fn _mm512_maskz_permutexvar_epi32(k: u16, idx: __m512i, a: __m512i) -> __m512i {
    let mut r = __m512i([0; 64]);
    for i in (0..16).filter(|i| k >> i & 1 == 1) {
        r.set_i32(i, a.i32((idx.i32(i) & 15) as usize));
    }
    r
}

/// The 256 bits in the low half, zeros above.
pub unsafe fn _mm512_zextsi256_si512(a: __m256i) -> __m512i {
    let mut r = [0u8; 64];
    r[..32].copy_from_slice(&a.0);
    __m512i(r)
}

/// a with its 256-bit half number IMM8 (0 low, 1 high) replaced by b.
pub unsafe fn _mm512_inserti64x4<const IMM8: i32>(a: __m512i, b: __m256i) -> __m512i {
    let mut r = a;
    let at = 32 * (IMM8 as usize & 1);
    r.0[at..at + 32].copy_from_slice(&b.0);
    r
}

/// Sixteen f16 values (little-endian, in a 256-bit register) to f32.
pub unsafe fn _mm512_cvtph_ps(a: __m256i) -> __m512 {
    __m512(std::array::from_fn(|i| {
        half::f16::from_le_bytes([a.0[2 * i], a.0[2 * i + 1]]).to_f32()
    }))
}

/// Fused: a * b + c with one rounding.
pub unsafe fn _mm512_fmadd_ps(a: __m512, b: __m512, c: __m512) -> __m512 {
    __m512(std::array::from_fn(|i| a.0[i].mul_add(b.0[i], c.0[i])))
}

pub unsafe fn _mm512_mul_ps(a: __m512, b: __m512) -> __m512 {
    __m512(std::array::from_fn(|i| a.0[i] * b.0[i]))
}

pub unsafe fn _mm512_add_ps(a: __m512, b: __m512) -> __m512 {
    __m512(std::array::from_fn(|i| a.0[i] + b.0[i]))
}

pub unsafe fn _mm512_reduce_add_ps(a: __m512) -> f32 {
    // Any order is a valid emulation; use a tree like the hardware sequence.
    let mut v = a.0;
    let mut n = 16;
    while n > 1 {
        n /= 2;
        for i in 0..n {
            v[i] += v[i + n];
        }
    }
    v[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulated_intrinsics_follow_the_documented_semantics() {
        unsafe {
            let a = __m512i(std::array::from_fn(|i| (i * 37 + 200) as u8));
            let b = __m512i(std::array::from_fn(|i| (i * 11) as u8));
            let d = _mm512_dpbusd_epi32(_mm512_set1_epi32(5), a, b);
            let want0: i32 = 5
                + (0..4)
                    .map(|k| a.0[k] as i32 * b.0[k] as i8 as i32)
                    .sum::<i32>();
            assert_eq!(d.i32(0), want0);
            let mut counts = __m512i([0; 64]);
            counts.set_u16(0, 3);
            counts.set_u16(1, 16);
            let s = _mm512_srlv_epi16(a, counts);
            assert_eq!(s.u16(0), a.u16(0) >> 3);
            assert_eq!(s.u16(1), 0);
            assert_eq!(s.u16(2), a.u16(2));
            assert_eq!(_mm512_reduce_add_epi32(_mm512_set1_epi32(-3)), -48);
            let f = __m512(std::array::from_fn(|i| i as f32 * 2.0));
            let m = _mm512_maskz_loadu_ps(0b101, f.0.as_ptr());
            assert_eq!(&m.0[..4], &[0.0, 0.0, 4.0, 0.0]);
            let p = _mm512_permutexvar_ps(_mm512_set1_epi32(16 + 3), f);
            assert_eq!(p.0, [6.0; 16]);
            let half = __m256i([7; 32]);
            let z = _mm512_zextsi256_si512(half);
            assert_eq!((z.0[31], z.0[32]), (7, 0));
            let idx = __m512i(std::array::from_fn(|i| {
                if i % 4 == 0 {
                    (15 - i / 4) as u8
                } else {
                    0
                }
            }));
            let ints = __m512i(std::array::from_fn(|i| {
                if i % 4 == 0 {
                    (i / 4 * 3) as u8
                } else {
                    0
                }
            }));
            let pm = _mm512_maskz_permutexvar_epi32(0b10, idx, ints);
            assert_eq!((pm.i32(0), pm.i32(1), pm.i32(2)), (0, 14 * 3, 0));
            let hi = _mm512_inserti64x4::<1>(z, __m256i([9; 32]));
            assert_eq!((hi.0[0], hi.0[63]), (7, 9));
        }
    }
}
