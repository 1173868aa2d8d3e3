//! The Hugging Face tokenizer built from the GGUF's `tokenizer.ggml.*` metadata, and its
//! files.

use std::path::Path;

use anyhow::{anyhow, bail, ensure, Result};
use serde_json::json;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer};

use super::convert::write_json;
use super::gguf::Gguf;
use super::params::LlamaParams;

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_NORMAL: i64 = 1;
pub(super) const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// The pre-tokenizer a GGUF `tokenizer.ggml.pre` value stands for (llama.cpp's
/// `llama_vocab::impl::load`, byte-level BPE vocabularies).
fn pre_tokenizer_for(pre: Option<&str>) -> Result<PreTokenizerWrapper> {
    let byte_level = ByteLevel::new(false, true, true);
    match pre.unwrap_or("default") {
        // GPT-2's regex alone.
        "default" | "gpt2" | "gpt-2" => Ok(byte_level.into()),
        // `\p{N}` (each digit apart), then GPT-2's regex.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            Ok(Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into())
        }
        other => bail!(
            "tokenizer.ggml.pre = {other:?}: this converter knows only the GPT-2 style \
             pre-tokenizers (default, gpt2, smollm, starcoder, refact, command-r, codeshell, \
             exaone, minerva-7b)"
        ),
    }
}

/// Builds the Hugging Face tokenizer from the GGUF's `tokenizer.ggml.*` metadata.
pub fn build_tokenizer(g: &Gguf) -> Result<Tokenizer> {
    let model = g.string("tokenizer.ggml.model")?;
    ensure!(
        model == "gpt2",
        "{}: tokenizer.ggml.model = {model:?}; only \"gpt2\" (byte-level BPE) is converted",
        g.path.display()
    );
    let tokens = g.strings("tokenizer.ggml.tokens")?;
    let merges = g.strings("tokenizer.ggml.merges")?;
    let types = g
        .opt_ints("tokenizer.ggml.token_type")?
        .unwrap_or_else(|| vec![TOKEN_NORMAL; tokens.len()]);
    ensure!(
        types.len() == tokens.len(),
        "{}: {} token types for {} tokens",
        g.path.display(),
        types.len(),
        tokens.len()
    );
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    ensure!(
        vocab.len() == tokens.len(),
        "{}: the vocabulary repeats {} token strings",
        g.path.display(),
        tokens.len() - vocab.len()
    );
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| anyhow!("{}: merge {m:?} has no space", g.path.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow!("cannot build the BPE model: {e}"))?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(pre_tokenizer_for(
        g.opt_string("tokenizer.ggml.pre")?,
    )?));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.with_post_processor(Some(ByteLevel::new(true, false, true)));
    let added = |ty: i64, special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == ty)
            .map(|(s, _)| AddedToken::from(s.to_string(), special).normalized(!special))
            .collect()
    };
    tok.add_special_tokens(&added(TOKEN_CONTROL, true));
    tok.add_tokens(&added(TOKEN_USER_DEFINED, false));
    Ok(tok)
}

pub(super) fn write_tokenizer_files(g: &Gguf, p: &LlamaParams, out: &Path) -> Result<()> {
    let tok = build_tokenizer(g)?;
    let path = out.join("tokenizer.json");
    tok.save(&path, true)
        .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;

    let tokens = g.strings("tokenizer.ggml.tokens")?;
    let types = g
        .opt_ints("tokenizer.ggml.token_type")?
        .unwrap_or_else(|| vec![TOKEN_NORMAL; tokens.len()]);
    let name = |id: u32| tokens[id as usize].to_string();
    let mut decoder = serde_json::Map::new();
    for (id, (t, &ty)) in tokens.iter().zip(&types).enumerate() {
        if ty == TOKEN_CONTROL || ty == TOKEN_USER_DEFINED {
            let special = ty == TOKEN_CONTROL;
            decoder.insert(
                id.to_string(),
                json!({"content": t, "lstrip": false, "normalized": !special,
                       "rstrip": false, "single_word": false, "special": special}),
            );
        }
    }
    let mut config = json!({
        "add_bos_token": g.opt_bool("tokenizer.ggml.add_bos_token").unwrap_or(false),
        "add_eos_token": g.opt_bool("tokenizer.ggml.add_eos_token").unwrap_or(false),
        "add_prefix_space": g.opt_bool("tokenizer.ggml.add_space_prefix").unwrap_or(false),
        "added_tokens_decoder": decoder,
        "bos_token": name(p.bos),
        "eos_token": name(p.eos),
        "pad_token": name(p.pad),
        "clean_up_tokenization_spaces": false,
        "model_max_length": p.context,
        "tokenizer_class": "GPT2Tokenizer",
    });
    let mut special_map = json!({
        "bos_token": name(p.bos),
        "eos_token": name(p.eos),
        "pad_token": name(p.pad),
    });
    if let Some(unk) = p.unk {
        config["unk_token"] = json!(name(unk));
        special_map["unk_token"] = json!(name(unk));
    }
    if let Some(template) = g.opt_string("tokenizer.chat_template")? {
        config["chat_template"] = json!(template);
    }
    write_json(&out.join("tokenizer_config.json"), &config)?;
    write_json(&out.join("special_tokens_map.json"), &special_map)?;
    write_json(
        &out.join("generation_config.json"),
        &json!({"bos_token_id": p.bos, "eos_token_id": p.eos, "pad_token_id": p.pad,
                "_from_model_config": true}),
    )?;
    Ok(())
}
