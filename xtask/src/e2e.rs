//! End-to-end tasks through the patched mistral.rs host (`engram-mistralrs-host`):
//! `cargo xtask mistralrs-test` (checks that print PASS/FAIL with their numbers) and
//! `cargo xtask bench-e2e` (tokens/s with Engram on and off), plus the pieces
//! `cargo xtask demo` shares: building the `engram` CLI and the host, fetching the model
//! and writing the seeded Engram checkpoints, all cached.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use serde_json::{json, Value};

use crate::mistralrs::MistralrsBuildArgs;

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

/// Builds `engram` (engram-cli, release) and returns the binary.
pub fn ensure_cli() -> Result<PathBuf> {
    eprintln!("xtask: building the engram CLI (release)");
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "-p", "engram-cli", "--bin", "engram"])
        .current_dir(root())
        .status()
        .context("cannot run cargo")?;
    if !status.success() {
        bail!("cargo build --release -p engram-cli failed ({status})");
    }
    Ok(root()
        .join("target")
        .join("release")
        .join(format!("engram{}", std::env::consts::EXE_SUFFIX)))
}

/// Runs the `cargo xtask mistralrs-build` code path (fetch, patch, build; incremental) and
/// returns the host binary.
pub fn ensure_host(release: bool) -> Result<PathBuf> {
    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        build: MistralrsBuildArgs,
    }
    let mut argv = vec!["mistralrs-build"];
    if release {
        argv.push("--release");
    }
    let wrap = Wrap::try_parse_from(argv)?;
    eprintln!("xtask: building the patched mistral.rs host (cargo xtask mistralrs-build)");
    crate::mistralrs::run(wrap.build)?;
    Ok(host_bin(release, "engram-mistralrs-host"))
}

fn host_bin(release: bool, name: &str) -> PathBuf {
    root()
        .join("target")
        .join("mistralrs-build")
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
}

/// The converted SmolLM2-135M-Instruct directory (fetched and converted on first use).
pub fn ensure_model() -> Result<PathBuf> {
    eprintln!("xtask: model (cargo xtask fetch-model; cached after the first run)");
    crate::model::fetch_model(false)
}

/// A seeded Engram checkpoint beside the model: `name` under the model's cache folder,
/// written by `engram init-checkpoint --model MODEL --out DIR EXTRA...` on first use.
/// `.xtask-init-args` in it records the arguments; a directory without it (written by
/// hand with the same command) is kept when `engram inspect` accepts it.
pub fn ensure_checkpoint(
    engram: &Path,
    model: &Path,
    name: &str,
    extra: &[&str],
) -> Result<PathBuf> {
    let out = model
        .parent()
        .context("model directory without a parent")?
        .join(name);
    let stamp = out.join(".xtask-init-args");
    let want = extra.join(" ");
    let inspect_ok = || {
        out.join("engram.safetensors").is_file()
            && Command::new(engram)
                .arg("inspect")
                .arg(&out)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
    };
    match fs::read_to_string(&stamp) {
        Ok(s) if s == want && inspect_ok() => {
            eprintln!("xtask: checkpoint {} (cached)", out.display());
            return Ok(out);
        }
        Err(_) if inspect_ok() => {
            eprintln!(
                "xtask: checkpoint {} (cached, written before this task recorded its arguments; \
                 assumed to be `init-checkpoint {want}`)",
                out.display()
            );
            fs::write(&stamp, &want)?;
            return Ok(out);
        }
        _ => {}
    }
    let _ = fs::remove_file(&stamp);
    eprintln!(
        "xtask: writing the Engram checkpoint {} (engram init-checkpoint {want})",
        out.display()
    );
    let status = Command::new(engram)
        .arg("init-checkpoint")
        .arg("--model")
        .arg(model)
        .arg("--out")
        .arg(&out)
        .args(extra)
        .status()
        .context("cannot run engram init-checkpoint")?;
    if !status.success() {
        bail!("engram init-checkpoint failed ({status})");
    }
    fs::write(&stamp, &want)?;
    Ok(out)
}

/// The demo checkpoint: layers 1 and 15, orders 2-3, 8 heads, 512 per order, vocab 646400
/// (about 2.6 GB of bf16 tables), value scale 0.01.
pub const DEMO: (&str, &[&str]) = ("engram-demo", &[]);
/// The same tables with an exactly zero value projection: Engram adds exactly zero.
pub const ZERO: (&str, &[&str]) = ("engram-demo-zero", &["--zero-value"]);
/// Small tables, large Engram output: Engram visibly changes the text.
pub const STRONG: (&str, &[&str]) = (
    "engram-strong",
    &["--value-scale", "2.0", "--vocab", "20000"],
);

/// One run of the host with `--json`; returns its JSON summary.
pub fn run_host(host: &Path, args: &[String]) -> Result<Value> {
    let started = Instant::now();
    let out = Command::new(host)
        .args(args)
        .arg("--json")
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {}", host.display()))?;
    if !out.status.success() {
        bail!(
            "{} {} failed ({})",
            host.display(),
            args.join(" "),
            out.status
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("no JSON from the host: {text}"))?;
    let v: Value = serde_json::from_str(line)?;
    eprintln!(
        "xtask:   host {} ({:.1} s)",
        args.join(" "),
        started.elapsed().as_secs_f64()
    );
    Ok(v)
}

fn s(x: impl AsRef<std::ffi::OsStr>) -> String {
    x.as_ref().to_string_lossy().into_owned()
}

fn host_args(model: &Path, prompts: &[&str], max_tokens: usize, extra: &[&str]) -> Vec<String> {
    let mut v = vec!["--model".to_string(), s(model)];
    for p in prompts {
        v.push("--prompt".into());
        v.push(p.to_string());
    }
    v.push("--max-tokens".into());
    v.push(max_tokens.to_string());
    v.extend(extra.iter().map(|x| x.to_string()));
    v
}

/// Logits dumped by `--dump-logits`: per request, per step, `vocab` values.
struct Logits {
    vocab: usize,
    /// Per request: per step, the logits; and the greedy ids.
    requests: Vec<(Vec<Vec<f32>>, Vec<u64>)>,
    raw: Vec<u8>,
}

fn read_logits(summary: &Value) -> Result<Logits> {
    let l = &summary["logits"];
    let file = l["file"]
        .as_str()
        .context("no logits in the host's output")?;
    let raw = fs::read(file).with_context(|| format!("reading {file}"))?;
    let vocab = l["vocab"].as_u64().unwrap_or(0) as usize;
    let floats: Vec<f32> = raw
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut at = 0;
    let mut requests = Vec::new();
    for r in l["requests"].as_array().into_iter().flatten() {
        let steps = r["steps"].as_u64().unwrap_or(0) as usize;
        let mut rows = Vec::new();
        for _ in 0..steps {
            rows.push(floats[at..at + vocab].to_vec());
            at += vocab;
        }
        let ids = r["argmax_ids"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_u64)
            .collect();
        requests.push((rows, ids));
    }
    Ok(Logits {
        vocab,
        requests,
        raw,
    })
}

/// Largest `max|a - b| / max|b|` over the steps both have.
fn max_rel_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    let mut worst = 0f64;
    for (x, y) in a.iter().zip(b) {
        let scale = y.iter().fold(0f64, |m, v| m.max(v.abs() as f64)).max(1e-30);
        let diff = x
            .iter()
            .zip(y)
            .fold(0f64, |m, (p, q)| m.max((*p as f64 - *q as f64).abs()));
        worst = worst.max(diff / scale);
    }
    worst
}

#[derive(clap::Args)]
pub struct TestArgs {
    /// Write mistralrs-host/snapshots/greedy_ids.snap from this run instead of comparing.
    #[arg(long)]
    update_snapshot: bool,
    /// Identity reference: `pristine` builds a second host against the unmodified
    /// mistralrs-core 0.8.1 from crates.io (no patch); `no-engram` compares against the
    /// patched host with the Engram config hidden (`--no-engram`: no runtime is opened).
    #[arg(long, default_value = "pristine")]
    reference: String,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
}

const SNAPSHOT: &str = "mistralrs-host/snapshots/greedy_ids.snap";
const SNAPSHOT_PROMPT: &str = "What is the capital of France?";
const POEM_PROMPT: &str = "Write a short poem about the sea.";

pub fn test(args: TestArgs) -> Result<()> {
    let engram = ensure_cli()?;
    let model = ensure_model()?;
    let host = ensure_host(false)?;
    let demo = ensure_checkpoint(&engram, &model, DEMO.0, DEMO.1)?;
    let zero = ensure_checkpoint(&engram, &model, ZERO.0, ZERO.1)?;
    let strong = ensure_checkpoint(&engram, &model, STRONG.0, STRONG.1)?;
    let reference = match args.reference.as_str() {
        "pristine" => Some(ensure_pristine_host()?),
        "no-engram" => None,
        other => bail!("--reference {other:?}: pristine or no-engram"),
    };
    let dump = std::env::temp_dir().join(format!("engram-e2e-{}", std::process::id()));
    fs::create_dir_all(&dump)?;
    let n = args.max_tokens;
    let mut results: Vec<(String, bool, String)> = Vec::new();
    let mut record = |name: &str, pass: bool, detail: String| {
        println!("{} {name}: {detail}", if pass { "PASS" } else { "FAIL" });
        results.push((name.to_string(), pass, detail));
    };
    let dump_arg = |f: &str| vec!["--dump-logits".to_string(), s(dump.join(f))];

    // a. Identity.
    {
        let prompt = POEM_PROMPT;
        let mut a = host_args(&zero, &[prompt], n, &[]);
        a.extend(dump_arg("zero.f32"));
        let with = run_host(&host, &a)?;
        let (ref_host, ref_model, ref_extra, ref_name) = match &reference {
            Some(p) => (
                p.clone(),
                model.clone(),
                vec!["--no-prefix-cache"],
                "unpatched mistralrs-core 0.8.1, prefix cache off as with Engram",
            ),
            None => (
                host.clone(),
                zero.clone(),
                vec!["--no-engram", "--no-prefix-cache"],
                "patched host, --no-engram, prefix cache off as with Engram",
            ),
        };
        let mut b = host_args(&ref_model, &[prompt], n, &ref_extra);
        b.extend(dump_arg("ref.f32"));
        let without = run_host(&ref_host, &b)?;
        let (x, y) = (read_logits(&with)?, read_logits(&without)?);
        let rows = with["lookup_stats"][0]["stats"]["rows_fetched"]
            .as_u64()
            .unwrap_or(0);
        let same = !x.raw.is_empty() && x.raw == y.raw;
        let steps = x.requests.first().map_or(0, |r| r.0.len());
        record(
            "a identity (zero-value checkpoint vs reference)",
            same && rows > 0,
            format!(
                "reference: {ref_name}; {steps} steps x {} logits, bit-identical: {same}, \
                 max rel diff {:.3e}; Engram rows fetched {rows}",
                x.vocab,
                max_rel_diff(
                    &x.requests.first().map(|r| r.0.clone()).unwrap_or_default(),
                    &y.requests.first().map(|r| r.0.clone()).unwrap_or_default()
                )
            ),
        );
    }

    // b. KV cache vs recompute, Engram strong.
    {
        let prompt = POEM_PROMPT;
        let mut a = host_args(&strong, &[prompt], n, &[]);
        a.extend(dump_arg("kv.f32"));
        let kv_run = run_host(&host, &a)?;
        let kv = read_logits(&kv_run)?;
        let mut b = host_args(&strong, &[prompt], n, &["--no-kv-cache"]);
        b.extend(dump_arg("nokv.f32"));
        let nokv = read_logits(&run_host(&host, &b)?)?;
        // Engram changes the text: compare with the same prompt without Engram.
        let plain = run_host(&host, &host_args(&strong, &[prompt], n, &["--no-engram"]))?;
        let (k, r) = (&kv.requests[0], &nokv.requests[0]);
        let rel = max_rel_diff(&k.0, &r.0);
        let same_len = k.0.len() == r.0.len();
        let plain_text = plain["outputs"][0]["text"].as_str().unwrap_or_default();
        let engram_text = kv_run["outputs"][0]["text"].as_str().unwrap_or_default();
        record(
            "b kv-cache vs --no-kv-cache (strong Engram)",
            same_len && k.1 == r.1 && rel <= 1e-4,
            format!(
                "{} vs {} steps, same greedy ids: {}, max rel diff {rel:.3e} (limit 1e-4); \
                 Engram changes the text: {} ({engram_text:?} vs without Engram {plain_text:?})",
                k.0.len(),
                r.0.len(),
                k.1 == r.1,
                engram_text != plain_text
            ),
        );
    }

    // c. Concurrent requests of different lengths vs one at a time.
    {
        let prompts = [
            "Hi.",
            "What is the capital of France?",
            "Write a short poem about the sea, with rhymes, in four lines.",
        ];
        let mut a = host_args(&strong, &prompts, n, &[]);
        a.extend(dump_arg("batch.f32"));
        let batch_run = run_host(&host, &a)?;
        let batch = read_logits(&batch_run)?;
        let mut ok = batch.requests.len() == prompts.len();
        let mut worst = 0f64;
        let mut details = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let mut b = host_args(&strong, &[p], n, &[]);
            b.extend(dump_arg(&format!("single{i}.f32")));
            let single = read_logits(&run_host(&host, &b)?)?;
            let (x, y) = (&batch.requests[i], &single.requests[0]);
            let rel = max_rel_diff(&x.0, &y.0);
            worst = worst.max(rel);
            let same = x.1 == y.1;
            ok &= same && rel <= 1e-4;
            details.push(format!(
                "[{i}] {} ids same: {same} rel {rel:.1e}",
                y.1.len()
            ));
        }
        record(
            "c concurrent vs one at a time (strong Engram, 3 prompt lengths)",
            ok,
            format!("{}; max rel diff {worst:.3e}", details.join(", ")),
        );
    }

    // d. Snapshot of the greedy ids with the seeded demo checkpoint.
    {
        // The demo checkpoint (value scale 0.01: the text of the plain model) and the strong
        // one (Engram decides the text), so the snapshot also pins Engram's own numbers.
        let mut snap = format!(
            "---\nsource: cargo xtask mistralrs-test\nexpression: greedy token ids (argmax of \
             the dumped logits at each step)\nmodel: SmolLM2-135M-Instruct (cargo xtask \
             fetch-model), f32, CPU\nmax_tokens: {n}\n---\n"
        );
        let mut texts = Vec::new();
        for (dir, (name, init), prompt) in [
            (&demo, DEMO, SNAPSHOT_PROMPT),
            (&strong, STRONG, POEM_PROMPT),
        ] {
            let mut a = host_args(dir, &[prompt], n, &[]);
            a.extend(dump_arg("snap.f32"));
            let run = run_host(&host, &a)?;
            let ids = read_logits(&run)?.requests[0].1.clone();
            texts.push(format!(
                "{:?}",
                run["outputs"][0]["text"].as_str().unwrap_or_default()
            ));
            snap.push_str(&format!(
                "# {name} (engram init-checkpoint {}; defaults otherwise: layers 1,15; \
                 orders 2-3; 8 heads; 512 per order; vocab 646400; seed 0; value scale \
                 0.01), prompt {prompt:?}\n{}\n",
                init.join(" "),
                serde_json::to_string(&ids)?
            ));
        }
        let ids = snap.lines().filter(|l| l.starts_with('[')).count();
        let text = texts.join(", ");
        let path = root().join(SNAPSHOT);
        if args.update_snapshot {
            fs::create_dir_all(path.parent().unwrap())?;
            fs::write(&path, &snap)?;
            record(
                "d greedy-id snapshot",
                true,
                format!("written {} ({ids} runs): {text}", path.display()),
            );
        } else {
            match fs::read_to_string(&path) {
                Ok(old) => {
                    let same = old == snap;
                    record(
                        "d greedy-id snapshot",
                        same,
                        if same {
                            format!("{ids} runs match {SNAPSHOT}: {text}")
                        } else {
                            format!("differs from {SNAPSHOT}; now:\n{snap}")
                        },
                    );
                }
                Err(_) => record(
                    "d greedy-id snapshot",
                    false,
                    format!("no {SNAPSHOT}: run with --update-snapshot first"),
                ),
            }
        }
    }

    let _ = fs::remove_dir_all(&dump);
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| !r.1)
        .map(|r| r.0.as_str())
        .collect();
    println!(
        "{} of {} checks passed",
        results.len() - failed.len(),
        results.len()
    );
    if !failed.is_empty() {
        bail!("failed: {}", failed.join("; "));
    }
    Ok(())
}

/// Builds `engram-mistralrs-host-pristine`: the same `src/main.rs` against the unmodified
/// mistralrs-core 0.8.1 from crates.io (no patch, no `engram` feature). The host calls
/// `mistralrs_core::engram::stats()`, which only the patched crate has, so here
/// `mistralrs_core` is a generated shim crate that re-exports the real crate and adds an
/// `engram` module whose `stats()` is empty. Same target directory and profile as the
/// patched host, so only mistralrs-core, mistralrs and the binary are built again.
pub fn ensure_pristine_host() -> Result<PathBuf> {
    let root = root();
    let build = root.join("target").join("mistralrs-build");
    let dir = build.join("pristine");
    let shim = dir.join("shim");
    fs::create_dir_all(&shim)?;
    let plugin = root.join("engram-plugin");
    let main_rs = root.join("mistralrs-host").join("src").join("main.rs");
    let p = |x: &Path| x.display().to_string().replace('\\', "/");
    write_if_changed(
        &shim.join("Cargo.toml"),
        &format!(
            "[package]\nname = \"engram-pristine-core-shim\"\nversion = \"0.8.1\"\nedition = \"2021\"\npublish = false\n\n\
             [lib]\npath = \"lib.rs\"\n\n\
             [dependencies]\nmistralrs-core-real = {{ package = \"mistralrs-core\", version = \"=0.8.1\" }}\n\
             engram-plugin = {{ path = \"{}\" }}\n",
            p(&plugin)
        ),
    )?;
    write_if_changed(
        &shim.join("lib.rs"),
        "//! Generated by `cargo xtask mistralrs-test`: the unmodified mistralrs-core plus an\n\
         //! empty `engram` module, so the host's source builds against it.\n\
         pub use mistralrs_core_real::*;\n\
         pub mod engram {\n    pub use engram_plugin::LookupStats;\n    \
         pub fn stats() -> Vec<(String, LookupStats)> {\n        Vec::new()\n    }\n}\n",
    )?;
    let host_manifest = fs::read_to_string(build.join("host").join("Cargo.toml"))
        .context("run cargo xtask mistralrs-build first")?;
    let profile = host_manifest
        .split("[profile.dev]")
        .nth(1)
        .map(|t| format!("[profile.dev]{t}"))
        .unwrap_or_default();
    write_if_changed(
        &dir.join("Cargo.toml"),
        &format!(
            "# Generated by `cargo xtask mistralrs-test`: the host against unmodified mistralrs-core.\n\
             [package]\nname = \"engram-mistralrs-host-pristine\"\nversion = \"0.1.0\"\nedition = \"2021\"\npublish = false\n\n\
             [[bin]]\nname = \"engram-mistralrs-host-pristine\"\npath = \"{}\"\n\n\
             [dependencies]\nmistralrs = \"=0.8.1\"\n\
             mistralrs-core = {{ package = \"engram-pristine-core-shim\", path = \"shim\" }}\n\
             engram-plugin = {{ path = \"{}\" }}\nanyhow = \"1\"\n\
             clap = {{ version = \"4.5\", features = [\"derive\"] }}\nserde_json = \"1\"\n\
             tokio = {{ version = \"1\", features = [\"rt-multi-thread\", \"macros\"] }}\n\n\
             [workspace]\nmembers = [\"shim\"]\n\n{profile}",
            p(&main_rs),
            p(&plugin)
        ),
    )?;
    let lock = dir.join("Cargo.lock");
    if !lock.exists() {
        fs::copy(build.join("host").join("Cargo.lock"), &lock)?;
    }
    eprintln!("xtask: building the reference host against unmodified mistralrs-core 0.8.1");
    let status = Command::new(env!("CARGO"))
        .arg("build")
        .arg("--manifest-path")
        .arg(dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(build.join("target"))
        .status()?;
    if !status.success() {
        bail!("building the pristine reference host failed ({status})");
    }
    Ok(host_bin(false, "engram-mistralrs-host-pristine"))
}

fn write_if_changed(path: &Path, text: &str) -> Result<()> {
    if fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(());
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Use the release build of the host (`cargo xtask mistralrs-build --release`; long
    /// first build). Default: the debug build (numeric crates optimized, see docs).
    #[arg(long)]
    release: bool,
    /// Tokens generated.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Runs per mode (alternating on, off); the best tokens/s of each is reported.
    #[arg(long, default_value_t = 2)]
    repeats: usize,
}

pub fn bench(args: BenchArgs) -> Result<()> {
    let engram = ensure_cli()?;
    let model = ensure_model()?;
    let host = ensure_host(args.release)?;
    let demo = ensure_checkpoint(&engram, &model, DEMO.0, DEMO.1)?;
    let prompt = "Explain in detail how a steam engine works, from the boiler and the \
                  firebox to the piston, the valve gear and the flywheel, and why it was \
                  so important for the industrial revolution in Britain and elsewhere.";
    let mut best: [Option<Value>; 2] = [None, None];
    let mut runs = Vec::new();
    for _ in 0..args.repeats.max(1) {
        for (i, extra) in [&[][..], &["--no-engram"][..]].iter().enumerate() {
            let v = run_host(&host, &host_args(&demo, &[prompt], args.max_tokens, extra))?;
            let o = &v["outputs"][0];
            let row = json!({
                "engram": i == 0,
                "prefill_tok_per_s": o["prompt_tok_per_s"],
                "decode_tok_per_s": o["completion_tok_per_s"],
                "prompt_tokens": o["prompt_tokens"],
                "completion_tokens": o["completion_tokens"],
                "lookup_stats": v["lookup_stats"][0]["stats"],
            });
            let better = best[i]
                .as_ref()
                .is_none_or(|b| row["decode_tok_per_s"].as_f64() > b["decode_tok_per_s"].as_f64());
            if better {
                best[i] = Some(row.clone());
            }
            runs.push(row);
        }
    }
    let [on, off] = best.map(Option::unwrap_or_default);
    let ratio = |k: &str| match (on[k].as_f64(), off[k].as_f64()) {
        (Some(a), Some(b)) if a > 0.0 => json!(b / a),
        _ => Value::Null,
    };
    let out = json!({
        "model": "SmolLM2-135M-Instruct, f32, CPU",
        "checkpoint": "engram-demo (layers 1,15; orders 2-3; 8 heads; 512/order; vocab 646400; bf16 tables, mmap)",
        "profile": if args.release { "release" } else { "debug (numeric crates opt-level 3)" },
        "max_tokens": args.max_tokens,
        "engram_on": on,
        "engram_off": off,
        "decode_overhead_ratio_off_over_on": ratio("decode_tok_per_s"),
        "prefill_overhead_ratio_off_over_on": ratio("prefill_tok_per_s"),
        "runs": runs,
    });
    println!("{out}");
    Ok(())
}
