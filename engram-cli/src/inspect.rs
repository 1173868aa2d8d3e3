//! `engram inspect PATH`: what an Engram checkpoint holds and whether it fits its config.
//!
//! PATH is a weights `.safetensors` file or a model directory (`config.json` plus one or
//! more `*.safetensors` shards). The config comes from the directory's `config.json`, or
//! for a single file from its `meta` metadata (golden form) or a sibling `config.json`.
//! Only headers are read ([`SafetensorsHeader`]) and tables are opened memory-mapped, so
//! a 200 GB checkpoint is inspected as fast as a small one.
//!
//! For every Engram layer the report lists the table (rows against the sum of the
//! layer's primes, dtype, bytes) and every tensor the layer needs
//! ([`expected_layer_tensors`]): present, with an accepted dtype and the exact shape,
//! inside its file. [`InspectReport::consistent`] is the verdict.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use engram_core::checkpoint::{
    check_stored_offsets, dtype_list, expected_layer_tensors, layer_prefix, table_spec_from_header,
    SafetensorsHeader, TensorKind,
};
use engram_core::config::{EngramConfig, Variant};
use engram_core::primes::table_layouts;
use engram_core::table::TableStore;
use engram_core::EngramError;
use engram_cpu::CpuTable;
use serde::Serialize;

/// One safetensors file of the checkpoint.
#[derive(Clone, Debug, Serialize)]
pub struct FileReport {
    pub path: PathBuf,
    pub bytes: u64,
    /// Tensors in its header (0 when the header could not be read).
    pub tensors: usize,
    /// Why the file is unusable (unreadable header, truncated, trailing bytes).
    pub problem: Option<String>,
}

/// Verdict on one expected tensor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "status", content = "message")]
pub enum TensorStatus {
    Ok,
    /// Optional and not stored (the paper variant's offsets).
    Absent,
    Problem(String),
}

/// One tensor an Engram layer needs, as found.
#[derive(Clone, Debug, Serialize)]
pub struct TensorReport {
    pub name: String,
    pub kind: String,
    /// The file holding it.
    pub file: Option<PathBuf>,
    pub dtype: Option<String>,
    pub shape: Option<Vec<usize>>,
    pub expected_dtype: String,
    pub expected_shape: Vec<usize>,
    pub status: TensorStatus,
}

/// A layer's table at a glance.
#[derive(Clone, Debug, Serialize)]
pub struct TableReport {
    pub tensor: String,
    pub scale_tensor: Option<String>,
    /// Rows stored (first dimension), if the tensor exists.
    pub rows: Option<u64>,
    /// Sum of the layer's primes.
    pub expected_rows: u64,
    pub primes: usize,
    pub dtype: Option<String>,
    /// Bytes of the rows plus the scales.
    pub bytes: u64,
    /// Whether the CPU store opened it memory-mapped and read its first and last rows.
    pub store: TensorStatus,
}

#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    pub layer_id: usize,
    pub table: TableReport,
    pub tensors: Vec<TensorReport>,
}

/// Everything `engram inspect` found.
#[derive(Clone, Debug, Serialize)]
pub struct InspectReport {
    pub path: PathBuf,
    /// Where the config came from.
    pub config_source: String,
    pub config: EngramConfig,
    pub files: Vec<FileReport>,
    pub layers: Vec<LayerReport>,
    /// Problems outside any one tensor (a name in two shards, ...).
    pub problems: Vec<String>,
    /// Worth knowing, not wrong (tensors no layer expects, ...).
    pub notes: Vec<String>,
    /// Tensors that are not under an Engram layer's prefix.
    pub other_tensors: usize,
}

impl InspectReport {
    /// Every file readable and every expected tensor present and consistent.
    pub fn consistent(&self) -> bool {
        self.problem_count() == 0
    }

    /// Number of problems of every kind.
    pub fn problem_count(&self) -> usize {
        let bad = |s: &TensorStatus| matches!(s, TensorStatus::Problem(_));
        self.problems.len()
            + self.files.iter().filter(|f| f.problem.is_some()).count()
            + self
                .layers
                .iter()
                .map(|l| {
                    l.tensors.iter().filter(|t| bad(&t.status)).count()
                        + bad(&l.table.store) as usize
                })
                .sum::<usize>()
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("the report serializes");
        v["consistent"] = self.consistent().into();
        v["problem_count"] = self.problem_count().into();
        v
    }
}

/// The checkpoint's files: `path` itself, or the directory's `*.safetensors` (sorted).
pub(crate) fn weight_files(path: &Path) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !path.is_dir() {
        bail!("{}: no such file or directory", path.display());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .with_context(|| format!("{}: cannot list", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no *.safetensors files", path.display());
    }
    Ok(files)
}

/// The config: a directory's `config.json`; for a file, its `meta` metadata, else a
/// sibling `config.json`.
pub(crate) fn find_config(
    path: &Path,
    headers: &[Option<SafetensorsHeader>],
) -> Result<(EngramConfig, String)> {
    let dir_config = if path.is_dir() {
        Some(path.join("config.json"))
    } else {
        None
    };
    if let Some(cfg) = dir_config.filter(|c| c.is_file()) {
        return Ok((
            EngramConfig::from_json_file(&cfg)?,
            cfg.display().to_string(),
        ));
    }
    for h in headers.iter().flatten() {
        if let Some(meta) = h.metadata_json("meta")? {
            let cfg = EngramConfig::from_golden_meta(&meta)
                .with_context(|| format!("{}: metadata `meta`", h.path().display()))?;
            return Ok((cfg, format!("metadata `meta` of {}", h.path().display())));
        }
    }
    let sibling = path.parent().map(|p| p.join("config.json"));
    if let Some(cfg) = sibling.filter(|c| path.is_file() && c.is_file()) {
        return Ok((
            EngramConfig::from_json_file(&cfg)?,
            cfg.display().to_string(),
        ));
    }
    bail!(
        "{}: no Engram config: no config.json {} and no `meta` metadata in the weights",
        path.display(),
        if path.is_dir() {
            "in the directory"
        } else {
            "next to the file"
        }
    )
}

/// The part of an error worth printing next to the tensor's name.
fn tensor_message(e: EngramError) -> String {
    match e {
        EngramError::Tensor { message, .. } => message,
        other => other.to_string(),
    }
}

/// Inspects the checkpoint at `path`. Errors only when there is nothing to inspect (no
/// files, no config); everything else is a problem in the report.
pub fn inspect(path: &Path) -> Result<InspectReport> {
    let files = weight_files(path)?;
    let mut file_reports = Vec::new();
    let mut headers = Vec::new();
    for f in &files {
        let bytes = std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
        let (header, problem) = match SafetensorsHeader::read_file(f) {
            Ok(h) => {
                let problem = h.check_complete().err().map(|e| e.to_string());
                (Some(h), problem)
            }
            Err(e) => (None, Some(e.to_string())),
        };
        file_reports.push(FileReport {
            path: f.clone(),
            bytes,
            tensors: header.as_ref().map_or(0, |h| h.names().len()),
            problem,
        });
        headers.push(header);
    }
    let (config, config_source) = find_config(path, &headers)?;

    // Which file holds each tensor.
    let mut problems = Vec::new();
    let mut owner: BTreeMap<String, usize> = BTreeMap::new();
    for (i, h) in headers.iter().enumerate() {
        for name in h.iter().flat_map(|h| h.names()) {
            if let Some(&first) = owner.get(&name) {
                problems.push(format!(
                    "tensor `{name}` is in two files: {} and {}",
                    files[first].display(),
                    files[i].display()
                ));
            } else {
                owner.insert(name, i);
            }
        }
    }
    let header_of = |name: &str| owner.get(name).and_then(|&i| headers[i].as_ref());

    let mut layers = Vec::new();
    let mut expected_names = std::collections::HashSet::new();
    for layout in table_layouts(&config.hash) {
        let expected = expected_layer_tensors(&config, &layout);
        let mut tensors = Vec::new();
        for t in &expected {
            expected_names.insert(t.name.clone());
            let header = header_of(&t.name);
            let info = header.and_then(|h| h.info(&t.name));
            let status = match header {
                None if t.optional => TensorStatus::Absent,
                None => TensorStatus::Problem("missing".into()),
                Some(h) => match h.expect(&t.name, t.dtypes, &t.shape) {
                    Err(e) => TensorStatus::Problem(tensor_message(e)),
                    Ok(_) if t.kind == TensorKind::Offsets => h
                        .read_i64_tensor(&t.name, &t.shape)
                        .and_then(|stored| {
                            check_stored_offsets(h.path(), &t.name, &stored, &layout)
                        })
                        .map_or_else(
                            |e| TensorStatus::Problem(tensor_message(e)),
                            |_| TensorStatus::Ok,
                        ),
                    Ok(_) => TensorStatus::Ok,
                },
            };
            tensors.push(TensorReport {
                name: t.name.clone(),
                kind: format!("{:?}", t.kind).to_lowercase(),
                file: header.map(|h| h.path().to_path_buf()),
                dtype: info.map(|i| format!("{:?}", i.dtype)),
                shape: info.map(|i| i.shape.clone()),
                expected_dtype: dtype_list(t.dtypes),
                expected_shape: t.shape.clone(),
                status,
            });
        }
        let table_entry = |kind| expected.iter().find(|t| t.kind == kind);
        let table = table_entry(TensorKind::Table).expect("every layer has a table");
        let scale = table_entry(TensorKind::TableScale);
        let bytes_of = |name: &str| {
            header_of(name)
                .and_then(|h| h.info(name))
                .map_or(0, |i| (i.data_offsets.1 - i.data_offsets.0) as u64)
        };
        let table_info = header_of(&table.name).and_then(|h| h.info(&table.name));
        let table_ok = tensors
            .iter()
            .filter(|t| t.kind != "weight")
            .all(|t| !matches!(t.status, TensorStatus::Problem(_)));
        let store = if !table_ok {
            TensorStatus::Problem("not opened: the table tensors above have problems".into())
        } else {
            open_store(
                &table.name,
                scale.map(|s| s.name.as_str()),
                &header_of,
                &config,
                &layout,
            )
        };
        layers.push(LayerReport {
            layer_id: layout.layer_id,
            table: TableReport {
                tensor: table.name.clone(),
                scale_tensor: scale.map(|s| s.name.clone()),
                rows: table_info.and_then(|i| i.shape.first()).map(|&r| r as u64),
                expected_rows: layout.total_rows,
                primes: layout.primes.len(),
                dtype: table_info.map(|i| format!("{:?}", i.dtype)),
                bytes: bytes_of(&table.name) + scale.map_or(0, |s| bytes_of(&s.name)),
                store,
            },
            tensors,
        });
    }

    // Tensors under an Engram prefix that no layer expects.
    let mut notes = Vec::new();
    let mut other_tensors = 0;
    for name in owner.keys() {
        let engram_layer = name
            .strip_prefix("layers.")
            .and_then(|rest| rest.split_once('.'))
            .filter(|(_, rest)| rest.starts_with("engram."))
            .and_then(|(l, _)| l.parse::<usize>().ok());
        match engram_layer {
            None => other_tensors += 1,
            Some(_) if expected_names.contains(name) => {}
            Some(l) if config.hash.layer_ids.contains(&l) => notes.push(format!(
                "tensor `{name}` is not one the layer uses (ignored)"
            )),
            Some(l) => notes.push(format!(
                "tensor `{name}`: layer {l} is not an Engram layer of the config {:?} (ignored)",
                config.hash.layer_ids
            )),
        }
    }

    Ok(InspectReport {
        path: path.to_path_buf(),
        config_source,
        config,
        files: file_reports,
        layers,
        problems,
        notes,
        other_tensors,
    })
}

/// Opens a layer's table as the CPU backend will (memory-mapped) and reads its first
/// and last rows.
fn open_store<'a>(
    table: &str,
    scale: Option<&str>,
    header_of: &impl Fn(&str) -> Option<&'a SafetensorsHeader>,
    config: &EngramConfig,
    layout: &engram_core::primes::LayerTableLayout,
) -> TensorStatus {
    let Some(header) = header_of(table) else {
        return TensorStatus::Problem("missing".into());
    };
    if let Some(s) = scale.and_then(header_of) {
        if s.path() != header.path() {
            return TensorStatus::Problem(format!(
                "the rows are in {} but the scales in {}: the CPU table store needs both in one file",
                header.path().display(),
                s.path().display()
            ));
        }
    }
    let opened = table_spec_from_header(header, config, layout)
        .and_then(|spec| CpuTable::open_mmap(header.path(), &spec))
        .and_then(|t| {
            let ids = [0, t.num_rows() - 1];
            let mut out = vec![0f32; ids.len() * t.width()];
            t.gather_f32(&ids, &mut out)
        });
    match opened {
        Ok(()) => TensorStatus::Ok,
        Err(e) => TensorStatus::Problem(e.to_string()),
    }
}

/// Bytes in binary units: `1.5 GiB`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn status_word(s: &TensorStatus) -> &'static str {
    match s {
        TensorStatus::Ok => "OK",
        TensorStatus::Absent => "absent",
        TensorStatus::Problem(_) => "PROBLEM",
    }
}

/// The report as text, one line per tensor.
pub fn format_text(r: &InspectReport) -> String {
    let c = &r.config;
    let mut s = String::new();
    let _ = writeln!(s, "checkpoint: {}", r.path.display());
    let _ = writeln!(s, "config: {}", r.config_source);
    let variant = match c.variant {
        Variant::Paper => "paper (engram_demo_v1)",
        Variant::V41 => "v41 (DeepSeek-V4.1)",
    };
    let _ = writeln!(s, "  variant     {variant}");
    let _ = writeln!(
        s,
        "  orders      2..={} (table vocab {:?})",
        c.hash.max_ngram_size, c.hash.engram_vocab_size
    );
    let _ = writeln!(
        s,
        "  heads       {} per order, {} per layer",
        c.hash.n_head_per_ngram,
        c.heads_per_layer()
    );
    let _ = writeln!(
        s,
        "  head dim    {} (embedding width {})",
        c.head_dim,
        c.embed_dim()
    );
    let _ = writeln!(s, "  layers      {:?}", c.hash.layer_ids);
    let _ = write!(s, "  hidden      {}, hc_mult {}", c.hidden_size, c.hc_mult);
    match c.variant {
        Variant::Paper => {
            let _ = writeln!(s, ", short-conv kernel {}", c.kernel_size);
        }
        Variant::V41 => {
            let _ = writeln!(s, ", rms_norm_eps {:e}", c.rms_norm_eps);
        }
    }
    let _ = writeln!(s, "files: {}", r.files.len());
    for f in &r.files {
        let _ = writeln!(
            s,
            "  {}  {} ({} bytes), {} tensors{}",
            f.path.display(),
            human_bytes(f.bytes),
            f.bytes,
            f.tensors,
            f.problem
                .as_ref()
                .map(|p| format!("\n    PROBLEM {p}"))
                .unwrap_or_default()
        );
    }
    for l in &r.layers {
        let t = &l.table;
        let _ = writeln!(s, "layer {} ({}):", l.layer_id, layer_prefix(l.layer_id));
        let rows = t.rows.map_or("-".to_string(), |r| r.to_string());
        let _ = writeln!(
            s,
            "  table    {}: rows {rows}, expected {} (sum of {} primes), {}, {} ({} bytes)",
            t.tensor,
            t.expected_rows,
            t.primes,
            t.dtype.as_deref().unwrap_or("-"),
            human_bytes(t.bytes),
            t.bytes
        );
        let width = l.tensors.iter().map(|t| t.name.len()).max().unwrap_or(0);
        for t in &l.tensors {
            let found = match (&t.dtype, &t.shape) {
                (Some(d), Some(sh)) => format!("{d} {sh:?}"),
                _ => format!("expected {} {:?}", t.expected_dtype, t.expected_shape),
            };
            let detail = match &t.status {
                TensorStatus::Problem(m) => format!(": {m}"),
                TensorStatus::Absent => " (optional)".into(),
                TensorStatus::Ok => String::new(),
            };
            let _ = writeln!(
                s,
                "  {:<8} {:<width$}  {found}{detail}",
                status_word(&t.status),
                t.name
            );
        }
        let store = match &t.store {
            TensorStatus::Problem(m) => format!("PROBLEM  {m}"),
            _ => "OK       memory-mapped; first and last rows read".into(),
        };
        let _ = writeln!(s, "  store    {store}");
    }
    if r.other_tensors > 0 {
        let _ = writeln!(
            s,
            "other tensors: {} (not under an Engram layer)",
            r.other_tensors
        );
    }
    for n in &r.notes {
        let _ = writeln!(s, "note: {n}");
    }
    for p in &r.problems {
        let _ = writeln!(s, "PROBLEM {p}");
    }
    let expected: usize = r.layers.iter().map(|l| l.tensors.len()).sum();
    let _ = match r.problem_count() {
        0 => writeln!(
            s,
            "result: OK: {} layer(s), {expected} tensors present and consistent with the config",
            r.layers.len()
        ),
        n => writeln!(s, "result: {n} problem(s)"),
    };
    s
}
