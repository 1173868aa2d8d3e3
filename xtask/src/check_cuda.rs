//! engram-plugin's `cuda` feature built on a machine with no GPU: `cargo xtask check-cuda`
//! (its compile check, which CI runs) and the feature's GPU test binary for the end-to-end
//! bundle. candle-core's `cuda` feature builds its kernels with nvcc (the pinned wheels of
//! [`crate::cuda_toolkit`]) and must load CUDA at run time for engram-cuda's probes to
//! exist, so both use the patched candle-core copy of `mistralrs-build --cuda`, passed to
//! cargo as a `[patch]` on the command line. That rewrites candle-core's entry of
//! Cargo.lock, which is put back afterwards.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context, Result};

use crate::mistralrs::{build_dir, cuda_build_env, fetch, patch_candle};

/// `cargo ARGS` in the root workspace with the patched candle-core and nvcc; `link` adds
/// the runtime's `-L` (as RUSTFLAGS: give such a build a target directory of its own).
/// Stdout is captured, stderr shown.
pub fn cargo_with_patched_candle(args: &[&str], link: bool) -> Result<Output> {
    let root = crate::e2e::root();
    let build = build_dir(&root, true);
    fs::create_dir_all(&build)?;
    let sources = fetch(&build)?;
    let candle = patch_candle(&build, &sources.candle_core)?;
    let toolkit = crate::cuda_toolkit::ensure()?;
    let patch = format!(
        "patch.crates-io.candle-core.path={:?}",
        candle.display().to_string()
    );
    let (subcommand, rest) = args.split_first().context("no cargo subcommand")?;
    let lock = root.join("Cargo.lock");
    let saved = fs::read(&lock).with_context(|| format!("reading {}", lock.display()))?;
    let output = Command::new(env!("CARGO"))
        .arg(subcommand)
        .args(["--config", &patch])
        .args(rest)
        .current_dir(&root)
        .envs(cuda_build_env(&toolkit, link)?)
        .stderr(Stdio::inherit())
        .output()
        .context("cannot run cargo");
    fs::write(&lock, saved).with_context(|| format!("restoring {}", lock.display()))?;
    output
}

/// `cargo xtask check-cuda`: clippy of engram-plugin with `--features cuda`, all targets.
pub fn run() -> Result<()> {
    let started = std::time::Instant::now();
    let out = cargo_with_patched_candle(
        &[
            "clippy",
            "-p",
            "engram-plugin",
            "--features",
            "cuda",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        false,
    )?;
    if !out.status.success() {
        bail!(
            "engram-plugin --features cuda does not pass clippy ({})",
            out.status
        );
    }
    eprintln!(
        "xtask: engram-plugin --features cuda compiles and is clippy-clean ({:.0} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Builds engram-plugin's `cuda_tensors` test binary (the feature's GPU tests) in
/// `target/cuda-tests` and returns it.
pub fn plugin_gpu_tests(root: &Path) -> Result<PathBuf> {
    let target = root.join("target").join("cuda-tests");
    let target_arg = target.display().to_string();
    let out = cargo_with_patched_candle(
        &[
            "build",
            "-p",
            "engram-plugin",
            "--features",
            "cuda",
            "--test",
            "cuda_tensors",
            "--target-dir",
            &target_arg,
            "--message-format=json-render-diagnostics",
        ],
        true,
    )?;
    if !out.status.success() {
        bail!(
            "building engram-plugin's cuda_tensors tests failed ({})",
            out.status
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("\"reason\":\"compiler-artifact\""))
        .filter(|l| crate::test_gpu::json_str(l, "name").as_deref() == Some("cuda_tensors"))
        .find_map(|l| crate::test_gpu::json_str(l, "executable"))
        .map(PathBuf::from)
        .context("the build produced no cuda_tensors executable")
}
