//! Seeded random configs, weights and tables for tests and benchmarks of any backend, and
//! the inputs of a golden forward file. The error measures are in [`crate::metrics`].
//!
//! Values are drawn so that every code path is exercised with realistic magnitudes:
//! V4.1 weights and table rows are exact dequantized FP8 values, like a real checkpoint.

use safetensors::Dtype;

use crate::checkpoint::{Checkpoint, LayerWeights, PaperWeights, V41Weights};
use crate::config::{EngramConfig, Variant};
use crate::dtype::{e8m0_to_f32, f8e4m3_to_f32, round_bf16};
use crate::error::{EngramError, Result};

/// The inputs of sample `i` of a golden forward file (tests/data/GOLDEN.md): its token
/// ids, the hidden states fed to every Engram layer (`[1, t, hc_mult, hidden_size]`) and,
/// for V4.1, the dead-token mask.
#[derive(Clone, Debug)]
pub struct GoldenSample {
    pub ids: Vec<i64>,
    pub hidden: Vec<f32>,
    pub dead: Option<Vec<bool>>,
}

impl GoldenSample {
    /// Reads sample `i` of `ck`, checking every tensor's dtype and shape against `cfg`.
    pub fn read(ck: &Checkpoint, cfg: &EngramConfig, i: usize) -> Result<Self> {
        let name = |what: &str| format!("sample{i}.{what}");
        let t = ck
            .shape_of(&name("input_ids"))?
            .last()
            .copied()
            .unwrap_or(0);
        let ids = ck.i64_tensor(&name("input_ids"), &[1, t])?;
        // Token ids are u32 for a tokenizer (see `token_ids`): refuse any other here.
        if let Some((position, id)) = ids
            .iter()
            .enumerate()
            .find(|(_, &id)| u32::try_from(id).is_err())
        {
            return Err(EngramError::Tensor {
                path: ck.path().to_path_buf(),
                tensor: name("input_ids"),
                message: format!("token id {id} at position {position} is not a u32"),
            });
        }
        let hidden_shape = [1, t, cfg.hc_mult, cfg.hidden_size];
        let hidden = ck.f32_tensor(&name("hidden_states"), &hidden_shape)?;
        let dead = match cfg.variant {
            Variant::Paper => None,
            Variant::V41 => {
                let mask = ck.expect(&name("dead_mask"), &[Dtype::U8, Dtype::BOOL], &[1, t])?;
                Some(mask.data().iter().map(|&b| b != 0).collect())
            }
        };
        Ok(Self { ids, hidden, dead })
    }

    /// Tokens in the sample.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The ids as the tokenizer's `u32`s (`read` checked that they fit).
    pub fn token_ids(&self) -> Vec<u32> {
        self.ids.iter().map(|&i| i as u32).collect()
    }
}

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

/// Random paper or V4.1 weights for layer shapes of `cfg`.
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
            let scales: Vec<f32> = (0..rows.div_ceil(32) * e.div_ceil(32))
                .map(|_| e8m0_to_f32(120 + rng.below(4) as u8))
                .collect();
            let wkv = (0..rows * e)
                .map(|i| {
                    let s = scales[(i / e / 32) * e.div_ceil(32) + (i % e) / 32];
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

#[cfg(test)]
mod tests {
    use safetensors::tensor::TensorView;
    use serde_json::json;

    use super::*;

    fn paper_config() -> EngramConfig {
        EngramConfig::from_golden_meta(&json!({"engram": {"engram_vocab_size": [13, 17],
            "max_ngram_size": 3, "n_embed_per_ngram": 16, "n_head_per_ngram": 2,
            "layer_ids": [1], "pad_id": 2, "seed": 0, "kernel_size": 3},
            "backbone": {"hidden_size": 8, "hc_mult": 2}}))
        .unwrap()
    }

    /// A golden-like file holding `sample0` with these ids and `hidden_shape`.
    fn sample_file(ids: &[i64], hidden_shape: &[usize]) -> Vec<u8> {
        let id_bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
        let hidden: Vec<u8> = (0..hidden_shape.iter().product::<usize>())
            .flat_map(|k| (k as f32).to_le_bytes())
            .collect();
        let views = [
            (
                "sample0.input_ids",
                TensorView::new(Dtype::I64, vec![1, ids.len()], &id_bytes).unwrap(),
            ),
            (
                "sample0.hidden_states",
                TensorView::new(Dtype::F32, hidden_shape.to_vec(), &hidden).unwrap(),
            ),
        ];
        safetensors::serialize(views, None).unwrap()
    }

    #[test]
    fn reads_a_sample_and_refuses_bad_ones_by_name() {
        let cfg = paper_config();
        let good = sample_file(&[5, 0, 12], &[1, 3, 2, 8]);
        let ck = Checkpoint::parse("g.safetensors", &good).unwrap();
        let s = GoldenSample::read(&ck, &cfg, 0).unwrap();
        assert_eq!(s.token_ids(), [5, 0, 12]);
        assert_eq!(s.hidden.len(), 3 * 2 * 8);
        assert_eq!(s.hidden[47], 47.0);
        assert!(s.dead.is_none());

        for (ids, hidden_shape, names) in [
            (&[5, -1, 12][..], [1, 3, 2, 8], "input_ids"),
            (&[5, 1 << 40, 12][..], [1, 3, 2, 8], "input_ids"),
            (&[5, 0, 12][..], [1, 3, 2, 4], "hidden_states"),
        ] {
            let bytes = sample_file(ids, &hidden_shape);
            let ck = Checkpoint::parse("g.safetensors", &bytes).unwrap();
            let e = GoldenSample::read(&ck, &cfg, 0).unwrap_err().to_string();
            assert!(e.contains(&format!("sample0.{names}")), "{e}");
            assert!(e.contains("g.safetensors"), "{e}");
        }

        // V4.1 needs the dead-token mask.
        let mut v41 = cfg.clone();
        v41.variant = Variant::V41;
        let e = GoldenSample::read(&ck, &v41, 0).unwrap_err().to_string();
        assert!(e.contains("sample0.dead_mask"), "{e}");
    }
}
