//! `engram bench-disk`: how fast each way of reading a step's rows from a table file
//! brings them in, cold (the page cache dropped before each way, where the process may)
//! and warm. The ways: a memory map faulting pages in on one thread (what a mapped table
//! does without read-ahead), the same after `posix_fadvise(WILLNEED)` on the rows' pages,
//! and the disk tier's [`DiskTable`] with `pread` threads or io_uring at several depths.
//! Every way gathers the same rows, and each gather's rows are checked equal to the
//! memory map's.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use engram_core::checkpoint::{table_spec_from_header, SafetensorsHeader};
use engram_core::config::EngramConfig;
use engram_core::primes::table_layouts;
use engram_core::table::TableStore;
use engram_core::testing::TestRng;
use engram_cpu::table::{CpuTable, DiskOptions, DiskTable, ReadEngine};
use serde::Serialize;

/// What `engram bench-disk` takes.
#[derive(Clone, Debug, clap::Args)]
pub struct DiskBenchArgs {
    /// A model directory with an Engram checkpoint (config.json and safetensors files).
    #[arg(long)]
    pub model: PathBuf,
    /// The Engram layer whose table is read (default: the first).
    #[arg(long)]
    pub layer: Option<usize>,
    /// Rows per gather: one decode step (e.g. 16) and one prefill chunk (e.g. 8192).
    #[arg(long, value_delimiter = ',', default_values_t = [16usize, 8192])]
    pub rows: Vec<usize>,
    /// Gathers per way and size (fresh random rows each).
    #[arg(long, default_value_t = 20)]
    pub gathers: usize,
    /// Ways to read: mmap, fadvise, pread:THREADS, uring:DEPTH.
    #[arg(long, value_delimiter = ',', default_values_t = ["mmap".to_string(), "fadvise".into(), "pread:8".into(), "pread:32".into(), "pread:128".into(), "uring:32".into(), "uring:128".into(), "uring:512".into()])]
    pub ways: Vec<String>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// One way at one gather size.
#[derive(Clone, Debug, Serialize)]
pub struct DiskRun {
    pub way: String,
    pub rows: usize,
    /// Whether the page cache was dropped before this way's first gather.
    pub cold: bool,
    pub gathers: usize,
    /// Mean and median milliseconds per gather, and rows per second over all gathers.
    pub mean_ms: f64,
    pub median_ms: f64,
    pub rows_per_s: f64,
    /// Reads and bytes the disk tier issued per gather (0 for the memory map).
    pub reads_per_gather: f64,
    pub bytes_per_gather: f64,
    /// The same gathers again, the pages now cached.
    pub warm_mean_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct DiskBenchReport {
    pub table: String,
    pub table_bytes: u64,
    pub row_bytes: usize,
    /// Whether this process could drop the page cache (root): else every run is warm-ish.
    pub cold_runs: bool,
    pub runs: Vec<DiskRun>,
}

/// Drops the page cache (needs root); false where it cannot.
pub fn drop_page_cache() -> bool {
    // SAFETY: sync() has no preconditions.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

pub fn run(args: &DiskBenchArgs) -> Result<DiskBenchReport> {
    let (file, spec) = layer_table(&args.model, args.layer)?;
    let mmap = CpuTable::open_mmap(&file, &spec)?;
    let table_bytes = mmap.values_bytes().len() as u64 + mmap.scales_bytes().len() as u64;
    let mut report = DiskBenchReport {
        table: mmap.name().to_string(),
        table_bytes,
        row_bytes: mmap.row_bytes(),
        cold_runs: true,
        runs: Vec::new(),
    };
    let planner = DiskTable::open(&file, &spec, DiskOptions::default())?;
    for (w, way) in args.ways.iter().enumerate() {
        let disk = match way.split_once(':') {
            None if way == "mmap" || way == "fadvise" => None,
            Some(("pread", n)) => Some(ReadEngine::Threads(n.parse().context("pread:THREADS")?)),
            Some(("uring", n)) => Some(ReadEngine::IoUring(n.parse().context("uring:DEPTH")?)),
            _ => bail!("unknown way `{way}`: expected mmap, fadvise, pread:N or uring:N"),
        };
        let disk = disk
            .map(|engine| DiskTable::open(&file, &spec, DiskOptions { engine }))
            .transpose()?;
        for &rows in &args.rows {
            // Other rows for every way: pages a way touched through the memory map stay
            // mapped (so cached, whatever is dropped) and would flatter the next way.
            let mut rng = TestRng::new((w as u64) << 32 | rows as u64);
            let batches: Vec<Vec<u64>> = (0..args.gathers)
                .map(|_| (0..rows).map(|_| rng.below(spec.rows)).collect())
                .collect();
            let cold = drop_page_cache();
            report.cold_runs &= cold;
            let mut times = Vec::new();
            let before = disk.as_ref().map(|d| d.counters());
            let mut out = vec![0f32; rows * spec.width];
            for ids in &batches {
                let start = Instant::now();
                match (&disk, way.as_str()) {
                    (Some(d), _) => d.gather_f32(ids, &mut out)?,
                    (None, "fadvise") => {
                        advise_willneed(&file, &planner.plan_reads(ids))?;
                        mmap.gather_f32(ids, &mut out)?;
                    }
                    (None, _) => mmap.gather_f32(ids, &mut out)?,
                }
                times.push(start.elapsed().as_secs_f64());
                check_rows(&mmap, ids, &out, way)?;
            }
            let counted = match (&disk, before) {
                (Some(d), Some(b)) => d.counters().since(&b),
                _ => Default::default(),
            };
            let start = Instant::now();
            for ids in &batches {
                match &disk {
                    Some(d) => d.gather_f32(ids, &mut out)?,
                    None => mmap.gather_f32(ids, &mut out)?,
                }
            }
            let warm = start.elapsed().as_secs_f64();
            let n = batches.len().max(1) as f64;
            let total: f64 = times.iter().sum();
            times.sort_by(f64::total_cmp);
            report.runs.push(DiskRun {
                way: way.clone(),
                rows,
                cold,
                gathers: batches.len(),
                mean_ms: 1e3 * total / n,
                median_ms: 1e3 * times.get(times.len() / 2).copied().unwrap_or(0.0),
                rows_per_s: (rows as f64 * n) / total.max(1e-12),
                reads_per_gather: counted.backing_reads as f64 / n,
                bytes_per_gather: counted.backing_bytes as f64 / n,
                warm_mean_ms: 1e3 * warm / n,
            });
        }
    }
    Ok(report)
}

/// The file and table spec of Engram layer `layer` (default: the first) of `model`.
fn layer_table(
    model: &Path,
    layer: Option<usize>,
) -> Result<(PathBuf, engram_core::checkpoint::TableSpec)> {
    let cfg = EngramConfig::from_json_file(model.join("config.json"))
        .with_context(|| format!("{}: reading the Engram config", model.display()))?;
    let layouts = table_layouts(&cfg.hash);
    let layout = match layer {
        None => layouts.first(),
        Some(l) => layouts.iter().find(|x| x.layer_id == l),
    }
    .with_context(|| format!("{}: no Engram layer {layer:?}", model.display()))?;
    for entry in std::fs::read_dir(model).with_context(|| model.display().to_string())? {
        let path = entry?.path();
        if path.extension().is_some_and(|x| x == "safetensors") {
            let header = SafetensorsHeader::read_file(&path)?;
            if let Ok(spec) = table_spec_from_header(&header, &cfg, layout) {
                return Ok((path, spec));
            }
        }
    }
    bail!(
        "{}: no safetensors file holds Engram layer {}'s table",
        model.display(),
        layout.layer_id
    )
}

/// Asks the kernel to start reading `ranges` of `file` into the page cache.
fn advise_willneed(file: &Path, ranges: &[std::ops::Range<u64>]) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(file).with_context(|| file.display().to_string())?;
    for r in ranges {
        // SAFETY: an advisory call on an open descriptor.
        unsafe {
            libc::posix_fadvise(
                f.as_raw_fd(),
                r.start as libc::off_t,
                (r.end - r.start) as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            )
        };
    }
    Ok(())
}

/// Every way must return the memory map's rows.
fn check_rows(mmap: &CpuTable, ids: &[u64], got: &[f32], way: &str) -> Result<()> {
    let mut want = vec![0f32; got.len()];
    mmap.gather_f32(ids, &mut want)?;
    if want
        .iter()
        .zip(got)
        .any(|(a, b)| a.to_bits() != b.to_bits())
    {
        bail!("{way}: rows differ from the memory map's");
    }
    Ok(())
}

/// The report as a plain-text table.
pub fn format_text(r: &DiskBenchReport) -> String {
    let mut s = format!(
        "{} ({:.1} GB, {} bytes per row){}\n{:<12} {:>6} {:>10} {:>10} {:>12} {:>8} {:>10} {:>10}\n",
        r.table,
        r.table_bytes as f64 / 1e9,
        r.row_bytes,
        if r.cold_runs { "" } else { "  [page cache NOT dropped: not root]" },
        "way",
        "rows",
        "mean ms",
        "median ms",
        "rows/s",
        "reads",
        "KiB read",
        "warm ms"
    );
    for run in &r.runs {
        s += &format!(
            "{:<12} {:>6} {:>10.3} {:>10.3} {:>12.0} {:>8.1} {:>10.1} {:>10.3}\n",
            run.way,
            run.rows,
            run.mean_ms,
            run.median_ms,
            run.rows_per_s,
            run.reads_per_gather,
            run.bytes_per_gather / 1024.0,
            run.warm_mean_ms
        );
    }
    s
}
