//! `engram vocab` and `engram hash`: JSON that other tools read.

use anyhow::Result;
use engram_core::config::HashConfig;
use engram_core::hashing::{EngramHasher, NgramHasher};
use serde_json::{json, Map, Value};

use crate::TokenizerContext;

/// `{"vocab_size", "compressed_vocab_size", "lookup_sha256_i64le"}`.
pub fn vocab_json(ctx: &TokenizerContext) -> Value {
    json!({
        "vocab_size": ctx.compression.vocab_size(),
        "compressed_vocab_size": ctx.compression.compressed_vocab_size(),
        "lookup_sha256_i64le": ctx.compression.lookup_sha256_i64le(),
    })
}

/// `{"input_ids", "compressed_ids", "layers": {"<id>": [[row within head] per position]}}`.
pub fn hash_json(ctx: &TokenizerContext, cfg: &HashConfig, text: &str) -> Result<Value> {
    let input_ids = ctx.encode(text)?;
    let compressed = ctx.compression.compress(&input_ids)?;
    let pad = ctx.compression.compress_id(cfg.pad_id, 0)?;
    let hasher = EngramHasher::new(cfg, ctx.compression.compressed_vocab_size(), pad)?;
    let heads = hasher.heads();
    let mut layers = Map::new();
    for (l, layer) in hasher.layers().iter().enumerate() {
        let mut rows = vec![0u64; compressed.len() * heads];
        hasher.hash_sequence(l, &compressed, None, false, &mut rows)?;
        let per_position: Vec<&[u64]> = rows.chunks(heads).collect();
        layers.insert(layer.layer_id.to_string(), json!(per_position));
    }
    Ok(json!({
        "input_ids": input_ids,
        "compressed_ids": compressed,
        "layers": layers,
    }))
}
