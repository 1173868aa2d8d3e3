//! Where and when a benchmark ran, for the result files in docs/results/: the machine,
//! the commit (with `-dirty` when the tree had uncommitted changes) and the UTC date of
//! the run (not of the commit).

use std::process::Command;

use serde_json::{json, Value};

use crate::e2e;

/// `{"machine", "commit", "date"}` now: call it when a run starts.
pub fn provenance() -> Value {
    let commit = git(&["rev-parse", "--short", "HEAD"]);
    let dirty = !git(&["status", "--porcelain", "--untracked-files=no"]).is_empty();
    json!({
        "machine": machine(),
        "commit": if dirty { format!("{commit}-dirty") } else { commit },
        "date": output(Command::new("date").args(["-u", "+%F"])),
    })
}

fn git(args: &[&str]) -> String {
    output(Command::new("git").args(args).current_dir(e2e::root()))
}

/// CPU model and core count, memory.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, m)| m.trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb / (1 << 20));
    format!("{cpu}, {cores} cores, {mem} GiB")
}

/// A command's standard output, trimmed; empty when it cannot run.
pub fn output(cmd: &mut Command) -> String {
    cmd.output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Adds the provenance keys, taken when the run started (a commit made while it ran
/// is not the code that ran), to a result object.
pub fn stamp(out: &mut Value, started: Value) {
    if let (Some(obj), Value::Object(p)) = (out.as_object_mut(), started) {
        obj.extend(p);
    }
}
