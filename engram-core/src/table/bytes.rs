//! [`TableBytes`]: a table's stored bytes in host memory, shared by the backends that
//! read rows on the host (engram-cpu's `CpuTable`, engram-cuda's `HostTable`).
//!
//! The bytes live in one [`Backing`]: either anonymous memory the table owns
//! ([`AlignedBytes`]: page-aligned, asking for transparent huge pages), or a read-only
//! memory map of a file (a safetensors checkpoint, say). [`TableBytes`] adds where in it
//! the values and, for FP8 tables, the scales lie. Every constructor checks those ranges
//! before it maps or indexes anything: a range past the end of a file is an error naming
//! the file, never a panic or a SIGBUS on a later read.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{Mmap, MmapMut, MmapOptions};

use crate::error::{EngramError, Result};

/// Where the scales of a table built in memory start: the first page boundary after the
/// values, so each part begins page-aligned.
const PAGE: usize = 4096;

/// Zeroed bytes in RAM: an anonymous mapping (page-aligned, so aligned for any element
/// type and for 64-byte cache lines), backed by transparent huge pages where the kernel
/// offers them: gathers touch rows at random, and with 4 KiB pages nearly every row of a
/// large table is a TLB miss (a two-level page walk in a virtual machine).
pub struct AlignedBytes {
    map: MmapMut,
    len: usize,
}

impl AlignedBytes {
    /// `len` zero bytes; pages are allocated on first touch.
    pub fn zeroed(len: usize) -> std::io::Result<Self> {
        // A mapping is never empty: an empty table still has an address to register.
        let map = MmapOptions::new().len(len.max(1)).map_anon()?;
        // Before the first touch, so the faults allocate huge pages. Best effort: a kernel
        // without THP keeps 4 KiB pages.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        Ok(Self { map, len })
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.map[..self.len]
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.map[..self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

enum Memory {
    Anon(AlignedBytes),
    File { map: Mmap, path: PathBuf },
}

/// The memory a table's bytes live in: anonymous memory the table owns, or a read-only
/// map of a whole file. Shared (in an [`Arc`]) by the clones of a [`TableBytes`], so it
/// can be told apart by address (one driver registration per backing, say).
pub struct Backing(Memory);

impl Backing {
    /// The whole mapping: the entire file of a file map; for anonymous memory, the
    /// values, the padding to the scales' page and the scales (at least one byte).
    pub fn bytes(&self) -> &[u8] {
        match &self.0 {
            Memory::Anon(a) => &a.map,
            Memory::File { map, .. } => map,
        }
    }

    /// The mapping's first byte (page-aligned).
    pub fn as_ptr(&self) -> *const u8 {
        self.bytes().as_ptr()
    }

    /// Bytes of [`Backing::bytes`].
    pub fn len(&self) -> usize {
        self.bytes().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether this is a read-only map of a file (else anonymous memory).
    pub fn is_file(&self) -> bool {
        matches!(self.0, Memory::File { .. })
    }

    /// The file mapped, if this is a file map.
    pub fn path(&self) -> Option<&Path> {
        match &self.0 {
            Memory::File { path, .. } => Some(path),
            Memory::Anon(_) => None,
        }
    }
}

/// A table's stored bytes: a [`Backing`] and the byte ranges in it of the values
/// (`[rows, value_row_bytes]`) and, for FP8 tables, the scales (`[rows,
/// scale_row_bytes]`). Cloning shares the backing.
#[derive(Clone)]
pub struct TableBytes {
    backing: Arc<Backing>,
    values: Range<usize>,
    /// `None` when there are no scale bytes.
    scales: Option<Range<usize>>,
}

impl std::fmt::Debug for TableBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableBytes")
            .field("file", &self.path())
            .field("values", &self.values)
            .field("scales", &self.scales)
            .finish()
    }
}

impl TableBytes {
    /// `values_len` bytes of values and `scales_len` bytes of scales in anonymous memory
    /// (each part page-aligned, the scales on the page after the values), written by
    /// `fill(values, scales)` (`scales` is empty when `scales_len` is 0).
    pub fn build(
        values_len: usize,
        scales_len: usize,
        fill: impl FnOnce(&mut [u8], &mut [u8]),
    ) -> Result<Self> {
        Self::try_build(values_len, scales_len, |v, s| {
            fill(v, s);
            Ok(())
        })
    }

    /// A copy of `values` and `scales` in anonymous memory, placed as [`TableBytes::build`]
    /// places them.
    pub fn copy_of(values: &[u8], scales: Option<&[u8]>) -> Result<Self> {
        let scales = scales.unwrap_or(&[]);
        Self::build(values.len(), scales.len(), |v, s| {
            v.copy_from_slice(values);
            s.copy_from_slice(scales);
        })
    }

    /// Reads the byte ranges `values` and `scales` of the file at `path` into anonymous
    /// memory, placed as [`TableBytes::build`] places them. Only those bytes are read.
    pub fn read_file(
        path: impl AsRef<Path>,
        values: Range<u64>,
        scales: Option<Range<u64>>,
    ) -> Result<Self> {
        let path = path.as_ref();
        let (mut file, values, scales) = open_checked(path, values, scales)?;
        let mut read = |r: &Range<u64>, dst: &mut [u8]| {
            file.seek(SeekFrom::Start(r.start))
                .and_then(|_| file.read_exact(dst))
                .map_err(|e| EngramError::file(path, format!("cannot read bytes {r:?}: {e}")))
        };
        Self::try_build(span(&values), scales.as_ref().map_or(0, span), |v, s| {
            read(&values, v)?;
            match &scales {
                Some(r) => read(r, s),
                None => Ok(()),
            }
        })
        .map_err(|e| match e {
            EngramError::Other(m) => EngramError::file(path, m),
            e => e,
        })
    }

    /// Maps the whole file at `path` read-only; the values and scales are its byte ranges
    /// `values` and `scales`, checked against the file's length before it is mapped and
    /// against the map's after. Nothing is read until rows are.
    ///
    /// As with any memory map, the file must not be truncated or rewritten in place while
    /// it is mapped (reading a page cut off the file raises SIGBUS); replacing it with a
    /// new file (write elsewhere, then rename) is safe: the map keeps the old one.
    pub fn map_file(
        path: impl AsRef<Path>,
        values: Range<u64>,
        scales: Option<Range<u64>>,
    ) -> Result<Self> {
        let path = path.as_ref();
        let (file, values, scales) = open_checked(path, values, scales)?;
        // SAFETY: the map is read-only. A file truncated by another process while mapped
        // would fault on access (see above); tables are not expected to change under a
        // running model.
        let map = unsafe { MmapOptions::new().map(&file) }
            .map_err(|e| EngramError::file(path, format!("cannot memory-map: {e}")))?;
        // The file may have changed between the check and the map.
        let (values, scales) = check_ranges(path, map.len() as u64, values, scales)?;
        let to_usize = |r: Range<u64>| r.start as usize..r.end as usize;
        Ok(Self {
            backing: Arc::new(Backing(Memory::File {
                map,
                path: path.to_path_buf(),
            })),
            values: to_usize(values),
            scales: scales.map(to_usize).filter(|r| !r.is_empty()),
        })
    }

    /// [`TableBytes::build`] with a `fill` that may fail.
    fn try_build(
        values_len: usize,
        scales_len: usize,
        fill: impl FnOnce(&mut [u8], &mut [u8]) -> Result<()>,
    ) -> Result<Self> {
        let too_large = || {
            EngramError::Other(format!(
                "a table of {values_len} value and {scales_len} scale bytes does not fit this machine's address space"
            ))
        };
        let scales_at = values_len
            .checked_next_multiple_of(PAGE)
            .ok_or_else(too_large)?;
        let total = match scales_len {
            0 => values_len,
            n => scales_at.checked_add(n).ok_or_else(too_large)?,
        };
        let mut mem = AlignedBytes::zeroed(total).map_err(|e| {
            EngramError::Other(format!("cannot allocate {total} bytes of host memory: {e}"))
        })?;
        {
            let (v, rest) = mem.as_mut_slice().split_at_mut(values_len);
            let s = match scales_len {
                0 => &mut [][..],
                n => &mut rest[scales_at - values_len..][..n],
            };
            fill(v, s)?;
        }
        Ok(Self {
            backing: Arc::new(Backing(Memory::Anon(mem))),
            values: 0..values_len,
            scales: (scales_len > 0).then_some(scales_at..scales_at + scales_len),
        })
    }

    /// The stored values.
    pub fn values(&self) -> &[u8] {
        &self.backing.bytes()[self.values.clone()]
    }

    /// The stored scales; `None` when there are none.
    pub fn scales(&self) -> Option<&[u8]> {
        let s = self.scales.clone()?;
        Some(&self.backing.bytes()[s])
    }

    /// The memory the bytes live in.
    pub fn backing(&self) -> &Arc<Backing> {
        &self.backing
    }

    /// Where the values start in [`Backing::bytes`].
    pub fn values_offset(&self) -> usize {
        self.values.start
    }

    /// Where the scales start in [`Backing::bytes`], if there are any.
    pub fn scales_offset(&self) -> Option<usize> {
        self.scales.as_ref().map(|s| s.start)
    }

    /// Whether the bytes are a map of a file (else anonymous memory).
    pub fn is_file(&self) -> bool {
        self.backing.is_file()
    }

    /// The file mapped, if the bytes are a map of a file.
    pub fn path(&self) -> Option<&Path> {
        self.backing.path()
    }

    /// Tells the kernel that a file map is read at random, so a fault reads one page
    /// rather than read-ahead nobody asked for (a row gather on the CPU). Best effort;
    /// nothing for anonymous memory.
    pub fn advise_random(&self) {
        #[cfg(unix)]
        if let Memory::File { map, .. } = &self.backing.0 {
            let _ = map.advise(memmap2::Advice::Random);
        }
    }
}

fn span(r: &Range<u64>) -> usize {
    (r.end - r.start) as usize
}

/// Opens the file at `path` and checks `values` and `scales` against its length
/// ([`check_ranges`]).
fn open_checked(
    path: &Path,
    values: Range<u64>,
    scales: Option<Range<u64>>,
) -> Result<(File, Range<u64>, Option<Range<u64>>)> {
    let file = File::open(path).map_err(|e| EngramError::file(path, e))?;
    let file_len = file
        .metadata()
        .map_err(|e| EngramError::file(path, e))?
        .len();
    let (values, scales) = check_ranges(path, file_len, values, scales)?;
    Ok((file, values, scales))
}

/// Checks that `values` and `scales` are ranges inside a file of `file_len` bytes and fit
/// this machine's address space; scales of no bytes become `None`.
fn check_ranges(
    path: &Path,
    file_len: u64,
    values: Range<u64>,
    scales: Option<Range<u64>>,
) -> Result<(Range<u64>, Option<Range<u64>>)> {
    let check = |what: &str, r: &Range<u64>| -> Result<()> {
        let fail = |why: String| {
            Err(EngramError::file(
                path,
                format!("the table's {what} (bytes {}..{}) {why}", r.start, r.end),
            ))
        };
        if r.start > r.end {
            return fail("are not a range".into());
        }
        if r.end > file_len {
            return fail(format!(
                "reach past the end of the file ({file_len} bytes; truncated?)"
            ));
        }
        if usize::try_from(r.end).is_err() {
            return fail("do not fit this machine's address space".into());
        }
        Ok(())
    };
    check("values", &values)?;
    if let Some(s) = &scales {
        check("scales", s)?;
    }
    Ok((values, scales.filter(|s| !s.is_empty())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_of(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bin");
        std::fs::write(&path, bytes).unwrap();
        (dir, path)
    }

    #[test]
    fn built_bytes_are_page_aligned_parts_of_one_anonymous_mapping() {
        let t = TableBytes::build(5000, 3, |v, s| {
            v.fill(7);
            s.copy_from_slice(&[1, 2, 3]);
        })
        .unwrap();
        assert_eq!(
            (t.values().len(), t.scales(), t.is_file()),
            (5000, Some(&[1u8, 2, 3][..]), false)
        );
        assert!(t.values().iter().all(|&b| b == 7));
        assert_eq!((t.values_offset(), t.scales_offset()), (0, Some(8192)));
        assert_eq!(t.backing().as_ptr() as usize % PAGE, 0);
        assert_eq!(t.backing().len(), 8195);
        assert_eq!(t.path(), None);

        let c = TableBytes::copy_of(&[9; 10], None).unwrap();
        assert_eq!((c.values(), c.scales()), (&[9u8; 10][..], None));
        // An empty table still has a (one-byte) mapping to register.
        let e = TableBytes::copy_of(&[], None).unwrap();
        assert_eq!((e.values().len(), e.backing().len()), (0, 1));
    }

    #[test]
    fn files_are_mapped_or_read_by_range() {
        let bytes: Vec<u8> = (0..100).collect();
        let (_dir, path) = file_of(&bytes);
        let m = TableBytes::map_file(&path, 10..20, Some(90..95)).unwrap();
        let r = TableBytes::read_file(&path, 10..20, Some(90..95)).unwrap();
        for t in [&m, &r] {
            assert_eq!(t.values(), &bytes[10..20]);
            assert_eq!(t.scales(), Some(&bytes[90..95]));
        }
        assert!(m.is_file() && !r.is_file());
        assert_eq!(m.path(), Some(path.as_path()));
        assert_eq!((m.values_offset(), m.scales_offset()), (10, Some(90)));
        assert_eq!(m.backing().len(), 100);
        m.advise_random();
        // Scales of no bytes are no scales.
        let n = TableBytes::map_file(&path, 0..100, Some(100..100)).unwrap();
        assert_eq!(n.scales(), None);
    }

    /// A range past the end of the file is refused, naming the file, before anything is
    /// mapped or read.
    #[test]
    fn ranges_past_the_file_are_errors_naming_it() {
        let (_dir, path) = file_of(&[0u8; 100]);
        // (values, scales, what the message says)
        let cases = [
            (
                0..101,
                None,
                "values (bytes 0..101) reach past the end of the file (100 bytes; truncated?)",
            ),
            (
                0..10,
                Some(96..104),
                "scales (bytes 96..104) reach past the end",
            ),
            (
                0..10,
                Some(200..200),
                "scales (bytes 200..200) reach past the end",
            ),
            (
                Range { start: 20, end: 10 },
                None,
                "values (bytes 20..10) are not a range",
            ),
            (0..u64::MAX, None, "reach past the end"),
        ];
        for (values, scales, want) in cases {
            for e in [
                TableBytes::map_file(&path, values.clone(), scales.clone()).unwrap_err(),
                TableBytes::read_file(&path, values.clone(), scales.clone()).unwrap_err(),
            ] {
                assert!(
                    matches!(&e, EngramError::File { path: p, .. } if p == &path),
                    "{e:?}"
                );
                assert!(e.to_string().contains(want), "{e} (want {want})");
            }
        }
        let missing = path.with_file_name("missing.bin");
        let e = TableBytes::map_file(&missing, 0..0, None).unwrap_err();
        assert!(e.to_string().contains("missing.bin"), "{e}");
    }
}
