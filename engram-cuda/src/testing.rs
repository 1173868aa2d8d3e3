//! Helpers for tests that need a GPU, NVRTC or the golden files.
//!
//! A test that needs a GPU is marked `#[ignore = "needs a CUDA device: cargo xtask
//! test-gpu"]`, so `cargo test` reports it as ignored, never as passed. `cargo xtask
//! test-gpu` (and the GPU bundle's `run.sh`) run the test binaries with
//! `--include-ignored`, and there [`gpu`] fails the test when no GPU is usable: a GPU run
//! cannot pass by verifying nothing.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};

use crate::backend::CudaBackend;

/// Whether the variable `name` is set, and not "0" or empty.
fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The environment variable that makes tests needing only NVRTC (no GPU) fail instead of
/// skipping; `cargo xtask test` sets it once it has fetched NVRTC.
pub const REQUIRE_NVRTC_ENV: &str = "ENGRAM_REQUIRE_NVRTC";

/// Whether NVRTC can be loaded for test `test`. Prints "skipped: ..." when it cannot, and
/// panics (fails the test) instead when `ENGRAM_REQUIRE_NVRTC` is set (not "0" or empty).
pub fn nvrtc_or_skip(test: &str) -> bool {
    if crate::probe::libraries().nvrtc {
        return true;
    }
    assert!(
        !env_flag(REQUIRE_NVRTC_ENV),
        "{test}: {REQUIRE_NVRTC_ENV} is set but NVRTC (libnvrtc) was not found"
    );
    println!("skipped: {test}: NVRTC not found (libnvrtc)");
    false
}

/// One backend per test process (the kernels are compiled once), and a lock that runs
/// GPU tests one at a time.
fn shared() -> &'static (Result<CudaBackend, String>, Mutex<()>) {
    static SHARED: OnceLock<(Result<CudaBackend, String>, Mutex<()>)> = OnceLock::new();
    SHARED.get_or_init(|| {
        (
            CudaBackend::try_new(0).map_err(|e| e.to_string()),
            Mutex::new(()),
        )
    })
}

/// A GPU test's backend and the lock it holds while it runs.
pub struct GpuTest {
    pub backend: CudaBackend,
    _lock: MutexGuard<'static, ()>,
}

/// The shared backend for test `test` (an ignored test, run on purpose): panics, failing
/// the test, with the reason when no GPU is usable.
pub fn gpu(test: &str) -> GpuTest {
    let (backend, lock) = shared();
    match backend {
        Ok(b) => GpuTest {
            backend: b.clone(),
            _lock: lock.lock().unwrap_or_else(|p| p.into_inner()),
        },
        Err(why) => panic!("{test} needs a CUDA device and none is usable: {why}"),
    }
}

/// The repository's `tests/data` (the golden files): `ENGRAM_TEST_DATA` (what a bundle
/// run elsewhere sets), else found from this crate's source or the working directory.
/// Panics when none holds them: they are part of the repository, so a test never skips
/// for want of them.
pub fn golden_data_dir() -> PathBuf {
    [
        std::env::var_os("ENGRAM_TEST_DATA").map(PathBuf::from),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data")),
        Some(PathBuf::from("tests/data")),
    ]
    .into_iter()
    .flatten()
    .find(|p| p.join("forward_demo_small.safetensors").is_file())
    .expect(
        "the golden files (tests/data) were not found: set ENGRAM_TEST_DATA to the \
         repository's tests/data",
    )
}
