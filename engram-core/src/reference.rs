//! The reference forward of both layer variants: plain loops, f64 accumulation, written to
//! read like docs/algorithm.md sections 7 and 8. Slow on purpose; backends are checked
//! against it.

use crate::backend::{check_forward_args, EngramLayer, Segment};
use crate::checkpoint::{LayerWeights, PaperWeights, V41Weights};
use crate::config::{EngramConfig, GATE_SCORE_CLAMP, PAPER_CONV_NORM_EPS, PAPER_GATE_NORM_EPS};
use crate::dtype::round_bf16;
use crate::error::Result;

/// One Engram layer computed by the reference math.
#[derive(Clone, Debug)]
pub struct ReferenceLayer {
    cfg: EngramConfig,
    layer_id: usize,
    weights: LayerWeights,
}

impl ReferenceLayer {
    pub fn new(cfg: EngramConfig, layer_id: usize, weights: LayerWeights) -> Result<Self> {
        cfg.layer_index(layer_id)?;
        weights.check(&cfg)?;
        Ok(Self {
            cfg,
            layer_id,
            weights,
        })
    }

    pub fn weights(&self) -> &LayerWeights {
        &self.weights
    }
}

impl EngramLayer for ReferenceLayer {
    fn config(&self) -> &EngramConfig {
        &self.cfg
    }
    fn layer_id(&self) -> usize {
        self.layer_id
    }
    fn forward(
        &self,
        hidden: &[f32],
        embeddings: &[f32],
        dead: Option<&[bool]>,
        segments: &mut [Segment<'_>],
        out: &mut [f32],
    ) -> Result<()> {
        check_forward_args(
            &self.cfg,
            hidden.len(),
            embeddings.len(),
            dead,
            segments,
            out.len(),
        )?;
        let (c, e) = (self.cfg.branch_channels(), self.cfg.embed_dim());
        let mut start = 0;
        for seg in segments.iter_mut() {
            let range = start..start + seg.len;
            let h = &hidden[range.start * c..range.end * c];
            let emb = &embeddings[range.start * e..range.end * e];
            let o = &mut out[range.start * c..range.end * c];
            match &self.weights {
                LayerWeights::Paper(w) => paper_segment(&self.cfg, w, h, emb, seg, o),
                LayerWeights::V41(w) => {
                    v41_segment(&self.cfg, w, h, emb, dead.map(|d| &d[range.clone()]), o)
                }
            }
            start = range.end;
        }
        Ok(())
    }
}

/// `y = W x + b` for row-major `W [rows, x.len()]`, in f64.
fn linear(w: &[f32], b: Option<&[f32]>, x: &[f32]) -> Vec<f64> {
    w.chunks_exact(x.len())
        .enumerate()
        .map(|(r, row)| {
            let dot: f64 = row.iter().zip(x).map(|(&a, &v)| a as f64 * v as f64).sum();
            dot + b.map_or(0.0, |b| b[r] as f64)
        })
        .collect()
}

fn rms_normed(x: &[f64], w: &[f32], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let inv = 1.0 / (ms + eps).sqrt();
    x.iter()
        .zip(w)
        .map(|(v, &wi)| v * inv * wi as f64)
        .collect()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn paper_segment(
    cfg: &EngramConfig,
    w: &PaperWeights,
    hidden: &[f32],
    emb: &[f32],
    seg: &mut Segment<'_>,
    out: &mut [f32],
) {
    let (g, d, e) = (cfg.hc_mult, cfg.hidden_size, cfg.embed_dim());
    let c = g * d;
    let n = seg.len;
    // val[t][h*D + d] and its normalized form z.
    let mut val = vec![0f64; n * c];
    let mut z = vec![0f64; n * c];
    for t in 0..n {
        let x = &emb[t * e..(t + 1) * e];
        let v = linear(&w.value_weight, Some(&w.value_bias), x);
        for h in 0..g {
            let k = linear(&w.key_weight[h], Some(&w.key_bias[h]), x);
            let hs: Vec<f64> = hidden[t * c + h * d..t * c + (h + 1) * d]
                .iter()
                .map(|&v| v as f64)
                .collect();
            let kn = rms_normed(&k, &w.norm1[h], PAPER_GATE_NORM_EPS as f64);
            let qn = rms_normed(&hs, &w.norm2[h], PAPER_GATE_NORM_EPS as f64);
            let s = kn.iter().zip(&qn).map(|(a, b)| a * b).sum::<f64>() / (d as f64).sqrt();
            // torch.sign(0) = 0, so a zero score stays zero.
            let s = if s == 0.0 {
                0.0
            } else {
                s.signum() * s.abs().max(GATE_SCORE_CLAMP).sqrt()
            };
            let a = sigmoid(s);
            let vh: Vec<f64> = v.iter().map(|&x| a * x).collect();
            let zh = rms_normed(&vh, &w.conv_norms[h], PAPER_CONV_NORM_EPS as f64);
            val[t * c + h * d..t * c + (h + 1) * d].copy_from_slice(&vh);
            z[t * c + h * d..t * c + (h + 1) * d].copy_from_slice(&zh);
        }
    }
    let (k, dil) = (cfg.kernel_size, cfg.conv_dilation());
    for t in 0..n {
        for ch in 0..c {
            let mut y = 0f64;
            for j in 0..k {
                let back = (k - 1 - j) * dil;
                let zv = if back <= t {
                    z[(t - back) * c + ch]
                } else {
                    // Before this segment: the sequence's remembered rows, or zero padding.
                    seg.conv
                        .as_ref()
                        .map_or(0.0, |s| s.row_back(back - t)[ch] as f64)
                };
                y += w.conv_weight[ch * k + j] as f64 * zv;
            }
            let silu = y * sigmoid(y);
            out[t * c + ch] = (val[t * c + ch] + silu) as f32;
        }
    }
    if let Some(state) = seg.conv.as_deref_mut() {
        let z32: Vec<f32> = z.iter().map(|&v| v as f32).collect();
        state.push_rows(&z32);
    }
}

fn v41_segment(
    cfg: &EngramConfig,
    w: &V41Weights,
    hidden: &[f32],
    emb: &[f32],
    dead: Option<&[bool]>,
    out: &mut [f32],
) {
    let (g, d, e) = (cfg.hc_mult, cfg.hidden_size, cfg.embed_dim());
    let c = g * d;
    let eps = cfg.rms_norm_eps;
    for t in 0..hidden.len() / c {
        let x_all = &hidden[t * c..(t + 1) * c];
        if dead.is_some_and(|m| m[t]) {
            out[t * c..(t + 1) * c].copy_from_slice(x_all);
            continue;
        }
        // kv is accumulated in high precision and rounded to bf16 (the checkpoint's activation dtype).
        let kv: Vec<f64> = linear(&w.wkv, None, &emb[t * e..(t + 1) * e])
            .into_iter()
            .map(|v| round_bf16(v as f32) as f64)
            .collect();
        let value = &kv[g * d..];
        for h in 0..g {
            let x = &x_all[h * d..(h + 1) * d];
            let key = &kv[h * d..(h + 1) * d];
            let ms_x = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
            let ms_k = key.iter().map(|v| v * v).sum::<f64>() / d as f64;
            let rstd = 1.0 / (ms_x + eps).sqrt() / (ms_k + eps).sqrt();
            let dot: f64 = (0..d)
                .map(|i| {
                    let wi = (w.q_weight[h * d + i] * w.k_weight[h * d + i]) as f64;
                    x[i] as f64 * wi * key[i]
                })
                .sum::<f64>()
                * rstd
                / (d as f64).sqrt();
            let gate = sigmoid(dot.abs().max(GATE_SCORE_CLAMP).sqrt().copysign(dot));
            for i in 0..d {
                out[t * c + h * d + i] = round_bf16((x[i] as f64 + gate * value[i]) as f32);
            }
        }
    }
}
