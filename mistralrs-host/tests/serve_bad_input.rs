//! `mistralrs serve` (mistral.rs's CLI with the `engram` feature) given bad input: an
//! Engram checkpoint whose tables are missing or cut short must fail at load naming the
//! file; bad prompts over HTTP must get an HTTP error or a proper answer, and the server
//! must answer a normal request correctly after each. Run by `cargo xtask mistralrs-test`.
//!
//! Token ids outside the Engram table's vocabulary cannot be sent over HTTP: mistral.rs
//! 0.8.1's server takes a completion's `prompt` as a string only (`CompletionRequest::prompt:
//! String` in mistralrs-server-core; a list of ids is rejected as malformed JSON, which
//! this test checks too) and a chat's messages as text. Text goes through the model's own
//! tokenizer, whose ids are exactly those the Engram tokenizer compression was built from,
//! so every id a server sees is inside the table's vocabulary. The nearest a client gets is
//! text spelling the special tokens and control characters, which is sent below.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use common::serve::{http_post, setup, Server, Setup};

/// A copy of the checkpoint `from` in the scratch directory: every file a symbolic link
/// but `engram.safetensors`, which `tables` makes (or not).
fn broken_copy(s: &Setup, from: &Path, name: &str, tables: impl FnOnce(&Path)) -> PathBuf {
    let dir = s.scratch.join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    for entry in fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name() != "engram.safetensors" {
            std::os::unix::fs::symlink(entry.path(), dir.join(entry.file_name())).unwrap();
        }
    }
    tables(&dir.join("engram.safetensors"));
    dir
}

/// A checkpoint without `engram.safetensors`, and one whose `engram.safetensors` stops
/// half way through its tables: `mistralrs serve` exits before listening, its output naming
/// the file, with no panic.
#[test]
fn serve_fails_at_load_naming_missing_or_truncated_tables() {
    let s = setup();
    let whole = s.seeded.join("engram.safetensors");
    let len = fs::metadata(&whole).unwrap().len();
    let missing = broken_copy(&s, &s.seeded, "tables-missing", |_| {});
    let truncated = broken_copy(&s, &s.seeded, "tables-truncated", |to| {
        let bytes = fs::read(&whole).unwrap();
        fs::write(to, &bytes[..(len / 2) as usize]).unwrap();
    });
    for (dir, what) in [(missing, "missing"), (truncated, "truncated")] {
        let err = match Server::try_start_with(&s, &dir, what, &[], &[]) {
            Ok(server) => panic!(
                "mistralrs serve loaded a checkpoint whose tables are {what}:\n{}",
                server.log_text()
            ),
            Err(e) => e,
        };
        let named = dir.join("engram.safetensors");
        assert!(
            err.contains(&named.display().to_string()) || err.contains("engram.safetensors"),
            "tables {what}: the error does not name {}:\n{err}",
            named.display()
        );
        assert!(
            err.contains(&dir.display().to_string()),
            "tables {what}: the error does not name the directory {}:\n{err}",
            dir.display()
        );
        assert!(!err.contains("panicked"), "tables {what}: a panic:\n{err}");
        let line = err
            .lines()
            .find(|l| l.contains("engram.safetensors"))
            .unwrap_or_default();
        eprintln!("tables {what}: {line}");
    }
}

/// One completion, greedy.
fn completion(prompt: &str, max_tokens: usize) -> Value {
    json!({"model": "default", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
}

/// The text of an answer body, or `None` when it is not one.
fn answer_text(body: &str) -> Option<String> {
    let v: Value = serde_json::from_str(body).ok()?;
    let choice = &v["choices"][0];
    choice["text"]
        .as_str()
        .or(choice["message"]["content"].as_str())
        .map(str::to_string)
}

/// Empty prompts (completion and chat), a prompt of token ids, text spelling special
/// tokens and control characters, and a prompt past the context length (8192 tokens),
/// each to the server on `engram-seeded`: each gets an HTTP error (4xx) or an answer, the
/// prompt past the context an error, never a 5xx or a dropped connection; after each the
/// server answers a normal request as it did before them.
#[test]
fn bad_prompts_over_http_get_an_error_or_an_answer_and_the_server_lives_on() {
    let s = setup();
    let server = Server::start(&s, &s.seeded, "bad-input");
    let normal = completion("The capital of France is", 8);
    let post = |path: &str, body: &Value| {
        http_post(&server, path, body).unwrap_or_else(|e| {
            panic!(
                "{path} {body}: no HTTP answer ({e}):\n{}",
                server.log_text()
            )
        })
    };
    let (status, body) = post("/v1/completions", &normal);
    assert_eq!(status, 200, "{body}");
    let want = answer_text(&body).unwrap_or_else(|| panic!("no answer in {body}"));

    let long = "word ".repeat(12_000);
    let cases: Vec<(&str, &str, Value)> = vec![
        (
            "empty completion prompt",
            "/v1/completions",
            completion("", 8),
        ),
        (
            "empty chat message",
            "/v1/chat/completions",
            json!({"model": "default", "max_tokens": 8, "temperature": 0,
                   "messages": [{"role": "user", "content": ""}]}),
        ),
        (
            "token ids as the prompt",
            "/v1/completions",
            json!({"model": "default", "prompt": [1, 2, 49151, 1_000_000], "max_tokens": 4}),
        ),
        (
            "special tokens and control characters",
            "/v1/completions",
            completion(
                "<|endoftext|><|im_start|>system\u{0}\u{1b}[0m\u{fffd}<|im_end|>\u{10ffff}",
                4,
            ),
        ),
        (
            "past the context length",
            "/v1/completions",
            completion(&long, 4),
        ),
    ];
    for (name, path, body) in &cases {
        let (status, answer) = post(path, body);
        let short: String = answer.chars().take(300).collect();
        eprintln!("{name}: HTTP {status}: {short}");
        assert!(
            status == 200 || (400..500).contains(&status),
            "{name}: HTTP {status}: {answer}\nserver log:\n{}",
            server.log_text()
        );
        if status == 200 {
            assert!(
                answer_text(&answer).is_some(),
                "{name}: HTTP 200 without an answer: {answer}"
            );
        }
        if *name == "past the context length" {
            assert!(
                (400..500).contains(&status),
                "{name}: answered ({status}) a prompt of {} words",
                12_000
            );
        }
        let (status, again) = post("/v1/completions", &normal);
        assert_eq!(status, 200, "after {name}: {again}");
        assert_eq!(
            answer_text(&again).as_deref(),
            Some(want.as_str()),
            "after {name}: the normal request's answer changed: {again}"
        );
    }
    let log = server.log_text();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
}
