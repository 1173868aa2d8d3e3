//! The `engram` binary's output format and exit codes, as other tools see them.

use std::process::Command;

const TOKENIZER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/data/deepseek-v4-tokenizer/tokenizer.json"
);
const DEMO: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/data/forward_demo_small.safetensors"
);

fn engram(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_engram"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn vocab_prints_one_json_object() {
    let out = engram(&["vocab", "--tokenizer", TOKENIZER]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["vocab_size"], 129_280);
    assert_eq!(v["compressed_vocab_size"], 99_092);
    assert_eq!(
        v["lookup_sha256_i64le"],
        "26b9be2936d236a124ba318a998c417bc7032e3e92a3107fe98deee49f1dc496"
    );
}

#[test]
fn hash_prints_ids_and_rows() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg.json");
    std::fs::write(&cfg, r#"{"engram_vocab_size": [646400, 646400], "max_ngram_size": 3, "n_head_per_ngram": 8, "layer_ids": [1, 15], "pad_id": 2, "seed": 0}"#).unwrap();
    let out = engram(&[
        "hash",
        "--tokenizer",
        TOKENIZER,
        "--config",
        cfg.to_str().unwrap(),
        "--text",
        "Only Alexander",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["input_ids"], serde_json::json!([22898, 19737]));
    assert_eq!(v["compressed_ids"], serde_json::json!([1134, 15695]));
    // The first position of the demo's layer 1 (data/hash_demo_default.json).
    assert_eq!(v["layers"]["1"][0][0], 417228);
    assert_eq!(v["layers"]["15"].as_array().unwrap().len(), 2);
}

#[test]
fn golden_exit_codes() {
    let out = engram(&["golden", "--tokenizer", TOKENIZER, DEMO]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("PASS"));
    let out = engram(&["golden", "--tokenizer", "/nonexistent/tokenizer.json", DEMO]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/tokenizer.json"));
}
