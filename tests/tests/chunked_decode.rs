//! Feeding sequences in random chunks, mixed in batches with other sequences at other
//! positions, gives the outputs of the whole-sequence forward (both variants).

use engram_core::backend::{EngramLayer, Segment};
use engram_core::config::Variant;
use engram_core::hashing::NgramHasher;
use engram_core::metrics::{relative_error as rel_err, worse};
use engram_core::reference::ReferenceLayer;
use engram_core::sequence::{hash_step, layer_segments, SequenceState, StepTokens};
use engram_core::table::TableStore;
use engram_core::testing::{random_hidden, TestRng};
use engram_tests::{fixture, Fixture};

/// Runs `sequences` whole, then chunked and interleaved, through `layers`; returns the worst relative error.
fn chunked_vs_whole(fx: &Fixture, layers: &[Box<dyn EngramLayer>], seed: u64) -> f64 {
    let mut rng = TestRng::new(seed);
    let cfg = &fx.cfg;
    let (c, e, heads) = (
        cfg.branch_channels(),
        cfg.embed_dim(),
        cfg.heads_per_layer(),
    );
    let n_seq = 1 + rng.below(4) as usize;
    let seqs: Vec<(Vec<i64>, Vec<bool>)> = (0..n_seq)
        .map(|_| {
            let t = 1 + rng.below(40) as usize;
            let ids = (0..t)
                .map(|_| rng.below(fx.compressed_vocab as u64) as i64)
                .collect();
            let dead = (0..t)
                .map(|_| cfg.variant == Variant::V41 && rng.below(8) == 0)
                .collect();
            (ids, dead)
        })
        .collect();
    // Hidden states per (sequence, layer), fixed so both runs see the same inputs.
    let hidden: Vec<Vec<Vec<f32>>> = seqs
        .iter()
        .map(|(ids, _)| {
            layers
                .iter()
                .map(|_| random_hidden(cfg, ids.len(), &mut rng))
                .collect()
        })
        .collect();

    let whole: Vec<Vec<Vec<f32>>> = seqs
        .iter()
        .enumerate()
        .map(|(s, (ids, dead))| {
            layers
                .iter()
                .enumerate()
                .map(|(l, layer)| {
                    let t = ids.len();
                    let mut rows = vec![0u64; t * heads];
                    fx.hasher
                        .hash_sequence(l, ids, Some(dead), true, &mut rows)
                        .unwrap();
                    let mut emb = vec![0f32; t * e];
                    fx.tables[l].gather_f32(&rows, &mut emb).unwrap();
                    let mut out = vec![0f32; t * c];
                    layer
                        .forward(
                            &hidden[s][l],
                            &emb,
                            Some(dead),
                            &mut [Segment::fresh(t)],
                            &mut out,
                        )
                        .unwrap();
                    out
                })
                .collect()
        })
        .collect();

    let mut states: Vec<SequenceState> = seqs.iter().map(|_| SequenceState::new(cfg)).collect();
    let mut worst = 0f64;
    loop {
        // A step takes the next chunk of a random subset of unfinished sequences.
        let mut picked = Vec::new();
        for (s, (ids, _)) in seqs.iter().enumerate() {
            let pos = states[s].position;
            if pos < ids.len() && (picked.is_empty() || rng.below(2) == 0) {
                let len = if rng.below(2) == 0 {
                    1
                } else {
                    1 + rng.below((ids.len() - pos) as u64) as usize
                };
                picked.push((s, pos, len.min(ids.len() - pos)));
            }
        }
        if picked.is_empty() {
            break;
        }
        let batch: Vec<StepTokens<'_>> = picked
            .iter()
            .map(|&(s, pos, len)| StepTokens {
                ids: &seqs[s].0[pos..pos + len],
                dead: Some(&seqs[s].1[pos..pos + len]),
            })
            .collect();
        let mut refs: Vec<&mut SequenceState> = Vec::new();
        // Collect disjoint &mut to the picked states, in batch order.
        let mut rest: Vec<Option<&mut SequenceState>> = states.iter_mut().map(Some).collect();
        for &(s, _, _) in &picked {
            refs.push(rest[s].take().unwrap());
        }
        let step = hash_step(&fx.hasher, &mut refs, &batch).unwrap();
        for (l, layer) in layers.iter().enumerate() {
            let tokens = step.tokens();
            let mut h = Vec::with_capacity(tokens * c);
            for &(s, pos, len) in &picked {
                h.extend_from_slice(&hidden[s][l][pos * c..(pos + len) * c]);
            }
            let mut emb = vec![0f32; tokens * e];
            fx.tables[l].gather_f32(&step.rows[l], &mut emb).unwrap();
            let mut out = vec![0f32; tokens * c];
            let mut segments = layer_segments(&mut refs, &step.lens, l);
            layer
                .forward(&h, &emb, step.dead.as_deref(), &mut segments, &mut out)
                .unwrap();
            let mut at = 0;
            for &(s, pos, len) in &picked {
                let expected = &whole[s][l][pos * c..(pos + len) * c];
                worst = worse(worst, rel_err(&out[at * c..(at + len) * c], expected));
                at += len;
            }
        }
    }
    worst
}

/// Builds one layer per Engram layer of the fixture.
type LayerBuilder =
    fn(&Fixture, usize, &engram_core::checkpoint::LayerWeights) -> Box<dyn EngramLayer>;

fn check_backend(build: LayerBuilder) {
    for seed in 0..12 {
        for (variant, g, d) in [
            (Variant::Paper, 1, 16),
            (Variant::Paper, 4, 24),
            (Variant::V41, 2, 32),
        ] {
            let fx = fixture(variant, g, d, seed);
            let layers: Vec<_> = fx
                .cfg
                .hash
                .layer_ids
                .iter()
                .zip(&fx.weights)
                .map(|(&id, w)| build(&fx, id, w))
                .collect();
            let err = chunked_vs_whole(&fx, &layers, seed + 100);
            assert!(err <= 1e-6, "{variant:?} seed {seed}: rel err {err:e}");
        }
    }
}

#[test]
fn reference_chunked_equals_whole() {
    check_backend(|fx, id, w| {
        Box::new(ReferenceLayer::new(fx.cfg.clone(), id, w.clone()).unwrap())
    });
}

#[test]
fn cpu_chunked_equals_whole() {
    check_backend(|fx, id, w| {
        Box::new(engram_cpu::layer::CpuLayer::new(fx.cfg.clone(), id, w.clone()).unwrap())
    });
}
