//! `engram_cpu::layer::CpuLayer` against `engram_core::reference::ReferenceLayer`: the
//! conformance suite every backend runs (`engram_core::testing::conformance`: random
//! configs, weights and batches of both variants, chunked decode, errors), then what only
//! the CPU layer has, bf16 activations (`forward_bf16`).

use engram_core::backend::{EngramLayer, Segment, ShortConvState};
use engram_core::checkpoint::LayerWeights;
use engram_core::config::{EngramConfig, Variant};
use engram_core::reference::ReferenceLayer;
use engram_core::testing::conformance::{
    check_layer, config, layer_weights, random_dims, run, run_projected, same_bits, v41_embeddings,
    Batch, Dims, Outputs, Tolerance,
};
use engram_core::testing::TestRng;
use engram_core::Result;
use engram_cpu::layer::CpuLayer;
use half::bf16;

fn make_cpu(cfg: EngramConfig, id: usize, w: LayerWeights) -> Result<Box<dyn EngramLayer>> {
    Ok(Box::new(CpuLayer::new(cfg, id, w)?))
}

#[test]
fn cpu_layer_passes_the_conformance_suite() {
    let report = check_layer(&make_cpu, Tolerance::CPU);
    println!("CpuLayer: {report}");
}

fn run_bf16(
    layer: &CpuLayer,
    batch: &Batch,
    hidden: &[bf16],
    emb: &[f32],
    dead: Option<&[bool]>,
) -> Outputs {
    let mut states = batch.states.clone();
    let mut out = vec![bf16::NAN; hidden.len()];
    let mut segs = batch.segments(&mut states);
    layer
        .forward_bf16(hidden, emb, dead, &mut segs, &mut out)
        .unwrap();
    Outputs {
        out: out.iter().map(|v| v.to_f32()).collect(),
        states,
    }
}

/// Spacing of bf16 values at magnitude |x|.
fn bf16_ulp(x: f32) -> f32 {
    let a = bf16::from_f32(x.abs());
    bf16::from_bits(a.to_bits() + 1).to_f32() - a.to_f32()
}

/// Paper variant with bf16 activations: within a bf16 ulp of the reference on the
/// rounded input, and exactly the f32 path rounded.
fn paper_bf16_case(seed: u64, max_len: usize, dims: Option<Dims>) {
    let mut rng = TestRng::new(seed);
    let dims = dims.unwrap_or_else(|| random_dims(&mut rng, Variant::Paper));
    let cfg = config(Variant::Paper, &dims);
    let weights = layer_weights(&mut rng, &cfg);
    let reference = ReferenceLayer::new(cfg.clone(), 3, weights.clone()).unwrap();
    let cpu = CpuLayer::new(cfg.clone(), 3, weights).unwrap();
    let batch = Batch::random(&mut rng, &cfg, max_len);
    let t = batch.tokens();
    let hidden = rng.uniform_vec(t * cfg.branch_channels(), -2.0, 2.0);
    let emb = rng.uniform_vec(t * cfg.embed_dim(), -1.0, 1.0);

    let h16: Vec<bf16> = hidden.iter().map(|&v| bf16::from_f32(v)).collect();
    let h16_f32: Vec<f32> = h16.iter().map(|v| v.to_f32()).collect();
    let want16 = run(&reference, &batch, &h16_f32, &emb, None);
    let got16 = run_bf16(&cpu, &batch, &h16, &emb, None);
    let cpu32 = run(&cpu, &batch, &h16_f32, &emb, None);
    let scale = engram_core::metrics::worst(want16.out.iter().map(|v| v.abs() as f64)) as f32;
    for (i, (&a, &b)) in got16.out.iter().zip(&want16.out).enumerate() {
        let tol = bf16_ulp(b) + 1e-6 * scale;
        assert!(
            (a - b).abs() <= tol,
            "seed {seed}: bf16 element {i}: {a} vs {b}"
        );
    }
    // Same math inside: the bf16 path is the f32 path rounded.
    let rounded: Vec<f32> = cpu32
        .out
        .iter()
        .map(|&v| bf16::from_f32(v).to_f32())
        .collect();
    assert_eq!(
        got16.out, rounded,
        "seed {seed}: bf16 path != rounded f32 path"
    );
    assert_eq!(got16.states, cpu32.states, "seed {seed}: bf16 path states");
}

#[test]
fn paper_bf16_path_is_the_f32_path_rounded() {
    for seed in 0..40 {
        paper_bf16_case(seed, 12, None);
    }
    let large = Dims {
        hc_mult: 4,
        hidden: 64,
        max_ngram: 3,
        heads: 4,
        head_dim: 48,
        kernel: 4,
    };
    paper_bf16_case(1000, 120, Some(large));
}

/// V4.1 outputs are bf16 values already: the bf16 path equals the f32 path exactly.
#[test]
fn v41_bf16_path_equals_the_f32_path() {
    for seed in 0..20 {
        let mut rng = TestRng::new(seed);
        let dims = random_dims(&mut rng, Variant::V41);
        let cfg = config(Variant::V41, &dims);
        let cpu = CpuLayer::new(cfg.clone(), 1, layer_weights(&mut rng, &cfg)).unwrap();
        let mut batch = Batch::random(&mut rng, &cfg, 10);
        batch.states.iter_mut().for_each(|s| *s = None);
        let t = batch.tokens();
        let h16: Vec<bf16> = (0..t * cfg.branch_channels())
            .map(|_| bf16::from_f32(rng.uniform(-3.0, 3.0)))
            .collect();
        let hidden: Vec<f32> = h16.iter().map(|v| v.to_f32()).collect();
        let emb = v41_embeddings(&mut rng, t * cfg.embed_dim());
        let dead: Vec<bool> = (0..t).map(|_| rng.below(7) == 0).collect();
        let got = run(&cpu, &batch, &hidden, &emb, Some(&dead));
        let got16 = run_bf16(&cpu, &batch, &h16, &emb, Some(&dead));
        assert_eq!(got16.out, got.out, "seed {seed}: bf16 path");
    }
}

#[test]
fn bf16_calls_of_the_wrong_size_are_errors() {
    let mut rng = TestRng::new(11);
    for variant in [Variant::Paper, Variant::V41] {
        let cfg = config(variant, &random_dims(&mut rng, variant));
        let cpu = CpuLayer::new(cfg.clone(), 1, layer_weights(&mut rng, &cfg)).unwrap();
        let (c, e, n) = (cfg.branch_channels(), cfg.embed_dim(), 3);
        let em = vec![0.5f32; n * e];
        let h16 = vec![bf16::ONE; n * c];
        let mut o16 = vec![bf16::ZERO; n * c];
        let seg = || vec![Segment::fresh(n)];
        cpu.forward_bf16(&[], &[], None, &mut [], &mut []).unwrap();
        assert!(cpu
            .forward_bf16(&h16, &em, None, &mut seg(), &mut o16)
            .is_ok());
        assert!(cpu
            .forward_bf16(&h16[1..], &em, None, &mut seg(), &mut o16)
            .is_err());
        assert!(cpu
            .forward_bf16(&h16, &em[1..], None, &mut seg(), &mut o16)
            .is_err());
        assert!(cpu
            .forward_bf16(&h16, &em, None, &mut seg(), &mut o16[1..])
            .is_err());
        let mut state = ShortConvState::with_size(c + 1, cfg.conv_history() + 1);
        assert!(cpu
            .forward_bf16(
                &h16,
                &em,
                None,
                &mut [Segment::with_state(n, &mut state)],
                &mut o16
            )
            .is_err());
    }
}

/// Projected on a fetcher's one-thread pool (as the plugin's prefetch thread does), the
/// rows give what `forward` gives on rayon's global pool, bit for bit: decode sizes (one
/// product per token, spread over the pool from 2 tokens on) and prefill sizes (the
/// blocked GEMM, split over the pool). The demo's shape, so the products are large enough
/// for the pool paths.
#[test]
fn projecting_on_a_fetcher_pool_changes_no_bit() {
    let mut rng = TestRng::new(31);
    let dims = Dims {
        hc_mult: 1,
        hidden: 576,
        max_ngram: 3,
        heads: 8,
        head_dim: 64,
        kernel: 4,
    };
    let cfg = config(Variant::Paper, &dims);
    let layer = CpuLayer::new(cfg.clone(), 3, layer_weights(&mut rng, &cfg)).unwrap();
    let fetcher = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let (c, e) = (cfg.branch_channels(), cfg.embed_dim());
    for max_len in [1, 4, 16, 48] {
        let batch = Batch::random(&mut rng, &cfg, max_len);
        let t = batch.tokens();
        let hidden = rng.uniform_vec(t * c, -2.0, 2.0);
        let emb = rng.uniform_vec(t * e, -1.0, 1.0);
        let want = run(&layer, &batch, &hidden, &emb, None);
        let mut kv = fetcher
            .install(|| layer.project(&emb))
            .unwrap()
            .expect("the CPU layer projects ahead");
        let got = run_projected(&layer, &batch, &hidden, &mut kv, None).unwrap();
        assert!(same_bits(&got.out, &want.out), "{t} tokens: outputs differ");
        assert_eq!(got.states, want.states, "{t} tokens: conv states differ");
    }
}
