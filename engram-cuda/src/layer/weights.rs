//! [`CudaLayer::new`]: a layer's weights checked against its config and uploaded in the
//! layout the kernels read (the paper's projections concatenated; V4.1's `wkv`
//! dequantized and `q_weight * k_weight` folded).

use std::sync::Mutex;

use cudarc::driver::CudaSlice;
use engram_core::checkpoint::LayerWeights;
use engram_core::config::{EngramConfig, Variant};

use super::CudaLayer;
use crate::backend::CudaBackend;
use crate::error::{CudaBackendError, Result};

#[allow(clippy::large_enum_variant)] // one per layer
pub(super) enum DeviceWeights {
    Paper {
        /// `[(G+1)*D, E]`: the G key projections, then the value projection.
        w: CudaSlice<f32>,
        /// `[(G+1)*D]`.
        bias: CudaSlice<f32>,
        norm1: CudaSlice<f32>,
        norm2: CudaSlice<f32>,
        /// `[G*D, K]`.
        conv_w: CudaSlice<f32>,
        conv_norm: CudaSlice<f32>,
    },
    V41 {
        /// `[(G+1)*D, E]`, dequantized.
        w: CudaSlice<f32>,
        /// `[G*D]`: q_weight * k_weight in f32.
        wqk: CudaSlice<f32>,
    },
}

fn expect_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(CudaBackendError::Invalid(format!(
            "layer weights: {what} has {got} values, expected {want}"
        )))
    }
}

impl CudaLayer {
    /// Uploads layer `layer_id`'s weights (checked against `cfg`).
    pub fn new(
        backend: &CudaBackend,
        cfg: EngramConfig,
        layer_id: usize,
        weights: &LayerWeights,
    ) -> Result<Self> {
        cfg.layer_index(layer_id)?;
        let (g, d, e) = (cfg.hc_mult, cfg.hidden_size, cfg.embed_dim());
        let weights = match (weights, cfg.variant) {
            (LayerWeights::Paper(w), Variant::Paper) => {
                expect_len("key projections", w.key_weight.len(), g)?;
                let mut wcat = Vec::with_capacity((g + 1) * d * e);
                let mut bias = Vec::with_capacity((g + 1) * d);
                for h in 0..g {
                    expect_len("a key projection", w.key_weight[h].len(), d * e)?;
                    expect_len("a key bias", w.key_bias[h].len(), d)?;
                    wcat.extend_from_slice(&w.key_weight[h]);
                    bias.extend_from_slice(&w.key_bias[h]);
                }
                expect_len("the value projection", w.value_weight.len(), d * e)?;
                expect_len("the value bias", w.value_bias.len(), d)?;
                wcat.extend_from_slice(&w.value_weight);
                bias.extend_from_slice(&w.value_bias);
                let flat = |what: &str, v: &[Vec<f32>]| -> Result<Vec<f32>> {
                    expect_len(what, v.len(), g)?;
                    for x in v {
                        expect_len(what, x.len(), d)?;
                    }
                    Ok(v.concat())
                };
                expect_len(
                    "the short-conv weight",
                    w.conv_weight.len(),
                    g * d * cfg.kernel_size,
                )?;
                DeviceWeights::Paper {
                    w: backend.upload(&wcat)?,
                    bias: backend.upload(&bias)?,
                    norm1: backend.upload(&flat("norm1", &w.norm1)?)?,
                    norm2: backend.upload(&flat("norm2", &w.norm2)?)?,
                    conv_w: backend.upload(&w.conv_weight)?,
                    conv_norm: backend.upload(&flat("short_conv.norms", &w.conv_norms)?)?,
                }
            }
            (LayerWeights::V41(w), Variant::V41) => {
                expect_len("wkv", w.wkv.len(), (g + 1) * d * e)?;
                expect_len("q_weight", w.q_weight.len(), g * d)?;
                expect_len("k_weight", w.k_weight.len(), g * d)?;
                let wqk: Vec<f32> = w
                    .q_weight
                    .iter()
                    .zip(&w.k_weight)
                    .map(|(q, k)| q * k)
                    .collect();
                DeviceWeights::V41 {
                    w: backend.upload(&w.wkv)?,
                    wqk: backend.upload(&wqk)?,
                }
            }
            _ => {
                return Err(engram_core::EngramError::config(
                    "variant",
                    "weights are for the other variant",
                )
                .into())
            }
        };
        Ok(Self {
            backend: backend.clone(),
            cfg,
            layer_id,
            weights,
            lock: Mutex::new(()),
        })
    }
}
