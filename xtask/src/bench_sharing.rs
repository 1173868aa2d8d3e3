//! `cargo xtask bench-sharing`: one copy of the tables per host. Two host processes serve
//! the same Engram checkpoint at once, for each way of holding the tables (`mmap`, `disk`,
//! `ram`); while they run, each one's resident (RSS) and proportional (PSS) memory is
//! sampled from /proc, in all and for the table file's mapping alone. A mapped table's
//! pages are the page cache's, shared by both (PSS about half of RSS); the disk tier
//! reads through the same page cache into small per-step buffers; RAM mode copies the
//! tables into each process (the runtime logs this at open).

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::corpus;
use crate::e2e::{ensure_checkpoint, ensure_cli, ensure_host, ensure_model, host_args, DEMO};

#[derive(Clone, Debug, clap::Args)]
pub struct BenchSharingArgs {
    /// Tokens generated per prompt (the processes must live long enough to sample).
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Use the release build of the host.
    #[arg(long)]
    release: bool,
    /// Also write the JSON object to this file (under a temporary name, then renamed).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

/// Memory of one process, in bytes: all of it, and the table file's mapping.
#[derive(Clone, Copy, Default)]
struct Sample {
    rss: u64,
    pss: u64,
    table_rss: u64,
    table_pss: u64,
}

pub fn run(args: BenchSharingArgs) -> Result<()> {
    let provenance = crate::provenance::provenance();
    let engram = ensure_cli(true)?;
    let model = ensure_model()?;
    let host = ensure_host(args.release)?;
    let demo = ensure_checkpoint(&engram, &model, DEMO.0, DEMO.1)?;
    let docs = corpus::python_library_docs()?;
    let prompts = corpus::doc_prompts(&docs, 4, 1200)?;
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let table_file = demo.join("engram.safetensors");
    let table_bytes = fs::metadata(&table_file)?.len();
    let mut modes = Vec::new();
    for tables in ["mmap", "disk", "ram"] {
        let hosts: Vec<Child> = (0..2)
            .map(|_| {
                Command::new(&host)
                    .args(host_args(&demo, &refs, args.max_tokens, &["--sequential"]))
                    .env("ENGRAM_TABLES", tables)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .with_context(|| format!("cannot run {}", host.display()))
            })
            .collect::<Result<_>>()?;
        let peaks = watch(hosts, &table_file)?;
        eprintln!(
            "xtask:   {tables:<5} rss {:>6.0} MB / pss {:>6.0} MB per process; table mapping rss {:>6.0} MB / pss {:>6.0} MB",
            peaks[0].rss as f64 / 1e6,
            peaks[0].pss as f64 / 1e6,
            peaks[0].table_rss as f64 / 1e6,
            peaks[0].table_pss as f64 / 1e6
        );
        let procs: Vec<Value> = peaks
            .iter()
            .map(|p| {
                json!({"rss_bytes": p.rss, "pss_bytes": p.pss,
                       "table_mapping_rss_bytes": p.table_rss, "table_mapping_pss_bytes": p.table_pss})
            })
            .collect();
        modes.push(json!({"tables": tables, "processes": procs}));
    }
    let mut out = json!({
        "checkpoint": DEMO.0,
        "table_bytes": table_bytes,
        "sampled": "every 200 ms while both processes ran; each figure is its own peak",
        "modes": modes,
    });
    crate::provenance::stamp(&mut out, provenance);
    println!("{out}");
    if let Some(path) = &args.out {
        crate::e2e::write_json(path, &out)?;
    }
    Ok(())
}

/// Samples both processes until they exit; returns each one's peak of each figure
/// (separately: the whole process peaks while the model loads, before any table row is
/// read, and the table mapping later).
fn watch(mut hosts: Vec<Child>, table_file: &Path) -> Result<Vec<Sample>> {
    let mut peaks: Vec<Sample> = vec![Sample::default(); hosts.len()];
    loop {
        for (peak, h) in peaks.iter_mut().zip(&hosts) {
            peak.raise(&sample(h.id(), table_file).unwrap_or_default());
        }
        let mut running = 0;
        for h in &mut hosts {
            match h.try_wait()? {
                None => running += 1,
                Some(status) if !status.success() => bail!("a host exited with {status}"),
                Some(_) => {}
            }
        }
        if running < hosts.len() {
            // Once one has ended, the other no longer shares anything with it.
            for h in &mut hosts {
                let _ = h.wait();
            }
            return Ok(peaks);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

impl Sample {
    fn raise(&mut self, now: &Sample) {
        self.rss = self.rss.max(now.rss);
        self.pss = self.pss.max(now.pss);
        self.table_rss = self.table_rss.max(now.table_rss);
        self.table_pss = self.table_pss.max(now.table_pss);
    }
}

/// RSS and PSS of process `pid`, in all and of its mappings of `table_file`
/// (/proc/PID/smaps).
fn sample(pid: u32, table_file: &Path) -> Option<Sample> {
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    let name = table_file.to_string_lossy();
    let mut s = Sample::default();
    let mut in_table = false;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            in_table = line.ends_with(name.as_ref());
            continue;
        }
        let kib = || {
            words
                .clone()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
                * 1024
        };
        match first {
            "Rss:" => {
                s.rss += kib();
                if in_table {
                    s.table_rss += kib();
                }
            }
            "Pss:" => {
                s.pss += kib();
                if in_table {
                    s.table_pss += kib();
                }
            }
            _ => {}
        }
    }
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parser finds a mapped file's pages: this test binary's own code is mapped
    /// from its file and resident while it runs.
    #[test]
    fn smaps_sample_finds_a_mapped_file() {
        let exe = std::env::current_exe().unwrap();
        let s = sample(std::process::id(), &exe).unwrap();
        assert!(s.rss > 0 && s.pss > 0, "rss {} pss {}", s.rss, s.pss);
        assert!(s.table_rss > 0, "no resident pages of {}", exe.display());
        assert!(s.table_rss <= s.rss && s.table_pss <= s.table_rss);
        let other = sample(std::process::id(), Path::new("/no/such/file")).unwrap();
        assert_eq!((other.table_rss, other.table_pss), (0, 0));
    }
}
