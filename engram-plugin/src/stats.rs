//! Lookup statistics: what was fetched, how long fetching took, and how long the host
//! actually waited for it ("exposed"). Prefetch works when exposed << fetch.

use std::time::Duration;

use engram_core::table::StoreCounters;

/// Counters of one step, or totals over many.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct LookupStats {
    pub steps: u64,
    pub tokens: u64,
    /// Table rows gathered (tokens x heads x layers).
    pub rows_fetched: u64,
    /// Bytes read from the tables, in their stored format.
    pub bytes_fetched: u64,
    /// Time spent gathering rows, wherever it ran.
    #[serde(serialize_with = "secs")]
    pub fetch_time: Duration,
    /// Time the host spent waiting for rows inside `apply`.
    #[serde(serialize_with = "secs")]
    pub exposed_wait: Duration,
    /// Sequences whose state was dropped to stay under the live-state bound.
    pub evicted_sequences: u64,
    /// What the table stores did for these gathers: hot-row cache hits and misses, reads
    /// of a disk or remote store behind them (zeros for tables plainly in memory).
    /// `cache_bytes` is the caches' size at the end.
    #[serde(flatten)]
    pub store: StoreCounters,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl LookupStats {
    pub fn add(&mut self, other: &LookupStats) {
        self.steps += other.steps;
        self.tokens += other.tokens;
        self.rows_fetched += other.rows_fetched;
        self.bytes_fetched += other.bytes_fetched;
        self.fetch_time += other.fetch_time;
        self.exposed_wait += other.exposed_wait;
        self.evicted_sequences += other.evicted_sequences;
        let level = other.store.cache_bytes;
        self.store.add(&other.store);
        self.store.cache_bytes = level;
    }

    /// Exposed wait as a fraction of fetch time (0 when nothing was fetched).
    pub fn exposed_fraction(&self) -> f64 {
        if self.fetch_time.is_zero() {
            0.0
        } else {
            self.exposed_wait.as_secs_f64() / self.fetch_time.as_secs_f64()
        }
    }
}
