//! What the `mistralrs serve` test binaries share: the paths `cargo xtask mistralrs-test`
//! passes, a server on a free loopback port, and the Python clients that talk to it.
// Each test binary compiles this module and uses a part of it.
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Setup {
    /// `mistralrs` (mistralrs-cli) built with the `engram` feature.
    pub cli: PathBuf,
    /// Where `pip install --target` put the `openai` package.
    pub pythonpath: PathBuf,
    pub model: PathBuf,
    pub zero: PathBuf,
    pub seeded: PathBuf,
    pub strong: PathBuf,
    pub max_tokens: usize,
    pub scratch: PathBuf,
}

pub fn setup() -> Setup {
    let var = super::env_path;
    let scratch = super::scratch();
    Setup {
        cli: var("ENGRAM_E2E_MISTRALRS"),
        pythonpath: var("ENGRAM_E2E_PYTHONPATH"),
        model: var("ENGRAM_E2E_MODEL"),
        zero: var("ENGRAM_E2E_ZERO"),
        seeded: var("ENGRAM_E2E_SEEDED"),
        strong: var("ENGRAM_E2E_STRONG"),
        max_tokens: super::max_tokens(),
        scratch,
    }
}

/// A running `mistralrs serve`, killed when dropped. Its output goes to `log`.
pub struct Server {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Server {
    /// Starts `mistralrs serve` on `model` (a directory) on a free loopback port and waits
    /// until it listens (it binds its port only once the model is loaded).
    pub fn start(s: &Setup, model: &Path, name: &str) -> Server {
        Self::start_with(s, model, name, &[])
    }

    /// [`Server::start`] with `extra` options for `mistralrs serve` (`--isq q4k`).
    pub fn start_with(s: &Setup, model: &Path, name: &str, extra: &[&str]) -> Server {
        Self::start_with_env(s, model, name, extra, &[])
    }

    /// [`Server::start_with`] with `env` set for the server (`ENGRAM_TABLES=ram`).
    pub fn start_with_env(
        s: &Setup,
        model: &Path,
        name: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Server {
        Self::try_start_with(s, model, name, extra, env).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Server::start_with`], or what went wrong (with the server's output) when it exits
    /// before listening.
    pub fn try_start_with(
        s: &Setup,
        model: &Path,
        name: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Server, String> {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = s.scratch.join(format!("serve-{name}-{port}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(&s.cli)
            .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--cpu", "--dtype", "f32"])
            .args(extra)
            .arg("-m")
            .arg(model)
            // Engram's lookup stats as a log line every second (when they changed).
            .env("ENGRAM_STATS_INTERVAL", "1")
            .envs(env.iter().copied())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", s.cli.display()));
        let mut server = Server { child, port, log };
        server.wait_listening(Duration::from_secs(600))?;
        Ok(server)
    }

    fn wait_listening(&mut self, limit: Duration) -> Result<(), String> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(format!(
                    "mistralrs serve exited ({status}) before listening:\n{}",
                    self.log_text()
                ));
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            assert!(
                started.elapsed() < limit,
                "mistralrs serve did not listen within {limit:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `requests` one after another through `tests/openai_client.py`; returns its JSON.
pub fn openai_client(s: &Setup, server: &Server, requests: &Value) -> Value {
    python_client(s, server, "openai_client.py", requests)
}

/// Runs the Python client `script` (in `mistralrs-host/tests/`, beside
/// `ENGRAM_E2E_OPENAI_CLIENT`) against `server` with `input` on its standard input, with
/// the `openai` package (and httpx2, which it installs) on `PYTHONPATH`; returns the JSON
/// it prints. Fails with its standard error and the server's log when it fails.
pub fn python_client(s: &Setup, server: &Server, script: &str, input: &Value) -> Value {
    let openai = std::env::var_os("ENGRAM_E2E_OPENAI_CLIENT")
        .map(PathBuf::from)
        .expect("ENGRAM_E2E_OPENAI_CLIENT is not set: run with `cargo xtask mistralrs-test`");
    let script = openai.with_file_name(script);
    let mut child = Command::new(std::env::var("PYTHON").unwrap_or_else(|_| "python3".into()))
        .arg(&script)
        .arg(server.base_url())
        .env("PYTHONPATH", &s.pythonpath)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    serde_json::to_writer(child.stdin.take().unwrap(), input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{} failed ({}):\n{}\nserver log:\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr),
        server.log_text()
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The number before `what` (" live sequences") in an `Engram stats` line.
pub fn stats_number(line: &str, what: &str) -> u64 {
    let head = &line[..line
        .find(what)
        .unwrap_or_else(|| panic!("no {what:?} in {line}"))];
    head.split_whitespace().last().unwrap().parse().unwrap()
}

/// The rows and live sequences of the server's last `Engram stats` line, waiting up to
/// 10 s for one written after the requests (the line comes every second when they changed).
pub fn last_stats_line(server: &Server) -> (u64, u64) {
    let number_before = stats_number;
    let started = Instant::now();
    loop {
        let log = server.log_text();
        let line = log.lines().rev().find(|l| l.contains("Engram stats"));
        if let Some(line) = line {
            let (steps, rows) = (number_before(line, " steps"), number_before(line, " rows"));
            // The warm-up request at load is one step; the requests made many more.
            if steps > 1 {
                return (rows, number_before(line, " live sequences"));
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no Engram stats line after the requests:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The server's last `Engram stats` line, read 2.5 s (over two stats intervals) after the
/// call so that it counts every step before it; `None` while the stats never changed.
pub fn settled_stats_line(server: &Server) -> Option<String> {
    std::thread::sleep(Duration::from_millis(2500));
    let log = server.log_text();
    log.lines()
        .rev()
        .find(|l| l.contains("Engram stats"))
        .map(str::to_string)
}

/// POSTs `body` (JSON) to `path` (`/v1/completions`) of the server over a plain
/// HTTP/1.1 connection (`Connection: close`); returns the status and the response body.
/// Any status is returned; a connection the server drops or resets is an `Err`.
pub fn http_post(server: &Server, path: &str, body: &Value) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let body = body.to_string();
    let mut stream = TcpStream::connect(("127.0.0.1", server.port))?;
    stream.set_read_timeout(Some(Duration::from_secs(600)))?;
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        server.port,
        body.len()
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let response = String::from_utf8_lossy(&response);
    let (head, rest) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no HTTP status in {head:?}")))?;
    // A chunked body: drop the chunk sizes (one chunk or a few, all text here).
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        rest.split("\r\n")
            .enumerate()
            .filter(|(i, _)| i % 2 == 1)
            .map(|(_, s)| s)
            .collect()
    } else {
        rest.to_string()
    };
    Ok((status, body))
}
