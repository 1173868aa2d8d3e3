//! Row gathers per table placement, row format and rows per call, each as a fraction of
//! the limit that bounds it: the device-to-device copy for a device-resident table
//! (bytes read plus written, like the copy), the pinned host-to-device copy for every
//! placement whose rows live in host memory (stored row bytes delivered).
//!
//! Ids are distinct within a call and fresh from call to call (no duplicates for the
//! de-duplication to remove, nothing left in L2 from the call before), except for the
//! device cache, which gets a hot set it holds and cold rows it does not, mixed to a
//! planned hit rate; the hit rate reported is the one the store counted.

use std::path::Path;
use std::sync::Arc;

use engram_core::dtype::RowDtype;
use engram_core::table::TableStore;
use engram_cuda::cudarc::driver::sys::CUevent_flags;
use engram_cuda::cudarc::driver::{CudaSlice, CudaStream};
use engram_cuda::table::CachePlanner;
use engram_cuda::{
    CachedTable, CudaBackend, DeviceTable, DeviceTableStore, HostTable, PinnedTable, ZeroCopyTable,
};
use serde_json::{json, Value};

use crate::data::{distinct_ids, make_table};
use crate::link::Limits;
use crate::report::{gbps, median_p90, time_stream, wall_samples, Report, Res};

/// Row width of every benchmark table (V4.1's `engram_head_dim`).
pub const WIDTH: usize = 256;

/// How a placement's ids are drawn.
#[derive(Clone, Copy)]
enum Draw {
    /// Distinct, fresh ids.
    Fresh,
    /// A planned fraction of the ids from the cache's hot set.
    Hits(f64),
}

/// Ids for a device cache: a hot set with one row per slot of one half of the slots, and
/// cold rows that map to the other half (so they never evict a hot row).
struct CacheIds {
    hot: Vec<u64>,
    cold: Vec<u64>,
    hot_at: usize,
    cold_at: usize,
    /// Ids handed out so far (the planned hit rate holds over calls of one row too).
    pos: u64,
}

impl CacheIds {
    fn new(rows: u64, slots: usize) -> Self {
        let planner = CachePlanner::new(slots);
        let half = planner.slots() / 2;
        let mut taken = vec![false; half];
        let (mut hot, mut cold) = (Vec::new(), Vec::new());
        for r in distinct_ids(rows as usize, rows, 0) {
            let s = planner.slot_of(r);
            if s >= half {
                cold.push(r);
            } else if !taken[s] {
                taken[s] = true;
                hot.push(r);
            }
        }
        Self {
            hot,
            cold,
            hot_at: 0,
            cold_at: 0,
            pos: 0,
        }
    }

    fn next(&mut self, n: usize, hit: f64) -> Vec<u64> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let p = self.pos as f64;
            self.pos += 1;
            if ((p + 1.0) * hit).floor() > (p * hit).floor() {
                v.push(self.hot[self.hot_at % self.hot.len()]);
                self.hot_at += 1;
            } else {
                v.push(self.cold[self.cold_at % self.cold.len()]);
                self.cold_at += 1;
            }
        }
        v
    }
}

/// Per call: sequential latency (the call, then a wait for the device), pipelined
/// throughput (the next prefetch issued before this gather, one wait at the end), and the
/// device time of the gather alone (events around `gather_prefetched` once the prefetch
/// has landed: the part on the layer's critical path).
struct Timing {
    seq_median_s: f64,
    seq_p90_s: f64,
    pipelined_s: f64,
    kernel_median_s: f64,
}

fn time_store(
    store: &mut dyn DeviceTableStore,
    mut ids: impl FnMut() -> Vec<u64>,
    reps: usize,
    out: &mut CudaSlice<f32>,
    stream: &Arc<CudaStream>,
    copy: &Arc<CudaStream>,
) -> Res<Timing> {
    let batches: Vec<Vec<u64>> = (0..reps + 3).map(|_| ids()).collect();
    let mut seq = wall_samples(3, reps, |k| {
        store.gather_to_device(&batches[k], out, stream)?;
        Ok(stream.synchronize()?)
    })?;
    let (seq_median_s, seq_p90_s) = median_p90(&mut seq);
    let batches: Vec<Vec<u64>> = (0..reps + 1).map(|_| ids()).collect();
    let t = std::time::Instant::now();
    let mut pending = store.prefetch(&batches[0])?;
    for b in &batches[1..] {
        let next = store.prefetch(b)?;
        store.gather_prefetched(pending, out, stream)?;
        pending = next;
    }
    store.gather_prefetched(pending, out, stream)?;
    stream.synchronize()?;
    let pipelined_s = t.elapsed().as_secs_f64() / batches.len() as f64;
    let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let mut kernel = Vec::with_capacity(reps);
    for b in (0..reps).map(|_| ids()) {
        let ticket = store.prefetch(&b)?;
        copy.synchronize()?;
        stream.synchronize()?;
        let a = stream.record_event(timing)?;
        store.gather_prefetched(ticket, out, stream)?;
        let e = stream.record_event(timing)?;
        kernel.push(a.elapsed_ms(&e)? as f64 / 1e3);
    }
    Ok(Timing {
        seq_median_s,
        seq_p90_s,
        pipelined_s,
        kernel_median_s: median_p90(&mut kernel).0,
    })
}

/// Seconds per launch of the device table's gather kernel, ids already on the device,
/// `reps` launches back to back between two events (as the copy is timed), per size.
fn device_kernel_back_to_back(
    be: &CudaBackend,
    host: &HostTable,
    sizes: &[usize],
    out: &mut CudaSlice<f32>,
) -> Res<Vec<(usize, f64)>> {
    let table = DeviceTable::upload(be, host)?;
    let stream = be.stream().clone();
    let rows = host.num_rows();
    let mut v = Vec::new();
    for &n in sizes {
        // Several id sets in turn, so L2 does not hold the previous launch's rows.
        let sets: Vec<_> = (0..4u64)
            .map(|k| {
                let ids: Vec<i64> = distinct_ids(n, rows, k * n as u64 + 12_345)
                    .into_iter()
                    .map(|r| r as i64)
                    .collect();
                be.upload(&ids)
            })
            .collect::<Result<_, _>>()?;
        let reps = reps_for(n).max(20);
        let mut k = 0;
        let ms = time_stream(&stream, reps, || {
            k += 1;
            // SAFETY: distinct_ids draws every id below the table's row count.
            Ok(unsafe { table.gather_device_ids(&sets[k % sets.len()], n, out, &stream) }?)
        })?;
        v.push((n, ms / 1e3));
    }
    Ok(v)
}

fn reps_for(n: usize) -> usize {
    match n {
        0..=64 => 200,
        65..=4096 => 40,
        _ => 12,
    }
}

/// The placements of one table: (name, store, how ids are drawn).
type Placements = Vec<(String, Box<dyn DeviceTableStore>, Draw)>;

fn placements(
    be: &CudaBackend,
    host: &HostTable,
    mapped: &HostTable,
    notes: &mut Vec<String>,
) -> Res<Placements> {
    let cache_rows = (host.num_rows() / 4) as usize;
    let mut v: Placements = vec![
        (
            "device".into(),
            Box::new(DeviceTable::upload(be, host)?),
            Draw::Fresh,
        ),
        (
            "pinned-host".into(),
            Box::new(PinnedTable::new(be, host.clone())?),
            Draw::Fresh,
        ),
        (
            "pinned-host from mmap".into(),
            Box::new(PinnedTable::new(be, mapped.clone())?),
            Draw::Fresh,
        ),
    ];
    for (name, t) in [("zero-copy RAM", host), ("zero-copy mmap", mapped)] {
        match ZeroCopyTable::new(be, t.clone()) {
            Ok(z) => v.push((name.into(), Box::new(z), Draw::Fresh)),
            Err(e) => notes.push(format!("{name} ({}): {e}", host.dtype())),
        }
    }
    for hit in [0.5, 0.9] {
        v.push((
            format!("device-cache {:.0}% hits", hit * 100.0),
            Box::new(CachedTable::new(be, host.clone(), cache_rows)?),
            Draw::Hits(hit),
        ));
    }
    Ok(v)
}

pub fn measure(
    be: &CudaBackend,
    rows: u64,
    sizes: &[usize],
    limits: Limits,
    dir: &Path,
    r: &mut Report,
) -> Res<()> {
    let stream = be.stream().clone();
    let copy = be.copy_stream().clone();
    let max_n = *sizes.iter().max().unwrap_or(&1);
    let mut out = be.alloc_zeros::<f32>(max_n * WIDTH)?;
    let mut rows_json = Vec::new();
    let mut notes = Vec::new();
    for dtype in [RowDtype::F8E4M3Scaled, RowDtype::BF16, RowDtype::F32] {
        let t = std::time::Instant::now();
        let host = make_table(dtype, rows, WIDTH)?;
        let path = dir.join(format!("gather-{dtype}.bin").replace('+', "_"));
        let scales_at = host.write_raw(&path)?;
        let mapped = HostTable::map_file(&path, dtype, rows, WIDTH, 0, scales_at)?;
        let row_bytes = host.value_row_bytes() + host.scale_row_bytes();
        eprintln!(
            "  gather: {dtype} table of {rows} rows x {row_bytes} B built and written in {:.2} s",
            t.elapsed().as_secs_f64()
        );
        let kernel_b2b = device_kernel_back_to_back(be, &host, sizes, &mut out)?;
        let cache_ids_slots = (rows / 4) as usize;
        for (name, mut store, draw) in placements(be, &host, &mapped, &mut notes)? {
            let mut cache_ids =
                matches!(draw, Draw::Hits(_)).then(|| CacheIds::new(rows, cache_ids_slots));
            if let Some(c) = &cache_ids {
                // Make the hot set resident.
                for chunk in c.hot.chunks(max_n) {
                    store.gather_to_device(chunk, &mut out, &stream)?;
                }
                stream.synchronize()?;
            }
            let mut start = 0u64;
            for &n in sizes {
                store.reset_stats();
                let mut ids = || match (&mut cache_ids, draw) {
                    (Some(c), Draw::Hits(h)) => c.next(n, h),
                    _ => {
                        start += n as u64;
                        distinct_ids(n, rows, start)
                    }
                };
                let tm = time_store(
                    store.as_mut(),
                    &mut ids,
                    reps_for(n),
                    &mut out,
                    &stream,
                    &copy,
                )?;
                let st = store.stats();
                let stored = (n * row_bytes) as f64;
                let device = name == "device";
                // A device gather reads the stored rows and the ids, writes f32 rows.
                let moved = if device {
                    (n * (row_bytes + 8 + 4 * WIDTH)) as f64
                } else {
                    stored
                };
                let (limit, limit_name) = if device {
                    (limits.d2d, "d2d")
                } else {
                    (limits.h2d_pinned, "h2d_pinned")
                };
                let rate = gbps(moved, tm.pipelined_s);
                let frac = rate / limit;
                let kernel_rate = gbps(moved, tm.kernel_median_s);
                // The device table's kernel alone, launches back to back (ids on the
                // device), timed like the copy it is compared with.
                let b2b = kernel_b2b
                    .iter()
                    .find(|&&(m, _)| device && m == n)
                    .map(|&(_, s)| s);
                let calls = st.gathers.max(1) as f64;
                r.add(
                    "gather",
                    format!("{dtype} {name} x{n}"),
                    rate,
                    "GB/s",
                    format!(
                        "{:.0}% of {limit_name}; {:.1} us/call pipelined, {:.1} us alone (p90 {:.1}); gather on device {:.1} us ({:.0}%){}; hits {:.2}",
                        100.0 * frac,
                        tm.pipelined_s * 1e6,
                        tm.seq_median_s * 1e6,
                        tm.seq_p90_s * 1e6,
                        tm.kernel_median_s * 1e6,
                        100.0 * kernel_rate / limit,
                        b2b.map_or(String::new(), |s| format!(
                            ", back to back {:.1} us ({:.0}%)",
                            s * 1e6,
                            100.0 * gbps(moved, s) / limit
                        )),
                        st.hit_rate()
                    ),
                );
                rows_json.push(json!({
                    "dtype": dtype.to_string(), "row_bytes": row_bytes, "placement": name,
                    "rows_per_call": n, "calls": st.gathers,
                    "us_per_call_pipelined": tm.pipelined_s * 1e6,
                    "us_per_call_alone_median": tm.seq_median_s * 1e6,
                    "us_per_call_alone_p90": tm.seq_p90_s * 1e6,
                    "bytes_counted_per_call": moved,
                    "gbps": rate, "limit": limit_name, "fraction_of_limit": frac,
                    "kernel_us_median": tm.kernel_median_s * 1e6,
                    "kernel_gbps": kernel_rate, "kernel_fraction_of_limit": kernel_rate / limit,
                    "kernel_b2b_us": b2b.map(|s| s * 1e6),
                    "kernel_b2b_gbps": b2b.map(|s| gbps(moved, s)),
                    "kernel_b2b_fraction_of_limit": b2b.map(|s| gbps(moved, s) / limit),
                    "stored_row_gbps": gbps(stored, tm.pipelined_s),
                    "hit_rate": st.hit_rate(),
                    "bytes_over_link_per_call": st.bytes_transferred as f64 / calls,
                    "host_gather_us_per_call": st.host_gather_ns as f64 / 1e3 / calls,
                }));
            }
        }
        let _ = std::fs::remove_file(&path);
    }
    for note in &notes {
        r.add("gather", "not measured", 0.0, "", note.clone());
    }
    r.json.insert(
        "gather".into(),
        json!({"table_rows": rows, "width": WIDTH, "sizes": sizes,
               "bytes_counted": "device: stored row + 8 B id read, f32 row written (like d2d, read+write); host placements: stored row bytes delivered",
               "timing": "gbps/fraction_of_limit: per call with the next prefetch in flight (pipelined), host clock; kernel_*: gather_prefetched alone on the compute stream once its prefetch landed, events, median; kernel_b2b_* (device table): the gather kernel on ids already on the device, launches back to back between two events, mean",
               "runs": Value::Array(rows_json), "notes": notes}),
    );
    Ok(())
}

/// A few device-table gathers and nothing else, for a profiler (`ncu -k
/// regex:engram_gather`): FP8, bf16 and f32 rows at 4096 and 65536 rows per call, two
/// calls each (the first may pay for the module load).
pub fn profile(be: &CudaBackend, rows: u64) -> Res<()> {
    let stream = be.stream().clone();
    let mut out = be.alloc_zeros::<f32>(65536 * WIDTH)?;
    for dtype in [RowDtype::F8E4M3Scaled, RowDtype::BF16, RowDtype::F32] {
        let mut table = DeviceTable::upload(be, &make_table(dtype, rows, WIDTH)?)?;
        for n in [4096, 65536] {
            for k in 0..2 {
                table.gather_to_device(&distinct_ids(n, rows, k * n as u64), &mut out, &stream)?;
            }
        }
        stream.synchronize()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_ids_mix_hot_and_cold_at_the_planned_rate() {
        let mut c = CacheIds::new(1 << 14, 1 << 12);
        let half = CachePlanner::new(1 << 12).slots() / 2;
        let planner = CachePlanner::new(1 << 12);
        assert!(c.hot.len() > half * 9 / 10);
        assert!(c.hot.iter().all(|&r| planner.slot_of(r) < half));
        assert!(c.cold.iter().all(|&r| planner.slot_of(r) >= half));
        let ids: Vec<u64> = (0..1000).flat_map(|_| c.next(1, 0.9)).collect();
        let hot: std::collections::HashSet<u64> = c.hot.iter().copied().collect();
        assert_eq!(ids.iter().filter(|r| hot.contains(r)).count(), 900);
    }
}
