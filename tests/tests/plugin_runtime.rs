//! The plugin runtime driven like a host engine: random batches, sequences joining and
//! ending, prefill chunks and decode steps, through candle tensors. Every output equals
//! the whole-sequence reference forward; state stays bounded; errors stay errors, misuse
//! included.

use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use engram_core::backend::{EngramLayer, Segment};
use engram_core::compress::VocabCompression;
use engram_core::config::Variant;
use engram_core::hashing::NgramHasher;
use engram_core::metrics::{relative_error as rel_err, worse};
use engram_core::reference::ReferenceLayer;
use engram_core::table::{DenseTable, TableStore};
use engram_core::testing::{random_hidden, TestRng};
use engram_plugin::{
    EngramRuntime, FetchError, Padding, PluginError, RuntimeLayer, RuntimeOptions, SequenceInput,
};
use engram_tests::{fixture, Fixture};

fn runtime(fx: &Fixture, options: RuntimeOptions) -> EngramRuntime {
    runtime_over(fx, options, |t| Arc::new(t.clone()))
}

/// A runtime whose tables are `wrap`ped copies of the fixture's.
fn runtime_over(
    fx: &Fixture,
    options: RuntimeOptions,
    wrap: impl Fn(&DenseTable) -> Arc<dyn TableStore>,
) -> EngramRuntime {
    let layers = fx
        .cfg
        .hash
        .layer_ids
        .iter()
        .zip(&fx.tables)
        .zip(&fx.weights)
        .map(|((&layer_id, table), w)| {
            RuntimeLayer::on_host(
                layer_id,
                wrap(table),
                Arc::new(ReferenceLayer::new(fx.cfg.clone(), layer_id, w.clone()).unwrap()),
            )
        })
        .collect();
    // Raw ids are their own compressed ids here; the pad id (0) maps to 0.
    let identity =
        VocabCompression::from_lookup((0..fx.compressed_vocab as u32).collect()).unwrap();
    EngramRuntime::from_parts(fx.cfg.clone(), Arc::new(identity), layers, options).unwrap()
}

struct Sequence {
    id: u64,
    tokens: Vec<u32>,
    dead: Vec<bool>,
    /// Host hidden states per Engram layer, and the expected residual after Engram.
    hidden: Vec<Vec<f32>>,
    expected: Vec<Vec<f32>>,
    fed: usize,
}

fn new_sequence(fx: &Fixture, id: u64, rng: &mut TestRng) -> Sequence {
    let cfg = &fx.cfg;
    let t = 1 + rng.below(30) as usize;
    let tokens: Vec<u32> = (0..t)
        .map(|_| rng.below(fx.compressed_vocab as u64) as u32)
        .collect();
    let dead: Vec<bool> = (0..t)
        .map(|_| cfg.variant == Variant::V41 && rng.below(6) == 0)
        .collect();
    let ids: Vec<i64> = tokens.iter().map(|&x| x as i64).collect();
    let (c, e, heads) = (
        cfg.branch_channels(),
        cfg.embed_dim(),
        cfg.heads_per_layer(),
    );
    let mut hidden = Vec::new();
    let mut expected = Vec::new();
    for (l, (&layer_id, w)) in cfg.hash.layer_ids.iter().zip(&fx.weights).enumerate() {
        let h = random_hidden(cfg, t, rng);
        let mut rows = vec![0u64; t * heads];
        fx.hasher
            .hash_sequence(l, &ids, Some(&dead), true, &mut rows)
            .unwrap();
        let mut emb = vec![0f32; t * e];
        fx.tables[l].gather_f32(&rows, &mut emb).unwrap();
        let layer = ReferenceLayer::new(cfg.clone(), layer_id, w.clone()).unwrap();
        let mut out = vec![0f32; t * c];
        layer
            .forward(&h, &emb, Some(&dead), &mut [Segment::fresh(t)], &mut out)
            .unwrap();
        if cfg.variant.output_is_delta() {
            out.iter_mut().zip(&h).for_each(|(o, x)| *o += x);
        }
        hidden.push(h);
        expected.push(out);
    }
    Sequence {
        id,
        tokens,
        dead,
        hidden,
        expected,
        fed: 0,
    }
}

fn drive_like_a_host(variant: Variant, padding: Padding, prefetch: bool, seed: u64) {
    let fx = fixture(
        variant,
        if variant == Variant::V41 { 2 } else { 3 },
        32,
        seed,
    );
    let rt = runtime(
        &fx,
        RuntimeOptions {
            max_sequences: 64,
            prefetch,
            prefetch_threads: 2,
            padding,
            trace_dir: None,
        },
    );
    let mut rng = TestRng::new(seed * 7 + 1);
    let c = fx.cfg.branch_channels();
    let mut active: Vec<Sequence> = Vec::new();
    let mut next_id = 1000;
    let mut finished = Vec::new();
    let mut worst = 0f64;
    for _ in 0..60 {
        while active.len() < 4 && rng.below(3) != 0 {
            active.push(new_sequence(&fx, next_id, &mut rng));
            next_id += 1;
        }
        if active.is_empty() {
            continue;
        }
        // Each active sequence takes a prefill chunk or a single decode token.
        let chunks: Vec<(usize, usize)> = active
            .iter()
            .map(|s| {
                let left = s.tokens.len() - s.fed;
                let n = if s.fed == 0 || rng.below(3) == 0 {
                    1 + rng.below(left as u64) as usize
                } else {
                    1
                };
                (s.fed, n.min(left))
            })
            .collect();
        let inputs: Vec<SequenceInput<'_>> = active
            .iter()
            .zip(&chunks)
            .map(|(s, &(pos, n))| SequenceInput {
                seq_id: s.id,
                tokens: &s.tokens[pos..pos + n],
                position: pos,
                dead: Some(&s.dead[pos..pos + n]),
                context: None,
            })
            .collect();
        let mut step = rt
            .begin_step(&inputs, &std::mem::take(&mut finished))
            .unwrap();
        let t = chunks.iter().map(|c| c.1).max().unwrap() + rng.below(3) as usize;
        for (l, &layer_id) in fx.cfg.hash.layer_ids.iter().enumerate() {
            // Padded [B, T, C] with garbage in the padding, which must come back unchanged.
            let mut host = rng.vec(active.len() * t * c, 5.0);
            for (b, (s, &(pos, n))) in active.iter().zip(&chunks).enumerate() {
                let at = match padding {
                    Padding::Right => b * t,
                    Padding::Left => b * t + t - n,
                };
                host[at * c..(at + n) * c].copy_from_slice(&s.hidden[l][pos * c..(pos + n) * c]);
            }
            let xs = Tensor::from_vec(host.clone(), (active.len(), t, c), &Device::Cpu).unwrap();
            let ys = step
                .apply(layer_id, &xs)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (b, (s, &(pos, n))) in active.iter().zip(&chunks).enumerate() {
                let at = match padding {
                    Padding::Right => b * t,
                    Padding::Left => b * t + t - n,
                };
                worst = worse(
                    worst,
                    rel_err(
                        &ys[at * c..(at + n) * c],
                        &s.expected[l][pos * c..(pos + n) * c],
                    ),
                );
                let (pad_before, pad_after) = (b * t..at, at + n..(b + 1) * t);
                for r in pad_before.chain(pad_after) {
                    assert_eq!(
                        ys[r * c..(r + 1) * c],
                        host[r * c..(r + 1) * c],
                        "padding row {r} changed"
                    );
                }
            }
        }
        let stats = step.finish();
        assert_eq!(
            stats.tokens as usize,
            chunks.iter().map(|c| c.1).sum::<usize>()
        );
        for (s, (_, n)) in active.iter_mut().zip(&chunks) {
            s.fed += n;
        }
        active.retain(|s| {
            let done = s.fed == s.tokens.len();
            if done {
                finished.push(s.id);
            }
            !done
        });
    }
    assert!(worst <= 1e-6, "{variant:?}: worst rel err {worst:e}");
    let totals = rt.stats();
    assert!(totals.steps > 0 && totals.rows_fetched > 0 && totals.bytes_fetched > 0);
}

#[test]
fn host_driven_paper_right_padding_prefetch() {
    for seed in 0..4 {
        drive_like_a_host(Variant::Paper, Padding::Right, true, seed);
    }
}

#[test]
fn host_driven_paper_left_padding_synchronous() {
    for seed in 4..7 {
        drive_like_a_host(Variant::Paper, Padding::Left, false, seed);
    }
}

#[test]
fn host_driven_v41() {
    for seed in 7..10 {
        drive_like_a_host(Variant::V41, Padding::Right, true, seed);
    }
}

/// 10,000 single-token sequences: with end notifications nothing is left; without,
/// the bound holds and the oldest are evicted.
#[test]
fn ten_thousand_sequences_stay_bounded() {
    let fx = fixture(Variant::Paper, 1, 16, 3);
    let c = fx.cfg.branch_channels();
    for notify in [true, false] {
        let rt = runtime(
            &fx,
            RuntimeOptions {
                max_sequences: 256,
                prefetch: true,
                padding: Padding::Right,
                trace_dir: None,
                ..RuntimeOptions::default()
            },
        );
        let mut previous: Vec<u64> = Vec::new();
        let mut max_live = 0;
        for batch in 0..1000u64 {
            let ids: Vec<u64> = (0..10).map(|i| batch * 10 + i).collect();
            let tokens: Vec<[u32; 2]> = ids.iter().map(|&i| [(i % 500) as u32, 7]).collect();
            let inputs: Vec<SequenceInput<'_>> = ids
                .iter()
                .zip(&tokens)
                .map(|(&seq_id, t)| SequenceInput {
                    seq_id,
                    tokens: t,
                    position: 0,
                    dead: None,
                    context: None,
                })
                .collect();
            let ended = if notify {
                std::mem::take(&mut previous)
            } else {
                Vec::new()
            };
            let mut step = rt.begin_step(&inputs, &ended).unwrap();
            for &layer_id in &fx.cfg.hash.layer_ids {
                step.apply_packed(layer_id, &vec![0.5; 20 * c]).unwrap();
            }
            step.finish();
            previous = ids;
            max_live = max_live.max(rt.live_sequences());
        }
        rt.end_sequences(&previous);
        if notify {
            assert_eq!(
                max_live,
                10 * 2 - 10,
                "only the last step's sequences are live"
            );
            assert_eq!(rt.live_sequences(), 0);
            assert_eq!(rt.stats().evicted_sequences, 0);
        } else {
            assert_eq!(max_live, 256);
            assert!(rt.stats().evicted_sequences >= 10_000 - 256 - 10);
        }
    }
}

/// A table whose gathers always fail (an error, or a panic), to check that fetch
/// failures reach the host as errors.
struct FailingTable {
    inner: DenseTable,
    panics: bool,
}

impl TableStore for FailingTable {
    fn name(&self) -> &str {
        "failing"
    }
    fn num_rows(&self) -> u64 {
        self.inner.num_rows()
    }
    fn width(&self) -> usize {
        self.inner.width()
    }
    fn dtype(&self) -> engram_core::dtype::RowDtype {
        self.inner.dtype()
    }
    fn gather_f32(&self, _: &[u64], _: &mut [f32]) -> engram_core::Result<()> {
        if self.panics {
            panic!("bug in a table store")
        }
        Err(engram_core::EngramError::Other("disk on fire".into()))
    }
}

fn failing(panics: bool) -> impl Fn(&DenseTable) -> Arc<dyn TableStore> {
    move |t| {
        Arc::new(FailingTable {
            inner: t.clone(),
            panics,
        })
    }
}

#[test]
fn errors_reach_the_host() {
    let fx = fixture(Variant::Paper, 1, 16, 5);
    let c = fx.cfg.branch_channels();
    let rt = runtime(&fx, RuntimeOptions::default());
    let input = |seq_id, tokens: &'static [u32], position| SequenceInput {
        seq_id,
        tokens,
        position,
        dead: None,
        context: None,
    };

    // A token the tokenizer does not have: that sequence's input, with the core's error.
    let e = rt.begin_step(&[input(1, &[1, 999], 0)], &[]).err().unwrap();
    assert!(
        matches!(e, PluginError::Sequence { seq_id: 1, .. }),
        "{e:?}"
    );
    assert!(!e.is_device_unavailable());
    let e = e.to_string();
    assert!(e.contains("999") && e.contains("sequence 1"), "{e}");
    let e = rt.begin_step(&[input(2, &[1], 5)], &[]).err().unwrap();
    assert!(
        matches!(
            e,
            PluginError::MissingState {
                seq_id: 2,
                position: 5,
                ..
            }
        ),
        "{e}"
    );
    let e = rt
        .begin_step(&[input(3, &[1], 0), input(3, &[2], 0)], &[])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("twice"), "{e}");

    let mut step = rt.begin_step(&[input(4, &[1, 2, 3], 0)], &[]).unwrap();
    let e = step
        .apply(
            1,
            &Tensor::zeros((1, 3, c + 1), candle_core::DType::F32, &Device::Cpu).unwrap(),
        )
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("shape"), "{e}");
    let e = step
        .apply(
            2,
            &Tensor::zeros((1, 3, c), candle_core::DType::F32, &Device::Cpu).unwrap(),
        )
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("layer 2"), "{e}");
    step.apply_packed(1, &vec![0.0; 3 * c]).unwrap();
    let e = step
        .apply_packed(1, &vec![0.0; 3 * c])
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("twice"), "{e}");
    drop(step);
    // The failed and dropped steps left the sequence usable at its next position.
    let mut step = rt.begin_step(&[input(4, &[4], 3)], &[]).unwrap();
    step.apply_packed(1, &vec![0.0; c]).unwrap();
    step.finish();

    let broken = runtime_over(&fx, RuntimeOptions::default(), failing(false));
    let mut step = broken.begin_step(&[input(1, &[1, 2], 0)], &[]).unwrap();
    let e = step.apply_packed(1, &vec![0.0; 2 * c]).err().unwrap();
    // The store's own error crosses from the fetch thread as a value.
    assert!(
        matches!(
            &e,
            PluginError::Fetch {
                layer_id: 1,
                source: FetchError::Table(_)
            }
        ),
        "{e:?}"
    );
    let e = e.to_string();
    assert!(e.contains("disk on fire") && e.contains("layer 1"), "{e}");
}

/// A table whose every gather takes [`SlowTable::DELAY`] longer.
struct SlowTable(DenseTable);

impl SlowTable {
    const DELAY: Duration = Duration::from_millis(20);
}

impl TableStore for SlowTable {
    fn name(&self) -> &str {
        "slow"
    }
    fn num_rows(&self) -> u64 {
        self.0.num_rows()
    }
    fn width(&self) -> usize {
        self.0.width()
    }
    fn dtype(&self) -> engram_core::dtype::RowDtype {
        self.0.dtype()
    }
    fn gather_f32(&self, rows: &[u64], out: &mut [f32]) -> engram_core::Result<()> {
        std::thread::sleep(Self::DELAY);
        self.0.gather_f32(rows, out)
    }
}

/// `host_time` is the host's time inside the step's calls and nothing else: with rows
/// fetched inside `apply` from a store that takes 20 ms a gather, each layer's apply (the
/// tensor one and the packed one) counts at least those 20 ms; the host's own 50 ms
/// between calls is not counted; the totals carry it.
#[test]
fn host_time_counts_the_step_calls_and_nothing_between() {
    let fx = fixture(Variant::Paper, 1, 16, 5);
    let c = fx.cfg.branch_channels();
    let options = RuntimeOptions {
        prefetch: false,
        ..RuntimeOptions::default()
    };
    let rt = runtime_over(&fx, options, |t| Arc::new(SlowTable(t.clone())));
    let pause = Duration::from_millis(50);
    let tokens = [1u32, 2, 3];
    let input = SequenceInput::new(1, &tokens, 0);
    let (first, second) = (fx.cfg.hash.layer_ids[0], fx.cfg.hash.layer_ids[1]);
    let started = Instant::now();
    let mut step = rt.begin_step(&[input], &[]).unwrap();
    std::thread::sleep(pause);
    let hidden = Tensor::zeros((1, 3, c), candle_core::DType::F32, &Device::Cpu).unwrap();
    step.apply(first, &hidden).unwrap();
    std::thread::sleep(pause);
    step.apply_packed(second, &vec![0.0; 3 * c]).unwrap();
    std::thread::sleep(pause);
    let stats = step.finish();
    let wall = started.elapsed();
    assert!(
        stats.host_time >= 2 * SlowTable::DELAY,
        "host time {:?}: less than the two gathers inside apply",
        stats.host_time
    );
    assert!(
        stats.host_time <= wall - 3 * pause,
        "host time {:?} counts the host's pauses (step's wall time {wall:?})",
        stats.host_time
    );
    assert_eq!(rt.stats().host_time, stats.host_time);
}

/// A store that panics: the host gets an error, not a hang.
#[test]
fn a_panicking_store_is_an_error() {
    let fx = fixture(Variant::Paper, 1, 16, 6);
    let c = fx.cfg.branch_channels();
    let rt = runtime_over(&fx, RuntimeOptions::default(), failing(true));
    for _ in 0..2 {
        let tokens = [1u32, 2];
        let input = SequenceInput {
            seq_id: 9,
            tokens: &tokens,
            position: 0,
            dead: None,
            context: None,
        };
        let mut step = rt.begin_step(&[input], &[]).unwrap();
        let e = step.apply_packed(1, &vec![0.0; 2 * c]).err().unwrap();
        assert!(
            matches!(
                &e,
                PluginError::Fetch {
                    layer_id: 1,
                    source: FetchError::Panicked { .. }
                }
            ),
            "{e:?}"
        );
        let e = e.to_string();
        assert!(e.contains("panicked") && e.contains("layer 1"), "{e}");
    }
}

/// A host that calls the runtime wrongly at random (ids past the vocabulary, positions
/// that skip or repeat, masks and contexts of the wrong length, sequences ended while
/// they feed, steps left open or dropped, layers unknown or applied twice, tensors of
/// the wrong shape or dtype) gets errors, never a panic; and the runtime still serves a
/// well-formed step afterwards.
#[test]
fn random_misuse_is_errors_not_panics() {
    use candle_core::DType;
    for (variant, prefetch, seed) in [
        (Variant::Paper, true, 1),
        (Variant::Paper, false, 2),
        (Variant::V41, true, 3),
    ] {
        let fx = fixture(variant, 2, 32, seed);
        let c = fx.cfg.branch_channels();
        let rt = runtime(
            &fx,
            RuntimeOptions {
                max_sequences: 4,
                prefetch,
                ..RuntimeOptions::default()
            },
        );
        let mut rng = TestRng::new(seed * 31);
        let vocab = fx.compressed_vocab as u64;
        let mut panics = Vec::new();
        let mut fed = [0usize; 6];
        let (mut begun, mut applied) = (0, 0);
        let rounds = 2000;
        for round in 0..rounds {
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let count = rng.below(4) as usize;
                let seqs: Vec<u64> = (0..count).map(|_| rng.below(6)).collect();
                let tokens: Vec<Vec<u32>> = seqs
                    .iter()
                    .map(|_| {
                        let n = rng.below(5) as usize;
                        (0..n).map(|_| rng.below(vocab + 2) as u32).collect()
                    })
                    .collect();
                let dead: Vec<Vec<bool>> = tokens
                    .iter()
                    .map(|t| {
                        let n = t.len() + rng.below(3) as usize;
                        (0..n.saturating_sub(1))
                            .map(|_| rng.below(3) == 0)
                            .collect()
                    })
                    .collect();
                let context: Vec<u32> =
                    (0..rng.below(5)).map(|_| rng.below(vocab) as u32).collect();
                let inputs: Vec<SequenceInput<'_>> = seqs
                    .iter()
                    .enumerate()
                    .map(|(i, &seq_id)| SequenceInput {
                        seq_id,
                        tokens: &tokens[i],
                        position: match rng.below(3) {
                            0 => 0,
                            1 => fed[seq_id as usize],
                            _ => rng.below(12) as usize,
                        },
                        dead: (rng.below(3) == 0).then_some(&dead[i][..]),
                        context: (rng.below(3) == 0).then_some(&context[..]),
                    })
                    .collect();
                let ended: Vec<u64> = (0..rng.below(3)).map(|_| rng.below(6)).collect();
                let Ok(mut step) = rt.begin_step(&inputs, &ended) else {
                    return;
                };
                begun += 1;
                for (i, s) in inputs.iter().enumerate() {
                    fed[s.seq_id as usize] = s.position + tokens[i].len();
                }
                let t = tokens.iter().map(Vec::len).max().unwrap_or(0);
                for _ in 0..rng.below(4) {
                    let layer = [1, 4, 1, 4, 2][rng.below(5) as usize];
                    let r = match rng.below(3) {
                        0 => {
                            let total: usize = tokens.iter().map(Vec::len).sum();
                            let len = (total * c + [0, 1, c][rng.below(3) as usize])
                                .saturating_sub([0, 1][rng.below(2) as usize]);
                            step.apply_packed(layer, &vec![0.25; len]).map(|_| ())
                        }
                        _ => {
                            let b = count + [0, 0, 1][rng.below(3) as usize];
                            let dims: Vec<usize> = match rng.below(4) {
                                0 => vec![b, t, fx.cfg.hc_mult, fx.cfg.hidden_size],
                                1 => vec![b, t + 1, c],
                                2 => vec![b * t, c],
                                _ => vec![b, t, c],
                            };
                            let dtype = [DType::F32, DType::BF16, DType::F16, DType::U8]
                                [rng.below(4) as usize];
                            let x = Tensor::zeros(dims, dtype, &Device::Cpu).unwrap();
                            step.apply(layer, &x).map(|_| ())
                        }
                    };
                    applied += r.is_ok() as usize;
                }
                match rng.below(3) {
                    0 => drop(step),
                    1 => {
                        step.finish();
                    }
                    _ => {
                        // A second step while this one is open.
                        let _ = rt.begin_step(&inputs, &[]);
                        step.finish();
                    }
                }
                if rng.below(10) == 0 {
                    rt.end_sequences(&[rng.below(6)]);
                }
            }));
            if outcome.is_err() {
                panics.push(round);
            }
        }
        // Not vacuous: many of the random steps began, and some layers were applied.
        assert!(
            begun > rounds / 10 && applied > rounds / 20,
            "{begun} {applied}"
        );
        assert!(
            panics.is_empty(),
            "{variant:?}: panicked in rounds {panics:?}"
        );
        // Still serving: a fresh sequence through every layer.
        let tokens = [1u32, 2, 3];
        let input = SequenceInput::new(100, &tokens, 0);
        let mut step = rt.begin_step(&[input], &[]).unwrap();
        for &layer in &fx.cfg.hash.layer_ids {
            step.apply_packed(layer, &vec![0.5; 3 * c]).unwrap();
        }
        step.finish();
    }
}
