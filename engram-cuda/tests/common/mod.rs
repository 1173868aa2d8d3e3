//! Test data and comparisons shared by the GPU tests and the emulated-kernel tests.
#![allow(dead_code)]

use engram_core::checkpoint::{PaperWeights, V41Weights};
use engram_core::config::{EngramConfig, HashConfig, Variant};
use engram_core::dtype::{round_bf16, RowDtype};
use engram_core::table::TableStore;
use engram_cuda::HostTable;

/// xorshift64*: reproducible test data without a dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [-1, 1).
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32() * scale).collect()
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// An FP8 E4M3 byte that is not NaN.
    pub fn e4m3(&mut self) -> u8 {
        let b = self.next_u64() as u8;
        if b & 0x7f == 0x7f {
            b ^ 1
        } else {
            b
        }
    }
}

// Each test binary uses some of these.
#[allow(unused_imports)]
pub use engram_core::metrics::{bf16_distance, bf16_distance_over, relative_error as rel_err};

pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

pub fn config(
    variant: Variant,
    g: usize,
    d: usize,
    head_dim: usize,
    heads: usize,
    max_n: usize,
) -> EngramConfig {
    let cfg = EngramConfig {
        variant,
        hash: HashConfig {
            engram_vocab_size: vec![1009; max_n - 1],
            max_ngram_size: max_n,
            n_head_per_ngram: heads,
            layer_ids: vec![1],
            pad_id: 2,
            seed: 0,
            compressed_vocab_size: None,
        },
        head_dim,
        kernel_size: if variant == Variant::Paper { 4 } else { 0 },
        hidden_size: d,
        hc_mult: g,
        rms_norm_eps: 1e-20,
    };
    cfg.validate().unwrap();
    cfg
}

pub fn paper_weights(cfg: &EngramConfig, rng: &mut Rng) -> PaperWeights {
    let (g, d, e) = (cfg.hc_mult, cfg.hidden_size, cfg.embed_dim());
    let ws = 1.0 / (e as f32).sqrt();
    let per = |rng: &mut Rng, n: usize, s: f32, o: f32| -> Vec<Vec<f32>> {
        (0..g)
            .map(|_| rng.vec(n, s).into_iter().map(|x| x + o).collect())
            .collect()
    };
    PaperWeights {
        key_weight: per(rng, d * e, ws, 0.0),
        key_bias: per(rng, d, 0.1, 0.0),
        value_weight: rng.vec(d * e, ws),
        value_bias: rng.vec(d, 0.1),
        norm1: per(rng, d, 0.5, 1.0),
        norm2: per(rng, d, 0.5, 1.0),
        conv_weight: rng.vec(g * d * cfg.kernel_size, 0.5),
        conv_norms: per(rng, d, 0.5, 1.0),
    }
}

pub fn v41_weights(cfg: &EngramConfig, rng: &mut Rng) -> V41Weights {
    let (g, d, e) = (cfg.hc_mult, cfg.hidden_size, cfg.embed_dim());
    let ws = 1.0 / (e as f32).sqrt();
    V41Weights {
        wkv: rng.vec((g + 1) * d * e, ws),
        q_weight: rng.vec(g * d, 1.0).into_iter().map(round_bf16).collect(),
        k_weight: rng.vec(g * d, 1.0).into_iter().map(round_bf16).collect(),
    }
}

/// A host table of `rows` random rows in `dtype`.
pub fn random_table(dtype: RowDtype, rows: u64, width: usize, rng: &mut Rng) -> HostTable {
    HostTable::build("random", dtype, rows, width, |v, s| match dtype {
        RowDtype::F32 => {
            for c in v.chunks_exact_mut(4) {
                c.copy_from_slice(&rng.f32().to_le_bytes());
            }
        }
        RowDtype::BF16 => {
            for c in v.chunks_exact_mut(2) {
                c.copy_from_slice(&half::bf16::from_f32(rng.f32()).to_le_bytes());
            }
        }
        RowDtype::F16 => {
            for c in v.chunks_exact_mut(2) {
                c.copy_from_slice(&half::f16::from_f32(rng.f32() * 100.0).to_le_bytes());
            }
        }
        RowDtype::F8E4M3Scaled => {
            v.iter_mut().for_each(|b| *b = rng.e4m3());
            s.iter_mut().for_each(|b| *b = 118 + rng.below(16) as u8);
        }
    })
    .unwrap()
}

/// The CPU's answer for a gather (the core's exact conversions).
pub fn cpu_gather(t: &HostTable, ids: &[u64]) -> Vec<f32> {
    let mut out = vec![0f32; ids.len() * t.width()];
    t.gather_f32(ids, &mut out).unwrap();
    out
}
