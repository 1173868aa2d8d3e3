//! One paper-variant Engram layer (docs/algorithm.md section 7, one branch: hc_mult 1)
//! written on candle-core's ops, so that autograd gives the gradients of its weights and
//! of the table rows a batch reads. The table itself is not a candle variable: a batch's
//! distinct rows are copied into a small `[rows, head_dim]` tensor (the only table
//! gradient candle ever makes), and [`SparseTable`] applies the update to those rows.

use std::collections::BTreeMap;

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor, Var, D};
use engram_core::config::{
    EngramConfig, GATE_SCORE_CLAMP, PAPER_CONV_NORM_EPS, PAPER_GATE_NORM_EPS,
};
use engram_core::testing::TestRng;

use super::llama::{linear, rms_norm};

/// Names (under `layers.{L}.engram.`) and shapes of a layer's dense weights.
pub fn dense_shapes(cfg: &EngramConfig) -> Vec<(&'static str, Vec<usize>)> {
    let (d, e, k) = (cfg.hidden_size, cfg.embed_dim(), cfg.kernel_size);
    vec![
        ("key_projs.0.weight", vec![d, e]),
        ("key_projs.0.bias", vec![d]),
        ("value_proj.weight", vec![d, e]),
        ("value_proj.bias", vec![d]),
        ("norm1.0.weight", vec![d]),
        ("norm2.0.weight", vec![d]),
        ("short_conv.conv.weight", vec![d, 1, k]),
        ("short_conv.norms.0.weight", vec![d]),
    ]
}

/// A layer's dense weights at the start of a fit. The value projection and the conv
/// weight are zero, so the layer adds exactly zero (step 0 is the host model); keys are
/// PyTorch's Linear default (uniform in +-1/sqrt(E)), norms one.
pub fn initial_dense(cfg: &EngramConfig, rng: &mut TestRng) -> BTreeMap<String, Vec<f32>> {
    let bound = 1.0 / (cfg.embed_dim() as f32).sqrt();
    dense_shapes(cfg)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let values = match name {
                "key_projs.0.weight" | "key_projs.0.bias" => rng.vec(n, bound),
                "value_proj.weight" | "value_proj.bias" | "short_conv.conv.weight" => {
                    vec![0.0; n]
                }
                _ => vec![1.0; n],
            };
            (name.to_string(), values)
        })
        .collect()
}

/// The dense weights as tensors: candle variables while fitting, plain tensors to evaluate.
pub struct DenseWeights {
    pub vars: BTreeMap<String, Var>,
}

impl DenseWeights {
    pub fn new(cfg: &EngramConfig, values: &BTreeMap<String, Vec<f32>>) -> Result<Self> {
        let mut vars = BTreeMap::new();
        for (name, shape) in dense_shapes(cfg) {
            let v = values
                .get(name)
                .ok_or_else(|| anyhow::anyhow!("no Engram weight {name}"))?;
            ensure!(
                v.len() == shape.iter().product::<usize>(),
                "Engram weight {name}: {} values for shape {shape:?}",
                v.len()
            );
            let t = Tensor::from_slice(v, shape, &Device::Cpu)?;
            vars.insert(name.to_string(), Var::from_tensor(&t)?);
        }
        Ok(Self { vars })
    }

    fn get(&self, name: &str) -> &Tensor {
        self.vars[name].as_tensor()
    }

    pub fn to_values(&self) -> Result<BTreeMap<String, Vec<f32>>> {
        self.vars
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.flatten_all()?.to_vec1::<f32>()?)))
            .collect()
    }
}

/// The rows a batch reads, gathered: `rows[i]` is table row `ids[i]`, and `index[j]`
/// (one per token and head) points into `rows`.
pub struct Gathered {
    pub ids: Vec<u64>,
    pub rows: Var,
    pub index: Tensor,
}

/// A table in memory with a row-wise Adagrad accumulator (one number per row): a step
/// updates only the rows its batch read.
pub struct SparseTable {
    pub width: usize,
    pub data: Vec<f32>,
    pub accum: Vec<f32>,
}

impl SparseTable {
    /// Rows uniform in +-`scale`, from `rng`.
    pub fn random(rows: u64, width: usize, scale: f32, rng: &mut TestRng) -> Self {
        Self {
            width,
            data: rng.vec(rows as usize * width, scale),
            accum: vec![0.0; rows as usize],
        }
    }

    pub fn rows(&self) -> usize {
        self.accum.len()
    }

    /// The distinct rows of `row_ids` (sorted) as a small variable, and each id's index.
    pub fn gather(&self, row_ids: &[u64]) -> Result<Gathered> {
        let mut ids = row_ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let w = self.width;
        let mut data = Vec::with_capacity(ids.len() * w);
        for &r in &ids {
            ensure!(
                (r as usize) < self.rows(),
                "row {r} outside the table ({} rows)",
                self.rows()
            );
            data.extend_from_slice(&self.data[r as usize * w..(r as usize + 1) * w]);
        }
        let index: Vec<u32> = row_ids
            .iter()
            .map(|r| ids.binary_search(r).expect("deduplicated from these ids") as u32)
            .collect();
        let n = ids.len();
        Ok(Gathered {
            ids,
            rows: Var::from_tensor(&Tensor::from_vec(data, (n, w), &Device::Cpu)?)?,
            index: Tensor::from_vec(index, row_ids.len(), &Device::Cpu)?,
        })
    }

    /// Row-wise Adagrad on the rows of `gathered` with their gradient `grad [n, w]`:
    /// `acc += mean(g^2)`, `row -= lr * g / (sqrt(acc) + 1e-10)`.
    pub fn adagrad(&mut self, gathered: &Gathered, grad: &Tensor, lr: f32) -> Result<()> {
        let g = grad.flatten_all()?.to_vec1::<f32>()?;
        let w = self.width;
        for (i, &r) in gathered.ids.iter().enumerate() {
            let gr = &g[i * w..(i + 1) * w];
            let ms = gr.iter().map(|x| x * x).sum::<f32>() / w as f32;
            let acc = &mut self.accum[r as usize];
            *acc += ms;
            let step = lr / (acc.sqrt() + 1e-10);
            for (x, gx) in self.data[r as usize * w..(r as usize + 1) * w]
                .iter_mut()
                .zip(gr)
            {
                *x -= step * gx;
            }
        }
        Ok(())
    }
}

fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

/// What the layer adds to hidden states `[B, T, D]`, from the gathered rows (the delta of
/// docs/algorithm.md section 7, before the block's attention).
pub fn forward(
    cfg: &EngramConfig,
    w: &DenseWeights,
    hidden: &Tensor,
    gathered: &Gathered,
) -> Result<Tensor> {
    let (b, t, d) = hidden.dims3()?;
    let e = cfg.embed_dim();
    let emb = gathered
        .rows
        .as_tensor()
        .index_select(&gathered.index, 0)?
        .reshape((b, t, e))?;
    let key =
        linear(&emb, w.get("key_projs.0.weight"))?.broadcast_add(w.get("key_projs.0.bias"))?;
    let eps = PAPER_GATE_NORM_EPS as f64;
    let score = (rms_norm(&key, w.get("norm1.0.weight"), eps)?
        * rms_norm(hidden, w.get("norm2.0.weight"), eps)?)?
    .sum_keepdim(D::Minus1)?
        / (d as f64).sqrt();
    let score = score?;
    // sign(s) * sqrt(max(|s|, clamp)); sign is a constant for the gradient.
    let sign = score.sign()?.detach();
    let magnitude = (&score * &sign)?.maximum(GATE_SCORE_CLAMP)?.sqrt()?;
    let gate = sigmoid(&(magnitude * sign)?)?;
    let value =
        linear(&emb, w.get("value_proj.weight"))?.broadcast_add(w.get("value_proj.bias"))?;
    let val = value.broadcast_mul(&gate)?;
    // Short conv: causal, depthwise, dilation max_ngram_size, then SiLU.
    let z = rms_norm(
        &val,
        w.get("short_conv.norms.0.weight"),
        PAPER_CONV_NORM_EPS as f64,
    )?;
    let (k, dil) = (cfg.kernel_size, cfg.conv_dilation());
    let pad = (k - 1) * dil;
    let zp = Tensor::cat(
        &[&Tensor::zeros((b, pad, d), z.dtype(), z.device())?, &z],
        1,
    )?;
    let conv_w = w.get("short_conv.conv.weight").reshape((d, k))?;
    let mut y = Tensor::zeros((b, t, d), z.dtype(), z.device())?;
    for j in 0..k {
        let tap = conv_w.narrow(1, j, 1)?.reshape(d)?;
        y = (y + zp.narrow(1, j * dil, t)?.broadcast_mul(&tap)?)?;
    }
    Ok((val + y.silu()?)?)
}
