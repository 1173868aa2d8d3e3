//! `cargo xtask fit-demo`: an Engram adapter fitted to the Python 3.11 library docs on
//! frozen SmolLM2-135M-Instruct, then measured: perplexity and next-token accuracy on
//! files it was fitted on and on held-out files, host alone against host + Engram, through
//! `engram eval`. Writes docs/results/fit.json (docs/fit.md tells what the figures mean).
//!
//! The split (fixed, so results compare): the library's files sorted by name; held out
//! are those whose index is a multiple of 10, the others may be fitted on. Files under
//! 2 KiB are left out of every set (a few are a title and a table of contents, fewer
//! tokens than one window). What fits the compute of a shared 2-core machine in about ten
//! minutes is a small subset: the fit files whose index is 5 modulo 80 (4 files, about
//! 14,000 tokens), 40 steps of 8 windows of 128 tokens (about 3 epochs). Perplexities are
//! measured on those files and on the held-out files of at most 16 KiB (an evaluation
//! runs the whole model at about 270 tokens/s here). The fitted checkpoint is cached
//! under the model's cache like the demo's.
//!
//! Then greedy before/after (`engram greedy-examples`, its rule stated in docs/fit.md):
//! prompts of 32 tokens from every file fitted on and from the held-out files, 8 tokens
//! generated with the fitted Engram and without; the counts of which continuation is the
//! text's and the examples the rule picks, printed and written to
//! docs/results/fit-examples.json. `--examples-only` does just that step (and the fit,
//! when it is not cached).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::{corpus, e2e};

/// The fit's settings (besides model, corpus and output).
const FIT_ARGS: &[&str] = &[
    "--layers",
    "25",
    "--steps",
    "40",
    "--table-lr",
    "0.2",
    "--save-every",
    "40",
];
/// The checkpoint directory's name, under the cache root; a change of `FIT_ARGS` or of
/// the file rule needs a new name.
const CHECKPOINT: &str = "smollm2-135m-fitted-l25-s40";
/// `engram greedy-examples`' settings: prompt and continuation lengths, examples shown.
const GREEDY_ARGS: &[&str] = &[
    "--prompt-tokens",
    "32",
    "--new-tokens",
    "8",
    "--examples",
    "3",
];
/// Files smaller than this are in no set.
const MIN_BYTES: u64 = 2048;
/// Files larger than this are not evaluated on.
const EVAL_MAX_BYTES: u64 = 16 * 1024;

#[derive(clap::Args)]
pub struct FitDemoArgs {
    /// The library sources to use instead of the pinned download (their digest is
    /// recorded in the result).
    #[arg(long)]
    library: Option<PathBuf>,
    /// Where to write the result JSON.
    #[arg(long, default_value = "docs/results/fit.json")]
    out: PathBuf,
    /// A built patched mistral.rs host to use (default: `cargo xtask mistralrs-build`'s
    /// debug build, built on first use).
    #[arg(long)]
    host: Option<PathBuf>,
    /// Decode-speed runs per mode (alternating Engram on, off); the best of each counts.
    #[arg(long, default_value_t = 2)]
    repeats: usize,
    /// Where to write the greedy before/after examples.
    #[arg(long, default_value = "docs/results/fit-examples.json")]
    examples_out: PathBuf,
    /// Only the greedy before/after examples (after the fit, if it is not cached): no
    /// evaluation, no host, fit.json left as it is.
    #[arg(long)]
    examples_only: bool,
}

/// Largest relative difference (L2) the host's logits may have from `engram logits`.
const LOGITS_TOLERANCE: f64 = 1e-4;

fn read_f32(path: &Path) -> Result<Vec<f32>> {
    let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
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

/// The host's logits on the fitted checkpoint (a few doc prompts, two greedy steps each:
/// the prompt, then one decode step) against `engram logits` on the same ids, with and
/// without Engram; then decode and prefill tokens/s with the checkpoint, Engram on and off.
fn host_checks(
    host: &Path,
    engram: &Path,
    checkpoint: &Path,
    library: &Path,
    repeats: usize,
) -> Result<Value> {
    let scratch = tempfile_dir()?;
    let dump = scratch.join("host-logits.bin");
    let prompts = corpus::doc_prompts(library, 3, 300)?;
    let prompt_refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let mut args = e2e::host_args(
        checkpoint,
        &prompt_refs,
        2,
        &["--sequential", "--dump-logits"],
    );
    args.push(dump.display().to_string());
    eprintln!("xtask: the host's logits on the fitted checkpoint");
    let v = e2e::run_host(host, &args)?;
    let all = read_f32(&dump)?;
    let vocab = v["logits"]["vocab"]
        .as_u64()
        .context("no vocab in the host's logits")? as usize;
    let mut checks = Vec::new();
    let mut step = 0usize;
    let mine = scratch.join("mine.bin");
    for r in v["logits"]["requests"].as_array().context("no requests")? {
        let ids: Vec<u64> = r["context_ids"]
            .as_array()
            .context("context ids")?
            .iter()
            .filter_map(Value::as_u64)
            .collect();
        for n in r["context_len"]
            .as_array()
            .context("context lengths")?
            .iter()
            .filter_map(Value::as_u64)
        {
            let host_logits = &all[step * vocab..(step + 1) * vocab];
            step += 1;
            let ids_arg: Vec<String> = ids[..n as usize].iter().map(u64::to_string).collect();
            let mut rels = Vec::new();
            for no_engram in [false, true] {
                let mut cmd = Command::new(engram);
                cmd.arg("logits")
                    .arg("--model")
                    .arg(checkpoint)
                    .arg("--ids")
                    .arg(ids_arg.join(","))
                    .arg("--out")
                    .arg(&mine);
                if no_engram {
                    cmd.arg("--no-engram");
                }
                let status = cmd
                    .stdout(std::process::Stdio::null())
                    .status()
                    .context("cannot run engram logits")?;
                if !status.success() {
                    bail!("engram logits failed ({status})");
                }
                rels.push(rel_l2(host_logits, &read_f32(&mine)?));
            }
            checks.push(
                json!({"context_len": n, "rel_err": rels[0], "rel_diff_to_host_alone": rels[1]}),
            );
        }
    }
    let worst = checks
        .iter()
        .filter_map(|c| c["rel_err"].as_f64())
        .fold(0.0, f64::max);
    let _ = fs::remove_dir_all(&scratch);
    if worst > LOGITS_TOLERANCE {
        bail!("the host's logits differ from engram logits by {worst:.2e} relative (> {LOGITS_TOLERANCE:e}): {checks:?}");
    }
    let ([on, off], runs) = e2e::best_on_off(repeats, |extra| {
        eprintln!(
            "xtask: decode speed, Engram {}",
            if extra.is_empty() { "on" } else { "off" }
        );
        let a = e2e::host_args(checkpoint, &[e2e::BENCH_PROMPT], 64, extra);
        let out = e2e::run_host(host, &a)?;
        let o = &out["outputs"][0];
        Ok(
            json!({"engram": extra.is_empty(), "prefill_tok_per_s": o["prompt_tok_per_s"], "decode_tok_per_s": o["completion_tok_per_s"], "completion_tokens": o["completion_tokens"]}),
        )
    })?;
    let ratio = |k: &str| match (on[k].as_f64(), off[k].as_f64()) {
        (Some(a), Some(b)) if b > 0.0 => json!(a / b),
        _ => Value::Null,
    };
    Ok(json!({
        "host": host,
        "logits_tolerance": LOGITS_TOLERANCE,
        "logits_max_rel_err": worst,
        "logits_checks": checks,
        "decode_ratio": ratio("decode_tok_per_s"),
        "prefill_ratio": ratio("prefill_tok_per_s"),
        "engram_on": on,
        "engram_off": off,
        "runs": runs,
    }))
}

/// A fresh scratch directory under target/.
fn tempfile_dir() -> Result<PathBuf> {
    let dir = e2e::root().join("target").join("fit-demo-scratch");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The files of `library` (sorted by name) at index `i` with `keep(i)`, of
/// `MIN_BYTES..=max_bytes`.
fn files_where(
    library: &Path,
    max_bytes: u64,
    keep: impl Fn(usize) -> bool,
) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for (i, f) in corpus::sorted_files(library)?.into_iter().enumerate() {
        if keep(i) && (MIN_BYTES..=max_bytes).contains(&fs::metadata(&f)?.len()) {
            out.push(f);
        }
    }
    Ok(out)
}

fn run_json(cmd: &mut Command, what: &str) -> Result<Value> {
    eprintln!("xtask: {what}");
    let out = cmd.output().with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("{what}: output is not JSON"))
}

pub fn run(args: FitDemoArgs) -> Result<()> {
    let provenance = crate::provenance::provenance();
    let engram = e2e::ensure_cli(true)?;
    let model = e2e::ensure_model()?;
    let library = match &args.library {
        Some(dir) => dir.clone(),
        None => corpus::python_library_docs()?,
    };
    let digest = corpus::library_digest(&library)?;
    let fit_files = files_where(&library, u64::MAX, |i| i % 80 == 5)?;
    let fit_eval = files_where(&library, EVAL_MAX_BYTES, |i| i % 80 == 5)?;
    let heldout = files_where(&library, EVAL_MAX_BYTES, |i| i % 10 == 0)?;
    let checkpoint = crate::model::cache_root()?.join(CHECKPOINT);
    if !checkpoint.is_dir() {
        eprintln!(
            "xtask: fitting {} on {} files (minutes on 2 cores; resumable: run again after an interruption)",
            checkpoint.display(),
            fit_files.len()
        );
        let status = Command::new(&engram)
            .arg("fit")
            .arg("--model")
            .arg(&model)
            .arg("--out")
            .arg(&checkpoint)
            .args(FIT_ARGS)
            .arg("--corpus")
            .args(&fit_files)
            .status()
            .context("cannot run engram fit")?;
        if !status.success() {
            bail!("engram fit failed ({status})");
        }
    }
    if args.examples_only {
        return greedy_examples(
            &engram,
            &checkpoint,
            &fit_files,
            &heldout,
            &args.examples_out,
        );
    }
    let record: Value = serde_json::from_str(
        &fs::read_to_string(checkpoint.join("fit.json")).context("the fit's fit.json")?,
    )?;
    let report = &record["report"];
    let eval = |files: &[PathBuf], engram_on: bool, what: &str| -> Result<Value> {
        let mut cmd = Command::new(&engram);
        cmd.arg("eval")
            .arg("--model")
            .arg(&checkpoint)
            .arg("--json");
        if !engram_on {
            cmd.arg("--no-engram");
        }
        run_json(cmd.args(files), what)
    };
    let fit_host = eval(&fit_eval, false, "eval: fitted files, host alone")?;
    let fit_engram = eval(&fit_eval, true, "eval: fitted files, with Engram")?;
    let held_host = eval(&heldout, false, "eval: held-out files, host alone")?;
    let held_engram = eval(&heldout, true, "eval: held-out files, with Engram")?;
    let host = match &args.host {
        Some(h) => h.clone(),
        None => e2e::ensure_host(false)?,
    };
    let served = host_checks(&host, &engram, &checkpoint, &library, args.repeats)?;
    let names = |v: &[PathBuf]| -> Vec<String> {
        v.iter()
            .map(|p| p.file_name().unwrap_or_default().to_string_lossy().into())
            .collect()
    };
    let ppl = |v: &Value| v["ppl"].as_f64().unwrap_or(f64::NAN);
    let mut result = json!({
        "model": "SmolLM2-135M-Instruct",
        "corpus_sha256": digest,
        "fit_tokens": report["fit_tokens"],
        "checkpoint": checkpoint,
        "fit_ppl_host": ppl(&fit_host),
        "fit_ppl_engram": ppl(&fit_engram),
        "heldout_ppl_host": ppl(&held_host),
        "heldout_ppl_engram": ppl(&held_engram),
        "decode_ratio": served["decode_ratio"],
        "prefill_ratio": served["prefill_ratio"],
        "served": served,
        "fit_seconds": report["cache_seconds"].as_f64().unwrap_or(0.0) + report["step_seconds"].as_f64().unwrap_or(0.0),
        "fit_tokens_per_second": report["tokens_per_second"],
        "fit_settings": record["settings"],
        "fit_losses": report["losses"],
        "table_rows": report["table_rows"],
        "table_bytes": report["table_bytes"],
        "eval": {
            "fitted_files": {"files": names(&fit_eval), "host": fit_host, "engram": fit_engram},
            "heldout_files": {"files": names(&heldout), "host": held_host, "engram": held_engram},
        },
        "fit_files": names(&fit_files),
    });
    crate::provenance::stamp(&mut result, provenance);
    e2e::write_json(&args.out, &result)?;
    let change = |a: f64, b: f64| 100.0 * (b - a) / a;
    println!(
        "{:<24} {:>10} {:>12} {:>8}",
        "perplexity", "host", "host+Engram", "change"
    );
    for (name, h, e) in [
        ("fitted files", &fit_host, &fit_engram),
        ("held-out files", &held_host, &held_engram),
    ] {
        println!(
            "{:<24} {:>10.3} {:>12.3} {:>7.1}%",
            name,
            ppl(h),
            ppl(e),
            change(ppl(h), ppl(e))
        );
    }
    println!("wrote {}", args.out.display());
    greedy_examples(
        &engram,
        &checkpoint,
        &fit_files,
        &heldout,
        &args.examples_out,
    )
}

/// `engram greedy-examples` on the files fitted on and on the held-out ones: prints the
/// counts and the before/after of the examples, writes them with provenance to `out`.
fn greedy_examples(
    engram: &Path,
    checkpoint: &Path,
    fit_files: &[PathBuf],
    heldout: &[PathBuf],
    out: &Path,
) -> Result<()> {
    let provenance = crate::provenance::provenance();
    let run = |files: &[PathBuf], what: &str| -> Result<Value> {
        let mut cmd = Command::new(engram);
        cmd.arg("greedy-examples")
            .arg("--model")
            .arg(checkpoint)
            .args(GREEDY_ARGS)
            .arg("--json")
            .args(files);
        run_json(&mut cmd, what)
    };
    let fitted = run(fit_files, "greedy examples: the files fitted on")?;
    let heldout = run(heldout, "greedy examples: held-out files")?;
    let mut result = json!({
        "model": "SmolLM2-135M-Instruct",
        "checkpoint": checkpoint,
        "settings": GREEDY_ARGS,
        "fitted_files": fitted,
        "heldout_files": heldout,
    });
    crate::provenance::stamp(&mut result, provenance);
    e2e::write_json(out, &result)?;
    for (name, v) in [("files fitted on", &fitted), ("held-out files", &heldout)] {
        let c = &v["counts"];
        println!(
            "\ngreedy, {name}: {} prompts; the text's next {} tokens with Engram and without {}, \
             with Engram only {}, without only {}, neither {}",
            c["prompts"],
            v["new_tokens"],
            c["both_right"],
            c["engram_only"],
            c["host_only"],
            c["neither"]
        );
        for e in v["examples"].as_array().into_iter().flatten() {
            println!(
                "\n{} (token {}):\n  prompt:      {}\n  with Engram: {}\n  host alone:  {}",
                e["file"].as_str().unwrap_or_default(),
                e["token_offset"],
                e["prompt"],
                e["engram"],
                e["host"]
            );
        }
    }
    println!("wrote {}", out.display());
    Ok(())
}
