//! Table sizes: the global-unique prime search and per-head row offsets
//! (docs/algorithm.md section 4).
//!
//! Every head of every layer gets its own prime-sized slice of the layer's table. The
//! search is global across layers (in config order), so a layer's primes depend on the
//! layers listed before it.

use std::collections::HashSet;

use crate::config::HashConfig;

/// One Engram layer's table: a prime number of rows per head, heads order-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerTableLayout {
    pub layer_id: usize,
    /// Rows of each head: (2-gram heads 0..K-1, 3-gram heads 0..K-1, ...).
    pub primes: Vec<u64>,
    /// First row of each head in the layer's table (prefix sums of `primes`).
    pub offsets: Vec<u64>,
    /// Rows of the whole table (sum of `primes`).
    pub total_rows: u64,
}

/// Smallest prime strictly greater than `start` that is not in `seen`.
pub fn next_unseen_prime(start: u64, seen: &HashSet<u64>) -> u64 {
    let mut candidate = start + 1;
    while !primal_check::miller_rabin(candidate) || seen.contains(&candidate) {
        candidate += 1;
    }
    candidate
}

/// The table layout of every Engram layer of `cfg`, in `cfg.layer_ids` order.
pub fn table_layouts(cfg: &HashConfig) -> Vec<LayerTableLayout> {
    let mut seen = HashSet::new();
    cfg.layer_ids
        .iter()
        .map(|&layer_id| {
            let mut primes = Vec::with_capacity(cfg.heads_per_layer());
            for &vocab in &cfg.engram_vocab_size {
                let mut start = vocab - 1;
                for _ in 0..cfg.n_head_per_ngram {
                    let p = next_unseen_prime(start, &seen);
                    seen.insert(p);
                    primes.push(p);
                    start = p;
                }
            }
            let offsets: Vec<u64> = primes
                .iter()
                .scan(0u64, |acc, &p| {
                    let start = *acc;
                    *acc += p;
                    Some(start)
                })
                .collect();
            LayerTableLayout {
                layer_id,
                total_rows: primes.iter().sum(),
                primes,
                offsets,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_primes_already_taken() {
        let mut seen = HashSet::new();
        assert_eq!(next_unseen_prime(10, &seen), 11);
        seen.insert(11);
        assert_eq!(next_unseen_prime(10, &seen), 13);
        assert_eq!(next_unseen_prime(1, &seen), 2);
    }

    /// The figures docs/algorithm.md (section 4) states: DeepSeek-V4.1's 48 heads take
    /// the 48 consecutive primes from 16,000,057 up, and the demo's layer 1 has
    /// 10,344,164 rows.
    #[test]
    fn v41_and_demo_layouts() {
        // The flat keys of DeepSeek-V4.1's config.json.
        let v41 = crate::config::EngramConfig::from_hf_config(&serde_json::json!({
            "engram_layer_ids": [1, 14], "engram_max_ngram_size": 4,
            "engram_vocab_size": 16_000_000, "engram_n_heads": 8, "engram_head_dim": 256,
            "engram_pad_token_id": 2, "hidden_size": 5120, "hc_mult": 4
        }))
        .unwrap()
        .unwrap()
        .hash;
        let layouts = table_layouts(&v41);
        let primes: Vec<u64> = layouts.iter().flat_map(|l| l.primes.clone()).collect();
        let consecutive: Vec<u64> = (16_000_000..)
            .filter(|&n| primal_check::miller_rabin(n))
            .take(48)
            .collect();
        assert_eq!(primes, consecutive);
        assert_eq!(primes[0], 16_000_057);
        let rows: Vec<u64> = layouts.iter().map(|l| l.total_rows).collect();
        assert_eq!(rows, [384_006_168, 384_016_682]);
        assert_eq!(layouts[0].offsets[1], 16_000_057);

        let demo = HashConfig {
            engram_vocab_size: vec![646_400; 2],
            max_ngram_size: 3,
            layer_ids: vec![1, 15],
            ..v41
        };
        assert_eq!(table_layouts(&demo)[0].total_rows, 10_344_164);
    }
}
