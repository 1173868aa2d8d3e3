//! Golden check of the numpy-exact hash multipliers: every case in
//! `data/multipliers.json` (produced by the original numpy code) must match
//! `engram_core::numpy_rng` bit for bit.

use engram_core::numpy_rng::{half_bound, layer_multipliers};
use serde_json::Value;

const GOLDEN: &str = include_str!("../data/multipliers.json");

fn field_u64(case: &Value, key: &str, idx: usize) -> u64 {
    case[key]
        .as_u64()
        .unwrap_or_else(|| panic!("case {idx}: field `{key}` missing or not a u64"))
}

#[test]
fn multipliers_match_numpy_golden() {
    let cases: Vec<Value> = serde_json::from_str(GOLDEN).expect("multipliers.json is valid JSON");
    assert_eq!(cases.len(), 96, "expected 96 golden cases");

    let mut failures = Vec::new();
    for (idx, case) in cases.iter().enumerate() {
        let vocab = field_u64(case, "compressed_vocab_size", idx);
        let seed = field_u64(case, "seed", idx);
        let layer = field_u64(case, "layer_id", idx);
        let n = field_u64(case, "max_ngram_size", idx) as usize;
        let want_hb = case["half_bound"]
            .as_i64()
            .unwrap_or_else(|| panic!("case {idx}: `half_bound` not an i64"));
        let want: Vec<i64> = case["multipliers"]
            .as_array()
            .unwrap_or_else(|| panic!("case {idx}: `multipliers` not an array"))
            .iter()
            .map(|v| v.as_i64().expect("multiplier fits i64"))
            .collect();

        let label = format!("case {idx} (vocab={vocab}, seed={seed}, layer={layer}, n={n})");
        let got_hb = half_bound(vocab);
        if got_hb != want_hb {
            failures.push(format!(
                "{label}: half_bound {got_hb} != expected {want_hb}"
            ));
        }
        let got = layer_multipliers(vocab, seed, layer, n);
        if got != want {
            failures.push(format!("{label}: multipliers {got:?} != expected {want:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
