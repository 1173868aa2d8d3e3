//! `gpu-bench`: what the Engram layer costs on this GPU, as one table (and JSON).
//!
//! 1. Link bandwidths: pinned and pageable host-to-device copies, device-to-device copy.
//! 2. Row gathers per table placement (device, pinned host, zero-copy RAM, zero-copy
//!    mapped file, device cache), f32 and FP8 rows, in GB/s of stored rows delivered,
//!    against the pinned host-to-device bandwidth.
//! 3. The layer's kernels (GEMM, gate, conv) in time and in GB/s of the bytes they must
//!    move, against the device-to-device bandwidth.
//! 4. A simulated host step: busy GPU work (the model's layers before the Engram layer),
//!    then the Engram layer, with the table offloaded to host memory (prefetched at step
//!    start, or fetched when the layer is reached) versus resident on the device.
//!
//! Usage: `gpu-bench [--json PATH] [--quick] [--probe] [--rows N] [--tokens N]
//! [--step-tokens N] [--busy-us N] [--steps N]`. JSON goes to `--json`, else to
//! `$OUT/gpu-bench.json` when `OUT` is set. Exit status 2 when there is no GPU.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use engram_core::checkpoint::{LayerWeights, PaperWeights, V41Weights};
use engram_core::config::{EngramConfig, HashConfig, Variant};
use engram_core::dtype::{round_bf16, RowDtype};
use engram_core::table::TableStore;
use engram_cuda::cudarc::driver::sys::CUevent_flags;
use engram_cuda::cudarc::driver::CudaStream;
use engram_cuda::{
    probe, CachedTable, CudaBackend, CudaLayer, DeviceSegment, DeviceTable, DeviceTableStore,
    HostTable, PinnedTable, Rows, ZeroCopyTable,
};
use rayon::prelude::*;
use serde_json::{json, Value};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

struct Args {
    json: Option<PathBuf>,
    quick: bool,
    probe: bool,
    rows: u64,
    tokens: usize,
    step_tokens: usize,
    busy_us: u64,
    steps: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        json: None,
        quick: false,
        probe: false,
        rows: 1 << 20,
        tokens: 4096,
        step_tokens: 512,
        busy_us: 2000,
        steps: 10,
    };
    let mut it = std::env::args().skip(1);
    let mut explicit_rows = false;
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        let num = |s: String, name: &str| {
            s.parse::<u64>()
                .map_err(|_| format!("{name}: not a number: {s}"))
        };
        match arg.as_str() {
            "--json" => a.json = Some(PathBuf::from(val("--json")?)),
            "--quick" => a.quick = true,
            "--probe" => a.probe = true,
            "--rows" => {
                a.rows = num(val("--rows")?, "--rows")?;
                explicit_rows = true;
            }
            "--tokens" => a.tokens = num(val("--tokens")?, "--tokens")? as usize,
            "--step-tokens" => {
                a.step_tokens = num(val("--step-tokens")?, "--step-tokens")? as usize
            }
            "--busy-us" => a.busy_us = num(val("--busy-us")?, "--busy-us")?,
            "--steps" => a.steps = num(val("--steps")?, "--steps")?.max(1) as usize,
            "-h" | "--help" => {
                return Err(
                    "usage: gpu-bench [--json PATH] [--quick] [--probe] [--rows N] \
                     [--tokens N] [--step-tokens N] [--busy-us N] [--steps N]"
                        .into(),
                )
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if a.quick {
        if !explicit_rows {
            a.rows = 1 << 16;
        }
        a.tokens = a.tokens.min(512);
        a.step_tokens = a.step_tokens.min(128);
        a.steps = a.steps.min(3);
    }
    Ok(a)
}

/// One line of the report table.
struct Line {
    section: &'static str,
    item: String,
    value: f64,
    unit: &'static str,
    note: String,
}

struct Report {
    lines: Vec<Line>,
    json: serde_json::Map<String, Value>,
}

impl Report {
    fn add(
        &mut self,
        section: &'static str,
        item: impl Into<String>,
        value: f64,
        unit: &'static str,
        note: impl Into<String>,
    ) {
        let (item, note) = (item.into(), note.into());
        eprintln!("  {section:<8} {item:<44} {value:>12.3} {unit:<6} {note}");
        self.lines.push(Line {
            section,
            item,
            value,
            unit,
            note,
        });
    }

    fn print(&self) {
        println!();
        println!(
            "{:<8} | {:<44} | {:>12} | {:<6} | note",
            "section", "item", "value", "unit"
        );
        println!("{}", "-".repeat(110));
        for l in &self.lines {
            println!(
                "{:<8} | {:<44} | {:>12.3} | {:<6} | {}",
                l.section, l.item, l.value, l.unit, l.note
            );
        }
    }
}

fn gbps(bytes: f64, seconds: f64) -> f64 {
    bytes / seconds / 1e9
}

/// Milliseconds of `f` on `stream`, timed with events, averaged over `reps`.
fn time_stream(stream: &Arc<CudaStream>, reps: usize, mut f: impl FnMut() -> Res<()>) -> Res<f64> {
    f()?; // warm-up
    let flags = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let a = stream.record_event(flags)?;
    for _ in 0..reps {
        f()?;
    }
    let b = stream.record_event(flags)?;
    Ok(a.elapsed_ms(&b)? as f64 / reps as f64)
}

fn bandwidths(be: &CudaBackend, r: &mut Report) -> Res<(f64, f64)> {
    let bytes = 256usize << 20;
    let ctx = be.context();
    let copy = be.copy_stream();
    let mut pinned = unsafe { ctx.alloc_pinned_with_flags::<u8>(bytes, 0)? };
    pinned
        .as_mut_slice()?
        .par_chunks_mut(1 << 20)
        .for_each(|c| c.fill(7));
    let mut dev = unsafe { copy.alloc::<u8>(bytes)? };
    let ms = time_stream(copy, 8, || Ok(copy.memcpy_htod(&pinned, &mut dev)?))?;
    let h2d = gbps(bytes as f64, ms / 1e3);
    r.add(
        "link",
        "host-to-device copy, pinned (256 MiB)",
        h2d,
        "GB/s",
        "the reference for offloaded gathers",
    );
    let pageable = vec![7u8; bytes];
    let t = Instant::now();
    for _ in 0..4 {
        copy.memcpy_htod(&pageable, &mut dev)?;
    }
    copy.synchronize()?;
    let pg = gbps(4.0 * bytes as f64, t.elapsed().as_secs_f64());
    r.add(
        "link",
        "host-to-device copy, pageable (256 MiB)",
        pg,
        "GB/s",
        "",
    );
    let stream = be.stream();
    let big = 1usize << 30;
    let src = stream.alloc_zeros::<u8>(big)?;
    let mut dst = stream.alloc_zeros::<u8>(big)?;
    let ms = time_stream(stream, 5, || Ok(stream.memcpy_dtod(&src, &mut dst)?))?;
    let d2d = gbps(2.0 * big as f64, ms / 1e3);
    r.add(
        "link",
        "device-to-device copy (1 GiB, read+write)",
        d2d,
        "GB/s",
        "the reference for the kernels",
    );
    r.json.insert(
        "link".into(),
        json!({"h2d_pinned_gbps": h2d, "h2d_pageable_gbps": pg, "d2d_gbps": d2d}),
    );
    Ok((h2d, d2d))
}

/// A cheap, parallel fill of a big table: values from a hash of the position.
fn make_table(dtype: RowDtype, rows: u64, width: usize) -> Res<HostTable> {
    let t = HostTable::build(format!("bench-{dtype}"), dtype, rows, width, |v, s| {
        v.par_chunks_mut(1 << 16).enumerate().for_each(|(k, c)| {
            for (i, b) in c.iter_mut().enumerate() {
                let h = ((k << 16) + i).wrapping_mul(0x9e37_79b9) >> 13;
                *b = (h as u8) & 0x7e | ((h >> 8) as u8 & 0x80);
            }
        });
        s.par_chunks_mut(1 << 16).for_each(|c| c.fill(124));
        if dtype == RowDtype::F32 {
            // Finite floats: keep every fourth byte (the exponent's top) small.
            v.par_chunks_mut(4).for_each(|c| c[3] &= 0x3f);
        }
    })?;
    Ok(t)
}

/// Zipf-like row ids (log-uniform ranks, scattered over the table).
fn zipf_ids(n: usize, rows: u64, seed: u64) -> Vec<u64> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let u = (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64;
            let rank = ((rows as f64).powf(u) as u64).saturating_sub(1);
            rank.wrapping_mul(0x9e37_79b9_7f4a_7c15) % rows
        })
        .collect()
}

fn placements(
    be: &CudaBackend,
    host: &HostTable,
    dir: &std::path::Path,
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

fn gathers(be: &CudaBackend, a: &Args, h2d: f64, r: &mut Report) -> Res<()> {
    let heads = 24;
    let width = 256;
    let n = a.tokens * heads;
    let batches: Vec<Vec<u64>> = (0..4).map(|s| zipf_ids(n, a.rows, 11 + s)).collect();
    let dir = tempfile_dir()?;
    let mut rows_json = Vec::new();
    let mut notes = Vec::new();
    for dtype in [RowDtype::F32, RowDtype::F8E4M3Scaled] {
        let t = Instant::now();
        let host = make_table(dtype, a.rows, width)?;
        eprintln!(
            "  built a {dtype} table of {} rows in {:.2} s",
            a.rows,
            t.elapsed().as_secs_f64()
        );
        let row_bytes = host.value_row_bytes() + host.scale_row_bytes();
        let mut out = be.alloc_zeros::<f32>(n * width)?;
        for (name, mut store) in placements(be, &host, &dir, &mut notes)? {
            let stream = be.stream().clone();
            for b in &batches[..2] {
                store.gather_to_device(b, &mut out, &stream)?;
            }
            stream.synchronize()?;
            store.reset_stats();
            let iters = 8;
            let t = Instant::now();
            for k in 0..iters {
                store.gather_to_device(&batches[k % batches.len()], &mut out, &stream)?;
            }
            stream.synchronize()?;
            let secs = t.elapsed().as_secs_f64() / iters as f64;
            let rate = gbps((n * row_bytes) as f64, secs);
            let st = store.stats();
            let moved = st.bytes_transferred as f64 / iters as f64;
            r.add(
                "gather",
                format!("{dtype} {name}"),
                rate,
                "GB/s",
                format!(
                    "{:.2} ms/gather of {n} rows; {:.0}% of pinned H2D; hit rate {:.2}; {:.1} MB/gather over the link",
                    secs * 1e3,
                    100.0 * rate / h2d,
                    st.hit_rate(),
                    moved / 1e6
                ),
            );
            rows_json.push(json!({
                "dtype": dtype.to_string(), "placement": name, "rows_per_gather": n,
                "ms_per_gather": secs * 1e3, "gbps_rows_delivered": rate,
                "fraction_of_pinned_h2d": rate / h2d, "hit_rate": st.hit_rate(),
                "bytes_over_link_per_gather": moved,
                "host_gather_ms_per_gather": st.host_gather_ns as f64 / 1e6 / iters as f64,
            }));
        }
    }
    for note in &notes {
        r.add("gather", "not measured", 0.0, "", note.clone());
    }
    r.json.insert("gathers".into(), Value::Array(rows_json));
    r.json.insert("gather_notes".into(), json!(notes));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn tempfile_dir() -> Res<PathBuf> {
    let dir = std::env::temp_dir().join(format!("engram-gpu-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn cfg(
    variant: Variant,
    g: usize,
    d: usize,
    head_dim: usize,
    heads: usize,
    max_n: usize,
) -> Res<EngramConfig> {
    let c = EngramConfig {
        variant,
        hash: HashConfig {
            engram_vocab_size: vec![1009; max_n - 1],
            max_ngram_size: max_n,
            n_head_per_ngram: heads,
            layer_ids: vec![1],
            pad_id: 2,
            seed: 0,
            compressed_vocab_size: None,
        },
        head_dim,
        kernel_size: if variant == Variant::Paper { 4 } else { 0 },
        hidden_size: d,
        hc_mult: g,
        rms_norm_eps: 1e-20,
    };
    c.validate()?;
    Ok(c)
}

fn noise(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    (0..n)
        .into_par_iter()
        .map(|i| {
            let h = (i as u64 ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            ((h >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale
        })
        .collect()
}

fn weights(c: &EngramConfig) -> LayerWeights {
    let (g, d, e) = (c.hc_mult, c.hidden_size, c.embed_dim());
    let ws = 1.0 / (e as f32).sqrt();
    match c.variant {
        Variant::Paper => LayerWeights::Paper(PaperWeights {
            key_weight: (0..g).map(|h| noise(d * e, ws, h as u64)).collect(),
            key_bias: (0..g).map(|h| noise(d, 0.1, 10 + h as u64)).collect(),
            value_weight: noise(d * e, ws, 20),
            value_bias: noise(d, 0.1, 21),
            norm1: vec![vec![1.0; d]; g],
            norm2: vec![vec![1.0; d]; g],
            conv_weight: noise(g * d * c.kernel_size, 0.5, 22),
            conv_norms: vec![vec![1.0; d]; g],
        }),
        Variant::V41 => LayerWeights::V41(V41Weights {
            wkv: noise((g + 1) * d * e, ws, 30),
            q_weight: noise(g * d, 1.0, 31).into_iter().map(round_bf16).collect(),
            k_weight: noise(g * d, 1.0, 32).into_iter().map(round_bf16).collect(),
        }),
    }
}

fn kernels(be: &CudaBackend, a: &Args, d2d: f64, r: &mut Report) -> Res<()> {
    let mut out_json = Vec::new();
    let (pd, vd) = if a.quick { (256, 1024) } else { (1024, 5120) };
    for (label, c, t) in [
        ("paper G=4", cfg(Variant::Paper, 4, pd, 64, 8, 3)?, a.tokens),
        (
            "V4.1 G=4",
            cfg(Variant::V41, 4, vd, 256, 8, 4)?,
            a.tokens.min(1024),
        ),
    ] {
        let layer = CudaLayer::new(be, c.clone(), 1, &weights(&c))?;
        let (g, d, e) = (c.hc_mult, c.hidden_size, c.embed_dim());
        let hidden = be.upload(&noise(t * g * d, 1.0, 40))?;
        let emb = be.upload(&noise(t * e, 1.0, 41))?;
        let mut out = be.alloc_zeros::<f32>(t * g * d)?;
        let mut samples: Vec<Vec<(&'static str, f32)>> = Vec::new();
        for _ in 0..6 {
            samples.push(layer.forward_device_profiled(
                &hidden,
                &emb,
                None,
                &mut [DeviceSegment::fresh(t)],
                &mut out,
            )?);
        }
        let f = 4.0 * (t * g * d) as f64; // bytes of one [T, G, D] f32 tensor
        let kv = 4.0 * (t * (g + 1) * d) as f64;
        for (k, (stage, _)) in samples[0].iter().enumerate() {
            let mut ms: Vec<f32> = samples[1..].iter().map(|s| s[k].1).collect();
            ms.sort_by(f32::total_cmp);
            let med = ms[ms.len() / 2] as f64;
            let (bytes, what) = match (*stage, c.variant) {
                ("gemm", _) => (
                    0.0,
                    format!(
                        "{:.1} TFLOP/s",
                        2.0 * (t * e * (g + 1) * d) as f64 / med / 1e9
                    ),
                ),
                ("gate", Variant::Paper) => {
                    (f + kv + 2.0 * f, "reads hidden + kv, writes val + z".into())
                }
                ("gate", Variant::V41) => (f + kv + f, "reads hidden + kv, writes out".into()),
                ("conv", _) => (3.0 * f, "reads val + z, writes out".into()),
                (_, _) => (0.0, String::new()),
            };
            if *stage == "window" {
                continue;
            }
            let rate = if bytes > 0.0 {
                gbps(bytes, med / 1e3)
            } else {
                0.0
            };
            let note = if bytes > 0.0 {
                format!(
                    "{med:.3} ms for {:.1} MB ({what}); {:.0}% of D2D",
                    bytes / 1e6,
                    100.0 * rate / d2d
                )
            } else {
                format!("{med:.3} ms ({what})")
            };
            r.add(
                "kernel",
                format!("{label} T={t} D={d} {stage}"),
                if bytes > 0.0 { rate } else { med },
                if bytes > 0.0 { "GB/s" } else { "ms" },
                note,
            );
            out_json.push(json!({"layer": label, "tokens": t, "hidden": d, "embed_dim": e, "stage": stage,
                "ms": med, "bytes": bytes, "gbps": rate, "fraction_of_d2d": if bytes > 0.0 { rate / d2d } else { 0.0 }}));
        }
    }
    r.json.insert("kernels".into(), Value::Array(out_json));
    Ok(())
}

/// The simulated host step: busy work, then the Engram layer (V4.1 shape, FP8 rows).
fn step_sim(be: &CudaBackend, a: &Args, r: &mut Report) -> Res<()> {
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
    let mut timed = |name: &str, f: &mut dyn FnMut(usize) -> Res<()>| -> Res<f64> {
        f(0)?;
        stream.synchronize()?;
        let t0 = Instant::now();
        for s in 0..a.steps {
            f(s + 1)?;
            stream.synchronize()?;
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3 / a.steps as f64;
        results.push((name.to_string(), ms));
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
    for (name, ms) in &results {
        let vs = 100.0 * (ms - device_ms) / device_ms;
        r.add(
            "step",
            name.clone(),
            *ms,
            "ms",
            format!(
                "{vs:+.1}% vs device-resident; throughput {:.0} tok/s",
                t as f64 / ms * 1e3
            ),
        );
        json_rows.push(
            json!({"mode": name, "ms_per_step": ms, "vs_device_resident_pct": vs,
            "tokens_per_s": t as f64 / ms * 1e3}),
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

fn run(a: &Args) -> Res<Report> {
    let be = CudaBackend::try_new(0)?;
    eprintln!("gpu-bench: {}", be.info());
    let mut r = Report {
        lines: Vec::new(),
        json: serde_json::Map::new(),
    };
    r.json
        .insert("device".into(), serde_json::to_value(be.info())?);
    r.json.insert(
        "params".into(),
        json!({"rows": a.rows, "tokens": a.tokens, "heads": 24, "step_tokens": a.step_tokens,
               "busy_us": a.busy_us, "steps": a.steps, "quick": a.quick}),
    );
    let (h2d, d2d) = bandwidths(&be, &mut r)?;
    gathers(&be, a, h2d, &mut r)?;
    kernels(&be, a, d2d, &mut r)?;
    step_sim(&be, a, &mut r)?;
    Ok(r)
}

fn main() -> ExitCode {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(64);
        }
    };
    let p = probe();
    if a.probe {
        println!("{p}");
        return match &p.unavailable {
            None => ExitCode::SUCCESS,
            Some(_) => ExitCode::from(2),
        };
    }
    if let Some(why) = &p.unavailable {
        eprintln!("gpu-bench: no GPU: {why}");
        return ExitCode::from(2);
    }
    let t = Instant::now();
    let mut report = match run(&a) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gpu-bench: failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    report.print();
    report.json.insert(
        "probe".into(),
        serde_json::to_value(&p).unwrap_or(Value::Null),
    );
    report
        .json
        .insert("seconds".into(), json!(t.elapsed().as_secs_f64()));
    let path = a
        .json
        .clone()
        .or_else(|| std::env::var_os("OUT").map(|o| PathBuf::from(o).join("gpu-bench.json")));
    if let Some(path) = path {
        match serde_json::to_string_pretty(&Value::Object(report.json)) {
            Ok(s) => match std::fs::write(&path, s) {
                Ok(()) => println!("\nJSON written to {}", path.display()),
                Err(e) => eprintln!("gpu-bench: cannot write {}: {e}", path.display()),
            },
            Err(e) => eprintln!("gpu-bench: JSON: {e}"),
        }
    }
    ExitCode::SUCCESS
}
