//! `engram bench`: throughput of each stage, each measured against a baseline in the
//! same run (ratios, not absolute claims), printed as a table or, with `--json`, as one
//! JSON object. Runs in under a minute on 2 cores (23-40 s in docs/benchmarks.md).

mod gather;
mod hot_cache;
mod prefetch;
mod projection;
mod smollm2;
mod text;

use std::hint::black_box;
use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use engram_core::backend::{EngramLayer, Segment};
use engram_core::checkpoint::TableSpec;
use engram_core::config::{EngramConfig, HashConfig, Variant};
use engram_core::dtype::RowDtype;
use engram_core::hashing::{EngramHasher, NgramHasher};
use engram_core::testing::{random_hidden, random_weights, TestRng};
use engram_cpu::layer::CpuLayer;
use engram_cpu::CpuTable;
use serde::Serialize;

pub use gather::{GatherReport, Throughputs};
pub use hot_cache::HotCacheBench;
pub use prefetch::{ModelLayerTime, PrefetchBench, PrefetchRun};
pub use projection::{ColdPoint, ProjectionBench, ProjectionPoint};
pub use text::format_text;

/// Everything `engram bench` measures.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Tokens hashed per second, one thread, V4.1 hash config (layers [1, 14], orders
    /// 2-4, 8 heads, table vocab 16,000,000 per order, compressed vocab 99,092): both
    /// layers' 24 rows for every token of one 262,144-token sequence (`hash_sequence`).
    pub hash_tokens_per_s: f64,
    /// The same, decode-shaped: 64 sequences advancing one token per step, each step
    /// hashing through the per-sequence history (`hash_step`).
    pub hash_decode_tokens_per_s: f64,
    /// Gather vs memcpy, at one thread and at all threads (its keys are top-level).
    #[serde(flatten)]
    pub gather: GatherReport,
    /// Paper-variant layer (hidden 1024, hc_mult 1, orders 2-3 x 8 heads x 64 columns =
    /// 1024 embedding columns, kernel 4) over a batch of 512 tokens, embeddings given:
    /// tokens per second of `CpuLayer::forward`, all threads.
    pub layer_tokens_per_s: f64,
    /// That layer's projection at decode-sized token counts, per token against one
    /// blocked GEMM (see [`ProjectionBench`]).
    pub projection: ProjectionBench,
    /// The simulated host (see [`PrefetchBench`]).
    pub prefetch: PrefetchBench,
    /// The hot-row cache's hits, misses and bytes on a Zipf stream (see [`HotCacheBench`]).
    pub hot_cache: HotCacheBench,
    /// Threads of the rayon pool ("all threads").
    pub threads: usize,
}

/// What `engram bench` prints: the report as a plain-text table, or with `json` as one
/// pretty-printed JSON object.
pub fn render(report: &BenchReport, json: bool) -> Result<String> {
    Ok(if json {
        serde_json::to_string_pretty(report)? + "\n"
    } else {
        format_text(report)
    })
}

const V41_COMPRESSED_VOCAB: usize = 99_092;

fn v41_hash_config() -> HashConfig {
    HashConfig {
        engram_vocab_size: vec![16_000_000; 3],
        max_ngram_size: 4,
        n_head_per_ngram: 8,
        layer_ids: vec![1, 14],
        pad_id: 2,
        seed: 0,
        compressed_vocab_size: Some(V41_COMPRESSED_VOCAB),
    }
}

/// Runs every benchmark; `scratch` is a directory for the table files.
pub fn run_bench(scratch: &std::path::Path) -> Result<BenchReport> {
    let (hash_tokens_per_s, hash_decode_tokens_per_s) = bench_hash()?;
    Ok(BenchReport {
        hash_tokens_per_s,
        hash_decode_tokens_per_s,
        gather: gather::bench_gather(scratch)?,
        layer_tokens_per_s: bench_layer()?,
        projection: projection::bench_projection()?,
        prefetch: prefetch::bench_prefetch(scratch)?,
        hot_cache: hot_cache::bench_hot_cache(scratch)?,
        threads: rayon::current_num_threads(),
    })
}

/// Best of `reps` timings of `f`; the first error stops it.
fn best_of(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<Duration> {
    let mut best = Duration::MAX;
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed());
    }
    Ok(best)
}

fn bench_hash() -> Result<(f64, f64)> {
    let cfg = v41_hash_config();
    let hasher = EngramHasher::new(&cfg, V41_COMPRESSED_VOCAB, 2)?;
    let mut rng = TestRng::new(1);
    let t = 1 << 18;
    let ids: Vec<i64> = (0..t)
        .map(|_| rng.below(V41_COMPRESSED_VOCAB as u64) as i64)
        .collect();
    let mut rows = vec![0u64; t * hasher.heads()];
    let prefill = best_of(3, || {
        for l in 0..hasher.layers().len() {
            hasher.hash_sequence(l, &ids, None, true, &mut rows)?;
        }
        black_box(&rows);
        Ok(())
    })?;
    let (seqs, steps) = (64, 2048);
    let mut histories = vec![engram_core::hashing::NgramHistory::new(cfg.max_ngram_size); seqs];
    let mut out = vec![0u64; hasher.layers().len() * hasher.heads()];
    let decode = best_of(3, || {
        for s in 0..steps {
            for (b, h) in histories.iter_mut().enumerate() {
                hasher.hash_step(h, ids[(s * seqs + b) % t], false, s, &mut out)?;
                black_box(&out);
            }
        }
        Ok(())
    })?;
    Ok((
        t as f64 / prefill.as_secs_f64(),
        (seqs * steps) as f64 / decode.as_secs_f64(),
    ))
}

/// Writes a safetensors file with one f32 table `[rows, width]` and opens it memory-mapped.
fn mapped_table(
    dir: &std::path::Path,
    name: &str,
    rows: usize,
    width: usize,
    dtype: RowDtype,
    seed: u64,
) -> Result<CpuTable> {
    let elem = match dtype {
        RowDtype::F32 => 4,
        RowDtype::BF16 => 2,
        other => anyhow::bail!("bench tables are f32 or bf16, not {other}"),
    };
    let mut rng = TestRng::new(seed);
    // Small finite values; eight bytes per draw keeps a table of gigabytes quick to write.
    let mut data = vec![0u8; rows * width * elem];
    for chunk in data.chunks_mut(8) {
        let draw = (rng.next_u64() & 0x3f3f_3f3f_3f3f_3f3f).to_le_bytes();
        chunk.copy_from_slice(&draw[..chunk.len()]);
    }
    let path = dir.join(format!("{name}.safetensors"));
    // The header is padded so the rows start on a page (so on a 64-byte boundary), as
    // `engram init-checkpoint` writes them (the safetensors crate aligns to 8 only, and a
    // 128-byte row at an 8-byte offset spans three cache lines instead of two).
    let header = crate::init_checkpoint::aligned_header(&serde_json::json!({
        "table": {
            "dtype": if elem == 4 { "F32" } else { "BF16" },
            "shape": [rows, width],
            "data_offsets": [0, data.len()],
        }
    }));
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path)?);
    file.write_all(&(header.len() as u64).to_le_bytes())?;
    file.write_all(header.as_bytes())?;
    file.write_all(&data)?;
    // On disk before the gathers start, so no writeback of it competes with them.
    file.into_inner()?.sync_data()?;
    drop(data);
    let table = CpuTable::open_mmap(&path, &bench_table_spec(rows, width, dtype))
        .with_context(|| format!("bench table {}", path.display()))?;
    // Fault every page in once so the benchmark measures memory, not the page cache's first touch.
    black_box(
        table
            .values_bytes()
            .iter()
            .step_by(4096)
            .map(|&b| b as u64)
            .sum::<u64>(),
    );
    Ok(table)
}

fn bench_table_spec(rows: usize, width: usize, dtype: RowDtype) -> TableSpec {
    TableSpec {
        layer_id: 0,
        tensor: "table".into(),
        scale_tensor: None,
        dtype,
        rows: rows as u64,
        width,
    }
}

fn paper_1024() -> EngramConfig {
    EngramConfig {
        variant: Variant::Paper,
        hash: HashConfig {
            engram_vocab_size: vec![1000, 1000],
            max_ngram_size: 3,
            n_head_per_ngram: 8,
            layer_ids: vec![1],
            pad_id: 2,
            seed: 0,
            compressed_vocab_size: None,
        },
        head_dim: 64,
        kernel_size: 4,
        hidden_size: 1024,
        hc_mult: 1,
        rms_norm_eps: 1e-6,
    }
}

fn bench_layer() -> Result<f64> {
    let cfg = paper_1024();
    let mut rng = TestRng::new(3);
    let layer = CpuLayer::new(cfg.clone(), 1, random_weights(&cfg, &mut rng))?;
    let tokens = 512;
    let hidden = random_hidden(&cfg, tokens, &mut rng);
    let emb = rng.vec(tokens * cfg.embed_dim(), 1.0);
    let mut out = vec![0f32; hidden.len()];
    let took = best_of(5, || {
        layer.forward(&hidden, &emb, None, &mut [Segment::fresh(tokens)], &mut out)?;
        Ok(())
    })?;
    Ok(tokens as f64 / took.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(host_work_ms: f64, exposed_fraction: f64) -> PrefetchRun {
        PrefetchRun {
            host_work_ms,
            fetch_ms_during_run: 2.5,
            max_fetch_ms_during_run: 4.0,
            exposed_ms: 0.01,
            exposed_fraction,
            covered_steps: 97,
            covered_exposed_fraction: 0.001,
        }
    }

    /// A report with a distinct value in every figure.
    fn sample() -> BenchReport {
        let one = Throughputs::of(4.25, 3.75, 6.5, 6.0);
        let all = Throughputs::of(9.5, 8.8, 7.5, 10.0);
        BenchReport {
            hash_tokens_per_s: 55.1e6,
            hash_decode_tokens_per_s: 38.8e6,
            gather: GatherReport::new(
                256 << 20,
                64 << 20,
                vec![(128, 9.5), (256, 11.3)],
                vec![(128, 8.8), (256, 10.4)],
                one,
                all,
            ),
            layer_tokens_per_s: 25_300.0,
            projection: ProjectionBench {
                out_dim: 2048,
                in_dim: 1024,
                points: vec![ProjectionPoint {
                    tokens: 4,
                    per_token_us: 200.0,
                    blocked_us: 900.0,
                    blocked_over_per_token: 4.5,
                    per_token_taken: true,
                }],
                cold_points: vec![ColdPoint {
                    tokens: 1,
                    warm_us: 100.0,
                    cold_us: 300.0,
                    cold_over_warm: 3.0,
                }],
            },
            prefetch: PrefetchBench {
                steps: 100,
                tokens_per_step: 512,
                prefetch_threads: 1,
                fetch_ms_idle_host: 2.61,
                fetch_ms: 2.57,
                host_work_from_fetch: run(3.855, 0.0022),
                smollm2_layer: ModelLayerTime {
                    tokens: 512,
                    context: 128,
                    layer_ms: 71.5,
                    layer_ms_range: (70.0, 75.0),
                    layer_ms_one_token: 0.45,
                },
                host_work_from_smollm2_layer: run(71.5, 0.0003),
            },
            hot_cache: HotCacheBench {
                table_bytes: 128 << 20,
                cache_bound_bytes: 6_710_886,
                zipf_exponent: 1.0,
                lookups: 1000,
                cache_hits: 700,
                cache_misses: 300,
                cache_hit_rate: 0.7,
                cache_bytes: 6_000_000,
                table_ns_per_row: 20.0,
                cached_ns_per_row: 50.0,
                cached_over_table: 2.5,
            },
            threads: 2,
        }
    }

    #[test]
    fn json_has_same_thread_count_keys() {
        let text = render(&sample(), true).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["gather_vs_memcpy_1_thread"], 4.25 / 6.5);
        assert_eq!(v["gather_vs_memcpy_all_threads"], 0.95);
        assert_eq!(v["gather_vs_memcpy"], 0.95);
        assert_eq!(v["gather_mmap_vs_memcpy_1_thread"], 3.75 / 6.5);
        assert_eq!(v["gather_mmap_vs_memcpy_all_threads"], 8.8 / 10.0);
        assert_eq!(v["gather_mmap_vs_memcpy"], 8.8 / 10.0);
        assert_eq!(v["memcpy_gb_per_s_1_thread"], 6.5);
        assert_eq!(v["memcpy_gb_per_s"], 10.0);
        assert_eq!(v["memcpy_streaming_gb_per_s_1_thread"], 6.0);
        assert_eq!(v["memcpy_libc_gb_per_s"], 7.5);
        assert_eq!(v["gather_gb_per_s_by_row_bytes"][1][1], 11.3);
        let p = &v["prefetch"];
        assert_eq!(p["host_work_from_fetch"]["host_work_ms"], 3.855);
        assert_eq!(p["host_work_from_smollm2_layer"]["host_work_ms"], 71.5);
        assert_eq!(p["smollm2_layer"]["layer_ms_one_token"], 0.45);
        assert_eq!(v["projection"]["points"][0]["blocked_over_per_token"], 4.5);
        assert_eq!(v["projection"]["cold_points"][0]["cold_over_warm"], 3.0);
        let h = &v["hot_cache"];
        assert_eq!(h["cache_hits"], 700);
        assert_eq!(h["cache_misses"], 300);
        assert_eq!(h["cache_bytes"], 6_000_000);
        assert_eq!(h["cache_hit_rate"], 0.7);
    }

    /// The line of the table that starts with `label`, split into its cells.
    fn cells(text: &str, label: &str) -> Vec<String> {
        let line = text
            .lines()
            .find(|l| {
                l.trim_start()
                    .strip_prefix(label)
                    .is_some_and(|rest| rest.starts_with("  "))
            })
            .unwrap_or_else(|| panic!("no line {label:?} in\n{text}"));
        line.trim_start()[label.len()..]
            .split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(String::from)
            .collect()
    }

    #[test]
    fn text_is_a_table_not_json() {
        let text = render(&sample(), false).unwrap();
        assert!(serde_json::from_str::<serde_json::Value>(&text).is_err());
        // Gather rows: the one-thread figure, then the all-threads one; prefetch rows:
        // the run sized from the fetch, then the one sized from the SmolLM2 layer.
        let expected: [(&str, &[&str]); 18] = [
            ("gather, table in RAM", &["4.25 GB/s", "9.50 GB/s"]),
            ("gather, table memory-mapped", &["3.75 GB/s", "8.80 GB/s"]),
            ("memcpy: the C library's", &["6.50 GB/s", "7.50 GB/s"]),
            (
                "memcpy: with the gather's stores",
                &["6.00 GB/s", "10.00 GB/s"],
            ),
            (
                "memcpy: the faster (the baseline)",
                &["6.50 GB/s", "10.00 GB/s"],
            ),
            ("gather in RAM / memcpy", &["0.65", "0.95"]),
            ("gather mapped / memcpy", &["0.58", "0.88"]),
            ("256", &["11.30 GB/s 1.13x", "10.40 GB/s 1.04x"]),
            ("prefill: one 262,144-token sequence", &["55.10 M tokens/s"]),
            ("4", &["200.0 us", "900.0 us", "4.50", "per token"]),
            ("host work each step", &["1.5 x fetch", "1 SmolLM2 layer"]),
            ("host work", &["3.855 ms", "71.500 ms"]),
            ("exposed / fetch, all steps", &["0.22%", "0.03%"]),
            ("steps with fetch <= host work", &["97 of 100", "97 of 100"]),
            ("hits / misses (from empty)", &["700 / 300"]),
            ("hit rate", &["70.00%"]),
            ("cache bytes after", &["5.7 MiB"]),
            ("ns a row: table / through cache", &["20.0 / 50.0 (2.50x)"]),
        ];
        for (label, want) in expected {
            assert_eq!(cells(&text, label), want, "{label}");
        }
        assert!(text.contains("SmolLM2-135M decoder layer, 512 tokens, context 128: 71.500 ms"));
    }
}
