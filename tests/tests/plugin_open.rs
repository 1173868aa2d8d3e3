//! Opening the runtime from files on disk and running the golden samples through it as
//! a host would: the outputs are within tolerance of the golden files' expected outputs.

use engram_core::checkpoint::Checkpoint;
use engram_core::config::Variant;
use engram_core::golden::GoldenSample;
use engram_core::metrics::relative_error;
use engram_plugin::{EngramRuntime, HotCache, LookupStats, OpenOptions, SequenceInput};
use engram_tests::{data_path, tokenizer_path};

/// Runs the golden samples of `file` through a runtime opened with `hot_cache`, checks
/// them against the file, and returns every layer's outputs and the runtime's stats.
fn golden_through_runtime(file: &str, hot_cache: Option<HotCache>) -> (Vec<f32>, LookupStats) {
    let path = data_path(file);
    let options = OpenOptions {
        tokenizer: Some(tokenizer_path()),
        hot_cache,
        ..OpenOptions::default()
    };
    let mut all_outputs = Vec::new();
    let rt = EngramRuntime::open(&path, options)
        .unwrap()
        .expect("the golden file has an Engram config");
    let bytes = std::fs::read(&path).unwrap();
    let ck = Checkpoint::parse(&path, &bytes).unwrap();
    let cfg = rt.config().clone();
    let (g, d) = (cfg.hc_mult, cfg.hidden_size);
    for sample in 0..2 {
        let golden = GoldenSample::read(&ck, &cfg, sample).unwrap();
        let (ids, hidden, dead) = (golden.token_ids(), &golden.hidden[..], &golden.dead);
        let t = ids.len();
        // Prefill the first half, decode the rest token by token.
        let split = t / 2;
        let mut outputs: Vec<Vec<f32>> = vec![Vec::new(); cfg.hash.layer_ids.len()];
        let mut pos = 0;
        while pos < t {
            let n = if pos == 0 { split.max(1) } else { 1 };
            let input = SequenceInput {
                seq_id: sample as u64,
                tokens: &ids[pos..pos + n],
                position: pos,
                dead: dead.as_ref().map(|m| &m[pos..pos + n]),
                context: None,
            };
            let mut step = rt.begin_step(&[input], &[]).unwrap();
            for (l, &layer_id) in cfg.hash.layer_ids.iter().enumerate() {
                let c = g * d;
                let out = step
                    .apply_packed(layer_id, &hidden[pos * c..(pos + n) * c])
                    .unwrap();
                outputs[l].extend(out);
            }
            step.finish();
            pos += n;
        }
        for (l, &layer_id) in cfg.hash.layer_ids.iter().enumerate() {
            let expected = ck
                .f32_tensor(
                    &format!("sample{sample}.layer{layer_id}.output"),
                    &[1, t, g, d],
                )
                .unwrap();
            // Paper files store the delta; the runtime returns the residual after Engram.
            let expected: Vec<f32> = match cfg.variant {
                Variant::Paper => expected.iter().zip(hidden).map(|(o, h)| o + h).collect(),
                Variant::V41 => expected,
            };
            let got = &outputs[l];
            let rel = relative_error(got, &expected);
            let tol = if cfg.variant == Variant::Paper {
                1e-6
            } else {
                1e-3
            };
            assert!(
                rel <= tol,
                "{file} sample {sample} layer {layer_id}: rel err {rel:e}"
            );
            all_outputs.extend_from_slice(got);
        }
    }
    assert!(rt.stats().rows_fetched > 0);
    (all_outputs, rt.stats())
}

#[test]
fn paper_golden_through_the_runtime() {
    golden_through_runtime("forward_demo_small.safetensors", None);
}

#[test]
fn v41_golden_through_the_runtime() {
    golden_through_runtime("forward_v41_small.safetensors", None);
}

/// With a hot-row cache the outputs are the same bit for bit, and its hits, misses and
/// bytes reach the stats (a row looked up again hits: the samples repeat n-grams).
#[test]
fn the_hot_cache_changes_no_output_and_reports_its_hits() {
    for file in [
        "forward_demo_small.safetensors",
        "forward_v41_small.safetensors",
    ] {
        let (plain, plain_stats) = golden_through_runtime(file, None);
        assert_eq!(
            plain_stats.store.cache_hits + plain_stats.store.cache_misses,
            0
        );
        for cache in [HotCache::Bytes(1 << 30), HotCache::TableFraction(0.01)] {
            let (cached, stats) = golden_through_runtime(file, Some(cache));
            assert!(
                plain
                    .iter()
                    .zip(&cached)
                    .all(|(a, b)| a.to_bits() == b.to_bits())
                    && plain.len() == cached.len(),
                "{file} {cache:?}: outputs differ with the cache"
            );
            let s = stats.store;
            assert_eq!(
                s.cache_hits + s.cache_misses,
                stats.rows_fetched,
                "{file} {cache:?}: every row is a hit or a miss"
            );
            assert!(
                s.cache_misses > 0 && s.cache_bytes > 0,
                "{file} {cache:?}: {s:?}"
            );
        }
    }
}

#[test]
fn a_model_without_engram_opens_to_none() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"hidden_size": 576, "model_type": "llama"}"#,
    )
    .unwrap();
    assert!(EngramRuntime::open(dir.path(), OpenOptions::default())
        .unwrap()
        .is_none());
}

#[test]
fn open_errors_name_the_path() {
    let e = EngramRuntime::open("/no/such/model", OpenOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("/no/such/model"), "{e}");
    let options = OpenOptions {
        tokenizer: Some("/no/tokenizer.json".into()),
        ..OpenOptions::default()
    };
    let e = EngramRuntime::open(data_path("forward_demo_small.safetensors"), options)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("/no/tokenizer.json"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"hidden_size": 96, "engram": {"engram_vocab_size": [2003, 3001], "max_ngram_size": 3,
        "n_embed_per_ngram": 64, "n_head_per_ngram": 4, "layer_ids": [1, 3], "pad_id": 2, "kernel_size": 4}}"#).unwrap();
    std::fs::copy(tokenizer_path(), dir.path().join("tokenizer.json")).unwrap();
    let e = EngramRuntime::open(dir.path(), OpenOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("layers.1.engram."), "{e}");
}

/// Asking for a CUDA device that is not there is an error that says so, not a panic: device
/// 4096 on every machine (no driver, or no such device), device 0 where no GPU is usable.
#[test]
fn cuda_without_a_device_is_a_clear_error() {
    let open_on = |ordinal| {
        let options = OpenOptions {
            tokenizer: Some(tokenizer_path()),
            backend: engram_plugin::BackendKind::Cuda {
                ordinal,
                tables: engram_plugin::CudaTables::default(),
            },
            ..OpenOptions::default()
        };
        EngramRuntime::open(data_path("forward_demo_small.safetensors"), options)
    };
    let e = open_on(4096).err().unwrap();
    // A host can tell "no GPU" from any other failure without reading the message.
    assert!(
        matches!(&e, engram_plugin::PluginError::Cuda { source, .. } if source.is_unavailable()),
        "{e:?}"
    );
    assert!(e.is_device_unavailable());
    let e = e.to_string();
    assert!(
        e.contains("no CUDA driver") || e.contains("no CUDA device"),
        "{e}"
    );
    if !engram_cuda::CudaBackend::available() {
        let e = open_on(0).err().unwrap().to_string();
        assert!(e.contains("CUDA"), "{e}");
    }
}
