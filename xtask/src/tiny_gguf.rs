//! The tiny Qwen2 and Qwen3 models ([`crate::tiny_models`]) written again as GGUF files, so
//! the end-to-end checks run mistral.rs's quantized (GGUF) layer loops of those
//! architectures too, not only the quantized Llama of SmolLM2's own GGUF.
//!
//! Matrices are stored Q8_0 (a real quantized path), norms and biases F32, under llama.cpp's
//! tensor names; the metadata is what mistral.rs's `quantized_qwen` / `quantized_qwen3` read.
//! The file holds no tokenizer: the checks pass the tiny model's directory as
//! `--tok-model-id`. Its text is noise, as the safetensors model's is; the checks compare
//! a zero-value Engram checkpoint against no Engram on the same file, which means the same
//! on noise as on a trained model.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::tiny_models::TinyArch;

/// Written beside the GGUF: a file from another version of this code is rewritten.
const VERSION: &str = "tiny-gguf v1";

/// `tiny-<arch>.Q8_0.gguf` in the tiny model's directory `tiny`, written on first use.
pub fn ensure_tiny_gguf(tiny: &Path, arch: TinyArch) -> Result<PathBuf> {
    if arch == TinyArch::Mistral {
        bail!("mistral.rs has no GGUF path for the Mistral architecture (GGUF Mistral is `llama`)");
    }
    let path = tiny.join(format!("tiny-{}.Q8_0.gguf", arch.name()));
    let stamp = tiny.join(".xtask-tiny-gguf");
    if path.is_file() && fs::read_to_string(&stamp).is_ok_and(|s| s == VERSION) {
        return Ok(path);
    }
    eprintln!("xtask: writing {}", path.display());
    let config: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(tiny.join("config.json"))?)
            .with_context(|| format!("{}/config.json", tiny.display()))?;
    let weights = candle_core::safetensors::load(tiny.join("model.safetensors"), &Device::Cpu)
        .with_context(|| format!("reading {}/model.safetensors", tiny.display()))?;
    let tensors = gguf_tensors(weights)?;
    let metadata = metadata(arch, &config)?;
    let partial = path.with_extension("gguf.partial");
    let mut file = fs::File::create(&partial)?;
    let meta: Vec<(&str, &gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tens: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut file, &meta, &tens)
        .with_context(|| format!("writing {}", partial.display()))?;
    file.sync_all()?;
    fs::rename(&partial, &path)?;
    fs::write(&stamp, VERSION)?;
    Ok(path)
}

/// The GGUF metadata of the tiny model: `general.architecture` and the `{arch}.*` keys.
fn metadata(arch: TinyArch, config: &serde_json::Value) -> Result<Vec<(String, gguf_file::Value)>> {
    let int = |key: &str| -> Result<u32> {
        Ok(config[key]
            .as_u64()
            .with_context(|| format!("tiny config.json has no {key}"))? as u32)
    };
    let a = arch.name();
    let u = gguf_file::Value::U32;
    let heads = int("num_attention_heads")?;
    let head_dim = int("head_dim")?;
    Ok(vec![
        (
            "general.architecture".into(),
            gguf_file::Value::String(a.into()),
        ),
        (format!("{a}.block_count"), u(int("num_hidden_layers")?)),
        (format!("{a}.embedding_length"), u(int("hidden_size")?)),
        (
            format!("{a}.feed_forward_length"),
            u(int("intermediate_size")?),
        ),
        (format!("{a}.attention.head_count"), u(heads)),
        (
            format!("{a}.attention.head_count_kv"),
            u(int("num_key_value_heads")?),
        ),
        (format!("{a}.attention.key_length"), u(head_dim)),
        (format!("{a}.attention.value_length"), u(head_dim)),
        (
            format!("{a}.context_length"),
            u(int("max_position_embeddings")?),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            gguf_file::Value::F32(config["rms_norm_eps"].as_f64().unwrap_or(1e-6) as f32),
        ),
        (
            format!("{a}.rope.freq_base"),
            gguf_file::Value::F32(config["rope_theta"].as_f64().unwrap_or(10000.0) as f32),
        ),
    ])
}

/// The model's tensors under llama.cpp's names: matrices Q8_0, vectors F32.
fn gguf_tensors(weights: HashMap<String, Tensor>) -> Result<Vec<(String, QTensor)>> {
    let mut out = Vec::with_capacity(weights.len());
    for (name, tensor) in weights {
        let gguf = gguf_name(&name).with_context(|| format!("no GGUF name for tensor {name}"))?;
        let dtype = if tensor.rank() == 2 && tensor.dim(1)? % 32 == 0 {
            GgmlDType::Q8_0
        } else {
            GgmlDType::F32
        };
        out.push((gguf, QTensor::quantize(&tensor, dtype)?));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// llama.cpp's name for a Hugging Face tensor name of a Qwen2/Qwen3 model.
fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let gguf = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{gguf}.{kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hugging_face_names_map_to_llama_cpp_names() {
        assert_eq!(
            gguf_name("model.embed_tokens.weight").unwrap(),
            "token_embd.weight"
        );
        assert_eq!(
            gguf_name("model.layers.3.self_attn.q_proj.bias").unwrap(),
            "blk.3.attn_q.bias"
        );
        assert_eq!(
            gguf_name("model.layers.0.mlp.down_proj.weight").unwrap(),
            "blk.0.ffn_down.weight"
        );
        assert!(gguf_name("model.layers.0.rotary_emb.inv_freq").is_none());
    }
}
