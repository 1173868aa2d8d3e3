//! Every hashing path (each lane kernel, the block path, windows, steps) against the
//! formulas written out directly.

use super::block::{BLOCK, STREAM_MIN_ROWS};
use super::*;
use crate::config::HashConfig;
use crate::fastmod::Isa;
use proptest::prelude::*;
fn v41_config(vocab: Vec<u64>, max_ngram_size: usize, heads: usize) -> HashConfig {
    HashConfig {
        engram_vocab_size: vocab,
        max_ngram_size,
        n_head_per_ngram: heads,
        layer_ids: vec![1, 14],
        pad_id: 2,
        seed: 0,
        compressed_vocab_size: None,
    }
}

/// docs/algorithm.md section 5 written out directly: a window per position,
/// `rem_euclid` per head.
fn naive_rows(
    layer: &LayerHasher,
    compressed: &[i64],
    dead: Option<&[bool]>,
    pad: i64,
    with_offsets: bool,
) -> Vec<u64> {
    let n = layer.multipliers.len();
    let k = layer.layout.primes.len() / (n - 1);
    let mut out = Vec::new();
    for t in 0..compressed.len() {
        let mut blocked = false;
        let window: Vec<i64> = (0..n)
            .map(|j| {
                blocked |= j > t || dead.is_some_and(|d| d[t - j]);
                if blocked {
                    pad
                } else {
                    compressed[t - j]
                }
            })
            .collect();
        let mut mix = window[0].wrapping_mul(layer.multipliers[0]);
        for order in 0..n - 1 {
            mix ^= window[order + 1].wrapping_mul(layer.multipliers[order + 1]);
            for h in 0..k {
                let j = order * k + h;
                let row = mix.rem_euclid(layer.layout.primes[j] as i64) as u64;
                out.push(
                    row + if with_offsets {
                        layer.layout.offsets[j]
                    } else {
                        0
                    },
                );
            }
        }
    }
    out
}

fn isas() -> Vec<Option<Isa>> {
    let mut v = vec![None, Some(Isa::Portable)];
    v.extend(
        [Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| i.available())
            .map(Some),
    );
    v
}

/// Every kernel, for sequences with dead tokens, negative pass-through ids and (through
/// `rows_for_window`) ids beyond the vocabulary, against the naive form.
fn check_config(cfg: &HashConfig, vocab: usize, ids: &[i64], dead: &[bool], pad: i64) {
    let base = EngramHasher::new(cfg, vocab, pad).unwrap();
    for isa in isas() {
        let hasher = base.clone().with_isa(isa);
        let heads = hasher.heads();
        for (l, layer) in hasher.layers().iter().enumerate() {
            for with_offsets in [false, true] {
                for mask in [None, Some(dead)] {
                    let expected = naive_rows(layer, ids, mask, pad, with_offsets);
                    let mut out = vec![u64::MAX; ids.len() * heads];
                    hasher
                        .hash_sequence(l, ids, mask, with_offsets, &mut out)
                        .unwrap();
                    assert_eq!(out, expected, "{isa:?}, layer {l}, offsets {with_offsets}");
                }
            }
        }
        // The windows of every position, through a history, hashed at once.
        let n = cfg.max_ngram_size;
        let mut history = NgramHistory::new(n);
        let mut windows = vec![0i64; ids.len() * n];
        for (t, (&id, &d)) in ids.iter().zip(dead).enumerate() {
            history.window(id, d, pad, &mut windows[t * n..(t + 1) * n]);
            history.push(id, d);
        }
        for (l, layer) in hasher.layers().iter().enumerate() {
            for with_offsets in [false, true] {
                let mut out = vec![u64::MAX; ids.len() * heads];
                layer.rows_for_windows(&windows, with_offsets, &mut out);
                let expected = naive_rows(layer, ids, Some(dead), pad, with_offsets);
                assert_eq!(out, expected, "{isa:?} windows, layer {l}");
            }
        }
        let mut history = NgramHistory::new(cfg.max_ngram_size);
        let mut step = vec![0u64; hasher.layers().len() * heads];
        for (t, (&id, &d)) in ids.iter().zip(dead).enumerate() {
            hasher.hash_step(&mut history, id, d, t, &mut step).unwrap();
            for (l, layer) in hasher.layers().iter().enumerate() {
                let expected = naive_rows(layer, &ids[..=t], Some(&dead[..=t]), pad, true);
                assert_eq!(
                    &step[l * heads..(l + 1) * heads],
                    &expected[t * heads..],
                    "{isa:?} step {t}"
                );
            }
        }
    }
}

#[test]
fn every_kernel_matches_the_naive_hash() {
    let cfg = v41_config(vec![16_000_000; 3], 4, 8);
    let mut rng = crate::testing::TestRng::new(3);
    let ids: Vec<i64> = (0..300).map(|_| rng.below(99_092) as i64).collect();
    let dead: Vec<bool> = (0..300).map(|_| rng.below(13) == 0).collect();
    check_config(&cfg, 99_092, &ids, &dead, 2);
}

#[test]
fn long_sequences_written_with_streaming_stores() {
    // Over STREAM_MIN_ROWS rows, with a ragged last block and an unaligned output.
    let cfg = v41_config(vec![16_000_000; 3], 4, 8);
    let base = EngramHasher::new(&cfg, 99_092, 2).unwrap();
    let t = STREAM_MIN_ROWS / 24 + BLOCK + 5;
    let mut rng = crate::testing::TestRng::new(9);
    let ids: Vec<i64> = (0..t).map(|_| rng.below(99_092) as i64).collect();
    let dead: Vec<bool> = (0..t).map(|_| rng.below(1000) == 0).collect();
    let scalar = base.clone().with_isa(None);
    for isa in isas().into_iter().flatten() {
        let hasher = base.clone().with_isa(Some(isa));
        for mask in [None, Some(&dead[..])] {
            let mut expected = vec![0u64; t * 24];
            scalar
                .hash_sequence(1, &ids, mask, true, &mut expected)
                .unwrap();
            let mut buf = vec![u64::MAX; t * 24 + 1];
            hasher
                .hash_sequence(1, &ids, mask, true, &mut buf[1..])
                .unwrap();
            assert!(buf[1..] == expected[..], "{isa:?}");
        }
    }
}

#[test]
fn windows_with_large_or_negative_mixes() {
    // Ids outside the vocabulary wrap the products (rows_for_window does not check).
    let hasher = EngramHasher::new(&v41_config(vec![16_000_000; 3], 4, 8), 99_092, 2).unwrap();
    for isa in isas() {
        let h = hasher.clone().with_isa(isa);
        let layer = &h.layers()[0];
        for window in [
            [i64::MAX, -1, 5, 0],
            [-3, -3, -3, -3],
            [99_091, 99_091, 99_091, 99_091],
            [1 << 40, 1 << 41, 3, 4],
            [0, 0, 0, 0],
        ] {
            let mut out = vec![0u64; layer.heads()];
            layer.rows_for_window(&window, true, &mut out);
            let mut expected = vec![0u64; layer.heads()];
            hasher.clone().with_isa(None).layers()[0].rows_for_window(&window, true, &mut expected);
            let naive: Vec<u64> = {
                let mut mix = window[0].wrapping_mul(layer.multipliers[0]);
                let mut v = Vec::new();
                for o in 0..3 {
                    mix ^= window[o + 1].wrapping_mul(layer.multipliers[o + 1]);
                    for hd in 0..8 {
                        let j = o * 8 + hd;
                        v.push(
                            mix.rem_euclid(layer.layout.primes[j] as i64) as u64
                                + layer.layout.offsets[j],
                        );
                    }
                }
                v
            };
            assert_eq!(out, naive, "{isa:?} {window:?}");
            assert_eq!(expected, naive, "scalar {window:?}");
        }
    }
}

fn config_strategy() -> impl Strategy<Value = (HashConfig, usize)> {
    (
        prop_oneof![
            Just(2u64),
            Just(100),
            Just(8_000),
            Just(9_000),
            Just(16_000_000),
            Just((1 << 32) - 20),
            Just((1 << 40) - 100),
            2u64..1 << 40,
        ],
        2usize..=6,
        1usize..=11,
        prop_oneof![Just(2usize), Just(99_092), 3usize..1 << 20],
    )
        .prop_map(|(v, n, heads, vocab)| (v41_config(vec![v; n - 1], n, heads), vocab))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn optimized_hashing_matches_the_naive_form(
        (cfg, vocab) in config_strategy(),
        seq in proptest::collection::vec((0u64..1 << 20, 0u8..20), 0..40),
        pad_seed in 0u64..1 << 20,
    ) {
        let pad = (pad_seed % vocab as u64) as i64;
        let ids: Vec<i64> = seq.iter().map(|&(id, _)| {
            let id = (id % vocab as u64) as i64;
            // Now and then a negative pass-through id.
            if id % 37 == 5 { -id } else { id }
        }).collect();
        let dead: Vec<bool> = seq.iter().map(|&(_, d)| d == 0).collect();
        check_config(&cfg, vocab, &ids, &dead, pad);
    }
}
