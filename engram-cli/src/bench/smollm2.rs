//! One SmolLM2-135M decoder layer (Llama: RMSNorm, grouped-query attention with rotary
//! embeddings, SwiGLU MLP) in candle on the CPU, f32, seeded random weights: the work a
//! host does before the first Engram layer of the demo checkpoint (Engram at layers 1 and
//! 15, so one decoder layer, layer 0, comes first), sized as the real model is. Weights'
//! values do not change the time; shapes do.
//!
//! Decode-shaped: every sequence brings one new token and attends over a cache of
//! `context` earlier positions. The cache is not grown between forwards, so every
//! forward costs the same; the new token's key and value are computed (their
//! projections are part of the cost) but not appended.

use anyhow::Result;
use candle_core::{Device, Tensor, D};
use engram_core::testing::TestRng;

/// SmolLM2-135M's shapes (its `config.json`: hidden_size 576, intermediate_size 1536,
/// num_attention_heads 9, num_key_value_heads 3, head_dim 64, rms_norm_eps 1e-5,
/// rope_theta 100000, num_hidden_layers 30).
pub const HIDDEN: usize = 576;
pub const INTERMEDIATE: usize = 1536;
pub const HEADS: usize = 9;
pub const KV_HEADS: usize = 3;
pub const HEAD_DIM: usize = 64;
const RMS_EPS: f64 = 1e-5;
const ROPE_THETA: f64 = 100_000.0;

/// The layer's weights and the attention cache of `batch` sequences.
pub struct DecoderLayer {
    batch: usize,
    norm_attn: Tensor,
    norm_mlp: Tensor,
    /// Projections stored `[in, out]`, so `x.matmul(w)`.
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    w_down: Tensor,
    /// Cached keys, transposed: `[batch, KV_HEADS, HEAD_DIM, context]`.
    keys_t: Tensor,
    /// Cached values: `[batch, KV_HEADS, context, HEAD_DIM]`.
    values: Tensor,
    /// Rotary cos and sin at the new token's position: `[1, 1, HEAD_DIM / 2]`.
    cos: Tensor,
    sin: Tensor,
}

fn random(rng: &mut TestRng, dims: &[usize], scale: f32) -> Result<Tensor> {
    let n = dims.iter().product();
    Ok(Tensor::from_vec(rng.vec(n, scale), dims, &Device::Cpu)?)
}

impl DecoderLayer {
    pub fn new(batch: usize, context: usize, seed: u64) -> Result<Self> {
        let mut rng = TestRng::new(seed);
        let w = 0.05;
        let half = HEAD_DIM / 2;
        let angles: Vec<f32> = (0..half)
            .map(|i| context as f64 / ROPE_THETA.powf(2.0 * i as f64 / HEAD_DIM as f64))
            .map(|a| a as f32)
            .collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        Ok(Self {
            batch,
            norm_attn: random(&mut rng, &[HIDDEN], 1.0)?,
            norm_mlp: random(&mut rng, &[HIDDEN], 1.0)?,
            wq: random(&mut rng, &[HIDDEN, HEADS * HEAD_DIM], w)?,
            wk: random(&mut rng, &[HIDDEN, KV_HEADS * HEAD_DIM], w)?,
            wv: random(&mut rng, &[HIDDEN, KV_HEADS * HEAD_DIM], w)?,
            wo: random(&mut rng, &[HEADS * HEAD_DIM, HIDDEN], w)?,
            w_gate: random(&mut rng, &[HIDDEN, INTERMEDIATE], w)?,
            w_up: random(&mut rng, &[HIDDEN, INTERMEDIATE], w)?,
            w_down: random(&mut rng, &[INTERMEDIATE, HIDDEN], w)?,
            keys_t: random(&mut rng, &[batch, KV_HEADS, HEAD_DIM, context], 1.0)?,
            values: random(&mut rng, &[batch, KV_HEADS, context, HEAD_DIM], 1.0)?,
            cos: Tensor::from_vec(cos, (1, 1, half), &Device::Cpu)?,
            sin: Tensor::from_vec(sin, (1, 1, half), &Device::Cpu)?,
        })
    }

    /// A hidden-state input `[batch, HIDDEN]`.
    pub fn input(&self, seed: u64) -> Result<Tensor> {
        random(&mut TestRng::new(seed), &[self.batch, HIDDEN], 1.0)
    }

    fn rms_norm(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let inv = x
            .sqr()?
            .mean_keepdim(D::Minus1)?
            .affine(1.0, RMS_EPS)?
            .sqrt()?
            .recip()?;
        Ok(x.broadcast_mul(&inv)?.broadcast_mul(weight)?)
    }

    /// Rotates `[batch, heads, HEAD_DIM]` by the new position's angles (halves rotated,
    /// as Llama's `rotate_half`).
    fn rope(&self, x: &Tensor) -> Result<Tensor> {
        let half = HEAD_DIM / 2;
        let (x1, x2) = (
            x.narrow(D::Minus1, 0, half)?,
            x.narrow(D::Minus1, half, half)?,
        );
        let first = (x1.broadcast_mul(&self.cos)? - x2.broadcast_mul(&self.sin)?)?;
        let second = (x2.broadcast_mul(&self.cos)? + x1.broadcast_mul(&self.sin)?)?;
        Ok(Tensor::cat(&[first, second], D::Minus1)?)
    }

    /// One forward of the layer on `x` (`[batch, HIDDEN]`, one token per sequence).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let b = self.batch;
        let h = Self::rms_norm(x, &self.norm_attn)?;
        let q = self.rope(&h.matmul(&self.wq)?.reshape((b, HEADS, HEAD_DIM))?)?;
        let k = self.rope(&h.matmul(&self.wk)?.reshape((b, KV_HEADS, HEAD_DIM))?)?;
        let v = h.matmul(&self.wv)?;
        // Grouped queries: the HEADS / KV_HEADS query heads of each key-value head in one
        // matrix, so the cache is read once per key-value head (no repeated copy).
        let q = q.reshape((b, KV_HEADS, HEADS / KV_HEADS, HEAD_DIM))?;
        let scores = (q.matmul(&self.keys_t)? / (HEAD_DIM as f64).sqrt())?;
        let max = scores.max_keepdim(D::Minus1)?;
        let e = scores.broadcast_sub(&max)?.exp()?;
        let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        let attn = p.matmul(&self.values)?.reshape((b, HEADS * HEAD_DIM))?;
        let x = (x + attn.matmul(&self.wo)?)?;
        let h = Self::rms_norm(&x, &self.norm_mlp)?;
        let mlp = (h.matmul(&self.w_gate)?.silu()? * h.matmul(&self.w_up)?)?;
        let out = (x + mlp.matmul(&self.w_down)?)?;
        // The new key and value are the cache's next entry; keep them computed.
        std::hint::black_box((k, v));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layer's shapes fit together (a wrong reshape or matmul is an error here) and
    /// the output has its input's shape, finite and changed by the layer.
    #[test]
    fn forward_keeps_shape_and_is_finite() {
        let layer = DecoderLayer::new(3, 5, 1).unwrap();
        let x = layer.input(2).unwrap();
        let y = layer.forward(&x).unwrap();
        assert_eq!(y.dims(), &[3, HIDDEN]);
        let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.is_finite()));
        assert_ne!(v, x.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
}
