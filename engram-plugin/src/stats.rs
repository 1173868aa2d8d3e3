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
    /// Time spent gathering rows, and for layers on the host projecting them
    /// (`EngramLayer::project`), wherever it ran.
    #[serde(serialize_with = "secs")]
    pub fetch_time: Duration,
    /// Time the host spent waiting for rows inside `apply`.
    #[serde(serialize_with = "secs")]
    pub exposed_wait: Duration,
    /// Time the host's thread spent inside the step's calls (beginning it: hashing and
    /// queueing fetches; applying each layer, its waits for rows included; finishing it):
    /// Engram's share of the host's forward passes, measured where it runs.
    #[serde(serialize_with = "secs")]
    pub host_time: Duration,
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
        self.host_time += other.host_time;
        self.evicted_sequences += other.evicted_sequences;
        let level = other.store.cache_bytes;
        self.store.add(&other.store);
        self.store.cache_bytes = level;
    }

    /// What `self` (a running total) added to `earlier`, a total read before it.
    pub fn since(&self, earlier: &LookupStats) -> LookupStats {
        LookupStats {
            steps: self.steps.saturating_sub(earlier.steps),
            tokens: self.tokens.saturating_sub(earlier.tokens),
            rows_fetched: self.rows_fetched.saturating_sub(earlier.rows_fetched),
            bytes_fetched: self.bytes_fetched.saturating_sub(earlier.bytes_fetched),
            fetch_time: self.fetch_time.saturating_sub(earlier.fetch_time),
            exposed_wait: self.exposed_wait.saturating_sub(earlier.exposed_wait),
            host_time: self.host_time.saturating_sub(earlier.host_time),
            evicted_sequences: self
                .evicted_sequences
                .saturating_sub(earlier.evicted_sequences),
            store: self.store.since(&earlier.store),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `since` undoes `add` for every field (the store's cache size is a level, not a sum:
    /// it stays the latest).
    #[test]
    fn since_undoes_add() {
        let ms = Duration::from_millis;
        let earlier = LookupStats {
            steps: 2,
            tokens: 9,
            rows_fetched: 30,
            bytes_fetched: 900,
            fetch_time: ms(5),
            exposed_wait: ms(1),
            host_time: ms(7),
            evicted_sequences: 1,
            store: StoreCounters {
                cache_hits: 4,
                cache_misses: 6,
                cache_bytes: 100,
                backing_reads: 2,
                backing_bytes: 64,
            },
        };
        let step = LookupStats {
            steps: 1,
            tokens: 3,
            rows_fetched: 12,
            bytes_fetched: 360,
            fetch_time: ms(2),
            exposed_wait: ms(3),
            host_time: ms(11),
            evicted_sequences: 2,
            store: StoreCounters {
                cache_hits: 1,
                cache_misses: 5,
                cache_bytes: 120,
                backing_reads: 3,
                backing_bytes: 96,
            },
        };
        let mut total = earlier;
        total.add(&step);
        assert_eq!(total.host_time, ms(18));
        assert_eq!(total.since(&earlier), step);
        // A total read before a restart (larger than the later one) gives zeros, no panic.
        assert_eq!(earlier.since(&total).steps, 0);
    }
}
