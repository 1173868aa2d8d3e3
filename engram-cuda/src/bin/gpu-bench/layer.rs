//! The whole layer's device time at a DeepSeek-V4.1 layer size (24 heads of 256 columns,
//! hc_mult 4, hidden size `--hidden`, 7168 by default), both variants, at decode (1 to 64
//! tokens) and prefill (`--prefill` tokens): rows gathered from a device-resident FP8
//! table, the projections, the gate and (paper) the short conv, timed with events.
//!
//! The floor: the projection weights (`(hc_mult+1) * D * 6144` f32) are read once per
//! call, so a decode step is bound by that read, and prefill by the GEMM.

use engram_core::config::Variant;
use engram_core::dtype::RowDtype;
use engram_cuda::{CudaBackend, CudaLayer, DeviceSegment, DeviceTable, Rows};
use serde_json::{json, Value};

use crate::data::{cfg, distinct_ids, make_table, noise, weights};
use crate::gather::WIDTH;
use crate::link::Limits;
use crate::report::{median_p90, time_stream, Report, Res};

pub fn measure(
    be: &CudaBackend,
    hidden_size: usize,
    tokens: &[usize],
    limits: Limits,
    r: &mut Report,
) -> Res<()> {
    let stream = be.stream().clone();
    let table_rows = 1u64 << 20;
    let host = make_table(RowDtype::F8E4M3Scaled, table_rows, WIDTH)?;
    let mut table = DeviceTable::upload(be, &host)?;
    drop(host);
    let mut runs = Vec::new();
    for variant in [Variant::V41, Variant::Paper] {
        let c = cfg(variant, 4, hidden_size, WIDTH, 8, 4)?;
        let layer = CudaLayer::new(be, c.clone(), 1, &weights(&c))?;
        let (g, d, e) = (c.hc_mult, c.hidden_size, c.embed_dim());
        let heads = c.heads_per_layer();
        let weight_bytes = 4.0 * ((g + 1) * d * e) as f64;
        let max_t = *tokens.iter().max().unwrap_or(&1);
        let hidden = be.upload(&noise(max_t * g * d, 1.0, 40))?;
        let mut out = be.alloc_zeros::<f32>(max_t * g * d)?;
        for &t in tokens {
            let ids = distinct_ids(t * heads, table_rows, 7 * t as u64);
            let reps = if t > 256 { 5 } else { 30 };
            let ms = time_stream(&stream, reps, || {
                Ok(layer.forward_rows(
                    &mut table,
                    Rows::Ids(&ids),
                    &hidden,
                    None,
                    &mut [DeviceSegment::fresh(t)],
                    &mut out,
                )?)
            })?;
            // Stage split (gemm / gate / conv), from the profiled forward on device rows.
            let emb = be.upload(&noise(t * e, 1.0, 41))?;
            let mut stages: Vec<Vec<(&'static str, f32)>> = Vec::new();
            for _ in 0..5 {
                stages.push(layer.forward_device_profiled(
                    &hidden,
                    &emb,
                    None,
                    &mut [DeviceSegment::fresh(t)],
                    &mut out,
                )?);
            }
            let mut split = serde_json::Map::new();
            for (k, (stage, _)) in stages[0].iter().enumerate() {
                let mut v: Vec<f64> = stages.iter().map(|s| s[k].1 as f64).collect();
                split.insert((*stage).into(), json!(median_p90(&mut v).0));
            }
            // At the copy's rate (bytes moved per second).
            let weights_floor_ms = weight_bytes / (limits.d2d * 1e9) * 1e3;
            let flops = 2.0 * (t * e * (g + 1) * d) as f64;
            let label = format!("{} D={d} T={t}", variant_name(variant));
            r.add(
                "layer",
                label,
                ms * 1e3 / t as f64,
                "us/tok",
                format!(
                    "{ms:.3} ms per call; weights-read floor {weights_floor_ms:.3} ms; GEMM {:.1} TFLOP/s; stages {}",
                    flops / (ms / 1e3) / 1e12,
                    Value::Object(split.clone())
                ),
            );
            runs.push(json!({
                "variant": variant_name(variant), "hidden": d, "hc_mult": g, "heads": heads,
                "head_dim": WIDTH, "tokens": t, "ms_per_call": ms,
                "us_per_token": ms * 1e3 / t as f64,
                "weights_read_floor_ms": weights_floor_ms,
                "stage_ms_device_rows": Value::Object(split),
            }));
        }
    }
    r.json.insert(
        "layer".into(),
        json!({"table": "FP8 E4M3 + E8M0 rows, device-resident, 1Mi rows", "runs": runs,
               "note": "ms_per_call: gather + projections + gate (+ conv) on the compute stream, events, mean of back-to-back calls; stage_ms_device_rows: the same layer on rows already on the device, each stage timed with events (median of 5)"}),
    );
    Ok(())
}

fn variant_name(v: Variant) -> &'static str {
    match v {
        Variant::Paper => "paper",
        Variant::V41 => "v4.1",
    }
}
