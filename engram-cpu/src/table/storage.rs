//! Where a table's bytes live: a read-only memory map of the file, or an owned buffer.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::Path;

use engram_core::error::{EngramError, Result};
use memmap2::Mmap;

/// Bytes in RAM: an anonymous mapping (page-aligned, so 64-byte aligned too), backed by
/// transparent huge pages where the kernel offers them: gathers touch rows at random, and
/// with 4 KiB pages nearly every row of a large table is a TLB miss.
pub struct AlignedBytes {
    map: memmap2::MmapMut,
    len: usize,
}

impl AlignedBytes {
    /// `len` zero bytes; pages are allocated on first touch.
    pub fn zeroed(len: usize) -> std::io::Result<Self> {
        let map = memmap2::MmapOptions::new().len(len.max(1)).map_anon()?;
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
}

/// The bytes a table reads its rows from.
pub(crate) enum Storage {
    /// The whole file, mapped read-only; `Range`s index into it.
    Mmap(Mmap),
    /// Only the table's tensors, copied into RAM back to back.
    Owned(AlignedBytes),
}

impl Storage {
    pub fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mmap(m) => m,
            Storage::Owned(b) => b.as_slice(),
        }
    }
}

/// Maps `path` read-only. The caller has checked every tensor against `expected_len`;
/// a file that changed length since is refused.
pub(crate) fn map_file(path: &Path, expected_len: u64) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| EngramError::file(path, e))?;
    // SAFETY: the map is read-only. As with any memory map, a file truncated by another
    // process while mapped would fault on access; tables are not expected to change
    // under a running model.
    let map = unsafe { Mmap::map(&file) }
        .map_err(|e| EngramError::file(path, format!("cannot memory-map: {e}")))?;
    if map.len() as u64 != expected_len {
        return Err(EngramError::file(
            path,
            format!(
                "changed while being opened: {} bytes, the header was read at {expected_len}",
                map.len()
            ),
        ));
    }
    // Rows are looked up at random: read-ahead would only pull in rows nobody asked for.
    #[cfg(unix)]
    let _ = map.advise(memmap2::Advice::Random);
    Ok(map)
}

/// Where ranges of these lengths land when stored back to back, each on a 64-byte
/// boundary, and the total length.
fn place(lens: impl Iterator<Item = usize>) -> (Vec<Range<usize>>, usize) {
    let mut end = 0usize;
    let placed = lens
        .map(|len| {
            let start = end.next_multiple_of(64);
            end = start + len;
            start..end
        })
        .collect();
    (placed, end)
}

/// Reads the byte `ranges` of the file at `path` into one aligned buffer (placed as
/// [`place`] says); returns the buffer and where each range landed.
pub(crate) fn read_ranges(
    path: &Path,
    ranges: &[Range<u64>],
) -> Result<(AlignedBytes, Vec<Range<usize>>)> {
    let lens = ranges
        .iter()
        .map(|r| to_usize(path, r.end - r.start))
        .collect::<Result<Vec<_>>>()?;
    let (placed, total) = place(lens.into_iter());
    let mut buf = AlignedBytes::zeroed(total)
        .map_err(|e| EngramError::file(path, format!("cannot allocate {total} bytes: {e}")))?;
    let mut file = File::open(path).map_err(|e| EngramError::file(path, e))?;
    for (r, dst) in ranges.iter().zip(&placed) {
        file.seek(SeekFrom::Start(r.start))
            .and_then(|_| file.read_exact(&mut buf.as_mut_slice()[dst.clone()]))
            .map_err(|e| EngramError::file(path, format!("cannot read bytes {r:?}: {e}")))?;
    }
    Ok((buf, placed))
}

/// Copies the byte `ranges` of `bytes` into one aligned buffer, placed as [`read_ranges`].
pub(crate) fn copy_ranges(
    path: &Path,
    bytes: &[u8],
    ranges: &[Range<usize>],
) -> Result<(AlignedBytes, Vec<Range<usize>>)> {
    let (placed, total) = place(ranges.iter().map(|r| r.len()));
    let mut buf = AlignedBytes::zeroed(total)
        .map_err(|e| EngramError::file(path, format!("cannot allocate {total} bytes: {e}")))?;
    for (r, dst) in ranges.iter().zip(&placed) {
        buf.as_mut_slice()[dst.clone()].copy_from_slice(&bytes[r.clone()]);
    }
    Ok((buf, placed))
}

pub(crate) fn to_usize(path: &Path, n: u64) -> Result<usize> {
    usize::try_from(n).map_err(|_| {
        EngramError::file(
            path,
            format!("{n} bytes do not fit this machine's address space"),
        )
    })
}
