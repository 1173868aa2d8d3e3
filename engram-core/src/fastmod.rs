//! Exact `x mod p` through an f64 reciprocal, in SIMD lane kernels (no division, no
//! 128-bit multiply).
//!
//! The n-gram hashes (docs/algorithm.md section 5) reduce a mix in `[0, 2^63)` modulo a
//! prime; every head of an order shares the mix and has its own prime. A 64-bit `%` (or a
//! 128-bit multiply-high) per head is scalar work, so instead, for a modulus `p` in
//! [`MIN_MODULUS`, `MAX_MODULUS`]:
//!
//! ```text
//! q = round(f64(x) * f64(1 / p))        // nearest integer (adding 2^52, or vcvtpd2uqq)
//! r = x - q * p                         // exact in wrapping u64 arithmetic
//! r = r < 0 ? r + p : r                 // one correction
//! ```
//!
//! **Why this is exact.** Each of the three roundings (x to f64, 1/p to f64, the product)
//! has relative error at most u = 2^-53, so `|q_f - x/p| <= (x/p) * 3.01u`. With
//! `x < 2^63` and `p >= 2^13`, `x/p < 2^50` and the error is below `2^50 * 3.01 * 2^-53 <
//! 0.38`. Rounding `q_f` to the nearest integer therefore gives `floor(x/p)` or
//! `floor(x/p) + 1`, so the true remainder minus `q * p` lies in `[-p, p)`: it fits in an
//! i64 (p <= 2^62), the wrapping u64 arithmetic computes it exactly, and a single `+ p`
//! when negative lands in `[0, p)`. Adding 2^52 rounds to an integer because
//! `q_f < 2^51`, where the f64 spacing of `[2^52, 2^53)` is exactly 1, and the integer is
//! then the low mantissa bits.
//!
//! The lane kernels ([`LaneKernel`]) reduce one `x` modulo [`LANES`] moduli (the heads of
//! one n-gram order share the mix): the moduli's constants are loaded once
//! ([`LaneKernel::prepare`]), `f64(x)` comes from the caller (one scalar conversion, or a
//! vectorized pass over many mixes), and the vector work is a multiply, a round to
//! integer, a 64-bit multiply-subtract and the correction:
//! - [`Portable`]: plain Rust (whatever the target vectorizes);
//! - [`Avx2`]: two 4-lane halves, `q * p` from two 32x32 products (`vpmuludq`), so moduli
//!   must be below 2^32;
//! - [`Avx512`]: one 8-lane register, `vcvtpd2uqq` and `vpmullq` (AVX-512F + DQ; needs
//!   Rust 1.89: older compilers build without it).
//!
//! All of them round the same product to nearest, so they return what [`rem`] returns
//! (and any of the two candidate quotients would give the same remainder anyway). Moduli
//! below 2^13 and negative x are left to the caller's scalar path. The exactness tests
//! below compare every kernel with `%` on edge values (0, p - 1, p, multiples of p and
//! their neighbours, 2^63 - 1, values around 2^32, 2^52 and 2^62, quotients next to
//! k + 1/2), random values of every magnitude, and proptest inputs, for moduli from 2^13
//! through the V4.1 primes and 2^40 - 87 up to 2^62.

/// Smallest modulus the f64 kernels are exact for (for every x in `[0, 2^63)`).
pub const MIN_MODULUS: u64 = 1 << 13;
/// Largest modulus the f64 kernels are exact for.
pub const MAX_MODULUS: u64 = 1 << 62;
/// Moduli of the AVX2 kernel must be below this (its `q * p` uses 32x32 products).
pub const AVX2_MODULUS_LIMIT: u64 = 1 << 32;
/// Moduli per kernel call: one AVX-512 register of u64, two AVX2 registers.
pub const LANES: usize = 8;

/// 2^52: adding it to a value in `[0, 2^51)` rounds that value to the nearest integer.
const ROUND: f64 = 4_503_599_627_370_496.0;
const ROUND_BITS: u64 = 0x4330_0000_0000_0000;

/// The instruction set a vectorized loop is compiled for (chosen once, at runtime).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// No target features: whatever the baseline target vectorizes.
    Portable,
    /// AVX2 (moduli below 2^32).
    Avx2,
    /// AVX-512F + DQ.
    Avx512,
}

impl Isa {
    /// The best instruction set of this CPU (that this build has kernels for).
    pub fn detect() -> Self {
        [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .find(|isa| isa.available())
            .unwrap_or(Isa::Portable)
    }

    /// Whether this CPU can run the kernels of `self`.
    pub fn available(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512dq")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The instruction set to use for a set of moduli, all in
    /// [`MIN_MODULUS`, `MAX_MODULUS`]: AVX2's kernel needs them below 2^32.
    pub fn for_moduli(self, moduli: &[u64]) -> Self {
        if self == Isa::Avx2 && moduli.iter().any(|&p| p >= AVX2_MODULUS_LIMIT) {
            Isa::Portable
        } else {
            self
        }
    }
}

/// Whether the f64 kernels are exact for modulus `p`.
pub fn supported(p: u64) -> bool {
    (MIN_MODULUS..=MAX_MODULUS).contains(&p)
}

/// f64 reciprocal of a modulus (the constant the kernels take with it).
pub fn reciprocal(p: u64) -> f64 {
    1.0 / p as f64
}

/// `x mod p` for `x < 2^63` and `p` in [`MIN_MODULUS`, `MAX_MODULUS`], `inv = reciprocal(p)`.
#[inline(always)]
pub fn rem(x: u64, p: u64, inv: f64) -> u64 {
    rem_with(x, x as i64 as f64, p, inv)
}

/// [`rem`] with `x_f = x as i64 as f64` given.
#[inline(always)]
fn rem_with(x: u64, x_f: f64, p: u64, inv: f64) -> u64 {
    let q = (x_f * inv + ROUND).to_bits().wrapping_sub(ROUND_BITS);
    // x - q * p lies in [-p, p): one correction.
    let r = x.wrapping_sub(q.wrapping_mul(p));
    if (r as i64) < 0 {
        r.wrapping_add(p)
    } else {
        r
    }
}

/// `out[l] = x % p[l] + add[l]` (wrapping) for [`LANES`] moduli at once.
///
/// Inputs: `x < 2^63`, `x_f = x as i64 as f64`, every `p[l]` [`supported`] (and below
/// 2^32 for [`Avx2`]), `inv[l] = reciprocal(p[l])`.
pub trait LaneKernel {
    /// The moduli, reciprocals and addends, loaded for the kernel.
    type Prepared: Copy;

    /// Whether [`LaneKernel::stream_copy`] bypasses the cache (else it is a plain copy).
    const STREAMS: bool = false;

    /// Loads the constants of a group of moduli.
    ///
    /// # Safety
    /// The CPU must have the kernel's instruction set ([`Isa::available`]); for speed,
    /// call it inside a function compiled for that instruction set.
    unsafe fn prepare(p: &[u64; LANES], inv: &[f64; LANES], add: &[u64; LANES]) -> Self::Prepared;

    /// `out[l] = x % p[l] + add[l]`.
    ///
    /// # Safety
    /// As for [`LaneKernel::prepare`].
    unsafe fn rem(c: &Self::Prepared, x: u64, x_f: f64, out: &mut [u64; LANES]);

    /// `dst.copy_from_slice(src)`, with non-temporal (cache-bypassing) stores where the
    /// instruction set has them; call [`LaneKernel::stream_fence`] after the last copy.
    ///
    /// # Safety
    /// As for [`LaneKernel::prepare`].
    #[inline(always)]
    unsafe fn stream_copy(src: &[u64], dst: &mut [u64]) {
        dst.copy_from_slice(src);
    }

    /// Orders the non-temporal stores of [`LaneKernel::stream_copy`] before later stores.
    ///
    /// # Safety
    /// As for [`LaneKernel::prepare`].
    #[inline(always)]
    unsafe fn stream_fence() {}
}

/// The plain-Rust kernel.
pub struct Portable;

impl LaneKernel for Portable {
    type Prepared = ([u64; LANES], [f64; LANES], [u64; LANES]);

    #[inline(always)]
    unsafe fn prepare(p: &[u64; LANES], inv: &[f64; LANES], add: &[u64; LANES]) -> Self::Prepared {
        (*p, *inv, *add)
    }

    #[inline(always)]
    unsafe fn rem(c: &Self::Prepared, x: u64, x_f: f64, out: &mut [u64; LANES]) {
        for (l, o) in out.iter_mut().enumerate() {
            *o = rem_with(x, x_f, c.0[l], c.1[l]).wrapping_add(c.2[l]);
        }
    }
}

/// The AVX2 kernel (moduli below 2^32).
pub struct Avx2;

/// The AVX-512F + DQ kernel.
pub struct Avx512;

/// `out[l] = x % p[l] + add[l]` with the kernel of `isa`; false (nothing computed) when the
/// ISA is not available, a modulus is outside its range, or `x >= 2^63`.
pub fn rem_lanes(
    isa: Isa,
    x: u64,
    p: &[u64; LANES],
    inv: &[f64; LANES],
    add: &[u64; LANES],
    out: &mut [u64; LANES],
) -> bool {
    if x >> 63 != 0
        || !isa.available()
        || !p.iter().all(|&m| supported(m))
        || isa.for_moduli(p) != isa
    {
        return false;
    }
    // SAFETY: `isa.available()` checked the CPU features of the kernel.
    unsafe {
        match isa {
            Isa::Portable => one_group::<Portable>(x, p, inv, add, out),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => x86::one_group_avx512(x, p, inv, add, out),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::one_group_avx2(x, p, inv, add, out),
            #[cfg(not(target_arch = "x86_64"))]
            _ => return false,
        }
    }
    true
}

#[inline(always)]
unsafe fn one_group<K: LaneKernel>(
    x: u64,
    p: &[u64; LANES],
    inv: &[f64; LANES],
    add: &[u64; LANES],
    out: &mut [u64; LANES],
) {
    K::rem(&K::prepare(p, inv, add), x, x as i64 as f64, out)
}

/// The x86 kernels. They must run only where [`Isa::available`] says so.
#[cfg(target_arch = "x86_64")]
pub mod x86 {
    use super::{one_group, Avx2, LaneKernel, LANES, ROUND, ROUND_BITS};
    use std::arch::x86_64::*;

    impl LaneKernel for super::Avx512 {
        type Prepared = (__m512i, __m512d, __m512i);
        const STREAMS: bool = true;

        #[inline(always)]
        unsafe fn prepare(
            p: &[u64; LANES],
            inv: &[f64; LANES],
            add: &[u64; LANES],
        ) -> Self::Prepared {
            (
                _mm512_loadu_epi64(p.as_ptr().cast()),
                _mm512_loadu_pd(inv.as_ptr()),
                _mm512_loadu_epi64(add.as_ptr().cast()),
            )
        }

        #[inline(always)]
        unsafe fn rem(c: &Self::Prepared, x: u64, x_f: f64, out: &mut [u64; LANES]) {
            let &(p, inv, add) = c;
            let q_f = _mm512_mul_pd(_mm512_set1_pd(x_f), inv);
            let q =
                _mm512_cvt_roundpd_epu64::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(q_f);
            let r = _mm512_sub_epi64(_mm512_set1_epi64(x as i64), _mm512_mullo_epi64(q, p));
            // r in [-p, p): as u64, min(r, r + p) picks r + p exactly when r < 0.
            let r = _mm512_min_epu64(r, _mm512_add_epi64(r, p));
            let r = _mm512_add_epi64(r, add);
            _mm512_storeu_epi64(out.as_mut_ptr().cast(), r);
        }

        /// Plain stores up to the first 64-byte-aligned element of `dst`, then one
        /// non-temporal store per 64 bytes, then plain stores for the tail.
        #[inline(always)]
        unsafe fn stream_copy(src: &[u64], dst: &mut [u64]) {
            assert_eq!(src.len(), dst.len(), "stream_copy: lengths differ");
            let head = dst.as_ptr().align_offset(64).min(dst.len());
            let body = (dst.len() - head) / LANES * LANES;
            dst[..head].copy_from_slice(&src[..head]);
            for i in (head..head + body).step_by(LANES) {
                let v = _mm512_loadu_epi64(src[i..i + LANES].as_ptr().cast());
                _mm512_stream_si512(dst[i..i + LANES].as_mut_ptr().cast(), v);
            }
            dst[head + body..].copy_from_slice(&src[head + body..]);
        }

        #[inline(always)]
        unsafe fn stream_fence() {
            _mm_sfence();
        }
    }

    /// One group with the AVX-512 kernel.
    ///
    /// # Safety
    /// The CPU must support AVX-512F and AVX-512DQ.
    #[target_feature(enable = "avx512f,avx512dq")]
    pub unsafe fn one_group_avx512(
        x: u64,
        p: &[u64; LANES],
        inv: &[f64; LANES],
        add: &[u64; LANES],
        out: &mut [u64; LANES],
    ) {
        one_group::<super::Avx512>(x, p, inv, add, out)
    }

    impl LaneKernel for Avx2 {
        type Prepared = ([__m256i; 2], [__m256d; 2], [__m256i; 2]);

        #[inline(always)]
        unsafe fn prepare(
            p: &[u64; LANES],
            inv: &[f64; LANES],
            add: &[u64; LANES],
        ) -> Self::Prepared {
            let int = |a: &[u64; LANES], h: usize| _mm256_loadu_si256(a[4 * h..].as_ptr().cast());
            (
                [int(p, 0), int(p, 1)],
                [
                    _mm256_loadu_pd(inv.as_ptr()),
                    _mm256_loadu_pd(inv[4..].as_ptr()),
                ],
                [int(add, 0), int(add, 1)],
            )
        }

        #[inline(always)]
        unsafe fn rem(c: &Self::Prepared, x: u64, x_f: f64, out: &mut [u64; LANES]) {
            let x_f = _mm256_set1_pd(x_f);
            let x = _mm256_set1_epi64x(x as i64);
            for h in 0..2 {
                let (p, inv, add) = (c.0[h], c.1[h], c.2[h]);
                let q = _mm256_add_pd(_mm256_mul_pd(x_f, inv), _mm256_set1_pd(ROUND));
                let q = _mm256_sub_epi64(
                    _mm256_castpd_si256(q),
                    _mm256_set1_epi64x(ROUND_BITS as i64),
                );
                // q < 2^51 and p < 2^32: q * p mod 2^64 = lo32(q) * p + (hi(q) * p) << 32.
                let q_hi_p = _mm256_mul_epu32(_mm256_srli_epi64::<32>(q), p);
                let qp = _mm256_add_epi64(_mm256_mul_epu32(q, p), _mm256_slli_epi64::<32>(q_hi_p));
                let r = _mm256_sub_epi64(x, qp);
                let negative = _mm256_cmpgt_epi64(_mm256_setzero_si256(), r);
                let r = _mm256_add_epi64(r, _mm256_and_si256(negative, p));
                let r = _mm256_add_epi64(r, add);
                _mm256_storeu_si256(out[4 * h..].as_mut_ptr().cast(), r);
            }
        }
    }

    /// One group with the AVX2 kernel.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub unsafe fn one_group_avx2(
        x: u64,
        p: &[u64; LANES],
        inv: &[f64; LANES],
        add: &[u64; LANES],
        out: &mut [u64; LANES],
    ) {
        one_group::<Avx2>(x, p, inv, add, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ISAS: [Isa; 3] = [Isa::Portable, Isa::Avx2, Isa::Avx512];

    /// Moduli of many sizes: the smallest supported, primes around 2^16, the V4.1 primes
    /// around 16,000,000, 2^32 boundaries, the largest primes below 2^40 and beyond.
    fn moduli() -> Vec<u64> {
        let mut m = vec![
            MIN_MODULUS,
            MIN_MODULUS + 1,
            8_209, // smallest prime above 2^13
            65_521,
            65_537,
            99_091,
            1_000_003,
            16_000_057,
            16_000_069,
            16_777_213,
            16_777_259,
            (1 << 25) - 39,
            (1 << 31) - 1,
            (1 << 32) - 5, // largest prime below 2^32
            (1 << 32) + 15,
            (1 << 40) - 87, // largest prime below 2^40
            (1 << 40) + 15,
            (1 << 52) - 47,
            (1 << 61) - 1,
            MAX_MODULUS,
        ];
        let mut rng = crate::testing::TestRng::new(0);
        for bits in 14..=62 {
            m.push((1u64 << (bits - 1)) | (rng.next_u64() >> (65 - bits)));
        }
        m
    }

    /// Edge values of x for modulus p: 0, p-1, p, multiples and their neighbours, the top
    /// of the range, and values around 2^32 and 2^52 boundaries.
    fn edge_values(p: u64) -> Vec<u64> {
        let top = (1u64 << 63) - 1;
        let mut xs = vec![0, 1, p - 1, p, p + 1, 2 * p - 1, 2 * p, top, top - 1];
        for base in [1u64 << 32, 1 << 52, 1 << 53, 1 << 62, top / p * p] {
            for d in 0..3u64 {
                xs.extend([
                    base - d,
                    base + d,
                    base / p * p + d,
                    (base / p * p).wrapping_sub(d),
                ]);
            }
        }
        for k in [2u64, 3, 1 << 20, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40] {
            if let Some(m) = p.checked_mul(k) {
                xs.extend([m - 1, m, m + 1]);
            }
        }
        xs.retain(|&x| x < 1 << 63);
        xs
    }

    /// `rem`, and every available lane kernel with `p` in lanes next to other moduli
    /// (V4.1 primes, the smallest and the largest supported), against `%`.
    fn check(xs: &[u64], p: u64) {
        let inv = reciprocal(p);
        let mut lanes_p = [p; LANES];
        for (l, other) in [16_000_057, MIN_MODULUS, (1 << 32) - 5, MAX_MODULUS]
            .into_iter()
            .enumerate()
        {
            lanes_p[2 * l + 1] = other;
        }
        let lanes_inv = lanes_p.map(reciprocal);
        let add: [u64; LANES] = std::array::from_fn(|l| [0, 1, 1 << 40, u64::MAX / 2][l % 4]);
        let isas = ISAS
            .into_iter()
            .filter(|isa| isa.available())
            .collect::<Vec<_>>();
        for &x in xs {
            assert_eq!(rem(x, p, inv), x % p, "rem({x}, {p})");
            let expected: [u64; LANES] = std::array::from_fn(|l| x % lanes_p[l] + add[l]);
            let avx2_p = lanes_p
                .map(|m| m % AVX2_MODULUS_LIMIT.max(1))
                .map(|m| m.max(MIN_MODULUS));
            for &isa in &isas {
                let mut out = [u64::MAX; LANES];
                if isa == Isa::Avx2 {
                    // Moduli below 2^32 only: p itself when it is, else its low bits.
                    let inv = avx2_p.map(reciprocal);
                    assert!(rem_lanes(isa, x, &avx2_p, &inv, &add, &mut out));
                    let want: [u64; LANES] = std::array::from_fn(|l| x % avx2_p[l] + add[l]);
                    assert_eq!(out, want, "{isa:?}, x = {x}, p = {avx2_p:?}");
                } else {
                    assert!(rem_lanes(isa, x, &lanes_p, &lanes_inv, &add, &mut out));
                    assert_eq!(out, expected, "{isa:?}, x = {x}, p = {lanes_p:?}");
                }
            }
        }
    }

    #[test]
    fn edge_values_match_the_remainder_operator() {
        for p in moduli() {
            check(&edge_values(p), p);
        }
    }

    #[test]
    fn random_values_match_the_remainder_operator() {
        let mut rng = crate::testing::TestRng::new(42);
        for p in moduli() {
            let xs: Vec<u64> = (0..4099)
                // Mix full-range values with values of every magnitude.
                .map(|i| (rng.next_u64() >> 1) >> (i % 63))
                .collect();
            check(&xs, p);
        }
    }

    #[test]
    fn quotients_near_half_integers_and_exact_multiples() {
        // x/p just below, at and just above k + 1/2 and k, for large k (where the f64
        // quotient has the least slack).
        for p in moduli() {
            let mut xs = Vec::new();
            let top_k = ((1u64 << 63) - 1) / p;
            for k in [top_k, top_k - 1, top_k / 2 + 1, top_k / 3, 1 << 20] {
                let Some(m) = k.checked_mul(p) else { continue };
                for d in [0, 1, 2, p / 2 - 1, p / 2, p / 2 + 1, p - 2, p - 1] {
                    if let Some(x) = m.checked_add(d) {
                        xs.push(x);
                    }
                    xs.push(m.wrapping_sub(d));
                }
            }
            xs.retain(|&x| x < 1 << 63);
            check(&xs, p);
        }
    }

    #[test]
    fn unsupported_inputs_are_refused() {
        let (p, inv, add) = (
            [16_000_057; LANES],
            [reciprocal(16_000_057); LANES],
            [0; LANES],
        );
        let mut out = [0u64; LANES];
        assert!(!supported(MIN_MODULUS - 1));
        assert!(!supported(MAX_MODULUS + 1));
        assert!(!rem_lanes(Isa::Portable, 1 << 63, &p, &inv, &add, &mut out));
        assert!(!rem_lanes(
            Isa::Portable,
            5,
            &[3; LANES],
            &[1.0 / 3.0; LANES],
            &add,
            &mut out
        ));
        let big = [1 << 40; LANES];
        assert_eq!(Isa::Avx2.for_moduli(&big), Isa::Portable);
        assert!(!rem_lanes(
            Isa::Avx2,
            5,
            &big,
            &big.map(reciprocal),
            &add,
            &mut out
        ));
        assert!(rem_lanes(
            Isa::Portable,
            16_000_058,
            &p,
            &inv,
            &add,
            &mut out
        ));
        assert_eq!(out, [1; LANES]);
    }

    #[test]
    fn detection_picks_an_available_isa() {
        assert!(Isa::detect().available());
    }

    proptest! {
        #[test]
        fn any_value_and_modulus(x in 0u64..1 << 63, p in MIN_MODULUS..=MAX_MODULUS) {
            prop_assert_eq!(rem(x, p, reciprocal(p)), x % p);
        }

        #[test]
        fn any_value_and_lanes(
            x in 0u64..1 << 63,
            p in proptest::array::uniform8(MIN_MODULUS..AVX2_MODULUS_LIMIT),
        ) {
            let inv = p.map(reciprocal);
            let add = [7; LANES];
            for isa in ISAS.into_iter().filter(|isa| isa.available()) {
                let mut out = [0; LANES];
                prop_assert!(rem_lanes(isa, x, &p, &inv, &add, &mut out));
                for l in 0..LANES {
                    prop_assert_eq!(out[l], x % p[l] + 7, "{:?}", isa);
                }
            }
        }
    }
}
