//! Engram layers to and from an ordinary checkpoint file (`engram.safetensors`, the
//! names of docs/algorithm.md section 10, f32), the file the runtime and the patched
//! mistral.rs serve. Files are written under a temporary name and renamed.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

use anyhow::{anyhow, ensure, Context, Result};
use candle_core::{Device, Tensor};
use engram_core::checkpoint::layer_prefix;
use engram_core::primes::table_layouts;

use super::layer::{dense_shapes, DenseWeights, SparseTable};
use super::model::{EngramLayerParts, EngramParts};

const TABLE: &str = "multi_head_embedding.embedding.weight";
const OFFSETS: &str = "multi_head_embedding.offsets";

/// Saves candle tensors to `path` through `path.partial` and a rename.
pub fn save_atomic(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    let partial = path.with_extension("safetensors.partial");
    candle_core::safetensors::save(tensors, &partial)
        .with_context(|| format!("cannot write {}", partial.display()))?;
    fs::rename(&partial, path)
        .with_context(|| format!("cannot move {} to {}", partial.display(), path.display()))
}

/// The checkpoint tensors of every Engram layer.
pub fn engram_tensors(parts: &EngramParts) -> Result<HashMap<String, Tensor>> {
    let layouts = table_layouts(&parts.cfg.hash);
    let mut out = HashMap::new();
    for (l, layout) in parts.layers.iter().zip(&layouts) {
        let p = layer_prefix(l.layer_id);
        let t = &l.table;
        out.insert(
            format!("{p}{TABLE}"),
            Tensor::from_slice(&t.data, (t.rows(), t.width), &Device::Cpu)?,
        );
        let offsets: Vec<i64> = layout.offsets.iter().map(|&o| o as i64).collect();
        let n = offsets.len();
        out.insert(
            format!("{p}{OFFSETS}"),
            Tensor::from_vec(offsets, n, &Device::Cpu)?,
        );
        for (name, var) in &l.dense.vars {
            out.insert(format!("{p}{name}"), var.as_tensor().clone());
        }
    }
    Ok(out)
}

/// Reads the Engram layers of `parts.cfg` from a checkpoint file into `parts` (which has
/// its hashing and no layers yet).
pub fn load_layers(parts: &mut EngramParts, file: &Path) -> Result<()> {
    let mut all = candle_core::safetensors::load(file, &Device::Cpu)
        .with_context(|| format!("cannot read {}", file.display()))?;
    let cfg = parts.cfg.clone();
    for layout in table_layouts(&cfg.hash) {
        let p = layer_prefix(layout.layer_id);
        let mut take = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let full = format!("{p}{name}");
            let t = all
                .remove(&full)
                .ok_or_else(|| anyhow!("{}: no tensor {full}", file.display()))?;
            ensure!(
                t.dims() == shape,
                "{}: tensor {full} has shape {:?}, expected {shape:?}",
                file.display(),
                t.dims()
            );
            Ok(t.to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
        let rows = layout.total_rows as usize;
        let data = take(TABLE, &[rows, cfg.head_dim])?;
        let mut dense = BTreeMap::new();
        for (name, shape) in dense_shapes(&cfg) {
            dense.insert(name.to_string(), take(name, &shape)?);
        }
        parts.layers.push(EngramLayerParts {
            layer_id: layout.layer_id,
            table: SparseTable {
                width: cfg.head_dim,
                data,
                accum: vec![0.0; rows],
            },
            dense: DenseWeights::new(&cfg, &dense)?,
        });
    }
    Ok(())
}
