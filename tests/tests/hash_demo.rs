//! `engram hash` against the original implementation's hashes for the demo config
//! (`data/hash_demo_default.json`), and the V4.1 hashing against a known vector
//! (docs/algorithm.md section 11).

use engram_cli::text::hash_json;
use engram_core::config::HashConfig;
use engram_core::hashing::{EngramHasher, NgramHasher};
use engram_tests::{data_path, tokenizer};
use serde_json::Value;

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(data_path("hash_demo_default.json")).unwrap())
        .unwrap()
}

fn demo_config(g: &Value) -> HashConfig {
    let path = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(path.path(), g["config"].to_string()).unwrap();
    HashConfig::from_json_file(path.path()).unwrap()
}

#[test]
fn demo_texts_hash_like_the_original() {
    let g = golden();
    let cfg = demo_config(&g);
    let ctx = tokenizer();
    assert_eq!(
        ctx.compression.compressed_vocab_size() as u64,
        g["compressed_vocab_size"].as_u64().unwrap()
    );
    assert_eq!(
        ctx.compression.lookup_sha256_i64le(),
        g["lookup_table_sha256_int64le"].as_str().unwrap()
    );
    assert_eq!(
        ctx.compression.compress_id(cfg.pad_id, 0).unwrap(),
        g["compressed_pad_id"].as_i64().unwrap()
    );
    let samples = g["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 3);
    for sample in samples {
        let text = sample["text"].as_str().unwrap();
        let out = hash_json(ctx, &cfg, text).unwrap();
        assert_eq!(
            out["input_ids"], sample["input_ids"],
            "input ids of {text:?}"
        );
        assert_eq!(
            out["compressed_ids"], sample["compressed_ids"],
            "compressed ids of {text:?}"
        );
        let layers = sample["hashes"].as_object().unwrap();
        assert_eq!(layers.len(), 2);
        for (layer, expected) in layers {
            assert_eq!(
                &out["layers"][layer], expected,
                "hashes of layer {layer} for {text:?}"
            );
        }
    }
}

#[test]
fn demo_multipliers_and_primes() {
    let g = golden();
    let cfg = demo_config(&g);
    let ctx = tokenizer();
    let hasher = EngramHasher::new(&cfg, ctx.compression.compressed_vocab_size(), 2).unwrap();
    for layer in hasher.layers() {
        let id = layer.layer_id.to_string();
        let mult: Vec<i64> = serde_json::from_value(g["multipliers"][&id].clone()).unwrap();
        assert_eq!(layer.multipliers, mult, "multipliers of layer {id}");
        let primes: Vec<Vec<u64>> = serde_json::from_value(g["primes"][&id].clone()).unwrap();
        assert_eq!(layer.layout.primes, primes.concat(), "primes of layer {id}");
    }
}

/// Row ids reported from a run of DeepSeek's `engram.py` on raw ids [0, 3], layer 1,
/// offsets added (where they come from: docs/algorithm.md section 11).
#[test]
fn v41_known_vector() {
    let cfg = HashConfig {
        engram_vocab_size: vec![16_000_000; 3],
        max_ngram_size: 4,
        n_head_per_ngram: 8,
        layer_ids: vec![1, 14],
        pad_id: 2,
        seed: 0,
        compressed_vocab_size: Some(99_092),
    };
    let ctx = tokenizer();
    let pad = ctx.compression.compress_id(2, 0).unwrap();
    let hasher = EngramHasher::new(&cfg, ctx.compression.compressed_vocab_size(), pad).unwrap();
    assert_eq!(hasher.layers()[0].layout.total_rows, 384_006_168);
    assert_eq!(hasher.layers()[1].layout.total_rows, 384_016_682);
    assert_eq!(hasher.layers()[0].layout.primes[0], 16_000_057);
    let ids = ctx.compression.compress(&[0, 3]).unwrap();
    let mut rows = vec![0u64; 2 * 24];
    hasher
        .hash_sequence(0, &ids, None, true, &mut rows)
        .unwrap();
    assert_eq!(
        rows[..8],
        [5702652, 24393184, 39183301, 61503783, 78984481, 90144770, 103724983, 121476532]
    );
    assert_eq!(rows[24..27], [13136173, 17031479, 36294826]);
}
