//! The DeepSeek-V4.1 layer math (docs/algorithm.md section 8): one GEMM with the
//! dequantized fused `wkv`, kv rounded to bf16, then per token and branch the gate and the
//! bf16-rounded update `x + g * value`. Dead tokens pass through unchanged.

use engram_core::checkpoint::V41Weights;
use engram_core::config::{EngramConfig, GATE_SCORE_CLAMP};
use engram_core::dtype::round_bf16;
use engram_core::Result;
use rayon::prelude::*;

use super::matmul::Projection;
use super::paper::sigmoid;
use super::scratch::{sized, Scratch};
use super::token_grain;

/// One V4.1 layer, weights as the CPU uses them.
#[derive(Clone, Debug)]
pub(crate) struct V41Layer {
    g: usize,
    d: usize,
    eps: f64,
    /// Dequantized `wkv`, `[(G + 1) * D, E]`: the G keys, then the value.
    proj: Projection,
    /// `q_weight * k_weight` rounded to f32, `[G * D]`, exactly as the reference forms it.
    gate_weight: Vec<f32>,
}

impl V41Layer {
    pub(crate) fn new(cfg: &EngramConfig, w: V41Weights) -> Result<Self> {
        let (g, d, e) = (cfg.hc_mult, cfg.hidden_size, cfg.embed_dim());
        // Sizes checked by `LayerWeights::check` (CpuLayer::new).
        Ok(Self {
            g,
            d,
            eps: cfg.rms_norm_eps,
            gate_weight: w
                .q_weight
                .iter()
                .zip(&w.k_weight)
                .map(|(q, k)| q * k)
                .collect(),
            proj: Projection::new(w.wkv, (g + 1) * d, e),
        })
    }

    /// The whole forward of a batch (arguments already checked).
    pub(crate) fn forward(
        &self,
        hidden: &[f32],
        embeddings: &[f32],
        dead: Option<&[bool]>,
        out: &mut [f32],
        s: &mut Scratch,
    ) {
        let tokens = out.len() / (self.g * self.d);
        let kv = sized(&mut s.kv, tokens * self.proj.out_dim());
        self.proj.apply(embeddings, kv);
        self.forward_projected(hidden, kv, dead, out);
    }

    /// The rows' projection (`wkv`), per token.
    pub(crate) fn projection(&self) -> &Projection {
        &self.proj
    }

    /// [`Self::forward`] from the rows' projection `kv` (`[tokens, (G + 1) * D]`; the
    /// per-token math rounds it in place).
    pub(crate) fn forward_projected(
        &self,
        hidden: &[f32],
        kv: &mut [f32],
        dead: Option<&[bool]>,
        out: &mut [f32],
    ) {
        let (c, n) = (self.g * self.d, self.proj.out_dim());
        let tokens = out.len() / c;
        // Dead tokens (image spans) pass through with gate 0.
        let token = |t: usize, o: &mut [f32], kv: &mut [f32], x: &[f32]| {
            if dead.is_some_and(|m| m[t]) {
                o.copy_from_slice(x);
            } else {
                self.token(kv, x, o);
            }
        };
        match token_grain(tokens, 2 * n) {
            Some(grain) => out
                .par_chunks_mut(c)
                .zip(kv.par_chunks_mut(n))
                .zip(hidden.par_chunks(c))
                .enumerate()
                .with_min_len(grain)
                .for_each(|(t, ((o, kv), x))| token(t, o, kv, x)),
            None => out
                .chunks_mut(c)
                .zip(kv.chunks_mut(n))
                .zip(hidden.chunks(c))
                .enumerate()
                .for_each(|(t, ((o, kv), x))| token(t, o, kv, x)),
        }
    }

    /// One live token. The sums are f64 in the reference's order, so the only difference
    /// from the reference is the f32 GEMM's summation order before the bf16 rounding of kv.
    fn token(&self, kv: &mut [f32], x: &[f32], out: &mut [f32]) {
        let (g, d) = (self.g, self.d);
        let df = d as f64;
        // The checkpoint's activations are bf16: kv is rounded once, before any use.
        kv.iter_mut().for_each(|v| *v = round_bf16(*v));
        let value = &kv[g * d..];
        for h in 0..g {
            let r = h * d..(h + 1) * d;
            let (key, xh, wh) = (&kv[r.clone()], &x[r.clone()], &self.gate_weight[r.clone()]);
            let (mut xx, mut kk, mut dot) = (0f64, 0f64, 0f64);
            for i in 0..d {
                let (xi, ki) = (xh[i] as f64, key[i] as f64);
                xx += xi * xi;
                kk += ki * ki;
                dot += xi * wh[i] as f64 * ki;
            }
            let rstd = 1.0 / (xx / df + self.eps).sqrt() / (kk / df + self.eps).sqrt();
            let dot = dot * rstd / df.sqrt();
            let gate = sigmoid(dot.abs().max(GATE_SCORE_CLAMP).sqrt().copysign(dot));
            for ((o, &xi), &v) in out[r].iter_mut().zip(xh).zip(value) {
                *o = round_bf16((xi as f64 + gate * v as f64) as f32);
            }
        }
    }
}
