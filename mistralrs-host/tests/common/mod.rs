//! What every end-to-end test binary reads from the environment `cargo xtask
//! mistralrs-test` sets: paths, the scratch directory, the number of tokens to generate.

use std::path::PathBuf;

pub mod serve;

/// The path in `name`; a test run outside `cargo xtask mistralrs-test` stops here, saying so.
pub fn env_path(name: &str) -> PathBuf {
    std::env::var_os(name)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            panic!("{name} is not set: run these tests with `cargo xtask mistralrs-test`")
        })
}

/// `ENGRAM_E2E_SCRATCH`, created if missing.
pub fn scratch() -> PathBuf {
    let scratch = env_path("ENGRAM_E2E_SCRATCH");
    std::fs::create_dir_all(&scratch).unwrap();
    scratch
}

/// `ENGRAM_E2E_MAX_TOKENS`, 16 when unset.
pub fn max_tokens() -> usize {
    std::env::var("ENGRAM_E2E_MAX_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16)
}
