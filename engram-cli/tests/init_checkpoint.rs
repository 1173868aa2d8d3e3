//! `engram init-checkpoint`: a small checkpoint for a fake model is consistent for
//! `engram inspect`, opens in the runtime, and with `--zero-value` adds exactly nothing.

mod common;

use std::path::{Path, PathBuf};

use common::{engram, fake_model, runtime, write_small, HIDDEN};
use engram_cli::init_checkpoint::{init_checkpoint, InitArgs, ENGRAM_FILE};
use engram_core::testing::TestRng;
use engram_plugin::{EngramRuntime, SequenceInput};

/// Runs every Engram layer of `rt` on random hidden states of one sequence; returns
/// (hidden, output) per layer.
fn apply_all(rt: &EngramRuntime) -> Vec<(Vec<f32>, Vec<f32>)> {
    let tokens: Vec<u32> = vec![100, 2000, 31, 4242, 100, 2000, 31, 9];
    let mut step = rt
        .begin_step(
            &[SequenceInput {
                seq_id: 1,
                tokens: &tokens,
                position: 0,
                dead: None,
                context: None,
            }],
            &[],
        )
        .unwrap();
    let mut rng = TestRng::new(3);
    let layers = rt.config().hash.layer_ids.clone();
    let out = layers
        .iter()
        .map(|&l| {
            let hidden = rng.vec(tokens.len() * HIDDEN, 2.0);
            let out = step.apply_packed(l, &hidden).unwrap();
            (hidden, out)
        })
        .collect();
    step.finish();
    out
}

#[test]
fn zero_value_checkpoint_is_consistent_and_adds_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fake_model(tmp.path());
    let out = tmp.path().join("with-engram");
    write_small(&model, &out, &["--zero-value"]);

    // The model's files are there (linked or copied); config.json carries the engram object.
    assert!(out.join("tokenizer.json").is_file());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["hidden_size"], HIDDEN);
    let e = &config["engram"];
    assert_eq!(e["engram_vocab_size"], serde_json::json!([100, 100]));
    assert_eq!(e["layer_ids"], serde_json::json!([1, 3]));
    assert_eq!(e["pad_id"], 1, "the pad id falls back to the eos id");
    assert_eq!(e["kernel_size"], 4);
    assert_eq!(e["hc_mult"], 1);
    let cfg = engram_core::config::EngramConfig::from_hf_config(&config)
        .unwrap()
        .unwrap();
    assert_eq!(
        (cfg.head_dim, cfg.hidden_size, cfg.hc_mult),
        (16, HIDDEN, 1)
    );

    let (code, stdout, stderr) = engram(&["inspect", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("result: OK"), "{stdout}");

    let rt = runtime(&out);
    assert_eq!(rt.config(), &cfg);
    for (hidden, got) in apply_all(&rt) {
        let same = hidden
            .iter()
            .zip(&got)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(
            same,
            "--zero-value must return the hidden states bit for bit"
        );
    }
}

#[test]
fn random_checkpoint_adds_about_value_scale() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fake_model(tmp.path());
    let out = tmp.path().join("with-engram");
    write_small(&model, &out, &["--value-scale", "0.05", "--pad-id", "2"]);
    let (code, stdout, stderr) = engram(&["inspect", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{stdout}{stderr}");

    let rt = runtime(&out);
    assert_eq!(rt.config().hash.pad_id, 2);
    for (hidden, got) in apply_all(&rt) {
        let n = hidden.len() as f64;
        let delta_rms = (hidden
            .iter()
            .zip(&got)
            .map(|(a, b)| ((b - a) as f64).powi(2))
            .sum::<f64>()
            / n)
            .sqrt();
        assert!(got.iter().all(|x| x.is_finite()));
        // About the requested scale: small next to the hidden states (RMS ~1.15), not zero.
        assert!(
            (0.005..0.2).contains(&delta_rms),
            "Engram added RMS {delta_rms}"
        );
    }
}

#[test]
fn same_seed_same_file_and_rerun_replaces() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fake_model(tmp.path());
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let mut args = InitArgs::new(&model, &a);
    args.layers = vec![2];
    args.heads = 2;
    args.n_embed_per_ngram = 32;
    args.vocab = 50;
    let report = init_checkpoint(&args).unwrap();
    assert_eq!(report.tables.len(), 1);
    assert_eq!(
        report.bytes,
        std::fs::metadata(a.join(ENGRAM_FILE)).unwrap().len()
    );
    // Writing into the same directory again replaces what is there.
    init_checkpoint(&args).unwrap();
    args.out = b.clone();
    init_checkpoint(&args).unwrap();
    let read = |d: &Path| std::fs::read(d.join(ENGRAM_FILE)).unwrap();
    assert_eq!(read(&a), read(&b), "the same seed writes the same file");
    args.seed = 1;
    init_checkpoint(&args).unwrap();
    assert_ne!(read(&a), read(&b), "another seed writes another file");

    // The model directory itself is refused as the output.
    args.out = model.clone();
    assert!(init_checkpoint(&args).is_err());
    // A layer the model does not have is refused.
    args.out = b;
    args.layers = vec![4];
    let e = init_checkpoint(&args).unwrap_err().to_string();
    assert!(e.contains("layer 4"), "{e}");
}

/// The full-size demo checkpoint (written by `engram init-checkpoint` into the directory
/// `ENGRAM_DEMO_CHECKPOINT` names) opens with its tables memory-mapped and adds about
/// `--value-scale`. Run with `cargo test --release -p engram-cli --test init_checkpoint
/// -- --ignored --nocapture`.
#[test]
#[ignore = "needs a demo checkpoint: set ENGRAM_DEMO_CHECKPOINT"]
fn demo_checkpoint_opens() {
    let Some(dir) = std::env::var_os("ENGRAM_DEMO_CHECKPOINT") else {
        eprintln!("ENGRAM_DEMO_CHECKPOINT is not set; nothing to check");
        return;
    };
    let dir = PathBuf::from(dir);
    let started = std::time::Instant::now();
    let rt = runtime(&dir);
    eprintln!(
        "opened {} in {:.2} s: layers {:?}",
        dir.display(),
        started.elapsed().as_secs_f64(),
        rt.config().hash.layer_ids
    );
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let text =
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n";
    let tokens: Vec<u32> = tok.encode(text, false).unwrap().get_ids().to_vec();
    let d = rt.config().hidden_size;
    let mut step = rt
        .begin_step(
            &[SequenceInput {
                seq_id: 1,
                tokens: &tokens,
                position: 0,
                dead: None,
                context: None,
            }],
            &[],
        )
        .unwrap();
    let mut rng = TestRng::new(5);
    for l in rt.config().hash.layer_ids.clone() {
        let hidden = rng.vec(tokens.len() * d, 2.0);
        let out = step.apply_packed(l, &hidden).unwrap();
        let rms = |x: &mut dyn Iterator<Item = f32>| {
            let v: Vec<f32> = x.collect();
            (v.iter().map(|&a| (a as f64).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
        };
        let delta = rms(&mut hidden.iter().zip(&out).map(|(a, b)| b - a));
        let h = rms(&mut hidden.iter().copied());
        eprintln!(
            "layer {l}: {} tokens, hidden RMS {h:.3}, Engram adds RMS {delta:.5}",
            tokens.len()
        );
        assert!(out.iter().all(|x| x.is_finite()));
    }
    let stats = step.finish();
    eprintln!("{stats:?}");
}
