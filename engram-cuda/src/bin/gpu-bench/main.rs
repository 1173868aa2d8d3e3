//! `gpu-bench`: what the Engram layer costs on this GPU, as one table (and JSON), every
//! figure a fraction of a limit measured in the same run.
//!
//! 1. `link`: pinned and pageable host-to-device copies, device-to-device copy.
//! 2. `gather`: rows per placement (device, pinned host from RAM and from a mapped file,
//!    zero-copy RAM and mapped file, device cache at 50% and 90% hits), for FP8 (264-byte
//!    rows), bf16 and f32 rows, at 1, 64, 4096 and 65536 rows per call.
//! 3. `staging`: the host side of a pinned-host prefetch (de-duplication, row copies into
//!    write-combined pinned, cached pinned and ordinary memory), serial and parallel.
//! 4. `layer`: the whole layer's device time per token at a V4.1 layer size, both
//!    variants, decode (1-64 tokens) and prefill.
//! 5. `latency`: a decode step's lookup, from the call to rows ready on the device,
//!    prefetched and not, from a large FP8 table.
//! 6. `step`: a simulated host step, busy GPU work then the Engram layer, the table
//!    offloaded (prefetched at step start, or fetched at the layer) against resident.
//! 7. `targets`: the targets judged from the figures above.
//!
//! `--only profile` runs a few device-table gathers and nothing else, for `ncu`.
//!
//! Usage: `gpu-bench [--json PATH] [--quick] [--probe] [--only SECTION,...] [--rows N]
//! [--hidden N] [--prefill N] [--latency-rows N] [--step-tokens N] [--busy-us N]
//! [--steps N]`. JSON goes to `--json`, else to `$OUT/gpu-bench.json` when `OUT` is set;
//! it is rewritten after each section, so a run cut short keeps what it measured. A
//! section that fails is recorded under `errors` and the others still run. The commit
//! is taken from `ENGRAM_COMMIT`, the driver release from `ENGRAM_DRIVER_RELEASE`. Exit status: 0, 1 when a section failed, 2 when there
//! is no GPU.

mod data;
mod gather;
mod latency;
mod layer;
mod link;
mod report;
mod staging;
mod step;
mod targets;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use engram_cuda::{probe, CudaBackend};
use serde_json::{json, Value};

use crate::report::{Report, Res};

const SECTIONS: [&str; 5] = ["gather", "staging", "layer", "latency", "step"];
/// Sections run only when named in `--only`.
const EXTRA: [&str; 1] = ["profile"];

pub struct Args {
    json: Option<PathBuf>,
    quick: bool,
    probe: bool,
    only: Vec<String>,
    /// Rows of the gather and step tables.
    pub rows: u64,
    hidden: usize,
    prefill: usize,
    latency_rows: u64,
    pub step_tokens: usize,
    pub busy_us: u64,
    pub steps: usize,
}

const USAGE: &str = "usage: gpu-bench [--json PATH] [--quick] [--probe] [--only SECTION,...] \
     [--rows N] [--hidden N] [--prefill N] [--latency-rows N] [--step-tokens N] \
     [--busy-us N] [--steps N]; sections: gather, staging, layer, latency, step (the \
     default: all five), profile (a few device gathers for ncu)";

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        json: None,
        quick: false,
        probe: false,
        only: Vec::new(),
        rows: 1 << 20,
        hidden: 7168,
        prefill: 4096,
        latency_rows: 1 << 24,
        step_tokens: 512,
        busy_us: 2000,
        steps: 10,
    };
    let mut it = std::env::args().skip(1);
    let (mut rows_set, mut latency_set) = (false, false);
    while let Some(arg) = it.next() {
        let mut val = |name: &str| it.next().ok_or(format!("{name} needs a value"));
        let num = |s: String, name: &str| {
            s.parse::<u64>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or(format!("{name}: not a positive number: {s}"))
        };
        match arg.as_str() {
            "--json" => a.json = Some(PathBuf::from(val("--json")?)),
            "--quick" => a.quick = true,
            "--probe" => a.probe = true,
            "--only" => {
                for s in val("--only")?.split(',') {
                    if !SECTIONS.contains(&s) && !EXTRA.contains(&s) {
                        return Err(format!("--only: unknown section {s}; {USAGE}"));
                    }
                    a.only.push(s.to_string());
                }
            }
            "--rows" => {
                a.rows = num(val("--rows")?, "--rows")?;
                rows_set = true;
            }
            "--hidden" => a.hidden = num(val("--hidden")?, "--hidden")? as usize,
            "--prefill" => a.prefill = num(val("--prefill")?, "--prefill")? as usize,
            "--latency-rows" => {
                a.latency_rows = num(val("--latency-rows")?, "--latency-rows")?;
                latency_set = true;
            }
            "--step-tokens" => {
                a.step_tokens = num(val("--step-tokens")?, "--step-tokens")? as usize
            }
            "--busy-us" => a.busy_us = num(val("--busy-us")?, "--busy-us")?,
            "--steps" => a.steps = num(val("--steps")?, "--steps")? as usize,
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other}; {USAGE}")),
        }
    }
    if a.quick {
        if !rows_set {
            a.rows = 1 << 16;
        }
        if !latency_set {
            a.latency_rows = 1 << 18;
        }
        a.hidden = a.hidden.min(1024);
        a.prefill = a.prefill.min(512);
        a.step_tokens = a.step_tokens.min(128);
        a.steps = a.steps.min(3);
    }
    if a.rows < 4 * 65536 && !a.quick {
        return Err("--rows must be at least 262144 (65536 distinct rows per call, a cache of a quarter of the table)".into());
    }
    Ok(a)
}

impl Args {
    fn runs(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }

    fn gather_sizes(&self) -> Vec<usize> {
        let all = [1, 64, 4096, 65536];
        all.into_iter()
            .filter(|&n| (n as u64) * 4 <= self.rows)
            .collect()
    }

    fn layer_tokens(&self) -> Vec<usize> {
        vec![1, 4, 16, 64, self.prefill]
    }

    fn latency_tokens(&self) -> Vec<usize> {
        vec![1, 8, 32]
    }
}

/// Writes the report's JSON (after every section: a run cut short keeps what it has).
fn write_json(path: Option<&PathBuf>, r: &Report) {
    let Some(path) = path else { return };
    let tmp = path.with_extension("json.tmp");
    let res = serde_json::to_string_pretty(&Value::Object(r.json.clone()))
        .map_err(|e| e.to_string())
        .and_then(|s| std::fs::write(&tmp, s).map_err(|e| e.to_string()))
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| e.to_string()));
    if let Err(e) = res {
        eprintln!("gpu-bench: cannot write {}: {e}", path.display());
    }
}

fn run(a: &Args, json_path: Option<&PathBuf>, r: &mut Report) -> Res<Vec<String>> {
    let be = CudaBackend::try_new(0)?;
    eprintln!("gpu-bench: {}", be.info());
    r.json
        .insert("device".into(), serde_json::to_value(be.info())?);
    r.json.insert(
        "params".into(),
        json!({"rows": a.rows, "hidden": a.hidden, "prefill": a.prefill,
               "latency_rows": a.latency_rows, "step_tokens": a.step_tokens,
               "busy_us": a.busy_us, "steps": a.steps, "quick": a.quick,
               "threads": rayon::current_num_threads()}),
    );
    let limits = link::measure(&be, r)?;
    write_json(json_path, r);
    let dir = data::tempfile_dir()?;
    let mut failed = Vec::new();
    for section in SECTIONS.into_iter().chain(EXTRA) {
        if !a.runs(section) || (EXTRA.contains(&section) && a.only.is_empty()) {
            continue;
        }
        let t = Instant::now();
        eprintln!("gpu-bench: section {section}");
        let res = match section {
            "gather" => gather::measure(&be, a.rows, &a.gather_sizes(), limits, &dir, r),
            "layer" => layer::measure(&be, a.hidden, &a.layer_tokens(), limits, r),
            "latency" => latency::measure(&be, a.latency_rows, &a.latency_tokens(), r),
            "step" => step::measure(&be, a, r),
            "staging" => staging::measure(&be, a.rows, r),
            "profile" => gather::profile(&be, a.rows),
            _ => unreachable!("SECTIONS"),
        };
        let secs = t.elapsed().as_secs_f64();
        if let Err(e) = res {
            eprintln!("gpu-bench: section {section} failed after {secs:.1} s: {e}");
            failed.push(section.to_string());
            let errors = r
                .json
                .entry("errors")
                .or_insert_with(|| Value::Object(Default::default()));
            errors[section] = json!(e.to_string());
        } else {
            eprintln!("gpu-bench: section {section} took {secs:.1} s");
        }
        r.json
            .entry("section_seconds")
            .or_insert_with(|| Value::Object(Default::default()))[section] = json!(secs);
        write_json(json_path, r);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let t = targets::evaluate(&r.json);
    for v in &t {
        let met = match v["met"].as_bool() {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        };
        r.add(
            "target",
            v["target"].as_str().unwrap_or("?").to_string(),
            v["measured"].as_f64().unwrap_or(f64::NAN),
            "",
            format!("goal {}: {met}", v["goal"].as_str().unwrap_or("?")),
        );
    }
    r.json.insert("targets".into(), Value::Array(t));
    Ok(failed)
}

fn main() -> ExitCode {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(64);
        }
    };
    let p = probe();
    if a.probe {
        println!("{p}");
        return match &p.unavailable {
            None => ExitCode::SUCCESS,
            Some(_) => ExitCode::from(2),
        };
    }
    if let Some(why) = &p.unavailable {
        eprintln!("gpu-bench: no GPU: {why}");
        return ExitCode::from(2);
    }
    let json_path = a
        .json
        .clone()
        .or_else(|| std::env::var_os("OUT").map(|o| PathBuf::from(o).join("gpu-bench.json")));
    let mut r = Report::default();
    r.json.insert(
        "commit".into(),
        json!(std::env::var("ENGRAM_COMMIT").unwrap_or_else(|_| "unknown".into())),
    );
    // The driver's release (the kernel module, e.g. 580.159.04) as nvidia-smi gives it;
    // run.sh passes it on.
    r.json.insert(
        "driver_release".into(),
        json!(std::env::var("ENGRAM_DRIVER_RELEASE").unwrap_or_else(|_| "unknown".into())),
    );
    r.json.insert(
        "probe".into(),
        serde_json::to_value(&p).unwrap_or(Value::Null),
    );
    let t = Instant::now();
    let outcome = run(&a, json_path.as_ref(), &mut r);
    r.json
        .insert("seconds".into(), json!(t.elapsed().as_secs_f64()));
    r.print();
    write_json(json_path.as_ref(), &r);
    if let Some(p) = &json_path {
        println!("\nJSON written to {}", p.display());
    }
    match outcome {
        Ok(failed) if failed.is_empty() => ExitCode::SUCCESS,
        Ok(failed) => {
            eprintln!("gpu-bench: failed sections: {}", failed.join(", "));
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("gpu-bench: failed: {e}");
            ExitCode::FAILURE
        }
    }
}
