//! `engram check-trace`: a runtime driven like a host (batched sequences, prefill chunks,
//! decode steps) with tracing on passes against the reference; a changed output, a gap in
//! a sequence's positions and a torn record file do not.

mod common;

use std::path::Path;

use common::{engram, fake_model, write_small, HIDDEN};
use engram_cli::check_trace::check_trace;
use engram_core::testing::TestRng;
use engram_plugin::{EngramRuntime, OpenOptions, RuntimeOptions, SequenceInput};

/// Three sequences of different lengths through a CPU runtime that traces into `trace`:
/// first a prefill chunk each (batched), then the rest in batched single-token steps.
fn drive(model: &Path, trace: &Path) {
    let options = OpenOptions {
        runtime: RuntimeOptions {
            trace_dir: Some(trace.to_path_buf()),
            ..Default::default()
        },
        ..Default::default()
    };
    let rt = EngramRuntime::open(model, options).unwrap().unwrap();
    let mut rng = TestRng::new(11);
    let seqs: Vec<Vec<u32>> = [9usize, 5, 12]
        .iter()
        .map(|&n| (0..n).map(|_| rng.below(120_000) as u32).collect())
        .collect();
    let prefill = 4;
    let mut fed = vec![0usize; seqs.len()];
    while fed.iter().zip(&seqs).any(|(&f, s)| f < s.len()) {
        let batch: Vec<SequenceInput<'_>> = seqs
            .iter()
            .enumerate()
            .filter(|(i, s)| fed[*i] < s.len())
            .map(|(i, s)| {
                let n = if fed[i] == 0 { prefill } else { 1 };
                SequenceInput {
                    seq_id: i as u64,
                    tokens: &s[fed[i]..fed[i] + n],
                    position: fed[i],
                    dead: None,
                    context: None,
                }
            })
            .collect();
        let tokens: usize = batch.iter().map(|b| b.tokens.len()).sum();
        let mut step = rt.begin_step(&batch, &[]).unwrap();
        for layer in rt.config().hash.layer_ids.clone() {
            let hidden = rng.vec(tokens * HIDDEN, 2.0);
            step.apply_packed(layer, &hidden).unwrap();
        }
        step.finish();
        for b in &batch {
            fed[b.seq_id as usize] += b.tokens.len();
        }
    }
}

/// `engram check-trace --model MODEL TRACE`: (exit code, stdout, stderr).
fn check_trace_command(model: &Path, trace: &Path) -> (i32, String, String) {
    engram(&[
        "check-trace",
        "--model",
        model.to_str().unwrap(),
        trace.to_str().unwrap(),
    ])
}

#[test]
fn a_traced_host_matches_the_reference_and_changes_are_caught() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fake_model(tmp.path());
    let ckpt = tmp.path().join("with-engram");
    write_small(&model, &ckpt, &["--value-scale", "1.0"]);
    let trace = tmp.path().join("trace");
    drive(&ckpt, &trace);

    let report = check_trace(&ckpt, &trace, 1e-5).unwrap();
    assert!(report.passed(), "{}", report.to_text());
    assert_eq!(report.checks.len(), 3 * 2, "3 sequences x 2 Engram layers");
    assert_eq!(
        report.checks.iter().map(|c| c.tokens).collect::<Vec<_>>(),
        [9, 9, 5, 5, 12, 12]
    );
    let (code, stdout, stderr) = check_trace_command(&ckpt, &trace);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("PASS"), "{stdout}");

    // One output value of sequence 2 at layer 3, token 7, moved by a little.
    let file = trace.join("seq2.layer3.bin");
    let mut bytes = std::fs::read(&file).unwrap();
    let original = bytes.clone();
    let record = 12 + 8 * HIDDEN;
    let at = 7 * record + 12 + 4 * (HIDDEN + 5);
    let v = f32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    bytes[at..at + 4].copy_from_slice(&(v + 0.05).to_le_bytes());
    std::fs::write(&file, &bytes).unwrap();
    let report = check_trace(&ckpt, &trace, 1e-5).unwrap();
    assert!(!report.passed());
    let bad: Vec<_> = report
        .checks
        .iter()
        .filter(|c| c.rel_err > 1e-5)
        .map(|c| (c.seq_id, c.layer_id))
        .collect();
    assert_eq!(bad, [(2, 3)], "{}", report.to_text());
    let (code, stdout, _) = check_trace_command(&ckpt, &trace);
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("FAIL"), "{stdout}");

    // A NaN in place of that value fails too (a worst error folded with f64::max would
    // drop it and pass).
    let mut nan = original.clone();
    nan[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(&file, &nan).unwrap();
    let report = check_trace(&ckpt, &trace, 1e-5).unwrap();
    assert!(!report.passed(), "{}", report.to_text());
    assert!(report.max_rel_err.is_nan(), "{}", report.to_text());
    let (code, stdout, _) = check_trace_command(&ckpt, &trace);
    assert_eq!(code, 1, "{stdout}");

    // A torn record file is an error naming it.
    bytes.truncate(bytes.len() - 3);
    std::fs::write(&file, &bytes).unwrap();
    let err = check_trace(&ckpt, &trace, 1e-5).unwrap_err().to_string();
    assert!(err.contains("seq2.layer3.bin"), "{err}");
}

#[test]
fn a_trace_that_does_not_start_at_zero_is_a_problem_not_a_pass() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fake_model(tmp.path());
    let ckpt = tmp.path().join("with-engram");
    write_small(&model, &ckpt, &[]);
    let trace = tmp.path().join("trace");
    // A runtime refuses a paper-variant sequence that starts past 0, so drop the first
    // record of one by hand.
    drive(&ckpt, &trace);
    for layer in [1, 3] {
        let file = trace.join(format!("seq1.layer{layer}.bin"));
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[12 + 8 * HIDDEN..]).unwrap();
    }
    let report = check_trace(&ckpt, &trace, 1e-5).unwrap();
    assert!(!report.passed());
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.contains("sequence 1: positions [1, 2, 3")),
        "{}",
        report.to_text()
    );
    // The other sequences are still checked.
    assert_eq!(report.checks.len(), 2 * 2, "{}", report.to_text());

    // A trace of another model is refused.
    let other = tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(
        other.join("trace.json"),
        r#"{"format": 1, "channels": 8, "layer_ids": [1, 3]}"#,
    )
    .unwrap();
    let err = check_trace(&ckpt, &other, 1e-5).unwrap_err().to_string();
    assert!(err.contains("8 channels"), "{err}");
}
