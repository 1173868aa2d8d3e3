//! A hot-row cache in RAM in front of any table store ([`CachedStore`]).
//!
//! Engram's rows are looked up with a Zipf-like law, so a cache of a few percent of a
//! table catches a large share of lookups; in front of a table on disk (or across a
//! network) it saves the reads of those rows. The cache is bounded in bytes and its
//! eviction is frequency-aware: it is [`quick_cache`]'s S3-FIFO (a new row enters a small
//! probation queue and reaches the main queue only if looked up again; a ghost list
//! remembers recently evicted rows), so a burst of rows seen once does not flush the hot
//! ones. Chosen over moka's W-TinyLFU because, on a Zipf stream of row ids at a cache of
//! 5% of the table, both caught the same share of lookups (0.710) and quick_cache cost
//! 107-139 ns per lookup against moka's 1133-1304 ns here (docs/benchmarks-e2e.md).
//!
//! A gather looks every row up first; the rows that missed go to the inner store in one
//! batched [`TableStore::gather_f32`] (each distinct row once), so a store where a call
//! is slow (a disk read, a network round trip) is called once per gather, not per row.
//! Rows are kept as the f32 the inner store returns, or as their upper 16 bits where that
//! is exact (bf16 and V4.1 tables, whose rows are bf16 values): half the memory, and a
//! hit returns the inner store's bits exactly.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use engram_core::dtype::RowDtype;
use engram_core::error::Result;
use engram_core::table::{StoreCounters, TableStore};

/// Bytes counted per cached row beyond its values: the key, the row's pointer and
/// reference counts, and the cache's own bookkeeping (an estimate, so that the byte bound
/// holds for the memory the cache really takes, not only its payload).
pub const ENTRY_OVERHEAD_BYTES: u64 = 64;

/// One cached row.
#[derive(Clone)]
enum CachedRow {
    /// The upper halves of f32 values whose lower halves are zero (bf16 values).
    Bf16(Arc<[u16]>),
    F32(Arc<[f32]>),
}

impl CachedRow {
    fn new(values: &[f32]) -> Self {
        if values.iter().all(|x| x.to_bits() & 0xffff == 0) {
            CachedRow::Bf16(values.iter().map(|x| (x.to_bits() >> 16) as u16).collect())
        } else {
            CachedRow::F32(values.into())
        }
    }

    fn copy_to(&self, out: &mut [f32]) {
        match self {
            CachedRow::Bf16(v) => {
                for (o, &b) in out.iter_mut().zip(v.iter()) {
                    *o = f32::from_bits((b as u32) << 16);
                }
            }
            CachedRow::F32(v) => out.copy_from_slice(v),
        }
    }

    fn bytes(&self) -> u64 {
        match self {
            CachedRow::Bf16(v) => 2 * v.len() as u64,
            CachedRow::F32(v) => 4 * v.len() as u64,
        }
    }
}

/// Weighs a cached row in bytes.
#[derive(Clone)]
struct RowBytes;

impl quick_cache::Weighter<u64, CachedRow> for RowBytes {
    fn weight(&self, _: &u64, row: &CachedRow) -> u64 {
        row.bytes() + ENTRY_OVERHEAD_BYTES
    }
}

/// A [`TableStore`] that keeps the rows looked up most in RAM, in front of another store.
/// Gathers return exactly the inner store's values; ids past the table are refused with
/// the table named, as the inner store does.
pub struct CachedStore {
    inner: Arc<dyn TableStore>,
    cache: quick_cache::sync::Cache<u64, CachedRow, RowBytes>,
    capacity_bytes: u64,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl std::fmt::Debug for CachedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedStore")
            .field("inner", &self.inner.name())
            .field("capacity_bytes", &self.capacity_bytes)
            .field("cached_bytes", &self.cache.weight())
            .finish()
    }
}

impl CachedStore {
    /// A cache of at most `capacity_bytes` (rows and [`ENTRY_OVERHEAD_BYTES`] each) in
    /// front of `inner`.
    pub fn new(inner: Arc<dyn TableStore>, capacity_bytes: u64) -> Self {
        let row_weight = Self::row_weight(inner.as_ref());
        let rows = (capacity_bytes / row_weight).max(1);
        let cache = quick_cache::sync::Cache::with_weighter(
            usize::try_from(rows).unwrap_or(usize::MAX),
            capacity_bytes,
            RowBytes,
        );
        Self {
            inner,
            cache,
            capacity_bytes,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// Bytes one row of `store` takes in the cache (bf16-valued tables at 2 bytes a value).
    pub fn row_weight(store: &dyn TableStore) -> u64 {
        let per_value = match store.dtype() {
            RowDtype::BF16 | RowDtype::F8E4M3Scaled => 2,
            _ => 4,
        };
        per_value * store.width() as u64 + ENTRY_OVERHEAD_BYTES
    }

    /// The bound given at construction.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity_bytes
    }

    /// The store behind the cache.
    pub fn inner(&self) -> &Arc<dyn TableStore> {
        &self.inner
    }
}

impl TableStore for CachedStore {
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn num_rows(&self) -> u64 {
        self.inner.num_rows()
    }
    fn width(&self) -> usize {
        self.inner.width()
    }
    fn dtype(&self) -> RowDtype {
        self.inner.dtype()
    }

    /// A row is a hit when it is in the cache as the gather starts; every other id is a
    /// miss (the same row twice in one gather: two misses, fetched once).
    fn gather_f32(&self, row_ids: &[u64], out: &mut [f32]) -> Result<()> {
        self.check_gather(row_ids, out.len())?;
        let width = self.width();
        // Missed rows: each distinct id once, and where each occurrence goes in `out`.
        let mut missed: Vec<u64> = Vec::new();
        let mut slot_of: HashMap<u64, usize> = HashMap::new();
        let mut fills: Vec<(usize, usize)> = Vec::new();
        for (k, (&row, dst)) in row_ids.iter().zip(out.chunks_exact_mut(width)).enumerate() {
            match self.cache.get(&row) {
                Some(cached) => cached.copy_to(dst),
                None => {
                    let slot = *slot_of.entry(row).or_insert_with(|| {
                        missed.push(row);
                        missed.len() - 1
                    });
                    fills.push((k, slot));
                }
            }
        }
        self.hits
            .fetch_add((row_ids.len() - fills.len()) as u64, Ordering::Relaxed);
        self.misses.fetch_add(fills.len() as u64, Ordering::Relaxed);
        if missed.is_empty() {
            return Ok(());
        }
        let mut fetched = vec![0f32; missed.len() * width];
        self.inner.gather_f32(&missed, &mut fetched)?;
        for (k, slot) in fills {
            out[k * width..(k + 1) * width]
                .copy_from_slice(&fetched[slot * width..(slot + 1) * width]);
        }
        for (&row, values) in missed.iter().zip(fetched.chunks_exact(width)) {
            self.cache.insert(row, CachedRow::new(values));
        }
        Ok(())
    }

    fn counters(&self) -> StoreCounters {
        let mut c = StoreCounters {
            cache_hits: self.hits.load(Ordering::Relaxed),
            cache_misses: self.misses.load(Ordering::Relaxed),
            cache_bytes: self.cache.weight(),
            ..StoreCounters::default()
        };
        c.add(&self.inner.counters());
        c
    }
}
