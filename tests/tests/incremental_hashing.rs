//! Hashing a sequence one token at a time (the decode path) gives exactly the rows of
//! hashing the whole sequence at once, for random configs, ids, lengths and dead tokens.

use engram_core::config::HashConfig;
use engram_core::hashing::{EngramHasher, NgramHasher, NgramHistory};
use proptest::prelude::*;

fn config() -> impl Strategy<Value = HashConfig> {
    (
        2usize..=5,
        1usize..=4,
        prop::collection::vec(2u64..5000, 4),
        0u64..1000,
        prop::collection::btree_set(0usize..40, 1..4),
    )
        .prop_map(|(max_n, heads, vocab, seed, layers)| HashConfig {
            engram_vocab_size: vocab[..max_n - 1].to_vec(),
            max_ngram_size: max_n,
            n_head_per_ngram: heads,
            layer_ids: layers.into_iter().collect(),
            pad_id: 0,
            seed,
            compressed_vocab_size: None,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn step_by_step_equals_whole_sequence(
        cfg in config(),
        vocab in 2usize..200_000,
        raw in prop::collection::vec((any::<u32>(), prop::bool::weighted(0.1)), 0..64),
        use_dead in any::<bool>(),
    ) {
        let ids: Vec<i64> = raw.iter().map(|(r, _)| (*r as usize % vocab) as i64).collect();
        let dead: Vec<bool> = raw.iter().map(|(_, d)| *d && use_dead).collect();
        let hasher = EngramHasher::new(&cfg, vocab, (vocab / 2) as i64).unwrap();
        let heads = hasher.heads();
        let layers = hasher.layers().len();
        let t = ids.len();

        let mut whole = vec![vec![0u64; t * heads]; layers];
        for (l, rows) in whole.iter_mut().enumerate() {
            hasher.hash_sequence(l, &ids, Some(&dead), true, rows).unwrap();
        }

        let mut history = NgramHistory::new(cfg.max_ngram_size);
        let mut step = vec![0u64; layers * heads];
        for p in 0..t {
            hasher.hash_step(&mut history, ids[p], dead[p], p, &mut step).unwrap();
            for l in 0..layers {
                prop_assert_eq!(&step[l * heads..(l + 1) * heads], &whole[l][p * heads..(p + 1) * heads],
                    "layer {} position {}", l, p);
            }
        }
    }
}
