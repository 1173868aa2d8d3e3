//! The host side of a pinned-host prefetch, piece by piece: de-duplicating the ids and
//! copying the rows into staging memory, each on the calling thread and on every thread,
//! into write-combined pinned memory (what the stores use), cached pinned memory, and
//! ordinary memory. This is where an offloaded gather spends its time, and what decides
//! `PARALLEL_IDS` and `PARALLEL_STAGE_ROWS`.

use std::time::Instant;

use engram_core::dtype::RowDtype;
use engram_cuda::table::{stage_rows_with, Deduper, PARALLEL_IDS, PARALLEL_STAGE_ROWS};
use engram_cuda::CudaBackend;
use serde_json::json;

use crate::data::{distinct_ids, make_table};
use crate::gather::WIDTH;
use crate::report::{gbps, median_p90, Report, Res};

const REPS: usize = 15;

pub fn measure(be: &CudaBackend, rows: u64, r: &mut Report) -> Res<()> {
    let ctx = be.context();
    let sizes = [4096usize, 16384, 65536];
    let max_n = sizes[sizes.len() - 1];
    let mut runs = Vec::new();
    for dtype in [RowDtype::F8E4M3Scaled, RowDtype::F32] {
        let host = make_table(dtype, rows, WIDTH)?;
        let (rb, sb) = (host.value_row_bytes(), host.scale_row_bytes());
        let mut wc = unsafe { ctx.alloc_pinned::<u8>(max_n * (rb + sb))? };
        let mut cached = unsafe { ctx.alloc_pinned_with_flags::<u8>(max_n * (rb + sb), 0)? };
        let mut heap = vec![0u8; max_n * (rb + sb)];
        let mut dedupe = Deduper::default();
        let mut start = 0u64;
        for &n in &sizes {
            let mut batch = || {
                start += n as u64;
                distinct_ids(n, rows, start)
            };
            let mut time = |f: &mut dyn FnMut(&[u64])| {
                let mut v: Vec<f64> = (0..REPS)
                    .map(|_| {
                        let ids = batch();
                        let t = Instant::now();
                        f(&ids);
                        t.elapsed().as_secs_f64()
                    })
                    .collect();
                median_p90(&mut v).0
            };
            let mut cases: Vec<(&str, f64)> = Vec::new();
            for parallel in [false, true] {
                let s = time(&mut |ids| {
                    std::hint::black_box(dedupe.dedupe_with(ids, parallel));
                });
                cases.push((
                    if parallel {
                        "dedupe, every thread"
                    } else {
                        "dedupe, one thread"
                    },
                    s,
                ));
            }
            let wc_slice = wc.as_mut_slice()?;
            for parallel in [false, true] {
                let s = time(&mut |ids| {
                    let (v, sc) = wc_slice[..n * (rb + sb)].split_at_mut(n * rb);
                    stage_rows_with(&host, ids, v, sc, parallel);
                });
                cases.push((
                    if parallel {
                        "stage to write-combined pinned, every thread"
                    } else {
                        "stage to write-combined pinned, one thread"
                    },
                    s,
                ));
            }
            let cached_slice = cached.as_mut_slice()?;
            let s = time(&mut |ids| {
                let (v, sc) = cached_slice[..n * (rb + sb)].split_at_mut(n * rb);
                stage_rows_with(&host, ids, v, sc, true);
            });
            cases.push(("stage to cached pinned, every thread", s));
            let s = time(&mut |ids| {
                let (v, sc) = heap[..n * (rb + sb)].split_at_mut(n * rb);
                stage_rows_with(&host, ids, v, sc, true);
            });
            cases.push(("stage to ordinary memory, every thread", s));
            for (what, s) in cases {
                let rate = gbps((n * (rb + sb)) as f64, s);
                r.add(
                    "staging",
                    format!("{dtype} x{n} {what}"),
                    s * 1e6,
                    "us",
                    format!("{rate:.1} GB/s of rows"),
                );
                runs.push(json!({"dtype": dtype.to_string(), "rows": n, "case": what,
                                 "us_median": s * 1e6, "row_gbps": rate}));
            }
        }
    }
    r.json.insert(
        "staging".into(),
        json!({"table_rows": rows, "reps": REPS, "threads": rayon::current_num_threads(),
               "dedupe_parallel_from": PARALLEL_IDS, "stage_parallel_from": PARALLEL_STAGE_ROWS, "ids": "distinct, fresh per rep", "runs": runs}),
    );
    Ok(())
}
