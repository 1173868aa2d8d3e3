//! The runtime with its tables in a Redis Cluster (`OpenOptions::remote_tables`, what
//! `ENGRAM_TABLES=redis://...` sets): after `engram upload`, its outputs equal those of
//! the same checkpoint with local tables bit for bit, also from a copy of the checkpoint
//! that has no tables at all. Skipped (visibly) without redis-server, except under
//! ENGRAM_REQUIRE_REDIS (CI).

use std::collections::HashMap;
use std::path::Path;

use engram_cli::upload::{upload, UploadArgs};
use engram_core::checkpoint::Checkpoint;
use engram_core::golden::GoldenSample;
use engram_core::table::StoreCounters;
use engram_plugin::{EngramRuntime, HotCache, OpenOptions, SequenceInput};
use engram_redis::testing::TestCluster;
use engram_tests::{data_path, tokenizer_path};

/// Every Engram layer's output for the golden file's sample 0 (one prefill of its
/// first half, then a step per token; run twice), and what the table stores did.
fn run(
    model: &Path,
    remote: Option<&str>,
) -> engram_plugin::Result<(Vec<Vec<u32>>, StoreCounters)> {
    run_cached(model, remote, None)
}

/// [`run`] with a hot-row cache of `cache` in front of the tables.
fn run_cached(
    model: &Path,
    remote: Option<&str>,
    cache: Option<HotCache>,
) -> engram_plugin::Result<(Vec<Vec<u32>>, StoreCounters)> {
    let options = OpenOptions {
        tokenizer: Some(tokenizer_path()),
        remote_tables: remote.map(|u| u.parse().unwrap()),
        hot_cache: cache,
        ..OpenOptions::default()
    };
    let rt = EngramRuntime::open(model, options)?.expect("an Engram config");
    let path = data_path("forward_demo_small.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let ck = Checkpoint::parse(&path, &bytes).unwrap();
    let cfg = rt.config().clone();
    let sample = GoldenSample::read(&ck, &cfg, 0).unwrap();
    let ids = sample.token_ids();
    let c = cfg.hc_mult * cfg.hidden_size;
    let mut outputs = vec![Vec::new(); cfg.hash.layer_ids.len()];
    let mut store = StoreCounters::default();
    // Twice, as two sequences: the second finds its rows in a hot-row cache.
    for seq_id in 0..2 {
        let mut pos = 0;
        while pos < ids.len() {
            let n = if pos == 0 { ids.len() / 2 } else { 1 };
            let input = SequenceInput {
                seq_id,
                tokens: &ids[pos..pos + n],
                position: pos,
                dead: None,
                context: None,
            };
            let mut step = rt.begin_step(&[input], &[])?;
            for (l, &layer) in cfg.hash.layer_ids.iter().enumerate() {
                let out = step.apply_packed(layer, &sample.hidden[pos * c..(pos + n) * c])?;
                outputs[l].extend(out.iter().map(|x| x.to_bits()));
            }
            store.add(&step.finish().store);
            pos += n;
        }
    }
    Ok((outputs, store))
}

/// A copy of the golden file without its Engram tables (every other tensor and the
/// metadata kept).
fn without_tables(src: &Path, dst: &Path) {
    let bytes = std::fs::read(src).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter(|(name, _)| !name.contains("multi_head_embedding.embedding"))
        .collect();
    assert!(kept.len() < st.len(), "the file had tables to drop");
    let metadata: Option<HashMap<String, String>> = meta.metadata().clone();
    safetensors::serialize_to_file(kept, metadata, dst).unwrap();
}

#[test]
fn the_runtime_reads_its_tables_from_the_cluster_bit_for_bit() {
    let Some(cluster) = TestCluster::start("plugin_remote_tables", 3) else {
        return;
    };
    let url = cluster.url("timeout_ms=5000");
    let model = data_path("forward_demo_small.safetensors");
    // Nothing uploaded yet: the open says what to run.
    let e = run(&model, Some(&url)).err().unwrap().to_string();
    assert!(e.contains("engram upload"), "{e}");

    let args = UploadArgs {
        model: model.clone(),
        store: url.clone(),
        block_rows: 16,
        json: false,
    };
    let summary = upload(&args).unwrap();
    assert_eq!(summary.layers.len(), 2);
    assert_eq!(summary.shards.len(), 3);

    let (local, none) = run(&model, None).unwrap();
    assert_eq!(none.backing_reads, 0, "local tables make no round trips");
    let (remote, store) = run(&model, Some(&url)).unwrap();
    assert_eq!(remote, local);
    assert!(store.backing_reads > 0 && store.backing_bytes > 0);
    // With the hot-row cache in front: the same rows, fewer of them over the network.
    let (cached, with_cache) =
        run_cached(&model, Some(&url), Some(HotCache::Bytes(1 << 20))).unwrap();
    assert_eq!(cached, local);
    assert!(with_cache.cache_hits > 0, "{with_cache:?}");
    assert!(
        with_cache.backing_bytes < store.backing_bytes,
        "{with_cache:?} {store:?}"
    );

    // The tables live only in the store: a checkpoint without them runs the same.
    let dir = tempfile::tempdir().unwrap();
    let stripped = dir.path().join("no_tables.safetensors");
    without_tables(&model, &stripped);
    assert!(run(&stripped, None).is_err(), "the copy has no tables");
    assert_eq!(run(&stripped, Some(&url)).unwrap().0, local);
}
