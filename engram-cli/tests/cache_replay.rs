//! `engram cache-replay`: the row ids of real text replayed through the hot-row cache.
//! Every lookup is a hit or a miss; a cache that holds every row seen misses each row
//! exactly once (the count of distinct rows, computed independently here from
//! `engram hash`); bad arguments are refused with a clear error.

mod common;

use std::collections::HashSet;

use common::{engram, fake_model};
use engram_cli::cache_replay::{cache_replay, ReplayArgs};
use engram_cli::init_checkpoint::{init_checkpoint, InitArgs};

const TEXT: &str = "The quick brown fox jumps over the lazy dog. The quick brown fox \
jumps over the lazy dog again, and the dog does not mind the fox at all.";

#[test]
fn replay_counts_every_lookup_and_a_big_cache_misses_each_row_once() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fake_model(tmp.path());
    let out = tmp.path().join("with-engram");
    // Tables of about 2 x 2 x 1000 rows of 32 bytes: 100% of one (128 KB) holds over
    // 1000 rows in the cache, far more than the text's.
    let mut init = InitArgs::new(&model, &out);
    init.layers = vec![1, 3];
    init.heads = 2;
    init.n_embed_per_ngram = 32;
    init.vocab = 1000;
    init_checkpoint(&init).unwrap();
    let texts = tmp.path().join("texts");
    std::fs::create_dir(&texts).unwrap();
    std::fs::write(texts.join("a.txt"), TEXT).unwrap();
    std::fs::write(texts.join("b.txt"), TEXT).unwrap();

    let args = ReplayArgs {
        model: out.clone(),
        text: vec![texts.clone()],
        percent: vec![1.0, 100.0],
        step_tokens: 8,
        json: false,
    };
    let report = cache_replay(&args).unwrap();
    assert_eq!(report.files, 2);

    // The rows each layer looks up, from `engram hash` (offsets added: global row ids).
    let (code, stdout, stderr) = engram(&[
        "hash",
        "--tokenizer",
        out.join("tokenizer.json").to_str().unwrap(),
        "--config",
        out.join("config.json").to_str().unwrap(),
        "--text",
        TEXT,
    ]);
    assert_eq!(code, 0, "{stderr}");
    let hashed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let tokens = hashed["input_ids"].as_array().unwrap().len() as u64;
    assert_eq!(report.tokens, 2 * tokens);
    for layer in &report.layers {
        let per_position = hashed["layers"][layer.layer_id.to_string()]
            .as_array()
            .unwrap();
        let heads = per_position[0].as_array().unwrap().len() as u64;
        // `engram hash` prints rows within each head; the same (head, row) pairs are
        // the distinct global rows.
        let distinct: HashSet<(usize, u64)> = per_position
            .iter()
            .flat_map(|p| {
                p.as_array()
                    .unwrap()
                    .iter()
                    .enumerate()
                    .map(|(h, r)| (h, r.as_u64().unwrap()))
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(layer.lookups, 2 * tokens * heads);
        assert_eq!(layer.distinct_rows, distinct.len() as u64);
        for size in &layer.sizes {
            assert_eq!(size.cache_hits + size.cache_misses, layer.lookups);
            assert!(size.cache_bytes <= size.cache_bound_bytes);
        }
        // 100% of the table holds every row this text touches: each misses once.
        let all = &layer.sizes[1];
        assert_eq!(
            all.cache_misses, layer.distinct_rows,
            "layer {}",
            layer.layer_id
        );
        // 1% of a table of a few thousand rows holds a few dozen: fewer hits.
        assert!(layer.sizes[0].cache_hits < all.cache_hits);
    }

    assert!(report.to_text().contains("| layer | cache, % of table"));

    // The command prints JSON with --json (the default sizes: 1, 5 and 20%).
    let (code, stdout, _) = engram(&[
        "cache-replay",
        "--json",
        "--model",
        out.to_str().unwrap(),
        texts.join("a.txt").to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["layers"][0]["sizes"].as_array().unwrap().len(), 3);

    // Bad input: a missing file, a size outside (0, 100].
    let missing = tmp.path().join("no-such.txt");
    let (code, _, stderr) = engram(&[
        "cache-replay",
        "--model",
        out.to_str().unwrap(),
        missing.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("no-such.txt"), "{stderr}");
    let (code, _, stderr) = engram(&[
        "cache-replay",
        "--model",
        out.to_str().unwrap(),
        "--percent",
        "0",
        texts.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(stderr.contains("--percent"), "{stderr}");
}
