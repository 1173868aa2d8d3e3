//! What the `engram` command's tests share: a fake model directory, running the binary,
//! a small seeded checkpoint, a runtime over it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use engram_plugin::{EngramRuntime, OpenOptions, RuntimeOptions};

pub const TOKENIZER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/data/deepseek-v4-tokenizer/tokenizer.json"
);
pub const HIDDEN: usize = 64;

/// A model directory with a minimal config.json (hidden size 64) and a tokenizer.
pub fn fake_model(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(
        model.join("config.json"),
        serde_json::to_string_pretty(&serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": HIDDEN,
            "num_hidden_layers": 4,
            "rms_norm_eps": 1e-5,
            "eos_token_id": 1
        }))
        .unwrap(),
    )
    .unwrap();
    std::fs::copy(TOKENIZER, model.join("tokenizer.json")).unwrap();
    model
}

/// `tests/data` of the repository: the golden checkpoints.
pub const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/data");

/// Runs `engram ARGS`: (exit code, stdout, stderr).
pub fn engram(args: &[&str]) -> (i32, String, String) {
    run(Command::new(env!("CARGO_BIN_EXE_engram")).args(args))
}

/// [`engram`] with `dir` as the working directory, so that relative paths in the output
/// are the same on every machine.
pub fn engram_in(dir: &Path, args: &[&str]) -> (i32, String, String) {
    run(Command::new(env!("CARGO_BIN_EXE_engram"))
        .args(args)
        .current_dir(dir))
}

fn run(command: &mut Command) -> (i32, String, String) {
    let out = command.output().expect("engram runs");
    (
        out.status.code().expect("exited"),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// `text` with the temporary directory `dir` written as `[tmp]`, for snapshots that must
/// not depend on where the test ran.
pub fn redact_tmp(text: &str, dir: &Path) -> String {
    text.replace(&dir.display().to_string(), "[tmp]")
}

/// `engram init-checkpoint` with a tiny vocabulary; `extra` adds flags.
pub fn write_small(model: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec![
        "init-checkpoint",
        "--model",
        model.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--layers",
        "1,3",
        "--max-ngram",
        "3",
        "--heads",
        "2",
        "--n-embed-per-ngram",
        "32",
        "--vocab",
        "100",
        "--seed",
        "7",
    ];
    args.extend_from_slice(extra);
    let (code, stdout, stderr) = engram(&args);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("engram.safetensors"), "{stdout}");
}

pub fn runtime(dir: &Path) -> EngramRuntime {
    let options = OpenOptions {
        runtime: RuntimeOptions {
            prefetch: false,
            ..Default::default()
        },
        ..Default::default()
    };
    EngramRuntime::open(dir, options)
        .expect("opens")
        .expect("has an Engram config")
}
