//! The paper variant's layer math (docs/algorithm.md section 7): one GEMM for every
//! branch's key and the shared value, a fused per-token gate that writes `val` and its
//! normalized form `z`, then the depthwise dilated causal short conv with SiLU over `z`.

use engram_core::backend::{Segment, ShortConvState};
use engram_core::checkpoint::PaperWeights;
use engram_core::config::{
    EngramConfig, GATE_SCORE_CLAMP, PAPER_CONV_NORM_EPS, PAPER_GATE_NORM_EPS,
};
use engram_core::Result;
use rayon::prelude::*;

use super::matmul::Projection;
use super::scratch::{sized, Scratch};
use super::token_grain;

/// One paper-variant layer, weights rearranged for the CPU.
#[derive(Clone, Debug)]
pub(crate) struct PaperLayer {
    g: usize,
    d: usize,
    kernel: usize,
    dilation: usize,
    /// `[(G + 1) * D, E]`: the key weights of branches 0..G, then the value weight.
    proj: Projection,
    /// `[(G + 1) * D]`, in the same order as the projection rows.
    bias: Vec<f32>,
    /// `norm1[h] * norm2[h]`, `[G * D]`: the gate only uses their product. f64 so the
    /// product itself adds no rounding.
    gate_weight: Vec<f64>,
    /// `short_conv.norms`, `[G * D]`.
    conv_norm: Vec<f32>,
    /// The conv weight transposed to `[K, G * D]`, so each tap walks contiguous channels.
    conv_weight: Vec<f32>,
}

impl PaperLayer {
    pub(crate) fn new(cfg: &EngramConfig, w: &PaperWeights) -> Result<Self> {
        let (g, d, e, k) = (
            cfg.hc_mult,
            cfg.hidden_size,
            cfg.embed_dim(),
            cfg.kernel_size,
        );
        // Sizes checked by `LayerWeights::check` (CpuLayer::new).
        let c = g * d;

        let mut stacked = Vec::with_capacity((g + 1) * d * e);
        w.key_weight
            .iter()
            .for_each(|kw| stacked.extend_from_slice(kw));
        stacked.extend_from_slice(&w.value_weight);
        let mut bias: Vec<f32> = w.key_bias.concat();
        bias.extend_from_slice(&w.value_bias);
        let gate_weight = (0..g)
            .flat_map(|h| (0..d).map(move |i| (h, i)))
            .map(|(h, i)| w.norm1[h][i] as f64 * w.norm2[h][i] as f64)
            .collect();
        let mut conv_weight = vec![0f32; k * c];
        for ch in 0..c {
            for j in 0..k {
                conv_weight[j * c + ch] = w.conv_weight[ch * k + j];
            }
        }
        Ok(Self {
            g,
            d,
            kernel: k,
            dilation: cfg.conv_dilation(),
            proj: Projection::new(stacked, (g + 1) * d, e),
            bias,
            gate_weight,
            conv_norm: w.conv_norms.concat(),
            conv_weight,
        })
    }

    /// The whole forward of a batch (arguments already checked): `out` gets
    /// `val + SiLU(conv(z))` and every segment's conv state gets its new `z` rows.
    pub(crate) fn forward(
        &self,
        hidden: &[f32],
        embeddings: &[f32],
        segments: &mut [Segment<'_>],
        out: &mut [f32],
        s: &mut Scratch,
    ) {
        let tokens = out.len() / (self.g * self.d);
        let mut kv = std::mem::take(&mut s.kv);
        let projected = sized(&mut kv, tokens * self.proj.out_dim());
        self.proj.apply(embeddings, projected);
        self.forward_projected(hidden, projected, segments, out, s);
        s.kv = kv;
    }

    /// The rows' projection: keys of every branch, then the value, per token.
    pub(crate) fn projection(&self) -> &Projection {
        &self.proj
    }

    /// [`Self::forward`] from the rows' projection `kv` (`[tokens, (G + 1) * D]`).
    pub(crate) fn forward_projected(
        &self,
        hidden: &[f32],
        kv: &[f32],
        segments: &mut [Segment<'_>],
        out: &mut [f32],
        s: &mut Scratch,
    ) {
        let c = self.g * self.d;
        let tokens = out.len() / c;
        let z = sized(&mut s.z, tokens * c);
        self.gate_pass(kv, hidden, out, z);

        let token_segment = sized(&mut s.token_segment, tokens);
        let starts = sized(&mut s.segment_start, segments.len());
        let mut t0 = 0;
        for (i, seg) in segments.iter().enumerate() {
            starts[i] = t0;
            token_segment[t0..t0 + seg.len].fill(i as u32);
            t0 += seg.len;
        }
        let y = sized(&mut s.y, c);
        self.conv_pass(z, token_segment, starts, segments, out, y);

        for (seg, &start) in segments.iter_mut().zip(starts.iter()) {
            if let Some(state) = seg.conv.as_deref_mut() {
                state.push_rows(&z[start * c..(start + seg.len) * c]);
            }
        }
    }

    /// Gate and value for every token: `out = val`, `z = rms(val) * conv_norm`.
    fn gate_pass(&self, kv: &[f32], hidden: &[f32], out: &mut [f32], z: &mut [f32]) {
        let (c, n) = (self.g * self.d, self.proj.out_dim());
        let tokens = out.len() / c;
        match token_grain(tokens, 3 * c) {
            Some(grain) => out
                .par_chunks_mut(c)
                .zip(z.par_chunks_mut(c))
                .zip(kv.par_chunks(n))
                .zip(hidden.par_chunks(c))
                .with_min_len(grain)
                .for_each(|(((o, z), kv), x)| self.gate_token(kv, x, o, z)),
            None => out
                .chunks_mut(c)
                .zip(z.chunks_mut(c))
                .zip(kv.chunks(n))
                .zip(hidden.chunks(c))
                .for_each(|(((o, z), kv), x)| self.gate_token(kv, x, o, z)),
        }
    }

    /// One token: per branch, the gate from the normalized key and hidden state, then the
    /// gated value and its conv-normalized form. Sums are in f64 (O(D) per branch, cheap)
    /// so the gate adds no error of its own to the f32 projection's.
    fn gate_token(&self, kv: &[f32], x: &[f32], out: &mut [f32], z: &mut [f32]) {
        let (g, d) = (self.g, self.d);
        let df = d as f64;
        let (value, value_bias) = (&kv[g * d..], &self.bias[g * d..]);
        let ms_value = value
            .iter()
            .zip(value_bias)
            .map(|(&v, &b)| (v as f64 + b as f64).powi(2))
            .sum::<f64>()
            / df;
        let gate_eps = PAPER_GATE_NORM_EPS as f64;
        for h in 0..g {
            let r = h * d..(h + 1) * d;
            let (key, key_bias, xh, wh) = (
                &kv[r.clone()],
                &self.bias[r.clone()],
                &x[r.clone()],
                &self.gate_weight[r.clone()],
            );
            let (mut kk, mut xx, mut dot) = (0f64, 0f64, 0f64);
            for i in 0..d {
                let k = key[i] as f64 + key_bias[i] as f64;
                let xi = xh[i] as f64;
                kk += k * k;
                xx += xi * xi;
                dot += k * xi * wh[i];
            }
            let inv = 1.0 / (kk / df + gate_eps).sqrt() / (xx / df + gate_eps).sqrt();
            let score = dot * inv / df.sqrt();
            // torch.sign(0) = 0: a zero score stays zero.
            let score = if score == 0.0 {
                0.0
            } else {
                score.signum() * score.abs().max(GATE_SCORE_CLAMP).sqrt()
            };
            let a = sigmoid(score);
            let inv_z = 1.0 / (a * a * ms_value + PAPER_CONV_NORM_EPS as f64).sqrt();
            let (oh, zh, nh) = (&mut out[r.clone()], &mut z[r.clone()], &self.conv_norm[r]);
            for i in 0..d {
                let val = a * (value[i] as f64 + value_bias[i] as f64);
                oh[i] = val as f32;
                zh[i] = (val * inv_z * nh[i] as f64) as f32;
            }
        }
    }

    /// `out += SiLU(y)` with `y[t, c] = sum_j w[c, j] * z[t - (K-1-j) * dil, c]`, taking rows
    /// before a segment's start from its conv state (or zeros without one).
    fn conv_pass(
        &self,
        z: &[f32],
        token_segment: &[u32],
        starts: &[usize],
        segments: &[Segment<'_>],
        out: &mut [f32],
        y: &mut [f32],
    ) {
        let c = self.g * self.d;
        let tokens = out.len() / c;
        let run = |y: &mut [f32], (t, o): (usize, &mut [f32])| {
            let seg = token_segment[t] as usize;
            let state = segments[seg].conv.as_deref();
            self.conv_token(z, t, t - starts[seg], state, y, o);
        };
        match token_grain(tokens, self.kernel * c) {
            Some(grain) => out
                .par_chunks_mut(c)
                .enumerate()
                .with_min_len(grain)
                .for_each_init(|| vec![0f32; c], |y, item| run(y, item)),
            None => out.chunks_mut(c).enumerate().for_each(|item| run(y, item)),
        }
    }

    /// One token `t` at position `pos` of its segment.
    fn conv_token(
        &self,
        z: &[f32],
        t: usize,
        pos: usize,
        state: Option<&ShortConvState>,
        y: &mut [f32],
        out: &mut [f32],
    ) {
        let c = self.g * self.d;
        y.fill(0.0);
        for j in 0..self.kernel {
            let back = (self.kernel - 1 - j) * self.dilation;
            let row = if back <= pos {
                &z[(t - back) * c..(t - back + 1) * c]
            } else if let Some(state) = state {
                state.row_back(back - pos)
            } else {
                continue; // zero padding before the sequence's start
            };
            let w = &self.conv_weight[j * c..(j + 1) * c];
            for ((y, &w), &z) in y.iter_mut().zip(w).zip(row) {
                *y += w * z;
            }
        }
        for (o, &y) in out.iter_mut().zip(y.iter()) {
            *o += y / (1.0 + (-y).exp());
        }
    }
}

pub(crate) fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}
