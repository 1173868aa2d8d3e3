//! `cargo xtask test-gpu --e2e --bundle DIR`: the end-to-end GPU run of mistral.rs with
//! Engram (issue 20) as one folder for a device machine that has no Rust and no network:
//! the CUDA host (`mistralrs-build --cuda --release`), the `engram` CLI and engram-plugin's
//! `cuda` feature tests (`cuda_tensors`), stripped and xz-compressed, SmolLM2's tokenizer
//! files, and `scripts/gpu-e2e/` (`e2e.sh` makes the
//! ~1B and ~8B random-weight Llama models and the >= 30B-parameter tables there, runs the
//! checks and the throughput modes, and writes `gpu-e2e.json` under `$OUT`).
//!
//! The device tool carries 64 MiB per call, working tree included, so this bundle is its
//! own call: it holds none of `test-gpu`'s test binaries.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::mistralrs::{self, MistralrsBuildArgs};

/// What one device call may carry, working tree included.
const CALL_LIMIT: u64 = 64 << 20;
/// The scripts, from `scripts/gpu-e2e/`.
const SCRIPTS: [(&str, &str); 3] = [
    ("e2e.sh", include_str!("../../scripts/gpu-e2e/e2e.sh")),
    (
        "make_llama.py",
        include_str!("../../scripts/gpu-e2e/make_llama.py"),
    ),
    (
        "collect.py",
        include_str!("../../scripts/gpu-e2e/collect.py"),
    ),
];
/// The tokenizer's files of the model directory that the generated models copy.
const TOKENIZER_FILES: [&str; 5] = [
    "config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
];

pub fn bundle(dir: &Path) -> Result<()> {
    let root = crate::e2e::root();
    let host = mistralrs::host_binary(&root, true, true);
    if !host.is_file() {
        eprintln!("xtask: no CUDA host yet: building it (mistralrs-build --cuda --release)");
    }
    // Incremental: a no-op when the host is up to date.
    mistralrs::run(MistralrsBuildArgs {
        release: true,
        no_build: false,
        cuda: true,
        cli: false,
    })?;
    let engram = crate::e2e::ensure_cli(true)?;
    let model = crate::e2e::ensure_model()?;
    let plugin_tests = crate::check_cuda::plugin_gpu_tests(&root)?;

    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    compress(&host, &dir.join("engram-mistralrs-host.xz"))?;
    compress(&engram, &dir.join("engram.xz"))?;
    compress(&plugin_tests, &dir.join("plugin-cuda_tensors.xz"))?;
    let tokenizer = dir.join("tokenizer");
    fs::create_dir_all(&tokenizer)?;
    for name in TOKENIZER_FILES {
        let src = model.join(name);
        if src.is_file() {
            fs::copy(&src, tokenizer.join(name))
                .with_context(|| format!("copying {}", src.display()))?;
        }
    }
    for (name, text) in SCRIPTS {
        fs::write(dir.join(name), text).with_context(|| format!("writing {name}"))?;
    }
    let commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    fs::write(dir.join("COMMIT"), format!("{commit}\n"))?;

    let bundle = dir_size(dir)?;
    let tree = tracked_size(&root)?;
    eprintln!(
        "xtask: e2e bundle in {} ({:.1} MiB; working tree {:.1} MiB; {:.1} MiB of the {} MiB \
         a device call carries)",
        dir.display(),
        mib(bundle),
        mib(tree),
        mib(bundle + tree),
        CALL_LIMIT >> 20
    );
    if bundle + tree > CALL_LIMIT {
        bail!(
            "the bundle and the working tree ({:.1} MiB) exceed what one device call carries",
            mib(bundle + tree)
        );
    }
    eprintln!(
        "xtask: on the device machine, from the repository root: `bash {}/e2e.sh` (no GPU: \
         it says NO GPU and exits 2)",
        dir.display()
    );
    Ok(())
}

/// `strip` (symbols and debug info) into a temporary file, then `xz`: one architecture
/// (sm_90 kernels only), so the host's size is code and the kernels' images.
fn compress(exe: &Path, dst: &Path) -> Result<()> {
    let stripped = dst.with_extension("stripped");
    let status = Command::new("strip")
        .arg("-o")
        .arg(&stripped)
        .arg(exe)
        .status()
        .context("cannot run `strip` (binutils)")?;
    if !status.success() {
        bail!("strip {} failed ({status})", exe.display());
    }
    let part = dst.with_extension("xz.part");
    let file = fs::File::create(&part)?;
    let status = Command::new("xz")
        .args(["-6", "-T0", "-c"])
        .arg(&stripped)
        .stdout(file)
        .status()
        .context("cannot run `xz`")?;
    if !status.success() {
        bail!("xz {} failed ({status})", stripped.display());
    }
    eprintln!(
        "xtask: {}: {:.1} MiB, stripped {:.1} MiB, xz {:.1} MiB",
        exe.display(),
        mib(fs::metadata(exe)?.len()),
        mib(fs::metadata(&stripped)?.len()),
        mib(fs::metadata(&part)?.len())
    );
    fs::remove_file(&stripped)?;
    fs::rename(&part, dst)?;
    Ok(())
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// The size of the files git tracks (what a device call carries besides the bundle).
fn tracked_size(root: &Path) -> Result<u64> {
    let list = git(&["ls-files", "-z"]).context("git ls-files")?;
    Ok(list
        .split('\0')
        .filter(|p| !p.is_empty())
        .filter_map(|p| fs::metadata(root.join(PathBuf::from(p))).ok())
        .map(|m| m.len())
        .sum())
}

fn git(args: &[&str]) -> Option<String> {
    Command::new("git")
        .args(args)
        .current_dir(crate::e2e::root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
}
