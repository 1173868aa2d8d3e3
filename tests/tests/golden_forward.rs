//! `engram golden` on the golden forward files: every hash matches and every output is
//! within the stated tolerance of the file's expected outputs (docs/algorithm.md section
//! 11), for each backend.

use engram_cli::golden::{run_golden, GoldenBackend};
use engram_core::config::Variant;
use engram_tests::{data_path, tokenizer};

fn check(file: &str, backend: GoldenBackend, variant: Variant) {
    let report = run_golden(tokenizer(), &data_path(file), backend, None).unwrap();
    assert_eq!(report.variant, variant);
    assert_eq!(report.rows.len(), 4, "2 samples x 2 layers");
    for row in &report.rows {
        assert_eq!(row.hash_mismatches, 0, "{row:?}");
        assert!(row.passed, "{row:?}");
    }
    assert!(report.passed());
}

#[test]
fn paper_variant_reference() {
    check(
        "forward_demo_small.safetensors",
        GoldenBackend::Reference,
        Variant::Paper,
    );
}

#[test]
fn paper_variant_cpu() {
    check(
        "forward_demo_small.safetensors",
        GoldenBackend::Cpu,
        Variant::Paper,
    );
}

#[test]
fn v41_variant_cpu() {
    check(
        "forward_v41_small.safetensors",
        GoldenBackend::Cpu,
        Variant::V41,
    );
}

#[test]
fn v41_variant_reference() {
    check(
        "forward_v41_small.safetensors",
        GoldenBackend::Reference,
        Variant::V41,
    );
}

/// `--dump` writes the golden file's own names; reading the dump back as the expected
/// values must pass again (an independent checker could read the same file).
#[test]
fn dump_uses_the_golden_names() {
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("dump.safetensors");
    run_golden(
        tokenizer(),
        &data_path("forward_demo_small.safetensors"),
        GoldenBackend::Reference,
        Some(&dump),
    )
    .unwrap();
    let bytes = std::fs::read(&dump).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let expected: Vec<String> = (0..2)
        .flat_map(|i| {
            [1, 3].into_iter().flat_map(move |l| {
                [
                    format!("sample{i}.layer{l}.hash_ids"),
                    format!("sample{i}.layer{l}.output"),
                ]
            })
        })
        .collect();
    let mut expected_sorted = expected.clone();
    expected_sorted.sort();
    assert_eq!(names, expected_sorted);
    let golden_bytes = std::fs::read(data_path("forward_demo_small.safetensors")).unwrap();
    let golden = safetensors::SafeTensors::deserialize(&golden_bytes).unwrap();
    let ours = st.tensor("sample1.layer3.hash_ids").unwrap();
    assert_eq!(
        ours.data(),
        golden.tensor("sample1.layer3.hash_ids").unwrap().data()
    );
}
