//! The `engram` binary's output format and exit codes, as other tools see them.

use std::process::Command;

use serde_json::Value;

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

/// The demo's hashing config (`data/hash_demo_default.json`) as a bare `engram` object.
const DEMO_HASH: &str = r#"{"engram_vocab_size": [646400, 646400], "max_ngram_size": 3, "n_head_per_ngram": 8, "layer_ids": [1, 15], "pad_id": 2, "seed": 0}"#;
/// DeepSeek-V4.1's hashing config: orders 2-4, 8 heads, 16M rows per head, layers 1 and 14.
const V41_HASH: &str = r#"{"engram_vocab_size": [16000000, 16000000, 16000000], "max_ngram_size": 4, "n_head_per_ngram": 8, "layer_ids": [1, 14], "pad_id": 2, "seed": 0}"#;

#[test]
fn hash_prints_ids_and_rows() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("cfg.json");
    std::fs::write(&cfg, DEMO_HASH).unwrap();
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

/// JSON with every array of numbers on one line (so one position's rows are one line) and
/// everything else indented as `to_string_pretty` would.
fn rows_per_line(v: &Value, indent: usize) -> String {
    let (pad, close) = (" ".repeat(indent + 2), " ".repeat(indent));
    let block = |open: char, items: Vec<String>, end: char| {
        format!(
            "{open}\n{pad}{}\n{close}{end}",
            items.join(&format!(",\n{pad}"))
        )
    };
    match v {
        Value::Array(items) if items.iter().any(|i| i.is_array() || i.is_object()) => block(
            '[',
            items.iter().map(|i| rows_per_line(i, indent + 2)).collect(),
            ']',
        ),
        Value::Object(map) if !map.is_empty() => block(
            '{',
            map.iter()
                .map(|(k, i)| {
                    format!(
                        "{}: {}",
                        Value::from(k.as_str()),
                        rows_per_line(i, indent + 2)
                    )
                })
                .collect(),
            '}',
        ),
        _ => v.to_string(),
    }
}

/// `engram hash` of a few fixed texts, for the demo's config and DeepSeek-V4.1's: the
/// token ids, their compressed ids (case, accents and a leading space fold together) and
/// each layer's rows per position. The command prints one line of JSON; the snapshot
/// shows the same JSON with one position per line.
#[test]
fn hash_of_fixed_texts() {
    let dir = tempfile::tempdir().unwrap();
    for (config, json) in [("demo", DEMO_HASH), ("v41", V41_HASH)] {
        std::fs::write(dir.path().join(format!("{config}.json")), json).unwrap();
    }
    let cases = [
        ("demo", "Hello hello HÉLLO!"),
        ("demo", "tabs\tand\nnew  lines"),
        ("demo", "東京 🙂"),
        ("demo", ""),
        ("v41", "Hello hello HÉLLO!"),
    ];
    // All at once: each run spends its time compressing the tokenizer.
    let runs: Vec<_> = cases
        .iter()
        .map(|(config, text)| {
            Command::new(env!("CARGO_BIN_EXE_engram"))
                .args(["hash", "--tokenizer", TOKENIZER, "--config"])
                .arg(dir.path().join(format!("{config}.json")))
                .args(["--text", text])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut report = String::new();
    for ((config, text), run) in cases.iter().zip(runs) {
        let out = run.wait_with_output().unwrap();
        let stdout = String::from_utf8(out.stdout).unwrap();
        assert!(out.status.success(), "{text:?}: {stdout}");
        assert_eq!(stdout.lines().count(), 1, "{stdout}");
        let value: Value = serde_json::from_str(&stdout).unwrap();
        let shown = rows_per_line(&value, 0);
        assert_eq!(serde_json::from_str::<Value>(&shown).unwrap(), value);
        report += &format!("$ engram hash --config {config}.json --text {text:?}\n{shown}\n\n");
    }
    insta::assert_snapshot!(report);
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
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("/nonexistent/tokenizer.json"));
    insta::assert_snapshot!("golden_no_tokenizer", stderr);
}
