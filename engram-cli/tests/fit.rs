//! `engram fit` and `engram eval` on a tiny seeded Llama and a word-level tokenizer
//! (written here, so the workspace tests need no download): the fit starts as exactly the
//! host, its loss falls, it is deterministic and resumable, its checkpoint gives the same
//! Engram output through the runtime (engram-plugin) as through the fit's forward, and
//! bad input is a clear error.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::engram;
use engram_cli::fit::eval::{eval, last_logits, load_engram, EvalArgs, LogitsArgs};
use engram_cli::fit::greedy::{agreeing, choose_examples, greedy, Counts, Outcome};
use engram_cli::fit::llama::Llama;
use engram_cli::fit::model::{hidden_before, ids_tensor};
use engram_cli::fit::train::{fit, partial_dir, FitArgs};
use engram_cli::init_checkpoint::ENGRAM_FILE;
use engram_core::testing::TestRng;
use engram_plugin::SequenceInput;
use serde_json::json;

const WORDS: usize = 40;
const HIDDEN: usize = 32;
const LAYERS: usize = 3;

/// A Llama of 3 blocks, width 32, with seeded random weights, and a word-level
/// tokenizer of `WORDS` words plus `<eos>` (id 0).
fn tiny_model(dir: &Path) -> PathBuf {
    let model = dir.join("tiny-llama");
    fs::create_dir_all(&model).unwrap();
    let vocab: serde_json::Map<String, serde_json::Value> = std::iter::once("<eos>".to_string())
        .chain((0..WORDS).map(|i| format!("w{i}")))
        .enumerate()
        .map(|(i, w)| (w, json!(i)))
        .collect();
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<eos>"}
    });
    fs::write(model.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let v = WORDS + 1;
    let config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": HIDDEN, "intermediate_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_hidden_layers": LAYERS, "head_dim": 8,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": null,
        "vocab_size": v, "tie_word_embeddings": true, "eos_token_id": 0
    });
    fs::write(model.join("config.json"), config.to_string()).unwrap();
    let mut rng = TestRng::new(11);
    let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut put = |name: String, shape: &[usize], values: Vec<f32>| {
        tensors.insert(name, Tensor::from_vec(values, shape, &Device::Cpu).unwrap());
    };
    put(
        "model.embed_tokens.weight".into(),
        &[v, HIDDEN],
        rng.vec(v * HIDDEN, 1.0),
    );
    put("model.norm.weight".into(), &[HIDDEN], vec![1.0; HIDDEN]);
    let fan = |n: usize| 1.0 / (n as f32).sqrt();
    for i in 0..LAYERS {
        let p = |n: &str| format!("model.layers.{i}.{n}");
        for (name, rows, cols) in [
            ("self_attn.q_proj.weight", 32, HIDDEN),
            ("self_attn.k_proj.weight", 16, HIDDEN),
            ("self_attn.v_proj.weight", 16, HIDDEN),
            ("self_attn.o_proj.weight", HIDDEN, 32),
            ("mlp.gate_proj.weight", 64, HIDDEN),
            ("mlp.up_proj.weight", 64, HIDDEN),
            ("mlp.down_proj.weight", HIDDEN, 64),
        ] {
            put(p(name), &[rows, cols], rng.vec(rows * cols, fan(cols)));
        }
        put(p("input_layernorm.weight"), &[HIDDEN], vec![1.0; HIDDEN]);
        put(
            p("post_attention_layernorm.weight"),
            &[HIDDEN],
            vec![1.0; HIDDEN],
        );
    }
    let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, model.join("model.safetensors")).unwrap();
    model
}

/// Text where each word follows from the two before it (a seeded table), with one word
/// in ten random: what an n-gram table can learn and a random model cannot know.
fn corpus(dir: &Path, files: usize, words: usize) -> Vec<PathBuf> {
    let mut rng = TestRng::new(5);
    let next: Vec<usize> = (0..WORDS * WORDS)
        .map(|_| rng.below(WORDS as u64) as usize)
        .collect();
    (0..files)
        .map(|f| {
            let (mut a, mut b) = (f, f + 1);
            let mut text = String::new();
            for _ in 0..words {
                let c = if rng.below(10) == 0 {
                    rng.below(WORDS as u64) as usize
                } else {
                    next[a * WORDS + b]
                };
                text += &format!("w{c} ");
                (a, b) = (b, c);
            }
            let path = dir.join(format!("text{f}.txt"));
            fs::write(&path, text).unwrap();
            path
        })
        .collect()
}

/// The tiny model, a corpus of `files` files of `words` words, and a checkpoint fitted on
/// it for `steps` steps (`dir/fit`).
fn fitted(dir: &Path, files: usize, words: usize, steps: u64) -> (PathBuf, Vec<PathBuf>, PathBuf) {
    let model = tiny_model(dir);
    let files = corpus(dir, files, words);
    let out = dir.join("fit");
    fit(&args(&model, &files, &out, steps)).unwrap();
    (model, files, out)
}

fn args(model: &Path, corpus: &[PathBuf], out: &Path, steps: u64) -> FitArgs {
    FitArgs {
        model: model.into(),
        corpus: corpus.to_vec(),
        out: out.into(),
        layers: vec![1],
        max_ngram: 3,
        heads: 2,
        n_embed_per_ngram: 32,
        vocab: 2000,
        seed: 3,
        window: 32,
        batch: 4,
        steps,
        lr: 3e-3,
        table_lr: 0.1,
        table_init: 1.0,
        save_every: 10,
        stop_after: None,
        quiet: true,
    }
}

fn eval_on(model: &Path, files: &[PathBuf], no_engram: bool) -> engram_cli::fit::eval::EvalReport {
    eval(&EvalArgs {
        model: model.into(),
        files: files.to_vec(),
        no_engram,
        window: 32,
        batch: 4,
        json: false,
    })
    .unwrap()
}

#[test]
fn step_zero_is_the_host_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, files, out) = fitted(tmp.path(), 2, 200, 0);
    let with = eval_on(&out, &files, false);
    let without = eval_on(&out, &files, true);
    assert!(with.engram && !without.engram);
    assert_eq!(
        with.ppl.to_bits(),
        without.ppl.to_bits(),
        "{with:?} {without:?}"
    );
    assert_eq!(with.accuracy, without.accuracy);
}

#[test]
fn loss_falls_and_perplexity_drops() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let files = corpus(tmp.path(), 3, 400);
    let out = tmp.path().join("fit");
    let report = fit(&args(&model, &files, &out, 60)).unwrap();
    let mean = |xs: &[f32]| xs.iter().sum::<f32>() / xs.len() as f32;
    let (first, last) = (mean(&report.losses[..10]), mean(&report.losses[50..]));
    assert!(last < 0.8 * first, "loss {first} -> {last}");
    // Only rows the text reads moved, and they did (row-wise Adagrad on touched rows).
    let start = tmp.path().join("fit0");
    fit(&args(&model, &files, &start, 0)).unwrap();
    let (before, after) = (
        load_engram(&start).unwrap().unwrap(),
        load_engram(&out).unwrap().unwrap(),
    );
    let tok = tokenizers::Tokenizer::from_file(model.join("tokenizer.json")).unwrap();
    let windows = engram_cli::fit::data::load_windows(&tok, &files, 32).unwrap();
    let inputs: Vec<&[u32]> = windows.windows.iter().map(|w| &w[..32]).collect();
    let read: std::collections::HashSet<u64> =
        after.row_ids(&inputs).unwrap()[0].iter().copied().collect();
    let w = after.cfg.head_dim;
    let (t0, t1) = (&before.layers[0].table.data, &after.layers[0].table.data);
    let moved: Vec<u64> = (0..t0.len() / w)
        .filter(|&r| t0[r * w..(r + 1) * w] != t1[r * w..(r + 1) * w])
        .map(|r| r as u64)
        .collect();
    assert!(
        moved.len() > read.len() / 2,
        "{} of {} rows moved",
        moved.len(),
        read.len()
    );
    assert!(
        moved.iter().all(|r| read.contains(r)),
        "a row no window reads moved"
    );
    let host = eval_on(&out, &files, true);
    let fitted = eval_on(&out, &files, false);
    assert!(fitted.ppl < 0.8 * host.ppl, "{host:?} {fitted:?}");
    assert!(fitted.accuracy > host.accuracy, "{host:?} {fitted:?}");
    // What `engram eval --json` prints.
    let (code, stdout, stderr) = engram(&[
        "eval",
        "--model",
        out.to_str().unwrap(),
        "--window",
        "32",
        "--json",
        files[0].to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for k in ["files", "tokens", "ppl", "accuracy"] {
        assert!(v.get(k).is_some(), "{stdout}");
    }
}

/// The fitted checkpoint, opened by the runtime a host uses, adds what the fit's forward
/// adds, on the hidden states entering the Engram layer.
#[test]
fn the_runtime_serves_what_the_fit_computed() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, _, out) = fitted(tmp.path(), 2, 300, 20);
    let parts = load_engram(&out).unwrap().unwrap();
    let llama = Llama::load(&out).unwrap();
    let tokens: Vec<u32> = (0..24).map(|i| (i * 7 % WORDS + 1) as u32).collect();
    let hidden = hidden_before(&llama, &ids_tensor(&[&tokens]).unwrap(), 1).unwrap();
    let gathered = parts.gather(&[&tokens]).unwrap();
    let delta =
        engram_cli::fit::layer::forward(&parts.cfg, &parts.layers[0].dense, &hidden, &gathered[0])
            .unwrap();
    let want: Vec<f32> = (&hidden + &delta)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let added: f32 = delta.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
    assert!(added > 1e-3, "the fitted layer adds nothing ({added})");

    let rt = common::runtime(&out);
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
    let got = step
        .apply_packed(1, &hidden.flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .unwrap();
    step.finish();
    let num: f64 = got
        .iter()
        .zip(&want)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    let rel = (num / den).sqrt();
    assert!(rel < 1e-5, "runtime vs fit forward: relative error {rel}");
}

#[test]
fn same_seed_same_checkpoint_and_resume_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let files = corpus(tmp.path(), 2, 200);
    let whole = tmp.path().join("whole");
    fit(&args(&model, &files, &whole, 25)).unwrap();
    let again = tmp.path().join("again");
    fit(&args(&model, &files, &again, 25)).unwrap();
    let bytes = |d: &Path| fs::read(d.join(ENGRAM_FILE)).unwrap();
    assert!(
        bytes(&whole) == bytes(&again),
        "two fits with one seed differ"
    );

    let resumed = tmp.path().join("resumed");
    let mut a = args(&model, &files, &resumed, 25);
    a.stop_after = Some(13);
    let err = fit(&a).unwrap_err().to_string();
    assert!(err.contains("stopped after 13"), "{err}");
    assert!(!resumed.exists() && partial_dir(&resumed).exists());
    // Saved at step 10: the resumed run redoes 10..25.
    a.stop_after = None;
    let report = fit(&a).unwrap();
    assert_eq!(report.resumed_from, 10);
    assert!(bytes(&whole) == bytes(&resumed), "the resumed fit differs");
    assert!(!partial_dir(&resumed).exists());

    // Other settings do not resume a state; an existing output is refused.
    let other = tmp.path().join("other");
    let mut b = args(&model, &files, &other, 25);
    b.stop_after = Some(10);
    fit(&b).unwrap_err();
    b.stop_after = None;
    b.seed = 4;
    let err = fit(&b).unwrap_err().to_string();
    assert!(err.contains("other settings"), "{err}");
    let err = fit(&args(&model, &files, &whole, 5))
        .unwrap_err()
        .to_string();
    assert!(err.contains("holds an Engram checkpoint"), "{err}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let files = corpus(tmp.path(), 1, 100);
    let check = |corpus: Vec<PathBuf>, model: &Path, want: &str| {
        let out = tmp.path().join("out");
        let err = format!("{:#}", fit(&args(model, &corpus, &out, 1)).unwrap_err());
        assert!(err.contains(want), "{err}");
        assert!(!out.exists());
    };
    let latin1 = tmp.path().join("latin1.txt");
    fs::write(&latin1, b"caf\xe9 w1 w2").unwrap();
    check(
        vec![files[0].clone(), latin1.clone()],
        &model,
        "latin1.txt: not UTF-8",
    );
    let empty = tmp.path().join("empty.txt");
    fs::write(&empty, "").unwrap();
    check(vec![empty], &model, "empty.txt: empty");
    let short = tmp.path().join("short.txt");
    fs::write(&short, "w1 w2 w3").unwrap();
    check(
        vec![short],
        &model,
        "short.txt: 3 tokens, fewer than one window",
    );
    let bare = tmp.path().join("no-tokenizer");
    fs::create_dir_all(&bare).unwrap();
    fs::copy(model.join("config.json"), bare.join("config.json")).unwrap();
    check(files.clone(), &bare, "no tokenizer.json");
}

/// `greedy` through the fit's forward picks, at every step, the argmax of what `engram
/// logits` writes for the ids so far, with Engram and without; and stopping a prompt at
/// its first token that differs from the text changes no count of agreeing tokens.
#[test]
fn greedy_is_the_argmax_of_engram_logits_step_by_step() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, files, out) = fitted(tmp.path(), 2, 300, 30);
    let parts = load_engram(&out).unwrap().unwrap();
    let llama = Llama::load(&out).unwrap();
    let tok = tokenizers::Tokenizer::from_file(model.join("tokenizer.json")).unwrap();
    let ids = engram_cli::fit::data::tokenize_file(&tok, &files[0]).unwrap();
    let prompt = &ids[..12];
    let logits_file = tmp.path().join("logits.bin");
    for no_engram in [false, true] {
        let engram = (!no_engram).then_some(&parts);
        let got = greedy(&llama, engram, &[prompt], 6, None, 4)
            .unwrap()
            .remove(0);
        assert_eq!(got.len(), 6);
        for j in 0..got.len() {
            let mut so_far = prompt.to_vec();
            so_far.extend(&got[..j]);
            last_logits(&LogitsArgs {
                model: out.clone(),
                ids: so_far,
                no_engram,
                out: logits_file.clone(),
            })
            .unwrap();
            let logits: Vec<f32> = fs::read(&logits_file)
                .unwrap()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            let best = (0..logits.len())
                .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
                .unwrap();
            assert_eq!(got[j], best as u32, "step {j}, no_engram {no_engram}");
        }
    }
    // Every prompt of the file, 8 tokens each, 4 generated: stopping at the first miss
    // gives the same agreeing prefix as generating all 4; batches of 3 as of 1.
    let starts: Vec<usize> = (0..)
        .step_by(8)
        .take_while(|s| s + 12 <= ids.len())
        .collect();
    let prompts: Vec<&[u32]> = starts.iter().map(|&s| &ids[s..s + 8]).collect();
    let text: Vec<&[u32]> = starts.iter().map(|&s| &ids[s + 8..s + 12]).collect();
    let mut fulls = Vec::new();
    for engram in [Some(&parts), None] {
        let full = greedy(&llama, engram, &prompts, 4, None, 1).unwrap();
        let stopped = greedy(&llama, engram, &prompts, 4, Some(&text), 3).unwrap();
        for i in 0..prompts.len() {
            assert_eq!(
                agreeing(&full[i], text[i]),
                agreeing(&stopped[i], text[i]),
                "prompt {i}"
            );
            assert!(full[i].starts_with(&stopped[i]), "prompt {i}");
        }
        fulls.push(full);
    }
    assert_ne!(
        fulls[0], fulls[1],
        "the fitted Engram changes no greedy token"
    );
}

/// The examples rule on made-up outcomes: prompts right with Engram and wrong without,
/// taken in rounds over the files (first of each file, then second of each).
#[test]
fn the_examples_rule_takes_qualifying_prompts_in_rounds_over_files() {
    let o = |file, start, host_agrees, engram_agrees| Outcome {
        file,
        start,
        host_agrees,
        engram_agrees,
    };
    let outcomes = [
        o(0, 0, 4, 4),  // both right
        o(0, 8, 1, 4),  // qualifies: file 0, first
        o(0, 16, 0, 3), // neither
        o(0, 24, 3, 4), // qualifies: file 0, second
        o(1, 0, 4, 2),  // host only
        o(2, 0, 0, 4),  // qualifies: file 2, first
        o(2, 8, 2, 4),  // qualifies: file 2, second
        o(2, 16, 0, 4), // qualifies: file 2, third
    ];
    assert_eq!(choose_examples(&outcomes, 4, 3), vec![1, 5, 3]);
    assert_eq!(choose_examples(&outcomes, 4, 10), vec![1, 5, 3, 6, 7]);
    assert_eq!(choose_examples(&outcomes, 4, 0), Vec::<usize>::new());
    assert_eq!(choose_examples(&outcomes[..1], 4, 3), Vec::<usize>::new());
    assert_eq!(
        Counts::of(&outcomes, 4),
        Counts {
            prompts: 8,
            both_right: 1,
            engram_only: 5,
            host_only: 1,
            neither: 1
        }
    );
}

/// `engram greedy-examples --json` on a fitted tiny model: every prompt counted once, and
/// each example's Engram continuation is the text's tokens and the host's is not.
#[test]
fn greedy_examples_reports_counts_and_examples_that_hold() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, files, out) = fitted(tmp.path(), 3, 400, 60);
    let mut argv = vec![
        "greedy-examples",
        "--model",
        out.to_str().unwrap(),
        "--prompt-tokens",
        "8",
        "--new-tokens",
        "4",
        "--json",
    ];
    argv.extend(files.iter().map(|f| f.to_str().unwrap()));
    let (code, stdout, stderr) = engram(&argv);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let tok = tokenizers::Tokenizer::from_file(model.join("tokenizer.json")).unwrap();
    let texts: Vec<Vec<u32>> = files
        .iter()
        .map(|f| engram_cli::fit::data::tokenize_file(&tok, f).unwrap())
        .collect();
    let c = &v["counts"];
    let n = |k: &str| c[k].as_u64().unwrap() as usize;
    // Prompts start at 0, 8, 16, ... and need 8 + 4 tokens.
    let prompts: usize = texts.iter().map(|t| (t.len() - 12) / 8 + 1).sum();
    assert_eq!(n("prompts"), prompts, "{stdout}");
    assert_eq!(
        n("both_right") + n("engram_only") + n("host_only") + n("neither"),
        prompts
    );
    assert!(n("engram_only") > n("host_only"), "{stdout}");
    let examples = v["examples"].as_array().unwrap();
    assert_eq!(examples.len(), 3, "{stdout}");
    let ids = |e: &serde_json::Value, k: &str| -> Vec<u32> {
        e[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    for e in examples {
        let f = files
            .iter()
            .position(|p| p.file_name().unwrap().to_str() == e["file"].as_str())
            .unwrap();
        let at = e["token_offset"].as_u64().unwrap() as usize;
        assert_eq!(at % 8, 0);
        assert_eq!(ids(e, "prompt_ids"), texts[f][at..at + 8]);
        assert_eq!(ids(e, "engram_ids"), texts[f][at + 8..at + 12]);
        assert_ne!(ids(e, "host_ids"), texts[f][at + 8..at + 12]);
        assert_eq!(ids(e, "host_ids").len(), 4);
    }
}

/// `engram fit ARGS` as a child process whose files may not grow past `max_bytes`
/// (RLIMIT_FSIZE, with SIGXFSZ ignored so that a write past it fails with EFBIG, as a
/// write to a full disk fails with ENOSPC): (exit code, stderr).
fn fit_with_file_size_limit(a: &FitArgs, max_bytes: u64) -> (i32, String) {
    use std::os::unix::process::CommandExt;
    let s = |v: &dyn ToString| v.to_string();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_engram"));
    cmd.arg("fit")
        .arg("--model")
        .arg(&a.model)
        .arg("--out")
        .arg(&a.out)
        .arg("--corpus")
        .args(&a.corpus)
        .args([
            "--layers",
            &s(&a.layers[0]),
            "--max-ngram",
            &s(&a.max_ngram),
        ])
        .args(["--heads", &s(&a.heads), "--n-embed-per-ngram"])
        .args([s(&a.n_embed_per_ngram), "--vocab".into(), s(&a.vocab)])
        .args(["--seed", &s(&a.seed), "--window", &s(&a.window)])
        .args(["--batch", &s(&a.batch), "--steps", &s(&a.steps)])
        .args(["--lr", &s(&a.lr), "--table-lr", &s(&a.table_lr)])
        .args(["--table-init", &s(&a.table_init), "--save-every"])
        .args([s(&a.save_every), "--quiet".into()]);
    // SAFETY: setrlimit and signal are async-signal-safe; nothing else runs in the child.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: max_bytes,
                rlim_max: max_bytes,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().expect("exited, not killed by SIGXFSZ"),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// A save that fails for want of space is an error naming the file, leaves no checkpoint
/// under the final name, and the same command run again (with room) ends with the
/// checkpoint an undisturbed fit writes; so does a fit whose last write fails after its
/// state was saved.
#[test]
fn a_failed_save_is_a_clear_error_and_a_later_run_works() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, files, whole) = fitted(tmp.path(), 1, 200, 12);
    let bytes = |d: &Path| fs::read(d.join(ENGRAM_FILE)).unwrap();

    // The first state file (the table alone is about 0.5 MB) cannot be written.
    let out = tmp.path().join("out");
    let a = args(&model, &files, &out, 12);
    let (code, stderr) = fit_with_file_size_limit(&a, 16 * 1024);
    assert_ne!(code, 0, "{stderr}");
    assert!(
        stderr.contains("cannot write") && stderr.contains("fit-state-10.safetensors.partial"),
        "{stderr}"
    );
    assert!(stderr.contains("File too large"), "{stderr}");
    assert!(!out.exists());
    fit(&a).unwrap();
    assert!(
        bytes(&whole) == bytes(&out),
        "the fit after a failed save differs"
    );
    assert!(!partial_dir(&out).exists());
    // A `.partial` directory with files a fit does not write is not cleared.
    let foreign = tmp.path().join("foreign");
    fs::create_dir(partial_dir(&foreign)).unwrap();
    fs::write(partial_dir(&foreign).join("notes.txt"), "mine").unwrap();
    let err = fit(&args(&model, &files, &foreign, 12))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("holds no fit state") && err.contains("notes.txt"),
        "{err}"
    );
    assert!(partial_dir(&foreign).join("notes.txt").exists());

    // The state saved at step 10, then the checkpoint file cannot be written (a directory
    // stands in its temporary name's way).
    let late = tmp.path().join("late");
    let mut b = args(&model, &files, &late, 12);
    b.stop_after = Some(11);
    fit(&b).unwrap_err();
    b.stop_after = None;
    let obstacle = partial_dir(&late).join("engram.safetensors.partial");
    fs::create_dir(&obstacle).unwrap();
    let err = format!("{:#}", fit(&b).unwrap_err());
    assert!(
        err.contains("cannot write") && err.contains("engram.safetensors.partial"),
        "{err}"
    );
    assert!(!late.exists());
    fs::remove_dir(&obstacle).unwrap();
    fit(&b).unwrap();
    assert!(
        bytes(&whole) == bytes(&late),
        "the fit after a failed last write differs"
    );
}
