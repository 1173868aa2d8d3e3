//! `cargo xtask bench-store`: the patched mistral.rs host on SmolLM2 with the demo's
//! Engram checkpoint, tables local (memory-mapped, warm) against tables in a Redis
//! Cluster on loopback (`ENGRAM_TABLES=redis://...`), runs alternating so that the
//! machine's drift hits both modes alike. Prints one JSON object (the keys of
//! docs/results/distributed-store.json); the ratios are medians of the store/local
//! ratios of adjacent runs, with their spread.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use engram_redis::testing::TestCluster;
use serde_json::{json, Value};

use crate::{e2e, provenance};

#[derive(clap::Args)]
pub struct BenchStoreArgs {
    /// Use the release build of the host (default: the debug build, numeric crates
    /// optimized, as `bench-e2e`).
    #[arg(long)]
    release: bool,
    /// Tokens generated per run.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// Measured runs per mode (after one warm-up run of each).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Nodes of the cluster started on loopback ports.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Run this host binary instead of building one (`cargo xtask mistralrs-build`).
    #[arg(long)]
    host: Option<std::path::PathBuf>,
    /// Extra environment for the store runs, `NAME=VALUE` (a hot-row cache's switch).
    #[arg(long)]
    store_env: Vec<String>,
}

pub fn run(args: BenchStoreArgs) -> Result<()> {
    let provenance = crate::provenance::provenance();
    let engram = e2e::ensure_cli(true)?;
    let model = e2e::ensure_model()?;
    let host = match &args.host {
        Some(h) => h.clone(),
        None => e2e::ensure_host(args.release)?,
    };
    let demo = e2e::ensure_checkpoint(&engram, &model, e2e::DEMO.0, e2e::DEMO.1)?;
    let cluster = TestCluster::start("bench-store", args.nodes)
        .context("bench-store needs redis-server and redis-cli (apt-get install redis-server)")?;
    let url = cluster.url("timeout_ms=5000");
    eprintln!("xtask: uploading {} to {url}", demo.display());
    let started = std::time::Instant::now();
    let status = Command::new(&engram)
        .args(["upload", "--model"])
        .arg(&demo)
        .args(["--store", &url])
        .status()
        .context("cannot run engram upload")?;
    anyhow::ensure!(status.success(), "engram upload failed ({status})");
    let upload_s = started.elapsed().as_secs_f64();

    let mut store_env = vec![("ENGRAM_TABLES".to_string(), url.clone())];
    for kv in &args.store_env {
        let (k, v) = kv.split_once('=').context("--store-env takes NAME=VALUE")?;
        store_env.push((k.into(), v.into()));
    }
    let modes: [(&str, Vec<(String, String)>); 2] = [
        ("mmap", vec![("ENGRAM_TABLES".into(), "mmap".into())]),
        ("store", store_env),
    ];
    let mut runs = Vec::new();
    // Warm-up: the page cache holds the mapped tables, Redis its connections.
    for (_, env) in &modes {
        one_run(&host, &demo, args.max_tokens, env)?;
    }
    for repeat in 0..args.repeats.max(1) {
        for (name, env) in &modes {
            let mut row = one_run(&host, &demo, args.max_tokens, env)?;
            row["mode"] = json!(name);
            row["repeat"] = json!(repeat);
            runs.push(row);
        }
    }
    let stat = |mode: &str, key: &str| -> Vec<f64> {
        runs.iter()
            .filter(|r| r["mode"] == mode)
            .filter_map(|r| r[key].as_f64())
            .collect()
    };
    let pair_ratios = |key: &str| -> Vec<f64> {
        stat("store", key)
            .iter()
            .zip(stat("mmap", key))
            .map(|(s, m)| s / m)
            .collect()
    };
    let (decode, prefill) = (
        pair_ratios("decode_tok_per_s"),
        pair_ratios("prefill_tok_per_s"),
    );
    let mut out = json!({
        "engine": "redis-cluster",
        "redis_server": redis_version(),
        "nodes": args.nodes,
        "replicas": 0,
        "network": "loopback (127.0.0.1), same machine as the host",
        "model": "SmolLM2-135M-Instruct, f32, CPU",
        "checkpoint": "engram-demo (layers 1,15; orders 2-3; 8 heads; 512/order; vocab 646400; bf16 tables)",
        "profile": if args.release { "release" } else { "debug (numeric crates optimized)" },
        "max_tokens": args.max_tokens,
        "store_env": args.store_env,
        "upload_seconds": upload_s,
        "decode_ratio_store_vs_mmap": median(&decode),
        "decode_ratio_spread": [min(&decode), max(&decode)],
        "prefill_ratio_store_vs_mmap": median(&prefill),
        "prefill_ratio_spread": [min(&prefill), max(&prefill)],
        "round_trips_per_step": median(&stat("store", "round_trips_per_step")),
        "bytes_per_step": median(&stat("store", "store_bytes_per_step")),
        "exposed_wait_ms_per_step": {
            "mmap": median(&stat("mmap", "exposed_wait_ms_per_step")),
            "store": median(&stat("store", "exposed_wait_ms_per_step")),
        },
        "fetch_ms_per_step": {
            "mmap": median(&stat("mmap", "fetch_ms_per_step")),
            "store": median(&stat("store", "fetch_ms_per_step")),
        },
        "runs": runs,
    });
    provenance::stamp(&mut out, provenance);
    println!("{out}");
    drop(cluster);
    Ok(())
}

/// One host run with `env` added; its figures per step.
fn one_run(
    host: &Path,
    model: &Path,
    max_tokens: usize,
    env: &[(String, String)],
) -> Result<Value> {
    let v = e2e::run_host_with_env(
        host,
        &e2e::host_args(model, &[e2e::BENCH_PROMPT], max_tokens, &[]),
        env,
    )?;
    let o = &v["outputs"][0];
    let stats = &v["lookup_stats"][0]["stats"];
    let steps = stats["steps"].as_f64().unwrap_or(0.0).max(1.0);
    let per_step = |k: &str| stats[k].as_f64().map(|x| x / steps);
    Ok(json!({
        "prefill_tok_per_s": o["prompt_tok_per_s"],
        "decode_tok_per_s": o["completion_tok_per_s"],
        "prompt_tokens": o["prompt_tokens"],
        "completion_tokens": o["completion_tokens"],
        "round_trips_per_step": per_step("backing_reads"),
        "store_bytes_per_step": per_step("backing_bytes"),
        "table_bytes_per_step": per_step("bytes_fetched"),
        "rows_per_step": per_step("rows_fetched"),
        "exposed_wait_ms_per_step": per_step("exposed_wait").map(|s| s * 1e3),
        "fetch_ms_per_step": per_step("fetch_time").map(|s| s * 1e3),
        "lookup_stats": stats,
    }))
}

fn median(xs: &[f64]) -> Value {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => Value::Null,
        n if n % 2 == 1 => json!(v[n / 2]),
        n => json!((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

fn min(xs: &[f64]) -> Value {
    xs.iter()
        .copied()
        .reduce(f64::min)
        .map_or(Value::Null, |x| json!(x))
}

fn max(xs: &[f64]) -> Value {
    xs.iter()
        .copied()
        .reduce(f64::max)
        .map_or(Value::Null, |x| json!(x))
}

fn redis_version() -> String {
    provenance::output(Command::new("redis-server").arg("--version"))
}
