//! De-duplication of a batch's row ids before they are staged, so that a row asked for
//! twice crosses the bus once.
//!
//! Small batches (a decode step) go through one hash map on the calling thread, which
//! keeps the rows in first-seen order. Large ones (prefill: 4096 tokens x 24 heads) would
//! spend milliseconds there, longer than the copy they save, so they are inserted from
//! every thread into one open-addressing table of atomic keys; the distinct rows then
//! come out in table order, which depends on which thread won a collision. Either order
//! is correct: each id's index points at its own row.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use rayon::prelude::*;

/// A fast hasher for row ids (a multiply-rotate in the style of rustc's FxHash).
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher(u64);

impl FxHasher {
    #[inline]
    fn add(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.add(b as u64);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.add(v);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

pub(crate) type FxMap = HashMap<u64, u32, BuildHasherDefault<FxHasher>>;

/// Batches from which de-duplication (and writing the gather's i64 sources) runs on every
/// thread. Below it, waking the pool and the table's extra passes cost more than the
/// work: on the H200 machines (a 16-core VM) 4096 ids took 65 us on one thread and
/// 173-192 us on all, 16384 about the same either way, 65536 1.1-1.7 ms against
/// 0.48-0.55 ms (`gpu-bench`'s `staging` section).
pub const PARALLEL_IDS: usize = 16384;

/// A free slot of the parallel table. Row ids are checked against the table's row count
/// before they get here, so no id equals it.
const EMPTY: u64 = u64::MAX;

/// Table slots per chunk when numbering the distinct ids.
const CHUNK: usize = 4096;

/// Reusable buffers of [`Deduper::dedupe`].
#[derive(Default)]
pub struct Deduper {
    map: FxMap,
    keys: Vec<AtomicU64>,
    /// Per table slot: the index of its id among the distinct ones.
    dense: Vec<u32>,
}

impl Deduper {
    /// The distinct ids of `ids`, and for each id its index among them.
    pub fn dedupe(&mut self, ids: &[u64]) -> (Vec<u64>, Vec<u32>) {
        self.dedupe_with(ids, ids.len() >= PARALLEL_IDS)
    }

    /// [`Self::dedupe`] through the parallel table or the serial map, as `parallel` says.
    pub fn dedupe_with(&mut self, ids: &[u64], parallel: bool) -> (Vec<u64>, Vec<u32>) {
        if parallel {
            self.dedupe_parallel(ids)
        } else {
            dedupe_serial(ids, &mut self.map)
        }
    }

    fn dedupe_parallel(&mut self, ids: &[u64]) -> (Vec<u64>, Vec<u32>) {
        // At most half full, so probes stay short.
        let cap = (2 * ids.len()).next_power_of_two();
        if self.keys.len() < cap {
            self.keys.resize_with(cap, || AtomicU64::new(EMPTY));
            self.dense.resize(cap, 0);
        }
        let (keys, dense) = (&self.keys[..cap], &mut self.dense[..cap]);
        keys.par_iter()
            .with_min_len(CHUNK)
            .for_each(|k| k.store(EMPTY, Relaxed));
        let mask = cap - 1;
        let shift = 64 - cap.trailing_zeros();
        let slots: Vec<u32> = ids
            .par_iter()
            .with_min_len(256)
            .map(|&id| {
                debug_assert_ne!(id, EMPTY);
                let mut s = (id.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> shift) as usize;
                loop {
                    let cur = keys[s].load(Relaxed);
                    if cur == id {
                        return s as u32;
                    }
                    if cur == EMPTY {
                        match keys[s].compare_exchange(EMPTY, id, Relaxed, Relaxed) {
                            Ok(_) => return s as u32,
                            Err(won) if won == id => return s as u32,
                            Err(_) => {}
                        }
                    }
                    s = (s + 1) & mask;
                }
            })
            .collect();
        // Number the occupied slots in table order: counts per chunk, then offsets.
        let counts: Vec<u32> = keys
            .par_chunks(CHUNK)
            .map(|c| c.iter().filter(|k| k.load(Relaxed) != EMPTY).count() as u32)
            .collect();
        let mut base = Vec::with_capacity(counts.len());
        let mut total = 0u32;
        for c in &counts {
            base.push(total);
            total += c;
        }
        let mut unique = vec![0u64; total as usize];
        // Each chunk writes its own range of `unique`: split it up front.
        let mut parts: Vec<&mut [u64]> = Vec::with_capacity(counts.len());
        let mut rest = unique.as_mut_slice();
        for &c in &counts {
            let (head, tail) = rest.split_at_mut(c as usize);
            parts.push(head);
            rest = tail;
        }
        dense
            .par_chunks_mut(CHUNK)
            .zip(keys.par_chunks(CHUNK))
            .zip(parts.into_par_iter().zip(base.par_iter()))
            .for_each(|((d, k), (u, &b))| {
                let mut j = 0usize;
                for (slot, key) in d.iter_mut().zip(k) {
                    let key = key.load(Relaxed);
                    if key != EMPTY {
                        *slot = b + j as u32;
                        u[j] = key;
                        j += 1;
                    }
                }
            });
        let dense = &*dense;
        let index = slots
            .par_iter()
            .with_min_len(1024)
            .map(|&s| dense[s as usize])
            .collect();
        (unique, index)
    }
}

/// The distinct ids of `ids` in first-seen order, and for each id its index among them.
pub(crate) fn dedupe_serial(ids: &[u64], map: &mut FxMap) -> (Vec<u64>, Vec<u32>) {
    map.clear();
    let mut unique = Vec::new();
    let index = ids
        .iter()
        .map(|&id| {
            *map.entry(id).or_insert_with(|| {
                unique.push(id);
                (unique.len() - 1) as u32
            })
        })
        .collect();
    (unique, index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serial_keeps_first_seen_order() {
        let mut map = FxMap::default();
        let (u, idx) = dedupe_serial(&[7, 3, 7, 9, 3, 3], &mut map);
        assert_eq!(u, [7, 3, 9]);
        assert_eq!(idx, [0, 1, 0, 2, 1, 1]);
        let (u, idx) = dedupe_serial(&[], &mut map);
        assert!(u.is_empty() && idx.is_empty());
    }

    /// Every id maps back to itself, each distinct id appears once, over batch sizes on
    /// both paths and with heavy and no repetition; the buffers
    /// are reused from call to call (a smaller call after a larger one).
    #[test]
    fn parallel_table_maps_every_id_to_itself() {
        let mut d = Deduper::default();
        let mut x = 0x1234_5678_9abc_def1u64;
        for (n, distinct) in [
            (70_000usize, 1_000u64),
            (5_000, 1 << 40),
            (3_000, 7),
            (2_047, 100),
            (65_536, 1 << 20),
            (2_048, 1),
        ] {
            let ids: Vec<u64> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x % distinct
                })
                .collect();
            let (unique, index) = d.dedupe_with(&ids, n >= 2048);
            assert_eq!(index.len(), n);
            for (k, &id) in ids.iter().enumerate() {
                assert_eq!(unique[index[k] as usize], id, "n {n}, position {k}");
            }
            let mut sorted = unique.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), unique.len(), "n {n}: an id staged twice");
            let want: std::collections::HashSet<u64> = ids.iter().copied().collect();
            assert_eq!(unique.len(), want.len(), "n {n}");
        }
    }
}
