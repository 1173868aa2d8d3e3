//! The table-store trait: rows by index into a caller's buffer.
//!
//! A store owns one Engram layer's embedding table (`sum(primes)` rows of `head_dim`
//! columns). Backends provide stores in RAM, memory-mapped from disk, or on a device;
//! the core provides [`DenseTable`], a plain f32 table for the reference math and tests,
//! and [`bytes::TableBytes`], the stored bytes of a table in host memory (RAM or a file
//! map) that the CPU and CUDA backends' host-side stores read.

pub mod bytes;

use crate::dtype::RowDtype;
use crate::error::{EngramError, Result};

/// A table of rows that can be gathered by row id.
pub trait TableStore: Send + Sync {
    /// A name for messages (file and tensor, typically).
    fn name(&self) -> &str;
    fn num_rows(&self) -> u64;
    /// Columns of one row.
    fn width(&self) -> usize;
    fn dtype(&self) -> RowDtype;

    /// Copies rows `row_ids` into `out` (`[row_ids.len(), width]`, row-major), converted
    /// to f32 (V4.1 rows dequantized and rounded to bf16, as the model sees them). An id
    /// past the end of the table is an error; `out` may then be partly written.
    fn gather_f32(&self, row_ids: &[u64], out: &mut [f32]) -> Result<()>;

    /// Bytes one row occupies in the store.
    fn row_bytes(&self) -> usize {
        self.dtype().row_bytes(self.width())
    }

    /// Checks ids and output size before a gather.
    fn check_gather(&self, row_ids: &[u64], out_len: usize) -> Result<()> {
        self.check_gather_len(row_ids.len(), out_len)?;
        match row_ids.iter().find(|&&r| r >= self.num_rows()) {
            Some(&row) => Err(self.row_out_of_range(row)),
            None => Ok(()),
        }
    }

    /// Checks that a gather of `rows` rows fits an output of `out_len` elements; for
    /// stores that check the ids themselves while they copy.
    fn check_gather_len(&self, rows: usize, out_len: usize) -> Result<()> {
        let expected = rows * self.width();
        if out_len != expected {
            return Err(EngramError::shape(
                format!("gather output of `{}`", self.name()),
                format!("{rows} rows x {} columns = {expected}", self.width()),
                out_len,
            ));
        }
        Ok(())
    }

    /// What the store did to serve gathers since it opened (a cache's hits, reads of
    /// the medium behind it). Stores that are plain memory report zeros; a store that
    /// wraps another adds the inner store's counters to its own.
    fn counters(&self) -> StoreCounters {
        StoreCounters::default()
    }

    /// The error for a gather of `row`, past the end of this table.
    fn row_out_of_range(&self, row: u64) -> EngramError {
        EngramError::RowOutOfRange {
            row,
            rows: self.num_rows(),
            table: self.name().to_string(),
        }
    }
}

/// Running totals of what a store did beyond copying rows out of memory: a hot-row
/// cache's hits and misses, and reads of the medium behind it (a disk, a remote store).
/// Every field but `cache_bytes` only grows, so the difference of two readings is what
/// happened between them ([`StoreCounters::since`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreCounters {
    /// Rows found in a hot-row cache.
    pub cache_hits: u64,
    /// Rows looked for in a hot-row cache and not found there.
    pub cache_misses: u64,
    /// Bytes the cache holds now (a level: `since` keeps the later reading).
    pub cache_bytes: u64,
    /// Reads issued to the medium behind the store (disk reads, network round trips).
    pub backing_reads: u64,
    /// Bytes those reads returned.
    pub backing_bytes: u64,
}

impl StoreCounters {
    /// Sums two stores' counters (a wrapper and the store it wraps, or several tables).
    pub fn add(&mut self, other: &StoreCounters) {
        self.cache_hits += other.cache_hits;
        self.cache_misses += other.cache_misses;
        self.cache_bytes += other.cache_bytes;
        self.backing_reads += other.backing_reads;
        self.backing_bytes += other.backing_bytes;
    }

    /// What happened between `earlier` and this reading of the same store.
    pub fn since(&self, earlier: &StoreCounters) -> StoreCounters {
        StoreCounters {
            cache_hits: self.cache_hits.saturating_sub(earlier.cache_hits),
            cache_misses: self.cache_misses.saturating_sub(earlier.cache_misses),
            cache_bytes: self.cache_bytes,
            backing_reads: self.backing_reads.saturating_sub(earlier.backing_reads),
            backing_bytes: self.backing_bytes.saturating_sub(earlier.backing_bytes),
        }
    }

    /// Hits over lookups (0 when the cache was never asked).
    pub fn hit_rate(&self) -> f64 {
        let lookups = self.cache_hits + self.cache_misses;
        if lookups == 0 {
            0.0
        } else {
            self.cache_hits as f64 / lookups as f64
        }
    }
}

/// An f32 table held in a `Vec` (reference math, tests, small checkpoints).
#[derive(Clone, Debug)]
pub struct DenseTable {
    name: String,
    width: usize,
    data: Vec<f32>,
}

impl DenseTable {
    pub fn new(name: impl Into<String>, width: usize, data: Vec<f32>) -> Result<Self> {
        let name = name.into();
        if width == 0 || !data.len().is_multiple_of(width) {
            return Err(EngramError::shape(
                format!("table `{name}`"),
                format!("a multiple of the row width {width}"),
                data.len(),
            ));
        }
        Ok(Self { name, width, data })
    }

    pub fn data(&self) -> &[f32] {
        &self.data
    }
}

impl TableStore for DenseTable {
    fn name(&self) -> &str {
        &self.name
    }
    fn num_rows(&self) -> u64 {
        (self.data.len() / self.width) as u64
    }
    fn width(&self) -> usize {
        self.width
    }
    fn dtype(&self) -> RowDtype {
        RowDtype::F32
    }
    fn gather_f32(&self, row_ids: &[u64], out: &mut [f32]) -> Result<()> {
        self.check_gather(row_ids, out.len())?;
        let w = self.width;
        for (dst, &row) in out.chunks_exact_mut(w).zip(row_ids) {
            let start = row as usize * w;
            dst.copy_from_slice(&self.data[start..start + w]);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_checks_ids_and_sizes() {
        let t = DenseTable::new("t", 2, vec![0.0, 1.0, 2.0, 3.0]).unwrap();
        let mut out = vec![0.0; 4];
        t.gather_f32(&[1, 0], &mut out).unwrap();
        assert_eq!(out, [2.0, 3.0, 0.0, 1.0]);
        let e = t.gather_f32(&[2, 0], &mut out).unwrap_err().to_string();
        assert!(e.contains("row id 2") && e.contains("`t`"), "{e}");
        assert!(t.gather_f32(&[0], &mut out).is_err());
    }

    #[test]
    fn counters_since_subtract_totals_and_keep_the_level() {
        let earlier = StoreCounters {
            cache_hits: 3,
            cache_misses: 1,
            cache_bytes: 100,
            backing_reads: 2,
            backing_bytes: 8192,
        };
        let later = StoreCounters {
            cache_hits: 10,
            cache_misses: 4,
            cache_bytes: 60,
            backing_reads: 5,
            backing_bytes: 16384,
        };
        let d = later.since(&earlier);
        assert_eq!(
            d,
            StoreCounters {
                cache_hits: 7,
                cache_misses: 3,
                cache_bytes: 60,
                backing_reads: 3,
                backing_bytes: 8192,
            }
        );
        assert!((d.hit_rate() - 0.7).abs() < 1e-12);
        assert_eq!(StoreCounters::default().hit_rate(), 0.0);
    }
}
