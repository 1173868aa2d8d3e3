//! The `cuda` feature's path: hidden states that are candle CUDA tensors, applied in device
//! memory with the conv windows kept on the device, against the same runtime fed host
//! tensors (today's path: a copy to the host and back at each layer). Both run the same
//! kernels on the same rows, so the outputs must be bit-equal, step after step (prefill,
//! then one-token decode steps that read the remembered windows).
//!
//! Ignored by a plain `cargo test` (shown as ignored); they need a GPU and a build whose
//! candle-core loads CUDA at run time (see docs/gpu.md).
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor};
use engram_core::checkpoint::Checkpoint;
use engram_core::golden::GoldenSample;
use engram_cuda::testing::{golden_data_dir, gpu};
use engram_plugin::{BackendKind, CudaTables, EngramRuntime, OpenOptions, SequenceInput};

fn open(file: &str) -> EngramRuntime {
    let dir = golden_data_dir();
    let options = OpenOptions {
        backend: BackendKind::Cuda {
            ordinal: 0,
            tables: CudaTables::PinnedHost,
        },
        tokenizer: Some(dir.join("deepseek-v4-tokenizer/tokenizer.json")),
        ..OpenOptions::default()
    };
    EngramRuntime::open(dir.join(file), options)
        .unwrap_or_else(|e| panic!("{file}: {e}"))
        .expect("the golden file has an Engram config")
}

/// Both golden samples in one batch `[2, T, C]` (right padding): the first half of each
/// prompt, then one token per step; every layer's output of every step, as f32.
fn run(rt: &EngramRuntime, device: &Device) -> Vec<Vec<f32>> {
    let cfg = rt.config().clone();
    let c = cfg.branch_channels();
    let path = golden_data_dir().join(rt_file(rt));
    let bytes = std::fs::read(&path).unwrap();
    let ck = Checkpoint::parse(&path, &bytes).unwrap();
    let samples: Vec<GoldenSample> = (0..2)
        .map(|s| GoldenSample::read(&ck, &cfg, s).unwrap())
        .collect();
    let ids: Vec<Vec<u32>> = samples.iter().map(|s| s.token_ids()).collect();
    let mut pos = [0usize; 2];
    let mut outputs = Vec::new();
    loop {
        let mut inputs = Vec::new();
        let mut chunks = Vec::new();
        for s in 0..2 {
            let t = ids[s].len();
            if pos[s] == t {
                continue;
            }
            let n = if pos[s] == 0 { (t / 2).max(1) } else { 1 };
            let p = pos[s];
            inputs.push(SequenceInput {
                seq_id: s as u64,
                tokens: &ids[s][p..p + n],
                position: p,
                dead: samples[s].dead.as_ref().map(|m| &m[p..p + n]),
                context: None,
            });
            chunks.push(samples[s].hidden[p * c..(p + n) * c].to_vec());
            pos[s] += n;
        }
        if inputs.is_empty() {
            return outputs;
        }
        let t = chunks.iter().map(|h| h.len() / c).max().unwrap();
        let mut padded = vec![0f32; chunks.len() * t * c];
        for (i, h) in chunks.iter().enumerate() {
            padded[i * t * c..i * t * c + h.len()].copy_from_slice(h);
        }
        let hidden = Tensor::from_vec(padded, (chunks.len(), t, c), device).unwrap();
        let mut step = rt.begin_step(&inputs, &[]).unwrap();
        for &layer_id in &cfg.hash.layer_ids {
            let out = step.apply(layer_id, &hidden).unwrap();
            assert_eq!(out.device().is_cuda(), device.is_cuda());
            let out = out.to_device(&Device::Cpu).unwrap().flatten_all().unwrap();
            outputs.push(out.to_vec1::<f32>().unwrap());
        }
        step.finish();
    }
}

/// The golden file a runtime was opened from (by its variant).
fn rt_file(rt: &EngramRuntime) -> &'static str {
    match rt.config().variant {
        engram_core::config::Variant::Paper => "forward_demo_small.safetensors",
        engram_core::config::Variant::V41 => "forward_v41_small.safetensors",
    }
}

fn cuda_tensors_match_host_tensors(test: &str, file: &str) {
    let _gpu = gpu(test);
    let device = Device::new_cuda(0).expect("candle opens CUDA device 0");
    let host = run(&open(file), &Device::Cpu);
    let on_device = run(&open(file), &device);
    assert_eq!(host.len(), on_device.len());
    for (i, (h, d)) in host.iter().zip(&on_device).enumerate() {
        let h_bits: Vec<u32> = h.iter().map(|x| x.to_bits()).collect();
        let d_bits: Vec<u32> = d.iter().map(|x| x.to_bits()).collect();
        assert!(
            h_bits == d_bits,
            "{file}: output {i} differs between host and CUDA tensors"
        );
    }
    println!("{file}: {} layer outputs bit-equal", host.len());
}

#[test]
#[ignore = "needs a CUDA device: cargo xtask test-gpu"]
fn paper_cuda_tensors_match_host_tensors() {
    cuda_tensors_match_host_tensors(
        "paper_cuda_tensors_match_host_tensors",
        "forward_demo_small.safetensors",
    );
}

#[test]
#[ignore = "needs a CUDA device: cargo xtask test-gpu"]
fn v41_cuda_tensors_match_host_tensors() {
    cuda_tensors_match_host_tensors(
        "v41_cuda_tensors_match_host_tensors",
        "forward_v41_small.safetensors",
    );
}

/// Integer hidden states are an error naming the dtype, not a conversion or a panic.
#[test]
#[ignore = "needs a CUDA device: cargo xtask test-gpu"]
fn integer_cuda_hidden_states_are_an_error() {
    let _gpu = gpu("integer_cuda_hidden_states_are_an_error");
    let device = Device::new_cuda(0).expect("candle opens CUDA device 0");
    let file = "forward_v41_small.safetensors";
    let rt = open(file);
    let cfg = rt.config().clone();
    let tokens = [1u32, 2, 3];
    let inputs = [SequenceInput {
        seq_id: 0,
        tokens: &tokens,
        position: 0,
        dead: None,
        context: None,
    }];
    let hidden = Tensor::zeros((1, 3, cfg.branch_channels()), DType::U32, &device).unwrap();
    let mut step = rt.begin_step(&inputs, &[]).unwrap();
    let err = step
        .apply(cfg.hash.layer_ids[0], &hidden)
        .expect_err("u32 hidden states");
    let text = err.to_string();
    assert!(
        text.contains("U32") && text.contains("f32, bf16 or f16"),
        "{text}"
    );
}
