//! Decode lookup latency: wall time from the gather call (what `Step::apply` does first)
//! to the rows being ready on the device, for a decode step's rows (tokens x 24 heads)
//! from a large FP8 table, prefetched earlier or fetched on the spot.
//!
//! "Prefetched" means the prefetch (host gather, copy, id upload) was issued and had
//! finished before the call, as it does when the rows move while earlier layers run;
//! what remains is the gather kernel's wait and run. Its cost over a device-resident
//! table prefetched the same way is what offloading exposes at decode.

use engram_core::dtype::RowDtype;
use engram_cuda::{CudaBackend, DeviceTable, DeviceTableStore, PinnedTable, ZeroCopyTable};
use serde_json::json;

use crate::data::{make_table, zipf_ids};
use crate::gather::WIDTH;
use crate::report::{median_p90, wall_samples, Report, Res};

const HEADS: usize = 24;
const REPS: usize = 400;

pub fn measure(be: &CudaBackend, rows: u64, tokens: &[usize], r: &mut Report) -> Res<()> {
    let t = std::time::Instant::now();
    let host = make_table(RowDtype::F8E4M3Scaled, rows, WIDTH)?;
    eprintln!(
        "  latency: FP8 table of {rows} rows ({:.1} GiB) built in {:.1} s",
        (rows as f64 * 264.0) / (1u64 << 30) as f64,
        t.elapsed().as_secs_f64()
    );
    let stream = be.stream().clone();
    let copy = be.copy_stream().clone();
    let mut stores: Vec<(&str, Box<dyn DeviceTableStore>)> = vec![
        ("device", Box::new(DeviceTable::upload(be, &host)?)),
        ("pinned-host", Box::new(PinnedTable::new(be, host.clone())?)),
    ];
    match ZeroCopyTable::new(be, host.clone()) {
        Ok(z) => stores.push(("zero-copy RAM", Box::new(z))),
        Err(e) => r.add(
            "latency",
            "zero-copy RAM not measured",
            0.0,
            "",
            e.to_string(),
        ),
    }
    let max_t = *tokens.iter().max().unwrap_or(&1);
    let mut out = be.alloc_zeros::<f32>(max_t * HEADS * WIDTH)?;
    let mut runs = Vec::new();
    let mut medians = std::collections::HashMap::new();
    for &t in tokens {
        let n = t * HEADS;
        let batches: Vec<Vec<u64>> = (0..REPS + 5)
            .map(|s| zipf_ids(n, rows, 1000 + s as u64))
            .collect();
        for (name, store) in stores.iter_mut() {
            for prefetched in [true, false] {
                let mut samples = if prefetched {
                    let mut v = Vec::with_capacity(REPS);
                    for (k, b) in batches.iter().enumerate() {
                        let ticket = store.prefetch(b)?;
                        copy.synchronize()?;
                        stream.synchronize()?;
                        let t0 = std::time::Instant::now();
                        store.gather_prefetched(ticket, &mut out, &stream)?;
                        stream.synchronize()?;
                        if k >= 5 {
                            v.push(t0.elapsed().as_secs_f64());
                        }
                    }
                    v
                } else {
                    wall_samples(5, REPS, |k| {
                        store.gather_to_device(&batches[k], &mut out, &stream)?;
                        Ok(stream.synchronize()?)
                    })?
                };
                let (med, p90) = median_p90(&mut samples);
                let mode = if prefetched {
                    "prefetched"
                } else {
                    "at the layer"
                };
                medians.insert((t, name.to_string(), prefetched), med * 1e6);
                r.add(
                    "latency",
                    format!("{name} {mode}, {t} tok ({n} rows)"),
                    med * 1e6,
                    "us",
                    format!("p90 {:.1} us", p90 * 1e6),
                );
                runs.push(
                    json!({"placement": name, "prefetched": prefetched, "tokens": t,
                                 "rows": n, "median_us": med * 1e6, "p90_us": p90 * 1e6}),
                );
            }
        }
    }
    // At the smallest decode batch.
    let t0 = tokens[0];
    let exposed_us = medians[&(t0, "pinned-host".to_string(), true)]
        - medians[&(t0, "device".to_string(), true)];
    r.json.insert(
        "latency".into(),
        json!({"table_rows": rows, "table_bytes": rows * 264, "heads": HEADS,
               "reps": REPS, "ids": "Zipf-like", "runs": runs,
               "exposed_us_prefetched_pinned_vs_device": exposed_us,
               "note": "wall time from the gather call to its completion (stream synchronized); prefetched: prefetch issued and finished before the call"}),
    );
    Ok(())
}
