//! `engram cache-replay`: the hot-row cache's hit rate on real text, against its size.
//!
//! Each text file is tokenized with the model's tokenizer (no special tokens) and hashed
//! as one sequence with the model's Engram config, as the runtime hashes a prompt; the
//! rows of every Engram layer are then gathered, `--step-tokens` tokens at a time (one
//! gather per step, as the runtime fetches a step's rows), through a
//! [`CachedStore`] of each size, the files one after another with the cache kept across
//! them (one server, many documents). The cache is the runtime's, in front of a store of
//! the table's shape that returns constant rows (hits do not depend on the values, and
//! the rows are kept at the width the real table's would be: 2 bytes a value for bf16 and
//! V4.1 tables, 4 otherwise). Sizes are fractions of the table's stored bytes; the rows
//! that fit also pay [`ENTRY_OVERHEAD_BYTES`] each.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use engram_core::checkpoint::{table_spec_from_header, SafetensorsHeader};
use engram_core::config::EngramConfig;
use engram_core::dtype::RowDtype;
use engram_core::error::Result as EngramResult;
use engram_core::hashing::{EngramHasher, NgramHasher};
use engram_core::primes::table_layouts;
use engram_core::table::TableStore;
use engram_cpu::table::hot_cache::ENTRY_OVERHEAD_BYTES;
use engram_cpu::table::CachedStore;
use rayon::prelude::*;
use serde::Serialize;

use crate::TokenizerContext;

/// What `engram cache-replay` takes.
#[derive(Clone, Debug, clap::Args)]
pub struct ReplayArgs {
    /// The model directory: config.json with an Engram config, tokenizer.json, and the
    /// safetensors file(s) holding the tables (only their headers are read).
    #[arg(long)]
    pub model: PathBuf,
    /// Text files, each hashed as one sequence; a directory stands for every file in it
    /// (sorted by name, not recursive).
    #[arg(required = true)]
    pub text: Vec<PathBuf>,
    /// Cache sizes, in percent of each table's stored bytes.
    #[arg(long, value_delimiter = ',', default_values_t = [1.0, 5.0, 20.0])]
    pub percent: Vec<f64>,
    /// Tokens per step: one step's rows are one gather.
    #[arg(long, default_value_t = 512)]
    pub step_tokens: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The hit rates of one run.
#[derive(Clone, Debug, Serialize)]
pub struct ReplayReport {
    pub model: PathBuf,
    pub files: usize,
    pub tokens: u64,
    pub step_tokens: usize,
    pub layers: Vec<LayerReplay>,
}

/// One Engram layer's table and the cache sizes replayed in front of it.
#[derive(Clone, Debug, Serialize)]
pub struct LayerReplay {
    pub layer_id: usize,
    pub table_rows: u64,
    pub table_bytes: u64,
    pub dtype: String,
    pub lookups: u64,
    /// Rows looked up at least once: every first lookup misses, whatever the size.
    pub distinct_rows: u64,
    /// The hit rate of a cache that keeps every row (`1 - distinct / lookups`).
    pub unbounded_hit_rate: f64,
    pub sizes: Vec<SizeReplay>,
}

#[derive(Clone, Debug, Serialize)]
pub struct SizeReplay {
    pub percent_of_table: f64,
    pub cache_bound_bytes: u64,
    /// Rows the bound holds at most (row bytes in the cache plus the per-row overhead).
    pub rows_held_at_most: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub hit_rate: f64,
    /// The cache's size at the end.
    pub cache_bytes: u64,
}

/// A store of a table's shape whose rows are constant: bf16 values (zero) for tables the
/// cache keeps at 2 bytes a value, otherwise values that are not bf16 (kept at 4).
struct ShapeStore {
    name: String,
    rows: u64,
    width: usize,
    dtype: RowDtype,
}

impl TableStore for ShapeStore {
    fn name(&self) -> &str {
        &self.name
    }
    fn num_rows(&self) -> u64 {
        self.rows
    }
    fn width(&self) -> usize {
        self.width
    }
    fn dtype(&self) -> RowDtype {
        self.dtype
    }
    fn gather_f32(&self, row_ids: &[u64], out: &mut [f32]) -> EngramResult<()> {
        self.check_gather(row_ids, out.len())?;
        let value = match self.dtype {
            RowDtype::BF16 | RowDtype::F8E4M3Scaled => 0.0,
            _ => f32::from_bits(0x3f80_0001),
        };
        out.fill(value);
        Ok(())
    }
}

/// The files `paths` name: files as given, directories as their files, sorted.
fn text_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut inner: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("cannot list {}", p.display()))?
                .map(|e| e.map(|e| e.path()))
                .collect::<std::io::Result<_>>()
                .with_context(|| format!("cannot list {}", p.display()))?;
            inner.retain(|f| f.is_file());
            inner.sort();
            files.extend(inner);
        } else if p.is_file() {
            files.push(p.clone());
        } else {
            bail!("{}: no such file or directory", p.display());
        }
    }
    if files.is_empty() {
        bail!("no text files in {paths:?}");
    }
    Ok(files)
}

/// The dtype of layer `layout`'s table, from the first safetensors file in `dir` that
/// holds it (headers only).
fn table_dtype(
    dir: &Path,
    cfg: &EngramConfig,
    layout: &engram_core::primes::LayerTableLayout,
) -> Result<RowDtype> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    for f in &files {
        let header = SafetensorsHeader::read_file(f)?;
        if let Ok(spec) = table_spec_from_header(&header, cfg, layout) {
            return Ok(spec.dtype);
        }
    }
    bail!(
        "{}: no safetensors file holds the table of Engram layer {}",
        dir.display(),
        layout.layer_id
    )
}

/// Replays the row ids of the texts through caches of each size.
pub fn cache_replay(args: &ReplayArgs) -> Result<ReplayReport> {
    if args.step_tokens == 0 {
        bail!("--step-tokens must be at least 1");
    }
    if let Some(bad) = args.percent.iter().find(|p| !(**p > 0.0 && **p <= 100.0)) {
        bail!("--percent {bad}: a cache size is in (0, 100] percent of the table");
    }
    let config_path = args.model.join("config.json");
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&config_path)
            .with_context(|| format!("cannot read {}", config_path.display()))?,
    )
    .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
    let cfg = EngramConfig::from_hf_config(&config)
        .with_context(|| format!("{}: the Engram config", config_path.display()))?
        .ok_or_else(|| anyhow!("{}: no Engram config", config_path.display()))?;
    let files = text_files(&args.text)?;
    let ctx = TokenizerContext::load(&args.model.join("tokenizer.json"))?;
    let pad = ctx.compression.compress_id(cfg.hash.pad_id, 0)?;
    let hasher = EngramHasher::new(&cfg.hash, ctx.compression.compressed_vocab_size(), pad)?;
    let heads = hasher.heads();

    let mut sequences = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("cannot read {} as UTF-8 text", f.display()))?;
        let ids = ctx
            .encode(&text)
            .with_context(|| format!("cannot tokenize {}", f.display()))?;
        sequences.push(
            ctx.compression
                .compress(&ids)
                .with_context(|| format!("{}", f.display()))?,
        );
    }
    let tokens: u64 = sequences.iter().map(|s| s.len() as u64).sum();

    let layouts = table_layouts(&cfg.hash);
    let mut layers = Vec::new();
    for (l, layout) in layouts.iter().enumerate() {
        let dtype = table_dtype(&args.model, &cfg, layout)?;
        let mut rows_per_file = Vec::new();
        for seq in &sequences {
            let mut rows = vec![0u64; seq.len() * heads];
            hasher.hash_sequence(l, seq, None, true, &mut rows)?;
            rows_per_file.push(rows);
        }
        let store: Arc<dyn TableStore> = Arc::new(ShapeStore {
            name: format!("layer {} table (shape only)", layout.layer_id),
            rows: layout.total_rows,
            width: cfg.head_dim,
            dtype,
        });
        let table_bytes = layout.total_rows * store.row_bytes() as u64;
        let mut seen = vec![false; layout.total_rows as usize];
        let mut distinct = 0u64;
        for &r in rows_per_file.iter().flatten() {
            if !std::mem::replace(&mut seen[r as usize], true) {
                distinct += 1;
            }
        }
        let lookups = tokens * heads as u64;
        let step = args.step_tokens * heads;
        let sizes = args
            .percent
            .par_iter()
            .map(|&pct| -> Result<SizeReplay> {
                let bound = (table_bytes as f64 * pct / 100.0) as u64;
                let cache = CachedStore::new(store.clone(), bound);
                let mut out = vec![0f32; step * cfg.head_dim];
                for rows in &rows_per_file {
                    for chunk in rows.chunks(step) {
                        cache.gather_f32(chunk, &mut out[..chunk.len() * cfg.head_dim])?;
                    }
                }
                let c = cache.counters();
                Ok(SizeReplay {
                    percent_of_table: pct,
                    cache_bound_bytes: bound,
                    rows_held_at_most: bound / CachedStore::row_weight(store.as_ref()),
                    cache_hits: c.cache_hits,
                    cache_misses: c.cache_misses,
                    hit_rate: c.hit_rate(),
                    cache_bytes: c.cache_bytes,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        layers.push(LayerReplay {
            layer_id: layout.layer_id,
            table_rows: layout.total_rows,
            table_bytes,
            dtype: dtype.to_string(),
            lookups,
            distinct_rows: distinct,
            unbounded_hit_rate: if lookups == 0 {
                0.0
            } else {
                1.0 - distinct as f64 / lookups as f64
            },
            sizes,
        });
    }
    Ok(ReplayReport {
        model: args.model.clone(),
        files: files.len(),
        tokens,
        step_tokens: args.step_tokens,
        layers,
    })
}

impl ReplayReport {
    /// The report as a Markdown table (as docs/benchmarks-e2e.md carries it).
    pub fn to_text(&self) -> String {
        let mut s = format!(
            "{} files, {} tokens, {} tokens a step; per-row cache overhead {} bytes\n\n",
            self.files, self.tokens, self.step_tokens, ENTRY_OVERHEAD_BYTES
        );
        s += "| layer | cache, % of table | cache bound | rows held at most | hits | misses | hit rate |\n";
        s += "|---|---|---|---|---|---|---|\n";
        let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64);
        for l in &self.layers {
            for z in &l.sizes {
                s += &format!(
                    "| {} | {}% | {} | {} ({:.2}% of rows) | {} | {} | {:.1}% |\n",
                    l.layer_id,
                    z.percent_of_table,
                    mib(z.cache_bound_bytes),
                    z.rows_held_at_most,
                    100.0 * z.rows_held_at_most as f64 / l.table_rows as f64,
                    z.cache_hits,
                    z.cache_misses,
                    100.0 * z.hit_rate
                );
            }
            s += &format!(
                "| {} | every row kept | - | {} rows seen | {} | {} | {:.1}% |\n",
                l.layer_id,
                l.distinct_rows,
                l.lookups - l.distinct_rows,
                l.distinct_rows,
                100.0 * l.unbounded_hit_rate
            );
        }
        s += &format!(
            "\ntables: {}\n",
            self.layers
                .iter()
                .map(|l| format!(
                    "layer {} {} rows {} ({})",
                    l.layer_id,
                    l.table_rows,
                    l.dtype,
                    mib(l.table_bytes)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
        s
    }
}
