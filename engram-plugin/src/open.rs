//! Opening a runtime from what a user has on disk: a model directory (config.json with
//! an Engram config, tokenizer.json, safetensors shards) or one weights file.
//!
//! Tables are memory-mapped by default and never copied onto the host's device: a table
//! far larger than RAM opens in constant time and pages in only the rows looked up.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use engram_core::checkpoint::{layer_prefix, load_layer_weights, Checkpoint, SafetensorsHeader};
use engram_core::compress::VocabCompression;
use engram_core::config::EngramConfig;
use engram_core::primes::table_layouts;
use engram_core::reference::ReferenceLayer;
use engram_core::EngramError;
use engram_cpu::layer::CpuLayer;
use engram_cpu::table::TableMode;
use engram_cpu::CpuTable;

use crate::error::{PluginError, Result};
use crate::runtime::{EngramRuntime, RuntimeLayer, RuntimeOptions};

/// Where the Engram layers compute.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendKind {
    #[default]
    Cpu,
    /// The core's reference math (plain loops, f64 accumulation): slow, for checking a
    /// host integration or another backend against.
    Reference,
    /// The CUDA device `ordinal` (rows are gathered on the host and uploaded per layer);
    /// opening fails with a clear error where there is no driver or device.
    Cuda { ordinal: usize },
}

#[derive(Clone, Debug)]
pub struct OpenOptions {
    pub runtime: RuntimeOptions,
    pub backend: BackendKind,
    /// Memory-map the tables (default) or read them into RAM.
    pub table_mode: TableMode,
    /// The tokenizer whose ids the host passes (default: `tokenizer.json` beside the weights).
    pub tokenizer: Option<PathBuf>,
    /// Overrides the config found on disk.
    pub config: Option<EngramConfig>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            runtime: RuntimeOptions::default(),
            backend: BackendKind::Cpu,
            table_mode: TableMode::Mmap,
            tokenizer: None,
            config: None,
        }
    }
}

impl EngramRuntime {
    /// Opens the Engram layers at `location` (a model directory or a safetensors file).
    /// `Ok(None)` when the model has no Engram config: the host then runs as without Engram.
    pub fn open(location: impl AsRef<Path>, options: OpenOptions) -> Result<Option<Self>> {
        let location = location.as_ref();
        let (dir, files) = weight_files(location)?;
        let cfg = match options.config.clone() {
            Some(cfg) => cfg,
            None => match find_config(location, &dir, &files)? {
                Some(cfg) => cfg,
                None => return Ok(None),
            },
        };
        let tokenizer = options
            .tokenizer
            .clone()
            .unwrap_or_else(|| dir.join("tokenizer.json"));
        let compression = Arc::new(VocabCompression::from_tokenizer_file(&tokenizer)?);
        let headers = files
            .iter()
            .map(SafetensorsHeader::read_file)
            .collect::<engram_core::Result<Vec<_>>>()?;

        let cuda = match options.backend {
            BackendKind::Cpu | BackendKind::Reference => None,
            BackendKind::Cuda { ordinal } => {
                Some(engram_cuda::CudaBackend::try_new(ordinal).map_err(|e| {
                    PluginError::Step(format!("the CUDA backend was asked for: {e}"))
                })?)
            }
        };
        let mut layers = Vec::new();
        for layout in table_layouts(&cfg.hash) {
            let prefix = layer_prefix(layout.layer_id);
            let file = headers
                .iter()
                .find(|h| h.names().iter().any(|n| n.starts_with(&prefix)))
                .map(|h| h.path().to_path_buf())
                .ok_or_else(|| {
                    PluginError::Engram(EngramError::file(
                        location,
                        format!("no tensor named `{prefix}*` in {} safetensors file(s): Engram layer {} has no weights", files.len(), layout.layer_id),
                    ))
                })?;
            let table = CpuTable::open_layer(&file, &cfg, &layout, options.table_mode)?;
            let weights = {
                let map = map_readonly(&file)?;
                let ck = Checkpoint::parse(&file, &map)?;
                load_layer_weights(&ck, &cfg, layout.layer_id)?
            };
            let layer: Arc<dyn engram_core::backend::EngramLayer> = match &cuda {
                None if options.backend == BackendKind::Reference => {
                    Arc::new(ReferenceLayer::new(cfg.clone(), layout.layer_id, weights)?)
                }
                None => Arc::new(CpuLayer::new(cfg.clone(), layout.layer_id, weights)?),
                Some(backend) => Arc::new(
                    engram_cuda::CudaLayer::new(backend, cfg.clone(), layout.layer_id, &weights)
                        .map_err(|e| {
                            PluginError::Step(format!("CUDA layer {}: {e}", layout.layer_id))
                        })?,
                ),
            };
            layers.push(RuntimeLayer {
                layer_id: layout.layer_id,
                table: Arc::new(table),
                layer,
            });
        }
        tracing::info!(layers = ?cfg.hash.layer_ids, variant = ?cfg.variant, "opened Engram runtime");
        EngramRuntime::from_parts(cfg, compression, layers, options.runtime).map(Some)
    }
}

/// The directory and the safetensors files at `location`.
fn weight_files(location: &Path) -> Result<(PathBuf, Vec<PathBuf>)> {
    let io = |e: std::io::Error| PluginError::Engram(EngramError::file(location, e));
    if location.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(location)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        Ok((location.to_path_buf(), files))
    } else if location.is_file() {
        let dir = location
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
        Ok((dir, vec![location.to_path_buf()]))
    } else {
        Err(PluginError::Engram(EngramError::file(
            location,
            "no such file or directory",
        )))
    }
}

/// The Engram config: `config.json` in the directory, else a file's `meta` metadata.
fn find_config(location: &Path, dir: &Path, files: &[PathBuf]) -> Result<Option<EngramConfig>> {
    let config_json = dir.join("config.json");
    if config_json.is_file() {
        let text = std::fs::read_to_string(&config_json)
            .map_err(|e| EngramError::file(&config_json, e))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| EngramError::file(&config_json, format!("not valid JSON: {e}")))?;
        return EngramConfig::from_hf_config(&value)
            .map_err(|e| PluginError::Engram(EngramError::file(&config_json, e)));
    }
    if location.is_file() {
        let header = SafetensorsHeader::read_file(&files[0])?;
        if let Some(meta) = header.metadata_json("meta")? {
            return Ok(Some(
                EngramConfig::from_golden_meta(&meta)
                    .map_err(|e| EngramError::file(location, e))?,
            ));
        }
    }
    Ok(None)
}

fn map_readonly(path: &Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).map_err(|e| EngramError::file(path, e))?;
    // SAFETY: the map is read-only and dropped before this function's caller returns;
    // Checkpoint::parse checks every tensor lies inside it before anything is read.
    unsafe { memmap2::Mmap::map(&file) }
        .map_err(|e| PluginError::Engram(EngramError::file(path, format!("cannot map: {e}"))))
}
