//! GPU tests: kernels against the CPU and the reference layer, every table placement, the
//! prefetch pipeline, the golden files, and errors on a working device.
//!
//! Each test is `#[ignore = "needs a CUDA device: ..."]`: `cargo test` lists it as
//! ignored; `cargo xtask test-gpu` runs it with `--include-ignored`, and without a usable
//! GPU it fails.

use engram_core::backend::{EngramLayer, Segment, ShortConvState};
use engram_core::checkpoint::{
    load_layer_weights, table_spec, Checkpoint, LayerWeights, SafetensorsHeader,
};
use engram_core::config::{EngramConfig, Variant};
use engram_core::dtype::{e8m0_to_f32, f8e4m3_to_f32, round_bf16, RowDtype, FP8_SCALE_BLOCK};
use engram_core::golden::GoldenSample;
use engram_core::primes::table_layouts;
use engram_core::reference::ReferenceLayer;
use engram_core::table::{DenseTable, TableStore};
use engram_core::testing::conformance;
use engram_cuda::testing::{golden_data_dir, gpu};

mod common;
use common::*;
use engram_cuda::{
    CachedTable, CudaBackend, CudaBackendError, CudaLayer, DeviceConvState, DeviceSegment,
    DeviceTable, DeviceTableStore, HostTable, PinnedTable, Rows, ZeroCopyTable,
};

// ---------------------------------------------------------------- helpers

fn gpu_gather(
    be: &CudaBackend,
    store: &mut dyn DeviceTableStore,
    ids: &[u64],
) -> engram_cuda::Result<Vec<f32>> {
    let mut out = be.alloc_zeros::<f32>(ids.len() * store.width())?;
    store.gather_to_device(ids, &mut out, be.stream())?;
    let mut host = vec![0f32; ids.len() * store.width()];
    be.download_into(&out, &mut host)?;
    Ok(host)
}

/// Every placement of `host` the device allows (a refused zero-copy is reported).
fn placements(
    be: &CudaBackend,
    host: &HostTable,
    dir: &std::path::Path,
) -> Vec<Box<dyn DeviceTableStore>> {
    let mut v: Vec<Box<dyn DeviceTableStore>> = vec![
        Box::new(DeviceTable::upload(be, host).unwrap()),
        Box::new(PinnedTable::new(be, host.clone()).unwrap()),
        Box::new(CachedTable::new(be, host.clone(), 64).unwrap()),
    ];
    match ZeroCopyTable::new(be, host.clone()) {
        Ok(z) => v.push(Box::new(z)),
        Err(e) if !be.info().host_register_supported => {
            println!("note: zero-copy of host memory refused (the device reports no host registration): {e}")
        }
        Err(e) => panic!("zero-copy of anonymous host memory failed: {e}"),
    }
    let path = dir.join(format!("table-{}.bin", host.dtype()));
    let scales_at = host.write_raw(&path).unwrap();
    let mapped = HostTable::map_file(
        &path,
        host.dtype(),
        host.num_rows(),
        host.width(),
        0,
        scales_at,
    )
    .unwrap();
    match ZeroCopyTable::new(be, mapped.clone()) {
        Ok(z) => v.push(Box::new(z)),
        Err(e @ CudaBackendError::Unsupported { .. }) => {
            println!("note: zero-copy of a memory-mapped file refused by the driver: {e}")
        }
        Err(e) => panic!("zero-copy of a mapped file failed: {e}"),
    }
    v.push(Box::new(PinnedTable::new(be, mapped).unwrap()));
    v
}

/// The GPU's V4.1 rule against a reference with f64 sums: the conformance suite's
/// `Tolerance::GPU` (cuBLAS's summation order can flip a bf16 kv rounding, which is 2
/// output ulps where the output cancels).
fn assert_v41_close(got: &[f32], want: &[f32], what: &str) {
    conformance::assert_v41_close(got, want, conformance::Tolerance::GPU, what);
}

// ---------------------------------------------------------------- tests

#[test]
#[ignore = "needs a CUDA device: cargo xtask test-gpu"]
fn kernels_compile_and_nvrtc_errors_carry_the_log() {
    let gpu = gpu("kernels_compile_and_nvrtc_errors_carry_the_log");
    let be = &gpu.backend;
    println!("{}", be.info());
    let arch = be
        .compile_check(
            "ok",
            "extern \"C\" __global__ void k(float* x) { x[0] = 1.0f; }",
        )
        .unwrap();
    println!("a trivial kernel compiles for `{arch}`");
    let e = be
        .compile_check(
            "broken",
            "extern \"C\" __global__ void k(float* x) { x[0] = undefined_name; }",
        )
        .unwrap_err();
    match &e {
        CudaBackendError::Nvrtc { log, .. } => {
            assert!(log.contains("undefined_name"), "log: {log}")
        }
        other => panic!("expected an NVRTC error, got {other}"),
    }
}

/// Ids already on the device, gathered back to back (what the benchmark times): the same
/// bits as the CPU, for every row format, at widths that take the wide path (256) and the
/// one-column path (40); a short id buffer is an error.
#[test]
#[ignore = "needs a CUDA device: cargo xtask test-gpu"]
fn device_ids_gather_exactly_what_the_cpu_gathers() {
    let gpu = gpu("device_ids_gather_exactly_what_the_cpu_gathers");
    let be = &gpu.backend;
    let mut rng = Rng::new(31);
    for dtype in [
        RowDtype::F32,
        RowDtype::BF16,
        RowDtype::F16,
        RowDtype::F8E4M3Scaled,
    ] {
        for width in [
            256usize,
            if dtype == RowDtype::F8E4M3Scaled {
                96
            } else {
                40
            },
        ] {
            let host = random_table(dtype, 3000, width, &mut rng);
            let table = DeviceTable::upload(be, &host).unwrap();
            let ids: Vec<u64> = (0..5000).map(|_| rng.below(3000)).collect();
            let dev_ids = be
                .upload(&ids.iter().map(|&r| r as i64).collect::<Vec<_>>())
                .unwrap();
            // Room for one row more, so the short-buffer check below is about the ids.
            let mut out = be.alloc_zeros::<f32>((ids.len() + 1) * width).unwrap();
            unsafe { table.gather_device_ids(&dev_ids, ids.len(), &mut out, be.stream()) }.unwrap();
            assert_eq!(
                bits(&be.download(&out).unwrap()[..ids.len() * width]),
                bits(&cpu_gather(&host, &ids)),
                "{dtype} width {width}"
            );
            let e =
                unsafe { table.gather_device_ids(&dev_ids, ids.len() + 1, &mut out, be.stream()) };
            assert!(e.is_err(), "{dtype}: a short id buffer was accepted");
        }
    }
}

/// The conformance suite every backend runs (`engram_core::testing::conformance`), on
/// `CudaLayer` through its host-buffer `EngramLayer` interface, with the GPU tolerance.
#[test]
#[ignore = "needs a CUDA device: cargo xtask test-gpu"]
fn cuda_layer_passes_the_conformance_suite() {
    use engram_core::testing::conformance::{check_layer, Tolerance};
    let gpu = gpu("cuda_layer_passes_the_conformance_suite");
    let be = gpu.backend.clone();
    let make = move |cfg, id, w: LayerWeights| -> engram_core::Result<Box<dyn EngramLayer>> {
        CudaLayer::new(&be, cfg, id, &w)
            .map(|l| Box::new(l) as Box<dyn EngramLayer>)
            .map_err(|e| engram_core::EngramError::config("CudaLayer", e.to_string()))
    };
    println!("CudaLayer: {}", check_layer(&make, Tolerance::GPU));
}

#[test]
#[ignore = "needs a CUDA device: cargo xtask test-gpu"]
fn fp8_dequantization_is_exact() {
    let gpu = gpu("fp8_dequantization_is_exact");
    let be = &gpu.backend;
    // Every E4M3 code against scales from the extremes (subnormal results, overflow).
    let scale_codes: Vec<u8> = vec![0, 1, 20, 100, 120, 127, 128, 135, 200, 250, 254];
    let width = 256;
    let sw = width / FP8_SCALE_BLOCK;
    let mut values = Vec::new();
    let mut scales = Vec::new();
    for (r, &s) in scale_codes.iter().enumerate() {
        values.extend((0..width).map(|c| c as u8));
        scales.extend((0..sw).map(|b| {
            if b % 2 == 0 {
                s
            } else {
                scale_codes[(r + 1) % scale_codes.len()]
            }
        }));
    }
    let rows = scale_codes.len();
    let dv = be.upload(&values).unwrap();
    let ds = be.upload(&scales).unwrap();
    let out = be
        .download(&be.dequant_f8(&dv, &ds, rows, width).unwrap())
        .unwrap();
    for r in 0..rows {
        for c in 0..width {
            let want = round_bf16(
                f8e4m3_to_f32(values[r * width + c])
                    * e8m0_to_f32(scales[r * sw + c / FP8_SCALE_BLOCK]),
            );
            let got = out[r * width + c];
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "code {:#04x} scale {}: got {got:e}, want {want:e}",
                values[r * width + c],
                scales[r * sw + c / FP8_SCALE_BLOCK]
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA device: cargo xtask test-gpu"]
fn every_placement_gathers_exactly_what_the_cpu_gathers() {
    let gpu = gpu("every_placement_gathers_exactly_what_the_cpu_gathers");
    let be = &gpu.backend;
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(7);
    for dtype in [
        RowDtype::F32,
        RowDtype::BF16,
        RowDtype::F16,
        RowDtype::F8E4M3Scaled,
    ] {
        let host = random_table(dtype, 1000, 64, &mut rng);
        // Zipf-like ids: many repeats of a few rows, and some cold ones.
        let ids: Vec<u64> = (0..777)
            .map(|i| {
                if i % 3 == 0 {
                    rng.below(1000)
                } else {
                    rng.below(40)
                }
            })
            .collect();
        let want = cpu_gather(&host, &ids);
        for mut store in placements(be, &host, dir.path()) {
            let what = format!("{dtype} {}", store.placement());
            for round in 0..3 {
                let got = gpu_gather(be, store.as_mut(), &ids).unwrap();
                assert_eq!(bits(&got), bits(&want), "{what}, round {round}");
            }
            assert!(gpu_gather(be, store.as_mut(), &[]).unwrap().is_empty());
            let st = store.stats();
            println!("{what}: {st:?} (hit rate {:.2})", st.hit_rate());
            assert_eq!(st.lookups, 3 * ids.len() as u64, "{what}");
            if store.placement() == engram_cuda::Placement::DeviceCache {
                assert!(st.hits > 0, "{what}: the second round must hit the cache");
            }
            let e = gpu_gather(be, store.as_mut(), &[3, 1000])
                .unwrap_err()
                .to_string();
            assert!(e.contains("row id 1000"), "{what}: {e}");
        }
    }
}

#[test]
#[ignore = "needs a CUDA device: cargo xtask test-gpu"]
fn prefetch_pipeline_overlaps_and_refuses_stale_tickets() {
    let gpu = gpu("prefetch_pipeline_overlaps_and_refuses_stale_tickets");
    let be = &gpu.backend;
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(11);
    let host = random_table(RowDtype::F8E4M3Scaled, 5000, 256, &mut rng);
    let batches: Vec<Vec<u64>> = (0..6)
        .map(|b| {
            (0..3000)
                .map(|i| {
                    if (i + b) % 2 == 0 {
                        rng.below(300)
                    } else {
                        rng.below(5000)
                    }
                })
                .collect()
        })
        .collect();
    let width = host.width();
    for mut store in placements(be, &host, dir.path()) {
        let what = store.placement().to_string();
        let mut outs: Vec<_> = (0..batches.len())
            .map(|b| be.alloc_zeros::<f32>(batches[b].len() * width).unwrap())
            .collect();
        // Batch b+1 is in flight while batch b is gathered.
        let mut pending = std::collections::VecDeque::new();
        pending.push_back((0, store.prefetch(&batches[0]).unwrap()));
        for b in 0..batches.len() {
            if b + 1 < batches.len() {
                pending.push_back((b + 1, store.prefetch(&batches[b + 1]).unwrap()));
            }
            let (i, ticket) = pending.pop_front().unwrap();
            assert_eq!(i, b);
            be.spin(be.stream(), 20_000).unwrap(); // compute stream busy meanwhile
            store
                .gather_prefetched(ticket, &mut outs[b], be.stream())
                .unwrap();
        }
        for (b, out) in outs.iter().enumerate() {
            let got = be.download(out).unwrap();
            assert_eq!(
                bits(&got),
                bits(&cpu_gather(&host, &batches[b])),
                "{what}, batch {b}"
            );
        }
        // A third outstanding prefetch reuses the first one's buffer.
        let t0 = store.prefetch(&batches[0]).unwrap();
        let t1 = store.prefetch(&batches[1]).unwrap();
        let t2 = store.prefetch(&batches[2]).unwrap();
        let e = store
            .gather_prefetched(t0, &mut outs[0], be.stream())
            .unwrap_err()
            .to_string();
        assert!(e.contains("stale"), "{what}: {e}");
        store
            .gather_prefetched(t1, &mut outs[1], be.stream())
            .unwrap();
        store
            .gather_prefetched(t2, &mut outs[2], be.stream())
            .unwrap();
        for b in [1, 2] {
            let got = be.download(&outs[b]).unwrap();
            assert_eq!(
                bits(&got),
                bits(&cpu_gather(&host, &batches[b])),
                "{what}, after a stale ticket, batch {b}"
            );
        }
        // The cache stays consistent after skipped payloads.
        let got = gpu_gather(be, store.as_mut(), &batches[3]).unwrap();
        assert_eq!(
            bits(&got),
            bits(&cpu_gather(&host, &batches[3])),
            "{what}, batch 3 again"
        );
        println!("{what}: {:?}", store.stats());
    }
    // Tickets are bound to their table.
    let mut a = PinnedTable::new(be, host.clone()).unwrap();
    let mut b = PinnedTable::new(be, host.clone()).unwrap();
    let t = a.prefetch(&[1, 2]).unwrap();
    let mut out = be.alloc_zeros::<f32>(2 * width).unwrap();
    assert!(b.gather_prefetched(t, &mut out, be.stream()).is_err());
}

/// Paper segments: fresh, remembering, a one-token decode step, one shorter than the window.
fn paper_segments_check(be: &CudaBackend, cfg: &EngramConfig, seed: u64) {
    let mut rng = Rng::new(seed);
    let w = paper_weights(cfg, &mut rng);
    let gpu = CudaLayer::new(be, cfg.clone(), 1, &LayerWeights::Paper(w.clone())).unwrap();
    let reference = ReferenceLayer::new(cfg.clone(), 1, LayerWeights::Paper(w)).unwrap();
    let (c, e) = (cfg.branch_channels(), cfg.embed_dim());
    let lens = [13usize, 6, 1, 2];
    let tokens: usize = lens.iter().sum();
    let hidden = rng.vec(tokens * c, 2.0);
    let emb = rng.vec(tokens * e, 1.0);
    let mut s_ref: Vec<ShortConvState> = (0..3).map(|_| ShortConvState::new(cfg)).collect();
    for s in &mut s_ref {
        s.push_rows(&rng.vec(cfg.conv_history() * c, 1.0));
    }
    let mut s_gpu = s_ref.clone();
    let mut out_ref = vec![0f32; tokens * c];
    let mut out_gpu = vec![0f32; tokens * c];
    {
        let [a, b, d] = &mut s_ref[..] else {
            unreachable!()
        };
        let mut segs = [
            Segment::fresh(13),
            Segment::with_state(6, a),
            Segment::with_state(1, b),
            Segment::with_state(2, d),
        ];
        reference
            .forward(&hidden, &emb, None, &mut segs, &mut out_ref)
            .unwrap();
    }
    {
        let [a, b, d] = &mut s_gpu[..] else {
            unreachable!()
        };
        let mut segs = [
            Segment::fresh(13),
            Segment::with_state(6, a),
            Segment::with_state(1, b),
            Segment::with_state(2, d),
        ];
        gpu.forward(&hidden, &emb, None, &mut segs, &mut out_gpu)
            .unwrap();
    }
    let err = rel_err(&out_gpu, &out_ref);
    println!(
        "paper G={} D={} E={e}: rel err {err:.2e}",
        cfg.hc_mult, cfg.hidden_size
    );
    assert!(err <= 1e-5, "paper output rel err {err:e}");
    for (i, (g, r)) in s_gpu.iter().zip(&s_ref).enumerate() {
        let err = rel_err(g.rows(), r.rows());
        assert!(err <= 1e-5, "conv state {i}: rel err {err:e}");
    }
}

#[test]
#[ignore = "needs a CUDA device: cargo xtask test-gpu"]
fn paper_layer_matches_the_reference() {
    let gpu = gpu("paper_layer_matches_the_reference");
    paper_segments_check(&gpu.backend, &config(Variant::Paper, 4, 64, 16, 4, 3), 21);
    // Odd sizes: D not a multiple of the block, one branch.
    paper_segments_check(&gpu.backend, &config(Variant::Paper, 1, 300, 8, 3, 2), 22);
}

#[test]
#[ignore = "needs a CUDA device: cargo xtask test-gpu"]
fn paper_decode_on_device_equals_prefill() {
    let gpu = gpu("paper_decode_on_device_equals_prefill");
    let be = &gpu.backend;
    let cfg = config(Variant::Paper, 2, 96, 16, 2, 3);
    let mut rng = Rng::new(5);
    let w = paper_weights(&cfg, &mut rng);
    let layer = CudaLayer::new(be, cfg.clone(), 1, &LayerWeights::Paper(w)).unwrap();
    let (c, e) = (cfg.branch_channels(), cfg.embed_dim());
    let t = 17;
    let hidden = rng.vec(t * c, 1.0);
    let emb = rng.vec(t * e, 1.0);
    let (hd, ed) = (be.upload(&hidden).unwrap(), be.upload(&emb).unwrap());
    let mut whole = be.alloc_zeros::<f32>(t * c).unwrap();
    let mut state_whole = DeviceConvState::new(be, &cfg).unwrap();
    layer
        .forward_device(
            &hd,
            &ed,
            None,
            &mut [DeviceSegment::with_state(t, &mut state_whole)],
            &mut whole,
        )
        .unwrap();
    let whole = be.download(&whole).unwrap();
    // Prefill 5 tokens, then decode one at a time with the window on the device.
    let mut state = DeviceConvState::new(be, &cfg).unwrap();
    let mut steps = Vec::new();
    let mut at = 0;
    for len in std::iter::once(5).chain(std::iter::repeat_n(1, t - 5)) {
        let h = be.upload(&hidden[at * c..(at + len) * c]).unwrap();
        let x = be.upload(&emb[at * e..(at + len) * e]).unwrap();
        let mut o = be.alloc_zeros::<f32>(len * c).unwrap();
        layer
            .forward_device(
                &h,
                &x,
                None,
                &mut [DeviceSegment::with_state(len, &mut state)],
                &mut o,
            )
            .unwrap();
        steps.extend(be.download(&o).unwrap());
        at += len;
    }
    let err = rel_err(&steps, &whole);
    assert!(err <= 1e-5, "decode vs prefill rel err {err:e}");
    let (a, b) = (state.to_host(be).unwrap(), state_whole.to_host(be).unwrap());
    assert!(rel_err(a.rows(), b.rows()) <= 1e-5);
}

#[test]
#[ignore = "needs a CUDA device: cargo xtask test-gpu"]
fn v41_layer_matches_the_reference() {
    let gpu = gpu("v41_layer_matches_the_reference");
    let be = &gpu.backend;
    for (g, d, head_dim, heads) in [(2, 64, 32, 2), (4, 160, 64, 1)] {
        let cfg = config(Variant::V41, g, d, head_dim, heads, 4);
        let mut rng = Rng::new(31 + g as u64);
        let w = v41_weights(&cfg, &mut rng);
        let gpu_layer = CudaLayer::new(be, cfg.clone(), 1, &LayerWeights::V41(w.clone())).unwrap();
        let reference = ReferenceLayer::new(cfg.clone(), 1, LayerWeights::V41(w)).unwrap();
        let (c, e) = (cfg.branch_channels(), cfg.embed_dim());
        let t = 37;
        let hidden: Vec<f32> = rng.vec(t * c, 3.0).into_iter().map(round_bf16).collect();
        let emb: Vec<f32> = rng.vec(t * e, 1.0).into_iter().map(round_bf16).collect();
        let dead: Vec<bool> = (0..t).map(|i| i % 7 == 3).collect();
        let mut out_ref = vec![0f32; t * c];
        let mut out_gpu = vec![0f32; t * c];
        reference
            .forward(
                &hidden,
                &emb,
                Some(&dead),
                &mut [Segment::fresh(20), Segment::fresh(17)],
                &mut out_ref,
            )
            .unwrap();
        gpu_layer
            .forward(
                &hidden,
                &emb,
                Some(&dead),
                &mut [Segment::fresh(20), Segment::fresh(17)],
                &mut out_gpu,
            )
            .unwrap();
        let err = rel_err(&out_gpu, &out_ref);
        let (off, max_ulp) = bf16_distance(&out_gpu, &out_ref);
        println!("v41 G={g} D={d}: rel err {err:.2e}, {off} elements off (max {max_ulp} ulp)");
        assert!(err <= 1e-2, "rel err {err:e}");
        assert_v41_close(&out_gpu, &out_ref, &format!("v41 G={g} D={d}"));
        for (ti, &is_dead) in dead.iter().enumerate() {
            if is_dead {
                assert_eq!(
                    &out_gpu[ti * c..(ti + 1) * c],
                    &hidden[ti * c..(ti + 1) * c],
                    "dead token {ti} passes through"
                );
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device: cargo xtask test-gpu"]
fn whole_layer_from_an_fp8_table_on_every_placement() {
    let gpu = gpu("whole_layer_from_an_fp8_table_on_every_placement");
    let be = &gpu.backend;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(Variant::V41, 2, 64, 32, 2, 4);
    let mut rng = Rng::new(77);
    let host = random_table(RowDtype::F8E4M3Scaled, 3000, cfg.head_dim, &mut rng);
    let dense = DenseTable::new(
        "dense",
        cfg.head_dim,
        cpu_gather(&host, &(0..3000).collect::<Vec<_>>()),
    )
    .unwrap();
    let w = v41_weights(&cfg, &mut rng);
    let layer = CudaLayer::new(be, cfg.clone(), 1, &LayerWeights::V41(w.clone())).unwrap();
    let reference = ReferenceLayer::new(cfg.clone(), 1, LayerWeights::V41(w)).unwrap();
    let (c, heads) = (cfg.branch_channels(), cfg.heads_per_layer());
    let t = 29;
    let ids: Vec<u64> = (0..t * heads).map(|_| rng.below(3000)).collect();
    let hidden: Vec<f32> = rng.vec(t * c, 2.0).into_iter().map(round_bf16).collect();
    let mut emb = vec![0f32; t * cfg.embed_dim()];
    dense.gather_f32(&ids, &mut emb).unwrap();
    let mut want = vec![0f32; t * c];
    reference
        .forward(&hidden, &emb, None, &mut [Segment::fresh(t)], &mut want)
        .unwrap();
    let hd = be.upload(&hidden).unwrap();
    for mut store in placements(be, &host, dir.path()) {
        for prefetched in [false, true] {
            let mut out = be.alloc_zeros::<f32>(t * c).unwrap();
            let rows = if prefetched {
                Rows::Prefetched(store.prefetch(&ids).unwrap())
            } else {
                Rows::Ids(&ids)
            };
            layer
                .forward_rows(
                    store.as_mut(),
                    rows,
                    &hd,
                    None,
                    &mut [DeviceSegment::fresh(t)],
                    &mut out,
                )
                .unwrap();
            let got = be.download(&out).unwrap();
            assert_v41_close(&got, &want, &store.placement().to_string());
        }
    }
}

#[test]
#[ignore = "needs a CUDA device: cargo xtask test-gpu"]
fn golden_files_pass_on_the_gpu() {
    let gpu = gpu("golden_files_pass_on_the_gpu");
    let be = &gpu.backend;
    let dir = golden_data_dir();
    for file in [
        "forward_demo_small.safetensors",
        "forward_v41_small.safetensors",
    ] {
        let path = dir.join(file);
        let bytes = std::fs::read(&path).unwrap();
        let ck = Checkpoint::parse(&path, &bytes).unwrap();
        let meta = ck.metadata_json("meta").unwrap().unwrap();
        let cfg = EngramConfig::from_golden_meta(&meta).unwrap();
        let header = SafetensorsHeader::read_file(&path).unwrap();
        let (g, d, heads) = (cfg.hc_mult, cfg.hidden_size, cfg.heads_per_layer());
        let samples = meta["samples"].as_array().map_or(0, Vec::len);
        assert!(samples > 0);
        for layout in table_layouts(&cfg.hash) {
            let spec = table_spec(&ck, &cfg, &layout).unwrap();
            let host = HostTable::map_safetensors(&header, &spec).unwrap();
            let mut table = DeviceTable::upload(be, &host).unwrap();
            let weights = load_layer_weights(&ck, &cfg, layout.layer_id).unwrap();
            let layer = CudaLayer::new(be, cfg.clone(), layout.layer_id, &weights).unwrap();
            for i in 0..samples {
                let GoldenSample { ids, hidden, dead } = GoldenSample::read(&ck, &cfg, i).unwrap();
                let t = ids.len();
                let l = layout.layer_id;
                let rows: Vec<u64> = match cfg.variant {
                    Variant::Paper => ck
                        .i64_tensor(&format!("sample{i}.layer{l}.hash_ids"), &[1, t, heads])
                        .unwrap()
                        .iter()
                        .zip(layout.offsets.iter().cycle())
                        .map(|(&h, &o)| h as u64 + o)
                        .collect(),
                    Variant::V41 => ck
                        .i64_tensor(&format!("sample{i}.layer{l}.row_ids"), &[1, t, heads])
                        .unwrap()
                        .iter()
                        .map(|&r| r as u64)
                        .collect(),
                };
                let hd = be.upload(&hidden).unwrap();
                let mut out = be.alloc_zeros::<f32>(t * g * d).unwrap();
                layer
                    .forward_rows(
                        &mut table,
                        Rows::Ids(&rows),
                        &hd,
                        dead.as_deref(),
                        &mut [DeviceSegment::fresh(t)],
                        &mut out,
                    )
                    .unwrap();
                let got = be.download(&out).unwrap();
                let want = ck
                    .f32_tensor(&format!("sample{i}.layer{l}.output"), &[1, t, g, d])
                    .unwrap();
                let err = rel_err(&got, &want);
                let (off, max_ulp) = bf16_distance(&got, &want);
                println!("{file} sample {i} layer {l}: {t} tokens, rel err {err:.2e}, bf16 off {off} (max {max_ulp} ulp)");
                match cfg.variant {
                    Variant::Paper => {
                        assert!(err <= 1e-5, "{file} sample {i} layer {l}: rel err {err:e}")
                    }
                    // First seen on an H200: sample 0 layer 3 had 3 elements 2 ulp off; a
                    // plain sequential f32 sum on the CPU gives exactly the same 3.
                    Variant::V41 => {
                        assert_v41_close(&got, &want, &format!("{file} sample {i} layer {l}"))
                    }
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA device: cargo xtask test-gpu"]
fn bad_arguments_are_errors_on_a_working_device() {
    let gpu = gpu("bad_arguments_are_errors_on_a_working_device");
    let be = &gpu.backend;
    let cfg = config(Variant::Paper, 2, 32, 8, 2, 2);
    let mut rng = Rng::new(3);
    let layer = CudaLayer::new(
        be,
        cfg.clone(),
        1,
        &LayerWeights::Paper(paper_weights(&cfg, &mut rng)),
    )
    .unwrap();
    let (c, e) = (cfg.branch_channels(), cfg.embed_dim());
    // Host API: a short output buffer is a shape error.
    let mut out = vec![0f32; 3 * c - 1];
    let err = layer
        .forward(
            &vec![0.0; 3 * c],
            &vec![0.0; 3 * e],
            None,
            &mut [Segment::fresh(3)],
            &mut out,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("output"), "{err}");
    // Zero tokens are fine.
    layer
        .forward(&[], &[], None, &mut [Segment::fresh(0)], &mut [])
        .unwrap();
    // Device API: small buffers, a mask of the wrong length, a state of the wrong shape.
    let small = be.alloc_zeros::<f32>(c).unwrap();
    let mut o = be.alloc_zeros::<f32>(3 * c).unwrap();
    assert!(layer
        .forward_device(&small, &small, None, &mut [DeviceSegment::fresh(3)], &mut o)
        .is_err());
    let h = be.alloc_zeros::<f32>(3 * c).unwrap();
    let x = be.alloc_zeros::<f32>(3 * e).unwrap();
    assert!(layer
        .forward_device(
            &h,
            &x,
            Some(&[false]),
            &mut [DeviceSegment::fresh(3)],
            &mut o
        )
        .is_err());
    let other = config(Variant::Paper, 1, 32, 8, 2, 2);
    let mut wrong = DeviceConvState::new(be, &other).unwrap();
    assert!(layer
        .forward_device(
            &h,
            &x,
            None,
            &mut [DeviceSegment::with_state(3, &mut wrong)],
            &mut o
        )
        .is_err());
    // Weights of the other variant.
    let v41 = config(Variant::V41, 2, 32, 32, 1, 2);
    assert!(CudaLayer::new(
        be,
        v41.clone(),
        1,
        &LayerWeights::Paper(paper_weights(&cfg, &mut rng))
    )
    .is_err());
    // Row ids of the wrong count for forward_rows.
    let host = random_table(RowDtype::F32, 10, cfg.head_dim, &mut rng);
    let mut table = DeviceTable::upload(be, &host).unwrap();
    let e2 = layer
        .forward_rows(
            &mut table,
            Rows::Ids(&[1, 2, 3]),
            &h,
            None,
            &mut [DeviceSegment::fresh(3)],
            &mut o,
        )
        .unwrap_err()
        .to_string();
    assert!(e2.contains("row ids"), "{e2}");
}
