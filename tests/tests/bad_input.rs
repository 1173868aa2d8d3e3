//! Bad configs, tokenizer paths, weights files and ids: each is a clear error that names
//! the problem, never a panic.

use std::collections::HashMap;
use std::path::Path;

use engram_cli::golden::{run_golden, GoldenBackend};
use engram_cli::TokenizerContext;
use engram_core::config::{EngramConfig, HashConfig};
use engram_core::hashing::{EngramHasher, NgramHasher};
use engram_tests::{data_path, tokenizer};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::json;

/// A config edit and the field its error must name.
type ConfigCase = (&'static str, Box<dyn Fn(&mut serde_json::Value)>);

fn write_json(dir: &Path, name: &str, value: &serde_json::Value) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, value.to_string()).unwrap();
    path
}

/// `msg` with `tests/data` written as `[data]`, so a snapshot holds the same text wherever
/// the repository is.
fn redact_data(msg: &str) -> String {
    msg.replace(&data_path("").display().to_string(), "[data]/")
}

/// [`redact_data`], and the test's temporary directory `tmp` written as `[tmp]`.
fn redact(msg: &str, tmp: &Path) -> String {
    redact_data(&msg.replace(&tmp.display().to_string(), "[tmp]"))
}

fn demo_meta() -> serde_json::Value {
    json!({"engram": {"engram_vocab_size": [2003, 3001], "max_ngram_size": 3, "n_embed_per_ngram": 64,
        "n_head_per_ngram": 4, "layer_ids": [1, 3], "pad_id": 2, "seed": 0, "kernel_size": 4},
        "backbone": {"hidden_size": 96, "hc_mult": 4}})
}

#[test]
fn bad_configs_name_the_field_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<ConfigCase> = vec![
        (
            "max_ngram_size",
            Box::new(|v| v["engram"]["max_ngram_size"] = json!(1)),
        ),
        (
            "engram_vocab_size",
            Box::new(|v| v["engram"]["engram_vocab_size"] = json!([2003])),
        ),
        (
            "engram_vocab_size",
            Box::new(|v| v["engram"]["engram_vocab_size"] = json!("many")),
        ),
        (
            "n_head_per_ngram",
            Box::new(|v| v["engram"]["n_head_per_ngram"] = json!(0)),
        ),
        (
            "n_embed_per_ngram",
            Box::new(|v| v["engram"]["n_embed_per_ngram"] = json!(63)),
        ),
        (
            "layer_ids",
            Box::new(|v| v["engram"]["layer_ids"] = json!([])),
        ),
        ("pad_id", Box::new(|v| v["engram"]["pad_id"] = json!(-4))),
        (
            "kernel_size",
            Box::new(|v| v["engram"]["kernel_size"] = json!(0)),
        ),
        (
            "hidden_size",
            Box::new(|v| v["backbone"].as_object_mut().unwrap().clear()),
        ),
        (
            "hc_mult",
            Box::new(|v| v["backbone"]["hc_mult"] = json!(-1)),
        ),
    ];
    let mut messages = String::new();
    for (i, (field, mutate)) in cases.iter().enumerate() {
        let mut v = demo_meta();
        mutate(&mut v);
        let path = write_json(dir.path(), &format!("bad{i}.json"), &v);
        let msg = EngramConfig::from_json_file(&path).unwrap_err().to_string();
        assert!(msg.contains(field), "case {i}: {msg}");
        assert!(msg.contains(&path.display().to_string()), "case {i}: {msg}");
        messages += &format!("{}\n", redact(&msg, dir.path()));
    }
    let path = dir.path().join("not-json.json");
    std::fs::write(&path, "{ nope").unwrap();
    let msg = HashConfig::from_json_file(&path).unwrap_err().to_string();
    assert!(
        msg.contains("not-json.json") && msg.contains("JSON"),
        "{msg}"
    );
    messages += &format!("{}\n", redact(&msg, dir.path()));
    let msg = HashConfig::from_json_file(dir.path().join("absent.json"))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("absent.json"), "{msg}");
    messages += &format!("{}\n", redact(&msg, dir.path()));
    insta::assert_snapshot!(messages);
}

#[test]
fn bad_tokenizer_paths_are_named() {
    let absent = TokenizerContext::load(Path::new("/no/such/tokenizer.json"))
        .err()
        .unwrap()
        .to_string();
    assert!(absent.contains("/no/such/tokenizer.json"), "{absent}");
    let not_a_tokenizer = TokenizerContext::load(&data_path("multipliers.json"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        not_a_tokenizer.contains("multipliers.json"),
        "{not_a_tokenizer}"
    );
    insta::assert_snapshot!(format!("{absent}\n{}", redact_data(&not_a_tokenizer)));
}

#[test]
fn ids_out_of_range_are_named() {
    let ctx = tokenizer();
    let token = ctx
        .compression
        .compress(&[5, 129_280])
        .unwrap_err()
        .to_string();
    assert!(
        token.contains("129280") && token.contains("position 1"),
        "{token}"
    );
    let cfg = EngramConfig::from_golden_meta(&demo_meta()).unwrap().hash;
    let hasher = EngramHasher::new(&cfg, 99_092, 2).unwrap();
    let mut out = vec![0u64; 3 * hasher.heads()];
    let compressed = hasher
        .hash_sequence(0, &[1, 99_092, 3], None, false, &mut out)
        .unwrap_err()
        .to_string();
    assert!(
        compressed.contains("99092") && compressed.contains("position 1"),
        "{compressed}"
    );
    let short = hasher
        .hash_sequence(0, &[1, 2], None, false, &mut out)
        .unwrap_err()
        .to_string();
    assert!(short.contains("hash output"), "{short}");
    insta::assert_snapshot!(format!("{token}\n{compressed}\n{short}"));
}

/// Rewrites the demo golden file with one tensor replaced (or removed).
fn golden_with(
    dir: &Path,
    name: &str,
    replace: Option<(Dtype, Vec<usize>, Vec<u8>)>,
) -> std::path::PathBuf {
    let bytes = std::fs::read(data_path("forward_demo_small.safetensors")).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| n != name)
        .collect();
    if let Some((dtype, shape, data)) = &replace {
        tensors.push((
            name.to_string(),
            TensorView::new(*dtype, shape.clone(), data).unwrap(),
        ));
    }
    let out = dir.join("broken.safetensors");
    let metadata: Option<HashMap<String, String>> = meta.metadata().clone();
    safetensors::serialize_to_file(tensors, metadata, &out).unwrap();
    out
}

#[test]
fn bad_weights_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = tokenizer();
    let value = "layers.1.engram.value_proj.weight";
    let cases = [
        (
            value,
            Some((Dtype::F32, vec![96, 127], vec![0u8; 96 * 127 * 4])),
            "shape",
        ),
        (
            value,
            Some((Dtype::I32, vec![96, 128], vec![0u8; 96 * 128 * 4])),
            "dtype",
        ),
        (value, None, "missing"),
        (
            "layers.3.engram.multi_head_embedding.embedding.weight",
            Some((Dtype::F32, vec![100, 16], vec![0u8; 6400])),
            "shape",
        ),
        (
            "layers.3.engram.short_conv.conv.weight",
            Some((Dtype::F32, vec![384, 1, 3], vec![0u8; 384 * 3 * 4])),
            "shape",
        ),
    ];
    let mut messages = String::new();
    for (name, replace, problem) in cases {
        let path = golden_with(dir.path(), name, replace);
        let msg = format!(
            "{:#}",
            run_golden(ctx, &path, GoldenBackend::Reference, None)
                .err()
                .unwrap()
        );
        assert!(msg.contains(name) && msg.contains(problem), "{name}: {msg}");
        assert!(msg.contains("broken.safetensors"), "{msg}");
        messages += &format!("{}\n", redact(&msg, dir.path()));
    }
    insta::assert_snapshot!(messages);
}

#[test]
fn truncated_weights_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(data_path("forward_demo_small.safetensors")).unwrap();
    let mut messages = String::new();
    for cut in [4, 100, bytes.len() / 2, bytes.len() - 1] {
        let path = dir.path().join(format!("cut{cut}.safetensors"));
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let msg = format!(
            "{:#}",
            run_golden(tokenizer(), &path, GoldenBackend::Reference, None)
                .err()
                .unwrap()
        );
        assert!(msg.contains(&format!("cut{cut}.safetensors")), "{msg}");
        messages += &format!("{}\n", redact(&msg, dir.path()));
    }
    insta::assert_snapshot!(messages);
}
