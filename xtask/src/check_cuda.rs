//! `cargo xtask check-cuda`: the compile check of engram-plugin's `cuda` feature on a
//! machine with no GPU (CI runs it). candle-core's `cuda` feature builds its kernels with
//! nvcc (the pinned wheels of [`crate::cuda_toolkit`]) and must load CUDA at run time for
//! engram-cuda's probes to exist, so the check uses the same patched candle-core copy as
//! `mistralrs-build --cuda`, passed to cargo as a `[patch]` on the command line. That
//! rewrites candle-core's entry of Cargo.lock, which is put back afterwards.

use std::fs;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::mistralrs::{build_dir, cuda_build_env, fetch, patch_candle};

pub fn run() -> Result<()> {
    let root = crate::e2e::root();
    let build = build_dir(&root, true);
    fs::create_dir_all(&build)?;
    let sources = fetch(&build)?;
    let candle = patch_candle(&build, &sources.candle_core)?;
    let toolkit = crate::cuda_toolkit::ensure()?;
    let lock = root.join("Cargo.lock");
    let saved = fs::read(&lock).with_context(|| format!("reading {}", lock.display()))?;
    let patch = format!(
        "patch.crates-io.candle-core.path={:?}",
        candle.display().to_string()
    );
    let started = std::time::Instant::now();
    let status = Command::new(env!("CARGO"))
        .args([
            "clippy",
            "-p",
            "engram-plugin",
            "--features",
            "cuda",
            "--all-targets",
            "--config",
            &patch,
            "--",
            "-D",
            "warnings",
        ])
        .current_dir(&root)
        .envs(cuda_build_env(&toolkit, false)?)
        .status()
        .context("cannot run cargo clippy");
    fs::write(&lock, saved).with_context(|| format!("restoring {}", lock.display()))?;
    let status = status?;
    if !status.success() {
        bail!("engram-plugin --features cuda does not pass clippy ({status})");
    }
    eprintln!(
        "xtask: engram-plugin --features cuda compiles and is clippy-clean ({:.0} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
