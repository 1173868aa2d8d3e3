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
use engram_cli::fit::eval::{eval, load_engram, EvalArgs};
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
    let model = tiny_model(tmp.path());
    let files = corpus(tmp.path(), 2, 200);
    let out = tmp.path().join("fit0");
    fit(&args(&model, &files, &out, 0)).unwrap();
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
    let model = tiny_model(tmp.path());
    let files = corpus(tmp.path(), 2, 300);
    let out = tmp.path().join("fit");
    fit(&args(&model, &files, &out, 20)).unwrap();
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
