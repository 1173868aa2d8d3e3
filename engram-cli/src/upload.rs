//! `engram upload --model DIR --store URL`: loads a checkpoint's Engram tables into a
//! Redis Cluster ([`engram_redis`]), for hosts that read them from there
//! (`ENGRAM_TABLES=redis://...`). Resumable: blocks already in the store unchanged are
//! skipped, so a second run after an interruption, or after a node came back empty,
//! writes only what is missing.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use engram_core::checkpoint::{layer_prefix, table_spec_from_header, SafetensorsHeader};
use engram_core::primes::table_layouts;
use engram_redis::{upload_layer, ClusterUrl, RedisCluster, UploadReport, DEFAULT_BLOCK_ROWS};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::inspect::{find_config, weight_files};

#[derive(clap::Args, Debug)]
pub struct UploadArgs {
    /// The checkpoint: a model directory (config.json and safetensors) or one file.
    #[arg(long)]
    pub model: PathBuf,
    /// The store: redis://host:port[,host:port...] (any nodes of the cluster).
    #[arg(long)]
    pub store: String,
    /// Rows per block (one key each).
    #[arg(long, default_value_t = DEFAULT_BLOCK_ROWS)]
    pub block_rows: u32,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// What the upload did, per layer.
#[derive(Debug, Serialize)]
pub struct UploadSummary {
    pub store: String,
    pub shards: Vec<String>,
    pub layers: Vec<LayerUpload>,
}

#[derive(Debug, Serialize)]
pub struct LayerUpload {
    pub layer_id: usize,
    pub tensor: String,
    #[serde(flatten)]
    pub report: UploadReport,
}

impl UploadSummary {
    pub fn to_text(&self) -> String {
        let mut out = format!(
            "store {} ({} shards: {})\n",
            self.store,
            self.shards.len(),
            self.shards.join(", ")
        );
        for l in &self.layers {
            let r = &l.report;
            let _ = writeln!(
                out,
                "layer {} `{}`: {} blocks, {} written ({} bytes), {} already there",
                l.layer_id, l.tensor, r.blocks, r.written, r.bytes_written, r.skipped
            );
        }
        out
    }
}

pub fn upload(args: &UploadArgs) -> Result<UploadSummary> {
    let url: ClusterUrl = args
        .store
        .parse()
        .map_err(|e| anyhow!("--store {}: {e}", args.store))?;
    let files = weight_files(&args.model)?;
    let headers = files
        .iter()
        .map(|f| SafetensorsHeader::read_file(f).map(Some))
        .collect::<engram_core::Result<Vec<_>>>()?;
    let (cfg, _) = find_config(&args.model, &headers)?;
    let cluster = RedisCluster::connect(url).with_context(|| format!("--store {}", args.store))?;
    let mut work = Vec::new();
    for layout in table_layouts(&cfg.hash) {
        let prefix = layer_prefix(layout.layer_id);
        let header = headers
            .iter()
            .flatten()
            .find(|h| h.names().iter().any(|n| n.starts_with(&prefix)))
            .ok_or_else(|| {
                anyhow!(
                    "{}: no tensor named `{prefix}*`: Engram layer {} has no weights",
                    args.model.display(),
                    layout.layer_id
                )
            })?;
        let spec = table_spec_from_header(header, &cfg, &layout)?;
        work.push((layout, header, spec));
    }
    let block_rows = args.block_rows.max(1) as u64;
    let total: u64 = work
        .iter()
        .map(|(_, _, s)| s.rows.div_ceil(block_rows))
        .sum();
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg:12} [{bar:40}] {pos}/{len} blocks {per_sec} eta {eta}")
            .expect("valid template"),
    );
    let mut layers = Vec::new();
    for (layout, header, spec) in &work {
        bar.set_message(format!("layer {}", layout.layer_id));
        let report = upload_layer(&cluster, header, &cfg, layout, spec, args.block_rows, |n| {
            bar.inc(n)
        })?;
        layers.push(LayerUpload {
            layer_id: layout.layer_id,
            tensor: spec.tensor.clone(),
            report,
        });
    }
    bar.finish_and_clear();
    Ok(UploadSummary {
        store: args.store.clone(),
        shards: cluster.shards(),
        layers,
    })
}
