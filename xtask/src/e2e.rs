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
use crate::tiny_models::{ensure_tiny_model, TinyArch};

/// The repository root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask has a parent directory")
        .to_path_buf()
}

/// Builds `engram` (engram-cli) and returns the binary. The checks use the debug build,
/// which `cargo test --workspace` has already built; the demo and benchmarks the release
/// build (writing the demo's 2.6 GB of tables).
pub fn ensure_cli(release: bool) -> Result<PathBuf> {
    let profile = if release { "release" } else { "debug" };
    eprintln!("xtask: building the engram CLI ({profile})");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.args(["build", "-p", "engram-cli", "--bin", "engram"])
        .current_dir(root());
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().context("cannot run cargo")?;
    if !status.success() {
        bail!("cargo build -p engram-cli ({profile}) failed ({status})");
    }
    // Where cargo put it: `CARGO_TARGET_DIR` when set (relative to the root), else target/.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .filter(|v| !v.is_empty())
        .map_or_else(|| root().join("target"), |d| root().join(d));
    Ok(target
        .join(profile)
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

/// [`ensure_host`] with `--cli`: also builds mistral.rs's own CLI with the feature; returns
/// the `mistralrs` binary.
pub fn ensure_host_and_cli(release: bool) -> Result<PathBuf> {
    let args = MistralrsBuildArgs {
        release,
        cli: true,
        ..Default::default()
    };
    eprintln!("xtask: building the patched host and mistral.rs's CLI (mistralrs-build --cli)");
    crate::mistralrs::run(args)?;
    Ok(host_bin(release, "mistralrs"))
}

/// The `openai` client the serve checks drive the server with, pinned.
const OPENAI: &str = "openai==3.51.0";

/// Installs [`OPENAI`] with pip into `target/mistralrs-build/openai-client` (once) and
/// returns that directory, for `PYTHONPATH`.
pub fn ensure_openai_client() -> Result<PathBuf> {
    let dir = root()
        .join("target")
        .join("mistralrs-build")
        .join("openai-client");
    let stamp = dir.join(".xtask-installed");
    if fs::read_to_string(&stamp).is_ok_and(|s| s == OPENAI) {
        return Ok(dir);
    }
    let _ = fs::remove_dir_all(&dir);
    eprintln!("xtask: pip install --target {} {OPENAI}", dir.display());
    let status = Command::new(crate::pypi::python())
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-warn-conflicts",
            "--target",
        ])
        .arg(&dir)
        .arg(OPENAI)
        .status()
        .context("cannot run python3 -m pip")?;
    if !status.success() {
        bail!("pip install {OPENAI} failed ({status})");
    }
    fs::write(&stamp, OPENAI)?;
    Ok(dir)
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
/// Small tables, large Engram output: Engram visibly changes the text.
pub const STRONG: (&str, &[&str]) = (
    "engram-strong",
    &["--value-scale", "2.0", "--vocab", "20000"],
);

/// Writes `value` (pretty-printed) to `path`: under a temporary name, then renamed.
pub fn write_json(path: &Path, value: &Value) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    fs::write(&tmp, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}

/// The prompt of the end-to-end benchmarks.
pub const BENCH_PROMPT: &str = "Explain in detail how a steam engine works, from the boiler \
    and the firebox to the piston, the valve gear and the flywheel, and why it was so \
    important for the industrial revolution in Britain and elsewhere.";

/// One run of the host with `--json`; returns its JSON summary.
pub fn run_host(host: &Path, args: &[String]) -> Result<Value> {
    run_host_with_env(host, args, &[])
}

/// [`run_host`] with `env` added to the host's environment.
pub fn run_host_with_env(host: &Path, args: &[String], env: &[(String, String)]) -> Result<Value> {
    let mut cmd = Command::new(host);
    cmd.args(args).envs(env.iter().map(|(k, v)| (k, v)));
    run_host_command(cmd, &format!("{} {}", host.display(), args.join(" ")))
}

/// Runs `cmd` (the host, or a wrapper that ends by running it) with `--json` appended;
/// returns its JSON summary. `label` names the run in messages.
pub fn run_host_command(mut cmd: Command, label: &str) -> Result<Value> {
    let started = Instant::now();
    let out = cmd
        .arg("--json")
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run {label}"))?;
    if !out.status.success() {
        bail!("{label} failed ({})", out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("no JSON from the host: {text}"))?;
    let v: Value = serde_json::from_str(line)?;
    eprintln!(
        "xtask:   host {label} ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(v)
}

fn s(x: impl AsRef<std::ffi::OsStr>) -> String {
    x.as_ref().to_string_lossy().into_owned()
}

pub fn host_args(model: &Path, prompts: &[&str], max_tokens: usize, extra: &[&str]) -> Vec<String> {
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

#[derive(clap::Parser)]
pub struct TestArgs {
    /// Accept the greedy-id snapshot of this run (INSTA_UPDATE=always) instead of checking it.
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
    /// Passed to the test binary (a test name filter, `--nocapture`, ...).
    #[arg(last = true)]
    test_args: Vec<String>,
}

/// The checks' checkpoints: small tables (vocab 20000 per order), so they are quick to
/// write; the seeds and everything else are `engram init-checkpoint`'s defaults.
pub const ZERO: (&str, &[&str]) = ("engram-zero", &["--zero-value", "--vocab", "20000"]);
pub const SEEDED: (&str, &[&str]) = ("engram-seeded", &["--vocab", "20000"]);
/// The tiny models' checkpoints (`tiny-<arch>-engram-zero`, `tiny-<arch>-engram-strong`):
/// Engram at layers 1 and 3 of 4.
const TINY_ZERO: &[&str] = &["--layers", "1,3", "--vocab", "5000", "--zero-value"];
const TINY_STRONG: &[&str] = &["--layers", "1,3", "--vocab", "5000", "--value-scale", "2.0"];

/// Prepares everything `mistralrs-host/tests/engram_e2e.rs` needs and runs it with cargo
/// in the host workspace: identity against the unmodified mistralrs-core, KV cache vs
/// recompute, concurrent vs one at a time, the Engram layers inside the host against the
/// reference (`engram check-trace`), and the greedy-id snapshot (insta).
pub fn test(args: TestArgs) -> Result<()> {
    let engram = ensure_cli(false)?;
    let model = ensure_model()?;
    let gguf = crate::model::ensure_model_gguf()?;
    let mistralrs = ensure_host_and_cli(false)?;
    let openai = ensure_openai_client()?;
    let zero = ensure_checkpoint(&engram, &model, ZERO.0, ZERO.1)?;
    let seeded = ensure_checkpoint(&engram, &model, SEEDED.0, SEEDED.1)?;
    let strong = ensure_checkpoint(&engram, &model, STRONG.0, STRONG.1)?;
    for arch in TinyArch::ALL {
        let tiny = ensure_tiny_model(&model, arch)?;
        if arch != TinyArch::Mistral {
            crate::tiny_gguf::ensure_tiny_gguf(&tiny, arch)?;
        }
        for (suffix, extra) in [("engram-zero", TINY_ZERO), ("engram-strong", TINY_STRONG)] {
            let name = format!("tiny-{}-{suffix}", arch.name());
            ensure_checkpoint(&engram, &tiny, &name, extra)?;
        }
    }
    let pristine = match args.reference.as_str() {
        "pristine" => Some(ensure_pristine_host()?),
        "no-engram" => None,
        other => bail!("--reference {other:?}: pristine or no-engram"),
    };
    let root = root();
    let scratch = e2e_scratch()?;
    let tests = ["engram_e2e", "serve_e2e", "serve_load", "serve_bad_input"];
    let paths = E2ePaths {
        engram,
        model: model.clone(),
        mistralrs,
        openai,
        zero,
        seeded,
        strong,
        scratch: scratch.clone(),
    };
    let mut cmd = host_test_command(&paths, &tests, &args.test_args);
    cmd.env("ENGRAM_E2E_GGUF", &gguf)
        .env(
            "ENGRAM_E2E_TINY_ROOT",
            model.parent().context("model directory without a parent")?,
        )
        .env("ENGRAM_E2E_MAX_TOKENS", args.max_tokens.to_string())
        .env(
            "ENGRAM_E2E_SNAPSHOTS",
            root.join("mistralrs-host").join("tests").join("snapshots"),
        )
        .env("INSTA_WORKSPACE_ROOT", &root);
    if let Some(p) = &pristine {
        cmd.env("ENGRAM_E2E_PRISTINE_HOST", p);
    }
    if args.update_snapshot {
        cmd.env("INSTA_UPDATE", "always");
    }
    eprintln!("xtask: running mistralrs-host/tests/engram_e2e.rs");
    let status = cmd.status().context("cannot run cargo test")?;
    let _ = fs::remove_dir_all(&scratch);
    if !status.success() {
        bail!("the mistral.rs end-to-end checks failed ({status})");
    }
    Ok(())
}

/// What the host's test binaries read from `ENGRAM_E2E_*` variables (see
/// `mistralrs-host/tests/common/`).
pub struct E2ePaths {
    pub engram: PathBuf,
    pub model: PathBuf,
    pub mistralrs: PathBuf,
    pub openai: PathBuf,
    pub zero: PathBuf,
    pub seeded: PathBuf,
    pub strong: PathBuf,
    pub scratch: PathBuf,
}

/// `target/mistralrs-build/e2e-scratch`, emptied.
pub fn e2e_scratch() -> Result<PathBuf> {
    let scratch = root()
        .join("target")
        .join("mistralrs-build")
        .join("e2e-scratch");
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch)?;
    Ok(scratch)
}

/// `cargo test` of the host workspace's test binaries `tests`, with `test_args` for them
/// and `paths` in their `ENGRAM_E2E_*` variables.
pub fn host_test_command(paths: &E2ePaths, tests: &[&str], test_args: &[String]) -> Command {
    let build = root().join("target").join("mistralrs-build");
    let mut cmd = Command::new(env!("CARGO"));
    cmd.arg("test")
        .arg("--manifest-path")
        .arg(build.join("host").join("Cargo.toml"))
        .arg("--target-dir")
        .arg(build.join("target"));
    for t in tests {
        cmd.args(["--test", t]);
    }
    cmd.arg("--")
        .args(test_args)
        .env("ENGRAM_E2E_MISTRALRS", &paths.mistralrs)
        .env("ENGRAM_E2E_PYTHONPATH", &paths.openai)
        .env(
            "ENGRAM_E2E_OPENAI_CLIENT",
            root()
                .join("mistralrs-host")
                .join("tests")
                .join("openai_client.py"),
        )
        .env("ENGRAM_E2E_ENGRAM", &paths.engram)
        .env("ENGRAM_E2E_MODEL", &paths.model)
        .env("ENGRAM_E2E_ZERO", &paths.zero)
        .env("ENGRAM_E2E_SEEDED", &paths.seeded)
        .env("ENGRAM_E2E_STRONG", &paths.strong)
        .env("ENGRAM_E2E_SCRATCH", &paths.scratch);
    cmd
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

/// Runs `run` with Engram on (no extra host arguments) and off (`--no-engram`),
/// alternating, `repeats` times each; returns the row of highest `decode_tok_per_s` of
/// each mode, `[on, off]`, and every row.
pub fn best_on_off(
    repeats: usize,
    mut run: impl FnMut(&[&str]) -> Result<Value>,
) -> Result<([Value; 2], Vec<Value>)> {
    let mut best: [Option<Value>; 2] = [None, None];
    let mut runs = Vec::new();
    for _ in 0..repeats.max(1) {
        for (i, extra) in [&[][..], &["--no-engram"][..]].iter().enumerate() {
            let row = run(extra)?;
            let better = best[i]
                .as_ref()
                .is_none_or(|b| row["decode_tok_per_s"].as_f64() > b["decode_tok_per_s"].as_f64());
            if better {
                best[i] = Some(row.clone());
            }
            runs.push(row);
        }
    }
    Ok((best.map(Option::unwrap_or_default), runs))
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
    /// An Engram checkpoint directory to run instead of the demo's (for example one
    /// `engram fit` wrote).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Benchmark mistral.rs's server instead (`mistralrs serve`): the load test's figures
    /// and requests/s and tokens/s at each concurrency, Engram on and off; writes
    /// docs/results/serve.json (docs/benchmarks-e2e.md).
    #[arg(long)]
    serve: bool,
    #[command(flatten)]
    serve_args: crate::bench_serve::ServeArgs,
}

pub fn bench(args: BenchArgs) -> Result<()> {
    if args.serve {
        return crate::bench_serve::run(args.serve_args, args.release);
    }
    let provenance = crate::provenance::provenance();
    let engram = ensure_cli(true)?;
    let model = ensure_model()?;
    let host = ensure_host(args.release)?;
    let demo = match &args.checkpoint {
        Some(dir) => dir.clone(),
        None => ensure_checkpoint(&engram, &model, DEMO.0, DEMO.1)?,
    };
    let prompt = BENCH_PROMPT;
    let ([on, off], runs) = best_on_off(args.repeats, |extra| {
        let v = run_host(&host, &host_args(&demo, &[prompt], args.max_tokens, extra))?;
        let o = &v["outputs"][0];
        Ok(json!({
            "engram": extra.is_empty(),
            "prefill_tok_per_s": o["prompt_tok_per_s"],
            "decode_tok_per_s": o["completion_tok_per_s"],
            "prompt_tokens": o["prompt_tokens"],
            "completion_tokens": o["completion_tokens"],
            "lookup_stats": v["lookup_stats"][0]["stats"],
        }))
    })?;
    let ratio = |k: &str| match (on[k].as_f64(), off[k].as_f64()) {
        (Some(a), Some(b)) if a > 0.0 => json!(b / a),
        _ => Value::Null,
    };
    let checkpoint = match &args.checkpoint {
        Some(dir) => dir.display().to_string(),
        None => "engram-demo (layers 1,15; orders 2-3; 8 heads; 512/order; vocab 646400; bf16 tables, mmap)".into(),
    };
    let mut out = json!({
        "model": "SmolLM2-135M-Instruct, f32, CPU",
        "checkpoint": checkpoint,
        "profile": if args.release { "release" } else { "debug (numeric crates opt-level 3)" },
        "max_tokens": args.max_tokens,
        "engram_on": on,
        "engram_off": off,
        "decode_overhead_ratio_off_over_on": ratio("decode_tok_per_s"),
        "prefill_overhead_ratio_off_over_on": ratio("prefill_tok_per_s"),
        "runs": runs,
    });
    crate::provenance::stamp(&mut out, provenance);
    println!("{out}");
    Ok(())
}
