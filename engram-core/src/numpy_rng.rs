//! Bit-exact reproduction of the part of `numpy.random` that Engram's hash
//! multipliers depend on.
//!
//! The reference implementation derives each layer's multipliers with
//!
//! ```text
//! half_bound = max(1, (i64::MAX // compressed_vocab_size) // 2)
//! rng        = numpy.random.default_rng(seed + 10007 * layer_id)
//! r          = rng.integers(0, half_bound, size=max_ngram_size, dtype=int64)
//! mult[k]    = 2 * r[k] + 1
//! ```
//!
//! so matching its tables requires the same chain numpy runs:
//! [`SeedSequence`] (O'Neill's `seed_seq` variant, pool size 4) feeds
//! [`Pcg64`] (128-bit LCG, XSL-RR output), and `Generator.integers` turns raw
//! draws into bounded integers with Lemire's rejection method (32-bit
//! buffered draws when the range fits in 32 bits, 64-bit draws otherwise).
//! Everything here follows numpy >= 1.18.4 on a platform with native 128-bit
//! integers (every 64-bit Linux/macOS build).

/// Pool size numpy uses by default (128 bits of mixed entropy).
const POOL_SIZE: usize = 4;
const INIT_A: u32 = 0x43b0_d7e5;
const MULT_A: u32 = 0x931e_8875;
const INIT_B: u32 = 0x8b51_f9dd;
const MULT_B: u32 = 0x58f3_8ded;
const MIX_MULT_L: u32 = 0xca01_f9dd;
const MIX_MULT_R: u32 = 0x4973_f715;
const XSHIFT: u32 = 16;

/// numpy's `SeedSequence` for an integer entropy, no spawn key, pool size 4.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedSequence {
    pool: [u32; POOL_SIZE],
}

/// One step of the hash whose multiplier evolves with every call.
fn hashmix(value: u32, hash_const: &mut u32) -> u32 {
    let mut v = value ^ *hash_const;
    *hash_const = hash_const.wrapping_mul(MULT_A);
    v = v.wrapping_mul(*hash_const);
    v ^ (v >> XSHIFT)
}

fn mix(x: u32, y: u32) -> u32 {
    let r = MIX_MULT_L
        .wrapping_mul(x)
        .wrapping_sub(MIX_MULT_R.wrapping_mul(y));
    r ^ (r >> XSHIFT)
}

/// A Python int as numpy's `_int_to_uint32_array` splits it: little-endian
/// 32-bit words, no trailing zero words, and `[0]` for zero.
fn entropy_words(entropy: u128) -> Vec<u32> {
    if entropy == 0 {
        return vec![0];
    }
    let mut words = Vec::with_capacity(4);
    let mut n = entropy;
    while n > 0 {
        words.push(n as u32);
        n >>= 32;
    }
    words
}

impl SeedSequence {
    /// `numpy.random.SeedSequence(entropy)` for a non-negative integer.
    pub fn new(entropy: u128) -> Self {
        Self::from_words(&entropy_words(entropy))
    }

    /// Mixes an already-split entropy array into the pool (`mix_entropy`).
    fn from_words(entropy: &[u32]) -> Self {
        let mut pool = [0u32; POOL_SIZE];
        let mut hash_const = INIT_A;
        for (i, slot) in pool.iter_mut().enumerate() {
            // Missing words hash as zero, so the pool is always fully seeded.
            let word = entropy.get(i).copied().unwrap_or(0);
            *slot = hashmix(word, &mut hash_const);
        }
        // Every word influences every other, so late bits reach early ones.
        for src in 0..POOL_SIZE {
            for dst in 0..POOL_SIZE {
                if src != dst {
                    let h = hashmix(pool[src], &mut hash_const);
                    pool[dst] = mix(pool[dst], h);
                }
            }
        }
        // Entropy beyond the pool size is folded into every pool word.
        for &word in entropy.iter().skip(POOL_SIZE) {
            for slot in pool.iter_mut() {
                let h = hashmix(word, &mut hash_const);
                *slot = mix(*slot, h);
            }
        }
        Self { pool }
    }

    /// `generate_state(n, dtype=np.uint32)`.
    pub fn generate_state_u32(&self, n: usize) -> Vec<u32> {
        let mut hash_const = INIT_B;
        self.pool
            .iter()
            .cycle()
            .take(n)
            .map(|&word| {
                let mut v = word ^ hash_const;
                hash_const = hash_const.wrapping_mul(MULT_B);
                v = v.wrapping_mul(hash_const);
                v ^ (v >> XSHIFT)
            })
            .collect()
    }

    /// `generate_state(n, dtype=np.uint64)`: twice as many 32-bit words,
    /// paired little-endian (even word low, odd word high).
    pub fn generate_state_u64(&self, n: usize) -> Vec<u64> {
        self.generate_state_u32(2 * n)
            .chunks_exact(2)
            .map(|p| u64::from(p[0]) | (u64::from(p[1]) << 32))
            .collect()
    }
}

/// PCG-64's default 128-bit LCG multiplier.
const PCG_MULT: u128 = 0x2360_ED05_1FC6_5DA4_4385_DF64_9FCC_F645;

/// numpy's `PCG64` bit generator, including its 32-bit draw buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pcg64 {
    state: u128,
    inc: u128,
    /// High half of the last 64-bit draw, pending for the next `next_u32`.
    pending_u32: Option<u32>,
}

impl Pcg64 {
    /// `pcg64_srandom_r(initstate, initseq)`: the raw PCG seeding routine.
    pub fn from_srandom(initstate: u128, initseq: u128) -> Self {
        let mut rng = Self {
            state: 0,
            inc: (initseq << 1) | 1,
            pending_u32: None,
        };
        rng.step();
        rng.state = rng.state.wrapping_add(initstate);
        rng.step();
        rng
    }

    /// `PCG64(seed_seq)`: four 64-bit state words, read as (high, low) pairs
    /// for the initial state and the stream selector.
    pub fn from_seed_sequence(ss: &SeedSequence) -> Self {
        let w = ss.generate_state_u64(4);
        let initstate = (u128::from(w[0]) << 64) | u128::from(w[1]);
        let initseq = (u128::from(w[2]) << 64) | u128::from(w[3]);
        Self::from_srandom(initstate, initseq)
    }

    /// The bit generator behind `numpy.random.default_rng(seed)`.
    pub fn default_rng(seed: u128) -> Self {
        Self::from_seed_sequence(&SeedSequence::new(seed))
    }

    fn step(&mut self) {
        self.state = self.state.wrapping_mul(PCG_MULT).wrapping_add(self.inc);
    }

    /// One raw 64-bit draw (advance, then XSL-RR output of the new state).
    pub fn next_u64(&mut self) -> u64 {
        self.step();
        let hi = (self.state >> 64) as u64;
        let lo = self.state as u64;
        (hi ^ lo).rotate_right((self.state >> 122) as u32)
    }

    /// numpy's buffered 32-bit draw: a 64-bit draw yields its low half now
    /// and its high half on the next call.
    pub fn next_u32(&mut self) -> u32 {
        if let Some(v) = self.pending_u32.take() {
            return v;
        }
        let x = self.next_u64();
        self.pending_u32 = Some((x >> 32) as u32);
        x as u32
    }

    /// Lemire's method on 32-bit draws, for inclusive range `rng < u32::MAX`.
    fn bounded_lemire_u32(&mut self, rng: u32) -> u32 {
        let excl = rng + 1;
        let mut m = u64::from(self.next_u32()) * u64::from(excl);
        let mut leftover = m as u32;
        if leftover < excl {
            let threshold = (u32::MAX - rng) % excl;
            while leftover < threshold {
                m = u64::from(self.next_u32()) * u64::from(excl);
                leftover = m as u32;
            }
        }
        (m >> 32) as u32
    }

    /// Lemire's method on 64-bit draws, for inclusive range `rng < u64::MAX`.
    fn bounded_lemire_u64(&mut self, rng: u64) -> u64 {
        let excl = rng + 1;
        let mut m = u128::from(self.next_u64()) * u128::from(excl);
        let mut leftover = m as u64;
        if leftover < excl {
            let threshold = (u64::MAX - rng) % excl;
            while leftover < threshold {
                m = u128::from(self.next_u64()) * u128::from(excl);
                leftover = m as u64;
            }
        }
        (m >> 64) as u64
    }

    /// `random_bounded_uint64_fill`: `cnt` values in `off ..= off + rng`
    /// (wrapping), with numpy's choice of draw width per range.
    fn bounded_u64_fill(&mut self, off: u64, rng: u64, cnt: usize) -> Vec<u64> {
        (0..cnt)
            .map(|_| {
                let r = if rng == 0 {
                    0
                } else if rng < u64::from(u32::MAX) {
                    u64::from(self.bounded_lemire_u32(rng as u32))
                } else if rng == u64::from(u32::MAX) {
                    // Lemire-32 cannot take rng = 2^32-1; numpy >= 1.18.4
                    // uses a plain buffered 32-bit draw instead.
                    u64::from(self.next_u32())
                } else if rng == u64::MAX {
                    self.next_u64()
                } else {
                    self.bounded_lemire_u64(rng)
                };
                off.wrapping_add(r)
            })
            .collect()
    }

    /// `Generator.integers(low, high, size, dtype=np.int64)` (high exclusive).
    ///
    /// # Panics
    /// If `low >= high`, where numpy raises `ValueError`.
    pub fn integers_i64(&mut self, low: i64, high: i64, size: usize) -> Vec<i64> {
        assert!(
            low < high,
            "integers_i64: low ({low}) must be < high ({high})"
        );
        // Inclusive span high-1-low fits in u64 for any i64 pair.
        let rng = (high as i128 - 1 - low as i128) as u64;
        self.bounded_u64_fill(low as u64, rng, size)
            .into_iter()
            .map(|v| v as i64)
            .collect()
    }
}

/// `max(1, (i64::MAX // compressed_vocab_size) // 2)`; a size of 0 is treated
/// as 1 so this never divides by zero.
pub fn half_bound(compressed_vocab_size: u64) -> i64 {
    let v = compressed_vocab_size.max(1);
    let q = (i64::MAX as u64 / v / 2) as i64;
    q.max(1)
}

/// Engram's hash multipliers for one layer (docs/algorithm.md section 3): odd numbers
/// `2 * r + 1` with `r` drawn by `default_rng(seed + 10007 * layer_id)`.
pub fn layer_multipliers(
    compressed_vocab_size: u64,
    seed: u64,
    layer_id: u64,
    max_ngram_size: usize,
) -> Vec<i64> {
    // Python ints do not overflow; u128 holds u64 + 10007 * u64 exactly.
    let entropy = u128::from(seed) + 10007 * u128::from(layer_id);
    let hb = half_bound(compressed_vocab_size);
    Pcg64::default_rng(entropy)
        .integers_i64(0, hb, max_ngram_size)
        // r < half_bound <= i64::MAX / 2, so 2r + 1 cannot overflow.
        .into_iter()
        .map(|r| 2 * r + 1)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words_to_u128(w: [u32; 4]) -> u128 {
        w.iter()
            .rev()
            .fold(0u128, |acc, &x| (acc << 32) | u128::from(x))
    }

    /// numpy/random/tests/test_seed_sequence.py::test_reference_data
    /// (itself checked against O'Neill's C++ reference).
    #[test]
    fn seed_sequence_reference_data() {
        let cases: [([u32; 4], [u32; 4], [u64; 2]); 4] = [
            (
                [3735928559, 195939070, 229505742, 305419896],
                [3914649087, 576849849, 3593928901, 2229911004],
                [2477551240072187391, 9577394838764454085],
            ),
            (
                [3668361503, 4165561550, 1661411377, 3634257570],
                [2240804226, 3691353228, 1365957195, 2654016646],
                [15854241394484835714, 11398914698975566411],
            ),
            (
                [1240956131, 3107113773, 1283198141, 1924506131],
                [959045797, 3875435559, 1886309314, 359682705],
                [16644868984619524261, 1544825456798124994],
            ),
            (
                [2766103236, 2883057919, 4029656435, 862374500],
                [296367413, 4262059219, 13109864, 3283683422],
                [18305404959516669237, 14103312907920476776],
            ),
        ];
        for (input, out32, out64) in cases {
            // Top words are non-zero, so the int form splits into the same 4 words.
            let ss = SeedSequence::new(words_to_u128(input));
            assert_eq!(ss.generate_state_u32(4), out32.to_vec());
            assert_eq!(ss.generate_state_u64(2), out64.to_vec());
            // The words-based path agrees with the int path.
            assert_eq!(SeedSequence::from_words(&input), ss);
        }
    }

    #[test]
    fn entropy_split_matches_python() {
        assert_eq!(entropy_words(0), vec![0]);
        assert_eq!(entropy_words(12345), vec![12345]);
        assert_eq!(entropy_words(1 << 32), vec![0, 1]);
        // Zero words up to the pool size hash like missing words.
        assert_eq!(
            SeedSequence::from_words(&[7, 0, 0, 0]),
            SeedSequence::new(7)
        );
    }

    /// numpy/random/tests/data/pcg64-testset-1.csv, produced by
    /// pcg64-test-data-gen.c with `pcg64_srandom_r(0xDEADBEAF, 0)`.
    #[test]
    fn pcg64_raw_testset() {
        let mut rng = Pcg64::from_srandom(0xdead_beaf, 0);
        let expected: [u64; 6] = [
            0xb174ddf3fe597da6,
            0xfc217240c1e61e6f,
            0x20279da26fec9cbf,
            0xa5f4ee34651f4e1e,
            0xb254d7901c68b9db,
            0x6bf2a64e4052c36f,
        ];
        for e in expected {
            assert_eq!(rng.next_u64(), e);
        }
    }

    fn next_double(rng: &mut Pcg64) -> f64 {
        (rng.next_u64() >> 11) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// Documented numpy outputs: `default_rng(658).random()` and
    /// `default_rng(658).integers(0, 10, size=5)` (32-bit buffered path).
    #[test]
    fn default_rng_658_documented() {
        let mut rng = Pcg64::default_rng(658);
        assert_eq!(next_double(&mut rng), 0.13691146845619506);
        let mut rng = Pcg64::default_rng(658);
        assert_eq!(rng.integers_i64(0, 10, 5), vec![4, 1, 6, 0, 0]);
    }

    /// Widely quoted numpy outputs for `default_rng(42)`: `random(5)` and,
    /// on a fresh generator, `integers(0, 10, size=3)`.
    #[test]
    fn default_rng_42_documented() {
        let mut rng = Pcg64::default_rng(42);
        let expected = [0.77395605, 0.43887844, 0.85859792, 0.69736803, 0.09417735];
        for e in expected {
            assert!((next_double(&mut rng) - e).abs() < 5e-9);
        }
        let mut rng = Pcg64::default_rng(42);
        assert_eq!(rng.integers_i64(0, 10, 3), vec![0, 7, 6]);
    }

    #[test]
    fn next_u32_is_low_then_high() {
        let mut a = Pcg64::default_rng(1);
        let mut b = a.clone();
        let x = a.next_u64();
        assert_eq!(b.next_u32(), x as u32);
        assert_eq!(b.next_u32(), (x >> 32) as u32);
    }

    #[test]
    fn integers_edge_ranges() {
        let mut rng = Pcg64::default_rng(3);
        // Single-value range consumes no draws.
        let before = rng.clone();
        assert_eq!(rng.integers_i64(5, 6, 4), vec![5; 4]);
        assert_eq!(rng, before);
        // Full i64 range is a plain 64-bit draw reinterpreted.
        let mut r2 = rng.clone();
        let full = rng.integers_i64(i64::MIN, i64::MAX, 1);
        let raw = r2.bounded_u64_fill(i64::MIN as u64, u64::MAX - 1, 1);
        assert_eq!(full[0], raw[0] as i64);
        // Range of exactly 2^32 values uses plain buffered 32-bit draws.
        let mut r3 = rng.clone();
        let v = rng.integers_i64(0, 1 << 32, 2);
        assert_eq!(v, vec![i64::from(r3.next_u32()), i64::from(r3.next_u32())]);
        // Bounds are respected for ranges on both sides of 2^32.
        for high in [3i64, (1 << 32) - 1, (1 << 32) + 1, 1 << 40, i64::MAX] {
            for x in rng.integers_i64(-2, high, 50) {
                assert!((-2..high).contains(&x));
            }
        }
    }

    #[test]
    fn half_bound_values() {
        assert_eq!(half_bound(99092), 46539438283891);
        assert_eq!(half_bound(0), half_bound(1));
        assert_eq!(half_bound(1), i64::MAX / 2);
        assert_eq!(half_bound(u64::MAX), 1);
    }

    #[test]
    fn multipliers_are_odd_and_bounded() {
        for layer in 0..4 {
            let m = layer_multipliers(u64::MAX, u64::MAX, layer, 3);
            assert_eq!(m, vec![1, 1, 1]);
            let m = layer_multipliers(1000, 0, layer, 5);
            let hb = half_bound(1000);
            assert!(m.iter().all(|&x| x % 2 == 1 && x > 0 && x < 2 * hb));
        }
    }
}
