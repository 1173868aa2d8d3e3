//! A real Redis Cluster on loopback ports for tests: `redis-server` processes started in
//! a temporary directory, joined with `redis-cli --cluster create`, stopped on drop.
//! Nodes can be killed, restarted empty (same cluster identity and slots, no data),
//! paused (SIGSTOP: a node that takes connections and never answers) and slowed
//! (`DEBUG SLEEP`).
//!
//! Without `redis-server` on the PATH, [`TestCluster::start`] prints `skipped: ...` and
//! returns `None`; with `ENGRAM_REQUIRE_REDIS` set (CI sets it) it fails the test instead.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct TestCluster {
    dir: tempfile::TempDir,
    ports: Vec<u16>,
    nodes: Vec<Option<Child>>,
}

/// Whether a binary is on the PATH.
fn have(bin: &str) -> bool {
    Command::new(bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A port free now on 127.0.0.1 whose cluster bus port (+10000) is free too. Ports are
/// handed out in order from a range that depends on the process id, so the clusters of
/// tests running at once in this process never pick the same port (the kernel's
/// ephemeral ports could be handed to two tests before either node binds them).
fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let base = 20000 + (std::process::id() % 500) * 60;
    for _ in 0..3000 {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let port = (base + n % 30000) as u16;
        if !(20000..50000).contains(&port) {
            continue;
        }
        let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10000) {
            return port;
        }
    }
    panic!("no free loopback port pair for a Redis node");
}

impl TestCluster {
    /// Starts a cluster of `nodes` masters (no replicas) for test `test`.
    pub fn start(test: &str, nodes: usize) -> Option<Self> {
        if !have("redis-server") || !have("redis-cli") {
            let required =
                std::env::var("ENGRAM_REQUIRE_REDIS").is_ok_and(|v| !v.is_empty() && v != "0");
            assert!(
                !required,
                "{test}: ENGRAM_REQUIRE_REDIS is set but redis-server or redis-cli is not \
                 installed (apt-get install redis-server redis-tools)"
            );
            println!("skipped: {test}: redis-server is not installed");
            return None;
        }
        let mut cluster = Self {
            dir: tempfile::tempdir().expect("a temporary directory"),
            ports: (0..nodes).map(|_| free_port()).collect(),
            nodes: (0..nodes).map(|_| None).collect(),
        };
        for i in 0..nodes {
            cluster.spawn(i);
        }
        let addrs: Vec<String> = cluster
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        cluster.wait_ok();
        Some(cluster)
    }

    /// `redis://` URL of the cluster with the given query (`""` for none).
    pub fn url(&self, query: &str) -> String {
        let nodes: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        let q = if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        };
        format!("redis://{}{q}", nodes.join(","))
    }

    /// `127.0.0.1:port` of node `i`.
    pub fn addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.ports[i])
    }

    /// The node serving `addr`.
    pub fn index_of(&self, addr: &str) -> usize {
        (0..self.ports.len())
            .find(|&i| self.addr(i) == addr)
            .unwrap_or_else(|| panic!("{addr} is not a node of this cluster"))
    }

    fn spawn(&mut self, i: usize) {
        let port = self.ports[i];
        let dir = self.dir.path();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
            .args(["--cluster-node-timeout", "2000"])
            .arg("--dir")
            .arg(dir)
            // No persistence: a restarted node comes back empty.
            .args(["--save", "", "--appendonly", "no"])
            .args(["--enable-debug-command", "local", "--protected-mode", "no"])
            .arg("--logfile")
            .arg(dir.join(format!("{port}.log")))
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.nodes[i] = Some(child);
        let start = Instant::now();
        while self.cli(i, &["PING"]).trim() != "PONG" {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "redis node {port} did not answer PING; see {}",
                dir.join(format!("{port}.log")).display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `redis-cli -p PORT ARGS` on node `i`: its stdout.
    pub fn cli(&self, i: usize, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.ports[i].to_string()])
            .args(args)
            .stderr(Stdio::null())
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until every running node says the cluster is ok (all slots served).
    pub fn wait_ok(&self) {
        let start = Instant::now();
        loop {
            let ok = (0..self.ports.len())
                .filter(|&i| self.nodes[i].is_some())
                .all(|i| {
                    self.cli(i, &["CLUSTER", "INFO"])
                        .contains("cluster_state:ok")
                });
            if ok {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the Redis Cluster did not reach cluster_state:ok in 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills node `i` (SIGKILL): its connections drop, its port refuses.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kills node `i` and starts it again on the same port and cluster identity, empty.
    pub fn restart_empty(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_ok();
    }

    /// Pauses (`true`) or resumes node `i` with SIGSTOP/SIGCONT: paused, it accepts
    /// connections (the kernel does) and answers nothing.
    pub fn pause(&self, i: usize, paused: bool) {
        let pid = self.nodes[i].as_ref().expect("node running").id();
        let signal = if paused { "-STOP" } else { "-CONT" };
        let ok = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {signal} {pid}");
    }

    /// Makes node `i` sleep `seconds` (`DEBUG SLEEP`), in the background; returns at once.
    pub fn sleep_node(&self, i: usize, seconds: f64) -> std::thread::JoinHandle<()> {
        let port = self.ports[i].to_string();
        std::thread::spawn(move || {
            let _ = Command::new("redis-cli")
                .args(["-h", "127.0.0.1", "-p", &port, "DEBUG", "SLEEP"])
                .arg(seconds.to_string())
                .output();
        })
    }

    /// The directory holding the nodes' logs and cluster files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        // SIGKILL ends paused (stopped) nodes too.
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
    }
}
