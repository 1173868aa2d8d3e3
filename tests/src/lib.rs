//! # engram-tests
//!
//! Integration and snapshot tests of the whole workspace. The golden vectors from the
//! original PyTorch implementation live in `data/` (see `data/GOLDEN.md`); this library
//! holds what the tests share: paths to that data and small readers for it.

use std::path::PathBuf;

/// `tests/data/<name>` inside this repository.
pub fn data_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("data")
        .join(name)
}

/// The DeepSeek-V4 tokenizer used by every golden file.
pub fn tokenizer_path() -> PathBuf {
    data_path("deepseek-v4-tokenizer/tokenizer.json")
}

/// The test tokenizer and its compression, loaded once per test binary.
pub fn tokenizer() -> &'static engram_cli::TokenizerContext {
    static CTX: std::sync::OnceLock<engram_cli::TokenizerContext> = std::sync::OnceLock::new();
    CTX.get_or_init(|| {
        engram_cli::TokenizerContext::load(&tokenizer_path()).expect("test tokenizer loads")
    })
}
