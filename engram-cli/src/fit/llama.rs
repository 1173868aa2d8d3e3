//! The frozen host model of `engram fit` and `engram eval`: a Llama-architecture decoder
//! (Llama, Mistral without a sliding window) in f32 on the CPU, written on candle-core's
//! tensor ops so that candle's autograd can carry the loss's gradient back through the
//! blocks above an Engram layer to the Engram parameters. Hugging Face layout
//! (`model.layers.{i}...`, rotate-half RoPE), as `cargo xtask fetch-model` writes it.
//!
//! Written here rather than taken from candle-transformers because a fit needs a hook
//! before each block (where mistral.rs adds Engram) and the hidden states at the lowest
//! Engram layer, neither of which its Llama exposes.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use serde_json::Value;

/// The hyper-parameters read from `config.json`.
#[derive(Clone, Debug)]
pub struct LlamaConfig {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub vocab: usize,
    pub tied: bool,
}

impl LlamaConfig {
    /// Reads and checks `config.json`; other architectures are refused by name.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let v: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let arch = v["architectures"][0].as_str().unwrap_or("");
        ensure!(
            matches!(arch, "LlamaForCausalLM" | "MistralForCausalLM"),
            "{}: architecture {arch:?} is not supported by `engram fit` (Llama or Mistral only)",
            path.display()
        );
        ensure!(
            v["sliding_window"].is_null() || v.get("sliding_window").is_none(),
            "{}: a sliding window is not supported",
            path.display()
        );
        ensure!(
            v["rope_scaling"].is_null(),
            "{}: rope_scaling is not supported",
            path.display()
        );
        let int = |k: &str| -> Result<usize> {
            v[k].as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| anyhow!("{}: no integer `{k}`", path.display()))
        };
        let hidden = int("hidden_size")?;
        let heads = int("num_attention_heads")?;
        ensure!(
            heads > 0 && hidden % heads == 0,
            "{}: bad head count",
            path.display()
        );
        Ok(Self {
            hidden,
            intermediate: int("intermediate_size")?,
            layers: int("num_hidden_layers")?,
            heads,
            kv_heads: v["num_key_value_heads"]
                .as_u64()
                .map_or(heads, |x| x as usize),
            head_dim: v["head_dim"]
                .as_u64()
                .map_or(hidden / heads, |x| x as usize),
            rms_norm_eps: v["rms_norm_eps"].as_f64().unwrap_or(1e-6),
            rope_theta: v["rope_theta"].as_f64().unwrap_or(10_000.0),
            vocab: int("vocab_size")?,
            tied: v["tie_word_embeddings"].as_bool().unwrap_or(false),
        })
    }
}

struct Block {
    input_norm: Tensor,
    post_norm: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

/// The model's weights, frozen (plain tensors: autograd tracks only Engram's variables).
pub struct Llama {
    pub cfg: LlamaConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Tensor,
}

/// `x W^T` for `x [.., in]`, `W [out, in]`.
pub fn linear(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let n: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((n, dims[dims.len() - 1]))?.matmul(&w.t()?)?;
    let mut out = dims;
    *out.last_mut().expect("non-empty shape") = w.dim(0)?;
    y.reshape(out)
}

/// `x / sqrt(mean(x^2) + eps) * w` over the last dimension.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

/// The weight files of a model directory: `model.safetensors` or every `*.safetensors`
/// but Engram's own.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "safetensors")
                && p.file_name()
                    .is_some_and(|n| n != crate::init_checkpoint::ENGRAM_FILE)
        })
        .collect();
    files.sort();
    ensure!(
        !files.is_empty(),
        "{}: no model weights (*.safetensors)",
        dir.display()
    );
    Ok(files)
}

impl Llama {
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg = LlamaConfig::from_model_dir(dir)?;
        let mut all = HashMap::new();
        for f in weight_files(dir)? {
            let tensors = candle_core::safetensors::load(&f, &Device::Cpu)
                .with_context(|| format!("cannot read {}", f.display()))?;
            all.extend(tensors);
        }
        let mut take = |name: &str, shape: &[usize]| -> Result<Tensor> {
            let t = all
                .remove(name)
                .ok_or_else(|| anyhow!("{}: no tensor {name}", dir.display()))?;
            ensure!(
                t.dims() == shape,
                "{}: tensor {name} has shape {:?}, expected {shape:?}",
                dir.display(),
                t.dims()
            );
            Ok(t.to_dtype(DType::F32)?)
        };
        let (h, hd) = (cfg.hidden, cfg.head_dim);
        let embed = take("model.embed_tokens.weight", &[cfg.vocab, h])?;
        let mut blocks = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let p = |n: &str| format!("model.layers.{i}.{n}");
            let inter_shape = cfg.intermediate;
            blocks.push(Block {
                input_norm: take(&p("input_layernorm.weight"), &[h])?,
                post_norm: take(&p("post_attention_layernorm.weight"), &[h])?,
                q: take(&p("self_attn.q_proj.weight"), &[cfg.heads * hd, h])?,
                k: take(&p("self_attn.k_proj.weight"), &[cfg.kv_heads * hd, h])?,
                v: take(&p("self_attn.v_proj.weight"), &[cfg.kv_heads * hd, h])?,
                o: take(&p("self_attn.o_proj.weight"), &[h, cfg.heads * hd])?,
                gate: take(&p("mlp.gate_proj.weight"), &[inter_shape, h])?,
                up: take(&p("mlp.up_proj.weight"), &[inter_shape, h])?,
                down: take(&p("mlp.down_proj.weight"), &[h, inter_shape])?,
            });
        }
        let norm = take("model.norm.weight", &[h])?;
        let lm_head = if cfg.tied {
            embed.clone()
        } else {
            take("lm_head.weight", &[cfg.vocab, h])?
        };
        if cfg.heads % cfg.kv_heads != 0 {
            bail!("{}: heads not a multiple of kv heads", dir.display());
        }
        Ok(Self {
            cfg,
            embed,
            blocks,
            norm,
            lm_head,
        })
    }

    /// Token embeddings `[B, T, hidden]` of ids `[B, T]` (u32).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let ids = ids.flatten_all()?;
        Ok(self
            .embed
            .index_select(&ids, 0)?
            .reshape((b, t, self.cfg.hidden))?)
    }

    /// RoPE tables `(cos, sin)`, `[T, head_dim]`, for positions `0..t`.
    pub fn rope(&self, t: usize) -> Result<(Tensor, Tensor)> {
        let hd = self.cfg.head_dim;
        let inv: Vec<f32> = (0..hd / 2)
            .map(|i| 1.0 / self.cfg.rope_theta.powf(2.0 * i as f64 / hd as f64) as f32)
            .collect();
        let mut angles = Vec::with_capacity(t * hd);
        for p in 0..t {
            // cos/sin of [freqs, freqs]: the rotate-half layout.
            for _ in 0..2 {
                angles.extend(inv.iter().map(|f| p as f32 * f));
            }
        }
        let a = Tensor::from_vec(angles, (t, hd), &Device::Cpu)?;
        Ok((a.cos()?, a.sin()?))
    }

    /// Block `i` on hidden states `[B, T, hidden]` (positions from 0).
    pub fn block(&self, i: usize, x: &Tensor, rope: &(Tensor, Tensor)) -> Result<Tensor> {
        let blk = &self.blocks[i];
        let c = &self.cfg;
        let (b, t, _) = x.dims3()?;
        let hd = c.head_dim;
        let h = rms_norm(x, &blk.input_norm, c.rms_norm_eps)?;
        let heads = |w: &Tensor, n: usize| -> candle_core::Result<Tensor> {
            linear(&h, w)?
                .reshape((b, t, n, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = apply_rope(&heads(&blk.q, c.heads)?, rope)?;
        let k = apply_rope(&heads(&blk.k, c.kv_heads)?, rope)?;
        let v = heads(&blk.v, c.kv_heads)?;
        let rep = c.heads / c.kv_heads;
        let (k, v) = (repeat_kv(&k, rep)?, repeat_kv(&v, rep)?);
        let scores = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        let scores = scores.broadcast_add(&causal_mask(t)?)?;
        let probs = softmax_last(&scores)?;
        let attn = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, t, c.heads * hd))?;
        let x = (x + linear(&attn, &blk.o)?)?;
        let h = rms_norm(&x, &blk.post_norm, c.rms_norm_eps)?;
        let mlp = linear(
            &(linear(&h, &blk.gate)?.silu()? * linear(&h, &blk.up)?)?,
            &blk.down,
        )?;
        Ok((x + mlp)?)
    }

    /// Logits `[B, T, vocab]` of the final hidden states.
    pub fn head(&self, x: &Tensor) -> Result<Tensor> {
        let h = rms_norm(x, &self.norm, self.cfg.rms_norm_eps)?;
        Ok(linear(&h, &self.lm_head)?)
    }
}

fn apply_rope(x: &Tensor, (cos, sin): &(Tensor, Tensor)) -> candle_core::Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?;
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

fn repeat_kv(x: &Tensor, rep: usize) -> candle_core::Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (b, n, t, hd) = x.dims4()?;
    x.unsqueeze(2)?
        .expand((b, n, rep, t, hd))?
        .reshape((b, n * rep, t, hd))
}

fn causal_mask(t: usize) -> candle_core::Result<Tensor> {
    let m: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(m, (t, t), &Device::Cpu)
}

/// Softmax over the last dimension, from differentiable ops (the max is a constant).
pub fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let e = x
        .broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?
        .exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// `log(sum(exp(x)))` over the last dimension, keeping it.
pub fn logsumexp_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    x.broadcast_sub(&m)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?
        .broadcast_add(&m)
}
