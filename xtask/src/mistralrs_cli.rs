//! `cargo xtask mistralrs-build --cli`: mistral.rs's own command-line program (`mistralrs`,
//! crate `mistralrs-cli` 0.8.1 from crates.io, with `mistralrs serve`) built against the
//! patched mistralrs-core with the `engram` feature.
//!
//! Nothing of mistral.rs is kept in the repository: cargo downloads the crate, this task
//! copies it to `target/mistralrs-build/mistralrs-cli` unchanged, appends the same
//! workspace section the host gets (`[patch.crates-io]` to the patched mistralrs-core, the
//! dev profile that optimizes the numeric crates) to its manifest, and builds it with
//! `--features mistralrs-core/engram` into the host's target directory, so the two builds
//! share every dependency they have in common.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::mistralrs::{cargo_bin, copy_dir, run_cmd, write_if_changed, HOST_WORKSPACE};

const CLI_CRATE: &str = "mistralrs-cli";
const CLI_VERSION: &str = "0.8.1";
/// The binary mistralrs-cli builds.
const CLI_BIN: &str = "mistralrs";

/// The `mistralrs` binary a build of that profile leaves.
pub fn cli_binary(build: &Path, release: bool) -> PathBuf {
    build
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join(format!("{CLI_BIN}{}", std::env::consts::EXE_SUFFIX))
}

/// Fetches mistralrs-cli, prepares its workspace in `build` and builds `mistralrs` with the
/// `engram` feature. `core_source` is the unpacked mistralrs-core 0.8.1 (the CLI is
/// unpacked beside it, in the same registry directory).
pub fn build(build: &Path, core_source: &Path, release: bool) -> Result<PathBuf> {
    let source = fetch(build, core_source)?;
    let manifest = workspace(build, &source)?;
    let mut cmd = Command::new(cargo_bin());
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(build.join("target"))
        .args(["--bin", CLI_BIN, "--features", "mistralrs-core/engram"]);
    if release {
        cmd.arg("--release");
    }
    let started = std::time::Instant::now();
    run_cmd(&mut cmd)?;
    let bin = cli_binary(build, release);
    eprintln!(
        "xtask: built {} (mistral.rs's CLI with Engram) in {:.0} s",
        bin.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(bin)
}

/// Has cargo download mistralrs-cli and returns its source directory. The crate has no
/// library, so `cargo metadata` downloads it but leaves it out of its answer (with a
/// warning): it is unpacked beside mistralrs-core, in the same registry directory.
fn fetch(build: &Path, core_source: &Path) -> Result<PathBuf> {
    // The answer is not needed: the crate is found beside mistralrs-core below.
    crate::mistralrs::cargo_fetch(
        &build.join("fetch-cli"),
        "mistralrs-build --cli",
        CLI_CRATE,
        CLI_VERSION,
    )?;
    let source = core_source
        .parent()
        .context("mistralrs-core's source has no parent directory")?
        .join(format!("{CLI_CRATE}-{CLI_VERSION}"));
    if !source.join("Cargo.toml").is_file() {
        bail!(
            "cargo fetched {CLI_CRATE} {CLI_VERSION} but it is not at {} (beside mistralrs-core)",
            source.display()
        );
    }
    eprintln!(
        "xtask: {CLI_CRATE} {CLI_VERSION} source: {}",
        source.display()
    );
    Ok(source)
}

/// Copies the CLI to `build/mistralrs-cli` (once: the copy is never changed) and writes
/// its manifest: the crate's own plus the host's workspace section. Returns the manifest.
fn workspace(build: &Path, source: &Path) -> Result<PathBuf> {
    let dest = build.join(CLI_CRATE);
    let stamp = dest.join(".xtask-copied");
    if !stamp.is_file() {
        if dest.exists() {
            fs::remove_dir_all(&dest).with_context(|| format!("removing {}", dest.display()))?;
        }
        copy_dir(source, &dest)?;
        // Start from the host's lock file (mistral.rs 0.8.1's own, plus engram-plugin's
        // dependencies as resolved there): the crates both builds share then resolve to the
        // same versions and are built once. The CLI's own lock pins versions engram-plugin's
        // dependencies conflict with.
        let host_lock = build.join("host").join("Cargo.lock");
        if host_lock.is_file() {
            fs::copy(&host_lock, dest.join("Cargo.lock"))?;
        }
        fs::write(&stamp, format!("{CLI_CRATE} {CLI_VERSION}\n"))?;
    }
    let pristine = fs::read_to_string(source.join("Cargo.toml"))
        .with_context(|| format!("reading {}", source.join("Cargo.toml").display()))?;
    if pristine.contains("[workspace]") || pristine.contains("[patch") {
        bail!("{CLI_CRATE} {CLI_VERSION}'s manifest already has a workspace or patch section");
    }
    let manifest = dest.join("Cargo.toml");
    write_if_changed(
        &manifest,
        &format!(
            "# {CLI_CRATE} {CLI_VERSION} from crates.io; the part after the marker below is \
             added by `cargo xtask mistralrs-build --cli`.\n{pristine}{HOST_WORKSPACE}"
        ),
    )?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CLI's manifest gets the host's workspace section, which patches in the
    /// patched mistralrs-core by a path that is right from `build/mistralrs-cli` too.
    #[test]
    fn cli_workspace_patches_in_the_patched_core() {
        let tmp = tempfile::tempdir().unwrap();
        let source = tmp.path().join("mistralrs-cli-0.8.1");
        fs::create_dir_all(source.join("src")).unwrap();
        fs::write(
            source.join("Cargo.toml"),
            "[package]\nname = \"mistralrs-cli\"\n",
        )
        .unwrap();
        fs::write(source.join("src/main.rs"), "fn main() {}\n").unwrap();
        let build = tmp.path().join("build");
        let manifest = workspace(&build, &source).unwrap();
        let text = fs::read_to_string(&manifest).unwrap();
        assert!(text.contains("name = \"mistralrs-cli\""), "{text}");
        assert!(
            text.contains("mistralrs-core = { path = \"../mistralrs-core\" }"),
            "{text}"
        );
        assert!(build.join("mistralrs-cli/src/main.rs").is_file());

        fs::write(
            source.join("Cargo.toml"),
            "[package]\nname = \"x\"\n[workspace]\n",
        )
        .unwrap();
        let err = workspace(&tmp.path().join("other"), &source)
            .unwrap_err()
            .to_string();
        assert!(err.contains("workspace"), "{err}");
    }
}
