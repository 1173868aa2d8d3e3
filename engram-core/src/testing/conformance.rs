//! The conformance suite every backend runs against the reference (one suite over every
//! backend, instead of a copy per backend): [`check_layer`] for an
//! [`EngramLayer`] built by the backend, [`check_store`] for a [`TableStore`].
//!
//! A check panics with what differed (it is meant to be called from a `#[test]`), and
//! returns a summary to print.

use half::{bf16, f16};

use super::TestRng;
use crate::backend::{EngramLayer, Segment, ShortConvState};
use crate::checkpoint::{LayerWeights, PaperWeights, V41Weights};
use crate::config::{EngramConfig, HashConfig, Variant};
use crate::dtype::{e8m0_to_f32, f8e4m3_to_f32, round_bf16, RowDtype, FP8_SCALE_BLOCK};
use crate::error::Result;
use crate::metrics::{bf16_distance_over, relative_error, worse};
use crate::reference::ReferenceLayer;
use crate::table::TableStore;

/// How close a backend must come to the reference.
#[derive(Clone, Copy, Debug)]
pub struct Tolerance {
    /// Paper variant (f32 outputs and conv states): relative error at most this.
    pub paper_rel: f64,
    /// V4.1 (bf16 outputs): no element more than this many bf16 ulps off,
    pub v41_max_ulp: u32,
    /// at most this fraction of elements more than 1 ulp off,
    pub v41_beyond_one_ulp: f64,
    /// and at most this fraction off at all.
    pub v41_off: f64,
}

impl Tolerance {
    /// A CPU backend: its f32 sums differ from the reference's f64 ones by rounding only,
    /// and V4.1's kv, rounded to bf16, flips on at most 1% of elements by one ulp.
    pub const CPU: Tolerance = Tolerance {
        paper_rel: 1e-6,
        v41_max_ulp: 1,
        v41_beyond_one_ulp: 0.0,
        v41_off: 0.01,
    };
    /// A GPU backend: cuBLAS sums in its own order, so a kv element next to a bf16
    /// rounding boundary can land on the other side, which is 2 output ulps where the
    /// output cancels (seen on an H200 on the golden files; docs/gpu.md).
    pub const GPU: Tolerance = Tolerance {
        paper_rel: 1e-5,
        v41_max_ulp: 2,
        v41_beyond_one_ulp: 0.001,
        v41_off: 0.01,
    };
}

/// A backend's layer constructor: `(config, layer id, weights) -> layer`.
pub type LayerFactory<'a> =
    dyn Fn(EngramConfig, usize, LayerWeights) -> Result<Box<dyn EngramLayer>> + 'a;

/// Layer shapes of one case.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub hc_mult: usize,
    pub hidden: usize,
    pub max_ngram: usize,
    /// Heads per n-gram order.
    pub heads: usize,
    pub head_dim: usize,
    /// The paper's short-conv kernel size (V4.1 has none).
    pub kernel: usize,
}

/// A one-table config for layers 1 and 3 of shapes `d` (orders 2..=max_ngram, 1009
/// rows per head).
pub fn config(variant: Variant, d: &Dims) -> EngramConfig {
    let cfg = EngramConfig {
        variant,
        hash: HashConfig {
            engram_vocab_size: vec![1009; d.max_ngram - 1],
            max_ngram_size: d.max_ngram,
            n_head_per_ngram: d.heads,
            layer_ids: vec![1, 3],
            pad_id: 2,
            seed: 0,
            compressed_vocab_size: None,
        },
        head_dim: d.head_dim,
        kernel_size: if variant == Variant::Paper {
            d.kernel
        } else {
            0
        },
        hidden_size: d.hidden,
        hc_mult: d.hc_mult,
        rms_norm_eps: 1e-20,
    };
    cfg.validate().expect("the suite's config is valid");
    cfg
}

/// Small random shapes, both hc_mult cases (1: an ordinary block; 4: hyper-connections).
pub fn random_dims(rng: &mut TestRng, variant: Variant) -> Dims {
    let v41 = variant == Variant::V41;
    Dims {
        hc_mult: rng.pick(&[1, 4]),
        hidden: rng.pick(&[32, 64, 96]),
        max_ngram: 2 + rng.below(3) as usize,
        heads: 1 + rng.below(4) as usize,
        head_dim: if v41 {
            rng.pick(&[32, 64])
        } else {
            rng.pick(&[16, 32, 48, 64])
        },
        kernel: 1 + rng.below(4) as usize,
    }
}

/// Paper weights as torch initializes a Linear (uniform in +-1/sqrt(fan_in)), norms
/// around 1.
pub fn paper_weights(rng: &mut TestRng, cfg: &EngramConfig) -> LayerWeights {
    let (g, d, e) = (cfg.hc_mult, cfg.hidden_size, cfg.embed_dim());
    let a = 1.0 / (e as f32).sqrt();
    let mut branches = |n: usize, lo: f32, hi: f32| -> Vec<Vec<f32>> {
        (0..g).map(|_| rng.uniform_vec(n, lo, hi)).collect()
    };
    let (key_weight, key_bias) = (branches(d * e, -a, a), branches(d, -a, a));
    let (norm1, norm2, conv_norms) = (
        branches(d, 0.5, 1.5),
        branches(d, 0.5, 1.5),
        branches(d, 0.5, 1.5),
    );
    LayerWeights::Paper(PaperWeights {
        key_weight,
        key_bias,
        value_weight: rng.uniform_vec(d * e, -a, a),
        value_bias: rng.uniform_vec(d, -a, a),
        norm1,
        norm2,
        conv_weight: rng.uniform_vec(g * d * cfg.kernel_size, -1.0, 1.0),
        conv_norms,
    })
}

/// A value that survives FP8 E4M3: a uniform draw rounded through it.
fn e4m3(rng: &mut TestRng, range: f32) -> f32 {
    float8::F8E4M3::from_f32(rng.uniform(-range, range)).to_f32()
}

fn bf16_values(rng: &mut TestRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| round_bf16(rng.uniform(lo, hi))).collect()
}

/// V4.1 weights as a checkpoint holds them: `wkv` dequantized FP8 times a power-of-two
/// scale per 32x32 block, bf16 gate weights.
pub fn v41_weights(rng: &mut TestRng, cfg: &EngramConfig) -> LayerWeights {
    let (g, d, e) = (cfg.hc_mult, cfg.hidden_size, cfg.embed_dim());
    let rows = (g + 1) * d;
    let (br, bc) = (rows.div_ceil(FP8_SCALE_BLOCK), e.div_ceil(FP8_SCALE_BLOCK));
    let scales: Vec<f32> = (0..br * bc)
        .map(|_| 2f32.powi(-(8 + rng.below(4) as i32)))
        .collect();
    let wkv = (0..rows * e)
        .map(|i| {
            e4m3(rng, 300.0) * scales[(i / e / FP8_SCALE_BLOCK) * bc + (i % e) / FP8_SCALE_BLOCK]
        })
        .collect();
    LayerWeights::V41(V41Weights {
        wkv,
        q_weight: bf16_values(rng, g * d, -1.5, 1.5),
        k_weight: bf16_values(rng, g * d, 0.2, 1.5),
    })
}

/// Weights of `cfg`'s variant ([`paper_weights`] or [`v41_weights`]).
pub fn layer_weights(rng: &mut TestRng, cfg: &EngramConfig) -> LayerWeights {
    match cfg.variant {
        Variant::Paper => paper_weights(rng, cfg),
        Variant::V41 => v41_weights(rng, cfg),
    }
}

/// Embeddings as V4.1 table rows look: bf16(e4m3 * 2^s), one scale per 32 columns.
pub fn v41_embeddings(rng: &mut TestRng, n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let s = 2f32.powi(-(6 + rng.below(4) as i32));
        for _ in 0..FP8_SCALE_BLOCK.min(n - out.len()) {
            out.push(round_bf16(e4m3(rng, 400.0) * s));
        }
    }
    out
}

/// A batch: segment lengths and, per segment, a conv state (`None`: a fresh sequence).
#[derive(Clone, Debug)]
pub struct Batch {
    pub lens: Vec<usize>,
    pub states: Vec<Option<ShortConvState>>,
}

impl Batch {
    /// 1 to 4 segments of at most `max_len` tokens, two in three remembering earlier
    /// tokens (a conv state with history).
    pub fn random(rng: &mut TestRng, cfg: &EngramConfig, max_len: usize) -> Self {
        let n = 1 + rng.below(4) as usize;
        let lens = (0..n)
            .map(|_| rng.below(max_len as u64 + 1) as usize)
            .collect();
        let states = (0..n)
            .map(|_| {
                (rng.below(3) > 0).then(|| {
                    let mut s = ShortConvState::new(cfg);
                    let rows = s.history() + rng.below(3) as usize;
                    s.push_rows(&rng.uniform_vec(rows * cfg.branch_channels(), -2.0, 2.0));
                    s
                })
            })
            .collect();
        Self { lens, states }
    }

    pub fn tokens(&self) -> usize {
        self.lens.iter().sum()
    }

    /// The segments over `states` (a copy of this batch's, which a forward updates).
    pub fn segments<'a>(&self, states: &'a mut [Option<ShortConvState>]) -> Vec<Segment<'a>> {
        self.lens
            .iter()
            .zip(states.iter_mut())
            .map(|(&len, s)| Segment {
                len,
                conv: s.as_mut(),
            })
            .collect()
    }
}

/// A forward's output (NaN-poisoned before: an unwritten element fails) and the
/// updated conv states.
#[derive(Clone, Debug)]
pub struct Outputs {
    pub out: Vec<f32>,
    pub states: Vec<Option<ShortConvState>>,
}

/// Runs `layer` on `batch` (its states copied first).
pub fn run(
    layer: &dyn EngramLayer,
    batch: &Batch,
    hidden: &[f32],
    emb: &[f32],
    dead: Option<&[bool]>,
) -> Outputs {
    let mut states = batch.states.clone();
    let mut out = vec![f32::NAN; hidden.len()];
    let mut segs = batch.segments(&mut states);
    layer
        .forward(hidden, emb, dead, &mut segs, &mut out)
        .expect("a well-formed forward succeeds");
    Outputs { out, states }
}

/// [`run`] through `forward_projected`, from what `project` gave for the rows (`kv`,
/// which it may overwrite); the error as it came.
pub fn run_projected(
    layer: &dyn EngramLayer,
    batch: &Batch,
    hidden: &[f32],
    kv: &mut [f32],
    dead: Option<&[bool]>,
) -> Result<Outputs> {
    let mut states = batch.states.clone();
    let mut out = vec![f32::NAN; hidden.len()];
    let mut segs = batch.segments(&mut states);
    layer.forward_projected(hidden, kv, dead, &mut segs, &mut out)?;
    Ok(Outputs { out, states })
}

/// Whether two outputs are equal bit for bit.
pub fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

/// The worst relative error over the conv states (a missing or extra state is infinite).
pub fn state_rel_err(got: &[Option<ShortConvState>], want: &[Option<ShortConvState>]) -> f64 {
    got.iter()
        .zip(want)
        .map(|(a, b)| match (a, b) {
            (Some(a), Some(b)) => relative_error(a.rows(), b.rows()),
            (None, None) => 0.0,
            _ => f64::INFINITY,
        })
        .fold(0.0, worse)
}

/// What [`check_layer`] saw.
#[derive(Clone, Debug, Default)]
pub struct LayerReport {
    pub cases: usize,
    pub paper_worst_rel: f64,
    pub paper_state_worst_rel: f64,
    /// V4.1 elements that differ from the reference, and all V4.1 elements checked.
    pub v41_off: usize,
    pub v41_elements: usize,
    /// Cases of `project` + `forward_projected` against `forward` (0: the layer does not
    /// project ahead, nothing to check).
    pub projected_cases: usize,
}

impl std::fmt::Display for LayerReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} cases; paper: worst rel err {:.2e} (conv states {:.2e}); V4.1: {} of {} \
             elements off the reference; projected ahead: {}",
            self.cases,
            self.paper_worst_rel,
            self.paper_state_worst_rel,
            self.v41_off,
            self.v41_elements,
            match self.projected_cases {
                0 => "not offered (skipped)".to_string(),
                n => format!("{n} cases equal to forward"),
            }
        )
    }
}

/// Panics unless V4.1 output `got` is within `tol` of the reference's `want`; returns how
/// many elements differ at all.
pub fn assert_v41_close(got: &[f32], want: &[f32], tol: Tolerance, what: &str) -> usize {
    let (off, max_ulp) = bf16_distance_over(got, want, 0);
    let (beyond, _) = bf16_distance_over(got, want, 1);
    let n = want.len() as f64;
    assert!(
        max_ulp <= tol.v41_max_ulp
            && beyond as f64 <= tol.v41_beyond_one_ulp * n
            && off as f64 <= tol.v41_off * n,
        "{what}: {off} of {} elements off, {beyond} by more than 1 ulp, max {max_ulp} ulp \
         (tolerance {tol:?})",
        want.len()
    );
    off
}

/// One random paper case against the reference; returns (output, state) rel errors.
fn paper_case(
    make: &LayerFactory,
    tol: Tolerance,
    seed: u64,
    max_len: usize,
    dims: Option<Dims>,
) -> (f64, f64) {
    let mut rng = TestRng::new(seed);
    let dims = dims.unwrap_or_else(|| random_dims(&mut rng, Variant::Paper));
    let cfg = config(Variant::Paper, &dims);
    let weights = paper_weights(&mut rng, &cfg);
    let reference = ReferenceLayer::new(cfg.clone(), 3, weights.clone()).unwrap();
    let layer = make(cfg.clone(), 3, weights).expect("the backend builds the layer");
    let batch = Batch::random(&mut rng, &cfg, max_len);
    let t = batch.tokens();
    let hidden = rng.uniform_vec(t * cfg.branch_channels(), -2.0, 2.0);
    let emb = rng.uniform_vec(t * cfg.embed_dim(), -1.0, 1.0);
    let want = run(&reference, &batch, &hidden, &emb, None);
    let got = run(layer.as_ref(), &batch, &hidden, &emb, None);
    let out_err = relative_error(&got.out, &want.out);
    let state_err = state_rel_err(&got.states, &want.states);
    assert!(
        out_err <= tol.paper_rel,
        "paper seed {seed} {dims:?}: output rel err {out_err:e}"
    );
    assert!(
        state_err <= tol.paper_rel,
        "paper seed {seed} {dims:?}: conv state rel err {state_err:e}"
    );
    (out_err, state_err)
}

/// One random V4.1 case (dead tokens in two of three); returns (elements off, total).
fn v41_case(
    make: &LayerFactory,
    tol: Tolerance,
    seed: u64,
    max_len: usize,
    dims: Option<Dims>,
) -> (usize, usize) {
    let mut rng = TestRng::new(seed);
    let dims = dims.unwrap_or_else(|| random_dims(&mut rng, Variant::V41));
    let mut cfg = config(Variant::V41, &dims);
    if seed % 2 == 1 {
        cfg.rms_norm_eps = 1e-6;
    }
    let weights = v41_weights(&mut rng, &cfg);
    let reference = ReferenceLayer::new(cfg.clone(), 1, weights.clone()).unwrap();
    let layer = make(cfg.clone(), 1, weights).expect("the backend builds the layer");
    let mut batch = Batch::random(&mut rng, &cfg, max_len);
    batch.states.iter_mut().for_each(|s| *s = None);
    let t = batch.tokens();
    let hidden = bf16_values(&mut rng, t * cfg.branch_channels(), -3.0, 3.0);
    let emb = v41_embeddings(&mut rng, t * cfg.embed_dim());
    let dead: Vec<bool> = (0..t).map(|_| rng.below(7) == 0).collect();
    let dead = (!seed.is_multiple_of(3)).then_some(&dead[..]);
    let want = run(&reference, &batch, &hidden, &emb, dead);
    let got = run(layer.as_ref(), &batch, &hidden, &emb, dead);
    let off = assert_v41_close(
        &got.out,
        &want.out,
        tol,
        &format!("V4.1 seed {seed} {dims:?}"),
    );
    if let Some(dead) = dead {
        let c = cfg.branch_channels();
        for (i, _) in dead.iter().enumerate().filter(|(_, &d)| d) {
            assert_eq!(
                got.out[i * c..(i + 1) * c],
                hidden[i * c..(i + 1) * c],
                "V4.1 seed {seed}: dead token {i} must pass through"
            );
        }
    }
    (off, got.out.len())
}

/// Feeding a paper sequence in chunks with its conv state equals feeding it whole.
fn chunked_equals_whole(make: &LayerFactory, tol: Tolerance) {
    let mut rng = TestRng::new(7);
    let dims = Dims {
        hc_mult: 4,
        hidden: 32,
        max_ngram: 3,
        heads: 2,
        head_dim: 16,
        kernel: 4,
    };
    let cfg = config(Variant::Paper, &dims);
    let layer = make(cfg.clone(), 1, paper_weights(&mut rng, &cfg)).unwrap();
    let (c, e, n) = (cfg.branch_channels(), cfg.embed_dim(), 23);
    let hidden = rng.uniform_vec(n * c, -2.0, 2.0);
    let emb = rng.uniform_vec(n * e, -1.0, 1.0);
    let mut whole = vec![f32::NAN; n * c];
    layer
        .forward(&hidden, &emb, None, &mut [Segment::fresh(n)], &mut whole)
        .unwrap();
    let mut state = ShortConvState::new(&cfg);
    let mut chunked = vec![f32::NAN; n * c];
    let mut t = 0;
    for len in [1, 5, 1, 1, 9, 6] {
        let r = t..t + len;
        layer
            .forward(
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
    assert!(err <= tol.paper_rel, "chunked vs whole: rel err {err:e}");
}

/// A layer that projects its rows ahead (`project`) gives, through `forward_projected`,
/// exactly what `forward` gives on the same rows: outputs and conv states bit for bit, at
/// decode and prefill sizes, both variants; a projection of the wrong size is an error.
/// Returns the cases checked (0 when the layer does not project ahead).
fn projected_equals_forward(make: &LayerFactory) -> usize {
    let mut rng = TestRng::new(21);
    let mut cases = 0;
    for variant in [Variant::Paper, Variant::V41] {
        let dims = random_dims(&mut rng, variant);
        let cfg = config(variant, &dims);
        let layer = make(cfg.clone(), 3, layer_weights(&mut rng, &cfg)).unwrap();
        let (c, e) = (cfg.branch_channels(), cfg.embed_dim());
        for max_len in [1, 6, 40] {
            let batch = Batch::random(&mut rng, &cfg, max_len);
            let t = batch.tokens();
            let hidden = rng.uniform_vec(t * c, -2.0, 2.0);
            let emb = match variant {
                Variant::Paper => rng.uniform_vec(t * e, -1.0, 1.0),
                Variant::V41 => v41_embeddings(&mut rng, t * e),
            };
            let dead: Option<Vec<bool>> =
                (variant == Variant::V41).then(|| (0..t).map(|i| i % 3 == 1).collect());
            let Some(mut kv) = layer.project(&emb).unwrap() else {
                return 0;
            };
            let want = run(layer.as_ref(), &batch, &hidden, &emb, dead.as_deref());
            let got = run_projected(layer.as_ref(), &batch, &hidden, &mut kv, dead.as_deref())
                .expect("a well-formed forward_projected succeeds");
            assert!(
                same_bits(&got.out, &want.out),
                "{variant:?} {dims:?}, {t} tokens: forward_projected differs from forward"
            );
            assert_eq!(
                got.states, want.states,
                "{variant:?} {dims:?}, {t} tokens: conv states differ"
            );
            let mut short = layer.project(&emb).unwrap().unwrap();
            if short.pop().is_some() {
                let e = run_projected(layer.as_ref(), &batch, &hidden, &mut short, dead.as_deref());
                assert!(e.is_err(), "{variant:?}: a short projection was accepted");
            }
            cases += 1;
        }
    }
    cases
}

/// An empty batch is fine and leaves a state alone; wrongly sized buffers, masks,
/// states and weights are errors, never panics.
fn errors_not_panics(make: &LayerFactory) {
    let mut rng = TestRng::new(11);
    for variant in [Variant::Paper, Variant::V41] {
        let dims = random_dims(&mut rng, variant);
        let cfg = config(variant, &dims);
        let weights = layer_weights(&mut rng, &cfg);
        let layer = make(cfg.clone(), 1, weights.clone()).unwrap();
        let mut state = ShortConvState::new(&cfg);
        let before = state.clone();
        layer
            .forward(
                &[],
                &[],
                None,
                &mut [Segment::with_state(0, &mut state)],
                &mut [],
            )
            .unwrap();
        assert_eq!(
            state, before,
            "{variant:?}: an empty segment changed its state"
        );

        let (c, e, n) = (cfg.branch_channels(), cfg.embed_dim(), 3);
        let (h, em) = (vec![0.5f32; n * c], vec![0.5f32; n * e]);
        let mut o = vec![0f32; n * c];
        let dead = vec![false; n];
        let seg = || vec![Segment::fresh(n)];
        assert!(layer.forward(&h, &em, None, &mut seg(), &mut o).is_ok());
        for (what, r) in [
            (
                "short hidden",
                layer.forward(&h[1..], &em, None, &mut seg(), &mut o),
            ),
            (
                "short embeddings",
                layer.forward(&h, &em[1..], None, &mut seg(), &mut o),
            ),
            (
                "short output",
                layer.forward(&h, &em, None, &mut seg(), &mut o[1..]),
            ),
            (
                "short mask",
                layer.forward(&h, &em, Some(&dead[1..]), &mut seg(), &mut o),
            ),
            (
                "segments past the tokens",
                layer.forward(&h, &em, None, &mut [Segment::fresh(n + 1)], &mut o),
            ),
        ] {
            assert!(r.is_err(), "{variant:?}: {what} was accepted");
        }
        let mut bad_state = ShortConvState::with_size(c + 1, cfg.conv_history() + 1);
        let r = layer.forward(
            &h,
            &em,
            None,
            &mut [Segment::with_state(n, &mut bad_state)],
            &mut o,
        );
        assert!(
            r.is_err(),
            "{variant:?}: a conv state of the wrong size was accepted"
        );

        // Construction: an unknown layer, weights of the wrong size or variant.
        assert!(
            make(cfg.clone(), 2, weights.clone()).is_err(),
            "{variant:?}: layer 2"
        );
        let (short, other) = match weights {
            LayerWeights::Paper(mut w) => {
                w.norm2[0].pop();
                let d = Dims {
                    hidden: 32,
                    head_dim: 32,
                    ..dims
                };
                (
                    LayerWeights::Paper(w),
                    v41_weights(&mut rng, &config(Variant::V41, &d)),
                )
            }
            LayerWeights::V41(mut w) => {
                w.wkv.pop();
                let d = Dims { kernel: 2, ..dims };
                (
                    LayerWeights::V41(w),
                    paper_weights(&mut rng, &config(Variant::Paper, &d)),
                )
            }
        };
        assert!(
            make(cfg.clone(), 1, short).is_err(),
            "{variant:?}: short weights"
        );
        assert!(
            make(cfg, 1, other).is_err(),
            "{variant:?}: the other variant's weights"
        );
    }
}

/// The whole suite for a backend's layers: 40 random cases of each variant, a large
/// batch of each (the parallel paths), the paper demo's row layout, chunked decode
/// against the whole sequence, and errors for every malformed call.
pub fn check_layer(make: &LayerFactory, tol: Tolerance) -> LayerReport {
    let mut r = LayerReport::default();
    for seed in 0..40 {
        let (o, s) = paper_case(make, tol, seed, 12, None);
        r.paper_worst_rel = worse(r.paper_worst_rel, o);
        r.paper_state_worst_rel = worse(r.paper_state_worst_rel, s);
        let (off, n) = v41_case(make, tol, seed, 10, None);
        r.v41_off += off;
        r.v41_elements += n;
        r.cases += 2;
    }
    let large = Dims {
        hc_mult: 4,
        hidden: 64,
        max_ngram: 3,
        heads: 4,
        head_dim: 48,
        kernel: 4,
    };
    let demo = Dims {
        hidden: 128,
        heads: 8,
        head_dim: 64,
        ..large
    };
    for (seed, max_len, dims) in [(1000, 120, large), (77, 6, demo)] {
        let (o, s) = paper_case(make, tol, seed, max_len, Some(dims));
        r.paper_worst_rel = worse(r.paper_worst_rel, o);
        r.paper_state_worst_rel = worse(r.paper_state_worst_rel, s);
        r.cases += 1;
    }
    let v41_large = Dims {
        max_ngram: 4,
        heads: 2,
        head_dim: 64,
        kernel: 0,
        ..large
    };
    let (off, n) = v41_case(make, tol, 2000, 100, Some(v41_large));
    r.v41_off += off;
    r.v41_elements += n;
    r.cases += 1;
    chunked_equals_whole(make, tol);
    errors_not_panics(make);
    r.projected_cases = projected_equals_forward(make);
    r
}

/// A table's stored bytes, for a store under test to be built from.
#[derive(Clone, Debug)]
pub struct RawTable {
    pub dtype: RowDtype,
    pub rows: u64,
    pub width: usize,
    /// `[rows, width]` in the stored format, little-endian.
    pub values: Vec<u8>,
    /// FP8 only: `[rows, width.div_ceil(FP8_SCALE_BLOCK)]` E8M0 scales.
    pub scales: Option<Vec<u8>>,
}

impl RawTable {
    /// Random finite rows (FP8: random codes but NaN, scales around 1).
    pub fn random(rng: &mut TestRng, dtype: RowDtype, rows: u64, width: usize) -> Self {
        let n = rows as usize * width;
        let values: Vec<u8> = match dtype {
            RowDtype::F32 => (0..n).flat_map(|_| rng.unit().to_le_bytes()).collect(),
            RowDtype::BF16 => (0..n)
                .flat_map(|_| bf16::from_f32(rng.unit()).to_le_bytes())
                .collect(),
            RowDtype::F16 => (0..n)
                .flat_map(|_| f16::from_f32(rng.unit() * 100.0).to_le_bytes())
                .collect(),
            RowDtype::F8E4M3Scaled => (0..n).map(|_| rng.f8_byte()).collect(),
        };
        let scales = (dtype == RowDtype::F8E4M3Scaled).then(|| {
            (0..rows as usize * dtype.scale_row_bytes(width))
                .map(|_| 118 + rng.below(16) as u8)
                .collect()
        });
        Self {
            dtype,
            rows,
            width,
            values,
            scales,
        }
    }

    /// The table as a safetensors file (tensor `table`, FP8 scales `table.scale`) and the
    /// spec that finds it there: what a file-backed store opens.
    pub fn to_safetensors(&self) -> (Vec<u8>, crate::checkpoint::TableSpec) {
        use safetensors::tensor::TensorView;
        use safetensors::Dtype;
        let dtype = match self.dtype {
            RowDtype::F32 => Dtype::F32,
            RowDtype::BF16 => Dtype::BF16,
            RowDtype::F16 => Dtype::F16,
            RowDtype::F8E4M3Scaled => Dtype::F8_E4M3,
        };
        let rows = self.rows as usize;
        let mut views = vec![(
            "table".to_string(),
            TensorView::new(dtype, vec![rows, self.width], &self.values).unwrap(),
        )];
        if let Some(s) = &self.scales {
            views.push((
                "table.scale".to_string(),
                TensorView::new(
                    Dtype::F8_E8M0,
                    vec![rows, self.dtype.scale_row_bytes(self.width)],
                    s,
                )
                .unwrap(),
            ));
        }
        let bytes = safetensors::serialize(views, None).unwrap();
        let spec = crate::checkpoint::TableSpec {
            layer_id: 1,
            tensor: "table".into(),
            scale_tensor: self.scales.as_ref().map(|_| "table.scale".into()),
            dtype: self.dtype,
            rows: self.rows,
            width: self.width,
        };
        (bytes, spec)
    }

    /// Row `r` as the model sees it, decoded by the core's conversions.
    pub fn decoded_row(&self, r: u64) -> Vec<f32> {
        let (w, at) = (self.width, r as usize * self.width);
        let v = &self.values;
        match self.dtype {
            RowDtype::F32 => (0..w)
                .map(|c| f32::from_le_bytes(v[4 * (at + c)..4 * (at + c) + 4].try_into().unwrap()))
                .collect(),
            RowDtype::BF16 => (0..w)
                .map(|c| bf16::from_le_bytes([v[2 * (at + c)], v[2 * (at + c) + 1]]).to_f32())
                .collect(),
            RowDtype::F16 => (0..w)
                .map(|c| f16::from_le_bytes([v[2 * (at + c)], v[2 * (at + c) + 1]]).to_f32())
                .collect(),
            RowDtype::F8E4M3Scaled => {
                let s = self.scales.as_ref().expect("FP8 rows have scales");
                let sw = self.dtype.scale_row_bytes(w);
                (0..w)
                    .map(|c| {
                        round_bf16(
                            f8e4m3_to_f32(v[at + c])
                                * e8m0_to_f32(s[r as usize * sw + c / FP8_SCALE_BLOCK]),
                        )
                    })
                    .collect()
            }
        }
    }
}

/// A backend's store constructor, from a table's stored bytes.
pub type StoreFactory<'a> = dyn Fn(&RawTable) -> Box<dyn TableStore> + 'a;

/// The suite for a [`TableStore`]: for each of `dtypes`, the store reports the table's
/// shape, gathers rows (repeated ids, the first and last row, one id, none) exactly as
/// the core decodes them, and refuses an id past the table and an output of the wrong
/// size with an error, never a panic.
pub fn check_store(make: &StoreFactory, dtypes: &[RowDtype]) {
    let mut rng = TestRng::new(5);
    for &dtype in dtypes {
        for (rows, width) in [(1u64, 32usize), (97, 64), (300, 256)] {
            let raw = RawTable::random(&mut rng, dtype, rows, width);
            let store = make(&raw);
            let what = format!("{dtype} {rows}x{width} `{}`", store.name());
            assert_eq!(store.num_rows(), rows, "{what}: rows");
            assert_eq!(store.width(), width, "{what}: width");
            assert_eq!(store.dtype(), dtype, "{what}: dtype");
            let mut ids: Vec<u64> = (0..200).map(|_| rng.below(rows)).collect();
            ids.extend([0, rows - 1, 0]);
            for ids in [&ids[..], &ids[..1], &[]] {
                let mut out = vec![f32::NAN; ids.len() * width];
                store.gather_f32(ids, &mut out).unwrap();
                for (k, &r) in ids.iter().enumerate() {
                    let want = raw.decoded_row(r);
                    let got = &out[k * width..(k + 1) * width];
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{what}: row {r} (position {k}) differs from the core's decoding"
                    );
                }
            }
            let mut out = vec![0f32; width];
            let e = store.gather_f32(&[rows], &mut out);
            assert!(e.is_err(), "{what}: id {rows} past the table was accepted");
            let mut short = vec![0f32; width - 1];
            assert!(
                store.gather_f32(&[0], &mut short).is_err(),
                "{what}: an output of the wrong size was accepted"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::DenseTable;

    /// The reference against itself: vacuous for the values, not for decode against
    /// prefill, dead tokens and the errors.
    #[test]
    fn the_reference_layer_passes_the_suite() {
        let make = |cfg, id, w| -> Result<Box<dyn EngramLayer>> {
            Ok(Box::new(ReferenceLayer::new(cfg, id, w)?))
        };
        let r = check_layer(&make, Tolerance::CPU);
        assert_eq!(r.paper_worst_rel, 0.0);
        assert_eq!(r.v41_off, 0);
    }

    #[test]
    fn the_dense_table_passes_the_store_suite() {
        let make = |raw: &RawTable| -> Box<dyn TableStore> {
            let data = (0..raw.rows).flat_map(|r| raw.decoded_row(r)).collect();
            Box::new(DenseTable::new("dense", raw.width, data).unwrap())
        };
        check_store(&make, &[RowDtype::F32]);
    }

    /// The suite can fail: a layer that is off by a little, a store that returns the
    /// wrong row.
    #[test]
    #[should_panic(expected = "output rel err")]
    fn a_layer_off_by_a_little_fails_the_suite() {
        struct Off(ReferenceLayer);
        impl EngramLayer for Off {
            fn config(&self) -> &EngramConfig {
                self.0.config()
            }
            fn layer_id(&self) -> usize {
                self.0.layer_id()
            }
            fn forward(
                &self,
                hidden: &[f32],
                emb: &[f32],
                dead: Option<&[bool]>,
                segments: &mut [Segment<'_>],
                out: &mut [f32],
            ) -> Result<()> {
                self.0.forward(hidden, emb, dead, segments, out)?;
                if let Some(x) = out.first_mut() {
                    *x *= 1.001;
                }
                Ok(())
            }
        }
        let make = |cfg, id, w| -> Result<Box<dyn EngramLayer>> {
            Ok(Box::new(Off(ReferenceLayer::new(cfg, id, w)?)))
        };
        check_layer(&make, Tolerance::CPU);
    }

    #[test]
    #[should_panic(expected = "differs from the core's decoding")]
    fn a_store_returning_the_wrong_row_fails_the_suite() {
        let make = |raw: &RawTable| -> Box<dyn TableStore> {
            // Rows shifted by one.
            let data = (0..raw.rows)
                .flat_map(|r| raw.decoded_row((r + 1) % raw.rows))
                .collect();
            Box::new(DenseTable::new("shifted", raw.width, data).unwrap())
        };
        check_store(&make, &[RowDtype::F32]);
    }
}
