//! `cargo xtask mistralrs-build`: mistral.rs with the `engram` feature.
//!
//! mistralrs-core seals its model traits, so Engram goes in through a small patch of our
//! lines (`patches/mistralrs-core-0.8.1-engram.patch`). This task has cargo fetch
//! mistralrs-core 0.8.1, copies it to `target/mistralrs-build/mistralrs-core`, applies the
//! patch there, and builds the host binary (`mistralrs-host/`) in a workspace of its own,
//! `target/mistralrs-build/host`, that swaps the patched crate in with `[patch.crates-io]`.
//! The root workspace never depends on any of it. See docs/mistralrs.md.
//!
//! With `--cuda` the same host is built with mistral.rs's `cuda` feature for sm_90 in
//! `target/mistralrs-build-cuda/`, on a machine with no GPU: nvcc comes from pinned PyPI
//! wheels ([`crate::cuda_toolkit`]), and candle-core is swapped for a copy whose cudarc
//! loads CUDA at run time (`dynamic-loading`) instead of linking it (`dynamic-linking`,
//! which needs a libcuda to link against that no wheel ships).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

const CRATE: &str = "mistralrs-core";
const VERSION: &str = "0.8.1";
const PATCH: &str = "patches/mistralrs-core-0.8.1-engram.patch";
/// Where the patch wants the absolute path of `engram-plugin`.
const PLUGIN_PLACEHOLDER: &str = "@ENGRAM_PLUGIN_PATH@";

/// Appended to the host's manifest. Debug builds keep the numeric crates optimized, or
/// generating even a small model on the CPU takes minutes per token.
pub(crate) const HOST_WORKSPACE: &str = r#"
# ---- added by `cargo xtask mistralrs-build` ----
[workspace]

[patch.crates-io]
mistralrs-core = { path = "../mistralrs-core" }

[profile.dev]
debug = false

[profile.dev.package.candle-core]
opt-level = 3
[profile.dev.package.candle-nn]
opt-level = 3
[profile.dev.package.gemm]
opt-level = 3
[profile.dev.package.gemm-common]
opt-level = 3
[profile.dev.package.gemm-f32]
opt-level = 3
[profile.dev.package.gemm-f16]
opt-level = 3
[profile.dev.package.half]
opt-level = 3
[profile.dev.package.mistralrs-quant]
opt-level = 3
[profile.dev.package.engram-cpu]
opt-level = 3
[profile.dev.package.engram-core]
opt-level = 3
"#;

/// The `[patch.crates-io]` line of [`HOST_WORKSPACE`] that [`CUDA_PATCHES`] follows.
const PATCH_LINE: &str = "mistralrs-core = { path = \"../mistralrs-core\" }\n";
/// Added to the CUDA host's `[patch.crates-io]`: candle-core with cudarc loaded at run time.
const CUDA_PATCHES: &str = r#"candle-core = { path = "../candle-core" }
"#;
/// The CUDA compute capability the kernels are built for (Hopper: the device machines' H200).
pub const CUDA_COMPUTE_CAP: &str = "90";
const CANDLE: &str = "candle-core";
const CANDLE_VERSION: &str = "0.10.2";
/// The line of candle-core's manifest (its cudarc features) that `--cuda` changes.
const CANDLE_LINKING: &str = "    \"dynamic-linking\",\n";
const CANDLE_LOADING: &str = "    \"dynamic-loading\",\n";

#[derive(clap::Args, Default)]
pub struct MistralrsBuildArgs {
    /// Build with `--release` (about 15 minutes on 2 cores; debug about 6-10).
    #[arg(long)]
    pub release: bool,
    /// Prepare `target/mistralrs-build/` (fetch, patch, host workspace) but do not build.
    #[arg(long)]
    pub no_build: bool,
    /// With mistral.rs's `cuda` feature (and engram-plugin's) for sm_90, in
    /// `target/mistralrs-build-cuda/`; needs no GPU (nvcc is fetched from PyPI).
    #[arg(long)]
    pub cuda: bool,
    /// Also build mistral.rs's own CLI, `mistralrs` (crate mistralrs-cli 0.8.1, with
    /// `mistralrs serve`), against the patched mistralrs-core with the `engram` feature.
    #[arg(long, conflicts_with = "cuda")]
    pub cli: bool,
}

/// Where `mistralrs-build` works, and where its binary lands.
pub fn build_dir(root: &Path, cuda: bool) -> PathBuf {
    root.join("target").join(if cuda {
        "mistralrs-build-cuda"
    } else {
        "mistralrs-build"
    })
}

/// The host binary a build of that kind leaves.
pub fn host_binary(root: &Path, cuda: bool, release: bool) -> PathBuf {
    build_dir(root, cuda)
        .join("target")
        .join(if release { "release" } else { "debug" })
        .join(format!(
            "engram-mistralrs-host{}",
            std::env::consts::EXE_SUFFIX
        ))
}

pub fn run(args: MistralrsBuildArgs) -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask has no parent directory")?
        .to_path_buf();
    let build = build_dir(&root, args.cuda);
    fs::create_dir_all(&build).with_context(|| format!("creating {}", build.display()))?;

    let sources = fetch(&build)?;
    let patched = patch(&root, &build, &sources.mistralrs_core)?;
    let host = host_workspace(&root, &build, &patched, args.cuda)?;
    let toolkit = if args.cuda {
        patch_candle(&build, &sources.candle_core)?;
        Some(crate::cuda_toolkit::ensure()?)
    } else {
        None
    };
    if args.no_build {
        eprintln!("xtask: prepared {} (not built)", host.display());
        return Ok(());
    }

    let target_dir = build.join("target");
    let mut cmd = Command::new(cargo_bin());
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(host.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    if args.release {
        cmd.arg("--release");
    }
    if let Some(toolkit) = &toolkit {
        cmd.envs(cuda_build_env(toolkit, true)?);
    }
    let started = std::time::Instant::now();
    run_cmd(&mut cmd)?;
    let bin = host_binary(&root, args.cuda, args.release);
    eprintln!(
        "xtask: built {} in {:.0} s ({}{})",
        bin.display(),
        started.elapsed().as_secs_f64(),
        if args.release { "release" } else { "debug" },
        if args.cuda { ", CUDA sm_90" } else { "" }
    );
    if args.cli {
        crate::mistralrs_cli::build(&build, &sources.mistralrs_core, args.release)?;
    }
    Ok(())
}

/// What cargo needs to build CUDA crates with the wheels' toolkit: nvcc first on `PATH`,
/// the toolkit's root for the build scripts that look for one, sm_90, and `-L` to the
/// runtime's `lib` (candle-kernels' MoE kernels link `cudart`).
pub fn cuda_build_env(
    toolkit: &crate::cuda_toolkit::Toolkit,
    link: bool,
) -> Result<Vec<(&'static str, std::ffi::OsString)>> {
    let mut paths = vec![toolkit.bin()];
    if let Some(old) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&old));
    }
    let path = std::env::join_paths(paths).context("joining PATH")?;
    let mut rustflags = std::env::var("RUSTFLAGS").unwrap_or_default();
    rustflags.push_str(&format!(" -L native={}", toolkit.lib().display()));
    let root = toolkit.root.clone().into_os_string();
    let mut env = vec![
        ("PATH", path),
        ("CUDA_COMPUTE_CAP", CUDA_COMPUTE_CAP.into()),
        ("CUDA_ROOT", root.clone()),
        ("CUDA_PATH", root.clone()),
        ("CUDA_HOME", root),
    ];
    // Only a build that links needs it (and RUSTFLAGS would rebuild every crate).
    if link {
        env.push(("RUSTFLAGS", rustflags.trim().into()));
    }
    Ok(env)
}

/// Copies candle-core to `build/candle-core` with its cudarc switched from linking CUDA to
/// loading it at run time (one line of its manifest), unless the copy is already that.
pub fn patch_candle(build: &Path, pristine: &Path) -> Result<PathBuf> {
    let dest = build.join(CANDLE);
    let manifest = dest.join("Cargo.toml");
    if fs::read_to_string(&manifest).is_ok_and(|t| t.contains(CANDLE_LOADING)) {
        return Ok(dest);
    }
    if dest.exists() {
        fs::remove_dir_all(&dest).with_context(|| format!("removing {}", dest.display()))?;
    }
    copy_dir(pristine, &dest)?;
    let text = fs::read_to_string(&manifest)?;
    if text.matches(CANDLE_LINKING).count() != 1 {
        bail!(
            "{CANDLE} {CANDLE_VERSION}'s manifest ({}) does not have exactly one              `dynamic-linking` line: cannot switch its cudarc to dynamic loading",
            manifest.display()
        );
    }
    fs::write(&manifest, text.replace(CANDLE_LINKING, CANDLE_LOADING))?;
    eprintln!(
        "xtask: {} has cudarc's dynamic-loading instead of dynamic-linking",
        dest.display()
    );
    Ok(dest)
}

pub(crate) fn cargo_bin() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

pub(crate) fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// The unpacked sources of the crates the build copies and patches.
pub(crate) struct Sources {
    pub mistralrs_core: PathBuf,
    pub candle_core: PathBuf,
}

/// Has cargo download `krate` `version` (and what it depends on) through a generated
/// manifest in `dir` naming it as its one dependency; returns `cargo metadata`'s answer.
/// `task` names the xtask command in the manifest's comment.
pub(crate) fn cargo_fetch(
    dir: &Path,
    task: &str,
    krate: &str,
    version: &str,
) -> Result<serde_json::Value> {
    fs::create_dir_all(dir)?;
    write_if_changed(
        &dir.join("Cargo.toml"),
        &format!(
            "# Generated by `cargo xtask {task}`: makes cargo fetch {krate} {version}.\n\
             [package]\nname = \"{krate}-fetch\"\nversion = \"0.0.0\"\nedition = \"2021\"\npublish = false\n\n\
             [lib]\npath = \"lib.rs\"\n\n\
             [dependencies]\n{krate} = \"={version}\"\n\n[workspace]\n"
        ),
    )?;
    write_if_changed(&dir.join("lib.rs"), "")?;
    // `cargo metadata` downloads what it resolves and says where each package lives.
    let out = Command::new(cargo_bin())
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(dir.join("Cargo.toml"))
        .output()
        .context("cannot run cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata for {krate} {version} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Has cargo download mistralrs-core (with candle-core) and returns their source directories.
pub(crate) fn fetch(build: &Path) -> Result<Sources> {
    let meta = cargo_fetch(&build.join("fetch"), "mistralrs-build", CRATE, VERSION)?;
    let source = |name: &str, version: &str| -> Result<PathBuf> {
        let manifest = meta["packages"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name && p["version"] == version)
            .and_then(|p| p["manifest_path"].as_str())
            .with_context(|| format!("cargo metadata does not list {name} {version}"))?;
        Ok(Path::new(manifest)
            .parent()
            .context("manifest without a directory")?
            .to_path_buf())
    };
    let sources = Sources {
        mistralrs_core: source(CRATE, VERSION)?,
        candle_core: source(CANDLE, CANDLE_VERSION)?,
    };
    eprintln!(
        "xtask: {CRATE} {VERSION} source: {}",
        sources.mistralrs_core.display()
    );
    Ok(sources)
}

/// Copies the pristine crate to `build/mistralrs-core` and applies the patch, unless the
/// copy there was made from the same patch (re-copying would rebuild the crate).
fn patch(root: &Path, build: &Path, pristine: &Path) -> Result<PathBuf> {
    let patch_file = root.join(PATCH);
    let patch_text = fs::read_to_string(&patch_file)
        .with_context(|| format!("reading {}", patch_file.display()))?;
    let plugin = root.join("engram-plugin");
    let stamp_text = format!(
        "{CRATE} {VERSION}\nengram-plugin: {}\n{patch_text}",
        plugin.display()
    );
    let dest = build.join(CRATE);
    let stamp = build.join(format!("{CRATE}.stamp"));
    if dest.join("Cargo.toml").is_file()
        && fs::read_to_string(&stamp).is_ok_and(|s| s == stamp_text)
    {
        eprintln!("xtask: {} is up to date with {PATCH}", dest.display());
        pin_git_head(&dest)?;
        return Ok(dest);
    }
    let _ = fs::remove_file(&stamp);
    if dest.exists() {
        fs::remove_dir_all(&dest).with_context(|| format!("removing {}", dest.display()))?;
    }
    copy_dir(pristine, &dest)?;
    let status = Command::new("patch")
        .args(["-p1", "--forward", "--batch", "--fuzz=0", "--quiet", "-i"])
        .arg(&patch_file)
        .current_dir(&dest)
        .status()
        .context("cannot run `patch` (install it: apt-get install patch)")?;
    if !status.success() {
        bail!(
            "{PATCH} does not apply to {CRATE} {VERSION} (copied to {}): the patch is out of \
             date with the crate, or the crate in {} was modified",
            dest.display(),
            pristine.display()
        );
    }
    let manifest = dest.join("Cargo.toml");
    let text = fs::read_to_string(&manifest)?;
    if !text.contains(PLUGIN_PLACEHOLDER) {
        bail!("{PATCH} does not put {PLUGIN_PLACEHOLDER} in {CRATE}'s Cargo.toml");
    }
    fs::write(
        &manifest,
        text.replace(PLUGIN_PLACEHOLDER, &toml_path(&plugin)),
    )?;
    pin_git_head(&dest)?;
    fs::write(&stamp, stamp_text)?;
    eprintln!("xtask: applied {PATCH} in {}", dest.display());
    Ok(dest)
}

/// mistralrs-core's build script asks cargo to rerun it when `.git/HEAD` changes; a
/// crate copy has no such file, and cargo reruns a build script whose watched file is
/// missing, which rebuilds the whole crate every time. A fixed file keeps it stable.
fn pin_git_head(crate_dir: &Path) -> Result<()> {
    let head = crate_dir.join(".git").join("HEAD");
    if !head.is_file() {
        fs::create_dir_all(crate_dir.join(".git"))?;
        fs::write(&head, "0000000000000000000000000000000000000000\n")?;
    }
    Ok(())
}

/// Writes `build/host`: the host crate's manifest with absolute paths into this checkout,
/// made a workspace of its own that patches in the crate at `patched`.
fn host_workspace(root: &Path, build: &Path, patched: &Path, cuda: bool) -> Result<PathBuf> {
    let src = root.join("mistralrs-host");
    let host = build.join("host");
    fs::create_dir_all(&host)?;
    let manifest = fs::read_to_string(src.join("Cargo.toml"))
        .with_context(|| format!("reading {}", src.join("Cargo.toml").display()))?;
    let mut out = manifest.clone();
    for (from, to) in [
        ("path = \"src/main.rs\"", src.join("src").join("main.rs")),
        (
            "path = \"tests/engram_e2e.rs\"",
            src.join("tests").join("engram_e2e.rs"),
        ),
        (
            "path = \"tests/serve_e2e.rs\"",
            src.join("tests").join("serve_e2e.rs"),
        ),
        (
            "path = \"tests/serve_load.rs\"",
            src.join("tests").join("serve_load.rs"),
        ),
        (
            "path = \"tests/serve_bad_input.rs\"",
            src.join("tests").join("serve_bad_input.rs"),
        ),
        ("path = \"../engram-plugin\"", root.join("engram-plugin")),
    ] {
        if !manifest.contains(from) {
            bail!("mistralrs-host/Cargo.toml has no `{from}`");
        }
        out = out.replace(from, &format!("path = \"{}\"", toml_path(&to)));
    }
    if cuda {
        for (from, to) in CUDA_FEATURES {
            if !out.contains(from) {
                bail!("mistralrs-host/Cargo.toml has no `{from}`");
            }
            out = out.replace(from, to);
        }
    }
    out.insert_str(
        0,
        "# Generated by `cargo xtask mistralrs-build` from mistralrs-host/Cargo.toml.\n",
    );
    let mut workspace = HOST_WORKSPACE.to_string();
    if cuda {
        workspace = workspace.replace(PATCH_LINE, &format!("{PATCH_LINE}{CUDA_PATCHES}"));
    }
    out.push_str(&workspace);
    write_if_changed(&host.join("Cargo.toml"), &out)?;
    // Start from the versions mistral.rs was released with.
    let lock = host.join("Cargo.lock");
    let packaged = patched.join("Cargo.lock");
    if !lock.exists() && packaged.is_file() {
        fs::copy(&packaged, &lock)?;
    }
    Ok(host)
}

/// The host manifest's dependency lines that `--cuda` gives the `cuda` feature.
const CUDA_FEATURES: [(&str, &str); 3] = [
    (
        "mistralrs = \"=0.8.1\"",
        "mistralrs = { version = \"=0.8.1\", features = [\"cuda\"] }",
    ),
    (
        "features = [\"engram\"]",
        "features = [\"engram\", \"cuda\"]",
    ),
    (
        "engram-plugin = { path",
        "engram-plugin = { features = [\"cuda\"], path",
    ),
];

fn toml_path(path: &Path) -> String {
    path.display()
        .to_string()
        .replace('\\', "/")
        .replace('"', "\\\"")
}

pub(crate) fn write_if_changed(path: &Path, text: &str) -> Result<()> {
    if fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(());
    }
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

pub(crate) fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to)?;
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type()?.is_dir() {
            copy_dir(&src, &dst)?;
        } else {
            fs::copy(&src, &dst)
                .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn patch_text() -> String {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        fs::read_to_string(root.join(PATCH)).unwrap()
    }

    /// The patch stays a small diff of our lines in the files the design names: no model
    /// file (the layer loops reach Engram through the model's device mapper), and one
    /// upstream fix (the CPU decode attention's scratch, one per batch entry).
    #[test]
    fn patch_touches_only_the_integration_points() {
        let text = patch_text();
        let files: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("+++ b/"))
            .collect();
        assert_eq!(
            files,
            [
                "Cargo.toml",
                "src/attention/backends/cpu.rs",
                "src/engine/mod.rs",
                "src/engram.rs",
                "src/lib.rs",
                "src/pipeline/gguf.rs",
                "src/pipeline/inputs_processor.rs",
                "src/pipeline/normal.rs",
                "src/scheduler/default_scheduler.rs",
            ]
        );
        assert!(text.contains(PLUGIN_PLACEHOLDER));
        assert!(text.contains("+engram = [\"dep:engram-plugin\"]"));
        // Outside the new module and the two fixes, only additions and the one line
        // each pipeline (normal, GGUF) replaces; the engine gets one match arm (a sequence
        // that finished in its prompt step stays finished).
        let mut removed = std::collections::BTreeMap::new();
        let mut file = "";
        for l in text.lines() {
            if let Some(f) = l.strip_prefix("+++ b/") {
                file = f;
            } else if l.starts_with('-') && !l.starts_with("---") {
                *removed.entry(file).or_insert(0) += 1;
            }
        }
        // The two upstream fixes (docs/mistralrs.md): the CPU decode attention's scratch per
        // batch entry, and the scheduler keeping a waiting sequence's decode state.
        for (fix, most) in [
            ("src/attention/backends/cpu.rs", 11),
            ("src/scheduler/default_scheduler.rs", 3),
        ] {
            let n = removed.remove(fix).unwrap_or(0);
            assert!(n <= most, "the fix in {fix} replaces {n} upstream lines");
        }
        let elsewhere: usize = removed.values().sum();
        assert!(
            elsewhere <= 2,
            "{elsewhere} upstream lines removed: {removed:?}"
        );
    }

    /// `--cuda` switches exactly candle-core's cudarc line, and refuses a manifest where
    /// that line is missing or ambiguous rather than building a linking candle.
    #[test]
    fn candle_patch_switches_cudarc_to_dynamic_loading() {
        let tmp = tempfile::tempdir().unwrap();
        let pristine = tmp.path().join("pristine");
        fs::create_dir_all(pristine.join("src")).unwrap();
        fs::write(pristine.join("src/lib.rs"), "").unwrap();
        let manifest =
            "[dependencies.cudarc]\nfeatures = [\n    \"driver\",\n    \"dynamic-linking\",\n]\n";
        fs::write(pristine.join("Cargo.toml"), manifest).unwrap();
        let build = tmp.path().join("build");
        let dest = patch_candle(&build, &pristine).unwrap();
        let text = fs::read_to_string(dest.join("Cargo.toml")).unwrap();
        assert!(text.contains("\"dynamic-loading\""), "{text}");
        assert!(!text.contains("dynamic-linking"), "{text}");
        assert!(dest.join("src/lib.rs").is_file());
        // Already patched: kept as is.
        patch_candle(&build, &pristine).unwrap();

        for bad in ["[dependencies]\n", &format!("{manifest}{manifest}")] {
            fs::write(pristine.join("Cargo.toml"), bad).unwrap();
            let build = tmp.path().join("build-bad");
            let _ = fs::remove_dir_all(&build);
            let err = patch_candle(&build, &pristine).unwrap_err().to_string();
            assert!(err.contains("dynamic-linking"), "{err}");
        }
    }

    /// Each dependency line `--cuda` rewrites is in the host manifest exactly once.
    #[test]
    fn host_manifest_takes_the_cuda_features() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let manifest = fs::read_to_string(root.join("mistralrs-host/Cargo.toml")).unwrap();
        for (from, _) in CUDA_FEATURES {
            assert_eq!(manifest.matches(from).count(), 1, "{from}");
        }
        assert!(HOST_WORKSPACE.contains(PATCH_LINE));
    }

    #[test]
    fn host_manifest_has_the_paths_the_task_rewrites() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let manifest = fs::read_to_string(root.join("mistralrs-host/Cargo.toml")).unwrap();
        assert!(manifest.contains("path = \"src/main.rs\""));
        assert!(manifest.contains("path = \"tests/engram_e2e.rs\""));
        assert!(manifest.contains("path = \"tests/serve_e2e.rs\""));
        assert!(manifest.contains("path = \"tests/serve_load.rs\""));
        assert!(manifest.contains("path = \"tests/serve_bad_input.rs\""));
        assert!(manifest.contains("path = \"../engram-plugin\""));
        assert!(manifest.contains("features = [\"engram\"]"));
    }
}
