//! A Redis Cluster as the store sees it: its shards (master nodes) and which hash slots
//! each serves, one connection per shard, and batched reads and writes that go to every
//! shard at once, each shard's share as one pipeline, under one deadline.
//!
//! Why not the `redis` crate's cluster connection: it routes each command for us but
//! hides which node answered, so a failed or slow read could not be pinned on a shard,
//! and its timeouts apply per command rather than to a step. The routing here is small:
//! `CLUSTER SLOTS` once (again after a `MOVED` reply), the crate's own key-to-slot hash,
//! and the crate's plain connections and pipelines for the wire.

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use engram_core::error::{EngramError, Result};
use redis::{Connection, Value};
use serde::Serialize;

/// Hash slots of a Redis Cluster.
const SLOTS: usize = 16384;

/// What `redis://host:port[,host:port...][?timeout_ms=N&slow_ms=N]` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterUrl {
    /// Nodes to ask for the cluster's layout (any of its nodes will do).
    pub seeds: Vec<String>,
    /// How long one batched read (a step's rows of one table) may take, all shards
    /// together, before it fails naming the shards that had not answered.
    pub deadline: Duration,
    /// A shard whose share of a read takes longer than this is logged as stalled.
    pub slow: Duration,
}

/// The deadline of a step's read unless the URL sets `timeout_ms`.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(2);
/// The stall threshold unless the URL sets `slow_ms`.
pub const DEFAULT_SLOW: Duration = Duration::from_millis(50);

impl std::str::FromStr for ClusterUrl {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let rest = s
            .strip_prefix("redis://")
            .ok_or("expected redis://host:port[,host:port...]")?;
        let (nodes, query) = rest.split_once('?').unwrap_or((rest, ""));
        let seeds: Vec<String> = nodes
            .trim_end_matches('/')
            .split(',')
            .map(|n| n.trim().to_string())
            .collect();
        for n in &seeds {
            match n.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
                _ => return Err(format!("`{n}` is not host:port")),
            }
        }
        let mut url = ClusterUrl {
            seeds,
            deadline: DEFAULT_DEADLINE,
            slow: DEFAULT_SLOW,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair
                .split_once('=')
                .ok_or(format!("`{pair}` is not key=value"))?;
            let ms = v
                .parse::<u64>()
                .ok()
                .filter(|&ms| ms > 0)
                .ok_or(format!("`{k}` must be a positive number of milliseconds"))?;
            match k {
                "timeout_ms" => url.deadline = Duration::from_millis(ms),
                "slow_ms" => url.slow = Duration::from_millis(ms),
                _ => return Err(format!("unknown setting `{k}` (timeout_ms, slow_ms)")),
            }
        }
        Ok(url)
    }
}

/// What one shard has done for this process since it connected.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ShardStats {
    /// `host:port` of the shard's master.
    pub shard: String,
    /// Pipelines sent (one per batched read or write that touched the shard).
    pub round_trips: u64,
    /// Commands in them.
    pub commands: u64,
    /// Bytes read back.
    pub bytes: u64,
    /// Pipelines that failed (connection refused or lost, deadline passed).
    pub errors: u64,
    /// Time spent waiting for the shard, summed and the longest single pipeline.
    pub total_wait_us: u64,
    pub max_wait_us: u64,
    /// The last pipeline's wait.
    pub last_wait_us: u64,
}

struct Shard {
    addr: String,
    conn: Mutex<Option<Connection>>,
    stats: Mutex<ShardStats>,
}

struct Topology {
    /// Shard index of each hash slot (`u16::MAX`: no node serves it).
    slot_shard: Vec<u16>,
    shards: Vec<Arc<Shard>>,
}

/// A connected Redis Cluster; shared by every table read from it.
pub struct RedisCluster {
    url: ClusterUrl,
    topology: RwLock<Topology>,
}

/// One command of a batch: `GETRANGE key start end`, or `SET key value`.
pub enum Op {
    GetRange { key: String, start: u64, end: u64 },
    Set { key: String, value: Vec<u8> },
    Get { key: String },
}

impl Op {
    fn key(&self) -> &str {
        match self {
            Op::GetRange { key, .. } | Op::Set { key, .. } | Op::Get { key } => key,
        }
    }
}

/// What a batch did: per input op, the bytes read (empty for a missing key or a write),
/// and the round trips and bytes it took.
pub struct BatchResult {
    pub replies: Vec<Vec<u8>>,
    pub round_trips: u64,
    pub bytes: u64,
}

impl RedisCluster {
    /// Connects to the cluster `url` names and reads its layout.
    pub fn connect(url: ClusterUrl) -> Result<Self> {
        let cluster = Self {
            topology: RwLock::new(Topology {
                slot_shard: vec![u16::MAX; SLOTS],
                shards: Vec::new(),
            }),
            url,
        };
        cluster.refresh()?;
        Ok(cluster)
    }

    pub fn url(&self) -> &ClusterUrl {
        &self.url
    }

    /// `host:port` of each shard.
    pub fn shards(&self) -> Vec<String> {
        let t = self.topology.read().unwrap_or_else(|e| e.into_inner());
        t.shards.iter().map(|s| s.addr.clone()).collect()
    }

    /// What each shard has done so far.
    pub fn shard_stats(&self) -> Vec<ShardStats> {
        let t = self.topology.read().unwrap_or_else(|e| e.into_inner());
        t.shards
            .iter()
            .map(|s| s.stats.lock().unwrap_or_else(|e| e.into_inner()).clone())
            .collect()
    }

    /// The shard serving `key`.
    pub fn shard_of(&self, key: &str) -> Option<String> {
        let t = self.topology.read().unwrap_or_else(|e| e.into_inner());
        let i = t.slot_shard[slot_of(key)];
        t.shards.get(i as usize).map(|s| s.addr.clone())
    }

    /// Reads the cluster's slot map (`CLUSTER SLOTS`) from the first seed or known shard
    /// that answers; connections to shards that are still masters are kept.
    pub fn refresh(&self) -> Result<()> {
        let known = self.shards();
        let mut problems = Vec::new();
        for addr in self.url.seeds.iter().chain(&known) {
            let reply = connect(addr, self.url.deadline)
                .and_then(|mut c| redis::cmd("CLUSTER").arg("SLOTS").query::<Value>(&mut c));
            match reply.map_err(|e| e.to_string()).and_then(parse_slots) {
                Ok(ranges) => {
                    self.install(ranges);
                    return Ok(());
                }
                Err(e) => problems.push(format!("{addr}: {e}")),
            }
        }
        Err(EngramError::Other(format!(
            "no node of the Redis Cluster answered CLUSTER SLOTS ({})",
            problems.join("; ")
        )))
    }

    fn install(&self, ranges: Vec<(u16, u16, String)>) {
        let mut t = self.topology.write().unwrap_or_else(|e| e.into_inner());
        // Shards in address order: stable names and indices in stats and messages.
        let mut addrs: Vec<&String> = ranges.iter().map(|r| &r.2).collect();
        addrs.sort();
        addrs.dedup();
        let shards: Vec<Arc<Shard>> = addrs
            .iter()
            .map(|&addr| match t.shards.iter().find(|s| &s.addr == addr) {
                Some(kept) => kept.clone(),
                None => Arc::new(Shard {
                    addr: addr.clone(),
                    conn: Mutex::new(None),
                    stats: Mutex::new(ShardStats {
                        shard: addr.clone(),
                        ..Default::default()
                    }),
                }),
            })
            .collect();
        let mut slot_shard = vec![u16::MAX; SLOTS];
        for (start, end, addr) in &ranges {
            let i = addrs.binary_search(&addr).expect("listed above") as u16;
            let last = (*end as usize).min(SLOTS - 1);
            slot_shard[*start as usize..=last].fill(i);
        }
        t.slot_shard = slot_shard;
        t.shards = shards;
    }

    /// Runs `ops` in one batch: each shard's ops as one pipeline, the shards at once,
    /// all within the deadline. `what` names the table in errors. A `MOVED` reply (the
    /// cluster's layout changed) re-reads the layout and runs the batch once more.
    pub fn batch(&self, what: &str, ops: &[Op]) -> Result<BatchResult> {
        match self.batch_once(what, ops) {
            Err(BatchError::Moved) => {
                self.refresh()?;
                self.batch_once(what, ops).map_err(|e| e.into_engram(what))
            }
            other => other.map_err(|e| e.into_engram(what)),
        }
    }

    fn batch_once(&self, what: &str, ops: &[Op]) -> std::result::Result<BatchResult, BatchError> {
        let start = Instant::now();
        let deadline = start + self.url.deadline;
        let t = self.topology.read().unwrap_or_else(|e| e.into_inner());
        let mut per_shard: Vec<Vec<usize>> = vec![Vec::new(); t.shards.len()];
        for (i, op) in ops.iter().enumerate() {
            let slot = slot_of(op.key());
            match t.slot_shard[slot] {
                u16::MAX => {
                    return Err(BatchError::Failed(format!(
                        "hash slot {slot} of key `{}` is served by no node of the Redis Cluster",
                        op.key()
                    )))
                }
                s => per_shard[s as usize].push(i),
            }
        }
        let busy: Vec<(usize, &Vec<usize>)> = per_shard
            .iter()
            .enumerate()
            .filter(|(_, idx)| !idx.is_empty())
            .collect();
        let run = |&(s, idx): &(usize, &Vec<usize>)| {
            let shard = &t.shards[s];
            let result = run_on_shard(shard, ops, idx, deadline, self.url.deadline);
            let took = start.elapsed();
            if took > self.url.slow {
                tracing::warn!(
                    shard = %shard.addr,
                    table = what,
                    took_ms = took.as_secs_f64() * 1e3,
                    commands = idx.len(),
                    "Redis shard stalled: its share of a read took longer than slow_ms"
                );
            }
            (s, result)
        };
        let results: Vec<_> = if busy.len() == 1 {
            busy.iter().map(run).collect()
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = busy.iter().map(|b| scope.spawn(move || run(b))).collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("a shard's read does not panic"))
                    .collect()
            })
        };
        let mut replies = vec![Vec::new(); ops.len()];
        let (mut bytes, mut failures, mut moved) = (0u64, Vec::new(), false);
        for (s, result) in results {
            match result {
                Ok(values) => {
                    for (&i, v) in per_shard[s].iter().zip(values) {
                        bytes += v.len() as u64;
                        replies[i] = v;
                    }
                }
                Err(ShardError::Moved) => moved = true,
                Err(ShardError::Failed(e)) => failures.push(e),
            }
        }
        if !failures.is_empty() {
            return Err(BatchError::Failed(failures.join("; ")));
        }
        if moved {
            return Err(BatchError::Moved);
        }
        Ok(BatchResult {
            replies,
            round_trips: busy.len() as u64,
            bytes,
        })
    }
}

enum ShardError {
    Moved,
    Failed(String),
}

enum BatchError {
    Moved,
    Failed(String),
}

impl BatchError {
    fn into_engram(self, what: &str) -> EngramError {
        match self {
            BatchError::Moved => EngramError::Other(format!(
                "reading table `{what}`: the Redis Cluster moved its keys twice in a row"
            )),
            BatchError::Failed(e) => EngramError::Other(format!("reading table `{what}`: {e}")),
        }
    }
}

/// Sends shard `shard`'s ops (`idx` into `ops`) as one pipeline; the replies in order.
fn run_on_shard(
    shard: &Shard,
    ops: &[Op],
    idx: &[usize],
    deadline: Instant,
    budget: Duration,
) -> std::result::Result<Vec<Vec<u8>>, ShardError> {
    let started = Instant::now();
    let mut conn = shard.conn.lock().unwrap_or_else(|e| e.into_inner());
    let reused = conn.is_some();
    let mut result = pipeline_once(&mut conn, &shard.addr, ops, idx, deadline);
    if reused
        && result
            .as_ref()
            .is_err_and(|e| e.is_io_error() || e.is_unrecoverable_error())
    {
        // A connection kept from an earlier batch may have died with a node that has
        // since come back: one more try on a new connection, within the same deadline.
        *conn = None;
        result = pipeline_once(&mut conn, &shard.addr, ops, idx, deadline);
    }
    let took = started.elapsed();
    let mut stats = shard.stats.lock().unwrap_or_else(|e| e.into_inner());
    stats.round_trips += 1;
    stats.commands += idx.len() as u64;
    let us = took.as_micros() as u64;
    stats.total_wait_us += us;
    stats.max_wait_us = stats.max_wait_us.max(us);
    stats.last_wait_us = us;
    match result {
        Ok(values) => {
            stats.bytes += values.iter().map(|v| v.len() as u64).sum::<u64>();
            Ok(values)
        }
        Err(e) if e.redirect_node().is_some() => {
            // The replies after it were not read: the connection is out of step.
            *conn = None;
            Err(ShardError::Moved)
        }
        Err(e) => {
            stats.errors += 1;
            // The connection may hold half a reply: start the next batch on a new one.
            *conn = None;
            let why = if e.is_timeout() || Instant::now() >= deadline {
                format!(
                    "did not answer within the read's deadline of {} ms ({e})",
                    budget.as_millis()
                )
            } else {
                e.to_string()
            };
            Err(ShardError::Failed(format!(
                "Redis shard {} ({} commands): {why}",
                shard.addr,
                idx.len()
            )))
        }
    }
}

/// Sends `idx` of `ops` to `addr` as one pipeline on `conn` (connecting first if there
/// is none), with the socket's timeouts set to what is left of `deadline`.
fn pipeline_once(
    conn: &mut Option<Connection>,
    addr: &str,
    ops: &[Op],
    idx: &[usize],
    deadline: Instant,
) -> redis::RedisResult<Vec<Vec<u8>>> {
    let left = time_left(deadline)?;
    if conn.is_none() {
        *conn = Some(connect(addr, left)?);
    }
    let c = conn.as_mut().expect("connected above");
    c.set_write_timeout(Some(left))?;
    let mut pipe = redis::pipe();
    for &i in idx {
        match &ops[i] {
            Op::GetRange { key, start, end } => {
                pipe.cmd("GETRANGE").arg(key).arg(*start).arg(*end);
            }
            Op::Get { key } => {
                pipe.cmd("GET").arg(key);
            }
            Op::Set { key, value } => {
                pipe.cmd("SET").arg(key).arg(value.as_slice());
            }
        }
    }
    c.send_packed_command(&pipe.get_packed_pipeline())?;
    // Reply by reply, each read given only what is left of the deadline: the crate's
    // `Pipeline::query` reads every reply even after one timed out, each with the full
    // socket timeout again (a paused node held a 75-command read for a minute).
    let mut replies = Vec::with_capacity(idx.len());
    for _ in idx {
        c.set_read_timeout(Some(time_left(deadline)?))?;
        replies.push(match c.recv_response()?.extract_error()? {
            Value::BulkString(b) => b,
            _ => Vec::new(),
        });
    }
    Ok(replies)
}

/// What is left until `deadline`; a timeout error when nothing is.
fn time_left(deadline: Instant) -> redis::RedisResult<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::TimedOut).into())
}

fn connect(addr: &str, timeout: Duration) -> redis::RedisResult<Connection> {
    redis::Client::open(format!("redis://{addr}/"))?.get_connection_with_timeout(timeout)
}

/// The hash slot of `key`: CRC16/XMODEM of the key, or of its `{hash tag}` where it has
/// one, modulo 16384 (the cluster specification's rule).
pub fn slot_of(key: &str) -> usize {
    let bytes = key.as_bytes();
    let tagged = bytes.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &bytes[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16::State::<crc16::XMODEM>::calculate(tagged.unwrap_or(bytes)) as usize % SLOTS
}

/// `CLUSTER SLOTS`' reply as (first slot, last slot, master `host:port`).
fn parse_slots(v: Value) -> std::result::Result<Vec<(u16, u16, String)>, String> {
    let bad = || "unexpected CLUSTER SLOTS reply".to_string();
    let Value::Array(ranges) = v else {
        return Err(bad());
    };
    let mut out = Vec::new();
    for r in ranges {
        let Value::Array(r) = r else {
            return Err(bad());
        };
        let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
            (r.first(), r.get(1), r.get(2))
        else {
            return Err(bad());
        };
        let host = match master.first() {
            Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
            Some(Value::SimpleString(h)) => h.clone(),
            _ => return Err(bad()),
        };
        let Some(Value::Int(port)) = master.get(1) else {
            return Err(bad());
        };
        out.push((*start as u16, *end as u16, format!("{host}:{port}")));
    }
    if out.is_empty() {
        return Err("the node serves no hash slots (is cluster mode set up?)".into());
    }
    Ok(out)
}
