//! Engram configuration: the paper variant and the DeepSeek-V4.1 variant.
//!
//! Three sources are accepted, all ending in one validated [`EngramConfig`]:
//! - the golden-file form (`{"engram": {...}, "backbone": {...}}`, see `tests/data/GOLDEN.md`);
//! - a model's Hugging Face `config.json` with flat `engram_*` keys (possibly under
//!   `text_config`), as DeepSeek-V4.1 ships it;
//! - a model's `config.json` with an `engram` object in the golden form.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::dtype::FP8_SCALE_BLOCK;
use crate::error::{EngramError, Result};

/// Which Engram layer the weights describe (docs/algorithm.md sections 7 and 8).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// `engram_demo_v1.py`: per-branch keys with bias, shared value, short conv; returns a delta.
    Paper,
    /// DeepSeek-V4.1: fused `wkv`, q/k weights, no conv; returns the updated hidden states.
    V41,
}

impl Variant {
    /// Whether the layer's output is added to the residual stream (paper) or replaces it (V4.1).
    pub fn output_is_delta(self) -> bool {
        matches!(self, Variant::Paper)
    }
}

/// Epsilon of the paper variant's key/query norms: torch's default for `eps=None` (f32 machine epsilon).
pub const PAPER_GATE_NORM_EPS: f32 = f32::EPSILON;
/// Epsilon of the paper variant's short-conv norms.
pub const PAPER_CONV_NORM_EPS: f32 = 1e-5;
/// Lower clamp of |gate score| before the signed square root (both variants).
pub const GATE_SCORE_CLAMP: f64 = 1e-6;

/// Upper bounds [`HashConfig::validate`] and [`EngramConfig::validate`] enforce. They are
/// far above any real model (DeepSeek-V4.1: 3 orders x 8 heads, hidden 7168, hc_mult 4)
/// and keep every size derived from a config (tensor shapes, element counts, the prime
/// search) from overflowing or allocating without bound, so a corrupt config is an error
/// that names the field, not an abort.
pub mod limits {
    /// Largest n-gram order.
    pub const MAX_NGRAM_SIZE: usize = 16;
    /// Most hash heads per n-gram order.
    pub const MAX_HEADS_PER_NGRAM: usize = 1024;
    /// Most Engram layers in one model.
    pub const MAX_LAYERS: usize = 1024;
    /// Largest transformer layer index an Engram layer may sit at.
    pub const MAX_LAYER_ID: usize = 1 << 20;
    /// Most hyper-connection branches.
    pub const MAX_HC_MULT: usize = 64;
    /// Largest hidden size.
    pub const MAX_HIDDEN_SIZE: usize = 1 << 20;
    /// Widest table row (columns).
    pub const MAX_HEAD_DIM: usize = 1 << 20;
    /// Largest short-conv kernel.
    pub const MAX_KERNEL_SIZE: usize = 64;
}

/// A config error unless `value <= max`.
fn at_most(field: &str, value: usize, max: usize) -> Result<()> {
    if value > max {
        return Err(EngramError::config(
            field,
            format!("must be <= {max}, got {value}"),
        ));
    }
    Ok(())
}

/// What hashing needs: enough to turn token ids into rows, nothing about the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HashConfig {
    /// Table vocabulary per n-gram order, for orders 2..=max_ngram_size.
    pub engram_vocab_size: Vec<u64>,
    pub max_ngram_size: usize,
    pub n_head_per_ngram: usize,
    /// Transformer layers that carry an Engram layer, in config order (it fixes the primes).
    pub layer_ids: Vec<usize>,
    /// Raw tokenizer id of the pad token; hashing uses its compressed id.
    pub pad_id: i64,
    pub seed: u64,
    /// Compressed vocabulary size the checkpoint was trained with, if the config states it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compressed_vocab_size: Option<usize>,
}

impl HashConfig {
    /// Number of n-gram orders (2..=max_ngram_size).
    pub fn num_orders(&self) -> usize {
        self.max_ngram_size - 1
    }
    /// Heads (table slices) per layer, order-major.
    pub fn heads_per_layer(&self) -> usize {
        self.num_orders() * self.n_head_per_ngram
    }

    /// Checks every invariant hashing relies on; the error names the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, reason: String| Err(EngramError::config(field, reason));
        if self.max_ngram_size < 2 {
            return bad(
                "max_ngram_size",
                format!("must be >= 2, got {}", self.max_ngram_size),
            );
        }
        at_most(
            "max_ngram_size",
            self.max_ngram_size,
            limits::MAX_NGRAM_SIZE,
        )?;
        if self.engram_vocab_size.len() != self.num_orders() {
            return bad(
                "engram_vocab_size",
                format!(
                    "needs one entry per n-gram order 2..={} ({} entries), got {}",
                    self.max_ngram_size,
                    self.num_orders(),
                    self.engram_vocab_size.len()
                ),
            );
        }
        if let Some(v) = self.engram_vocab_size.iter().find(|&&v| v < 2) {
            return bad(
                "engram_vocab_size",
                format!("every entry must be >= 2, got {v}"),
            );
        }
        if let Some(v) = self.engram_vocab_size.iter().find(|&&v| v > 1 << 40) {
            return bad(
                "engram_vocab_size",
                format!("entry {v} is larger than 2^40 rows"),
            );
        }
        if self.n_head_per_ngram == 0 {
            return bad("n_head_per_ngram", "must be >= 1".into());
        }
        at_most(
            "n_head_per_ngram",
            self.n_head_per_ngram,
            limits::MAX_HEADS_PER_NGRAM,
        )?;
        if self.layer_ids.is_empty() {
            return bad("layer_ids", "must name at least one layer".into());
        }
        if self.layer_ids.len() > limits::MAX_LAYERS {
            return bad(
                "layer_ids",
                format!(
                    "names {} layers; at most {} are allowed",
                    self.layer_ids.len(),
                    limits::MAX_LAYERS
                ),
            );
        }
        if let Some(&id) = self.layer_ids.iter().find(|&&id| id > limits::MAX_LAYER_ID) {
            return bad(
                "layer_ids",
                format!(
                    "layer {id} is past the largest layer index {}",
                    limits::MAX_LAYER_ID
                ),
            );
        }
        let mut seen = self.layer_ids.clone();
        seen.sort_unstable();
        if seen.windows(2).any(|w| w[0] == w[1]) {
            return bad(
                "layer_ids",
                format!("repeats a layer: {:?}", self.layer_ids),
            );
        }
        if self.pad_id < 0 {
            return bad(
                "pad_id",
                format!("must be a token id >= 0, got {}", self.pad_id),
            );
        }
        if self.compressed_vocab_size == Some(0) {
            return bad("compressed_vocab_size", "must be >= 1".into());
        }
        Ok(())
    }

    /// Reads the hashing fields of a JSON file in any accepted form: the golden form, a
    /// model's `config.json`, or a bare `engram` object (as in `hash_demo_default.json`).
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let value = read_json(path)?;
        let bare = value.get("max_ngram_size").is_some() && value.get("engram").is_none();
        let parsed = if bare {
            Self::from_engram_section(&value)
        } else {
            EngramConfig::from_json_value(&value).map(|c| c.hash)
        };
        parsed.map_err(|e| EngramError::file(path, e))
    }

    fn from_engram_section(engram: &Value) -> Result<Self> {
        let f = Fields(engram);
        let max_ngram_size = f.usize("max_ngram_size")?;
        let cfg = HashConfig {
            engram_vocab_size: f.vocab_sizes("engram_vocab_size", max_ngram_size)?,
            max_ngram_size,
            n_head_per_ngram: f.usize("n_head_per_ngram")?,
            layer_ids: f.usize_list("layer_ids")?,
            pad_id: f.i64("pad_id")?,
            seed: f.opt_u64("seed")?.unwrap_or(0),
            compressed_vocab_size: f.opt_usize("compressed_vocab_size")?,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// A validated Engram configuration. Field names follow the original implementation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EngramConfig {
    pub variant: Variant,
    #[serde(flatten)]
    pub hash: HashConfig,
    /// Width of one table row (paper: n_embed_per_ngram / n_head_per_ngram).
    pub head_dim: usize,
    /// Short-conv kernel size (paper variant; 0 for V4.1, which has no conv).
    pub kernel_size: usize,
    pub hidden_size: usize,
    /// Hyper-connection branches (1 for an ordinary Llama/Qwen block).
    pub hc_mult: usize,
    /// RMS-norm epsilon of the V4.1 gate (the paper variant uses fixed epsilons).
    pub rms_norm_eps: f64,
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| EngramError::file(path, e))?;
    serde_json::from_str(&text).map_err(|e| EngramError::file(path, format!("not valid JSON: {e}")))
}

impl EngramConfig {
    /// Number of n-gram orders (2..=max_ngram_size).
    pub fn num_orders(&self) -> usize {
        self.hash.num_orders()
    }
    /// Heads (table slices) per layer, order-major.
    pub fn heads_per_layer(&self) -> usize {
        self.hash.heads_per_layer()
    }
    /// Width of the concatenated embedding `E` fed to the projections.
    pub fn embed_dim(&self) -> usize {
        self.heads_per_layer() * self.head_dim
    }
    /// Channels of the hidden state seen by one Engram layer (hc_mult * hidden_size).
    pub fn branch_channels(&self) -> usize {
        self.hc_mult * self.hidden_size
    }
    /// Short-conv dilation (= max_ngram_size in the original).
    pub fn conv_dilation(&self) -> usize {
        self.hash.max_ngram_size
    }
    /// Rows of `z` a sequence must remember for the short conv: (K-1) * dilation.
    pub fn conv_history(&self) -> usize {
        match self.variant {
            Variant::Paper => self.kernel_size.saturating_sub(1) * self.conv_dilation(),
            Variant::V41 => 0,
        }
    }
    /// Position of `layer_id` in `layer_ids`.
    pub fn layer_index(&self, layer_id: usize) -> Result<usize> {
        self.hash
            .layer_ids
            .iter()
            .position(|&l| l == layer_id)
            .ok_or_else(|| {
                EngramError::config(
                    "layer_ids",
                    format!(
                        "layer {layer_id} is not an Engram layer ({:?})",
                        self.hash.layer_ids
                    ),
                )
            })
    }

    /// Checks every invariant the algorithm relies on; the error names the field.
    pub fn validate(&self) -> Result<()> {
        self.hash.validate()?;
        let bad = |field: &str, reason: String| Err(EngramError::config(field, reason));
        if self.head_dim == 0 {
            return bad("head_dim", "must be >= 1".into());
        }
        if self.hidden_size == 0 {
            return bad("hidden_size", "must be >= 1".into());
        }
        if self.hc_mult == 0 {
            return bad("hc_mult", "must be >= 1".into());
        }
        at_most("head_dim", self.head_dim, limits::MAX_HEAD_DIM)?;
        at_most("hidden_size", self.hidden_size, limits::MAX_HIDDEN_SIZE)?;
        at_most("hc_mult", self.hc_mult, limits::MAX_HC_MULT)?;
        at_most("kernel_size", self.kernel_size, limits::MAX_KERNEL_SIZE)?;
        match self.variant {
            Variant::Paper if self.kernel_size == 0 => {
                return bad(
                    "kernel_size",
                    "the paper variant needs a short-conv kernel >= 1".into(),
                )
            }
            Variant::V41 if !self.head_dim.is_multiple_of(FP8_SCALE_BLOCK) => {
                return bad(
                    "engram_head_dim",
                    format!(
                        "V4.1 rows carry one scale per {FP8_SCALE_BLOCK} columns: {} is not a multiple of {FP8_SCALE_BLOCK}",
                        self.head_dim
                    ),
                )
            }
            Variant::V41 if !self.hidden_size.is_multiple_of(FP8_SCALE_BLOCK) => {
                return bad(
                    "hidden_size",
                    format!(
                        "V4.1 wkv is quantized in {FP8_SCALE_BLOCK}x{FP8_SCALE_BLOCK} blocks: {} is not a multiple of {FP8_SCALE_BLOCK}",
                        self.hidden_size
                    ),
                )
            }
            _ => {}
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return bad(
                "rms_norm_eps",
                format!("must be finite and >= 0, got {}", self.rms_norm_eps),
            );
        }
        Ok(())
    }

    /// Reads the golden-file form: `{"variant"?, "engram": {...}, "backbone": {...}}`.
    pub fn from_golden_meta(meta: &Value) -> Result<Self> {
        let engram = meta
            .get("engram")
            .ok_or_else(|| EngramError::config("engram", "missing object"))?;
        let backbone = meta
            .get("backbone")
            .ok_or_else(|| EngramError::config("backbone", "missing object"))?;
        let variant = match meta.get("variant").and_then(Value::as_str) {
            None | Some("paper") => Variant::Paper,
            Some("v41") => Variant::V41,
            Some(other) => {
                return Err(EngramError::config(
                    "variant",
                    format!("unknown variant {other:?} (expected \"paper\" or \"v41\")"),
                ))
            }
        };
        Self::from_sections(variant, engram, backbone)
    }

    /// Reads the `engram` and `backbone` objects of the golden form.
    fn from_sections(variant: Variant, engram: &Value, backbone: &Value) -> Result<Self> {
        let f = Fields(engram);
        let b = Fields(backbone);
        let hash = HashConfig::from_engram_section(engram)?;
        let n_head_per_ngram = hash.n_head_per_ngram;
        let head_dim = match f.opt_usize("engram_head_dim")? {
            Some(d) => d,
            None => {
                let n_embed = f.usize("n_embed_per_ngram")?;
                if n_head_per_ngram == 0 || n_embed % n_head_per_ngram != 0 {
                    return Err(EngramError::config(
                        "n_embed_per_ngram",
                        format!(
                            "{n_embed} is not divisible by n_head_per_ngram {n_head_per_ngram}"
                        ),
                    ));
                }
                n_embed / n_head_per_ngram
            }
        };
        let cfg = EngramConfig {
            variant,
            hash,
            head_dim,
            kernel_size: match variant {
                Variant::Paper => f.opt_usize("kernel_size")?.unwrap_or(4),
                Variant::V41 => 0,
            },
            hidden_size: b.usize("hidden_size")?,
            hc_mult: b.opt_usize("hc_mult")?.unwrap_or(1),
            rms_norm_eps: b.opt_f64("rms_norm_eps")?.unwrap_or(1e-20),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads a model's Hugging Face `config.json` value. Returns `Ok(None)` when the model
    /// has no Engram layers (no `engram` object and no `engram_layer_ids`).
    ///
    /// Flat keys (DeepSeek-V4.1 names): `engram_layer_ids`, `engram_max_ngram_size`,
    /// `engram_vocab_size` (number or list), `engram_n_heads`, `engram_head_dim`,
    /// `engram_pad_token_id` (or `engram_pad_id`), `engram_seed` (default 0),
    /// `engram_compressed_vocab_size`, `engram_kernel_size`, `engram_variant`
    /// (`"paper"` or `"v41"`; default: paper when `engram_kernel_size` is present, else v41),
    /// `hidden_size`, `hc_mult` (default 1), `rms_norm_eps`. Keys under `text_config` win.
    pub fn from_hf_config(config: &Value) -> Result<Option<Self>> {
        let root = config.get("text_config").unwrap_or(config);
        let backbone = Fields(root);
        if let Some(section) = root.get("engram").or_else(|| config.get("engram")) {
            let variant = match section.get("variant").and_then(Value::as_str) {
                None | Some("paper") => Variant::Paper,
                Some("v41") => Variant::V41,
                Some(other) => {
                    return Err(EngramError::config(
                        "engram.variant",
                        format!("unknown variant {other:?} (expected \"paper\" or \"v41\")"),
                    ))
                }
            };
            // The section may carry its own backbone numbers; the model's win otherwise.
            let mut bb = serde_json::Map::new();
            for key in ["hidden_size", "hc_mult", "rms_norm_eps"] {
                if let Some(v) = section.get(key).or_else(|| root.get(key)) {
                    bb.insert(key.into(), v.clone());
                }
            }
            return Self::from_sections(variant, section, &Value::Object(bb)).map(Some);
        }
        if root.get("engram_layer_ids").is_none() {
            return Ok(None);
        }
        let f = backbone;
        let max_ngram_size = f.usize("engram_max_ngram_size")?;
        let kernel = f.opt_usize("engram_kernel_size")?;
        let variant = match f.0.get("engram_variant").and_then(Value::as_str) {
            Some("paper") => Variant::Paper,
            Some("v41") => Variant::V41,
            Some(other) => {
                return Err(EngramError::config(
                    "engram_variant",
                    format!("unknown variant {other:?} (expected \"paper\" or \"v41\")"),
                ))
            }
            None if kernel.is_some() => Variant::Paper,
            None => Variant::V41,
        };
        let pad_id = match f.opt_i64("engram_pad_token_id")? {
            Some(p) => p,
            None => f.i64("engram_pad_id")?,
        };
        let hash = HashConfig {
            engram_vocab_size: f.vocab_sizes("engram_vocab_size", max_ngram_size)?,
            max_ngram_size,
            n_head_per_ngram: f.usize("engram_n_heads")?,
            layer_ids: f.usize_list("engram_layer_ids")?,
            pad_id,
            seed: f.opt_u64("engram_seed")?.unwrap_or(0),
            compressed_vocab_size: f.opt_usize("engram_compressed_vocab_size")?,
        };
        let cfg = EngramConfig {
            variant,
            hash,
            head_dim: f.usize("engram_head_dim")?,
            kernel_size: match variant {
                Variant::Paper => kernel.unwrap_or(4),
                Variant::V41 => 0,
            },
            hidden_size: f.usize("hidden_size")?,
            hc_mult: f.opt_usize("hc_mult")?.unwrap_or(1),
            rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
        };
        cfg.validate()?;
        Ok(Some(cfg))
    }

    /// Reads a JSON file in either form: the golden form (an `engram` and a `backbone`
    /// object) or a model's `config.json`. Errors name the file.
    pub fn from_json_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        Self::from_json_value(&read_json(path)?).map_err(|e| EngramError::file(path, e))
    }

    /// [`Self::from_json_file`] on an already parsed value.
    pub fn from_json_value(value: &Value) -> Result<Self> {
        let parsed = if value.get("engram").is_some() && value.get("backbone").is_some() {
            Self::from_golden_meta(value).map(Some)
        } else {
            Self::from_hf_config(value)
        };
        parsed?.ok_or_else(|| {
            EngramError::config(
                "engram",
                "no Engram configuration (no `engram` object and no `engram_layer_ids`)",
            )
        })
    }
}

/// Typed access to a JSON object's fields with errors that name the field.
struct Fields<'a>(&'a Value);

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }
    fn missing(key: &str) -> EngramError {
        EngramError::config(key, "missing")
    }
    fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .or_else(|| {
                    v.as_f64()
                        .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 1.8e19)
                        .map(|f| f as u64)
                })
                .map(Some)
                .ok_or_else(|| {
                    EngramError::config(key, format!("expected a non-negative integer, got {v}"))
                }),
        }
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        Ok(self.opt_u64(key)?.map(|v| v as usize))
    }
    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| Self::missing(key))
    }
    fn opt_i64(&self, key: &str) -> Result<Option<i64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .map(Some)
                .ok_or_else(|| EngramError::config(key, format!("expected an integer, got {v}"))),
        }
    }
    fn i64(&self, key: &str) -> Result<i64> {
        self.opt_i64(key)?.ok_or_else(|| Self::missing(key))
    }
    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| EngramError::config(key, format!("expected a number, got {v}"))),
        }
    }
    fn usize_list(&self, key: &str) -> Result<Vec<usize>> {
        let v = self.get(key).ok_or_else(|| Self::missing(key))?;
        let arr = v.as_array().ok_or_else(|| {
            EngramError::config(key, format!("expected a list of integers, got {v}"))
        })?;
        arr.iter()
            .map(|x| {
                x.as_u64().map(|u| u as usize).ok_or_else(|| {
                    EngramError::config(key, format!("expected non-negative integers, got {x}"))
                })
            })
            .collect()
    }
    /// A number (the same for every order) or one entry per order 2..=max_n.
    fn vocab_sizes(&self, key: &str, max_ngram_size: usize) -> Result<Vec<u64>> {
        let v = self.get(key).ok_or_else(|| Self::missing(key))?;
        if let Some(n) = v.as_u64() {
            // Checked here too: the list is built before the config is validated.
            at_most("max_ngram_size", max_ngram_size, limits::MAX_NGRAM_SIZE)?;
            return Ok(vec![n; max_ngram_size.saturating_sub(1)]);
        }
        let arr = v.as_array().ok_or_else(|| {
            EngramError::config(key, format!("expected an integer or a list, got {v}"))
        })?;
        arr.iter()
            .map(|x| {
                x.as_u64().ok_or_else(|| {
                    EngramError::config(key, format!("expected non-negative integers, got {x}"))
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn demo() -> Value {
        json!({"engram": {"engram_vocab_size": [2003, 3001], "max_ngram_size": 3,
            "n_embed_per_ngram": 64, "n_head_per_ngram": 4, "layer_ids": [1, 3],
            "pad_id": 2, "seed": 0, "kernel_size": 4},
            "backbone": {"hidden_size": 96, "hc_mult": 4}})
    }

    #[test]
    fn reads_golden_form() {
        let cfg = EngramConfig::from_golden_meta(&demo()).unwrap();
        assert_eq!(cfg.variant, Variant::Paper);
        assert_eq!(cfg.head_dim, 16);
        assert_eq!(cfg.heads_per_layer(), 8);
        assert_eq!(cfg.embed_dim(), 128);
        assert_eq!(cfg.conv_history(), 9);
    }

    #[test]
    fn reads_hf_flat_keys() {
        let v = json!({"text_config": {"engram_layer_ids": [1, 14], "engram_max_ngram_size": 4,
            "engram_vocab_size": 16000000, "engram_n_heads": 8, "engram_head_dim": 256,
            "engram_pad_token_id": 2, "engram_compressed_vocab_size": 99092,
            "hidden_size": 5120, "hc_mult": 4, "rms_norm_eps": 1e-20}});
        let cfg = EngramConfig::from_hf_config(&v).unwrap().unwrap();
        assert_eq!(cfg.variant, Variant::V41);
        assert_eq!(cfg.hash.engram_vocab_size, vec![16_000_000; 3]);
        assert_eq!(cfg.embed_dim(), 6144);
        assert!(EngramConfig::from_hf_config(&json!({"hidden_size": 8}))
            .unwrap()
            .is_none());
    }

    /// Sizes past [`limits`] are refused before anything is sized from them (a
    /// scalar vocab once became a list of `max_ngram_size - 1` entries before any check,
    /// and `hc_mult` = 2^64 - 1 named that many tensors).
    #[test]
    fn absurd_sizes_are_refused_by_name() {
        let huge = json!(u64::MAX);
        for (section, field) in [
            ("engram", "max_ngram_size"),
            ("engram", "n_head_per_ngram"),
            ("engram", "kernel_size"),
            ("backbone", "hidden_size"),
            ("backbone", "hc_mult"),
        ] {
            let mut v = demo();
            v[section][field] = huge.clone();
            let e = EngramConfig::from_golden_meta(&v).unwrap_err().to_string();
            assert!(e.contains(field), "{field}: {e}");
        }
        let mut v = demo();
        v["engram"]["layer_ids"] = json!([1, 1u64 << 40]);
        let e = EngramConfig::from_golden_meta(&v).unwrap_err().to_string();
        assert!(e.contains("layer_ids"), "{e}");
        let mut v = demo();
        v["engram"]["layer_ids"] = json!((0..2000).collect::<Vec<u32>>());
        let e = EngramConfig::from_golden_meta(&v).unwrap_err().to_string();
        assert!(e.contains("layer_ids"), "{e}");
        let mut v = demo();
        v["engram"]["engram_head_dim"] = huge.clone();
        let e = EngramConfig::from_golden_meta(&v).unwrap_err().to_string();
        assert!(e.contains("head_dim"), "{e}");

        let hf = json!({"engram_layer_ids": [1], "engram_max_ngram_size": 1u64 << 60,
            "engram_vocab_size": 1000, "engram_n_heads": 8, "engram_head_dim": 32,
            "engram_pad_token_id": 2, "hidden_size": 64});
        let e = EngramConfig::from_hf_config(&hf).unwrap_err().to_string();
        assert!(e.contains("max_ngram_size"), "{e}");
        // The largest sizes allowed still validate.
        let mut v = demo();
        v["engram"]["n_head_per_ngram"] = json!(limits::MAX_HEADS_PER_NGRAM);
        v["engram"]["n_embed_per_ngram"] = json!(limits::MAX_HEADS_PER_NGRAM);
        v["backbone"]["hc_mult"] = json!(limits::MAX_HC_MULT);
        v["backbone"]["hidden_size"] = json!(limits::MAX_HIDDEN_SIZE);
        EngramConfig::from_golden_meta(&v).unwrap();
    }

    #[test]
    fn refusals_name_the_field() {
        let mut v = demo();
        v["engram"]["engram_vocab_size"] = json!([2003]);
        let e = EngramConfig::from_golden_meta(&v).unwrap_err().to_string();
        assert!(e.contains("engram_vocab_size"), "{e}");
        let mut v = demo();
        v["engram"]["max_ngram_size"] = json!(1);
        assert!(EngramConfig::from_golden_meta(&v)
            .unwrap_err()
            .to_string()
            .contains("max_ngram_size"));
        let mut v = demo();
        v["engram"]["n_embed_per_ngram"] = json!(65);
        assert!(EngramConfig::from_golden_meta(&v)
            .unwrap_err()
            .to_string()
            .contains("n_embed_per_ngram"));
        let mut v = demo();
        v["backbone"]["hidden_size"] = json!("big");
        assert!(EngramConfig::from_golden_meta(&v)
            .unwrap_err()
            .to_string()
            .contains("hidden_size"));
        let mut v = demo();
        v["engram"]["layer_ids"] = json!([1, 1]);
        assert!(EngramConfig::from_golden_meta(&v)
            .unwrap_err()
            .to_string()
            .contains("layer_ids"));
    }
}
