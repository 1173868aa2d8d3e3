//! The hot-row cache (`engram_cpu::table::CachedStore`) in front of a memory-mapped
//! table: what share of a Zipf-distributed stream of row ids it catches at a size of 5%
//! of the table, and what a gathered row costs through it against the table alone.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use engram_core::dtype::RowDtype;
use engram_core::table::TableStore;
use engram_core::testing::TestRng;
use engram_cpu::table::CachedStore;
use serde::Serialize;

use super::mapped_table;

/// Rows of the table (bf16, 64 columns: 128-byte rows, 128 MiB).
const ROWS: usize = 1 << 20;
const WIDTH: usize = 64;
/// Row ids per gather (a prefill step of 256 tokens x 16 heads).
const BATCH: usize = 4096;
/// Gathers in the stream.
const BATCHES: usize = 128;
/// The cache's size, as a fraction of the table's stored bytes.
const CACHE_FRACTION: f64 = 0.05;

/// The cache's counters over one pass of the stream, and the cost of a row through it.
#[derive(Debug, Clone, Serialize)]
pub struct HotCacheBench {
    pub table_bytes: u64,
    pub cache_bound_bytes: u64,
    /// The exponent of the ids' Zipf law (rank r drawn with weight 1/r^s).
    pub zipf_exponent: f64,
    pub lookups: u64,
    /// Counters of the first pass, from an empty cache.
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub cache_hit_rate: f64,
    /// The cache's size after the pass.
    pub cache_bytes: u64,
    /// Nanoseconds per gathered row: the table alone, and through the warm cache (second
    /// pass), best of 3 each.
    pub table_ns_per_row: f64,
    pub cached_ns_per_row: f64,
    /// `cached_ns_per_row / table_ns_per_row`: above 1, a hit costs more than a mapped
    /// row in the page cache (the cache pays off only in front of a slower store).
    pub cached_over_table: f64,
}

/// A Zipf(1) stream of `n` ids over `rows`: rank `r` (1-based) drawn by inverting the
/// continuous approximation of the harmonic sum (`r = e^(u ln rows)`), then scattered
/// over the table by a multiplicative hash so hot rows are not neighbours.
fn zipf_ids(rows: u64, n: usize, rng: &mut TestRng) -> Vec<u64> {
    let log_rows = (rows as f64).ln();
    (0..n)
        .map(|_| {
            let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            let rank = ((u * log_rows).exp() as u64).clamp(1, rows) - 1;
            rank.wrapping_mul(0x9e37_79b9_7f4a_7c15) % rows
        })
        .collect()
}

/// Best time per row of gathering every batch of `ids` from `store`, of 3 passes.
fn ns_per_row(store: &dyn TableStore, ids: &[u64]) -> Result<f64> {
    let mut out = vec![0f32; BATCH * WIDTH];
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        for batch in ids.chunks(BATCH) {
            store.gather_f32(batch, &mut out[..batch.len() * WIDTH])?;
        }
        best = best.min(t.elapsed().as_secs_f64() * 1e9 / ids.len() as f64);
    }
    Ok(best)
}

pub fn bench_hot_cache(dir: &Path) -> Result<HotCacheBench> {
    let table: Arc<dyn TableStore> = Arc::new(mapped_table(
        dir,
        "hot-cache",
        ROWS,
        WIDTH,
        RowDtype::BF16,
        11,
    )?);
    let table_bytes = (ROWS * table.row_bytes()) as u64;
    let cache_bound_bytes = (table_bytes as f64 * CACHE_FRACTION) as u64;
    let ids = zipf_ids(ROWS as u64, BATCH * BATCHES, &mut TestRng::new(12));
    let cached = CachedStore::new(table.clone(), cache_bound_bytes);
    let mut out = vec![0f32; BATCH * WIDTH];
    for batch in ids.chunks(BATCH) {
        cached.gather_f32(batch, &mut out[..batch.len() * WIDTH])?;
    }
    let first = cached.counters();
    let table_ns = ns_per_row(table.as_ref(), &ids)?;
    let cached_ns = ns_per_row(&cached, &ids)?;
    std::fs::remove_file(dir.join("hot-cache.safetensors")).ok();
    Ok(HotCacheBench {
        table_bytes,
        cache_bound_bytes,
        zipf_exponent: 1.0,
        lookups: ids.len() as u64,
        cache_hits: first.cache_hits,
        cache_misses: first.cache_misses,
        cache_hit_rate: first.hit_rate(),
        cache_bytes: first.cache_bytes,
        table_ns_per_row: table_ns,
        cached_ns_per_row: cached_ns,
        cached_over_table: cached_ns / table_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_ids_are_skewed_and_in_range() {
        let ids = zipf_ids(1000, 100_000, &mut TestRng::new(1));
        assert!(ids.iter().all(|&i| i < 1000));
        let mut counts = std::collections::HashMap::new();
        for i in ids {
            *counts.entry(i).or_insert(0u32) += 1;
        }
        let mut c: Vec<u32> = counts.into_values().collect();
        c.sort_unstable_by(|a, b| b.cmp(a));
        // The hottest 1% of rows take far more than 1% of lookups (about 40% for s = 1).
        let top: u32 = c.iter().take(10).sum();
        assert!(top > 25_000, "top 10 rows: {top} of 100000");
    }
}
