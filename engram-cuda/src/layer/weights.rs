//! [`CudaLayer::new`]: a layer's weights checked against its config and uploaded in the
//! layout the kernels read (the paper's projections concatenated; V4.1's `wkv`
//! dequantized and `q_weight * k_weight` folded).

use std::sync::Mutex;

use cudarc::driver::CudaSlice;
use engram_core::checkpoint::LayerWeights;
use engram_core::config::{EngramConfig, Variant};

use super::CudaLayer;
use crate::backend::CudaBackend;
use crate::error::Result;

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

impl CudaLayer {
    /// Uploads layer `layer_id`'s weights (checked against `cfg`).
    pub fn new(
        backend: &CudaBackend,
        cfg: EngramConfig,
        layer_id: usize,
        weights: &LayerWeights,
    ) -> Result<Self> {
        cfg.layer_index(layer_id)?;
        weights.check(&cfg)?;
        let (g, d, e) = (cfg.hc_mult, cfg.hidden_size, cfg.embed_dim());
        let weights = match (weights, cfg.variant) {
            (LayerWeights::Paper(w), Variant::Paper) => {
                let mut wcat = Vec::with_capacity((g + 1) * d * e);
                let mut bias = Vec::with_capacity((g + 1) * d);
                for h in 0..g {
                    wcat.extend_from_slice(&w.key_weight[h]);
                    bias.extend_from_slice(&w.key_bias[h]);
                }
                wcat.extend_from_slice(&w.value_weight);
                bias.extend_from_slice(&w.value_bias);
                DeviceWeights::Paper {
                    w: backend.upload(&wcat)?,
                    bias: backend.upload(&bias)?,
                    norm1: backend.upload(&w.norm1.concat())?,
                    norm2: backend.upload(&w.norm2.concat())?,
                    conv_w: backend.upload(&w.conv_weight)?,
                    conv_norm: backend.upload(&w.conv_norms.concat())?,
                }
            }
            (LayerWeights::V41(w), Variant::V41) => {
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
