//! The hot-row cache (`CachedStore`): gathers through it equal the inner store's bit for
//! bit (the store suite, warm and cold, large and tiny caches), hits and misses are counted
//! exactly, the inner store is called once per gather with only the missed rows, and the
//! byte bound holds.

use std::sync::{Arc, Mutex};

use engram_core::dtype::RowDtype;
use engram_core::error::Result;
use engram_core::table::{DenseTable, StoreCounters, TableStore};
use engram_core::testing::conformance::{check_store, RawTable};
use engram_cpu::table::hot_cache::ENTRY_OVERHEAD_BYTES;
use engram_cpu::table::{CachedStore, CpuTable};

const ALL: [RowDtype; 4] = [
    RowDtype::F32,
    RowDtype::BF16,
    RowDtype::F16,
    RowDtype::F8E4M3Scaled,
];

fn cpu_table(raw: &RawTable) -> Arc<dyn TableStore> {
    let (bytes, spec) = raw.to_safetensors();
    Arc::new(CpuTable::from_bytes("cached.safetensors", &bytes, &spec).unwrap())
}

#[test]
fn cached_gathers_equal_the_inner_store_warm_or_cold() {
    // A cache that holds every row, warmed with every other row: the suite's gathers mix
    // hits and misses.
    let warm = |raw: &RawTable| -> Box<dyn TableStore> {
        let store = CachedStore::new(cpu_table(raw), 1 << 30);
        let ids: Vec<u64> = (0..raw.rows).step_by(2).collect();
        let mut out = vec![0f32; ids.len() * raw.width];
        store.gather_f32(&ids, &mut out).unwrap();
        assert!(store.counters().cache_bytes > 0);
        Box::new(store)
    };
    check_store(&warm, &ALL);
    // A cache of about three rows: rows are evicted between and within gathers.
    let tiny = |raw: &RawTable| -> Box<dyn TableStore> {
        let inner = cpu_table(raw);
        let bound = 3 * CachedStore::row_weight(inner.as_ref());
        Box::new(CachedStore::new(inner, bound))
    };
    check_store(&tiny, &ALL);
}

/// A store that records the ids of every gather it serves and counts them as reads.
struct Spy {
    table: DenseTable,
    calls: Mutex<Vec<Vec<u64>>>,
}

impl Spy {
    fn new(rows: usize, width: usize) -> Arc<Self> {
        // Thirds: not bf16 values, so the cache keeps them as f32 (4 bytes each).
        let data = (0..rows * width).map(|i| (i as f32 + 0.5) / 3.0).collect();
        Arc::new(Spy {
            table: DenseTable::new("spy-table", width, data).unwrap(),
            calls: Mutex::new(Vec::new()),
        })
    }
    fn take_calls(&self) -> Vec<Vec<u64>> {
        std::mem::take(&mut self.calls.lock().unwrap())
    }
}

impl TableStore for Spy {
    fn name(&self) -> &str {
        self.table.name()
    }
    fn num_rows(&self) -> u64 {
        self.table.num_rows()
    }
    fn width(&self) -> usize {
        self.table.width()
    }
    fn dtype(&self) -> RowDtype {
        RowDtype::F32
    }
    fn gather_f32(&self, row_ids: &[u64], out: &mut [f32]) -> Result<()> {
        self.calls.lock().unwrap().push(row_ids.to_vec());
        self.table.gather_f32(row_ids, out)
    }
    fn counters(&self) -> StoreCounters {
        let calls = self.calls.lock().unwrap();
        StoreCounters {
            backing_reads: calls.len() as u64,
            backing_bytes: calls.iter().map(|c| c.len() as u64 * 16).sum(),
            ..StoreCounters::default()
        }
    }
}

fn gather(store: &CachedStore, ids: &[u64]) -> Vec<f32> {
    let mut out = vec![f32::NAN; ids.len() * store.width()];
    store.gather_f32(ids, &mut out).unwrap();
    out
}

#[test]
fn hits_and_misses_are_counted_exactly_and_misses_fetched_in_one_call() {
    let spy = Spy::new(10, 4);
    let store = CachedStore::new(spy.clone(), 1 << 20);
    let row_bytes = 4 * 4 + ENTRY_OVERHEAD_BYTES;

    // Cold: every id misses; the repeated row is fetched once, all in one call.
    let got = gather(&store, &[1, 2, 1]);
    assert_eq!(spy.take_calls(), vec![vec![1, 2]]);
    let c = store.counters();
    assert_eq!((c.cache_hits, c.cache_misses), (0, 3));
    assert_eq!(c.cache_bytes, 2 * row_bytes);
    let mut want = vec![0f32; 12];
    spy.table.gather_f32(&[1, 2, 1], &mut want).unwrap();
    assert_eq!(got, want);

    // Warm: 1 and 2 hit, 3 misses and alone is fetched.
    let got = gather(&store, &[2, 3, 1]);
    assert_eq!(spy.take_calls(), vec![vec![3]]);
    let c = store.counters();
    assert_eq!((c.cache_hits, c.cache_misses), (2, 4));
    assert_eq!(c.cache_bytes, 3 * row_bytes);
    spy.table.gather_f32(&[2, 3, 1], &mut want).unwrap();
    assert_eq!(got, want);

    // All hits: the inner store is not called.
    gather(&store, &[3, 3]);
    gather(&store, &[]);
    assert!(spy.take_calls().is_empty());
    let c = store.counters();
    assert_eq!((c.cache_hits, c.cache_misses), (4, 4));
    assert!((c.hit_rate() - 0.5).abs() < 1e-12);
    // The inner store's own counters are added (the spy counts its calls as reads, and
    // has forgotten the ones taken above).
    assert_eq!(c.backing_reads, 0);
    gather(&store, &[7]);
    assert_eq!(store.counters().backing_reads, 1);
    assert_eq!(store.counters().backing_bytes, 16);
}

#[test]
fn an_id_past_the_table_names_it_and_fetches_nothing() {
    let spy = Spy::new(10, 4);
    let store = CachedStore::new(spy.clone(), 1 << 20);
    let mut out = vec![0f32; 8];
    let e = store
        .gather_f32(&[3, 10], &mut out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("10") && e.contains("spy-table"), "{e}");
    assert!(spy.take_calls().is_empty());
    assert_eq!(store.counters(), StoreCounters::default());
}

#[test]
fn the_byte_bound_holds() {
    let spy = Spy::new(5000, 32);
    let row = 32 * 4 + ENTRY_OVERHEAD_BYTES;
    let bound = 100 * row;
    let store = CachedStore::new(spy, bound);
    let mut peak = 0;
    for start in (0..5000u64).step_by(250) {
        let ids: Vec<u64> = (start..start + 250).collect();
        gather(&store, &ids);
        let bytes = store.counters().cache_bytes;
        assert!(bytes <= bound, "{bytes} cached, bound {bound}");
        peak = peak.max(bytes);
    }
    assert!(
        peak >= bound / 2,
        "the cache holds rows up to its bound: {peak}"
    );
}

#[test]
fn hot_rows_survive_a_scan_of_rows_seen_once() {
    let spy = Spy::new(20_000, 16);
    let row = 16 * 4 + ENTRY_OVERHEAD_BYTES;
    let store = CachedStore::new(spy, 200 * row);
    let hot: Vec<u64> = (0..50).collect();
    for _ in 0..4 {
        gather(&store, &hot);
    }
    // 10 000 rows seen once each, in batches: far more than the cache holds.
    for start in (1000..11_000u64).step_by(100) {
        let ids: Vec<u64> = (start..start + 100).collect();
        gather(&store, &ids);
    }
    let before = store.counters();
    gather(&store, &hot);
    let after = store.counters().since(&before);
    assert!(
        after.hit_rate() >= 0.9,
        "hot rows were flushed by the scan: {} of 50 hit",
        after.cache_hits
    );
}
