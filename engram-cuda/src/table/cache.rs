//! [`CachedTable`]: a device-resident, direct-mapped cache of hot rows in front of a host
//! table. n-gram frequencies are Zipfian, so a cache holding a small fraction of the rows
//! serves most lookups from device memory; misses are staged like [`super::PinnedTable`]
//! and inserted into the cache after the gather that uses them.
//!
//! The host keeps the tags ([`CachePlanner`]), so a prefetch knows at once which ids hit:
//! hits read their cache slot, misses read the staged rows. A miss replaces the row in its
//! slot only if it has been looked up more often lately ([`FrequencySketch`], TinyLFU's
//! admission: a count-min sketch of recent lookups, halved as it fills), so a burst of rows
//! seen once does not push out the hot rows that share their slots; an empty slot takes
//! any miss. The CPU's hot-row cache (`engram_cpu::table::CachedStore`) is frequency-aware
//! the same way (S3-FIFO, whose probation queue plays this part). Inserts run after the gather
//! of the same batch on the compute stream, so a hit whose slot a miss of the same batch
//! replaces still reads the old row. The planner's tags assume every earlier batch's
//! inserts; the table therefore applies payloads strictly in prefetch order (an earlier
//! pending prefetch is applied before a later one is gathered, and before its staging
//! buffer is reused).

use std::collections::HashSet;
use std::hash::BuildHasherDefault;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut, LaunchConfig};
use engram_core::table::TableStore;

use super::base::{store_base_accessors, StoreBase};
use super::dedupe::{FxHasher, FxMap};
use super::pinned::{row_regions, stage_rows};
use super::staging::{write_i64s, Layout};
use super::{launch_gather, DeviceTableStore, GatherSources, Placement, Prefetch};
use crate::backend::{CudaBackend, BLOCK, WARPS_PER_BLOCK};
use crate::error::{CudaBackendError, Result};
use crate::host_table::HostTable;
use crate::kernels::{In, Out};

const EMPTY: u64 = u64::MAX;

/// The host-side tags of a direct-mapped cache: slot `slot_of(row)` holds at most one row.
#[derive(Clone, Debug)]
pub struct CachePlanner {
    tags: Vec<u64>,
    bits: u32,
    /// Lookup counts for admission; `None`: every miss replaces its slot's row.
    sketch: Option<FrequencySketch>,
}

/// A count-min sketch of how often each row was looked up lately (TinyLFU's frequency
/// estimate): four counters per row in four rows of 4-bit-range counters, the estimate
/// being the smallest; after `10 x` the cache's slots in increments every counter is
/// halved, so old popularity fades. Written here rather than taken from a crate because it
/// sits in the planner's per-id loop and needs only these few lines (saturating u8
/// counters, multiplicative hashing).
#[derive(Clone, Debug)]
pub struct FrequencySketch {
    counters: Vec<u8>,
    /// log2 of the counters in one of the four rows.
    bits: u32,
    increments: u64,
    reset_after: u64,
}

/// Odd multipliers of the four hash rows.
const SKETCH_SEEDS: [u64; 4] = [
    0x9e37_79b9_7f4a_7c15,
    0xc2b2_ae3d_27d4_eb4f,
    0x1656_67b1_9e37_79f9,
    0xd6e8_feb8_6659_fd93,
];
/// Counters saturate here (4 bits, as in TinyLFU).
const SKETCH_MAX: u8 = 15;

impl FrequencySketch {
    /// A sketch for a cache of `slots` rows: 2 counters a slot in each of the four rows.
    pub fn new(slots: usize) -> Self {
        let per_row = (2 * slots.max(1)).next_power_of_two().max(64);
        Self {
            counters: vec![0; 4 * per_row],
            bits: per_row.trailing_zeros(),
            increments: 0,
            reset_after: 10 * slots.max(1) as u64,
        }
    }

    #[inline]
    fn index(&self, row: u64, i: usize) -> usize {
        let h = (row ^ (row >> 29)).wrapping_mul(SKETCH_SEEDS[i]) >> (64 - self.bits);
        (i << self.bits) + h as usize
    }

    /// Counts one lookup of `row`.
    #[inline]
    pub fn increment(&mut self, row: u64) {
        for i in 0..4 {
            let k = self.index(row, i);
            self.counters[k] = (self.counters[k] + 1).min(SKETCH_MAX);
        }
        self.increments += 1;
        if self.increments >= self.reset_after {
            self.counters.iter_mut().for_each(|c| *c /= 2);
            self.increments /= 2;
        }
    }

    /// How often `row` was looked up lately (never below the truth, within the window).
    #[inline]
    pub fn estimate(&self, row: u64) -> u8 {
        (0..4)
            .map(|i| self.counters[self.index(row, i)])
            .min()
            .unwrap_or(0)
    }
}

/// What one batch of lookups does with the cache.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CachePlan {
    /// Per id: its cache slot (>= 0), or `-(j+1)` for the j-th staged miss.
    pub sources: Vec<i64>,
    /// Distinct missed rows, in staging order.
    pub misses: Vec<u64>,
    /// (slot, staged miss) pairs to copy into the cache after the gather; one per slot.
    pub inserts: Vec<(u32, u32)>,
    pub hits: usize,
}

impl CachePlanner {
    /// A cache of `slots` rows (rounded up to a power of two) with frequency-aware
    /// admission: a miss replaces its slot's row only if looked up more often lately.
    pub fn new(slots: usize) -> Self {
        let slots = slots.max(1).next_power_of_two();
        Self {
            tags: vec![EMPTY; slots],
            bits: slots.trailing_zeros(),
            sketch: Some(FrequencySketch::new(slots)),
        }
    }

    /// The same cache where every miss replaces its slot's row (no admission; the
    /// behaviour before admission, kept for comparison).
    pub fn always_replace(slots: usize) -> Self {
        Self {
            sketch: None,
            ..Self::new(slots)
        }
    }

    pub fn slots(&self) -> usize {
        self.tags.len()
    }

    /// The slot of `row` (Fibonacci hashing of the id, so neighbouring ids spread).
    #[inline]
    pub fn slot_of(&self, row: u64) -> usize {
        if self.bits == 0 {
            0
        } else {
            (row.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - self.bits)) as usize
        }
    }

    /// Plans one batch and updates the tags as if its inserts had run.
    pub fn plan(&mut self, ids: &[u64]) -> CachePlan {
        let mut map = FxMap::default();
        self.plan_with(ids, &mut map)
    }

    pub(crate) fn plan_with(&mut self, ids: &[u64], map: &mut FxMap) -> CachePlan {
        map.clear();
        let mut claimed: HashSet<usize, BuildHasherDefault<FxHasher>> = HashSet::default();
        let mut plan = CachePlan {
            sources: Vec::with_capacity(ids.len()),
            ..Default::default()
        };
        for &id in ids {
            let slot = self.slot_of(id);
            if let Some(sketch) = &mut self.sketch {
                sketch.increment(id);
            }
            if self.tags[slot] == id {
                plan.sources.push(slot as i64);
                plan.hits += 1;
                continue;
            }
            let resident = self.tags[slot];
            let admit = match &self.sketch {
                Some(sketch) if resident != EMPTY => {
                    sketch.estimate(id) > sketch.estimate(resident)
                }
                _ => true,
            };
            let j = *map.entry(id).or_insert_with(|| {
                plan.misses.push(id);
                let j = (plan.misses.len() - 1) as u32;
                if admit && claimed.insert(slot) {
                    plan.inserts.push((slot as u32, j));
                }
                j
            });
            plan.sources.push(-(j as i64) - 1);
        }
        for &(slot, j) in &plan.inserts {
            self.tags[slot as usize] = plan.misses[j as usize];
        }
        plan
    }

    /// Forgets every cached row.
    pub fn clear(&mut self) {
        self.tags.fill(EMPTY);
    }
}

/// A host table fronted by a device cache of `slots` rows (stored format).
pub struct CachedTable {
    backend: CudaBackend,
    host: HostTable,
    cache_values: CudaSlice<u8>,
    cache_scales: Option<CudaSlice<u8>>,
    planner: CachePlanner,
    base: StoreBase,
    map: FxMap,
    /// Highest prefetch sequence number whose inserts have been queued.
    applied_seq: u64,
}

impl CachedTable {
    /// Puts a cache of at least `cache_rows` rows (a power of two) in front of `host`.
    pub fn new(backend: &CudaBackend, host: HostTable, cache_rows: usize) -> Result<Self> {
        let planner = CachePlanner::new(cache_rows);
        let slots = planner.slots();
        let cache_values = backend.alloc_zeros::<u8>(slots * host.value_row_bytes())?;
        let cache_scales = match host.scale_row_bytes() {
            0 => None,
            sb => Some(backend.alloc_zeros::<u8>(slots * sb)?),
        };
        Ok(Self {
            backend: backend.clone(),
            base: StoreBase::for_table(backend, &host)?,
            host,
            cache_values,
            cache_scales,
            planner,
            map: FxMap::default(),
            applied_seq: 0,
        })
    }

    /// Rows the cache holds.
    pub fn cache_rows(&self) -> usize {
        self.planner.slots()
    }

    pub fn host(&self) -> &HostTable {
        &self.host
    }

    /// Queues the cache inserts of the payload in ring slot `i` on the compute stream
    /// without gathering it (its ticket becomes stale).
    fn apply_pending(&mut self, i: usize) -> Result<()> {
        let seq = self.base.ring.slot(i).seq;
        let backend = self.backend.clone();
        let stream = backend.stream().clone();
        let (rb, sb) = (
            self.host.value_row_bytes() as i64,
            self.host.scale_row_bytes() as i64,
        );
        let (cache_values, cache_scales) = (&mut self.cache_values, &mut self.cache_scales);
        self.base.ring.with_payload(i, &stream, |base, layout| {
            launch_inserts(
                &backend,
                &stream,
                cache_values,
                cache_scales.as_mut(),
                base,
                layout,
                rb,
                sb,
            )
        })?;
        self.applied_seq = self.applied_seq.max(seq);
        Ok(())
    }
}

/// Launches `engram_cache_insert` for the pairs of a payload at device address `base`.
#[allow(clippy::too_many_arguments)]
fn launch_inserts(
    backend: &CudaBackend,
    stream: &Arc<CudaStream>,
    cache_values: &mut CudaSlice<u8>,
    cache_scales: Option<&mut CudaSlice<u8>>,
    base: u64,
    layout: &Layout,
    rb: i64,
    sb: i64,
) -> Result<()> {
    if layout.pairs == 0 {
        return Ok(());
    }
    let m = layout.pairs as i32;
    let (cv, g1) = cache_values.device_ptr_mut(stream);
    let scales = cache_scales.map(|s| s.device_ptr_mut(stream));
    let cs = scales.as_ref().map_or(0u64, |(p, _)| *p);
    let staged_values = base + layout.values_at as u64;
    let staged_scales = if cs != 0 {
        base + layout.scales_at as u64
    } else {
        0
    };
    let pairs = base + layout.pairs_at as u64;
    let cfg = LaunchConfig {
        grid_dim: (backend.grid(layout.pairs.div_ceil(WARPS_PER_BLOCK)), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let r = unsafe {
        backend.kernels().cache_insert(
            stream,
            cfg,
            Out::Addr(cv),
            Out::Addr(cs),
            In::Addr(staged_values),
            In::Addr(staged_scales),
            In::Addr(pairs),
            m,
            rb,
            sb,
        )
    };
    drop(g1);
    drop(scales);
    r
}

impl DeviceTableStore for CachedTable {
    store_base_accessors!();

    fn placement(&self) -> Placement {
        Placement::DeviceCache
    }

    fn prefetch(&mut self, row_ids: &[u64]) -> Result<Prefetch> {
        self.base.check_ids(row_ids)?;
        // The planner's tags assume the inserts of the payload about to be overwritten.
        let next = self.base.ring.next_slot();
        if self.base.ring.slot(next).pending {
            self.apply_pending(next)?;
        }
        let t0 = Instant::now();
        let (rb, sb) = (self.host.value_row_bytes(), self.host.scale_row_bytes());
        let plan = self.planner.plan_with(row_ids, &mut self.map);
        let layout = Layout::new(row_ids.len(), plan.misses.len(), rb, sb, plan.inserts.len());
        let (slot, buf) = self.base.ring.begin(layout, row_ids.len())?;
        write_i64s(buf, layout.sources_at, plan.sources.len(), |k| {
            plan.sources[k]
        });
        write_i64s(buf, layout.pairs_at, 2 * plan.inserts.len(), |k| {
            let (slot, j) = plan.inserts[k / 2];
            if k % 2 == 0 {
                slot as i64
            } else {
                j as i64
            }
        });
        let (values, scales) = row_regions(buf, &layout, rb, sb);
        stage_rows(&self.host, &plan.misses, values, scales);
        self.base.stats.host_gather_ns += t0.elapsed().as_nanos() as u64;
        let ticket = self.base.ring.submit(slot)?;
        self.base.stats.prefetches += 1;
        self.base.stats.lookups += row_ids.len() as u64;
        self.base.stats.hits += plan.hits as u64;
        self.base.stats.rows_transferred += plan.misses.len() as u64;
        self.base.stats.bytes_transferred += layout.len as u64;
        Ok(ticket)
    }

    fn gather_prefetched(
        &mut self,
        ticket: Prefetch,
        out: &mut CudaSlice<f32>,
        stream: &Arc<CudaStream>,
    ) -> Result<()> {
        let slot = self.base.slot_of(&ticket)?;
        let seq = self.base.ring.slot(slot).seq;
        if seq <= self.applied_seq {
            return Err(CudaBackendError::Invalid(
                "cached table: prefetches must be gathered in the order they were issued".into(),
            ));
        }
        let other = slot ^ 1;
        if self.base.ring.slot(other).pending && self.base.ring.slot(other).seq < seq {
            // An earlier prefetch was never gathered: its inserts come first.
            self.apply_pending(other)?;
        }
        let n = ticket.rows();
        let backend = self.backend.clone();
        let (width, dtype) = (self.host.width(), self.host.dtype());
        let (rb, sb) = (
            self.host.value_row_bytes() as i64,
            self.host.scale_row_bytes() as i64,
        );
        let (cache_values, cache_scales) = (&mut self.cache_values, &mut self.cache_scales);
        self.base.ring.with_payload(slot, stream, |base, layout| {
            {
                let (cv, g1) = cache_values.device_ptr_mut(stream);
                let scales = cache_scales.as_mut().map(|s| s.device_ptr_mut(stream));
                let cs = scales.as_ref().map_or(0u64, |(p, _)| *p);
                let srcs = GatherSources {
                    a_values: cv,
                    a_scales: cs,
                    b_values: base + layout.values_at as u64,
                    b_scales: if cs != 0 {
                        base + layout.scales_at as u64
                    } else {
                        0
                    },
                    src: base + layout.sources_at as u64,
                };
                launch_gather(&backend, stream, srcs, out, n, width, dtype)?;
                drop(g1);
                drop(scales);
            }
            launch_inserts(
                &backend,
                stream,
                cache_values,
                cache_scales.as_mut(),
                base,
                layout,
                rb,
                sb,
            )
        })?;
        self.applied_seq = seq;
        self.base.stats.gathers += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::dedupe::dedupe_serial;
    use super::*;

    #[test]
    fn second_lookup_hits_and_conflicts_stay_correct() {
        let mut p = CachePlanner::new(8);
        assert_eq!(p.slots(), 8);
        let ids = [10u64, 11, 10, 12];
        let first = p.plan(&ids);
        assert_eq!(first.hits, 0);
        assert_eq!(first.misses, [10, 11, 12]);
        assert_eq!(first.sources, [-1, -2, -1, -3]);
        let again = p.plan(&ids);
        // Every id whose slot it won is now a hit and reads that slot.
        for (&id, &src) in ids.iter().zip(&again.sources) {
            if src >= 0 {
                assert_eq!(src as usize, p.slot_of(id));
            }
        }
        let inserted: Vec<u64> = first
            .inserts
            .iter()
            .map(|&(_, j)| first.misses[j as usize])
            .collect();
        let expect_hits = ids.iter().filter(|id| inserted.contains(id)).count();
        assert_eq!(again.hits, expect_hits);
        assert!(
            again.hits >= 1,
            "the first distinct row always wins its slot"
        );
    }

    #[test]
    fn one_insert_per_slot_and_hits_never_point_at_replaced_rows() {
        let mut p = CachePlanner::always_replace(1);
        // Every id maps to slot 0: only the first miss is inserted.
        let plan = p.plan(&[5, 6, 7]);
        assert_eq!(plan.inserts, [(0, 0)]);
        let plan = p.plan(&[5, 6, 5]);
        assert_eq!(plan.sources, [0, -1, 0]);
        assert_eq!(plan.hits, 2);
        assert_eq!(plan.inserts, [(0, 0)]); // 6 replaces 5 after this batch's gather
        let plan = p.plan(&[5]);
        assert_eq!(plan.hits, 0);
        p.clear();
        assert_eq!(p.plan(&[6]).hits, 0);
    }

    #[test]
    fn a_hot_row_survives_a_scan_of_rows_seen_once() {
        for (admission, survives) in [(true, true), (false, false)] {
            let mut p = if admission {
                CachePlanner::new(64)
            } else {
                CachePlanner::always_replace(64)
            };
            for _ in 0..3 {
                p.plan(&[5]);
            }
            // 100 rows of the hot row's slot, each looked up once (fewer lookups than
            // the sketch's window of 10 x 64, so nothing has aged).
            let slot = p.slot_of(5);
            let cold: Vec<u64> = (100..)
                .filter(|&r| p.slot_of(r) == slot)
                .take(100)
                .collect();
            for &r in &cold {
                p.plan(&[r]);
            }
            assert_eq!(p.plan(&[5]).hits == 1, survives, "admission {admission}");
        }
    }

    #[test]
    fn admission_catches_more_of_a_zipf_stream_than_always_replacing() {
        // Zipf(1) ranks over 100k rows, scattered, in batches of 256 ids; 1024 slots.
        let stream = |seed: u64| -> Vec<u64> {
            let mut rng = engram_core::testing::TestRng::new(seed);
            let log_rows = (100_000f64).ln();
            (0..200_000)
                .map(|_| {
                    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                    let rank = ((u * log_rows).exp() as u64).clamp(1, 100_000) - 1;
                    rank.wrapping_mul(0x2545_f491_4f6c_dd1d) % 100_000
                })
                .collect()
        };
        let ids = stream(3);
        let rate = |mut p: CachePlanner| {
            let hits: usize = ids.chunks(256).map(|b| p.plan(b).hits).sum();
            hits as f64 / ids.len() as f64
        };
        let (tiny, direct) = (
            rate(CachePlanner::new(1024)),
            rate(CachePlanner::always_replace(1024)),
        );
        eprintln!("Zipf(1), 100k rows, 1024 slots: hit rate {tiny:.3} with admission, {direct:.3} always replacing");
        assert!(
            tiny > direct + 0.05,
            "admission {tiny:.3} vs always replacing {direct:.3}"
        );
    }

    #[test]
    fn the_sketch_counts_and_ages() {
        let mut s = FrequencySketch::new(16);
        for _ in 0..8 {
            s.increment(42);
        }
        s.increment(7);
        assert!(s.estimate(42) >= 8, "never below the truth");
        assert!(s.estimate(7) >= 1);
        for _ in 0..20 {
            s.increment(42);
        }
        assert_eq!(s.estimate(42), SKETCH_MAX, "saturates");
        // The window is 10 x 16 increments: the 160th halves every counter.
        for _ in 29..160 {
            s.increment(1);
        }
        assert!(s.estimate(42) < SKETCH_MAX, "an old count is halved");
        assert!(s.estimate(42) >= SKETCH_MAX / 2);
    }

    #[test]
    fn dedupe_helper_matches_planner_misses() {
        let mut map = FxMap::default();
        let ids = [3u64, 9, 3, 4];
        let (u, _) = dedupe_serial(&ids, &mut map);
        let plan = CachePlanner::new(64).plan(&ids);
        assert_eq!(u, plan.misses);
    }
}
