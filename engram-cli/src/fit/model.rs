//! The host model with Engram layers inserted where the runtime and the patched
//! mistral.rs add them (before block L's attention: `H <- H + Engram(H, ids)`), and the
//! next-token loss; the one forward `engram fit` trains and `engram eval` measures.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor, D};
use engram_core::compress::VocabCompression;
use engram_core::config::{EngramConfig, Variant};
use engram_core::hashing::EngramHasher;
use tokenizers::Tokenizer;

use super::layer::{forward as engram_forward, DenseWeights, Gathered, SparseTable};
use super::llama::{logsumexp_last, Llama};

/// One Engram layer's table and weights.
pub struct EngramLayerParts {
    pub layer_id: usize,
    pub table: SparseTable,
    pub dense: DenseWeights,
}

/// Every Engram layer of a model, with the hashing of its config.
pub struct EngramParts {
    pub cfg: EngramConfig,
    pub hasher: EngramHasher,
    pub compression: VocabCompression,
    pub layers: Vec<EngramLayerParts>,
}

impl EngramParts {
    /// The hashing side of `cfg` for `tokenizer`, with no layers yet (the caller adds them).
    pub fn without_layers(
        cfg: EngramConfig,
        tokenizer: &Tokenizer,
        tokenizer_path: &Path,
    ) -> Result<Self> {
        ensure!(
            cfg.variant == Variant::Paper && cfg.hc_mult == 1,
            "`engram fit`/`eval` handle the paper variant with hc_mult 1 only"
        );
        let compression = VocabCompression::from_tokenizer(tokenizer)
            .with_context(|| format!("tokenizer {}", tokenizer_path.display()))?;
        let pad = compression.compress_id(cfg.hash.pad_id, 0)?;
        let hasher = EngramHasher::new(&cfg.hash, compression.compressed_vocab_size(), pad)?;
        Ok(Self {
            cfg,
            hasher,
            compression,
            layers: Vec::new(),
        })
    }

    /// Row ids (offsets added) `[B * T * heads]` of every layer for inputs `[B][T]`.
    pub fn row_ids(&self, inputs: &[&[u32]]) -> Result<Vec<Vec<u64>>> {
        let flat: Vec<i64> = inputs
            .iter()
            .flat_map(|w| w.iter().map(|&i| i as i64))
            .collect();
        let compressed = self.compression.compress(&flat)?;
        (0..self.layers.len())
            .map(|l| {
                Ok(self
                    .hasher
                    .hash_batch(l, &compressed, inputs.len(), None, true)?)
            })
            .collect()
    }

    /// Each layer's gathered rows for a batch.
    pub fn gather(&self, inputs: &[&[u32]]) -> Result<Vec<Gathered>> {
        let ids = self.row_ids(inputs)?;
        self.layers
            .iter()
            .zip(&ids)
            .map(|(l, r)| l.table.gather(r))
            .collect()
    }

    pub fn lowest_layer(&self) -> usize {
        self.layers.iter().map(|l| l.layer_id).min().unwrap_or(0)
    }
}

/// Input ids `[B, T]` as a tensor.
pub fn ids_tensor(inputs: &[&[u32]]) -> Result<Tensor> {
    let t = inputs[0].len();
    let flat: Vec<u32> = inputs.iter().flat_map(|w| w.iter().copied()).collect();
    Ok(Tensor::from_vec(flat, (inputs.len(), t), &Device::Cpu)?)
}

/// Logits `[B, T, vocab]` from hidden states `x` entering block `start`, with Engram
/// (and its gathered rows) where given.
pub fn logits_from(
    llama: &Llama,
    start: usize,
    x: Tensor,
    engram: Option<(&EngramParts, &[Gathered])>,
) -> Result<Tensor> {
    llama.head(&hidden_from(llama, start, x, engram)?)
}

/// The last block's output `[B, T, hidden]` (before the final norm and the LM head) from
/// hidden states `x` entering block `start`, with Engram where given.
pub fn hidden_from(
    llama: &Llama,
    start: usize,
    mut x: Tensor,
    engram: Option<(&EngramParts, &[Gathered])>,
) -> Result<Tensor> {
    let t = x.dim(1)?;
    let rope = llama.rope(t)?;
    for i in start..llama.cfg.layers {
        if let Some((parts, gathered)) = engram {
            for (l, g) in parts.layers.iter().zip(gathered) {
                if l.layer_id == i {
                    x = (&x + engram_forward(&parts.cfg, &l.dense, &x, g)?)?;
                }
            }
        }
        x = llama.block(i, &x, &rope)?;
    }
    Ok(x)
}

/// [`hidden_from`] of inputs `[B][T]` from the token embeddings up, with `engram`'s
/// layers (their rows gathered for these inputs) where given.
pub fn hidden_of(llama: &Llama, engram: Option<&EngramParts>, inputs: &[&[u32]]) -> Result<Tensor> {
    let x = llama.embed(&ids_tensor(inputs)?)?;
    match engram {
        Some(parts) => {
            let gathered = parts.gather(inputs)?;
            hidden_from(llama, 0, x, Some((parts, &gathered)))
        }
        None => hidden_from(llama, 0, x, None),
    }
}

/// Hidden states entering block `upto` (the host alone: no Engram layer lies below it).
pub fn hidden_before(llama: &Llama, ids: &Tensor, upto: usize) -> Result<Tensor> {
    let mut x = llama.embed(ids)?;
    let rope = llama.rope(ids.dim(1)?)?;
    for i in 0..upto {
        x = llama.block(i, &x, &rope)?;
    }
    Ok(x)
}

/// Per-token negative log-likelihood `[B * T]` of `targets` (`[B][T]`).
pub fn token_nll(logits: &Tensor, targets: &[&[u32]]) -> Result<Tensor> {
    let v = logits.dim(D::Minus1)?;
    let logits = logits.reshape(((), v))?;
    let tgt: Vec<u32> = targets.iter().flat_map(|w| w.iter().copied()).collect();
    let n = tgt.len();
    let tgt = Tensor::from_vec(tgt, (n, 1), &Device::Cpu)?;
    let picked = logits.gather(&tgt, 1)?;
    Ok((logsumexp_last(&logits)? - picked)?.reshape(n)?)
}

/// How many of `targets` are the logits' argmax.
pub fn correct(logits: &Tensor, targets: &[&[u32]]) -> Result<usize> {
    let v = logits.dim(D::Minus1)?;
    let best = logits.reshape(((), v))?.argmax(1)?.to_vec1::<u32>()?;
    Ok(best
        .iter()
        .zip(targets.iter().flat_map(|w| w.iter()))
        .filter(|(a, b)| a == b)
        .count())
}
