//! The runtime on the CUDA backend against the runtime on the CPU backend, through the
//! golden checkpoints: every table placement, with and without the prefetch thread, over
//! a batch of two sequences that prefill and then decode.
//!
//! The GPU tests are ignored by a plain `cargo test` (shown as ignored, never as passed)
//! and run by `cargo xtask test-gpu` with `--include-ignored`, where they fail without a
//! GPU. The harness itself (reference backend against CPU backend) runs everywhere.

use std::path::PathBuf;

use engram_core::checkpoint::Checkpoint;
use engram_core::config::{EngramConfig, Variant};
use engram_core::golden::GoldenSample;
use engram_core::metrics::relative_error;
use engram_cpu::table::TableMode;
use engram_cuda::testing::{golden_data_dir, gpu};
use engram_plugin::{
    BackendKind, CudaTables, EngramRuntime, OpenOptions, RuntimeOptions, SequenceInput,
};

/// `tests/data` of the repository.
fn data_dir() -> PathBuf {
    golden_data_dir()
}

fn open(file: &str, backend: BackendKind, prefetch: bool, table_mode: TableMode) -> EngramRuntime {
    let dir = data_dir();
    let options = OpenOptions {
        backend,
        table_mode,
        tokenizer: Some(dir.join("deepseek-v4-tokenizer/tokenizer.json")),
        runtime: RuntimeOptions {
            prefetch,
            ..RuntimeOptions::default()
        },
        ..OpenOptions::default()
    };
    EngramRuntime::open(dir.join(file), options)
        .unwrap_or_else(|e| panic!("{file} with {backend:?}, {table_mode:?}: {e}"))
        .expect("the golden file has an Engram config")
}

/// One golden sample: token ids, hidden states `[t, hc_mult*hidden]`, dead mask.
struct Sample {
    ids: Vec<u32>,
    hidden: Vec<f32>,
    dead: Option<Vec<bool>>,
}

fn samples(file: &str, cfg: &EngramConfig) -> Vec<Sample> {
    let path = data_dir().join(file);
    let bytes = std::fs::read(&path).unwrap();
    let ck = Checkpoint::parse(&path, &bytes).unwrap();
    (0..2)
        .map(|s| {
            let golden = GoldenSample::read(&ck, cfg, s).unwrap();
            Sample {
                ids: golden.token_ids(),
                hidden: golden.hidden,
                dead: golden.dead,
            }
        })
        .collect()
}

/// Every layer's outputs, step after step, for `rounds` rounds of both samples in one
/// batch: the first half of each prompt in one step, then one token per step.
fn run(rt: &EngramRuntime, samples: &[Sample], rounds: u64) -> Vec<Vec<f32>> {
    let cfg = rt.config().clone();
    let c = cfg.branch_channels();
    let mut outputs = vec![Vec::new(); cfg.hash.layer_ids.len()];
    for round in 0..rounds {
        let mut pos = vec![0usize; samples.len()];
        loop {
            let mut inputs = Vec::new();
            let mut hidden = Vec::new();
            for (s, sample) in samples.iter().enumerate() {
                let t = sample.ids.len();
                if pos[s] == t {
                    continue;
                }
                let n = if pos[s] == 0 { (t / 2).max(1) } else { 1 };
                let p = pos[s];
                inputs.push(SequenceInput {
                    seq_id: round * 10 + s as u64,
                    tokens: &sample.ids[p..p + n],
                    position: p,
                    dead: sample.dead.as_ref().map(|m| &m[p..p + n]),
                    context: None,
                });
                hidden.extend_from_slice(&sample.hidden[p * c..(p + n) * c]);
                pos[s] += n;
            }
            if inputs.is_empty() {
                break;
            }
            let mut step = rt.begin_step(&inputs, &[]).unwrap();
            for (l, &layer_id) in cfg.hash.layer_ids.iter().enumerate() {
                let out = step.apply_packed(layer_id, &hidden).unwrap();
                outputs[l].extend(out);
            }
            step.finish();
        }
    }
    outputs
}

/// Each placement with the prefetch thread; the table mapped from the checkpoint, or read
/// into RAM (zero-copy registers anonymous memory only: drivers may refuse file maps,
/// which engram-cuda's own tests cover).
const RUNS: [(CudaTables, TableMode, bool); 6] = [
    (CudaTables::PinnedHost, TableMode::Mmap, true),
    (CudaTables::PinnedHost, TableMode::Ram, true),
    (CudaTables::PinnedHost, TableMode::Mmap, false),
    (CudaTables::Device, TableMode::Mmap, true),
    (CudaTables::ZeroCopy, TableMode::Ram, true),
    (CudaTables::Cached { rows: 256 }, TableMode::Mmap, true),
];

/// Runs `file`'s samples on `backend` and checks them against `expected` (the CPU
/// backend's outputs); returns the runtime for its stats.
fn check_against(
    file: &str,
    samples: &[Sample],
    expected: &[Vec<f32>],
    backend: BackendKind,
    prefetch: bool,
    table_mode: TableMode,
) -> EngramRuntime {
    let what = format!("{file}, {backend:?}, {table_mode:?}, prefetch {prefetch}");
    let rt = open(file, backend, prefetch, table_mode);
    let cfg = rt.config().clone();
    let tol = match cfg.variant {
        Variant::Paper => 1e-5,
        Variant::V41 => 1e-2,
    };
    let got = run(&rt, samples, 2);
    for (l, (g, e)) in got.iter().zip(expected).enumerate() {
        assert_eq!(g.len(), e.len(), "{what}: layer {l} output length");
        let rel = relative_error(g, e);
        assert!(
            rel <= tol,
            "{what}: layer {} rel err {rel:e} against the CPU backend",
            cfg.hash.layer_ids[l]
        );
    }
    println!(
        "{what}: matches the CPU backend over {} steps",
        rt.stats().steps
    );
    rt
}

/// The CPU backend's outputs for `file`, with its samples.
fn cpu_outputs(file: &str) -> (Vec<Sample>, Vec<Vec<f32>>) {
    let cpu = open(file, BackendKind::Cpu, true, TableMode::Mmap);
    let samples = samples(file, cpu.config());
    let expected = run(&cpu, &samples, 2);
    (samples, expected)
}

fn cuda_matches_cpu(file: &str, host_register_supported: bool) {
    let (samples, expected) = cpu_outputs(file);
    for (tables, table_mode, prefetch) in RUNS {
        if tables == CudaTables::ZeroCopy && !host_register_supported {
            println!("note: {file}: zero-copy skipped (the device reports no host registration)");
            continue;
        }
        let backend = BackendKind::Cuda { ordinal: 0, tables };
        let rt = check_against(file, &samples, &expected, backend, prefetch, table_mode);
        let what = format!("{file}, {tables:?}, {table_mode:?}, prefetch {prefetch}");
        let steps = rt.stats().steps;
        let stats = rt.device_table_stats();
        assert_eq!(stats.len(), rt.config().hash.layer_ids.len(), "{what}");
        for (layer_id, s) in stats {
            assert_eq!(s.prefetches, steps, "{what}: layer {layer_id}: {s:?}");
            assert_eq!(s.gathers, steps, "{what}: layer {layer_id}: {s:?}");
            match tables {
                CudaTables::Device => assert_eq!(s.hits, s.lookups, "{what}: {s:?}"),
                // The second round repeats the first one's rows.
                CudaTables::Cached { .. } => assert!(s.hits > 0, "{what}: {s:?}"),
                _ => assert_eq!(s.hits, 0, "{what}: {s:?}"),
            }
        }
    }
}

/// The harness itself, on any machine: the reference backend through the same batches.
#[test]
fn reference_runtime_matches_the_cpu_through_the_same_batches() {
    for file in [
        "forward_demo_small.safetensors",
        "forward_v41_small.safetensors",
    ] {
        let (samples, expected) = cpu_outputs(file);
        assert!(expected.iter().all(|o| !o.is_empty()));
        let rt = check_against(
            file,
            &samples,
            &expected,
            BackendKind::Reference,
            false,
            TableMode::Ram,
        );
        assert!(rt.device_table_stats().is_empty());
        // Two rounds of a prefill step and one-token steps for the longer sample.
        let longest = samples.iter().map(|s| s.ids.len()).max().unwrap() as u64;
        assert_eq!(rt.stats().steps, 2 * (1 + longest - longest / 2));
    }
}

/// The CUDA runs of [`cuda_matches_cpu`] for test `test`.
fn gpu_case(test: &str, file: &str) {
    let gpu = gpu(test);
    cuda_matches_cpu(file, gpu.backend.info().host_register_supported);
}

#[test]
#[ignore = "needs a CUDA device: cargo xtask test-gpu"]
fn paper_runtime_on_the_gpu_matches_the_cpu() {
    gpu_case(
        "paper_runtime_on_the_gpu_matches_the_cpu",
        "forward_demo_small.safetensors",
    );
}

#[test]
#[ignore = "needs a CUDA device: cargo xtask test-gpu"]
fn v41_runtime_on_the_gpu_matches_the_cpu() {
    gpu_case(
        "v41_runtime_on_the_gpu_matches_the_cpu",
        "forward_v41_small.safetensors",
    );
}

/// A store double-buffers its staging: with three steps open, the first step's rows were
/// overwritten by the third's, and applying it is an error, not stale data.
#[test]
#[ignore = "needs a CUDA device: cargo xtask test-gpu"]
fn a_third_open_step_makes_the_first_steps_rows_stale() {
    let _gpu = gpu("a_third_open_step_makes_the_first_steps_rows_stale");
    let file = "forward_demo_small.safetensors";
    let tables = CudaTables::PinnedHost;
    let rt = open(
        file,
        BackendKind::Cuda { ordinal: 0, tables },
        true,
        TableMode::Mmap,
    );
    let cfg = rt.config().clone();
    let sample = &samples(file, &cfg)[0];
    let c = cfg.branch_channels();
    let layer = cfg.hash.layer_ids[0];
    let input = |seq_id| SequenceInput {
        seq_id,
        tokens: &sample.ids[..4],
        position: 0,
        dead: None,
        context: None,
    };
    let hidden = &sample.hidden[..4 * c];
    let mut first = rt.begin_step(&[input(1)], &[]).unwrap();
    let mut second = rt.begin_step(&[input(2)], &[]).unwrap();
    let mut third = rt.begin_step(&[input(3)], &[]).unwrap();
    // The third step's prefetch runs after the first's (one queue); waiting for it first
    // makes sure it has reused the first one's buffer.
    let out3 = third.apply_packed(layer, hidden).unwrap();
    let e = first.apply_packed(layer, hidden).unwrap_err().to_string();
    assert!(e.contains("stale") && e.contains(&layer.to_string()), "{e}");
    let out2 = second.apply_packed(layer, hidden).unwrap();
    // The two steps still open are right: the CPU backend on the same tokens.
    let cpu = open(file, BackendKind::Cpu, true, TableMode::Mmap);
    let expected = cpu
        .begin_step(&[input(1)], &[])
        .unwrap()
        .apply_packed(layer, hidden)
        .unwrap();
    for (name, out) in [("second", &out2), ("third", &out3)] {
        let rel = relative_error(out, &expected);
        assert!(
            rel <= 1e-5,
            "{name} step: rel err {rel:e} against the CPU backend"
        );
    }
}
