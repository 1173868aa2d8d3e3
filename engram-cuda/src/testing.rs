//! Helpers for tests that need a GPU (or only NVRTC): skip where none is usable, fail
//! when told to.
//!
//! `ENGRAM_REQUIRE_GPU=1` (what `cargo xtask test-gpu` sets) turns "skipped: no GPU"
//! into a test failure, so a GPU run cannot pass by verifying nothing.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};

use crate::backend::CudaBackend;

/// The environment variable that makes GPU tests fail instead of skipping.
pub const REQUIRE_GPU_ENV: &str = "ENGRAM_REQUIRE_GPU";

/// Whether `ENGRAM_REQUIRE_GPU` asks for a GPU (set, and not "0" or empty).
pub fn require_gpu() -> bool {
    env_flag(REQUIRE_GPU_ENV)
}

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

/// What a GPU test does when no GPU is usable.
#[derive(Debug, PartialEq, Eq)]
pub enum NoGpu {
    /// Print this line and return.
    Skip(String),
    /// Fail with this message.
    Fail(String),
}

/// The decision for a test named `test` that could not get a GPU because of `why`.
pub fn no_gpu(test: &str, why: &str, require: bool) -> NoGpu {
    if require {
        NoGpu::Fail(format!(
            "{test}: {REQUIRE_GPU_ENV}=1 but no GPU is usable: {why}"
        ))
    } else {
        NoGpu::Skip(format!("skipped: {why}"))
    }
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

/// The shared backend for test `test`, or `None` after printing "skipped: ...".
/// Panics (fails the test) instead when `ENGRAM_REQUIRE_GPU=1`.
pub fn gpu_or_skip(test: &str) -> Option<GpuTest> {
    let (backend, lock) = shared();
    match backend {
        Ok(b) => Some(GpuTest {
            backend: b.clone(),
            _lock: lock.lock().unwrap_or_else(|p| p.into_inner()),
        }),
        Err(why) => match no_gpu(test, why, require_gpu()) {
            NoGpu::Skip(line) => {
                println!("{line}");
                None
            }
            NoGpu::Fail(msg) => panic!("{msg}"),
        },
    }
}

/// The repository's `tests/data` (the golden files): `ENGRAM_TEST_DATA` (what a bundle
/// run elsewhere sets), else found from this crate's source or the working directory.
pub fn golden_data_dir() -> Option<PathBuf> {
    [
        std::env::var_os("ENGRAM_TEST_DATA").map(PathBuf::from),
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/data")),
        Some(PathBuf::from("tests/data")),
    ]
    .into_iter()
    .flatten()
    .find(|p| p.join("forward_demo_small.safetensors").is_file())
}

/// [`golden_data_dir`] for test `test`, or `None` after printing "skipped: ..."; fails
/// instead when `ENGRAM_REQUIRE_GPU=1` (a GPU run must not pass without its data).
pub fn golden_data_or_skip(test: &str) -> Option<PathBuf> {
    let dir = golden_data_dir();
    if dir.is_none() {
        let why = "golden files not found (set ENGRAM_TEST_DATA to the repository's tests/data)";
        match no_gpu(test, why, require_gpu()) {
            NoGpu::Skip(line) => println!("{line}"),
            NoGpu::Fail(msg) => panic!("{msg}"),
        }
    }
    dir
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skip_or_fail() {
        assert_eq!(
            no_gpu("t", "no CUDA driver (libcuda not found)", false),
            NoGpu::Skip("skipped: no CUDA driver (libcuda not found)".into())
        );
        match no_gpu("t", "no CUDA driver (libcuda not found)", true) {
            NoGpu::Fail(m) => assert!(m.contains("ENGRAM_REQUIRE_GPU=1") && m.contains("t:")),
            other => panic!("{other:?}"),
        }
    }
}
