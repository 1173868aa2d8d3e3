//! End-to-end checks of mistral.rs with the `engram` feature, through the host binary on
//! a real model (SmolLM2-135M-Instruct, f32, CPU). Run by `cargo xtask mistralrs-test`,
//! which builds the hosts, fetches the model, writes the seeded Engram checkpoints and
//! passes their paths in `ENGRAM_E2E_*` variables (see `Setup`).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use engram_plugin::engram_core::metrics::{max_relative_diff, worst};
use serde_json::Value;

const POEM: &str = "Write a short poem about the sea.";
const CAPITAL: &str = "What is the capital of France?";
/// Prompts of different lengths: the engine steps them one length at a time, re-prefills
/// some, and decodes them together once they have caught up.
const PROMPTS: [&str; 3] = [
    "Hi.",
    CAPITAL,
    "Write a short poem about the sea, with rhymes, in four lines.",
];

/// Prompts of one token length: the engine prefills and decodes them as one batch from
/// the first step (the default scheduler batches the sequences of one length).
const SAME_LENGTH: [&str; 3] = [
    CAPITAL,
    "What is the capital of Spain?",
    "What is the capital of Italy?",
];

/// What `cargo xtask mistralrs-test` prepared.
struct Setup {
    host: PathBuf,
    /// The host built against the unmodified mistralrs-core 0.8.1; `None`: compare with
    /// this host's `--no-engram` instead.
    pristine: Option<PathBuf>,
    /// The `engram` command (for `check-trace`).
    engram: PathBuf,
    model: PathBuf,
    /// Seeded checkpoint whose value projection is exactly zero.
    zero: PathBuf,
    /// Seeded checkpoint whose Engram output is large: Engram decides the text.
    strong: PathBuf,
    /// Seeded checkpoint with the demo's value scale (the text stays the model's).
    seeded: PathBuf,
    /// Where `tiny-<arch>` models and their `-engram-zero` / `-engram-strong` checkpoints are.
    tiny_root: PathBuf,
    max_tokens: usize,
    scratch: PathBuf,
}

fn setup() -> Setup {
    let var = common::env_path;
    let scratch = common::scratch();
    Setup {
        host: PathBuf::from(env!("CARGO_BIN_EXE_engram-mistralrs-host")),
        pristine: std::env::var_os("ENGRAM_E2E_PRISTINE_HOST").map(PathBuf::from),
        engram: var("ENGRAM_E2E_ENGRAM"),
        model: var("ENGRAM_E2E_MODEL"),
        zero: var("ENGRAM_E2E_ZERO"),
        strong: var("ENGRAM_E2E_STRONG"),
        seeded: var("ENGRAM_E2E_SEEDED"),
        tiny_root: var("ENGRAM_E2E_TINY_ROOT"),
        max_tokens: common::max_tokens(),
        scratch,
    }
}

/// One run of a host: model directory, prompts, flags; returns its JSON summary and the
/// logits it dumped.
struct Run {
    summary: Value,
    logits: Logits,
}

fn run(host: &Path, model: &Path, prompts: &[&str], flags: &[&str], s: &Setup) -> Run {
    run_with_env(host, model, prompts, flags, s, &[])
}

fn run_with_env(
    host: &Path,
    model: &Path,
    prompts: &[&str],
    flags: &[&str],
    s: &Setup,
    env: &[(&str, &Path)],
) -> Run {
    let dump = tempfile_in(&s.scratch, "logits");
    let mut cmd = Command::new(host);
    cmd.arg("--model")
        .arg(model)
        .arg("--max-tokens")
        .arg(s.max_tokens.to_string())
        .arg("--json")
        .arg("--dump-logits")
        .arg(&dump)
        .args(flags);
    for p in prompts {
        cmd.arg("--prompt").arg(p);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("the host runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{} {:?} failed ({}):\n{stderr}",
        host.display(),
        cmd.get_args().collect::<Vec<_>>(),
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON from the host:\n{stdout}"));
    let summary: Value = serde_json::from_str(line).unwrap();
    let logits = Logits::read(&summary);
    let _ = std::fs::remove_file(&dump);
    Run { summary, logits }
}

/// A fresh path under `dir` (tests run in parallel).
fn tempfile_in(dir: &Path, what: &str) -> PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    dir.join(format!(
        "{what}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// The logits the sampler saw (`--dump-logits`): per request, per step.
struct Logits {
    raw: Vec<u8>,
    vocab: usize,
    /// Per request: (logits per step, greedy id per step).
    requests: Vec<(Vec<Vec<f32>>, Vec<u64>)>,
}

impl Logits {
    fn read(summary: &Value) -> Self {
        let l = &summary["logits"];
        let file = l["file"]
            .as_str()
            .expect("the summary names the logits file");
        let raw = std::fs::read(file).unwrap();
        let vocab = l["vocab"].as_u64().unwrap() as usize;
        let floats: Vec<f32> = raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let mut steps = floats.chunks_exact(vocab).map(<[f32]>::to_vec);
        let requests = l["requests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let n = r["steps"].as_u64().unwrap() as usize;
                let rows: Vec<Vec<f32>> = steps.by_ref().take(n).collect();
                assert_eq!(rows.len(), n, "{file}: fewer steps than the summary says");
                let ids = r["argmax_ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap())
                    .collect();
                (rows, ids)
            })
            .collect();
        Self {
            raw,
            vocab,
            requests,
        }
    }

    fn ids(&self, request: usize) -> &[u64] {
        &self.requests[request].1
    }
}

/// Largest `max|a - b| / max|b|` over the steps of one request (NaN if any step has a
/// NaN, or a step count differs).
fn max_rel_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    if a.len() != b.len() {
        return f64::NAN;
    }
    worst(a.iter().zip(b).map(|(x, y)| max_relative_diff(x, y)))
}

fn text(run: &Run, request: usize) -> String {
    run.summary["outputs"][request]["text"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The zero-value checkpoint `zero` of `model` through the patched host against `model`
/// without Engram through the reference host: the logits must be equal byte for byte.
fn assert_identity(s: &Setup, model: &Path, zero: &Path) {
    let with = run(&s.host, zero, &[POEM], &[], s);
    let without = match &s.pristine {
        // The prefix cache is off with Engram; turn it off in the reference too.
        Some(pristine) => run(pristine, model, &[POEM], &["--no-prefix-cache"], s),
        None => run(
            &s.host,
            zero,
            &[POEM],
            &["--no-engram", "--no-prefix-cache"],
            s,
        ),
    };
    let rows = with.summary["lookup_stats"][0]["stats"]["rows_fetched"]
        .as_u64()
        .unwrap_or(0);
    assert!(rows > 0, "Engram fetched no rows: it did not run");
    let steps = with.logits.requests[0].0.len();
    assert!(steps > 0);
    assert!(
        with.logits.raw == without.logits.raw,
        "{}: {steps} steps x {} logits differ from the reference host ({}): max rel diff {:.3e}",
        zero.display(),
        with.logits.vocab,
        if s.pristine.is_some() {
            "unpatched mistralrs-core"
        } else {
            "--no-engram"
        },
        max_rel_diff(&with.logits.requests[0].0, &without.logits.requests[0].0)
    );
}

#[test]
fn zero_value_engram_gives_the_unpatched_hosts_logits_bit_for_bit() {
    let s = setup();
    assert_identity(&s, &s.model, &s.zero);
}

/// With the KV cache (one new token per decode step) and without (every step from
/// position 0): same greedy ids, logits within 1e-4; and Engram does change the logits.
fn assert_kv_cache_equals_recompute(s: &Setup, strong: &Path) {
    let kv = run(&s.host, strong, &[POEM], &[], s);
    let recompute = run(&s.host, strong, &[POEM], &["--no-kv-cache"], s);
    let plain = run(&s.host, strong, &[POEM], &["--no-engram"], s);
    let (a, b) = (&kv.logits.requests[0], &recompute.logits.requests[0]);
    let rel = max_rel_diff(&a.0, &b.0);
    eprintln!(
        "{}: kv vs recompute: {} steps, max rel diff {rel:.3e}; text {:?}",
        strong.display(),
        a.0.len(),
        text(&kv, 0)
    );
    assert_eq!(a.1, b.1, "greedy ids differ");
    assert_eq!(a.0.len(), b.0.len());
    assert!(rel <= 1e-4, "max rel logit diff {rel:.3e} > 1e-4");
    let off = max_rel_diff(&plain.logits.requests[0].0, &a.0);
    assert!(
        off > 1e-2,
        "Engram changed the logits by only {off:.3e}: is it on?"
    );
}

#[test]
fn kv_cache_decode_equals_recomputing_the_whole_sequence() {
    let s = setup();
    assert_kv_cache_equals_recompute(&s, &s.strong);
}

/// `prompts` sent at once to `host` on `model` against each prompt alone: same greedy
/// ids, logits within 1e-4 relative. Returns the batched run.
fn assert_batch_equals_each_alone(s: &Setup, host: &Path, model: &Path, prompts: &[&str]) -> Run {
    let batch = run(host, model, prompts, &[], s);
    assert_eq!(batch.logits.requests.len(), prompts.len());
    for (i, p) in prompts.iter().enumerate() {
        let single = run(host, model, &[p], &[], s);
        let (x, y) = (&batch.logits.requests[i], &single.logits.requests[0]);
        let rel = max_rel_diff(&x.0, &y.0);
        eprintln!("[{i}] {} steps, max rel diff {rel:.3e}", y.0.len());
        assert_eq!(x.1, y.1, "prompt {i}: greedy ids differ");
        assert!(rel <= 1e-4, "prompt {i}: max rel logit diff {rel:.3e}");
    }
    batch
}

#[test]
fn concurrent_requests_equal_the_same_requests_one_at_a_time() {
    let s = setup();
    assert_batch_equals_each_alone(&s, &s.host, &s.strong, &PROMPTS);
}

/// Batched decode on the CPU: mistral.rs 0.8.1's single-query attention kernel kept one
/// scratch for the whole batch, so every sequence of a batched decode step got the last
/// one's attention (the plain model too); the patch gives each batch entry its own
/// (`attention/backends/cpu.rs`, docs/mistralrs.md).
#[test]
fn same_length_prompts_batched_equal_each_alone() {
    let s = setup();
    let batch = assert_batch_equals_each_alone(&s, &s.host, &s.strong, &SAME_LENGTH);
    let lengths: Vec<u64> = (0..SAME_LENGTH.len())
        .map(|i| {
            batch.summary["outputs"][i]["prompt_tokens"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(
        lengths.iter().all(|&n| n == lengths[0]),
        "the prompts must have one token length to be batched: {lengths:?}"
    );
}

/// The host run on `strong` with `ENGRAM_TRACE_DIR`, its trace checked by `engram
/// check-trace` against the reference forward on the same hidden states and ids.
fn assert_engram_matches_reference_inside_host(s: &Setup, strong: &Path) {
    let trace = tempfile_in(&s.scratch, "trace");
    let traced_run = run_with_env(
        &s.host,
        strong,
        &PROMPTS,
        &[],
        s,
        &[("ENGRAM_TRACE_DIR", &trace)],
    );
    assert_eq!(traced_run.logits.requests.len(), PROMPTS.len());
    let out = Command::new(&s.engram)
        .args(["check-trace", "--json", "--tolerance", "1e-5", "--model"])
        .arg(strong)
        .arg(&trace)
        .output()
        .expect("engram check-trace runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "check-trace printed no report ({e}):\n{stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    eprintln!(
        "check-trace: {} (sequence, layer) pairs, max rel err {:.3e}",
        report["checks"].as_array().map_or(0, Vec::len),
        report["max_rel_err"].as_f64().unwrap_or(f64::NAN)
    );
    assert!(
        out.status.success(),
        "the host's Engram outputs differ from the reference: {report:#}"
    );
    // Which tokens Engram saw, not only how many: every request's own token ids (its
    // prompt as the engine tokenized it, then every generated token but the last, sampled
    // after the final pass: the sampler's context at its last step) must be what one
    // traced sequence holds at every Engram layer, at positions 0, 1, 2, ... in its last
    // run (the engine may start a sequence again at position 0). Other sequences
    // (mistral.rs's warm-up request at load) may be there too.
    let traced = engram_plugin::trace::Trace::read(&trace).expect("the trace reads back");
    let last_runs: Vec<(u64, Vec<(Vec<u64>, Vec<u32>)>)> = traced
        .sequences
        .iter()
        .map(|(&seq, layers)| (seq, layers.iter().map(last_run).collect()))
        .collect();
    let mut unclaimed: Vec<bool> = vec![true; last_runs.len()];
    for i in 0..PROMPTS.len() {
        let ids: Vec<u32> = traced_run.summary["logits"]["requests"][i]["context_ids"]
            .as_array()
            .expect("the host reports each request's context ids")
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let o = &traced_run.summary["outputs"][i];
        let n = o["prompt_tokens"].as_u64().unwrap() + o["completion_tokens"].as_u64().unwrap() - 1;
        assert_eq!(
            ids.len() as u64,
            n,
            "request {i}: context ids vs the usage counts"
        );
        let positions: Vec<u64> = (0..n).collect();
        let found = last_runs.iter().enumerate().position(|(k, (_, layers))| {
            unclaimed[k]
                && layers.len() == traced.layer_ids.len()
                && layers.iter().all(|(p, t)| *p == positions && *t == ids)
        });
        let Some(k) = found else {
            let seen: Vec<String> = last_runs
                .iter()
                .map(|(seq, layers)| {
                    format!(
                        "sequence {seq}: {:?}",
                        layers
                            .iter()
                            .map(|(_, t)| &t[..t.len().min(12)])
                            .collect::<Vec<_>>()
                    )
                })
                .collect();
            panic!(
                "request {i}: no traced sequence holds its {n} token ids {:?}... at positions \
                 0..{n} at every Engram layer; traced:\n{}",
                &ids[..ids.len().min(12)],
                seen.join("\n")
            );
        };
        unclaimed[k] = false;
    }
    let _ = std::fs::remove_dir_all(&trace);
}

/// The positions and token ids of a layer's last run (from its last position 0 on).
fn last_run(layer: &engram_plugin::trace::LayerTrace) -> (Vec<u64>, Vec<u32>) {
    let start = layer.positions.iter().rposition(|&p| p == 0).unwrap_or(0);
    (
        layer.positions[start..].to_vec(),
        layer.tokens[start..].to_vec(),
    )
}

#[test]
fn engram_layers_inside_the_host_equal_the_reference_forward() {
    let s = setup();
    assert_engram_matches_reference_inside_host(&s, &s.strong);
}

/// A tiny random model of another architecture whose layer loop the patch hooks:
/// identity, KV cache vs recompute, and the in-host reference check.
fn other_architecture(arch: &str) {
    let s = setup();
    let model = s.tiny_root.join(format!("tiny-{arch}"));
    let zero = s.tiny_root.join(format!("tiny-{arch}-engram-zero"));
    let strong = s.tiny_root.join(format!("tiny-{arch}-engram-strong"));
    assert_identity(&s, &model, &zero);
    assert_kv_cache_equals_recompute(&s, &strong);
    assert_engram_matches_reference_inside_host(&s, &strong);
}

#[test]
fn mistral_architecture() {
    other_architecture("mistral");
}

#[test]
fn qwen2_architecture() {
    other_architecture("qwen2");
}

#[test]
fn qwen3_architecture() {
    other_architecture("qwen3");
}

#[test]
fn greedy_token_ids_snapshot() {
    let s = setup();
    let mut snap = String::new();
    for (name, dir, prompt) in [("seeded", &s.seeded, CAPITAL), ("strong", &s.strong, POEM)] {
        let r = run(&s.host, dir, &[prompt], &[], &s);
        snap.push_str(&format!(
            "{name} checkpoint, prompt {prompt:?}:\nids {}\ntext {:?}\n",
            serde_json::to_string(r.logits.ids(0)).unwrap(),
            text(&r, 0)
        ));
    }
    let mut settings = insta::Settings::clone_current();
    if let Some(dir) = std::env::var_os("ENGRAM_E2E_SNAPSHOTS") {
        settings.set_snapshot_path(PathBuf::from(dir));
    }
    settings.set_prepend_module_to_snapshot(false);
    settings.set_description(format!(
        "SmolLM2-135M-Instruct (cargo xtask fetch-model), f32, CPU, {} tokens; checkpoints \
         from `engram init-checkpoint` as cargo xtask mistralrs-test writes them",
        s.max_tokens
    ));
    settings.bind(|| insta::assert_snapshot!("greedy_ids", snap));
}

/// `engram logits` (the forward `engram fit` trains and `engram eval` measures) on `ids`:
/// the last position's logits.
fn fit_forward_logits(s: &Setup, model: &Path, ids: &[u64], no_engram: bool) -> Vec<f32> {
    let out = tempfile_in(&s.scratch, "fit-logits");
    let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
    let mut cmd = Command::new(&s.engram);
    cmd.arg("logits")
        .arg("--model")
        .arg(model)
        .arg("--ids")
        .arg(ids.join(","))
        .arg("--out")
        .arg(&out);
    if no_engram {
        cmd.arg("--no-engram");
    }
    let done = cmd.output().expect("engram logits runs");
    assert!(
        done.status.success(),
        "engram logits failed: {}",
        String::from_utf8_lossy(&done.stderr)
    );
    let raw = std::fs::read(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    raw.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// A checkpoint `engram fit` wrote (a few steps on a short text) is served by the host as
/// the fit computes it: the sampler's logits (the prompt's last position, then one decode
/// step) equal `engram logits` on the same ids within 1e-4 relative, while the host
/// alone differs from them by more.
#[test]
fn a_fitted_checkpoint_serves_the_fit_forwards_logits() {
    let s = setup();
    let text = s.scratch.join("fit-text.txt");
    let paragraph = "The capital of France is Paris. The sea is wide and deep, and the \
                     waves roll in at night. Write a short poem about the sea. ";
    std::fs::write(&text, paragraph.repeat(8)).unwrap();
    let fitted = tempfile_in(&s.scratch, "fitted");
    let out = Command::new(&s.engram)
        .args([
            "fit", "--quiet", "--layers", "25", "--steps", "4", "--window", "32",
        ])
        .args([
            "--batch",
            "2",
            "--vocab",
            "2000",
            "--table-lr",
            "0.5",
            "--model",
        ])
        .arg(&s.model)
        .arg("--corpus")
        .arg(&text)
        .arg("--out")
        .arg(&fitted)
        .output()
        .expect("engram fit runs");
    assert!(
        out.status.success(),
        "engram fit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut one = setup();
    one.max_tokens = 2;
    let r = run(&s.host, &fitted, &[CAPITAL, POEM], &["--sequential"], &one);
    let requests = r.summary["logits"]["requests"].as_array().unwrap();
    let mut checked = 0;
    for (req, (steps, _)) in requests.iter().zip(&r.logits.requests) {
        let ids: Vec<u64> = req["context_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        let lens = req["context_len"].as_array().unwrap();
        for (host_logits, len) in steps.iter().zip(lens) {
            let ids = &ids[..len.as_u64().unwrap() as usize];
            let fit = fit_forward_logits(&s, &fitted, ids, false);
            let alone = fit_forward_logits(&s, &fitted, ids, true);
            let (err, engram_effect) = (rel_l2(host_logits, &fit), rel_l2(&alone, &fit));
            eprintln!(
                "context {}: host vs fit forward {err:.2e}, Engram's effect {engram_effect:.2e}",
                ids.len()
            );
            assert!(err <= 1e-4, "host vs engram logits: {err:.3e} relative");
            assert!(
                engram_effect > 10.0 * err.max(1e-6),
                "the fitted layer changes the logits too little ({engram_effect:.2e}) for this check to mean anything"
            );
            checked += 1;
        }
    }
    assert!(checked >= 2, "only {checked} steps checked");
}
