//! Opening a runtime from what a user has on disk: a model directory (config.json with
//! an Engram config, tokenizer.json, safetensors shards) or one weights file.
//!
//! Tables are memory-mapped by default and never copied onto the host's device: a table
//! far larger than RAM opens in constant time and pages in only the rows looked up.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use engram_core::checkpoint::{
    layer_prefix, load_layer_weights, table_spec_from_header, Checkpoint, LayerWeights,
    SafetensorsHeader,
};
use engram_core::compress::VocabCompression;
use engram_core::config::EngramConfig;
use engram_core::primes::{table_layouts, LayerTableLayout};
use engram_core::reference::ReferenceLayer;
use engram_core::table::TableStore;
use engram_core::EngramError;
use engram_cpu::layer::CpuLayer;
use engram_cpu::table::{open_layer_store, TableMode};
use engram_cuda::HostTable;

use crate::device::{CudaTables, DeviceRows};
use crate::error::{PluginError, Result};
use crate::hot_cache::{HotCache, HOT_CACHE_ENV};
use crate::remote;
use crate::runtime::{EngramRuntime, RuntimeLayer, RuntimeOptions};

/// Where the Engram layers compute.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendKind {
    #[default]
    Cpu,
    /// The core's reference math (plain loops, f64 accumulation): slow, for checking a
    /// host integration or another backend against.
    Reference,
    /// The CUDA device `ordinal`, tables placed as `tables` says (by default in host
    /// memory, each step's rows moved to the device by the prefetch thread); opening fails
    /// with a clear error where there is no driver or device.
    Cuda { ordinal: usize, tables: CudaTables },
}

impl std::str::FromStr for BackendKind {
    type Err = String;

    /// `cpu`, `reference`, `cuda` (device 0) or `cuda:N`; CUDA tables in pinned host
    /// memory (see [`CudaTables`] for the others).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let cuda = |ordinal| BackendKind::Cuda {
            ordinal,
            tables: CudaTables::default(),
        };
        match s {
            "cpu" => Ok(Self::Cpu),
            "reference" => Ok(Self::Reference),
            "cuda" => Ok(cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(ordinal)) => Ok(cuda(ordinal)),
                _ => Err("expected cpu, reference, cuda or cuda:N".into()),
            },
        }
    }
}

/// Selects the backend of [`OpenOptions::from_env`].
pub const BACKEND_ENV: &str = "ENGRAM_BACKEND";
/// Selects where the CUDA backend keeps the tables, for [`OpenOptions::from_env`].
pub const CUDA_TABLES_ENV: &str = "ENGRAM_CUDA_TABLES";
/// Selects how the tables are read on the host (`mmap`, `ram`, `disk`), or the
/// distributed store they are read from (`redis://host:port[,host:port...]`), for
/// [`OpenOptions::from_env`].
pub const TABLES_ENV: &str = "ENGRAM_TABLES";
/// `off` turns the prefetch thread off (each layer's rows are gathered when the layer
/// applies, as a synchronous read would), for [`OpenOptions::from_env`]; `on` is the
/// default. For measuring what the read-ahead saves.
pub const PREFETCH_ENV: &str = "ENGRAM_PREFETCH";

#[derive(Clone, Debug)]
pub struct OpenOptions {
    pub runtime: RuntimeOptions,
    pub backend: BackendKind,
    /// Memory-map the tables (default), read them into RAM, or read each step's rows
    /// from disk ([`TableMode::Disk`], for tables larger than RAM; CPU backend only).
    pub table_mode: TableMode,
    /// Read the tables from this Redis Cluster instead (`table_mode` is then unused;
    /// CPU backend only): see [`crate::remote`].
    pub remote_tables: Option<engram_redis::ClusterUrl>,
    /// The tokenizer whose ids the host passes (default: `tokenizer.json` beside the weights).
    pub tokenizer: Option<PathBuf>,
    /// Overrides the config found on disk.
    pub config: Option<EngramConfig>,
    /// A hot-row cache in RAM in front of each table (CPU and reference backends), of
    /// this size; `None` (default): rows are read from the table every time.
    pub hot_cache: Option<HotCache>,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            runtime: RuntimeOptions::default(),
            backend: BackendKind::Cpu,
            table_mode: TableMode::Mmap,
            remote_tables: None,
            tokenizer: None,
            config: None,
            hot_cache: None,
        }
    }
}

impl OpenOptions {
    /// The defaults, with the backend a host engine's user chose through the environment:
    /// `ENGRAM_TABLES` (`mmap`, `ram`, `disk`, `redis://...`), `ENGRAM_BACKEND` (`cpu`,
    /// `reference`, `cuda`, `cuda:N`) and, for CUDA,
    /// `ENGRAM_CUDA_TABLES` (`pinned-host`, `device`, `zero-copy`, `cache:ROWS`), and the
    /// hot-row cache from `ENGRAM_HOT_CACHE` (`2GiB`, `5%`, `off`: [`HotCache::parse`]).
    /// A value that does not parse is an error naming the variable, not a silent default.
    pub fn from_env() -> Result<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let setting = |name: &str, value: &str, reason: String| PluginError::Setting {
            name: name.into(),
            value: value.into(),
            reason,
        };
        let mut options = Self::default();
        if let Some(v) = var(TABLES_ENV) {
            if v.starts_with("redis://") {
                let url = v.parse().map_err(|r| setting(TABLES_ENV, &v, r))?;
                options.remote_tables = Some(url);
            } else {
                options.table_mode = v.parse().map_err(|r: String| {
                    setting(TABLES_ENV, &v, format!("{r}, or redis://host:port[,...]"))
                })?;
            }
        }
        if let Some(v) = var(BACKEND_ENV) {
            options.backend = v.parse().map_err(|r| setting(BACKEND_ENV, &v, r))?;
        }
        if let Some(v) = var(CUDA_TABLES_ENV) {
            let tables: CudaTables = v.parse().map_err(|r| setting(CUDA_TABLES_ENV, &v, r))?;
            match &mut options.backend {
                BackendKind::Cuda { tables: t, .. } => *t = tables,
                _ => {
                    return Err(setting(
                        CUDA_TABLES_ENV,
                        &v,
                        format!("only used by the CUDA backend; set {BACKEND_ENV}=cuda"),
                    ))
                }
            }
        }
        if let Some(v) = var(PREFETCH_ENV) {
            options.runtime.prefetch = match v.as_str() {
                "on" => true,
                "off" => false,
                _ => return Err(setting(PREFETCH_ENV, &v, "expected on or off".into())),
            };
        }
        if let Some(v) = var(HOT_CACHE_ENV) {
            options.hot_cache = HotCache::parse(&v).map_err(|r| setting(HOT_CACHE_ENV, &v, r))?;
            if options.hot_cache.is_some() && matches!(options.backend, BackendKind::Cuda { .. }) {
                return Err(setting(
                    HOT_CACHE_ENV,
                    &v,
                    "the CUDA backend has its own device cache (ENGRAM_CUDA_TABLES=cache:ROWS)"
                        .into(),
                ));
            }
        }
        Ok(options)
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
            BackendKind::Cuda { .. } if options.table_mode == TableMode::Disk => {
                return Err(PluginError::Setting {
                    name: TABLES_ENV.into(),
                    value: "disk".into(),
                    reason: "the disk tier reads rows for the CPU backend only; the CUDA backend takes mmap or ram".into(),
                })
            }
            BackendKind::Cuda { .. } if options.remote_tables.is_some() => {
                return Err(PluginError::Setting {
                    name: TABLES_ENV.into(),
                    value: "redis://...".into(),
                    reason: "tables in a Redis Cluster are read for the CPU backend only".into(),
                })
            }
            BackendKind::Cuda { ordinal, tables } => {
                let backend = engram_cuda::CudaBackend::try_new(ordinal).map_err(|source| {
                    PluginError::Cuda {
                        what: format!("the CUDA backend (device {ordinal}) was asked for"),
                        source,
                    }
                })?;
                Some((backend, tables))
            }
        };
        if cuda.is_some() && options.hot_cache.is_some() {
            return Err(PluginError::Setting {
                name: "OpenOptions::hot_cache".into(),
                value: format!("{:?}", options.hot_cache),
                reason: "the CUDA backend has its own device cache (CudaTables::Cache)".into(),
            });
        }
        let remote = options
            .remote_tables
            .as_ref()
            .map(remote::connect)
            .transpose()?;
        let layouts = table_layouts(&cfg.hash);
        let all_rows: u64 = layouts.iter().map(|l| l.total_rows).sum();
        let mut layers = Vec::new();
        for layout in layouts {
            let prefix = layer_prefix(layout.layer_id);
            let file = headers
                .iter()
                .find(|h| h.names().iter().any(|n| n.starts_with(&prefix)))
                .map(|h| h.path().to_path_buf())
                .ok_or_else(|| {
                    PluginError::Engram(EngramError::file(
                        location,
                        format!(
                            "no tensor named `{prefix}*` in {}: Engram layer {} has no weights \
                             (a checkpoint keeps them in engram.safetensors beside config.json)",
                            file_names(&files),
                            layout.layer_id
                        ),
                    ))
                })?;
            let weights = {
                let map = map_readonly(&file)?;
                let ck = Checkpoint::parse(&file, &map)?;
                load_layer_weights(&ck, &cfg, layout.layer_id)?
            };
            let layer = match &cuda {
                None => {
                    let table = match &remote {
                        Some(cluster) => remote::open_table(cluster, &file, &cfg, &layout)?,
                        None => open_layer_store(&file, &cfg, &layout, options.table_mode)?,
                    };
                    let stored = table.num_rows() * table.row_bytes() as u64;
                    let table: Arc<dyn TableStore> = match options.hot_cache {
                        Some(c) => {
                            HotCache::wrap(table, c.bytes_for(layout.total_rows, stored, all_rows))
                        }
                        None => table,
                    };
                    let layer: Arc<dyn engram_core::backend::EngramLayer> =
                        if options.backend == BackendKind::Reference {
                            Arc::new(ReferenceLayer::new(cfg.clone(), layout.layer_id, weights)?)
                        } else {
                            Arc::new(CpuLayer::new(cfg.clone(), layout.layer_id, weights)?)
                        };
                    RuntimeLayer::on_host(layout.layer_id, table, layer)
                }
                Some((backend, tables)) => cuda_layer(
                    backend,
                    *tables,
                    &cfg,
                    &layout,
                    &file,
                    options.table_mode,
                    &weights,
                )?,
            };
            layers.push(layer);
        }
        if options.table_mode == TableMode::Ram {
            let bytes: u64 = layers
                .iter()
                .map(|l| l.table.num_rows() * l.table.row_bytes() as u64)
                .sum();
            tracing::warn!(
                bytes,
                "Engram tables read into this process's memory: every process serving this checkpoint holds its own copy (ENGRAM_TABLES=mmap or disk share the page cache)"
            );
        }
        tracing::info!(layers = ?cfg.hash.layer_ids, variant = ?cfg.variant, "opened Engram runtime");
        EngramRuntime::from_parts(cfg, compression, layers, options.runtime).map(Some)
    }
}

/// A layer on the GPU: its table in host memory (mapped or read, as `mode` says) placed
/// for the device as `tables` says, its weights on the device.
fn cuda_layer(
    backend: &engram_cuda::CudaBackend,
    tables: CudaTables,
    cfg: &EngramConfig,
    layout: &LayerTableLayout,
    file: &Path,
    mode: TableMode,
    weights: &LayerWeights,
) -> Result<RuntimeLayer> {
    let layer_id = layout.layer_id;
    let on_gpu = |source: engram_cuda::CudaBackendError| PluginError::Cuda {
        what: format!("Engram layer {layer_id} on the GPU"),
        source,
    };
    let header = SafetensorsHeader::read_file(file)?;
    header.check_complete()?;
    let spec = table_spec_from_header(&header, cfg, layout)?;
    let mut host = HostTable::map_safetensors(&header, &spec).map_err(on_gpu)?;
    if mode == TableMode::Ram {
        host = HostTable::from_raw(
            format!("{}:{}", file.display(), spec.tensor),
            host.dtype(),
            host.width(),
            host.values(),
            host.scales(),
        )
        .map_err(on_gpu)?;
    }
    let layer = Arc::new(
        engram_cuda::CudaLayer::new(backend, cfg.clone(), layer_id, weights).map_err(on_gpu)?,
    );
    let device = DeviceRows::new(backend, host.clone(), tables, layer.clone()).map_err(on_gpu)?;
    Ok(RuntimeLayer {
        layer_id,
        table: Arc::new(host),
        layer,
        device: Some(Arc::new(device)),
    })
}

/// The directory and the safetensors files at `location`.
/// The file names of `files`, comma-separated, for messages.
fn file_names(files: &[PathBuf]) -> String {
    if files.is_empty() {
        return "no safetensors file".into();
    }
    files
        .iter()
        .map(|f| f.file_name().unwrap_or(f.as_os_str()).to_string_lossy())
        .collect::<Vec<_>>()
        .join(", ")
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_and_placements_parse_from_their_names() {
        let cuda = |ordinal, tables| BackendKind::Cuda { ordinal, tables };
        assert_eq!("cpu".parse(), Ok(BackendKind::Cpu));
        assert_eq!("reference".parse(), Ok(BackendKind::Reference));
        assert_eq!("cuda".parse(), Ok(cuda(0, CudaTables::PinnedHost)));
        assert_eq!("cuda:3".parse(), Ok(cuda(3, CudaTables::PinnedHost)));
        for bad in ["", "gpu", "cuda:", "cuda:-1", "cuda:x", "CPU"] {
            assert!(bad.parse::<BackendKind>().is_err(), "{bad:?}");
        }
        assert_eq!("pinned-host".parse(), Ok(CudaTables::PinnedHost));
        assert_eq!("device".parse(), Ok(CudaTables::Device));
        assert_eq!("zero-copy".parse(), Ok(CudaTables::ZeroCopy));
        assert_eq!("cache:4096".parse(), Ok(CudaTables::Cached { rows: 4096 }));
        for bad in ["", "cache", "cache:", "cache:0", "cache:-5", "pinned"] {
            assert!(bad.parse::<CudaTables>().is_err(), "{bad:?}");
        }
    }
}
