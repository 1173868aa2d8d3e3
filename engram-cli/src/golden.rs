//! `engram golden`: runs every sample of a golden forward file through every layer and
//! compares hashes and outputs with the expected values the file holds: the original
//! implementation's outputs for the paper variant, values written from the formulas for
//! V4.1 (`tests/data/GOLDEN.md`). Hashes must match exactly, outputs within
//! [`PAPER_REL_TOL`] or the bf16 rule of [`V41_MAX_OFF_FRACTION`] (docs/algorithm.md
//! section 11).
//!
//! Format: `tests/data/GOLDEN.md`. The config comes from the file's metadata, so any
//! config of that format works, for both variants.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use engram_core::backend::{EngramLayer, Segment};
use engram_core::checkpoint::{load_dense_table, load_layer_weights, table_spec, Checkpoint};
use engram_core::config::{EngramConfig, Variant};
use engram_core::golden::GoldenSample;
use engram_core::hashing::{EngramHasher, NgramHasher};
use engram_core::reference::ReferenceLayer;
use engram_core::table::TableStore;
use engram_cpu::layer::CpuLayer;
use engram_cpu::CpuTable;
use half::bf16;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde::Serialize;

use engram_core::metrics::{bf16_distance, relative_error};

use crate::TokenizerContext;

/// Largest relative error ||out - ref|| / ||ref|| accepted for the paper variant.
pub const PAPER_REL_TOL: f64 = 1e-5;
/// V4.1: elements may differ by one bf16 ulp, at most this fraction of them.
pub const V41_MAX_OFF_FRACTION: f64 = 0.01;

/// Which implementation computes the layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GoldenBackend {
    /// The CPU backend: tables memory-mapped from the file, layers on a GEMM.
    Cpu,
    /// engram-core's reference loops (slow, the definition).
    Reference,
}

/// One (sample, layer) comparison.
#[derive(Clone, Debug, Serialize)]
pub struct GoldenRow {
    pub sample: usize,
    pub layer: usize,
    pub tokens: usize,
    pub hash_mismatches: usize,
    pub hash_total: usize,
    pub rel_err: f64,
    /// V4.1: elements that differ from the expected bf16 value at all, and the largest
    /// distance in bf16 ulps.
    pub elems_off: usize,
    pub max_ulp: u32,
    pub passed: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct GoldenReport {
    pub variant: Variant,
    pub rows: Vec<GoldenRow>,
}

impl GoldenReport {
    pub fn passed(&self) -> bool {
        !self.rows.is_empty() && self.rows.iter().all(|r| r.passed)
    }
}

struct LoadedLayer {
    table: Box<dyn TableStore>,
    layer: Box<dyn EngramLayer>,
}

/// Runs the golden file `file`; with `dump`, also writes what was computed.
pub fn run_golden(
    ctx: &TokenizerContext,
    file: &Path,
    backend: GoldenBackend,
    dump: Option<&Path>,
) -> Result<GoldenReport> {
    let bytes = std::fs::read(file).with_context(|| format!("{}: cannot read", file.display()))?;
    let ck = Checkpoint::parse(file, &bytes)?;
    let meta = ck.metadata_json("meta")?.ok_or_else(|| {
        anyhow!(
            "{}: no `meta` metadata: not a golden forward file",
            file.display()
        )
    })?;
    let cfg = EngramConfig::from_golden_meta(&meta)
        .with_context(|| format!("{}: metadata `meta`", file.display()))?;
    let samples = meta["samples"].as_array().map_or(0, Vec::len);
    if samples == 0 {
        bail!("{}: metadata lists no samples", file.display());
    }
    let pad = ctx.compression.compress_id(cfg.hash.pad_id, 0)?;
    let hasher = EngramHasher::new(&cfg.hash, ctx.compression.compressed_vocab_size(), pad)?;

    let layers = hasher
        .layers()
        .iter()
        .map(|lh| load_layer(&ck, &cfg, lh.layer_id, &lh.layout, backend))
        .collect::<Result<Vec<_>>>()?;

    let (g, d, heads) = (cfg.hc_mult, cfg.hidden_size, cfg.heads_per_layer());
    let mut rows = Vec::new();
    let mut dumped: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for i in 0..samples {
        let GoldenSample {
            ids: input_ids,
            hidden,
            dead,
        } = GoldenSample::read(&ck, &cfg, i)?;
        let t = input_ids.len();
        let compressed = ctx.compression.compress(&input_ids)?;
        for (l, loaded) in layers.iter().enumerate() {
            let layer_id = hasher.layers()[l].layer_id;
            let with_offsets = cfg.variant == Variant::V41;
            let mut computed_rows = vec![0u64; t * heads];
            hasher.hash_sequence(
                l,
                &compressed,
                dead.as_deref(),
                with_offsets,
                &mut computed_rows,
            )?;
            let hash_name = match cfg.variant {
                Variant::Paper => format!("sample{i}.layer{layer_id}.hash_ids"),
                Variant::V41 => format!("sample{i}.layer{layer_id}.row_ids"),
            };
            let expected_rows = ck.i64_tensor(&hash_name, &[1, t, heads])?;
            let hash_mismatches = computed_rows
                .iter()
                .zip(&expected_rows)
                .filter(|(a, b)| **a as i64 != **b)
                .count();

            // The table is indexed with offsets added, whatever the file stores.
            let mut table_rows = computed_rows.clone();
            if !with_offsets {
                let offsets = &hasher.layers()[l].layout.offsets;
                for (r, o) in table_rows.iter_mut().zip(offsets.iter().cycle()) {
                    *r += o;
                }
            }
            let mut emb = vec![0f32; t * cfg.embed_dim()];
            loaded.table.gather_f32(&table_rows, &mut emb)?;
            let mut out = vec![0f32; t * g * d];
            loaded
                .layer
                .forward(
                    &hidden,
                    &emb,
                    dead.as_deref(),
                    &mut [Segment::fresh(t)],
                    &mut out,
                )
                .with_context(|| format!("sample {i}, layer {layer_id}"))?;

            let out_name = format!("sample{i}.layer{layer_id}.output");
            let expected = ck.f32_tensor(&out_name, &[1, t, g, d])?;
            let rel_err = relative_error(&out, &expected);
            let (elems_off, max_ulp) = bf16_distance(&out, &expected);
            let passed = hash_mismatches == 0
                && match cfg.variant {
                    Variant::Paper => rel_err <= PAPER_REL_TOL,
                    Variant::V41 => {
                        max_ulp <= 1
                            && (elems_off as f64) <= V41_MAX_OFF_FRACTION * out.len() as f64
                    }
                };
            rows.push(GoldenRow {
                sample: i,
                layer: layer_id,
                tokens: t,
                hash_mismatches,
                hash_total: computed_rows.len(),
                rel_err,
                elems_off,
                max_ulp,
                passed,
            });
            if dump.is_some() {
                let ids_bytes = computed_rows
                    .iter()
                    .flat_map(|&r| (r as i64).to_le_bytes())
                    .collect();
                dumped.push((hash_name, Dtype::I64, vec![1, t, heads], ids_bytes));
                let out_bytes = match cfg.variant {
                    Variant::Paper => (
                        Dtype::F32,
                        out.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    ),
                    Variant::V41 => (
                        Dtype::BF16,
                        out.iter()
                            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                            .collect(),
                    ),
                };
                dumped.push((out_name, out_bytes.0, vec![1, t, g, d], out_bytes.1));
            }
        }
    }
    if let Some(path) = dump {
        write_dump(path, &dumped, &meta)?;
    }
    Ok(GoldenReport {
        variant: cfg.variant,
        rows,
    })
}

fn load_layer(
    ck: &Checkpoint<'_>,
    cfg: &EngramConfig,
    layer_id: usize,
    layout: &engram_core::primes::LayerTableLayout,
    backend: GoldenBackend,
) -> Result<LoadedLayer> {
    let spec = table_spec(ck, cfg, layout)?;
    let weights = load_layer_weights(ck, cfg, layer_id)?;
    match backend {
        GoldenBackend::Cpu => Ok(LoadedLayer {
            table: Box::new(CpuTable::open_mmap(ck.path(), &spec)?),
            layer: Box::new(CpuLayer::new(cfg.clone(), layer_id, weights)?),
        }),
        GoldenBackend::Reference => Ok(LoadedLayer {
            table: Box::new(load_dense_table(ck, &spec)?),
            layer: Box::new(ReferenceLayer::new(cfg.clone(), layer_id, weights)?),
        }),
    }
}

fn write_dump(
    path: &Path,
    tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)],
    meta: &serde_json::Value,
) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            Ok((name.clone(), TensorView::new(*dtype, shape.clone(), data)?))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| anyhow!("cannot build dump tensors: {e:?}"))?;
    let metadata = std::collections::HashMap::from([("meta".to_string(), meta.to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), path)
        .map_err(|e| anyhow!("{}: cannot write dump: {e:?}", path.display()))
}

/// Human-readable lines, one per (sample, layer), then a verdict.
pub fn format_report(report: &GoldenReport) -> String {
    let mut s = String::new();
    for r in &report.rows {
        s += &format!(
            "sample {} layer {}: tokens {:>4}  hash mismatches {}/{}  rel err {:.3e}",
            r.sample, r.layer, r.tokens, r.hash_mismatches, r.hash_total, r.rel_err
        );
        if report.variant == Variant::V41 {
            s += &format!("  bf16 elems off {} (max {} ulp)", r.elems_off, r.max_ulp);
        }
        s += if r.passed { "  ok\n" } else { "  FAIL\n" };
    }
    s += if report.passed() { "PASS\n" } else { "FAIL\n" };
    s
}
