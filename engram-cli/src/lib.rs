//! # engram-cli
//!
//! The `engram` command and the library behind it, so tests can call what the command
//! does. Subcommands: `vocab` (tokenizer compression), `hash` (rows for a text),
//! `golden` (check a golden forward file end to end), `inspect` (a checkpoint against its
//! config), `init-checkpoint` (a seeded paper-variant Engram checkpoint for a model),
//! `check-trace` (a host's Engram trace against the reference forward), `bench-disk`
//! (the disk tier's ways of reading rows, cold and warm), `cache-replay` (the hot-row
//! cache's hit rate against its size on real text), `upload` (a checkpoint's tables into
//! a Redis Cluster), `fit` (Engram layers fitted to text on a frozen host model),
//! `eval` (perplexity and next-token accuracy on text, with and without Engram) and
//! `greedy-examples` (greedy continuations of text with and without Engram).

pub mod bench;
pub mod bench_disk;
pub mod cache_replay;
pub mod check_trace;
pub mod fit;
pub mod golden;
pub mod init_checkpoint;
pub mod inspect;
pub mod text;
pub mod upload;

use std::path::Path;

use anyhow::{Context, Result};
use engram_core::compress::VocabCompression;
use tokenizers::Tokenizer;

/// A tokenizer and its Engram compression, loaded from one `tokenizer.json`.
pub struct TokenizerContext {
    pub tokenizer: Tokenizer,
    pub compression: VocabCompression,
}

impl TokenizerContext {
    pub fn load(path: &Path) -> Result<Self> {
        if !path.is_file() {
            anyhow::bail!("tokenizer {}: no such file", path.display());
        }
        let tokenizer = Tokenizer::from_file(path)
            .map_err(|e| anyhow::anyhow!("tokenizer {}: cannot load: {e}", path.display()))?;
        let compression = VocabCompression::from_tokenizer(&tokenizer)
            .with_context(|| format!("tokenizer {}", path.display()))?;
        Ok(Self {
            tokenizer,
            compression,
        })
    }

    /// Token ids of `text`, with no special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("cannot tokenize text: {e}"))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }
}
