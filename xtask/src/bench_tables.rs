//! `cargo xtask bench-tables`: Engram tables larger than memory, through the patched
//! mistral.rs host on SmolLM2-135M with the demo's Engram layers, on real text (the
//! Python library docs), as one JSON object (docs/results/tables-beyond-ram.json).
//!
//! "Memory" is a memory cgroup the host runs in (its page cache is charged there), so a
//! table twice its limit is a table twice the RAM of a machine of that size, while the
//! table stays small enough to write in seconds on a disk shared with builds. Modes,
//! alternating, `--repeats` times: no Engram; the demo's table (fits the limit, copied
//! into RAM at open: `ENGRAM_TABLES=ram`, the RAM-resident baseline); the
//! big table memory-mapped, cold and warm, with the prefetch thread off (`-sync`: each
//! layer's rows faulted in when the layer applies, no read-ahead at all) and on (the
//! prefetch thread faults the pages one at a time while earlier layers compute: the path
//! the disk tier replaces); read through the disk tier cold and warm; and the disk tier
//! behind the hot-row cache, cold and warm. Cold: the page cache dropped (needs root)
//! before the run.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::corpus;
use crate::e2e::{
    ensure_checkpoint, ensure_cli, ensure_host, ensure_model, host_args, run_host_command, DEMO,
};

/// The big checkpoint: the demo's layers and heads with five times its table rows
/// (13.5 GB of bf16 tables).
pub const BIG: (&str, &[&str]) = ("engram-big", &["--vocab", "3300000"]);
/// The hot-row cache's setting, read by the runtime (engram_plugin::OpenOptions::from_env).
const HOT_CACHE_ENV: &str = "ENGRAM_HOT_CACHE";
const TABLES_ENV: &str = "ENGRAM_TABLES";
const PREFETCH_ENV: &str = "ENGRAM_PREFETCH";

#[derive(Clone, Debug, clap::Args)]
pub struct BenchTablesArgs {
    /// The memory cgroup's limit (GiB): the "RAM" the tables are measured against.
    #[arg(long, default_value_t = 6.0)]
    mem_gib: f64,
    /// Prompts of real text per run, sent one after another.
    #[arg(long, default_value_t = 8)]
    prompts: usize,
    /// Tokens generated per prompt.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Runs per mode (modes alternate).
    #[arg(long, default_value_t = 2)]
    repeats: usize,
    /// The hot-row cache's size, as the runtime's setting takes it.
    #[arg(long, default_value = "5%")]
    hot_cache: String,
    /// Use the release build of the host.
    #[arg(long)]
    release: bool,
    /// Also write the JSON object to this file (under a temporary name, then renamed).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

/// One mode: which checkpoint, how its tables are read, whether the cache is dropped.
struct Mode {
    name: &'static str,
    big: bool,
    engram: bool,
    tables: &'static str,
    hot_cache: bool,
    cold: bool,
    /// The runtime's prefetch thread (the read-ahead at `begin_step`); off, each layer's
    /// rows are read when the layer applies.
    prefetch: bool,
}

const MODES: [Mode; 10] = [
    Mode {
        name: "no-engram",
        big: false,
        engram: false,
        tables: "mmap",
        hot_cache: false,
        cold: false,
        prefetch: true,
    },
    Mode {
        name: "ram-table",
        big: false,
        engram: true,
        // Copied into the process at open: resident whatever the cold modes dropped.
        tables: "ram",
        hot_cache: false,
        cold: false,
        prefetch: true,
    },
    Mode {
        name: "big-mmap-cold",
        big: true,
        engram: true,
        tables: "mmap",
        hot_cache: false,
        cold: true,
        prefetch: true,
    },
    Mode {
        name: "big-mmap-warm",
        big: true,
        engram: true,
        tables: "mmap",
        hot_cache: false,
        cold: false,
        prefetch: true,
    },
    Mode {
        name: "big-mmap-cold-sync",
        big: true,
        engram: true,
        tables: "mmap",
        hot_cache: false,
        cold: true,
        prefetch: false,
    },
    Mode {
        name: "big-mmap-warm-sync",
        big: true,
        engram: true,
        tables: "mmap",
        hot_cache: false,
        cold: false,
        prefetch: false,
    },
    Mode {
        name: "big-disk-cold",
        big: true,
        engram: true,
        tables: "disk",
        hot_cache: false,
        cold: true,
        prefetch: true,
    },
    Mode {
        name: "big-disk-warm",
        big: true,
        engram: true,
        tables: "disk",
        hot_cache: false,
        cold: false,
        prefetch: true,
    },
    Mode {
        name: "big-disk-cache-cold",
        big: true,
        engram: true,
        tables: "disk",
        hot_cache: true,
        cold: true,
        prefetch: true,
    },
    Mode {
        name: "big-disk-cache-warm",
        big: true,
        engram: true,
        tables: "disk",
        hot_cache: true,
        cold: false,
        prefetch: true,
    },
];

pub fn run(args: BenchTablesArgs) -> Result<()> {
    let provenance = crate::provenance::provenance();
    let engram = ensure_cli(true)?;
    let model = ensure_model()?;
    let host = ensure_host(args.release)?;
    let small = ensure_checkpoint(&engram, &model, DEMO.0, DEMO.1)?;
    let big = ensure_checkpoint(&engram, &model, BIG.0, BIG.1)?;
    let docs = corpus::python_library_docs()?;
    let prompts = corpus::doc_prompts(&docs, args.prompts, 1200)?;
    let prompt_refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let limit = (args.mem_gib * (1u64 << 30) as f64) as u64;
    let cgroup = MemoryCgroup::create("engram-bench-tables", limit)?;
    let table_bytes = |dir: &Path| fs::metadata(dir.join("engram.safetensors")).map(|m| m.len());
    let (small_bytes, big_bytes) = (table_bytes(&small)?, table_bytes(&big)?);
    if big_bytes < 2 * limit {
        eprintln!(
            "xtask: warning: the big table ({big_bytes} bytes) is less than twice the limit ({limit})"
        );
    }

    let mut runs = Vec::new();
    for repeat in 0..args.repeats.max(1) {
        for mode in &MODES {
            let dir = if mode.big { &big } else { &small };
            let cold = mode.cold && drop_page_cache();
            let mut extra = vec!["--sequential"];
            if !mode.engram {
                extra.push("--no-engram");
            }
            let table_file = dir.join("engram.safetensors");
            let resident_before = resident_bytes(&table_file);
            let mut cmd = cgroup.command(&host);
            cmd.args(host_args(dir, &prompt_refs, args.max_tokens, &extra))
                .env(TABLES_ENV, mode.tables);
            cmd.env(PREFETCH_ENV, if mode.prefetch { "on" } else { "off" });
            if mode.hot_cache {
                cmd.env(HOT_CACHE_ENV, &args.hot_cache);
            } else {
                cmd.env_remove(HOT_CACHE_ENV);
            }
            let v = run_host_command(cmd, &format!("[{}] {}", mode.name, dir.display()))?;
            let mut row = summarize(&v)?;
            // What the run brought into the page cache of the table file: the table's
            // bytes read from disk, kernel read-ahead included (the host's own
            // /proc/self/io misses reads io_uring's workers do for it).
            // null where fincore cannot tell (not installed): never a made-up 0.
            let read = resident_bytes(&table_file)
                .zip(resident_before)
                .map(|(after, before)| after.saturating_sub(before));
            row["table_read_bytes"] = json!(read.filter(|_| mode.engram));
            row["mode"] = json!(mode.name);
            row["repeat"] = json!(repeat);
            row["cold"] = json!(cold);
            row["tables"] = json!(mode.tables);
            row["prefetch"] = json!(mode.prefetch);
            row["hot_cache"] = json!(mode.hot_cache.then_some(&args.hot_cache));
            row["table_bytes"] = json!(if !mode.engram {
                0
            } else if mode.big {
                big_bytes
            } else {
                small_bytes
            });
            eprintln!(
                "xtask:   {:<22} prefill {:>7.1} tok/s  decode {:>6.2} tok/s  fetch {:>6.3} s  exposed {:>6.3} s  table read {:>6.1} MB  hits {:.3}",
                mode.name,
                row["prefill_tok_per_s"].as_f64().unwrap_or(0.0),
                row["decode_tok_per_s"].as_f64().unwrap_or(0.0),
                row["fetch_time_s"].as_f64().unwrap_or(0.0),
                row["exposed_wait_s"].as_f64().unwrap_or(0.0),
                row["table_read_bytes"].as_f64().unwrap_or(0.0) / 1e6,
                row["cache_hit_rate"].as_f64().unwrap_or(0.0),
            );
            runs.push(row);
        }
    }
    let best = |mode: &str, key: &str| {
        runs.iter()
            .filter(|r| r["mode"] == mode)
            .filter_map(|r| r[key].as_f64())
            .fold(f64::NAN, f64::max)
    };
    let ratio = |a: f64, b: f64| {
        if a.is_finite() && b > 0.0 {
            json!(a / b)
        } else {
            Value::Null
        }
    };
    let mut out = json!({
        "ram_bytes": mem_total_bytes()?,
        "cgroup_limit_bytes": limit,
        "table_bytes": big_bytes,
        "ram_table_bytes": small_bytes,
        "decode_ratio_disk_vs_ram": ratio(best("big-disk-cache-warm", "decode_tok_per_s"), best("ram-table", "decode_tok_per_s")),
        "cold_prefill_ratio_disk_vs_ram": ratio(best("big-disk-cache-cold", "prefill_tok_per_s"), best("ram-table", "prefill_tok_per_s")),
        "decode_ratio_disk_no_readahead": ratio(best("big-mmap-warm-sync", "decode_tok_per_s"), best("ram-table", "decode_tok_per_s")),
        "cold_prefill_ratio_no_readahead": ratio(best("big-mmap-cold-sync", "prefill_tok_per_s"), best("ram-table", "prefill_tok_per_s")),
        "decode_ratio_mmap_prefetched": ratio(best("big-mmap-warm", "decode_tok_per_s"), best("ram-table", "decode_tok_per_s")),
        "cold_prefill_ratio_mmap_prefetched": ratio(best("big-mmap-cold", "prefill_tok_per_s"), best("ram-table", "prefill_tok_per_s")),
        "cache_hit_rate": best("big-disk-cache-warm", "cache_hit_rate"),
        "model": "SmolLM2-135M-Instruct, f32, CPU",
        "checkpoints": {"ram": DEMO.0, "big": format!("{} ({})", BIG.0, BIG.1.join(" "))},
        "prompts": format!("{} files of the Python 3.11 library docs (python3.11-doc {}, sha256 {}), 1200 characters each, one after another", args.prompts, corpus::PINNED_VERSION, corpus::LIBRARY_SHA256),
        "max_tokens": args.max_tokens,
        "profile": if args.release { "release" } else { "debug (numeric crates opt-level 3)" },
        "ratios_take": "the best run of each mode",
        "runs": runs,
    });
    crate::provenance::stamp(&mut out, provenance);
    println!("{out}");
    if let Some(path) = &args.out {
        crate::e2e::write_json(path, &out)?;
    }
    Ok(())
}

/// Prefill and decode tokens/s over all the run's prompts (tokens over time, each
/// prompt's time from its own figures), and the Engram stats of the run.
fn summarize(v: &Value) -> Result<Value> {
    let outputs = v["outputs"]
        .as_array()
        .context("no outputs from the host")?;
    let (mut p_tok, mut p_s, mut d_tok, mut d_s) = (0.0, 0.0, 0.0, 0.0);
    for o in outputs {
        let pt = o["prompt_tokens"].as_f64().unwrap_or(0.0);
        let ct = o["completion_tokens"].as_f64().unwrap_or(0.0);
        let prate = o["prompt_tok_per_s"].as_f64().unwrap_or(0.0);
        let crate_ = o["completion_tok_per_s"].as_f64().unwrap_or(0.0);
        if prate > 0.0 {
            p_tok += pt;
            p_s += pt / prate;
        }
        if crate_ > 0.0 {
            d_tok += ct;
            d_s += ct / crate_;
        }
    }
    let stats = &v["lookup_stats"][0]["stats"];
    let hits = stats["cache_hits"].as_f64().unwrap_or(0.0);
    let misses = stats["cache_misses"].as_f64().unwrap_or(0.0);
    Ok(json!({
        "prefill_tokens": p_tok,
        "decode_tokens": d_tok,
        "prefill_tok_per_s": if p_s > 0.0 { p_tok / p_s } else { 0.0 },
        "decode_tok_per_s": if d_s > 0.0 { d_tok / d_s } else { 0.0 },
        "exposed_wait_s": stats["exposed_wait"],
        "fetch_time_s": stats["fetch_time"],
        "cache_hit_rate": if hits + misses > 0.0 { hits / (hits + misses) } else { 0.0 },
        "disk_tier_read_bytes": stats["backing_bytes"],
        "disk_tier_reads": stats["backing_reads"],
        "storage_read_bytes": v["storage_read_bytes"],
        "lookup_stats": stats,
    }))
}

/// Drops the page cache (needs root); false where it cannot.
/// Bytes of `file` in the page cache (util-linux `fincore`); None where it cannot tell.
fn resident_bytes(file: &Path) -> Option<u64> {
    Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(file)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
}

fn drop_page_cache() -> bool {
    let synced = Command::new("sync").status().is_ok_and(|s| s.success());
    synced && fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

fn mem_total_bytes() -> Result<u64> {
    let info = fs::read_to_string("/proc/meminfo")?;
    info.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .context("no MemTotal in /proc/meminfo")
}

/// A memory cgroup (v1 `memory` controller or v2 `memory.max`) that processes started by
/// [`MemoryCgroup::command`] run in.
struct MemoryCgroup {
    procs: PathBuf,
}

impl MemoryCgroup {
    fn create(name: &str, limit: u64) -> Result<Self> {
        let v1 = Path::new("/sys/fs/cgroup/memory");
        let v2 = Path::new("/sys/fs/cgroup");
        let (dir, file) = if v1.join("memory.limit_in_bytes").exists() {
            (v1.join(name), "memory.limit_in_bytes")
        } else if fs::read_to_string(v2.join("cgroup.controllers"))
            .is_ok_and(|c| c.contains("memory"))
        {
            (v2.join(name), "memory.max")
        } else {
            bail!("no memory cgroup controller here: cannot bound the host's memory");
        };
        fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create the cgroup {} (needs root)", dir.display()))?;
        fs::write(dir.join(file), limit.to_string())
            .with_context(|| format!("cannot set {}", dir.join(file).display()))?;
        Ok(Self {
            procs: dir.join("cgroup.procs"),
        })
    }

    /// `program` run inside the cgroup (a shell moves itself in, then execs it).
    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("echo $$ > \"$0\" && exec \"$@\"")
            .arg(&self.procs)
            .arg(program);
        cmd
    }
}
