//! `engram golden` fails, with exit status 1, on a golden file changed in one place, and
//! names the (sample, layer) it changed: one expected output value, one expected hash id,
//! and (V4.1) one bf16 output element moved by 2 ulps. The copies are written to a
//! temporary directory; the originals are never touched.

use std::path::{Path, PathBuf};
use std::process::Command;

use half::bf16;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data")
        .join(name)
}

/// A copy of golden file `name` in `dir` with tensor `tensor`'s bytes passed through
/// `change` (which gets the tensor's raw little-endian bytes).
fn mutated(dir: &Path, name: &str, tensor: &str, change: impl FnOnce(&mut [u8])) -> PathBuf {
    let mut bytes = std::fs::read(data(name)).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let offsets = &header[tensor]["data_offsets"];
    let (begin, end) = (
        offsets[0].as_u64().unwrap() as usize,
        offsets[1].as_u64().unwrap() as usize,
    );
    let at = 8 + header_len;
    change(&mut bytes[at + begin..at + end]);
    let out = dir.join(format!("{tensor}-{name}"));
    std::fs::write(&out, bytes).unwrap();
    out
}

/// Runs `engram golden` on `file`: (exit code, stdout).
fn golden(file: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_engram"))
        .args(["golden", "--tokenizer"])
        .arg(data("deepseek-v4-tokenizer/tokenizer.json"))
        .arg(file)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// Exit 1, the (sample, layer) row marked FAIL, every other row ok.
fn assert_fails_at(file: &Path, sample: usize, layer: usize) {
    let (code, out) = golden(file);
    assert_eq!(code, 1, "{out}");
    let rows: Vec<&str> = out.lines().filter(|l| l.starts_with("sample ")).collect();
    assert_eq!(rows.len(), 4, "2 samples x 2 layers:\n{out}");
    for row in rows {
        let here = row.starts_with(&format!("sample {sample} layer {layer}:"));
        assert_eq!(
            row.ends_with("FAIL"),
            here,
            "only sample {sample} layer {layer} may fail:\n{out}"
        );
        assert_eq!(row.ends_with("ok"), !here, "{out}");
    }
}

fn f32_at(bytes: &mut [u8], i: usize) -> &mut [u8] {
    &mut bytes[4 * i..4 * i + 4]
}

#[test]
fn the_unchanged_files_pass() {
    for name in [
        "forward_demo_small.safetensors",
        "forward_v41_small.safetensors",
    ] {
        let (code, out) = golden(&data(name));
        assert_eq!(code, 0, "{name}: {out}");
    }
}

#[test]
fn one_expected_output_value_changed_fails_its_row() {
    let dir = tempfile::tempdir().unwrap();
    // Paper variant: one value of sample 1, layer 3 moved by 1% of the tensor's norm.
    let file = mutated(
        dir.path(),
        "forward_demo_small.safetensors",
        "sample1.layer3.output",
        |b| {
            let norm = b
                .chunks_exact(4)
                .map(|c| (f32::from_le_bytes(c.try_into().unwrap()) as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            let v = f32::from_le_bytes(f32_at(b, 100).try_into().unwrap());
            f32_at(b, 100).copy_from_slice(&(v + 0.01 * norm as f32).to_le_bytes());
        },
    );
    assert_fails_at(&file, 1, 3);
    // A NaN in place of that value fails too.
    let file = mutated(
        dir.path(),
        "forward_demo_small.safetensors",
        "sample0.layer1.output",
        |b| f32_at(b, 7).copy_from_slice(&f32::NAN.to_le_bytes()),
    );
    assert_fails_at(&file, 0, 1);
}

#[test]
fn one_expected_hash_id_changed_fails_its_row() {
    let dir = tempfile::tempdir().unwrap();
    let bump = |b: &mut [u8]| {
        let i = 5 * 8;
        let v = i64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        b[i..i + 8].copy_from_slice(&(v + 1).to_le_bytes());
    };
    let file = mutated(
        dir.path(),
        "forward_demo_small.safetensors",
        "sample0.layer3.hash_ids",
        bump,
    );
    assert_fails_at(&file, 0, 3);
    let file = mutated(
        dir.path(),
        "forward_v41_small.safetensors",
        "sample1.layer1.row_ids",
        bump,
    );
    assert_fails_at(&file, 1, 1);
}

#[test]
fn one_v41_bf16_element_two_ulps_off_fails_its_row() {
    let dir = tempfile::tempdir().unwrap();
    // The golden check allows 1 ulp; 2 must fail.
    let file = mutated(
        dir.path(),
        "forward_v41_small.safetensors",
        "sample0.layer3.output",
        |b| {
            let i = 2 * 33;
            let v = u16::from_le_bytes([b[i], b[i + 1]]);
            let moved = bf16::from_bits(v + 2);
            assert!(moved.to_f32().is_finite());
            b[i..i + 2].copy_from_slice(&moved.to_bits().to_le_bytes());
        },
    );
    assert_fails_at(&file, 0, 3);
}
