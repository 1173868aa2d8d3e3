//! A simulated host step, the paper's comparison (offloading a 100B-parameter table cost
//! 1.9-2.8% of throughput on an H800): busy GPU work standing in for the model's layers
//! before the Engram layer, then a V4.1-shaped Engram layer on FP8 rows, with the table
//! device-resident, in pinned host memory (prefetched at step start, or fetched when the
//! layer is reached), behind the device cache, or read zero-copy.

use std::path::Path;
use std::time::Instant;

use engram_core::config::Variant;
use engram_core::dtype::{round_bf16, RowDtype};
use engram_core::table::TableStore;
use engram_cuda::{
    CachedTable, CudaBackend, CudaLayer, DeviceSegment, DeviceTable, DeviceTableStore, HostTable,
    PinnedTable, Rows, ZeroCopyTable,
};
use serde_json::json;

use crate::data::{cfg, make_table, noise, tempfile_dir, weights, zipf_ids};
use crate::report::{Report, Res};
use crate::Args;

fn placements(
    be: &CudaBackend,
    host: &HostTable,
    dir: &Path,
    notes: &mut Vec<String>,
) -> Res<Vec<(String, Box<dyn DeviceTableStore>)>> {
    let mut v: Vec<(String, Box<dyn DeviceTableStore>)> = vec![
        ("device".into(), Box::new(DeviceTable::upload(be, host)?)),
        (
            "pinned-host (prefetch)".into(),
            Box::new(PinnedTable::new(be, host.clone())?),
        ),
        (
            "device-cache 1/16 + pinned".into(),
            Box::new(CachedTable::new(
                be,
                host.clone(),
                (host.num_rows() / 16) as usize,
            )?),
        ),
    ];
    match ZeroCopyTable::new(be, host.clone()) {
        Ok(z) => v.push(("zero-copy RAM".into(), Box::new(z))),
        Err(e) => notes.push(format!("zero-copy RAM ({}): {e}", host.dtype())),
    }
    let path = dir.join(format!("bench-{}.bin", host.dtype()).replace('+', "_"));
    let scales_at = host.write_raw(&path)?;
    let mapped = HostTable::map_file(
        &path,
        host.dtype(),
        host.num_rows(),
        host.width(),
        0,
        scales_at,
    )?;
    match ZeroCopyTable::new(be, mapped.clone()) {
        Ok(z) => v.push(("zero-copy mmap file".into(), Box::new(z))),
        Err(e) => notes.push(format!("zero-copy mmap file ({}): {e}", host.dtype())),
    }
    v.push((
        "pinned-host from mmap file".into(),
        Box::new(PinnedTable::new(be, mapped)?),
    ));
    Ok(v)
}

/// The simulated host step: busy work, then the Engram layer (V4.1 shape, FP8 rows).
pub fn measure(be: &CudaBackend, a: &Args, r: &mut Report) -> Res<()> {
    let d = if a.quick { 1024 } else { 4096 };
    let c = cfg(Variant::V41, 4, d, 256, 8, 4)?;
    let layer = CudaLayer::new(be, c.clone(), 1, &weights(&c))?;
    let t = a.step_tokens;
    let heads = c.heads_per_layer();
    let host = make_table(RowDtype::F8E4M3Scaled, a.rows, c.head_dim)?;
    let ids: Vec<Vec<u64>> = (0..4)
        .map(|s| zipf_ids(t * heads, a.rows, 100 + s))
        .collect();
    let hidden = be.upload(
        &noise(t * c.branch_channels(), 1.0, 50)
            .into_iter()
            .map(round_bf16)
            .collect::<Vec<_>>(),
    )?;
    let emb = be.upload(&noise(t * c.embed_dim(), 1.0, 51))?;
    let mut out = be.alloc_zeros::<f32>(t * c.branch_channels())?;
    let stream = be.stream().clone();
    let busy_ns = a.busy_us * 1000;
    let mut results = Vec::new();
    // Per mode: ms per step, and the host's own time issuing a step (the longest of the
    // timed steps): a step whose issue outlasts the busy work was serialized somewhere.
    let mut timed = |name: &str, f: &mut dyn FnMut(usize) -> Res<()>| -> Res<f64> {
        // Every id set once first: buffers reach their steady size before timing.
        for s in 0..ids.len() {
            f(s)?;
        }
        stream.synchronize()?;
        let mut issue_max = 0f64;
        let t0 = Instant::now();
        for s in 0..a.steps {
            let ti = Instant::now();
            f(s + 1)?;
            issue_max = issue_max.max(ti.elapsed().as_secs_f64() * 1e3);
            stream.synchronize()?;
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3 / a.steps as f64;
        results.push((name.to_string(), ms, issue_max));
        Ok(ms)
    };
    let spin_only = timed("busy work only", &mut |_| Ok(be.spin(&stream, busy_ns)?))?;
    let compute_only = timed("busy + Engram math (rows already on device)", &mut |_| {
        be.spin(&stream, busy_ns)?;
        Ok(layer.forward_device(
            &hidden,
            &emb,
            None,
            &mut [DeviceSegment::fresh(t)],
            &mut out,
        )?)
    })?;
    let mut notes = Vec::new();
    let dir = tempfile_dir()?;
    let mut device_ms = None;
    for (name, mut store) in placements(be, &host, &dir, &mut notes)? {
        let name = name.replace(" (prefetch)", "");
        for early in [true, false] {
            let label = format!(
                "{name}, {}",
                if early {
                    "prefetched at step start"
                } else {
                    "fetched at the layer"
                }
            );
            let ms = timed(&label, &mut |s| {
                let rows = &ids[s % ids.len()];
                be.spin(&stream, busy_ns)?; // layers before the Engram layer
                let ticket = if early {
                    store.prefetch(rows)? // host gather + copy overlap the busy work
                } else {
                    stream.synchronize()?; // a naive engine fetches when it reaches the layer
                    store.prefetch(rows)?
                };
                Ok(layer.forward_rows(
                    store.as_mut(),
                    Rows::Prefetched(ticket),
                    &hidden,
                    None,
                    &mut [DeviceSegment::fresh(t)],
                    &mut out,
                )?)
            })?;
            if name == "device" && early {
                device_ms = Some(ms);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let device_ms = device_ms.unwrap_or(compute_only);
    let mut json_rows = Vec::new();
    for (name, ms, issue_max) in &results {
        let vs = 100.0 * (ms - device_ms) / device_ms;
        r.add(
            "step",
            name.clone(),
            *ms,
            "ms",
            format!(
                "{vs:+.1}% vs device-resident; throughput {:.0} tok/s; host issue <= {issue_max:.2} ms",
                t as f64 / ms * 1e3
            ),
        );
        json_rows.push(
            json!({"mode": name, "ms_per_step": ms, "vs_device_resident_pct": vs,
            "tokens_per_s": t as f64 / ms * 1e3, "host_issue_max_ms": issue_max}),
        );
    }
    for note in notes {
        r.add("step", "not measured", 0.0, "", note);
    }
    r.json.insert(
        "step".into(),
        json!({"tokens": t, "busy_us": a.busy_us, "hidden": d, "hc_mult": 4, "rows": a.rows,
               "table": "FP8 E4M3 + E8M0, 24 heads x 256", "busy_only_ms": spin_only,
               "compute_only_ms": compute_only, "modes": json_rows}),
    );
    Ok(())
}
