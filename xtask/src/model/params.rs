//! The model's numbers: llama hyper-parameters and special tokens from GGUF metadata,
//! the GGUF -> Hugging Face tensor map, and the un-permutation of llama.cpp's q/k rows.

use anyhow::{anyhow, ensure, Result};
use serde_json::{json, Value as Json};

use super::gguf::Gguf;

/// A llama model's hyper-parameters and special tokens, from GGUF metadata.
#[derive(Clone, Debug)]
pub struct LlamaParams {
    pub n_layer: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub context: usize,
    pub vocab: usize,
    pub tied: bool,
    pub bos: u32,
    pub eos: u32,
    pub pad: u32,
    pub unk: Option<u32>,
}

impl LlamaParams {
    pub(super) fn read(g: &Gguf) -> Result<Self> {
        let arch = g.string("general.architecture")?;
        ensure!(
            arch == "llama",
            "{}: architecture {arch:?}; only \"llama\" is converted",
            g.path.display()
        );
        let k = |s: &str| format!("llama.{s}");
        let hidden = g.uint(&k("embedding_length"))? as usize;
        let n_head = g.uint(&k("attention.head_count"))? as usize;
        let n_head_kv = g
            .opt_uint(&k("attention.head_count_kv"))?
            .map_or(n_head, |v| v as usize);
        ensure!(
            n_head > 0
                && hidden.is_multiple_of(n_head)
                && n_head_kv > 0
                && n_head.is_multiple_of(n_head_kv),
            "{}: {n_head} heads, {n_head_kv} kv heads and hidden size {hidden} do not fit",
            g.path.display()
        );
        let head_dim = hidden / n_head;
        if let Some(rot) = g.opt_uint(&k("rope.dimension_count"))? {
            ensure!(
                rot as usize == head_dim,
                "{}: RoPE on {rot} of {head_dim} head dims (partial rotary) is not supported",
                g.path.display()
            );
        }
        ensure!(
            g.get(&k("rope.scaling.type")).is_none(),
            "{}: RoPE scaling is not supported",
            g.path.display()
        );
        let tokens = g.strings("tokenizer.ggml.tokens")?.len();
        let vocab = g.opt_uint(&k("vocab_size"))?.map_or(tokens, |v| v as usize);
        ensure!(
            vocab == tokens,
            "{}: llama.vocab_size {vocab} but {tokens} tokens",
            g.path.display()
        );
        let id = |key: &str| -> Result<Option<u32>> { Ok(g.opt_uint(key)?.map(|v| v as u32)) };
        let bos = id("tokenizer.ggml.bos_token_id")?
            .ok_or_else(|| anyhow!("{}: no bos token id", g.path.display()))?;
        let eos = id("tokenizer.ggml.eos_token_id")?
            .ok_or_else(|| anyhow!("{}: no eos token id", g.path.display()))?;
        let pad = id("tokenizer.ggml.padding_token_id")?.unwrap_or(eos);
        let unk = id("tokenizer.ggml.unknown_token_id")?;
        for (what, v) in [("bos", bos), ("eos", eos), ("pad", pad)] {
            ensure!(
                (v as usize) < vocab,
                "{}: {what} token id {v} is outside the vocabulary ({vocab})",
                g.path.display()
            );
        }
        Ok(Self {
            n_layer: g.uint(&k("block_count"))? as usize,
            hidden,
            ffn: g.uint(&k("feed_forward_length"))? as usize,
            n_head,
            n_head_kv,
            head_dim,
            rope_theta: g.opt_float(&k("rope.freq_base"))?.unwrap_or(10_000.0),
            rms_norm_eps: g.float(&k("attention.layer_norm_rms_epsilon"))?,
            context: g.uint(&k("context_length"))? as usize,
            vocab,
            tied: !g.content.tensor_infos.contains_key("output.weight"),
            bos,
            eos,
            pad,
            unk: unk.filter(|&u| (u as usize) < vocab),
        })
    }

    /// The Hugging Face `config.json` of the model.
    pub(super) fn hf_config(&self) -> Json {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.ffn,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_head_kv,
            "num_hidden_layers": self.n_layer,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "max_position_embeddings": self.context,
            "vocab_size": self.vocab,
            "tie_word_embeddings": self.tied,
            "bos_token_id": self.bos,
            "eos_token_id": self.eos,
            "pad_token_id": self.pad,
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "torch_dtype": "float32",
            "use_cache": true
        })
    }
}

/// One tensor of the converted model.
pub(super) struct TensorMap {
    pub(super) hf: String,
    pub(super) gguf: String,
    pub(super) shape: Vec<usize>,
    /// Undo llama.cpp's RoPE row permutation with this many heads.
    pub(super) unpermute_heads: Option<usize>,
}

pub(super) fn tensor_maps(p: &LlamaParams) -> Vec<TensorMap> {
    let (d, q, kv, f) = (
        p.hidden,
        p.n_head * p.head_dim,
        p.n_head_kv * p.head_dim,
        p.ffn,
    );
    let t = |hf: String, gguf: String, shape: Vec<usize>, unpermute_heads| TensorMap {
        hf,
        gguf,
        shape,
        unpermute_heads,
    };
    let mut out = vec![t(
        "model.embed_tokens.weight".into(),
        "token_embd.weight".into(),
        vec![p.vocab, d],
        None,
    )];
    for i in 0..p.n_layer {
        let hf = |s: &str| format!("model.layers.{i}.{s}.weight");
        let gg = |s: &str| format!("blk.{i}.{s}.weight");
        out.extend([
            t(hf("input_layernorm"), gg("attn_norm"), vec![d], None),
            t(
                hf("self_attn.q_proj"),
                gg("attn_q"),
                vec![q, d],
                Some(p.n_head),
            ),
            t(
                hf("self_attn.k_proj"),
                gg("attn_k"),
                vec![kv, d],
                Some(p.n_head_kv),
            ),
            t(hf("self_attn.v_proj"), gg("attn_v"), vec![kv, d], None),
            t(hf("self_attn.o_proj"), gg("attn_output"), vec![d, q], None),
            t(
                hf("post_attention_layernorm"),
                gg("ffn_norm"),
                vec![d],
                None,
            ),
            t(hf("mlp.gate_proj"), gg("ffn_gate"), vec![f, d], None),
            t(hf("mlp.up_proj"), gg("ffn_up"), vec![f, d], None),
            t(hf("mlp.down_proj"), gg("ffn_down"), vec![d, f], None),
        ]);
    }
    out.push(t(
        "model.norm.weight".into(),
        "output_norm.weight".into(),
        vec![d],
        None,
    ));
    if !p.tied {
        out.push(t(
            "lm_head.weight".into(),
            "output.weight".into(),
            vec![p.vocab, d],
            None,
        ));
    }
    out
}

/// Inverse of llama.cpp's `permute(w, n_head)` =
/// `w.reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2).reshape(rows, cols)`:
/// GGUF row `h*hd + 2i + s` goes back to Hugging Face row `h*hd + s*hd/2 + i`.
pub fn unpermute_rows(data: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    assert_eq!(data.len(), rows * cols);
    assert!(
        rows.is_multiple_of(2 * n_head),
        "rows {rows} do not split into {n_head} heads of pairs"
    );
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for s in 0..2 {
            for i in 0..half {
                let hf = h * hd + s * half + i;
                let gg = h * hd + 2 * i + s;
                out[hf * cols..(hf + 1) * cols].copy_from_slice(&data[gg * cols..(gg + 1) * cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `unpermute_rows` inverts llama.cpp's `permute` as numpy computes it.
    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (n_head, hd, cols) = (3, 8, 2);
        let rows = n_head * hd;
        let hf: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        // permute: reshape(n_head, 2, hd/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let mut gguf = vec![0f32; hf.len()];
        for h in 0..n_head {
            for i in 0..hd / 2 {
                for s in 0..2 {
                    let dst = h * hd + i * 2 + s; // index in [h, i, s] order
                    let src = h * hd + s * (hd / 2) + i; // index in [h, s, i] order
                    gguf[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_eq!(unpermute_rows(&gguf, rows, cols, n_head), hf);
    }
}
