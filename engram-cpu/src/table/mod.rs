//! Table stores of the CPU backend: one Engram layer's table, memory-mapped straight
//! from a safetensors file or held in RAM, gathered by row id on many threads.
//!
//! Opening reads only the file's header ([`SafetensorsHeader`]) and checks, before any
//! row is touched, that the table (and its scales) have the dtype and shape the
//! [`TableSpec`] says and lie inside the file: a truncated file is refused at open, with
//! the file and tensor named, instead of faulting on a later read. A memory-mapped table
//! of any size opens in constant time and its resident memory grows only with the rows
//! gathered.
//!
//! Stored rows may be F32, BF16, F16 or V4.1's F8_E4M3 with one F8_E8M0 scale per 32
//! columns; [`TableStore::gather_f32`] converts them exactly as
//! [`engram_core::checkpoint::load_dense_table`] does (F8 rows dequantized and rounded to
//! bf16), and [`CpuTable::gather_raw`] copies them as stored.
//!
//! [`CachedStore`] keeps the hottest rows of any store in RAM, bounded in bytes.
//!
//! To find a layer's table in a file, use
//! [`engram_core::checkpoint::table_spec_from_header`] (header only) or
//! [`CpuTable::open_layer`].

mod disk;
mod gather;
pub mod hot_cache;

use std::ops::Range;
use std::path::{Path, PathBuf};

use engram_core::checkpoint::{table_spec_from_header, SafetensorsHeader, TableSpec};
use engram_core::config::EngramConfig;
use engram_core::dtype::RowDtype;
use engram_core::error::{EngramError, Result};
use engram_core::primes::LayerTableLayout;
use engram_core::table::bytes::TableBytes;
use engram_core::table::TableStore;
use safetensors::Dtype;

pub use disk::{DiskOptions, DiskTable, ReadEngine, FALLBACK_ENGINE, PAGE_BYTES};
pub use engram_core::table::bytes::AlignedBytes;
use gather::{run_chunked, Rows};
pub use gather::{OutputStores, SCALE_BLOCK};
pub use hot_cache::CachedStore;

/// Gathers moving fewer bytes than this stay on the calling thread (see
/// [`CpuTable::set_parallel_min_bytes`]).
pub const DEFAULT_PARALLEL_MIN_BYTES: usize = 256 * 1024;

/// How [`CpuTable::open_layer`] holds the rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableMode {
    /// Memory-mapped from the file ([`CpuTable::open_mmap`]). The file's size is
    /// checked at open; it must not be truncated or rewritten in place while the table
    /// is open (as for any memory map, reading a page cut off the file raises SIGBUS).
    /// Replacing it with a new file (write elsewhere, then rename) is safe: the map keeps
    /// the old one.
    Mmap,
    /// Read into RAM ([`CpuTable::load`]).
    Ram,
    /// Read from the file at each gather with explicit, parallel reads ([`DiskTable`]):
    /// for tables larger than RAM; a failed read is an error, not a signal.
    Disk,
}

impl std::str::FromStr for TableMode {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "mmap" => Ok(Self::Mmap),
            "ram" => Ok(Self::Ram),
            "disk" => Ok(Self::Disk),
            _ => Err("expected mmap, ram or disk".into()),
        }
    }
}

/// Opens layer `layout.layer_id`'s table in the file at `path` as `mode` says: a
/// [`CpuTable`] (mapped or in RAM) or a [`DiskTable`] with default options.
pub fn open_layer_store(
    path: impl AsRef<Path>,
    cfg: &EngramConfig,
    layout: &LayerTableLayout,
    mode: TableMode,
) -> Result<std::sync::Arc<dyn TableStore>> {
    Ok(match mode {
        TableMode::Disk => std::sync::Arc::new(DiskTable::open_layer(
            path,
            cfg,
            layout,
            DiskOptions::default(),
        )?),
        _ => std::sync::Arc::new(CpuTable::open_layer(path, cfg, layout, mode)?),
    })
}

/// One layer's table on the CPU: a [`TableStore`] over a memory map or an owned buffer
/// (the core's [`TableBytes`]).
pub struct CpuTable {
    /// `file:tensor`, for messages.
    name: String,
    path: PathBuf,
    spec: TableSpec,
    /// The rows and (F8) the scales.
    bytes: TableBytes,
    parallel_min_bytes: usize,
}

impl std::fmt::Debug for CpuTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuTable")
            .field("name", &self.name)
            .field("dtype", &self.spec.dtype)
            .field("rows", &self.spec.rows)
            .field("width", &self.spec.width)
            .field("mmap", &self.is_mmap())
            .finish()
    }
}

impl CpuTable {
    /// Memory-maps the table `spec` describes from the safetensors file at `path`.
    /// Reads the header only; every tensor of the file must lie inside it.
    pub fn open_mmap(path: impl AsRef<Path>, spec: &TableSpec) -> Result<Self> {
        let path = path.as_ref();
        let header = SafetensorsHeader::read_file(path)?;
        let (values, scales) = locate(&header, spec)?;
        let bytes = TableBytes::map_file(path, values, scales)?;
        let mapped = bytes.backing().len() as u64;
        if mapped != header.file_len() {
            return Err(EngramError::file(
                path,
                format!(
                    "changed while being opened: {mapped} bytes, the header was read at {}",
                    header.file_len()
                ),
            ));
        }
        // Rows are looked up at random: read-ahead would only pull in rows nobody asked for.
        bytes.advise_random();
        Ok(Self::new(path, spec, bytes))
    }

    /// Reads the table `spec` describes from the safetensors file at `path` into RAM
    /// (only the table's bytes, and its scales, are read).
    pub fn load(path: impl AsRef<Path>, spec: &TableSpec) -> Result<Self> {
        let path = path.as_ref();
        let header = SafetensorsHeader::read_file(path)?;
        let (values, scales) = locate(&header, spec)?;
        Ok(Self::new(
            path,
            spec,
            TableBytes::read_file(path, values, scales)?,
        ))
    }

    /// Copies the table `spec` describes out of `bytes`, a whole safetensors file
    /// (`path` names it in messages), into RAM.
    pub fn from_bytes(path: impl AsRef<Path>, bytes: &[u8], spec: &TableSpec) -> Result<Self> {
        let path = path.as_ref();
        let header = SafetensorsHeader::parse(path, bytes, bytes.len() as u64)?;
        let (values, scales) = locate(&header, spec)?;
        // `parse` checked every tensor against `bytes.len()`; `get` says so again.
        let slice = |r: Range<u64>| {
            let (start, end) = (to_usize(path, r.start)?, to_usize(path, r.end)?);
            bytes.get(start..end).ok_or_else(|| {
                EngramError::file(
                    path,
                    format!("bytes {r:?} lie past the end of its {} bytes", bytes.len()),
                )
            })
        };
        let scales = scales.map(slice).transpose()?;
        let bytes =
            TableBytes::copy_of(slice(values)?, scales).map_err(|e| EngramError::file(path, e))?;
        Ok(Self::new(path, spec, bytes))
    }

    /// Finds layer `layout.layer_id`'s table in the file at `path` (header only, checked
    /// against `cfg` by [`table_spec_from_header`]) and opens it.
    pub fn open_layer(
        path: impl AsRef<Path>,
        cfg: &EngramConfig,
        layout: &LayerTableLayout,
        mode: TableMode,
    ) -> Result<Self> {
        let path = path.as_ref();
        let header = SafetensorsHeader::read_file(path)?;
        // A cut file is reported the same way whatever the table check would find.
        header.check_complete()?;
        let spec = table_spec_from_header(&header, cfg, layout)?;
        match mode {
            TableMode::Mmap => Self::open_mmap(path, &spec),
            TableMode::Ram => Self::load(path, &spec),
            TableMode::Disk => Err(EngramError::file(
                path,
                "a table read from disk is a DiskTable, not a CpuTable (see open_layer_store)",
            )),
        }
    }

    fn new(path: &Path, spec: &TableSpec, bytes: TableBytes) -> Self {
        Self {
            name: format!("{}:{}", path.display(), spec.tensor),
            path: path.to_path_buf(),
            spec: spec.clone(),
            bytes,
            parallel_min_bytes: DEFAULT_PARALLEL_MIN_BYTES,
        }
    }

    pub fn spec(&self) -> &TableSpec {
        &self.spec
    }

    /// The file the table came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the rows are memory-mapped (else they are in RAM).
    pub fn is_mmap(&self) -> bool {
        self.bytes.is_file()
    }

    /// Gathers moving at least this many bytes are split across rayon's threads;
    /// smaller ones stay on the calling thread (0: always split).
    pub fn set_parallel_min_bytes(&mut self, bytes: usize) {
        self.parallel_min_bytes = bytes;
    }

    /// The stored rows, `[rows, width]` elements of the stored type, little-endian.
    pub fn values_bytes(&self) -> &[u8] {
        self.bytes.values()
    }

    /// F8 tables: the stored E8M0 scales, `[rows, ceil(width / SCALE_BLOCK)]`; empty otherwise.
    pub fn scales_bytes(&self) -> &[u8] {
        self.bytes.scales().unwrap_or(&[])
    }

    fn rows(&self) -> Rows<'_> {
        Rows {
            dtype: self.spec.dtype,
            width: self.spec.width,
            rows: self.spec.rows,
            values: self.values_bytes(),
            scales: self.scales_bytes(),
        }
    }

    /// Copies rows `row_ids` as stored into `out` (`[row_ids.len(), row_bytes()]`): each
    /// row's values (little-endian), then, for F8 tables, its `ceil(width / SCALE_BLOCK)` scales. An
    /// id past the end of the table is an error; `out` may then be partly written.
    pub fn gather_raw(&self, row_ids: &[u64], out: &mut [u8]) -> Result<()> {
        let row_bytes = self.row_bytes();
        if out.len() != row_ids.len() * row_bytes {
            return Err(EngramError::shape(
                format!("raw gather output of `{}`", self.name),
                format!(
                    "{} rows x {row_bytes} bytes = {}",
                    row_ids.len(),
                    row_ids.len() * row_bytes
                ),
                out.len(),
            ));
        }
        let rows = self.rows();
        // Streaming only where rows are values alone: an F8 row's scales would share its
        // last output line.
        let stores = match rows.scale_row_bytes() {
            0 => OutputStores::for_output(out, row_bytes),
            _ => OutputStores::Cached,
        };
        run_chunked(
            row_ids,
            out,
            row_bytes,
            row_bytes,
            self.parallel_min_bytes,
            |ids, out| rows.copy_raw(ids, out, stores),
        )
        .map_err(|row| self.row_out_of_range(row))
    }
}

impl TableStore for CpuTable {
    fn name(&self) -> &str {
        &self.name
    }
    fn num_rows(&self) -> u64 {
        self.spec.rows
    }
    fn width(&self) -> usize {
        self.spec.width
    }
    fn dtype(&self) -> RowDtype {
        self.spec.dtype
    }

    fn gather_f32(&self, row_ids: &[u64], out: &mut [f32]) -> Result<()> {
        self.check_gather_len(row_ids.len(), out.len())?;
        let rows = self.rows();
        let w = self.spec.width;
        let stores = OutputStores::for_output(out, 4 * w);
        run_chunked(
            row_ids,
            out,
            w,
            4 * w,
            self.parallel_min_bytes,
            |ids, out| rows.decode(ids, out, stores),
        )
        .map_err(|row| self.row_out_of_range(row))
    }
}

/// Decodes stored rows laid one after another (`values`: `[n, value_row_bytes]`; F8 only,
/// `scales`: `[n, ceil(width / SCALE_BLOCK)]`) into `out` (`[n, width]` f32), exactly as
/// [`CpuTable`]'s gather does: for stores that fetch rows as bytes from elsewhere (a
/// remote store) and decode them here. `what` names the rows in a size error.
pub fn decode_stored_rows(
    what: &str,
    dtype: RowDtype,
    width: usize,
    values: &[u8],
    scales: &[u8],
    out: &mut [f32],
) -> Result<()> {
    let n = out.len() / width.max(1);
    let (vb, sb) = (dtype.value_row_bytes(width), dtype.scale_row_bytes(width));
    if out.len() != n * width || values.len() != n * vb || scales.len() != n * sb {
        return Err(EngramError::shape(
            format!("stored rows of `{what}`"),
            format!(
                "{n} rows of {vb} value and {sb} scale bytes (out {} f32)",
                out.len()
            ),
            format!("{} value and {} scale bytes", values.len(), scales.len()),
        ));
    }
    let rows = Rows {
        dtype,
        width,
        rows: n as u64,
        values,
        scales,
    };
    let ids: Vec<u64> = (0..n as u64).collect();
    rows.decode(&ids, out, OutputStores::Cached)
        .map_err(|row| EngramError::Other(format!("row {row} of `{what}` could not be decoded")))
}

/// Checks `spec` against the file's header and returns the byte ranges of the rows and
/// (F8) of the scales. Every tensor of the file must lie inside it.
fn locate(
    header: &SafetensorsHeader,
    spec: &TableSpec,
) -> Result<(Range<u64>, Option<Range<u64>>)> {
    header.check_complete()?;
    let (rows, width) = (to_usize(header.path(), spec.rows)?, spec.width);
    let dtype = match spec.dtype {
        RowDtype::F32 => Dtype::F32,
        RowDtype::BF16 => Dtype::BF16,
        RowDtype::F16 => Dtype::F16,
        RowDtype::F8E4M3Scaled => Dtype::F8_E4M3,
    };
    header.expect(&spec.tensor, &[dtype], &[rows, width])?;
    let scales = match (&spec.scale_tensor, spec.dtype) {
        (Some(scale), RowDtype::F8E4M3Scaled) => {
            header.expect(
                scale,
                &[Dtype::F8_E8M0],
                &[rows, width.div_ceil(SCALE_BLOCK)],
            )?;
            Some(header.byte_range(scale)?)
        }
        (None, RowDtype::F8E4M3Scaled) => {
            return Err(EngramError::tensor(
                header.path(),
                &spec.tensor,
                "F8_E4M3 rows need a scale tensor, and the table spec names none",
            ))
        }
        (Some(scale), other) => {
            return Err(EngramError::tensor(
                header.path(),
                scale,
                format!("a scale tensor goes with F8_E4M3 rows only, the table is {other}"),
            ))
        }
        (None, _) => None,
    };
    Ok((header.byte_range(&spec.tensor)?, scales))
}

fn to_usize(path: &Path, n: u64) -> Result<usize> {
    usize::try_from(n).map_err(|_| {
        EngramError::file(
            path,
            format!("{n} bytes do not fit this machine's address space"),
        )
    })
}
