//! `engram upload`: a checkpoint's tables into a real 3-node Redis Cluster on loopback
//! ports, resumably; a bad store is a clear error. Skipped (visibly) without
//! redis-server, except under ENGRAM_REQUIRE_REDIS (CI).

mod common;

use common::{engram, DATA};
use engram_redis::testing::TestCluster;
use serde_json::Value;

fn upload_json(model: &str, store: &str) -> Value {
    let (code, out, err) = engram(&["upload", "--model", model, "--store", store, "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// (blocks, written, skipped) summed over the layers.
fn counts(v: &Value) -> (u64, u64, u64) {
    let sum = |k: &str| {
        v["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l[k].as_u64().unwrap())
            .sum()
    };
    (sum("blocks"), sum("written"), sum("skipped"))
}

#[test]
fn upload_fills_the_cluster_then_skips_what_is_there() {
    let Some(mut cluster) = TestCluster::start("engram_upload", 3) else {
        return;
    };
    let model = format!("{DATA}/forward_v41_small.safetensors");
    let store = cluster.url("");
    let first = upload_json(&model, &store);
    let (blocks, written, skipped) = counts(&first);
    assert!(blocks > 0);
    assert_eq!((written, skipped), (blocks, 0));
    assert_eq!(first["shards"].as_array().unwrap().len(), 3);
    assert_eq!(counts(&upload_json(&model, &store)), (blocks, 0, blocks));
    // A node back empty: only its blocks are written again.
    cluster.restart_empty(1);
    let (_, written, skipped) = counts(&upload_json(&model, &store));
    assert!(written > 0 && skipped > 0 && written + skipped == blocks);
}

#[test]
fn a_bad_store_is_a_clear_error() {
    let model = format!("{DATA}/forward_v41_small.safetensors");
    let (code, _, err) = engram(&["upload", "--model", &model, "--store", "http://x:1"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--store http://x:1") && err.contains("redis://"),
        "{err}"
    );
    // Nothing listens on port 1.
    let (code, _, err) = engram(&[
        "upload",
        "--model",
        &model,
        "--store",
        "redis://127.0.0.1:1",
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("127.0.0.1:1") && err.contains("CLUSTER SLOTS"),
        "{err}"
    );
}
