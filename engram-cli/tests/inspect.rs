//! `engram inspect`: the golden checkpoints are consistent; broken copies are reported
//! with the tensor at fault and exit code 1.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

const DEMO: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/data/forward_demo_small.safetensors"
);
const V41: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/data/forward_v41_small.safetensors"
);

/// Runs `engram inspect ARGS`: (exit code, stdout, stderr).
fn inspect(args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["inspect"];
    all.extend_from_slice(args);
    common::engram(&all)
}

type Tensor = (String, Dtype, Vec<usize>, Vec<u8>);

/// The tensors and `__metadata__` of a safetensors file.
fn read(path: &str) -> (Vec<Tensor>, Option<HashMap<String, String>>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let meta = SafeTensors::read_metadata(&bytes)
        .unwrap()
        .1
        .metadata()
        .clone();
    let mut tensors: Vec<Tensor> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    (tensors, meta)
}

fn write(path: &Path, tensors: &[Tensor], meta: Option<HashMap<String, String>>) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, meta, path).unwrap();
}

fn find<'a>(tensors: &'a mut [Tensor], name: &str) -> &'a mut Tensor {
    tensors.iter_mut().find(|t| t.0 == name).unwrap()
}

#[test]
fn golden_checkpoints_are_consistent() {
    let (code, out, err) = inspect(&[DEMO]);
    assert_eq!(code, 0, "{out}{err}");
    for want in [
        "variant     paper",
        "layers      [1, 3]",
        "hidden      96, hc_mult 4",
        "head dim    16",
        "layers.1.engram.multi_head_embedding.embedding.weight: rows 20112, expected 20112",
        "OK       layers.3.engram.short_conv.conv.weight",
        "result: OK",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    assert!(!out.contains("PROBLEM"), "{out}");

    let (code, out, err) = inspect(&[V41]);
    assert_eq!(code, 0, "{out}{err}");
    for want in [
        "variant     v41",
        "layers.1.engram.embed.weight: rows 25874, expected 25874 (sum of 24 primes), F8_E4M3",
        "OK       layers.3.engram.wkv.scale",
        "result: OK",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
}

#[test]
fn json_report() {
    let (code, out, _) = inspect(&[V41, "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["consistent"], true);
    assert_eq!(v["config"]["variant"], "v41");
    assert_eq!(v["layers"][0]["table"]["rows"], 25874);
    assert_eq!(v["layers"][0]["table"]["expected_rows"], 25874);
    assert_eq!(v["layers"][1]["tensors"][0]["status"]["status"], "ok");
}

/// `engram inspect --json` of both bundled checkpoints, whole: what a tool reading the
/// report gets. Run from `tests/data`, so the paths in it are the file names alone.
#[test]
fn json_reports_of_the_golden_checkpoints() {
    for (snapshot, file) in [
        ("inspect_json_demo", "forward_demo_small.safetensors"),
        ("inspect_json_v41", "forward_v41_small.safetensors"),
    ] {
        let (code, out, err) =
            common::engram_in(Path::new(common::DATA), &["inspect", file, "--json"]);
        assert_eq!(code, 0, "{out}{err}");
        insta::assert_snapshot!(snapshot, out);
    }
}

/// A tensor with a wrong shape: named, with what was found and expected, exit code 1.
#[test]
fn wrong_shape_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (mut tensors, meta) = read(DEMO);
    find(&mut tensors, "layers.3.engram.value_proj.weight").2 = vec![128, 96];
    let path = dir.path().join("broken.safetensors");
    write(&path, &tensors, meta);
    let (code, out, err) = inspect(&[path.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("PROBLEM  layers.3.engram.value_proj.weight")
            && out.contains("shape [128, 96], expected [96, 128]"),
        "{out}"
    );
    assert!(out.contains("result: 1 problem(s)"), "{out}");
    // Everything else is still OK.
    assert!(
        out.contains("OK       layers.1.engram.value_proj.weight"),
        "{out}"
    );
    insta::assert_snapshot!("inspect_wrong_shape", common::redact_tmp(&out, dir.path()));
}

/// V4.1 tables one row too long, a dtype changed, a tensor dropped: each named.
#[test]
fn wrong_table_rows_dtype_and_missing_tensors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (mut tensors, meta) = read(V41);
    for name in [
        "layers.1.engram.embed.weight",
        "layers.1.engram.embed.scale",
    ] {
        let t = find(&mut tensors, name);
        let row = t.3.len() / t.2[0];
        t.2[0] += 1;
        t.3.extend(vec![0x38; row]);
    }
    find(&mut tensors, "layers.3.engram.q_weight").1 = Dtype::F16;
    tensors.retain(|t| t.0 != "layers.3.engram.wkv.scale");
    let path = dir.path().join("broken.safetensors");
    write(&path, &tensors, meta);
    let (code, out, err) = inspect(&[path.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    for want in [
        "layers.1.engram.embed.weight: rows 25875, expected 25874",
        "PROBLEM  layers.1.engram.embed.weight  F8_E4M3 [25875, 64]: shape [25875, 64], expected [25874, 64]",
        "PROBLEM  layers.1.engram.embed.scale",
        "PROBLEM  layers.3.engram.q_weight      F16 [4, 64]: dtype F16, expected BF16",
        "PROBLEM  layers.3.engram.wkv.scale",
        "missing",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    insta::assert_snapshot!(
        "inspect_wrong_rows_dtype_missing",
        common::redact_tmp(&out, dir.path())
    );
}

/// A file cut short: the header still reads, the cut tensor is named, exit code 1.
#[test]
fn truncated_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(V41).unwrap();
    let path = dir.path().join("cut.safetensors");
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    let (code, out, err) = inspect(&[path.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains("truncated") && out.contains("tensor `"),
        "{out}"
    );
    insta::assert_snapshot!("inspect_truncated", common::redact_tmp(&out, dir.path()));

    // Cut inside the header: nothing to take the config from -> an error, exit code 2.
    std::fs::write(&path, &bytes[..100]).unwrap();
    let (code, out, err) = inspect(&[path.to_str().unwrap()]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("cut.safetensors"), "{err}");
    insta::assert_snapshot!("inspect_cut_header", common::redact_tmp(&err, dir.path()));
}

/// A model directory: config.json plus shards; a tensor in no shard is missing.
#[test]
fn model_directory_with_shards() {
    let dir = tempfile::tempdir().unwrap();
    let (tensors, meta) = read(DEMO);
    let config = meta.as_ref().unwrap()["meta"].clone();
    std::fs::write(dir.path().join("config.json"), config).unwrap();
    let (first, second): (Vec<Tensor>, Vec<Tensor>) = tensors
        .into_iter()
        .partition(|t| t.0.starts_with("layers.1."));
    write(
        &dir.path().join("model-00001-of-00002.safetensors"),
        &first,
        None,
    );
    write(
        &dir.path().join("model-00002-of-00002.safetensors"),
        &second,
        None,
    );
    let (code, out, err) = inspect(&[dir.path().to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("config.json") && out.contains("files: 2") && out.contains("result: OK"),
        "{out}"
    );

    let mut second = second;
    second.retain(|t| t.0 != "layers.3.engram.norm2.1.weight");
    write(
        &dir.path().join("model-00002-of-00002.safetensors"),
        &second,
        None,
    );
    let (code, out, _) = inspect(&[dir.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        out.contains("PROBLEM  layers.3.engram.norm2.1.weight") && out.contains("missing"),
        "{out}"
    );
    insta::assert_snapshot!(
        "inspect_shard_missing",
        common::redact_tmp(&out, dir.path())
    );

    // The same name in two shards is a problem too.
    write(
        &dir.path().join("model-00002-of-00002.safetensors"),
        &first,
        None,
    );
    let (code, out, _) = inspect(&[dir.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(out.contains("is in two files"), "{out}");
}

/// A single file without `meta` takes the config from a sibling config.json; with
/// neither, the command fails with a message naming the file.
#[test]
fn config_next_to_the_file_or_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (tensors, meta) = read(DEMO);
    let path: PathBuf = dir.path().join("weights.safetensors");
    write(&path, &tensors, None);
    let (code, _, err) = inspect(&[path.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(
        err.contains("weights.safetensors") && err.contains("no Engram config"),
        "{err}"
    );
    insta::assert_snapshot!("inspect_no_config", common::redact_tmp(&err, dir.path()));
    std::fs::write(dir.path().join("config.json"), &meta.unwrap()["meta"]).unwrap();
    let (code, out, err) = inspect(&[path.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
}
