//! Loading Engram layer weights from safetensors, with every tensor's name, dtype and
//! shape checked against the config before any element is read.
//!
//! Names follow the original module's state_dict under `layers.{L}.engram.` (SPEC
//! sections 6 and 7). The table itself is described by a [`TableSpec`]; backends open it
//! their own way (in RAM, memory-mapped, on a device).

use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::config::{EngramConfig, Variant};
use crate::dtype::{
    bf16_bits_to_f32, dequant_f8_row, e8m0_to_f32, f16_bits_to_f32, f8e4m3_to_f32, RowDtype,
};
use crate::error::{EngramError, Result};
use crate::primes::LayerTableLayout;
use crate::table::DenseTable;

/// Tensor-name prefix of Engram layer `layer_id`.
pub fn layer_prefix(layer_id: usize) -> String {
    format!("layers.{layer_id}.engram.")
}

/// A parsed safetensors buffer and the file it came from (for messages).
pub struct Checkpoint<'a> {
    path: PathBuf,
    st: SafeTensors<'a>,
    metadata: std::collections::HashMap<String, String>,
}

impl<'a> Checkpoint<'a> {
    /// Parses the header and checks that every tensor lies inside `bytes`.
    pub fn parse(path: impl Into<PathBuf>, bytes: &'a [u8]) -> Result<Self> {
        let path = path.into();
        let st = SafeTensors::deserialize(bytes).map_err(|e| {
            EngramError::file(
                &path,
                format!("not a valid safetensors file (truncated or corrupt?): {e:?}"),
            )
        })?;
        let metadata = SafeTensors::read_metadata(bytes)
            .ok()
            .and_then(|(_, m)| m.metadata().clone())
            .unwrap_or_default();
        Ok(Self { path, st, metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensors(&self) -> &SafeTensors<'a> {
        &self.st
    }

    /// The string metadata value `key`, parsed as JSON.
    pub fn metadata_json(&self, key: &str) -> Result<Option<Value>> {
        let Some(raw) = self.metadata.get(key) else {
            return Ok(None);
        };
        serde_json::from_str(raw).map(Some).map_err(|e| {
            EngramError::file(
                &self.path,
                format!("metadata `{key}` is not valid JSON: {e}"),
            )
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.st.tensor(name).is_ok()
    }

    /// The tensor `name`, which must exist with one of `dtypes` and exactly `shape`.
    pub fn expect(
        &self,
        name: &str,
        dtypes: &[Dtype],
        shape: &[usize],
    ) -> Result<safetensors::tensor::TensorView<'a>> {
        let view = self
            .st
            .tensor(name)
            .map_err(|_| EngramError::tensor(&self.path, name, "missing"))?;
        if !dtypes.contains(&view.dtype()) {
            return Err(EngramError::tensor(
                &self.path,
                name,
                format!("dtype {:?}, expected {}", view.dtype(), dtype_list(dtypes)),
            ));
        }
        if view.shape() != shape {
            return Err(EngramError::tensor(
                &self.path,
                name,
                format!("shape {:?}, expected {:?}", view.shape(), shape),
            ));
        }
        Ok(view)
    }

    /// A float tensor (F32, BF16 or F16) of exactly `shape`, as f32.
    pub fn f32_tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let view = self.expect(name, &[Dtype::F32, Dtype::BF16, Dtype::F16], shape)?;
        Ok(to_f32(view.dtype(), view.data()))
    }

    /// An integer tensor (I64 or I32) of exactly `shape`.
    pub fn i64_tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<i64>> {
        let view = self.expect(name, &[Dtype::I64, Dtype::I32], shape)?;
        Ok(match view.dtype() {
            Dtype::I64 => view
                .data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            _ => view
                .data()
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as i64)
                .collect(),
        })
    }

    /// Shape of tensor `name`, or an error naming it.
    pub fn shape_of(&self, name: &str) -> Result<Vec<usize>> {
        self.st
            .tensor(name)
            .map(|v| v.shape().to_vec())
            .map_err(|_| EngramError::tensor(&self.path, name, "missing"))
    }
}

fn dtype_list(dtypes: &[Dtype]) -> String {
    dtypes
        .iter()
        .map(|d| format!("{d:?}"))
        .collect::<Vec<_>>()
        .join(" or ")
}

/// Little-endian float bytes to f32.
pub fn to_f32(dtype: Dtype, data: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| bf16_bits_to_f32(u16::from_le_bytes([b[0], b[1]])))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]])))
            .collect(),
        Dtype::F8_E4M3 => data.iter().map(|&b| f8e4m3_to_f32(b)).collect(),
        Dtype::F8_E8M0 => data.iter().map(|&b| e8m0_to_f32(b)).collect(),
        other => unreachable!("to_f32 called on {other:?}"),
    }
}

/// Where a layer's table lives in a checkpoint, checked against the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableSpec {
    pub layer_id: usize,
    pub tensor: String,
    /// V4.1: the E8M0 scales, one per 32 columns.
    pub scale_tensor: Option<String>,
    pub dtype: RowDtype,
    pub rows: u64,
    pub width: usize,
}

/// Finds and checks the table of layer `layer_id`: rows must equal the sum of the layer's
/// primes and width the head dim; a stored offsets tensor must equal the computed one.
pub fn table_spec(
    ck: &Checkpoint<'_>,
    cfg: &EngramConfig,
    layout: &LayerTableLayout,
) -> Result<TableSpec> {
    let p = layer_prefix(layout.layer_id);
    let rows = layout.total_rows as usize;
    let width = cfg.head_dim;
    match cfg.variant {
        Variant::Paper => {
            let name = format!("{p}multi_head_embedding.embedding.weight");
            let view = ck.expect(
                &name,
                &[Dtype::F32, Dtype::BF16, Dtype::F16],
                &[rows, width],
            )?;
            let offsets_name = format!("{p}multi_head_embedding.offsets");
            if ck.contains(&offsets_name) {
                let stored = ck.i64_tensor(&offsets_name, &[layout.offsets.len()])?;
                let computed: Vec<i64> = layout.offsets.iter().map(|&o| o as i64).collect();
                if stored != computed {
                    return Err(EngramError::tensor(
                        ck.path(),
                        offsets_name,
                        format!("offsets {stored:?} differ from the config's primes, which give {computed:?}"),
                    ));
                }
            }
            let dtype = match view.dtype() {
                Dtype::F32 => RowDtype::F32,
                Dtype::BF16 => RowDtype::BF16,
                _ => RowDtype::F16,
            };
            Ok(TableSpec {
                layer_id: layout.layer_id,
                tensor: name,
                scale_tensor: None,
                dtype,
                rows: layout.total_rows,
                width,
            })
        }
        Variant::V41 => {
            let name = format!("{p}embed.weight");
            let scale = format!("{p}embed.scale");
            ck.expect(&name, &[Dtype::F8_E4M3], &[rows, width])?;
            ck.expect(&scale, &[Dtype::F8_E8M0], &[rows, width.div_ceil(32)])?;
            Ok(TableSpec {
                layer_id: layout.layer_id,
                tensor: name,
                scale_tensor: Some(scale),
                dtype: RowDtype::F8E4M3Scaled,
                rows: layout.total_rows,
                width,
            })
        }
    }
}

/// Reads a whole table into RAM as f32 (reference math and small checkpoints).
pub fn load_dense_table(ck: &Checkpoint<'_>, spec: &TableSpec) -> Result<DenseTable> {
    let name = format!("{}:{}", ck.path().display(), spec.tensor);
    let view = ck
        .st
        .tensor(&spec.tensor)
        .map_err(|_| EngramError::tensor(ck.path(), &spec.tensor, "missing"))?;
    let data = match &spec.scale_tensor {
        None => to_f32(view.dtype(), view.data()),
        Some(scale) => {
            let scales = ck
                .st
                .tensor(scale)
                .map_err(|_| EngramError::tensor(ck.path(), scale, "missing"))?;
            let (w, sw) = (spec.width, spec.width.div_ceil(32));
            let mut out = vec![0f32; spec.rows as usize * w];
            for ((dst, v), s) in out
                .chunks_exact_mut(w)
                .zip(view.data().chunks_exact(w))
                .zip(scales.data().chunks_exact(sw))
            {
                dequant_f8_row(v, s, dst);
            }
            out
        }
    };
    DenseTable::new(name, spec.width, data)
}

/// Paper-variant weights of one layer, as f32 (SPEC section 6).
#[derive(Clone, Debug)]
pub struct PaperWeights {
    /// `[hc_mult][D * E]`, row-major `[D, E]`.
    pub key_weight: Vec<Vec<f32>>,
    pub key_bias: Vec<Vec<f32>>,
    /// `[D * E]`.
    pub value_weight: Vec<f32>,
    pub value_bias: Vec<f32>,
    pub norm1: Vec<Vec<f32>>,
    pub norm2: Vec<Vec<f32>>,
    /// `[hc_mult * D, kernel_size]` (the middle dimension of 1 dropped).
    pub conv_weight: Vec<f32>,
    pub conv_norms: Vec<Vec<f32>>,
}

/// V4.1 weights of one layer, dequantized to f32 (SPEC section 7).
#[derive(Clone, Debug)]
pub struct V41Weights {
    /// `[(hc_mult + 1) * D, E]`: hc_mult keys, then the value.
    pub wkv: Vec<f32>,
    /// `[hc_mult, D]`, bf16 values.
    pub q_weight: Vec<f32>,
    pub k_weight: Vec<f32>,
}

/// The non-table weights of one Engram layer.
#[derive(Clone, Debug)]
pub enum LayerWeights {
    Paper(PaperWeights),
    V41(V41Weights),
}

/// Loads and checks the non-table weights of layer `layer_id`.
pub fn load_layer_weights(
    ck: &Checkpoint<'_>,
    cfg: &EngramConfig,
    layer_id: usize,
) -> Result<LayerWeights> {
    let p = layer_prefix(layer_id);
    let (g, d, e) = (cfg.hc_mult, cfg.hidden_size, cfg.embed_dim());
    match cfg.variant {
        Variant::Paper => {
            let per_branch = |stem: &str, shape: &[usize]| -> Result<Vec<Vec<f32>>> {
                (0..g)
                    .map(|h| ck.f32_tensor(&format!("{p}{stem}.{h}.weight"), shape))
                    .collect()
            };
            let key_bias = (0..g)
                .map(|h| ck.f32_tensor(&format!("{p}key_projs.{h}.bias"), &[d]))
                .collect::<Result<_>>()?;
            Ok(LayerWeights::Paper(PaperWeights {
                key_weight: per_branch("key_projs", &[d, e])?,
                key_bias,
                value_weight: ck.f32_tensor(&format!("{p}value_proj.weight"), &[d, e])?,
                value_bias: ck.f32_tensor(&format!("{p}value_proj.bias"), &[d])?,
                norm1: per_branch("norm1", &[d])?,
                norm2: per_branch("norm2", &[d])?,
                conv_weight: ck.f32_tensor(
                    &format!("{p}short_conv.conv.weight"),
                    &[g * d, 1, cfg.kernel_size],
                )?,
                conv_norms: per_branch("short_conv.norms", &[d])?,
            }))
        }
        Variant::V41 => {
            let rows = (g + 1) * d;
            let wname = format!("{p}wkv.weight");
            let sname = format!("{p}wkv.scale");
            let w = ck.expect(&wname, &[Dtype::F8_E4M3], &[rows, e])?;
            let (sr, sc) = (rows.div_ceil(32), e.div_ceil(32));
            let s = ck.expect(&sname, &[Dtype::F8_E8M0], &[sr, sc])?;
            let scales: Vec<f32> = s.data().iter().map(|&b| e8m0_to_f32(b)).collect();
            let wkv = w
                .data()
                .iter()
                .enumerate()
                .map(|(i, &b)| f8e4m3_to_f32(b) * scales[(i / e / 32) * sc + (i % e) / 32])
                .collect();
            let bf16_only = [Dtype::BF16];
            let q = ck.expect(&format!("{p}q_weight"), &bf16_only, &[g, d])?;
            let k = ck.expect(&format!("{p}k_weight"), &bf16_only, &[g, d])?;
            Ok(LayerWeights::V41(V41Weights {
                wkv,
                q_weight: to_f32(Dtype::BF16, q.data()),
                k_weight: to_f32(Dtype::BF16, k.data()),
            }))
        }
    }
}
