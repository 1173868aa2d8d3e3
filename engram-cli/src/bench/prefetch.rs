//! The runtime's prefetch under a simulated host, in two runs that differ only in how
//! long the host works before it reaches the Engram layer each step.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use engram_core::backend::EngramLayer;
use engram_core::compress::VocabCompression;
use engram_core::dtype::RowDtype;
use engram_core::primes::table_layouts;
use engram_core::table::TableStore;
use engram_core::testing::{random_weights, TestRng};
use engram_cpu::layer::CpuLayer;
use engram_plugin::{EngramRuntime, LookupStats, RuntimeLayer, RuntimeOptions, SequenceInput};
use serde::Serialize;

use super::smollm2::DecoderLayer;
use super::{mapped_table, paper_1024};

/// Decode tokens per step (one per sequence).
const SEQS: usize = 512;
/// Steps of each measured run.
const STEPS: u64 = 100;
/// Steps of each calibration run (only a mean is needed).
const CALIBRATION_STEPS: u64 = 30;
/// Cached positions each sequence attends over in the SmolLM2 layer: about the
/// end-to-end benchmark's request (a 73-token prompt and 64 generated tokens).
const CONTEXT: usize = 128;
/// Forwards timed for the SmolLM2 layer's time (after one untimed).
const LAYER_REPS: usize = 5;

/// The runtime's prefetch under a simulated host: each step the host computes (a spin
/// of `host_work_ms`) before reaching the Engram layer; rows (512 tokens x 16 heads,
/// 256-byte bf16 rows, from a memory-mapped 245 MiB table) are fetched meanwhile on the
/// runtime's prefetch pool (`RuntimeOptions::prefetch_threads` at its default, half the
/// cores). The host (its spin and the layer math) runs on one core.
#[derive(Debug, Clone, Serialize)]
pub struct PrefetchBench {
    /// Steps of each run.
    pub steps: u64,
    /// Decode tokens per step (one per sequence).
    pub tokens_per_step: usize,
    /// Threads of the runtime's prefetch pool.
    pub prefetch_threads: usize,
    /// Mean time to gather one step's rows on the prefetch threads with the host idle
    /// (waiting for the rows), over a 30-step calibration run.
    pub fetch_ms_idle_host: f64,
    /// Mean time to gather one step's rows on the prefetch threads while the host works
    /// (a 30-step calibration run whose host work is 4 x `fetch_ms_idle_host`).
    pub fetch_ms: f64,
    /// Run 1: the host works 1.5 x `fetch_ms` each step. Sized from the fetch time, so
    /// a step whose fetch takes its calibrated time is covered by construction: this run
    /// shows the prefetch machinery's own overhead, not whether a model hides the fetch.
    pub host_work_from_fetch: PrefetchRun,
    /// The measured time of one SmolLM2-135M decoder layer at this benchmark's batch, on
    /// the simulated host's one core (see [`ModelLayerTime`]).
    pub smollm2_layer: ModelLayerTime,
    /// Run 2: the host works `smollm2_layer.layer_ms` each step (the one decoder layer
    /// before the demo checkpoint's first Engram layer), whatever the fetch takes.
    pub host_work_from_smollm2_layer: PrefetchRun,
}

/// One run of `steps` steps with prefetch on and a fixed host work per step.
#[derive(Debug, Clone, Serialize)]
pub struct PrefetchRun {
    /// The host's work before the Engram layer, each step.
    pub host_work_ms: f64,
    /// Mean gather time per step while the host worked (contention shows here).
    pub fetch_ms_during_run: f64,
    /// The slowest step's gather while the host worked.
    pub max_fetch_ms_during_run: f64,
    /// Mean time the host waited for rows per step.
    pub exposed_ms: f64,
    /// exposed / fetch time over all steps.
    pub exposed_fraction: f64,
    /// Steps whose gather took no longer than the host's work (no prefetch can hide
    /// the others).
    pub covered_steps: u64,
    /// exposed / fetch time over those steps.
    pub covered_exposed_fraction: f64,
}

impl PrefetchRun {
    /// The run's figures from its per-step stats.
    pub fn from_steps(host_work: Duration, per_step: &[LookupStats]) -> Self {
        let (mut all, mut covered) = (LookupStats::default(), LookupStats::default());
        for s in per_step {
            all.add(s);
            if s.fetch_time <= host_work {
                covered.add(s);
            }
        }
        let steps = per_step.len().max(1) as u32;
        Self {
            host_work_ms: ms(host_work),
            fetch_ms_during_run: ms(all.fetch_time / steps),
            max_fetch_ms_during_run: per_step
                .iter()
                .map(|s| ms(s.fetch_time))
                .fold(0.0, f64::max),
            exposed_ms: ms(all.exposed_wait / steps),
            exposed_fraction: all.exposed_fraction(),
            covered_steps: covered.steps,
            covered_exposed_fraction: covered.exposed_fraction(),
        }
    }
}

/// One SmolLM2-135M decoder layer (`super::smollm2`), decode-shaped, on one thread: the
/// host work of the second prefetch run.
#[derive(Debug, Clone, Serialize)]
pub struct ModelLayerTime {
    /// Sequences, one new token each (the prefetch benchmark's tokens per step).
    pub tokens: usize,
    /// Cached positions each sequence attends over.
    pub context: usize,
    /// Median of 5 forwards (after one untimed), ms.
    pub layer_ms: f64,
    /// Fastest and slowest of those forwards, ms.
    pub layer_ms_range: (f64, f64),
    /// The same layer for one sequence (batch 1, as the end-to-end benchmark decodes),
    /// median of 5, ms: to set beside that benchmark's time per token.
    pub layer_ms_one_token: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn spin(d: Duration) {
    let t = Instant::now();
    while t.elapsed() < d {
        std::hint::spin_loop();
    }
}

/// Sorted times of `LAYER_REPS` forwards of a SmolLM2 layer over `tokens` sequences,
/// after one untimed forward.
fn time_smollm2_layer(tokens: usize) -> Result<Vec<Duration>> {
    let layer = DecoderLayer::new(tokens, CONTEXT, 21)?;
    let x = layer.input(22)?;
    std::hint::black_box(layer.forward(&x)?);
    let mut times = (0..LAYER_REPS)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(layer.forward(&x)?);
            Ok(t.elapsed())
        })
        .collect::<Result<Vec<_>>>()?;
    times.sort();
    Ok(times)
}

pub fn bench_prefetch(dir: &Path) -> Result<PrefetchBench> {
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
    let make = || {
        EngramRuntime::from_parts(
            cfg.clone(),
            compression.clone(),
            vec![RuntimeLayer::on_host(1, table.clone(), layer.clone())],
            RuntimeOptions {
                prefetch: true,
                ..RuntimeOptions::default()
            },
        )
    };
    let c = cfg.branch_channels();
    let hidden = vec![0.25f32; SEQS * c];
    // Per-step stats, so steps where the gather outran the host's work can be told apart.
    let run = |rt: &EngramRuntime, host_work: Duration, steps: u64| -> Result<Vec<_>> {
        let mut per_step: Vec<LookupStats> = Vec::new();
        for s in 0..steps {
            let tokens: Vec<[u32; 1]> = (0..SEQS as u64)
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
    host_pool.install(|| -> Result<_> {
        // Calibrate on the prefetch path itself, with the host waiting and with the host
        // busy for longer than the gather: the second is the fetch time its work must
        // cover (they differ when the host's work slows the gather).
        let idle = make()?;
        run(&idle, Duration::ZERO, CALIBRATION_STEPS)?;
        let idle_fetch = idle.stats().fetch_time / CALIBRATION_STEPS as u32;
        let busy = make()?;
        run(&busy, idle_fetch * 4, CALIBRATION_STEPS)?;
        let fetch = busy.stats().fetch_time / CALIBRATION_STEPS as u32;
        let from_fetch = fetch * 3 / 2;
        let per_step = run(&make()?, from_fetch, STEPS)?;
        let host_work_from_fetch = PrefetchRun::from_steps(from_fetch, &per_step);

        // The same host, working as long as one real decoder layer takes here.
        let times = time_smollm2_layer(SEQS)?;
        let layer_time = times[times.len() / 2];
        let one_token = time_smollm2_layer(1)?;
        let smollm2_layer = ModelLayerTime {
            tokens: SEQS,
            context: CONTEXT,
            layer_ms: ms(layer_time),
            layer_ms_range: (ms(times[0]), ms(times[times.len() - 1])),
            layer_ms_one_token: ms(one_token[one_token.len() / 2]),
        };
        let per_step = run(&make()?, layer_time, STEPS)?;
        let host_work_from_smollm2_layer = PrefetchRun::from_steps(layer_time, &per_step);
        std::fs::remove_file(dir.join("prefetch.safetensors")).ok();
        Ok(PrefetchBench {
            steps: STEPS,
            tokens_per_step: SEQS,
            prefetch_threads: RuntimeOptions::default().prefetch_threads,
            fetch_ms_idle_host: ms(idle_fetch),
            fetch_ms: ms(fetch),
            host_work_from_fetch,
            smollm2_layer,
            host_work_from_smollm2_layer,
        })
    })
}

/// A cheap, varied token id per step (rows spread over the table).
fn rng_token(step: u64) -> u32 {
    (step.wrapping_mul(2_654_435_761) % 99_991) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(fetch_ms: u64, exposed_ms: u64) -> LookupStats {
        LookupStats {
            steps: 1,
            fetch_time: Duration::from_millis(fetch_ms),
            exposed_wait: Duration::from_millis(exposed_ms),
            ..LookupStats::default()
        }
    }

    /// Steps whose fetch outlasted the host's work count in the all-steps figures only.
    #[test]
    fn run_figures_split_covered_steps() {
        let steps = [step(2, 0), step(4, 1), step(10, 6)];
        let r = PrefetchRun::from_steps(Duration::from_millis(4), &steps);
        assert_eq!(r.covered_steps, 2);
        assert!((r.covered_exposed_fraction - 1.0 / 6.0).abs() < 1e-12);
        assert!((r.exposed_fraction - 7.0 / 16.0).abs() < 1e-12);
        assert!((r.exposed_ms - 7.0 / 3.0).abs() < 1e-5);
        assert!((r.fetch_ms_during_run - 16.0 / 3.0).abs() < 1e-5);
        assert_eq!(r.max_fetch_ms_during_run, 10.0);
        assert_eq!(r.host_work_ms, 4.0);
    }
}
