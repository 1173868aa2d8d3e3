//! `cargo xtask bench`: `engram bench --json` plus the numpy baseline of the original
//! hashing, run back to back, merged into one JSON object with the ratios.

use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::cargo;

pub fn run() -> Result<()> {
    cargo(&["build", "--release", "-p", "engram-cli"])?;
    let out = Command::new("target/release/engram")
        .args(["bench", "--json"])
        .output()?;
    if !out.status.success() {
        bail!(
            "engram bench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut report: Value =
        serde_json::from_slice(&out.stdout).context("engram bench printed no JSON")?;
    match numpy_baseline() {
        Ok(numpy) => {
            let ratio = |r: &Value, ours: &str, theirs: &str| {
                r[ours]
                    .as_f64()
                    .zip(numpy[theirs].as_f64())
                    .map(|(a, b)| a / b)
            };
            let prefill = ratio(&report, "hash_tokens_per_s", "numpy_hash_tokens_per_s");
            let decode = ratio(
                &report,
                "hash_decode_tokens_per_s",
                "numpy_hash_decode_tokens_per_s",
            );
            report["hash_vs_numpy"] = json!(prefill);
            report["hash_decode_vs_numpy"] = json!(decode);
            report["numpy"] = numpy;
        }
        Err(e) => report["numpy"] = json!({ "unavailable": format!("{e:#}") }),
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// Runs `scripts/numpy_hash_baseline.py` (needs python3 with numpy).
fn numpy_baseline() -> Result<Value> {
    let out = Command::new("python3")
        .arg("scripts/numpy_hash_baseline.py")
        .output()
        .context("python3 not found")?;
    if !out.status.success() {
        bail!(
            "numpy baseline failed (is numpy installed? `pip install numpy`): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}
