//! The store on a real 3-node Redis Cluster on loopback ports: rows read through it equal
//! the checkpoint's bit for bit, and its faults (a node killed, paused, restarted empty or
//! slowed; another checkpoint's rows) are errors that name the shard and the table, within
//! the read's deadline. Skipped (visibly) without redis-server, except under
//! ENGRAM_REQUIRE_REDIS (CI).

use std::sync::Arc;
use std::time::{Duration, Instant};

use engram_core::checkpoint::{table_spec_from_header, SafetensorsHeader, TableSpec};
use engram_core::config::EngramConfig;
use engram_core::primes::{table_layouts, LayerTableLayout};
use engram_core::table::TableStore;
use engram_core::testing::TestRng;
use engram_cpu::CpuTable;
use engram_redis::cluster::{slot_of, Op};
use engram_redis::testing::TestCluster;
use engram_redis::{upload_layer, RedisCluster, RedisTable, UploadReport};

const PAPER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/data/forward_demo_small.safetensors"
);
const V41: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/data/forward_v41_small.safetensors"
);

/// A golden file's config, its layers' layouts and table specs.
struct Checkpoint {
    header: SafetensorsHeader,
    cfg: EngramConfig,
    layers: Vec<(LayerTableLayout, TableSpec)>,
}

fn checkpoint(path: &str) -> Checkpoint {
    let header = SafetensorsHeader::read_file(path).unwrap();
    let meta = header.metadata_json("meta").unwrap().expect("golden meta");
    let cfg = EngramConfig::from_golden_meta(&meta).unwrap();
    let layers = table_layouts(&cfg.hash)
        .into_iter()
        .map(|l| {
            let spec = table_spec_from_header(&header, &cfg, &l).unwrap();
            (l, spec)
        })
        .collect();
    Checkpoint {
        header,
        cfg,
        layers,
    }
}

impl Checkpoint {
    /// Uploads every layer's table in blocks of `block_rows` rows.
    fn upload(&self, cluster: &RedisCluster, block_rows: u32) -> UploadReport {
        let mut total = UploadReport::default();
        for (layout, spec) in &self.layers {
            let r = upload_layer(
                cluster,
                &self.header,
                &self.cfg,
                layout,
                spec,
                block_rows,
                |_| {},
            )
            .unwrap();
            total.blocks += r.blocks;
            total.written += r.written;
            total.skipped += r.skipped;
        }
        total
    }

    /// Layer `i`'s table: in the cluster, and mapped from the file.
    fn tables(&self, cluster: &Arc<RedisCluster>, i: usize) -> (RedisTable, CpuTable) {
        let (layout, spec) = &self.layers[i];
        let remote =
            RedisTable::open_layer(cluster.clone(), &self.header, &self.cfg, layout).unwrap();
        (
            remote,
            CpuTable::open_mmap(self.header.path(), spec).unwrap(),
        )
    }
}

fn connect(test: &TestCluster, query: &str) -> Arc<RedisCluster> {
    Arc::new(RedisCluster::connect(test.url(query).parse().unwrap()).unwrap())
}

/// A 3-node cluster for test `test` (None: skipped), connected with URL query `query`,
/// holding the paper checkpoint's tables in blocks of 8 rows.
fn uploaded(test: &str, query: &str) -> Option<(TestCluster, Arc<RedisCluster>, Checkpoint)> {
    let cluster = TestCluster::start(test, 3)?;
    let client = connect(&cluster, query);
    let ck = checkpoint(PAPER);
    ck.upload(&client, 8);
    Some((cluster, client, ck))
}

/// `n` random row ids of `table`, with repeats.
fn random_rows(table: &dyn TableStore, n: usize, seed: u64) -> Vec<u64> {
    let mut rng = TestRng::new(seed);
    let mut ids: Vec<u64> = (0..n).map(|_| rng.below(table.num_rows())).collect();
    ids.extend_from_within(..n / 4);
    ids
}

fn gather(table: &dyn TableStore, ids: &[u64]) -> engram_core::Result<Vec<u32>> {
    let mut out = vec![0f32; ids.len() * table.width()];
    table.gather_f32(ids, &mut out)?;
    Ok(out.iter().map(|x| x.to_bits()).collect())
}

#[test]
fn rows_read_through_the_cluster_equal_the_checkpoints_bit_for_bit() {
    let Some(test) = TestCluster::start("bit_exact", 3) else {
        return;
    };
    let cluster = connect(&test, "");
    assert_eq!(cluster.shards().len(), 3);
    // Our key-to-slot hash against the cluster's own.
    for key in ["engram:00ff:7", "engram:abc:manifest", "x{tag}y", "{}z"] {
        let theirs: usize = test
            .cli(0, &["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .unwrap();
        assert_eq!(slot_of(key), theirs, "{key}");
    }
    for (path, block_rows) in [(PAPER, 7), (V41, 16)] {
        let ck = checkpoint(path);
        let first = ck.upload(&cluster, block_rows);
        assert_eq!((first.written, first.skipped), (first.blocks, 0), "{path}");
        // Resumable: a second upload finds every block there.
        let again = ck.upload(&cluster, block_rows);
        assert_eq!((again.written, again.skipped), (0, first.blocks), "{path}");
        for i in 0..ck.layers.len() {
            let (remote, local) = ck.tables(&cluster, i);
            assert_eq!(
                (remote.num_rows(), remote.width(), remote.dtype()),
                (local.num_rows(), local.width(), local.dtype())
            );
            // Every row, then random rows with repeats, in the caller's order.
            let all: Vec<u64> = (0..local.num_rows()).rev().collect();
            assert_eq!(
                gather(&remote, &all).unwrap(),
                gather(&local, &all).unwrap()
            );
            let ids = random_rows(&local, 300, i as u64);
            let before = remote.counters();
            assert_eq!(
                gather(&remote, &ids).unwrap(),
                gather(&local, &ids).unwrap()
            );
            // One round trip per shard, whatever the rows.
            let used = remote.counters().since(&before);
            assert!(used.backing_reads <= 3, "{used:?}");
            assert!(used.backing_bytes >= (remote.row_bytes() * 300 * 3 / 4) as u64);
            // Ids past the table are refused before anything is read.
            let e = gather(&remote, &[remote.num_rows()])
                .unwrap_err()
                .to_string();
            assert!(e.contains("out of range"), "{e}");
        }
    }
}

#[test]
fn another_checkpoints_rows_are_refused() {
    let Some((_test, cluster, ck)) = uploaded("refused", "") else {
        return;
    };
    // Another checkpoint (other layer weights): the store has no table for it.
    let other = checkpoint(V41);
    let (layout, _) = &other.layers[0];
    let e = RedisTable::open_layer(cluster.clone(), &other.header, &other.cfg, layout)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("has no table for this checkpoint"), "{e}");
    // A block of another table put under this table's key is refused, not read.
    let (a, _) = ck.tables(&cluster, 0);
    let (b, _) = ck.tables(&cluster, 1);
    let key = |t: &RedisTable, block| engram_redis::block::block_key(t.identity(), block);
    let theirs = cluster
        .batch("test", &[Op::Get { key: key(&b, 0) }])
        .unwrap()
        .replies
        .remove(0);
    assert!(!theirs.is_empty());
    cluster
        .batch(
            "test",
            &[Op::Set {
                key: key(&a, 0),
                value: theirs,
            }],
        )
        .unwrap();
    let e = gather(&a, &[3]).unwrap_err().to_string();
    assert!(
        e.contains(&key(&a, 0)) && e.contains("wrong tag") && e.contains(a.name()),
        "{e}"
    );
    // Rows of other blocks still read.
    gather(&a, &[8, 20]).unwrap();
}

#[test]
fn a_killed_or_paused_node_fails_the_read_naming_shard_and_table_within_the_deadline() {
    let Some((mut test, cluster, ck)) = uploaded("killed", "timeout_ms=800") else {
        return;
    };
    let deadline = Duration::from_millis(800);
    let (remote, local) = ck.tables(&cluster, 0);
    let ids = random_rows(&local, 200, 1);
    assert_eq!(
        gather(&remote, &ids).unwrap(),
        gather(&local, &ids).unwrap()
    );

    // Paused: connections stay open and nothing answers; the read ends at its deadline.
    test.pause(1, true);
    let start = Instant::now();
    let e = gather(&remote, &ids).unwrap_err().to_string();
    let took = start.elapsed();
    test.pause(1, false);
    assert!(
        e.contains(&test.addr(1)) && e.contains(remote.name()) && e.contains("deadline"),
        "{e}"
    );
    assert!(
        took >= deadline && took < deadline * 3,
        "took {took:?}: {e}"
    );
    // Resumed, it answers again.
    assert_eq!(
        gather(&remote, &ids).unwrap(),
        gather(&local, &ids).unwrap()
    );

    // Killed: refused at once, named.
    test.kill(1);
    let start = Instant::now();
    let e = gather(&remote, &ids).unwrap_err().to_string();
    assert!(start.elapsed() < deadline * 3, "{e}");
    assert!(
        e.contains(&test.addr(1)) && e.contains(remote.name()),
        "{e}"
    );
}

#[test]
fn a_node_restarted_empty_reports_its_blocks_missing_and_upload_refills_them() {
    let Some((mut test, cluster, ck)) = uploaded("restarted", "") else {
        return;
    };
    let (remote, local) = ck.tables(&cluster, 0);
    let all: Vec<u64> = (0..local.num_rows()).collect();
    gather(&remote, &all).unwrap();

    test.restart_empty(2);
    let e = gather(&remote, &all).unwrap_err().to_string();
    assert!(
        e.contains("is missing on shard") && e.contains(&test.addr(2)) && e.contains(remote.name()),
        "{e}"
    );
    let refill = ck.upload(&cluster, 8);
    assert_eq!(refill.written + refill.skipped, refill.blocks);
    assert!(refill.written > 0 && refill.skipped > 0, "{refill:?}");
    assert_eq!(
        gather(&remote, &all).unwrap(),
        gather(&local, &all).unwrap()
    );
}

#[test]
fn a_slow_node_shows_in_the_shard_stats() {
    let Some((test, cluster, ck)) = uploaded("slow", "timeout_ms=5000&slow_ms=100") else {
        return;
    };
    let (remote, local) = ck.tables(&cluster, 0);
    let ids = random_rows(&local, 200, 2);
    gather(&remote, &ids).unwrap();

    let sleeper = test.sleep_node(0, 0.6);
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(
        gather(&remote, &ids).unwrap(),
        gather(&local, &ids).unwrap()
    );
    sleeper.join().unwrap();
    let stats = cluster.shard_stats();
    let slow = &stats[stats.iter().position(|s| s.shard == test.addr(0)).unwrap()];
    assert!(slow.last_wait_us >= 300_000, "{stats:?}");
    for s in stats.iter().filter(|s| s.shard != test.addr(0)) {
        assert!(s.last_wait_us < 200_000, "{stats:?}");
    }
}
