//! Tiny seeded random-weight models of the other architectures the patch hooks (Mistral,
//! Qwen2, Qwen3), so the end-to-end checks run each layer loop's Engram call, not only
//! Llama's. They borrow SmolLM2's tokenizer files (same vocabulary) and have 4 layers of
//! width 64: their text is noise, but identity, KV cache vs recompute and the in-host
//! reference check mean the same on them as on a trained model.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use engram_core::testing::TestRng;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Value};

const HIDDEN: usize = 64;
const LAYERS: usize = 4;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 16;
const INTERMEDIATE: usize = 128;
/// Written into each directory: a directory from another version of this file is rewritten.
const VERSION: &str = "tiny-model v1";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TinyArch {
    Mistral,
    Qwen2,
    Qwen3,
}

impl TinyArch {
    pub const ALL: [TinyArch; 3] = [TinyArch::Mistral, TinyArch::Qwen2, TinyArch::Qwen3];

    pub fn name(self) -> &'static str {
        match self {
            TinyArch::Mistral => "mistral",
            TinyArch::Qwen2 => "qwen2",
            TinyArch::Qwen3 => "qwen3",
        }
    }

    fn architecture(self) -> &'static str {
        match self {
            TinyArch::Mistral => "MistralForCausalLM",
            TinyArch::Qwen2 => "Qwen2ForCausalLM",
            TinyArch::Qwen3 => "Qwen3ForCausalLM",
        }
    }
}

/// `tiny-<arch>` beside the SmolLM2 directory `smollm`, written on first use.
pub fn ensure_tiny_model(smollm: &Path, arch: TinyArch) -> Result<PathBuf> {
    let dir = smollm
        .parent()
        .context("model directory without a parent")?
        .join(format!("tiny-{}", arch.name()));
    let stamp = dir.join(".xtask-tiny-model");
    if fs::read_to_string(&stamp).is_ok_and(|s| s == VERSION) {
        return Ok(dir);
    }
    eprintln!(
        "xtask: writing the tiny {} model {}",
        arch.name(),
        dir.display()
    );
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    let base: Value = serde_json::from_str(
        &fs::read_to_string(smollm.join("config.json")).context("SmolLM2 config.json")?,
    )?;
    let vocab = base["vocab_size"]
        .as_u64()
        .context("SmolLM2 config.json has no vocab_size")? as usize;
    let config = config_json(arch, &base, vocab);
    fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ] {
        let from = smollm.join(file);
        if from.is_file() {
            fs::copy(&from, dir.join(file))
                .with_context(|| format!("copying {}", from.display()))?;
        }
    }
    write_weights(arch, vocab, &dir.join("model.safetensors"))?;
    fs::write(&stamp, VERSION)?;
    Ok(dir)
}

fn config_json(arch: TinyArch, base: &Value, vocab: usize) -> Value {
    let mut c = json!({
        "architectures": [arch.architecture()],
        "model_type": arch.name(),
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": LAYERS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": null,
        "max_position_embeddings": 2048,
        "vocab_size": vocab,
        "tie_word_embeddings": false,
        "bos_token_id": base["bos_token_id"],
        "eos_token_id": base["eos_token_id"],
        "sliding_window": null,
        "attention_dropout": 0.0,
        "torch_dtype": "float32",
        "use_cache": true
    });
    match arch {
        TinyArch::Mistral => {}
        TinyArch::Qwen2 => {
            c["use_sliding_window"] = json!(false);
            c["max_window_layers"] = json!(LAYERS);
        }
        TinyArch::Qwen3 => {
            c["attention_bias"] = json!(false);
            c["use_sliding_window"] = json!(false);
            c["max_window_layers"] = json!(LAYERS);
        }
    }
    c
}

/// Every tensor of the model: name, shape, and how to fill it.
fn tensors(arch: TinyArch, vocab: usize) -> Vec<(String, Vec<usize>, Fill)> {
    let q = HEADS * HEAD_DIM;
    let kv = KV_HEADS * HEAD_DIM;
    let mut t = vec![
        (
            "model.embed_tokens.weight".to_string(),
            vec![vocab, HIDDEN],
            Fill::Random(1.0),
        ),
        ("model.norm.weight".into(), vec![HIDDEN], Fill::Ones),
        (
            "lm_head.weight".into(),
            vec![vocab, HIDDEN],
            Fill::Random(0.125),
        ),
    ];
    for i in 0..LAYERS {
        let p = |n: &str| format!("model.layers.{i}.{n}");
        let fan = |n: usize| Fill::Random(1.0 / (n as f32).sqrt());
        t.extend([
            (p("input_layernorm.weight"), vec![HIDDEN], Fill::Ones),
            (
                p("post_attention_layernorm.weight"),
                vec![HIDDEN],
                Fill::Ones,
            ),
            (p("self_attn.q_proj.weight"), vec![q, HIDDEN], fan(HIDDEN)),
            (p("self_attn.k_proj.weight"), vec![kv, HIDDEN], fan(HIDDEN)),
            (p("self_attn.v_proj.weight"), vec![kv, HIDDEN], fan(HIDDEN)),
            (p("self_attn.o_proj.weight"), vec![HIDDEN, q], fan(q)),
            (
                p("mlp.gate_proj.weight"),
                vec![INTERMEDIATE, HIDDEN],
                fan(HIDDEN),
            ),
            (
                p("mlp.up_proj.weight"),
                vec![INTERMEDIATE, HIDDEN],
                fan(HIDDEN),
            ),
            (
                p("mlp.down_proj.weight"),
                vec![HIDDEN, INTERMEDIATE],
                fan(INTERMEDIATE),
            ),
        ]);
        match arch {
            TinyArch::Mistral => {}
            TinyArch::Qwen2 => t.extend([
                (p("self_attn.q_proj.bias"), vec![q], Fill::Random(0.1)),
                (p("self_attn.k_proj.bias"), vec![kv], Fill::Random(0.1)),
                (p("self_attn.v_proj.bias"), vec![kv], Fill::Random(0.1)),
            ]),
            TinyArch::Qwen3 => t.extend([
                (p("self_attn.q_norm.weight"), vec![HEAD_DIM], Fill::Ones),
                (p("self_attn.k_norm.weight"), vec![HEAD_DIM], Fill::Ones),
            ]),
        }
    }
    t
}

#[derive(Clone, Copy)]
enum Fill {
    Ones,
    /// Uniform in [-a, a), seeded by the tensor's place in the list.
    Random(f32),
}

fn write_weights(arch: TinyArch, vocab: usize, path: &Path) -> Result<()> {
    let specs = tensors(arch, vocab);
    let data: Vec<Vec<u8>> = specs
        .iter()
        .enumerate()
        .map(|(i, (_, shape, fill))| {
            let n: usize = shape.iter().product();
            let values = match fill {
                Fill::Ones => vec![1f32; n],
                Fill::Random(a) => TestRng::new(i as u64).vec(n, *a),
            };
            values.iter().flat_map(|v| v.to_le_bytes()).collect()
        })
        .collect();
    let views = specs
        .iter()
        .zip(&data)
        .map(|((name, shape, _), bytes)| {
            Ok((
                name.clone(),
                TensorView::new(Dtype::F32, shape.clone(), bytes)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, path)
        .with_context(|| format!("writing {}", path.display()))
}
