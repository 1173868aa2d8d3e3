//! # engram-tests
//!
//! Integration and snapshot tests of the whole workspace. The golden vectors live in
//! `data/`: outputs of the original PyTorch implementation, and one V4.1 file written from
//! the formulas (see `data/GOLDEN.md`); this library holds what the tests share: paths to
//! that data and small readers for it.

use std::path::PathBuf;

/// `tests/data/<name>` inside this repository.
pub fn data_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join(name)
}

/// The DeepSeek-V4 tokenizer used by every golden file.
pub fn tokenizer_path() -> PathBuf {
    data_path("deepseek-v4-tokenizer/tokenizer.json")
}

/// The test tokenizer and its compression, loaded once per test binary.
pub fn tokenizer() -> &'static engram_cli::TokenizerContext {
    static CTX: std::sync::OnceLock<engram_cli::TokenizerContext> = std::sync::OnceLock::new();
    CTX.get_or_init(|| {
        engram_cli::TokenizerContext::load(&tokenizer_path()).expect("test tokenizer loads")
    })
}

use engram_core::checkpoint::LayerWeights;
use engram_core::config::{EngramConfig, HashConfig, Variant};
use engram_core::hashing::EngramHasher;
use engram_core::table::DenseTable;
use engram_core::testing::{random_table_f32, random_weights, TestRng};

/// A small random Engram model: config, hasher, one table and weights per layer.
pub struct Fixture {
    pub cfg: EngramConfig,
    pub hasher: EngramHasher,
    pub tables: Vec<DenseTable>,
    pub weights: Vec<LayerWeights>,
    pub compressed_vocab: usize,
}

/// A random fixture of `variant`; `hc_mult` and `hidden` pick the branch shape.
pub fn fixture(variant: Variant, hc_mult: usize, hidden: usize, seed: u64) -> Fixture {
    let mut rng = TestRng::new(seed);
    let max_n = 2 + rng.below(3) as usize;
    let heads = 1 + rng.below(3) as usize;
    let hash = HashConfig {
        engram_vocab_size: (0..max_n - 1).map(|_| 50 + rng.below(200)).collect(),
        max_ngram_size: max_n,
        n_head_per_ngram: heads,
        layer_ids: vec![1, 4],
        pad_id: 0,
        seed: rng.below(100),
        compressed_vocab_size: None,
    };
    let cfg = EngramConfig {
        variant,
        hash,
        head_dim: if variant == Variant::V41 {
            32
        } else {
            8 + rng.below(24) as usize
        },
        kernel_size: if variant == Variant::V41 {
            0
        } else {
            1 + rng.below(4) as usize
        },
        hidden_size: hidden,
        hc_mult,
        rms_norm_eps: 1e-20,
    };
    cfg.validate().unwrap();
    let compressed_vocab = 500;
    let hasher = EngramHasher::new(&cfg.hash, compressed_vocab, 0).unwrap();
    let layouts = engram_core::primes::table_layouts(&cfg.hash);
    let tables = layouts
        .iter()
        .map(|l| {
            DenseTable::new(
                format!("layer{}", l.layer_id),
                cfg.head_dim,
                random_table_f32(&cfg, l.total_rows as usize, &mut rng),
            )
            .unwrap()
        })
        .collect();
    let weights = layouts
        .iter()
        .map(|_| random_weights(&cfg, &mut rng))
        .collect();
    Fixture {
        cfg,
        hasher,
        tables,
        weights,
        compressed_vocab,
    }
}
