//! The test kit (feature `testing`): one seeded RNG and the random configs, weights,
//! hidden states and tables every backend's tests and the benchmarks draw from, and the
//! conformance suite ([`conformance`]) each backend runs. The error measures are in
//! [`crate::metrics`], a golden file's inputs in [`crate::golden`].
//!
//! Values are drawn so that every code path is exercised with realistic magnitudes:
//! V4.1 weights and table rows are exact dequantized FP8 values, like a real checkpoint.

pub mod conformance;

use crate::checkpoint::{LayerWeights, PaperWeights, V41Weights};
use crate::config::{EngramConfig, Variant};
use crate::dtype::{e8m0_to_f32, f8e4m3_to_f32, round_bf16, FP8_SCALE_BLOCK};

/// SplitMix64: tiny, seeded, good enough for test data.
#[derive(Clone, Debug)]
pub struct TestRng(u64);

impl TestRng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Moves on as `n` calls of [`Self::next_u64`] would, in constant time (SplitMix64's
    /// state only adds its constant per call), so a generator can start mid-stream.
    pub fn skip(&mut self, n: u64) {
        self.0 = self.0.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    }
    /// Uniform in `[0, n)`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// Uniform in `[-1, 1)`.
    pub fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.unit() * scale).collect()
    }
    /// Uniform in `[lo, hi)`.
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32)
    }
    pub fn uniform_vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
    /// One of `xs`, uniformly.
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
    /// A random finite FP8 E4M3 byte (never NaN).
    pub fn f8_byte(&mut self) -> u8 {
        let b = self.next_u64() as u8;
        if b & 0x7f == 0x7f {
            b & 0xfe
        } else {
            b
        }
    }
}

/// Random paper or V4.1 weights for layer shapes of `cfg`: what `engram init-checkpoint`
/// writes into a seeded checkpoint (the end-to-end checks' greedy-id snapshot depends on
/// these exact values, so they stay as they are). The conformance suite draws its own,
/// closer to a trained layer ([`conformance::layer_weights`]).
pub fn random_weights(cfg: &EngramConfig, rng: &mut TestRng) -> LayerWeights {
    let (g, d, e) = (cfg.hc_mult, cfg.hidden_size, cfg.embed_dim());
    let proj_scale = 1.0 / (e as f32).sqrt();
    match cfg.variant {
        Variant::Paper => LayerWeights::Paper(PaperWeights {
            key_weight: (0..g).map(|_| rng.vec(d * e, proj_scale)).collect(),
            key_bias: (0..g).map(|_| rng.vec(d, 0.1)).collect(),
            value_weight: rng.vec(d * e, proj_scale),
            value_bias: rng.vec(d, 0.1),
            norm1: (0..g).map(|_| rng.vec(d, 1.0)).collect(),
            norm2: (0..g).map(|_| rng.vec(d, 1.0)).collect(),
            conv_weight: rng.vec(g * d * cfg.kernel_size, 0.5),
            conv_norms: (0..g).map(|_| rng.vec(d, 1.0)).collect(),
        }),
        Variant::V41 => {
            let rows = (g + 1) * d;
            let scales: Vec<f32> = (0..rows.div_ceil(FP8_SCALE_BLOCK)
                * e.div_ceil(FP8_SCALE_BLOCK))
                .map(|_| e8m0_to_f32(120 + rng.below(4) as u8))
                .collect();
            let wkv = (0..rows * e)
                .map(|i| {
                    let s = scales[(i / e / FP8_SCALE_BLOCK) * e.div_ceil(FP8_SCALE_BLOCK)
                        + (i % e) / FP8_SCALE_BLOCK];
                    f8e4m3_to_f32(rng.f8_byte()) * s
                })
                .collect();
            LayerWeights::V41(V41Weights {
                wkv,
                q_weight: rng.vec(g * d, 1.0).into_iter().map(round_bf16).collect(),
                k_weight: rng.vec(g * d, 1.0).into_iter().map(round_bf16).collect(),
            })
        }
    }
}

/// Random hidden states, rounded to bf16 for V4.1 (its activations are bf16).
pub fn random_hidden(cfg: &EngramConfig, tokens: usize, rng: &mut TestRng) -> Vec<f32> {
    let h = rng.vec(tokens * cfg.branch_channels(), 2.0);
    match cfg.variant {
        Variant::Paper => h,
        Variant::V41 => h.into_iter().map(round_bf16).collect(),
    }
}

/// Random table rows as f32 (V4.1: exact dequantized FP8 values, as its tables hold).
pub fn random_table_f32(cfg: &EngramConfig, rows: usize, rng: &mut TestRng) -> Vec<f32> {
    let n = rows * cfg.head_dim;
    match cfg.variant {
        Variant::Paper => rng.vec(n, 1.0),
        Variant::V41 => (0..n)
            .map(|_| {
                round_bf16(f8e4m3_to_f32(rng.f8_byte()) * e8m0_to_f32(124 + rng.below(6) as u8))
            })
            .collect(),
    }
}
