//! Tokenizer compression: maps every token id to a "compressed" id so that tokens that
//! differ only in case, accents, Unicode compatibility form or surrounding whitespace share
//! one id (and so one set of n-gram hashes).
//!
//! Bit-exact with the original Python `CompressedTokenizer._build_lookup_table`:
//! for each id `tid` in `0..len(tokenizer)`,
//! 1. `text = decode([tid], skip_special_tokens=False)` (no space clean-up);
//! 2. if `text` holds U+FFFD (a token that is only part of a UTF-8 sequence), the key is the
//!    raw vocabulary string `id_to_token(tid)`;
//! 3. else the key is `N(text)`, or `text` itself when `N(text)` is empty, where `N` is the
//!    normalizer sequence built by [`key_normalizer`];
//! 4. keys are numbered in first-seen order; the compressed id of `tid` is its key's number.
//!
//! Applying the table: ids `>= 0` map through it, negative ids (padding / sentinels) pass
//! through unchanged, and ids past the table are an error.

use std::collections::HashMap;
use std::path::Path;

use sha2::{Digest, Sha256};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence, Strip, StripAccents, NFD, NFKC};
use tokenizers::{NormalizedString, Normalizer, Tokenizer};

use crate::error::{EngramError, Result};

/// Private-use character that protects a lone space from `Strip` (as in the original).
const SENTINEL: &str = "\u{E000}";

/// A token id -> compressed id table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VocabCompression {
    lookup: Vec<u32>,
    compressed_vocab_size: usize,
}

/// The original's normalizer: NFKC, NFD, StripAccents, Lowercase, collapse runs of
/// `[ \t\r\n]` to one space, keep a text that is exactly one space (via a sentinel), strip.
pub fn key_normalizer() -> Result<Sequence> {
    let replace = |pattern: ReplacePattern, content: &str| {
        Replace::new(pattern, content)
            .map_err(|e| EngramError::Other(format!("building the compression normalizer: {e}")))
    };
    Ok(Sequence::new(vec![
        NFKC.into(),
        NFD.into(),
        StripAccents.into(),
        Lowercase.into(),
        replace(ReplacePattern::Regex("[ \t\r\n]+".into()), " ")?.into(),
        replace(ReplacePattern::Regex("^ $".into()), SENTINEL)?.into(),
        Strip::new(true, true).into(),
        replace(ReplacePattern::String(SENTINEL.into()), " ")?.into(),
    ]))
}

/// Like the Python binding's `Normalizer.normalize_str`.
fn normalize_str(normalizer: &Sequence, text: &str) -> Result<String> {
    let mut normalized = NormalizedString::from(text);
    normalizer
        .normalize(&mut normalized)
        .map_err(|e| EngramError::Other(format!("normalizing token text {text:?}: {e}")))?;
    Ok(normalized.get().to_owned())
}

impl VocabCompression {
    /// Loads `tokenizer.json` and builds the table from it.
    pub fn from_tokenizer_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if !path.exists() {
            return Err(EngramError::file(path, "tokenizer file not found"));
        }
        let tok = Tokenizer::from_file(path)
            .map_err(|e| EngramError::file(path, format!("cannot load tokenizer: {e}")))?;
        Self::from_tokenizer(&tok)
    }

    /// Builds the table from a loaded tokenizer.
    ///
    /// The number of ids is `get_vocab_size(true)`, which is what Python's
    /// `len(PreTrainedTokenizerFast)` returns (the count of distinct token strings over the
    /// model vocabulary and the added tokens; for well-formed tokenizers, max id + 1).
    pub fn from_tokenizer(tok: &Tokenizer) -> Result<Self> {
        let vocab_size = tok.get_vocab_size(true);
        let normalizer = key_normalizer()?;
        let mut key_ids: HashMap<String, u32> = HashMap::with_capacity(vocab_size);
        let mut lookup = Vec::with_capacity(vocab_size);
        let id_err = |tid: usize, e: &dyn std::fmt::Display| {
            EngramError::Other(format!(
                "tokenizer compression: decoding token id {tid}: {e}"
            ))
        };
        for tid in 0..vocab_size {
            let id = u32::try_from(tid).map_err(|e| id_err(tid, &e))?;
            let text = decode_single(tok, id).map_err(|e| id_err(tid, &e))?;
            let key = if text.contains('\u{FFFD}') {
                // Python: convert_ids_to_tokens(tid); its None (gap) cannot occur here
                // because a gap decodes to "" which has no U+FFFD.
                tok.id_to_token(id).unwrap_or_default()
            } else {
                let norm = normalize_str(&normalizer, &text)?;
                if norm.is_empty() {
                    text
                } else {
                    norm
                }
            };
            let next = key_ids.len() as u32;
            lookup.push(*key_ids.entry(key).or_insert(next));
        }
        Ok(Self {
            lookup,
            compressed_vocab_size: key_ids.len(),
        })
    }

    /// Wraps a precomputed table; the compressed size is `max + 1` (0 for an empty table).
    pub fn from_lookup(lookup: Vec<u32>) -> Result<Self> {
        let compressed_vocab_size = lookup.iter().max().map_or(0, |&m| m as usize + 1);
        Ok(Self {
            lookup,
            compressed_vocab_size,
        })
    }

    /// Number of token ids the table covers.
    pub fn vocab_size(&self) -> usize {
        self.lookup.len()
    }

    /// Number of distinct compressed ids.
    pub fn compressed_vocab_size(&self) -> usize {
        self.compressed_vocab_size
    }

    /// The table: `lookup()[tid]` is the compressed id of `tid`.
    pub fn lookup(&self) -> &[u32] {
        &self.lookup
    }

    /// Compresses one id; `position` only feeds the error message.
    pub fn compress_id(&self, id: i64, position: usize) -> Result<i64> {
        if id < 0 {
            return Ok(id);
        }
        usize::try_from(id)
            .ok()
            .and_then(|i| self.lookup.get(i))
            .map(|&c| i64::from(c))
            .ok_or(EngramError::TokenOutOfRange {
                id,
                position,
                vocab_size: self.lookup.len(),
            })
    }

    /// Compresses a sequence; an error names the first bad id and its index in `ids`.
    pub fn compress(&self, ids: &[i64]) -> Result<Vec<i64>> {
        ids.iter()
            .enumerate()
            .map(|(position, &id)| self.compress_id(id, position))
            .collect()
    }

    /// SHA-256 (lowercase hex) of the table written as little-endian i64, the same bytes as
    /// the original's `lookup_table.astype('<i8').tobytes()`.
    pub fn lookup_sha256_i64le(&self) -> String {
        let mut hasher = Sha256::new();
        for &c in &self.lookup {
            hasher.update(i64::from(c).to_le_bytes());
        }
        hex::encode(hasher.finalize())
    }
}

/// `decode([id], skip_special_tokens=False)` as Python sees it: transformers'
/// `PreTrainedTokenizerFast._decode` calls this same Rust `decode` and, with
/// `clean_up_tokenization_spaces` false, returns its text untouched. Added/special tokens go
/// through the byte-level decoder too; one whose characters are not all byte-level symbols
/// (e.g. `<｜begin▁of▁sentence｜>`) comes back as its own UTF-8 bytes, i.e. unchanged.
fn decode_single(tok: &Tokenizer, id: u32) -> tokenizers::Result<String> {
    tok.decode(&[id], false)
}
