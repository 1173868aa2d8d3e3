//! Parity of `engram_cpu::layer::CpuLayer` with `engram_core::reference::ReferenceLayer`
//! on random configs, weights and batches (segments with and without conv state, dead
//! tokens), for f32 and bf16 activations, and refusal of wrongly sized buffers.

use engram_core::backend::{EngramLayer, Segment, ShortConvState};
use engram_core::checkpoint::{LayerWeights, PaperWeights, V41Weights};
use engram_core::config::{EngramConfig, HashConfig, Variant};
use engram_core::metrics::{relative_error, worse};
use engram_core::reference::ReferenceLayer;
use engram_cpu::layer::CpuLayer;
use float8::F8E4M3;
use half::bf16;

/// xorshift64*: small, seeded, good enough for test data.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [lo, hi).
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len())]
    }
    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
    fn branches(&mut self, g: usize, n: usize, lo: f32, hi: f32) -> Vec<Vec<f32>> {
        (0..g).map(|_| self.vec(n, lo, hi)).collect()
    }
}

struct Dims {
    g: usize,
    d: usize,
    max_n: usize,
    heads: usize,
    head_dim: usize,
    kernel: usize,
}

fn config(variant: Variant, s: &Dims) -> EngramConfig {
    let cfg = EngramConfig {
        variant,
        hash: HashConfig {
            engram_vocab_size: vec![1009; s.max_n - 1],
            max_ngram_size: s.max_n,
            n_head_per_ngram: s.heads,
            layer_ids: vec![1, 3],
            pad_id: 2,
            seed: 0,
            compressed_vocab_size: None,
        },
        head_dim: s.head_dim,
        kernel_size: if variant == Variant::Paper {
            s.kernel
        } else {
            0
        },
        hidden_size: s.d,
        hc_mult: s.g,
        rms_norm_eps: 1e-20,
    };
    cfg.validate().unwrap();
    cfg
}

fn random_dims(rng: &mut Rng, variant: Variant) -> Dims {
    let v41 = variant == Variant::V41;
    Dims {
        g: rng.pick(&[1, 4]),
        d: rng.pick(&[32, 64, 96]),
        max_n: 2 + rng.below(3),
        heads: 1 + rng.below(4),
        head_dim: if v41 {
            rng.pick(&[32, 64])
        } else {
            rng.pick(&[16, 32, 48, 64])
        },
        kernel: 1 + rng.below(4),
    }
}

fn paper_weights(rng: &mut Rng, cfg: &EngramConfig) -> LayerWeights {
    let (g, d, e) = (cfg.hc_mult, cfg.hidden_size, cfg.embed_dim());
    let a = 1.0 / (e as f32).sqrt(); // torch Linear init range
    LayerWeights::Paper(PaperWeights {
        key_weight: rng.branches(g, d * e, -a, a),
        key_bias: rng.branches(g, d, -a, a),
        value_weight: rng.vec(d * e, -a, a),
        value_bias: rng.vec(d, -a, a),
        norm1: rng.branches(g, d, 0.5, 1.5),
        norm2: rng.branches(g, d, 0.5, 1.5),
        conv_weight: rng.vec(g * d * cfg.kernel_size, -1.0, 1.0),
        conv_norms: rng.branches(g, d, 0.5, 1.5),
    })
}

/// A value that survives fp8 E4M3: random f32 rounded through it.
fn e4m3(rng: &mut Rng, range: f32) -> f32 {
    F8E4M3::from_f32(rng.uniform(-range, range)).to_f32()
}

fn bf16_vals(rng: &mut Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n)
        .map(|_| bf16::from_f32(rng.uniform(lo, hi)).to_f32())
        .collect()
}

/// Dequantized fp8 times a power-of-two scale per 32x32 block, as `wkv` looks in V4.1.
fn v41_weights(rng: &mut Rng, cfg: &EngramConfig) -> LayerWeights {
    let (g, d, e) = (cfg.hc_mult, cfg.hidden_size, cfg.embed_dim());
    let rows = (g + 1) * d;
    let (br, bc) = (rows / 32, e / 32);
    let scales: Vec<f32> = (0..br * bc)
        .map(|_| 2f32.powi(-(8 + rng.below(4) as i32)))
        .collect();
    let wkv = (0..rows * e)
        .map(|i| e4m3(rng, 300.0) * scales[(i / e / 32) * bc + (i % e) / 32])
        .collect();
    LayerWeights::V41(V41Weights {
        wkv,
        q_weight: bf16_vals(rng, g * d, -1.5, 1.5),
        k_weight: bf16_vals(rng, g * d, 0.2, 1.5),
    })
}

/// Embeddings as V4.1 table rows look: bf16(e4m3 * 2^s) with one scale per 32 columns.
fn v41_embeddings(rng: &mut Rng, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let s = 2f32.powi(-(6 + rng.below(4) as i32));
        for _ in 0..32.min(n - out.len()) {
            out.push(bf16::from_f32(e4m3(rng, 400.0) * s).to_f32());
        }
    }
    out
}

/// A batch layout: segment lengths and, per segment, a conv state (None = fresh).
struct Batch {
    lens: Vec<usize>,
    states: Vec<Option<ShortConvState>>,
}

impl Batch {
    fn random(rng: &mut Rng, cfg: &EngramConfig, max_len: usize) -> Self {
        let n = 1 + rng.below(4);
        let lens = (0..n).map(|_| rng.below(max_len + 1)).collect();
        let states = (0..n)
            .map(|_| {
                (rng.below(3) > 0).then(|| {
                    // A state with history, as left by earlier tokens of the sequence.
                    let mut s = ShortConvState::new(cfg);
                    let rows = s.history() + rng.below(3);
                    s.push_rows(&rng.vec(rows * cfg.branch_channels(), -2.0, 2.0));
                    s
                })
            })
            .collect();
        Self { lens, states }
    }
    fn tokens(&self) -> usize {
        self.lens.iter().sum()
    }
}

fn segments<'a>(lens: &[usize], states: &'a mut [Option<ShortConvState>]) -> Vec<Segment<'a>> {
    lens.iter()
        .zip(states.iter_mut())
        .map(|(&len, s)| Segment {
            len,
            conv: s.as_mut(),
        })
        .collect()
}

/// Spacing of bf16 values at magnitude |x|.
fn bf16_ulp(x: f32) -> f32 {
    let a = bf16::from_f32(x.abs());
    bf16::from_bits(a.to_bits() + 1).to_f32() - a.to_f32()
}

/// The golden rule for bf16 outputs: equal, or within one bf16 ulp on at most 1% of
/// the elements. Returns how many differ.
fn assert_bf16_close(got: &[f32], want: &[f32], what: &str) -> usize {
    let mut differ = 0;
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        if a != b {
            differ += 1;
            let ulp = bf16_ulp(a.abs().max(b.abs()));
            assert!((a - b).abs() <= ulp, "{what}: element {i}: {a} vs {b}");
        }
    }
    assert!(
        differ * 100 <= got.len(),
        "{what}: {differ} of {} elements differ",
        got.len()
    );
    differ
}

struct Outputs {
    out: Vec<f32>,
    states: Vec<Option<ShortConvState>>,
}

fn run(
    layer: &dyn EngramLayer,
    batch: &Batch,
    hidden: &[f32],
    emb: &[f32],
    dead: Option<&[bool]>,
) -> Outputs {
    let mut states = batch.states.clone();
    let mut out = vec![f32::NAN; hidden.len()];
    let mut segs = segments(&batch.lens, &mut states);
    layer
        .forward(hidden, emb, dead, &mut segs, &mut out)
        .unwrap();
    Outputs { out, states }
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
    let mut segs = segments(&batch.lens, &mut states);
    layer
        .forward_bf16(hidden, emb, dead, &mut segs, &mut out)
        .unwrap();
    Outputs {
        out: out.iter().map(|v| v.to_f32()).collect(),
        states,
    }
}

fn state_rel_err(got: &[Option<ShortConvState>], want: &[Option<ShortConvState>]) -> f64 {
    got.iter()
        .zip(want)
        .map(|(a, b)| match (a, b) {
            (Some(a), Some(b)) => relative_error(a.rows(), b.rows()),
            (None, None) => 0.0,
            _ => f64::INFINITY,
        })
        .fold(0.0, worse)
}

/// Random paper-variant case `seed` with at most `max_len` tokens per segment; returns
/// the max relative errors (f32 out, conv state).
fn paper_case(seed: u64, max_len: usize, dims: Option<Dims>) -> (f64, f64) {
    let mut rng = Rng::new(seed);
    let dims = dims.unwrap_or_else(|| random_dims(&mut rng, Variant::Paper));
    let cfg = config(Variant::Paper, &dims);
    let weights = paper_weights(&mut rng, &cfg);
    let reference = ReferenceLayer::new(cfg.clone(), 3, weights.clone()).unwrap();
    let cpu = CpuLayer::new(cfg.clone(), 3, weights).unwrap();
    let batch = Batch::random(&mut rng, &cfg, max_len);
    let t = batch.tokens();
    let hidden = rng.vec(t * cfg.branch_channels(), -2.0, 2.0);
    let emb = rng.vec(t * cfg.embed_dim(), -1.0, 1.0);

    let want = run(&reference, &batch, &hidden, &emb, None);
    let got = run(&cpu, &batch, &hidden, &emb, None);
    let (out_err, state_err) = (
        relative_error(&got.out, &want.out),
        state_rel_err(&got.states, &want.states),
    );
    assert!(out_err <= 1e-6, "seed {seed}: output rel err {out_err:e}");
    assert!(
        state_err <= 1e-6,
        "seed {seed}: state rel err {state_err:e}"
    );

    // bf16 activations: the reference on the bf16-rounded input, rounded once more.
    let h16: Vec<bf16> = hidden.iter().map(|&v| bf16::from_f32(v)).collect();
    let h16_f32: Vec<f32> = h16.iter().map(|v| v.to_f32()).collect();
    let want16 = run(&reference, &batch, &h16_f32, &emb, None);
    let got16 = run_bf16(&cpu, &batch, &h16, &emb, None);
    let cpu32 = run(&cpu, &batch, &h16_f32, &emb, None);
    let scale = want16.out.iter().fold(0f32, |m, v| m.max(v.abs()));
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
    (out_err, state_err)
}

#[test]
fn paper_matches_reference_on_random_cases() {
    let (mut out_max, mut state_max) = (0f64, 0f64);
    for seed in 0..40 {
        let (o, s) = paper_case(seed, 12, None);
        out_max = worse(out_max, o);
        state_max = worse(state_max, s);
    }
    println!("paper f32: max rel err output {out_max:e}, conv state {state_max:e}");
}

#[test]
fn paper_large_batch_runs_parallel_paths() {
    let dims = Dims {
        g: 4,
        d: 64,
        max_n: 3,
        heads: 4,
        head_dim: 48,
        kernel: 4,
    };
    let (o, s) = paper_case(1000, 120, Some(dims));
    println!("paper large batch: rel err output {o:e}, conv state {s:e}");
}

#[test]
fn paper_demo_shape() {
    // The demo's row layout: orders 2 and 3, 8 heads of 64 columns (E = 1024).
    let dims = Dims {
        g: 4,
        d: 128,
        max_n: 3,
        heads: 8,
        head_dim: 64,
        kernel: 4,
    };
    let (o, s) = paper_case(77, 6, Some(dims));
    println!("paper E=1024: rel err output {o:e}, conv state {s:e}");
}

/// Feeding a sequence in chunks with a conv state equals feeding it whole.
#[test]
fn paper_chunked_equals_whole() {
    let mut rng = Rng::new(7);
    let dims = Dims {
        g: 4,
        d: 32,
        max_n: 3,
        heads: 2,
        head_dim: 16,
        kernel: 4,
    };
    let cfg = config(Variant::Paper, &dims);
    let cpu = CpuLayer::new(cfg.clone(), 1, paper_weights(&mut rng, &cfg)).unwrap();
    let (c, e, n) = (cfg.branch_channels(), cfg.embed_dim(), 23);
    let hidden = rng.vec(n * c, -2.0, 2.0);
    let emb = rng.vec(n * e, -1.0, 1.0);
    let mut whole = vec![0f32; n * c];
    cpu.forward(&hidden, &emb, None, &mut [Segment::fresh(n)], &mut whole)
        .unwrap();
    let mut state = ShortConvState::new(&cfg);
    let mut chunked = vec![0f32; n * c];
    let mut t = 0;
    for len in [1, 5, 1, 1, 9, 6] {
        let r = t..t + len;
        cpu.forward(
            &hidden[r.start * c..r.end * c],
            &emb[r.start * e..r.end * e],
            None,
            &mut [Segment::with_state(len, &mut state)],
            &mut chunked[r.start * c..r.end * c],
        )
        .unwrap();
        t += len;
    }
    assert_eq!(t, n);
    let err = relative_error(&chunked, &whole);
    assert!(err <= 1e-6, "chunked vs whole: {err:e}");
}

/// Random V4.1 case; returns (elements differing from the reference, total).
fn v41_case(seed: u64, max_len: usize, dims: Option<Dims>) -> (usize, usize) {
    let mut rng = Rng::new(seed);
    let dims = dims.unwrap_or_else(|| random_dims(&mut rng, Variant::V41));
    let mut cfg = config(Variant::V41, &dims);
    if seed % 2 == 1 {
        cfg.rms_norm_eps = 1e-6;
    }
    let weights = v41_weights(&mut rng, &cfg);
    let reference = ReferenceLayer::new(cfg.clone(), 1, weights.clone()).unwrap();
    let cpu = CpuLayer::new(cfg.clone(), 1, weights).unwrap();
    let mut batch = Batch::random(&mut rng, &cfg, max_len);
    batch.states.iter_mut().for_each(|s| *s = None);
    let t = batch.tokens();
    let hidden = bf16_vals(&mut rng, t * cfg.branch_channels(), -3.0, 3.0);
    let emb = v41_embeddings(&mut rng, t * cfg.embed_dim());
    let dead: Vec<bool> = (0..t).map(|_| rng.below(7) == 0).collect();
    let dead = (!seed.is_multiple_of(3)).then_some(&dead[..]);

    let want = run(&reference, &batch, &hidden, &emb, dead);
    let got = run(&cpu, &batch, &hidden, &emb, dead);
    let differ = assert_bf16_close(&got.out, &want.out, &format!("seed {seed}"));
    if let Some(dead) = dead {
        let c = cfg.branch_channels();
        for (i, _) in dead.iter().enumerate().filter(|(_, &d)| d) {
            assert_eq!(got.out[i * c..(i + 1) * c], hidden[i * c..(i + 1) * c]);
        }
    }
    // bf16 activations: V4.1 output is bf16 already, so both paths agree exactly.
    let h16: Vec<bf16> = hidden.iter().map(|&v| bf16::from_f32(v)).collect();
    let got16 = run_bf16(&cpu, &batch, &h16, &emb, dead);
    assert_eq!(got16.out, got.out, "seed {seed}: bf16 path");
    (differ, got.out.len())
}

#[test]
fn v41_matches_reference_on_random_cases() {
    let (mut differ, mut total) = (0, 0);
    for seed in 0..40 {
        let (d, t) = v41_case(seed, 10, None);
        differ += d;
        total += t;
    }
    println!("v41: {differ} of {total} elements 1 bf16 ulp off the reference, the rest equal");
}

#[test]
fn v41_large_batch_runs_parallel_paths() {
    let dims = Dims {
        g: 4,
        d: 64,
        max_n: 4,
        heads: 2,
        head_dim: 64,
        kernel: 0,
    };
    let (d, t) = v41_case(2000, 100, Some(dims));
    println!("v41 large batch: {d} of {t} elements 1 bf16 ulp off");
}

#[test]
fn empty_batch_is_fine() {
    let mut rng = Rng::new(3);
    let dims = random_dims(&mut rng, Variant::Paper);
    let cfg = config(Variant::Paper, &dims);
    let cpu = CpuLayer::new(cfg.clone(), 1, paper_weights(&mut rng, &cfg)).unwrap();
    let mut state = ShortConvState::new(&cfg);
    let before = state.clone();
    cpu.forward(
        &[],
        &[],
        None,
        &mut [Segment::with_state(0, &mut state)],
        &mut [],
    )
    .unwrap();
    cpu.forward_bf16(&[], &[], None, &mut [], &mut []).unwrap();
    assert_eq!(state, before);
}

#[test]
fn wrong_sizes_are_errors() {
    let mut rng = Rng::new(11);
    for variant in [Variant::Paper, Variant::V41] {
        let dims = random_dims(&mut rng, variant);
        let cfg = config(variant, &dims);
        let weights = match variant {
            Variant::Paper => paper_weights(&mut rng, &cfg),
            Variant::V41 => v41_weights(&mut rng, &cfg),
        };
        let cpu = CpuLayer::new(cfg.clone(), 1, weights.clone()).unwrap();
        let (c, e, n) = (cfg.branch_channels(), cfg.embed_dim(), 3);
        let (h, em) = (vec![0.5f32; n * c], vec![0.5f32; n * e]);
        let h16 = vec![bf16::ONE; n * c];
        let mut o = vec![0f32; n * c];
        let mut o16 = vec![bf16::ZERO; n * c];
        let dead = vec![false; n];
        let seg = || vec![Segment::fresh(n)];
        assert!(cpu.forward(&h, &em, None, &mut seg(), &mut o).is_ok());
        assert!(cpu.forward(&h[1..], &em, None, &mut seg(), &mut o).is_err());
        assert!(cpu.forward(&h, &em[1..], None, &mut seg(), &mut o).is_err());
        assert!(cpu.forward(&h, &em, None, &mut seg(), &mut o[1..]).is_err());
        assert!(cpu
            .forward(&h, &em, Some(&dead[1..]), &mut seg(), &mut o)
            .is_err());
        assert!(cpu
            .forward(&h, &em, None, &mut [Segment::fresh(n + 1)], &mut o)
            .is_err());
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
        let mut bad_state = ShortConvState::with_size(c + 1, cfg.conv_history() + 1);
        let mut segs = [Segment::with_state(n, &mut bad_state)];
        assert!(cpu.forward(&h, &em, None, &mut segs, &mut o).is_err());

        // Construction: unknown layer, weights of the wrong size or variant.
        assert!(CpuLayer::new(cfg.clone(), 2, weights.clone()).is_err());
        let (short, other) = match weights {
            LayerWeights::Paper(mut w) => {
                w.norm2[0].pop();
                let other = v41_weights(
                    &mut rng,
                    &config(
                        Variant::V41,
                        &Dims {
                            d: 32,
                            head_dim: 32,
                            ..dims
                        },
                    ),
                );
                (LayerWeights::Paper(w), other)
            }
            LayerWeights::V41(mut w) => {
                w.wkv.pop();
                let other = paper_weights(
                    &mut rng,
                    &config(Variant::Paper, &Dims { kernel: 2, ..dims }),
                );
                (LayerWeights::V41(w), other)
            }
        };
        let err = CpuLayer::new(cfg.clone(), 1, short)
            .unwrap_err()
            .to_string();
        assert!(err.contains("norm2") || err.contains("wkv"), "{err}");
        assert!(CpuLayer::new(cfg, 1, other).is_err());
    }
}
