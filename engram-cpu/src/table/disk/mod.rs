//! [`DiskTable`]: a table larger than RAM, read from its file with explicit reads.
//!
//! A memory-mapped table faults its pages in one at a time, on the thread that touches
//! them, and a failed read (EIO, a file cut short) raises SIGBUS. This store instead plans
//! each gather: the rows' byte ranges become a sorted set of reads, one per run of rows
//! sharing pages (each page read once per gather, however many rows share it), the reads
//! are issued in parallel by the [`ReadEngine`], and the rows are decoded from what came
//! back. A read that fails or comes back short is an error naming
//! the file and a row in it. Reads go through the page cache: a warm table costs a
//! `pread` per extent, a cold one as many disk reads in flight as the engine allows.
//!
//! Called from the runtime's prefetch thread at the start of a step, this is the
//! read-ahead of the disk tier: the step's rows are read while the host's earlier layers
//! compute.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use engram_core::checkpoint::{table_spec_from_header, SafetensorsHeader, TableSpec};
use engram_core::config::EngramConfig;
use engram_core::dtype::RowDtype;
use engram_core::error::{EngramError, Result};
use engram_core::primes::LayerTableLayout;
use engram_core::table::{StoreCounters, TableStore};
use rayon::prelude::*;

use super::gather::{OutputStores, Rows};
use super::locate;

mod uring;

/// Reads are planned in pages of this size (the kernel's page cache granule).
pub const PAGE_BYTES: u64 = 4096;

/// How a [`DiskTable`] issues its reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadEngine {
    /// `pread` on a pool of this many threads of the table's own: as many reads in
    /// flight as threads. The threads wait on the disk, not on a core, so there can be
    /// many more than cores.
    Threads(usize),
    /// Linux io_uring, one ring per table with this many reads in flight, submitted and
    /// reaped by the calling thread (no thread per read).
    IoUring(u32),
}

/// io_uring 512 deep: of the ways `engram bench-disk` compares, the fastest here cold,
/// at decode size and at prefill size alike (docs/benchmarks-e2e.md, "Tables larger than
/// RAM"). Where the kernel refuses io_uring, [`DiskTable::open`] falls back to
/// [`FALLBACK_ENGINE`].
impl Default for ReadEngine {
    fn default() -> Self {
        ReadEngine::IoUring(512)
    }
}

/// The engine used where io_uring is refused (an old kernel, a seccomp profile that
/// blocks it): the best `pread` pool of the same comparison.
pub const FALLBACK_ENGINE: ReadEngine = ReadEngine::Threads(128);

/// Options of [`DiskTable::open`].
#[derive(Clone, Copy, Debug, Default)]
pub struct DiskOptions {
    pub engine: ReadEngine,
}

/// One read of a gather: `len` bytes at `offset` in the file, landing at `at` in the
/// gather's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Extent {
    offset: u64,
    len: u64,
    at: usize,
}

/// One layer's table, read from its safetensors file on demand.
pub struct DiskTable {
    /// `file:tensor`, for messages.
    name: String,
    path: PathBuf,
    spec: TableSpec,
    file: File,
    values: Range<u64>,
    scales: Option<Range<u64>>,
    options: DiskOptions,
    reader: Reader,
    reads: AtomicU64,
    bytes_read: AtomicU64,
}

impl std::fmt::Debug for DiskTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskTable")
            .field("name", &self.name)
            .field("dtype", &self.spec.dtype)
            .field("rows", &self.spec.rows)
            .field("width", &self.spec.width)
            .field("options", &self.options)
            .finish()
    }
}

impl DiskTable {
    /// Opens the table `spec` describes in the safetensors file at `path`: reads the
    /// header, checks the table and every tensor against the file's size, reads no row.
    pub fn open(path: impl AsRef<Path>, spec: &TableSpec, options: DiskOptions) -> Result<Self> {
        let path = path.as_ref();
        let header = SafetensorsHeader::read_file(path)?;
        let (values, scales) = locate(&header, spec)?;
        let file = File::open(path).map_err(|e| EngramError::file(path, e))?;
        let file_len = file
            .metadata()
            .map_err(|e| EngramError::file(path, e))?
            .len();
        if file_len != header.file_len() {
            return Err(EngramError::file(
                path,
                format!(
                    "changed while being opened: {file_len} bytes, the header was read at {}",
                    header.file_len()
                ),
            ));
        }
        advise_random(&file);
        let started = |engine: ReadEngine| {
            Reader::new(engine).map_err(|e| {
                EngramError::file(path, format!("starting the {engine:?} reader: {e}"))
            })
        };
        let (reader, options) = match (started(options.engine), options.engine) {
            (Ok(reader), _) => (reader, options),
            (Err(e), ReadEngine::IoUring(_)) => {
                tracing::warn!("{e}; reading with {FALLBACK_ENGINE:?} instead");
                let options = DiskOptions {
                    engine: FALLBACK_ENGINE,
                };
                (started(FALLBACK_ENGINE)?, options)
            }
            (Err(e), _) => return Err(e),
        };
        Ok(Self {
            name: format!("{}:{}", path.display(), spec.tensor),
            path: path.to_path_buf(),
            spec: spec.clone(),
            file,
            values,
            scales,
            options,
            reader,
            reads: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
        })
    }

    /// Finds layer `layout.layer_id`'s table in the file at `path` (header only) and
    /// opens it.
    pub fn open_layer(
        path: impl AsRef<Path>,
        cfg: &EngramConfig,
        layout: &LayerTableLayout,
        options: DiskOptions,
    ) -> Result<Self> {
        let path = path.as_ref();
        let header = SafetensorsHeader::read_file(path)?;
        header.check_complete()?;
        let spec = table_spec_from_header(&header, cfg, layout)?;
        Self::open(path, &spec, options)
    }

    pub fn spec(&self) -> &TableSpec {
        &self.spec
    }

    /// The engine reading this table (the fallback, where io_uring was refused).
    pub fn engine(&self) -> ReadEngine {
        self.options.engine
    }

    /// The file the table is read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file ranges a gather of `row_ids` reads (page-aligned, each page once,
    /// neighbours merged): what this table would read, for tools that want to hand the
    /// same ranges to the kernel another way.
    pub fn plan_reads(&self, row_ids: &[u64]) -> Vec<Range<u64>> {
        let mut sorted = row_ids.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        plan_extents(&self.row_ranges(&sorted))
            .into_iter()
            .map(|e| e.offset..e.offset + e.len)
            .collect()
    }

    fn value_row_bytes(&self) -> u64 {
        match self.spec.dtype {
            RowDtype::F8E4M3Scaled => self.spec.width as u64,
            other => other.row_bytes(self.spec.width) as u64,
        }
    }

    fn scale_row_bytes(&self) -> u64 {
        match self.scales {
            Some(_) => self.spec.width.div_ceil(super::SCALE_BLOCK) as u64,
            None => 0,
        }
    }

    /// The byte ranges in the file that rows `sorted` (ascending, unique) occupy: values,
    /// then scales.
    fn row_ranges(&self, sorted: &[u64]) -> Vec<Range<u64>> {
        let vb = self.value_row_bytes();
        let mut ranges: Vec<Range<u64>> = sorted
            .iter()
            .map(|&r| {
                let start = self.values.start + r * vb;
                start..start + vb
            })
            .collect();
        if let Some(scales) = &self.scales {
            let sb = self.scale_row_bytes();
            ranges.extend(sorted.iter().map(|&r| {
                let start = scales.start + r * sb;
                start..start + sb
            }));
        }
        ranges
    }

    /// Reads `extents` into `buf` on the engine; the first failure is returned as the
    /// extent it hit and the error.
    fn read_extents(
        &self,
        extents: &[Extent],
        buf: &mut [u8],
    ) -> std::result::Result<(), (Extent, std::io::Error)> {
        match &self.reader {
            Reader::Threads(pool) => {
                let mut slices = Vec::with_capacity(extents.len());
                let mut rest = buf;
                for e in extents {
                    let (head, tail) = rest.split_at_mut(e.len as usize);
                    slices.push(head);
                    rest = tail;
                }
                pool.install(|| {
                    extents
                        .par_iter()
                        .zip(slices)
                        .with_max_len(1)
                        .try_for_each(|(e, dst)| {
                            self.file
                                .read_exact_at(dst, e.offset)
                                .map_err(|err| (*e, err))
                        })
                })
            }
            Reader::IoUring(ring) => {
                let mut ring = ring.lock().unwrap_or_else(|e| e.into_inner());
                uring::read_all(&mut ring, &self.file, extents, buf)
            }
        }
    }

    /// The error for a failed read of `extent`: names the file and the first row in it.
    fn read_error(&self, sorted: &[u64], extent: Extent, err: std::io::Error) -> EngramError {
        let row = self.first_row_in(sorted, extent);
        let what = if err.kind() == std::io::ErrorKind::UnexpectedEof {
            format!(
                "came back short: the file is {} bytes now (was it truncated while open?)",
                self.file.metadata().map_or(0, |m| m.len())
            )
        } else {
            err.to_string()
        };
        EngramError::file(
            &self.path,
            format!(
                "reading row {row} of `{}` ({} bytes at offset {}): {what}",
                self.spec.tensor, extent.len, extent.offset
            ),
        )
    }

    fn first_row_in(&self, sorted: &[u64], extent: Extent) -> u64 {
        let end = extent.offset + extent.len;
        self.row_ranges(sorted)
            .iter()
            .zip(sorted.iter().chain(sorted.iter()))
            .find(|(r, _)| r.start < end && r.end > extent.offset)
            .map_or(sorted[0], |(_, &row)| row)
    }
}

/// What issues a table's reads (see [`ReadEngine`]).
enum Reader {
    Threads(rayon::ThreadPool),
    IoUring(Box<std::sync::Mutex<io_uring::IoUring>>),
}

impl Reader {
    fn new(engine: ReadEngine) -> std::io::Result<Self> {
        Ok(match engine {
            ReadEngine::Threads(threads) => Reader::Threads(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads.max(1))
                    .thread_name(|i| format!("engram-disk-{i}"))
                    .build()
                    .map_err(std::io::Error::other)?,
            ),
            ReadEngine::IoUring(depth) => {
                let ring = io_uring::IoUring::new(depth.max(1))?;
                Reader::IoUring(Box::new(std::sync::Mutex::new(ring)))
            }
        })
    }
}

/// Tells the kernel the file is read at random: no read-ahead of pages nobody asked for.
fn advise_random(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain advisory call on an open descriptor; its failure changes nothing.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_RANDOM);
    }
}

/// The reads covering `ranges`: sorted by offset, a range merged into the read before it
/// when it starts in the page that read ends in, so no page is read twice. A read spans
/// its rows' bytes only (and what lies between rows of one page): the kernel still
/// brings whole pages in from disk, but a warm read copies rows, not pages.
fn plan_extents(ranges: &[Range<u64>]) -> Vec<Extent> {
    let mut sorted: Vec<&Range<u64>> = ranges.iter().filter(|r| r.end > r.start).collect();
    sorted.sort_unstable_by_key(|r| r.start);
    let mut spans: Vec<Range<u64>> = Vec::new();
    for r in sorted {
        match spans.last_mut() {
            Some(cur) if r.start / PAGE_BYTES <= (cur.end - 1) / PAGE_BYTES => {
                cur.end = cur.end.max(r.end)
            }
            _ => spans.push(r.clone()),
        }
    }
    let mut at = 0usize;
    spans
        .into_iter()
        .map(|s| {
            let e = Extent {
                offset: s.start,
                len: s.end - s.start,
                at,
            };
            at += e.len as usize;
            e
        })
        .collect()
}

/// Where `range`, inside one of `extents`, lies in the gather's buffer.
fn locate_in(extents: &[Extent], range: &Range<u64>) -> Range<usize> {
    let i = extents.partition_point(|e| e.offset + e.len <= range.start);
    let e = &extents[i];
    debug_assert!(e.offset <= range.start && range.end <= e.offset + e.len);
    let start = e.at + (range.start - e.offset) as usize;
    start..start + (range.end - range.start) as usize
}

impl TableStore for DiskTable {
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

    fn counters(&self) -> StoreCounters {
        StoreCounters {
            backing_reads: self.reads.load(Ordering::Relaxed),
            backing_bytes: self.bytes_read.load(Ordering::Relaxed),
            ..StoreCounters::default()
        }
    }

    fn gather_f32(&self, row_ids: &[u64], out: &mut [f32]) -> Result<()> {
        self.check_gather(row_ids, out.len())?;
        if row_ids.is_empty() {
            return Ok(());
        }
        let mut sorted = row_ids.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let ranges = self.row_ranges(&sorted);
        let extents = plan_extents(&ranges);
        let total: usize = extents.iter().map(|e| e.len as usize).sum();
        let mut buf = vec![0u8; total];
        self.reads
            .fetch_add(extents.len() as u64, Ordering::Relaxed);
        self.bytes_read.fetch_add(total as u64, Ordering::Relaxed);
        self.read_extents(&extents, &mut buf)
            .map_err(|(extent, err)| self.read_error(&sorted, extent, err))?;

        // The unique rows, packed in `sorted` order, decoded by the same code as the
        // in-memory tables.
        let (vb, sb) = (
            self.value_row_bytes() as usize,
            self.scale_row_bytes() as usize,
        );
        let n = sorted.len();
        let mut values = vec![0u8; n * vb];
        let mut scales = vec![0u8; n * sb];
        for (i, r) in ranges.iter().enumerate() {
            let src = &buf[locate_in(&extents, r)];
            if i < n {
                values[i * vb..(i + 1) * vb].copy_from_slice(src);
            } else {
                let j = i - n;
                scales[j * sb..(j + 1) * sb].copy_from_slice(src);
            }
        }
        let packed = Rows {
            dtype: self.spec.dtype,
            width: self.spec.width,
            rows: n as u64,
            values: &values,
            scales: &scales,
        };
        let local: Vec<u64> = row_ids
            .iter()
            .map(|r| sorted.partition_point(|s| s < r) as u64)
            .collect();
        packed
            .decode(&local, out, OutputStores::Cached)
            .map_err(|i| self.row_out_of_range(sorted.get(i as usize).copied().unwrap_or(i)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(offset: u64, len: u64, at: usize) -> Extent {
        Extent { offset, len, at }
    }

    #[test]
    fn rows_of_one_page_are_one_read_and_pages_are_never_read_twice() {
        // Two rows in page 0; one straddling pages 1-2 and one starting in page 2 (one
        // read: the second starts in the page the first ends in); one in page 5, one in
        // page 6 (neighbouring pages, separate reads); a duplicate.
        let p = 4096;
        let ranges = [
            200..300,
            0..100,
            8000..8300,
            8400..8500,
            5 * p..5 * p + 8,
            6 * p + 8..6 * p + 16,
            0..100,
        ];
        let got = plan_extents(&ranges);
        assert_eq!(
            got,
            vec![
                ext(0, 300, 0),
                ext(8000, 500, 300),
                ext(5 * p, 8, 800),
                ext(6 * p + 8, 8, 808)
            ]
        );
    }

    #[test]
    fn rows_are_found_in_their_extent() {
        let extents = [ext(0, 300, 0), ext(5 * 4096, 64, 300)];
        assert_eq!(locate_in(&extents, &(100..200)), 100..200);
        assert_eq!(
            locate_in(&extents, &(5 * 4096 + 16..5 * 4096 + 32)),
            316..332
        );
    }
}
