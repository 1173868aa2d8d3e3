//! The `engram` command.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use engram_cli::golden::{format_report, run_golden, GoldenBackend};
use engram_cli::{inspect, text, TokenizerContext};
use engram_core::config::HashConfig;

#[derive(Parser)]
#[command(
    name = "engram",
    version,
    about = "Engram conditional memory: hashing, tables and layers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compress a tokenizer's vocabulary; prints {"vocab_size", "compressed_vocab_size", "lookup_sha256_i64le"}.
    Vocab {
        #[arg(long)]
        tokenizer: PathBuf,
    },
    /// Tokenize a text (no special tokens) and print its ids and per-layer rows as JSON.
    Hash {
        #[arg(long)]
        tokenizer: PathBuf,
        /// Engram config: golden form, a model's config.json, or a bare engram object.
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        text: String,
    },
    /// Measure each stage against a baseline in the same run (hash, gather vs memcpy,
    /// layer, prefetch under a simulated host, the hot-row cache); prints a table.
    Bench {
        /// Print one JSON object instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Check a golden forward file: hashes and outputs of every sample and layer.
    Golden {
        #[arg(long)]
        tokenizer: PathBuf,
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = GoldenBackend::Cpu)]
        backend: GoldenBackend,
        /// Also write what was computed, under the golden file's names.
        #[arg(long)]
        dump: Option<PathBuf>,
    },
    /// Check a checkpoint (a .safetensors file or a model directory) against its Engram
    /// config: tables and every layer tensor. Exit code 1 when anything is inconsistent.
    Inspect {
        path: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// How fast each way of reading a step's rows from a table file brings them in,
    /// cold (page cache dropped, as root) and warm: mmap, fadvise, pread threads, io_uring.
    BenchDisk(engram_cli::bench_disk::DiskBenchArgs),
    /// Write a paper-variant Engram checkpoint with seeded random weights for a Hugging
    /// Face model: OUT gets the model's files (linked), its config.json with an `engram`
    /// object, and engram.safetensors.
    InitCheckpoint(engram_cli::init_checkpoint::InitArgs),
    /// Hit rate of the hot-row cache against its size on real text: tokenizes and hashes
    /// text files with a model's Engram config and replays each layer's rows through
    /// caches of a few sizes (docs/benchmarks-e2e.md).
    CacheReplay(engram_cli::cache_replay::ReplayArgs),
    /// Load a checkpoint's Engram tables into a Redis Cluster (resumable: blocks already
    /// there are skipped), for hosts run with ENGRAM_TABLES=redis://host:port[,...].
    Upload(engram_cli::upload::UploadArgs),
    /// Fit paper-variant Engram layers to text files on a frozen host model (Llama
    /// architecture) and write an Engram checkpoint directory (docs/fit.md).
    Fit(engram_cli::fit::train::FitArgs),
    /// Perplexity and next-token accuracy of a model directory on text files, with its
    /// Engram layers or without (`--no-engram`), through `fit`'s forward.
    Eval(engram_cli::fit::eval::EvalArgs),
    /// The last position's logits of a token sequence through `fit`'s forward (raw f32),
    /// to compare with a host's `--dump-logits`.
    Logits(engram_cli::fit::eval::LogitsArgs),
    /// Prompts cut from text files, continued greedily through `fit`'s forward with a
    /// checkpoint's Engram layers and without: how often each continuation is the text's,
    /// and the examples a stated rule picks where only Engram's is (docs/fit.md).
    GreedyExamples(engram_cli::fit::greedy::GreedyArgs),
    /// Check a host's Engram trace (written with the runtime's `trace_dir`, or by the
    /// patched mistral.rs under ENGRAM_TRACE_DIR) against the reference forward on the
    /// same hidden states and ids. Exit code 1 when it does not match.
    CheckTrace {
        /// The model directory (or weights file) the host opened its Engram runtime from.
        #[arg(long)]
        model: PathBuf,
        /// The trace directory.
        trace: PathBuf,
        /// Largest relative error (L2, per sequence and layer) that passes.
        #[arg(long, default_value_t = 1e-5)]
        tolerance: f64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Vocab { tokenizer } => {
            let ctx = TokenizerContext::load(&tokenizer)?;
            println!("{}", text::vocab_json(&ctx));
        }
        Command::Hash {
            tokenizer,
            config,
            text,
        } => {
            let cfg = HashConfig::from_json_file(&config)?;
            let ctx = TokenizerContext::load(&tokenizer)?;
            println!("{}", text::hash_json(&ctx, &cfg, &text)?);
        }
        Command::Bench { json } => {
            let scratch = tempfile::tempdir()?;
            let report = engram_cli::bench::run_bench(scratch.path())?;
            print!("{}", engram_cli::bench::render(&report, json)?);
        }
        Command::Golden {
            tokenizer,
            file,
            backend,
            dump,
        } => {
            let ctx = TokenizerContext::load(&tokenizer)?;
            let report = run_golden(&ctx, &file, backend, dump.as_deref())?;
            print!("{}", format_report(&report));
            if !report.passed() {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Inspect { path, json } => {
            let report = inspect::inspect(&path)?;
            if json {
                println!("{:#}", report.to_json());
            } else {
                print!("{}", inspect::format_text(&report));
            }
            if !report.consistent() {
                return Ok(ExitCode::from(1));
            }
        }
        Command::CheckTrace {
            model,
            trace,
            tolerance,
            json,
        } => {
            let report = engram_cli::check_trace::check_trace(&model, &trace, tolerance)?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.to_text());
            }
            if !report.passed() {
                return Ok(ExitCode::from(1));
            }
        }
        Command::BenchDisk(args) => {
            let report = engram_cli::bench_disk::run(&args)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", engram_cli::bench_disk::format_text(&report));
            }
        }
        Command::Upload(args) => {
            let summary = engram_cli::upload::upload(&args)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                print!("{}", summary.to_text());
            }
        }
        Command::InitCheckpoint(args) => {
            let report = engram_cli::init_checkpoint::init_checkpoint(&args)?;
            print!("{}", report.to_text());
        }
        Command::Fit(args) => {
            let report = engram_cli::fit::train::fit(&args)?;
            let first = report.losses.first().copied().unwrap_or(f32::NAN);
            let last = report.losses.last().copied().unwrap_or(f32::NAN);
            println!(
                "wrote {} ({} fit tokens in {} files; {} steps, {} this run; loss {first:.4} -> {last:.4}; {:.0} tok/s)",
                report.out.display(),
                report.fit_tokens,
                report.files,
                report.steps,
                report.steps_run,
                report.tokens_per_second
            );
        }
        Command::Eval(args) => {
            let report = engram_cli::fit::eval::eval(&args)?;
            if args.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                print!("{}", report.to_text());
            }
        }
        Command::Logits(args) => {
            let n = engram_cli::fit::eval::last_logits(&args)?;
            println!("wrote {} ({n} logits)", args.out.display());
        }
        Command::GreedyExamples(args) => {
            let report = engram_cli::fit::greedy::greedy_examples(&args)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_text());
            }
        }
        Command::CacheReplay(args) => {
            let report = engram_cli::cache_replay::cache_replay(&args)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.to_text());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
