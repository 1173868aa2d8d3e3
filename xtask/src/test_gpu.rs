//! `cargo xtask test-gpu`: builds engram-cuda and engram-plugin and runs every test binary
//! of both with `--include-ignored` (the GPU tests are `#[ignore]`d, so a plain `cargo
//! test` lists them as ignored; here a missing GPU fails them), then the GPU benchmark. On
//! a machine with no GPU it builds, says so, and fails: nothing was verified.
//!
//! `--bundle DIR` builds here and writes the test binaries, the benchmark and `run.sh` to
//! DIR, for a GPU machine that has no Rust toolchain: `bash DIR/run.sh` there does the
//! same checks.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

#[derive(clap::Args)]
pub struct TestGpuArgs {
    /// Only build, and write the test binaries, the benchmark and run.sh to DIR.
    #[arg(long, value_name = "DIR")]
    bundle: Option<PathBuf>,
    /// Where the benchmark writes its JSON [default: $OUT/gpu-bench.json, else
    /// target/gpu-bench.json].
    #[arg(long, value_name = "PATH")]
    json: Option<PathBuf>,
    /// Smaller benchmark sizes.
    #[arg(long)]
    quick: bool,
    /// Run the tests only, not the benchmark.
    #[arg(long)]
    no_bench: bool,
    /// With --bundle: the end-to-end bundle instead (the CUDA mistral.rs host, the engram
    /// CLI and scripts/gpu-e2e/; see docs/gpu.md), a device call of its own.
    #[arg(long, requires = "bundle")]
    e2e: bool,
}

/// engram-cuda's own code optimized; its dependencies keep the dev profile's settings.
const PROFILE: &str = "profile.dev.package.engram-cuda.opt-level=3";

/// The executables of one build.
struct Built {
    /// (name, path): engram-cuda's unit tests ("unit") and each file of its tests/ by its
    /// stem; engram-plugin's the same, prefixed "plugin-" (the runtime on the GPU).
    tests: Vec<(String, PathBuf)>,
    bench: PathBuf,
}

pub fn run(args: TestGpuArgs) -> Result<()> {
    if let (true, Some(dir)) = (args.e2e, &args.bundle) {
        return crate::gpu_e2e::bundle(dir);
    }
    let built = build()?;
    if let Some(dir) = &args.bundle {
        return bundle(&built, dir);
    }
    let lib_path = ld_library_path();
    let probe = Command::new(&built.bench)
        .arg("--probe")
        .env("LD_LIBRARY_PATH", &lib_path)
        .output()
        .context("running gpu-bench --probe")?;
    let line = String::from_utf8_lossy(&probe.stdout).trim().to_string();
    if !probe.status.success() {
        eprintln!("test-gpu: NO GPU: {line}");
        bail!(
            "no GPU here: engram-cuda and its GPU tests were built, but nothing ran on a GPU, \
             so nothing is verified (see docs/gpu.md)"
        );
    }
    eprintln!("test-gpu: {line}");
    let mut failed = Vec::new();
    for (name, exe) in &built.tests {
        eprintln!(
            "test-gpu: running {name} ({}) with --include-ignored",
            exe.display()
        );
        let status = Command::new(exe)
            .args(["--test-threads=1", "--include-ignored"])
            .env("ENGRAM_REQUIRE_CXX20", "1")
            .env("LD_LIBRARY_PATH", &lib_path)
            .status()
            .with_context(|| format!("running {}", exe.display()))?;
        if !status.success() {
            failed.push(name.clone());
        }
    }
    let mut bench_note = String::from("benchmark not run (--no-bench)");
    if !args.no_bench {
        let json = args.json.clone().unwrap_or_else(|| {
            std::env::var_os("OUT")
                .map(|o| PathBuf::from(o).join("gpu-bench.json"))
                .unwrap_or_else(|| PathBuf::from("target/gpu-bench.json"))
        });
        let mut cmd = Command::new(&built.bench);
        cmd.arg("--json")
            .arg(&json)
            .env("LD_LIBRARY_PATH", &lib_path)
            .env(
                "ENGRAM_COMMIT",
                git_commit().unwrap_or_else(|| "unknown".into()),
            );
        if args.quick {
            cmd.arg("--quick");
        }
        let status = cmd.status().context("running gpu-bench")?;
        if status.success() {
            bench_note = format!("benchmark JSON: {}", json.display());
        } else {
            failed.push("gpu-bench".into());
        }
    }
    if !failed.is_empty() {
        bail!("GPU checks failed: {}", failed.join(", "));
    }
    eprintln!(
        "test-gpu: all {} test binaries passed on the GPU; {bench_note}",
        built.tests.len()
    );
    Ok(())
}

/// Builds engram-cuda's and engram-plugin's tests and binaries; returns their executables.
fn build() -> Result<Built> {
    eprintln!(
        "test-gpu: building engram-cuda and engram-plugin (cudarc 0.19, CUDA loaded at run time)"
    );
    let out = Command::new(env!("CARGO"))
        .args([
            "build",
            "-p",
            "engram-cuda",
            "-p",
            "engram-plugin",
            "--tests",
            "--bins",
            "--config",
            PROFILE,
            "--message-format=json-render-diagnostics",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running cargo build")?;
    if !out.status.success() {
        bail!("building the GPU tests failed ({})", out.status);
    }
    let mut tests = Vec::new();
    let mut bench = None;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if !line.contains("\"reason\":\"compiler-artifact\"") {
            continue;
        }
        let Some(exe) = json_str(line, "executable") else {
            continue;
        };
        let exe = PathBuf::from(exe);
        let target = json_str(line, "name").unwrap_or_default();
        // The profile's "test" flag: built as a test harness (the target's own flag only
        // says whether it can be).
        let is_test = line
            .find("\"profile\":{")
            .and_then(|i| line[i..].split('}').next())
            .is_some_and(|p| p.contains("\"test\":true"));
        if target == "gpu-bench" && !is_test {
            bench = Some(exe);
        } else if is_test && target != "gpu-bench" {
            let name = if line.contains("\"kind\":[\"lib\"]") {
                "unit".to_string()
            } else {
                target
            };
            let name = if line.contains("/engram-plugin#") {
                format!("plugin-{name}")
            } else {
                name
            };
            tests.push((name, exe));
        }
    }
    tests.sort();
    let bench = bench.context("the build produced no gpu-bench executable")?;
    if tests.is_empty() {
        bail!("the build produced no test executables");
    }
    Ok(Built { tests, bench })
}

/// The string value of the first `"key":"..."` in a line of cargo's JSON (no escapes
/// expected in paths and target names).
pub(crate) fn json_str(line: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\":\"");
    let start = line.find(&pat)? + pat.len();
    let end = line[start..].find('"')? + start;
    Some(line[start..end].replace("\\\\", "\\"))
}

/// Directories holding NVRTC and cuBLAS, to put on LD_LIBRARY_PATH (the driver's own
/// libcuda is found by the loader; the toolkit's stub libcuda must never be).
fn cuda_lib_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = [
        "/usr/local/cuda/lib64",
        "/usr/local/cuda/targets/x86_64-linux/lib",
    ]
    .iter()
    .map(PathBuf::from)
    .filter(|p| p.is_dir())
    .collect();
    for root in ["/usr/local", "/opt", "/usr/lib"] {
        find_libs(Path::new(root), 0, &mut dirs);
    }
    dirs
}

fn find_libs(dir: &Path, depth: usize, found: &mut Vec<PathBuf>) {
    if depth > 9 || dir.file_name().is_some_and(|n| n == "stubs") {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        let path = entry.path();
        if kind.is_dir() {
            find_libs(&path, depth + 1, found);
        } else {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if (name.starts_with("libnvrtc.so") || name.starts_with("libcublas.so"))
                && !found.iter().any(|d| d == dir)
            {
                found.push(dir.to_path_buf());
            }
        }
    }
}

fn ld_library_path() -> String {
    let mut parts: Vec<String> = std::env::var("LD_LIBRARY_PATH")
        .ok()
        .filter(|s| !s.is_empty())
        .into_iter()
        .collect();
    parts.extend(cuda_lib_dirs().iter().map(|d| d.display().to_string()));
    parts.join(":")
}

/// Copies the executables (debug info stripped when `strip` exists) and writes run.sh.
fn bundle(built: &Built, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut names = Vec::new();
    let mut copy = |name: &str, exe: &Path| -> Result<()> {
        let dst = dir.join(name);
        std::fs::copy(exe, &dst)
            .with_context(|| format!("copying {} to {}", exe.display(), dst.display()))?;
        let _ = Command::new("strip")
            .arg("--strip-debug")
            .arg(&dst)
            .status();
        names.push(name.to_string());
        Ok(())
    };
    for (name, exe) in &built.tests {
        copy(name, exe)?;
    }
    copy("gpu-bench", &built.bench)?;
    // The commit the binaries were built from, for the benchmark's JSON ("-dirty" with
    // uncommitted changes).
    let commit = git_commit().unwrap_or_else(|| "unknown".into());
    std::fs::write(dir.join("COMMIT"), format!("{commit}\n"))
        .with_context(|| format!("writing {}/COMMIT", dir.display()))?;
    let tests: Vec<&str> = built.tests.iter().map(|(n, _)| n.as_str()).collect();
    let script = RUN_SH.replace("@TESTS@", &tests.join(" "));
    let run = dir.join("run.sh");
    std::fs::write(&run, script).with_context(|| format!("writing {}", run.display()))?;
    let profile = dir.join("profile.sh");
    std::fs::write(&profile, PROFILE_SH)
        .with_context(|| format!("writing {}", profile.display()))?;
    let size: u64 = names
        .iter()
        .filter_map(|n| std::fs::metadata(dir.join(n)).ok())
        .map(|m| m.len())
        .sum();
    eprintln!(
        "test-gpu: bundle in {} ({} files, {:.1} MiB): on a GPU machine, from the repository \
         root, run `bash {}/run.sh` (it runs the ignored GPU tests and finds the CUDA libraries)",
        dir.display(),
        names.len() + 1,
        size as f64 / (1 << 20) as f64,
        dir.display()
    );
    Ok(())
}

/// `git describe`-like: the HEAD commit, with "-dirty" when the tree has changes.
fn git_commit() -> Option<String> {
    let out = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let head = out(&["rev-parse", "HEAD"])?;
    let dirty =
        out(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
    Some(if dirty { format!("{head}-dirty") } else { head })
}

const RUN_SH: &str = r#"#!/usr/bin/env bash
# engram-cuda GPU checks without cargo: the test binaries and the benchmark built by
# `cargo xtask test-gpu --bundle DIR`. Run from the repository root (for tests/data).
# Extra arguments go to gpu-bench (e.g. --quick). Each test binary gets at most
# ENGRAM_TEST_TIMEOUT seconds (default 150), the benchmark ENGRAM_BENCH_TIMEOUT (300).
# Exit status: 0 all passed, 1 a check failed, 2 no GPU.
set -u
here="$(cd "$(dirname "$0")" && pwd)"
# With $OUT set (the device tool's output folder), keep a full log there too.
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then exec > >(tee -a "$OUT/test-gpu.log") 2>&1; fi
if [ -z "${ENGRAM_TEST_DATA:-}" ]; then
  for d in "$PWD/tests/data" "$here/../../tests/data"; do
    if [ -f "$d/forward_demo_small.safetensors" ]; then export ENGRAM_TEST_DATA="$d"; break; fi
  done
fi
# NVRTC and cuBLAS from the toolkit or from pip wheels (never the toolkit's stub libcuda).
extra=""
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib; do
  [ -d "$d" ] && extra="$extra:$d"
done
for f in $(find /usr/local /opt /usr/lib -maxdepth 10 \( -name 'libnvrtc.so*' -o -name 'libcublas.so*' \) -not -path '*/stubs/*' 2>/dev/null); do
  extra="$extra:$(dirname "$f")"
done
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}$extra"
# The kernel emulation must run, not skip (the device machines have g++).
export ENGRAM_REQUIRE_CXX20=1
export ENGRAM_COMMIT="$(cat "$here/COMMIT" 2>/dev/null || echo unknown)"
echo "run.sh: binaries built from commit $ENGRAM_COMMIT" >&2
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv 2>&1 || true
ENGRAM_DRIVER_RELEASE="$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1)"
export ENGRAM_DRIVER_RELEASE
if ! "$here/gpu-bench" --probe; then
  echo "run.sh: NO GPU: nothing was verified" >&2
  exit 2
fi
failed=""
for t in @TESTS@; do
  echo "run.sh: running $t with --include-ignored (the GPU tests)" >&2
  start=$SECONDS
  timeout "${ENGRAM_TEST_TIMEOUT:-150}" "$here/$t" --test-threads=1 --include-ignored || failed="$failed $t"
  echo "run.sh: $t took $((SECONDS - start)) s" >&2
done
json="${OUT:-$here}/gpu-bench.json"
start=$SECONDS
timeout "${ENGRAM_BENCH_TIMEOUT:-300}" "$here/gpu-bench" --json "$json" "$@" || failed="$failed gpu-bench"
echo "run.sh: gpu-bench took $((SECONDS - start)) s" >&2
if [ -n "$failed" ]; then
  echo "run.sh: FAILED:$failed" >&2
  exit 1
fi
echo "run.sh: all GPU checks passed; benchmark JSON: $json" >&2
"#;

const PROFILE_SH: &str = r#"#!/usr/bin/env bash
# What explains the figures (needs Nsight Compute and compute-sanitizer, as on the device
# machines): ncu's view of the device-table gather kernel (`gpu-bench --only profile`),
# then compute-sanitizer's memcheck over the GPU tests that run the gather, the cache and
# the whole layer. Output under $OUT (or the bundle). Run from the repository root.
set -u
here="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-$here}"
extra=""
for f in $(find /usr/local /opt /usr/lib -maxdepth 10 \( -name 'libnvrtc.so*' -o -name 'libcublas.so*' \) -not -path '*/stubs/*' 2>/dev/null); do
  extra="$extra:$(dirname "$f")"
done
export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:-}$extra"
[ -z "${ENGRAM_TEST_DATA:-}" ] && [ -f "$PWD/tests/data/forward_demo_small.safetensors" ] && export ENGRAM_TEST_DATA="$PWD/tests/data"
status=0
if command -v ncu >/dev/null; then
  timeout "${ENGRAM_NCU_TIMEOUT:-120}" ncu --clock-control none -k regex:engram_gather_rows \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
    "$here/gpu-bench" --only profile --json "$out/profile-bench.json" > "$out/ncu-gather.txt" 2>&1 || status=1
  grep -E "engram_gather_rows|Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Grid Size|Block Size" "$out/ncu-gather.txt" | head -80
else
  echo "profile.sh: no ncu here" >&2
fi
if command -v compute-sanitizer >/dev/null; then
  timeout "${ENGRAM_SANITIZER_TIMEOUT:-150}" compute-sanitizer --tool memcheck --error-exitcode 9 \
    "$here/gpu" --test-threads=1 --include-ignored every_placement whole_layer prefetch_pipeline golden > "$out/memcheck.txt" 2>&1
  rc=$?
  tail -5 "$out/memcheck.txt"
  echo "profile.sh: memcheck exit $rc" >&2
  [ "$rc" = 0 ] || status=1
else
  echo "profile.sh: no compute-sanitizer here" >&2
fi
exit $status
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cargo_json_strings() {
        let line = r#"{"reason":"compiler-artifact","target":{"kind":["test"],"name":"gpu","test":true},"profile":{"opt_level":"0","test":true},"executable":"/t/deps/gpu-12ab"}"#;
        assert_eq!(
            json_str(line, "executable").as_deref(),
            Some("/t/deps/gpu-12ab")
        );
        assert_eq!(json_str(line, "name").as_deref(), Some("gpu"));
        assert_eq!(json_str(line, "missing"), None);
    }
}
