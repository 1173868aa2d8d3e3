//! `engram bench --json`: throughput of each stage, each measured against a baseline in
//! the same run (ratios, not absolute claims). Runs in well under a minute on 2 cores.

use std::hint::black_box;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use engram_core::backend::{EngramLayer, Segment};
use engram_core::checkpoint::TableSpec;
use engram_core::compress::VocabCompression;
use engram_core::config::{EngramConfig, HashConfig, Variant};
use engram_core::dtype::RowDtype;
use engram_core::hashing::{EngramHasher, NgramHasher};
use engram_core::primes::table_layouts;
use engram_core::table::TableStore;
use engram_core::testing::{random_hidden, random_weights, TestRng};
use engram_cpu::layer::CpuLayer;
use engram_cpu::table::AlignedBytes;
use engram_cpu::{largest_cache_bytes, CpuTable};
use engram_plugin::{EngramRuntime, RuntimeLayer, RuntimeOptions, SequenceInput};
use serde::Serialize;

/// Everything `engram bench --json` prints.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    /// Tokens hashed per second, one thread, V4.1 hash config (layers [1, 14], orders
    /// 2-4, 8 heads, table vocab 16,000,000 per order, compressed vocab 99,092): both
    /// layers' 24 rows for every token of one 262,144-token sequence (`hash_sequence`).
    pub hash_tokens_per_s: f64,
    /// The same, decode-shaped: 64 sequences advancing one token per step, each step
    /// hashing through the per-sequence history (`hash_step`).
    pub hash_decode_tokens_per_s: f64,
    /// Gather throughput in GB/s (bytes of rows copied per second): random rows, stored
    /// as f32, of a table of 4x the largest CPU cache (at least 256 MiB, at most 2 GiB)
    /// read into RAM (`TableMode::Ram`: huge pages where the kernel offers them), 2x the
    /// largest cache (64 MiB to 1 GiB) of rows per pass into one page-aligned output (so
    /// the gather streams it to memory, as memcpy does at that size), all threads, best
    /// of 5 passes; keyed by row bytes (128, 256, 512, 1024).
    pub gather_gb_per_s_by_row_bytes: Vec<(usize, f64)>,
    /// `gather_gb_per_s_by_row_bytes` at 128-byte rows, the smallest size the target names.
    pub gather_gb_per_s: f64,
    /// The same gathers from the same file memory-mapped (`TableMode::Mmap`, page cache
    /// warmed; rows 64-byte aligned in the file, as `engram init-checkpoint` writes them):
    /// what a table served from disk costs once its rows are cached.
    pub gather_mmap_gb_per_s_by_row_bytes: Vec<(usize, f64)>,
    /// `gather_mmap_gb_per_s_by_row_bytes` at 128-byte rows.
    pub gather_mmap_gb_per_s: f64,
    /// One sequential `copy_from_slice` of the same bytes per pass out of the RAM table
    /// into the gathers' output, one thread, best of 5: the memory bandwidth baseline for
    /// the gather.
    pub memcpy_gb_per_s: f64,
    /// gather / memcpy at 128-byte rows (RAM table).
    pub gather_vs_memcpy: f64,
    /// gather from the memory-mapped table / memcpy at 128-byte rows.
    pub gather_mmap_vs_memcpy: f64,
    /// Paper-variant layer (hidden 1024, hc_mult 1, orders 2-3 x 8 heads x 64 columns =
    /// 1024 embedding columns, kernel 4) over a batch of 512 tokens, embeddings given:
    /// tokens per second of `CpuLayer::forward`.
    pub layer_tokens_per_s: f64,
    /// The simulated host (see [`PrefetchBench`]).
    pub prefetch: PrefetchBench,
    /// Threads of the rayon pool the gather and the layer use.
    pub threads: usize,
}

/// The runtime's prefetch under a simulated host: each step the host computes (a spin
/// of `host_work_ms`) before reaching the Engram layer; rows (512 tokens x 16 heads,
/// 256-byte bf16 rows, from a memory-mapped 245 MiB table) are fetched meanwhile on the
/// runtime's prefetch pool (`RuntimeOptions::prefetch_threads` at its default, half the
/// cores). The host (its spin and the layer math) runs on one core.
#[derive(Debug, Serialize)]
pub struct PrefetchBench {
    pub steps: u64,
    /// Threads of the runtime's prefetch pool.
    pub prefetch_threads: usize,
    /// Mean time to gather one step's rows on the prefetch threads with the host idle
    /// (waiting for the rows), over a 30-step calibration run.
    pub fetch_ms_idle_host: f64,
    /// Mean time to gather one step's rows on the prefetch threads while the host works
    /// (a 30-step calibration run whose host work is 4 x `fetch_ms_idle_host`): the
    /// fetch time the host's work must cover.
    pub fetch_ms: f64,
    /// The host's work before the Engram layer (1.5 x fetch_ms).
    pub host_work_ms: f64,
    /// Mean gather time per step while the host worked (contention shows here).
    pub fetch_ms_during_run: f64,
    /// The slowest step's gather while the host worked.
    pub max_fetch_ms_during_run: f64,
    /// Mean time the host waited for rows per step, with prefetch on.
    pub exposed_ms: f64,
    /// exposed / fetch time over all steps, with prefetch on.
    pub exposed_fraction: f64,
    /// Steps whose gather took no longer than the host's work (the others were slowed
    /// by something else on the machine, so no prefetch could hide them).
    pub covered_steps: u64,
    /// exposed / fetch time over those steps: the target (<= 0.05) is about these.
    pub covered_exposed_fraction: f64,
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
    let gather = bench_gather(scratch)?;
    let (gather_gb_per_s, gather_mmap_gb_per_s) = (gather.ram[0].1, gather.mmap[0].1);
    let memcpy_gb_per_s = gather.memcpy_gb_per_s;
    Ok(BenchReport {
        hash_tokens_per_s,
        hash_decode_tokens_per_s,
        gather_gb_per_s,
        memcpy_gb_per_s,
        gather_vs_memcpy: gather_gb_per_s / memcpy_gb_per_s,
        gather_mmap_gb_per_s,
        gather_mmap_vs_memcpy: gather_mmap_gb_per_s / memcpy_gb_per_s,
        gather_gb_per_s_by_row_bytes: gather.ram,
        gather_mmap_gb_per_s_by_row_bytes: gather.mmap,
        layer_tokens_per_s: bench_layer()?,
        prefetch: bench_prefetch(scratch)?,
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
    // The header is padded so the rows start on a 64-byte boundary, as `engram
    // init-checkpoint` writes them (the safetensors crate aligns to 8 only, and a 128-byte
    // row at an 8-byte offset spans three cache lines instead of two).
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

struct GatherBench {
    ram: Vec<(usize, f64)>,
    mmap: Vec<(usize, f64)>,
    memcpy_gb_per_s: f64,
}

fn bench_gather(dir: &std::path::Path) -> Result<GatherBench> {
    // Both sides must come from memory, not cache: the table is 4x the largest cache and
    // each pass (the gather's output, the copy's source) 2x, so no pass can stay cached
    // for the next (a 300 MiB L3 is seen on cloud VMs).
    let cache = largest_cache_bytes();
    let table_bytes = (4 * cache).clamp(256 << 20, 2 << 30);
    let pass_bytes = (2 * cache).clamp(64 << 20, 1 << 30);
    let gb_per_s = |took: Duration| pass_bytes as f64 / took.as_secs_f64() / 1e9;
    // One output for every pass, gathers and copy alike: page-aligned (so 64-byte
    // aligned, as the runtime's buffers are), huge pages where offered, touched before.
    let mut out = OutputBuffer::new(pass_bytes)?;
    let mut result = GatherBench {
        ram: Vec::new(),
        mmap: Vec::new(),
        memcpy_gb_per_s: 0.0,
    };
    for (i, row_bytes) in [128usize, 256, 512, 1024].into_iter().enumerate() {
        let width = row_bytes / 4;
        let rows = table_bytes / row_bytes;
        let name = format!("gather{row_bytes}");
        let mapped = mapped_table(dir, &name, rows, width, RowDtype::F32, i as u64)?;
        let mut rng = TestRng::new(7 + i as u64);
        let ids: Vec<u64> = (0..pass_bytes / row_bytes)
            .map(|_| rng.below(rows as u64))
            .collect();
        let took = best_of(5, || Ok(mapped.gather_f32(&ids, out.f32s())?))?;
        result.mmap.push((row_bytes, gb_per_s(took)));
        drop(mapped);

        let path = dir.join(format!("{name}.safetensors"));
        let in_ram = CpuTable::load(&path, &bench_table_spec(rows, width, RowDtype::F32))?;
        let took = best_of(5, || Ok(in_ram.gather_f32(&ids, out.f32s())?))?;
        result.ram.push((row_bytes, gb_per_s(took)));
        if i == 0 {
            // Into the same output buffer as the gathers.
            let src = &in_ram.values_bytes()[..pass_bytes];
            let took = best_of(5, || {
                out.bytes().copy_from_slice(src);
                black_box(out.bytes());
                Ok(())
            })?;
            result.memcpy_gb_per_s = gb_per_s(took);
        }
        std::fs::remove_file(&path).ok();
    }
    Ok(result)
}

/// The gathers' (and the copy's) output: the CPU backend's own RAM buffer (page-aligned,
/// huge pages where offered), every page touched before the first pass.
struct OutputBuffer(AlignedBytes);

impl OutputBuffer {
    fn new(bytes: usize) -> Result<Self> {
        let mut buf = AlignedBytes::zeroed(bytes).context("bench output buffer")?;
        buf.as_mut_slice()
            .iter_mut()
            .step_by(4096)
            .for_each(|b| *b = 0);
        Ok(Self(buf))
    }

    fn bytes(&mut self) -> &mut [u8] {
        self.0.as_mut_slice()
    }

    fn f32s(&mut self) -> &mut [f32] {
        let bytes = self.0.as_mut_slice();
        let len = bytes.len() / 4;
        // SAFETY: the buffer is page-aligned, holds at least `4 * len` initialized bytes
        // and any bytes are a valid f32; the view borrows `self` mutably.
        unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<f32>(), len) }
    }
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

fn spin(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

fn bench_prefetch(dir: &std::path::Path) -> Result<PrefetchBench> {
    let mut cfg = paper_1024();
    cfg.head_dim = 128;
    cfg.hidden_size = 256;
    cfg.hash.engram_vocab_size = vec![60_000, 60_000];
    let layout = &table_layouts(&cfg.hash)[0];
    let table: Arc<dyn TableStore> = Arc::new(mapped_table(
        dir,
        "prefetch",
        layout.total_rows as usize,
        cfg.head_dim,
        RowDtype::BF16,
        11,
    )?);
    let mut rng = TestRng::new(5);
    let layer: Arc<dyn EngramLayer> = Arc::new(CpuLayer::new(
        cfg.clone(),
        1,
        random_weights(&cfg, &mut rng),
    )?);
    let compression = Arc::new(VocabCompression::from_lookup((0..100_000u32).collect())?);
    let make = |prefetch| {
        EngramRuntime::from_parts(
            cfg.clone(),
            compression.clone(),
            vec![RuntimeLayer::on_host(1, table.clone(), layer.clone())],
            RuntimeOptions {
                prefetch,
                ..RuntimeOptions::default()
            },
        )
    };
    // Each calibration needs only a mean; every step also runs the layer's math on one
    // core, which is most of this benchmark's time.
    let (seqs, steps, calibration_steps) = (512usize, 100u64, 30u64);
    let c = cfg.branch_channels();
    let hidden = vec![0.25f32; seqs * c];
    // Per-step stats, so steps where the gather outran the host's work can be told apart.
    let run = |rt: &EngramRuntime, host_work: Duration, steps: u64| -> Result<Vec<_>> {
        let mut per_step: Vec<engram_plugin::LookupStats> = Vec::new();
        for s in 0..steps {
            let tokens: Vec<[u32; 1]> = (0..seqs as u64)
                .map(|b| [rng_token(s * 1000 + b)])
                .collect();
            let inputs: Vec<SequenceInput<'_>> = tokens
                .iter()
                .enumerate()
                .map(|(b, t)| SequenceInput {
                    seq_id: b as u64,
                    tokens: t,
                    position: s as usize,
                    dead: None,
                    context: None,
                })
                .collect();
            let mut step = rt.begin_step(&inputs, &[])?;
            spin(host_work);
            step.apply_packed(1, &hidden)?;
            per_step.push(step.finish());
        }
        Ok(per_step)
    };
    // The simulated host computes on one core (its layer math too), leaving the other to
    // the prefetch pool, as a GPU host leaves its CPU cores. Without this, rayon's idle
    // workers spin after each layer forward and take the core the prefetch needs.
    let host_pool = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let (idle_fetch, fetch, stats, per_step) = host_pool.install(|| -> Result<_> {
        // Calibrate on the prefetch path itself, with the host waiting and with the host
        // busy for longer than the gather: the second is the fetch time its work must
        // cover (they differ when the host's work slows the gather).
        let idle = make(true)?;
        run(&idle, Duration::ZERO, calibration_steps)?;
        let idle_fetch = idle.stats().fetch_time / calibration_steps as u32;
        let busy = make(true)?;
        run(&busy, idle_fetch * 4, calibration_steps)?;
        let fetch = busy.stats().fetch_time / calibration_steps as u32;
        let pre = make(true)?;
        let per_step = run(&pre, fetch * 3 / 2, steps)?;
        Ok((idle_fetch, fetch, pre.stats(), per_step))
    })?;
    let host_work = fetch * 3 / 2;
    let mut covered = engram_plugin::LookupStats::default();
    for s in per_step.iter().filter(|s| s.fetch_time <= host_work) {
        covered.add(s);
    }
    std::fs::remove_file(dir.join("prefetch.safetensors")).ok();
    Ok(PrefetchBench {
        steps,
        prefetch_threads: RuntimeOptions::default().prefetch_threads,
        fetch_ms_idle_host: idle_fetch.as_secs_f64() * 1e3,
        fetch_ms: fetch.as_secs_f64() * 1e3,
        host_work_ms: host_work.as_secs_f64() * 1e3,
        fetch_ms_during_run: (stats.fetch_time / steps as u32).as_secs_f64() * 1e3,
        max_fetch_ms_during_run: per_step
            .iter()
            .map(|s| s.fetch_time.as_secs_f64() * 1e3)
            .fold(0.0, f64::max),
        exposed_ms: (stats.exposed_wait / steps as u32).as_secs_f64() * 1e3,
        exposed_fraction: stats.exposed_fraction(),
        covered_steps: covered.steps,
        covered_exposed_fraction: covered.exposed_fraction(),
    })
}

/// A cheap, varied token id per step (rows spread over the table).
fn rng_token(step: u64) -> u32 {
    (step.wrapping_mul(2_654_435_761) % 99_991) as u32
}
