//! NVRTC for the tests: CUDA's run-time compiler is a plain library that needs no GPU and
//! no driver, so `cargo xtask test` fetches it (PyPI `nvidia-cuda-nvrtc`, pinned and
//! checked) and `engram-cuda`'s unit test `program_compiles_with_nvrtc_where_present`
//! compiles the real kernel program on every machine, CI included, instead of skipping.

use std::ffi::OsString;
use std::fs;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};

use crate::model::cache_root;
use crate::pypi::{self, Member, Wheel};

/// The version the device machines' driver (CUDA 13.0) also loads.
const WHEEL: Wheel<'static> = Wheel {
    requirement: "nvidia-cuda-nvrtc==13.0.88",
    file_prefix: "nvidia_cuda_nvrtc-13.0.88-",
};
/// The libraries NVRTC loads, with the sha256 of each (the same as the wheel's RECORD).
const LIBRARIES: [(&str, &str); 2] = [
    (
        "nvidia/cu13/lib/libnvrtc.so.13",
        "a49e67e8e74590f1e98de55c39c6287efd3f59e3c3797464d7bbe0fe01349b11",
    ),
    (
        "nvidia/cu13/lib/libnvrtc-builtins.so.13.0",
        "91dcd944d01da9c0f08fff5d779db136a47f6d62bdb63bae900d2f481e92c3a2",
    ),
];
/// Set (not "0" or empty), a missing NVRTC fails the tests (and this fetch) instead of
/// skipping; `engram_cuda::testing::REQUIRE_NVRTC_ENV` on the tests' side.
pub const REQUIRE_VAR: &str = "ENGRAM_REQUIRE_NVRTC";

/// The directory holding the checked NVRTC libraries in the cache, fetched on first use.
pub fn ensure() -> Result<PathBuf> {
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        bail!("the pinned NVRTC wheel is for Linux on x86_64 only");
    }
    let root = cache_root()?.join("nvrtc-13.0.88");
    let lib = root.join("lib");
    let members: Vec<Member> = LIBRARIES
        .iter()
        .map(|&(name, sha256)| Member {
            name,
            sha256,
            dest: lib.join(name.rsplit('/').next().unwrap_or(name)),
            label: "NVRTC",
        })
        .collect();
    let download = root.join("download");
    pypi::ensure_members(&WHEEL, &download, &members)?;
    // The wheel only carried the libraries: drop its 86 MiB once they are in place.
    if download.exists() {
        fs::remove_dir_all(&download)
            .with_context(|| format!("cannot remove {}", download.display()))?;
    }
    Ok(lib)
}

/// The environment that lets the workspace's tests load NVRTC: its directory first on
/// `LD_LIBRARY_PATH`, and [`REQUIRE_VAR`]`=1` so that the compile check cannot skip. When
/// NVRTC cannot be had, a warning and no change, unless [`REQUIRE_VAR`] is already set.
pub fn test_env() -> Result<Vec<(&'static str, OsString)>> {
    let required = std::env::var(REQUIRE_VAR).is_ok_and(|v| !v.is_empty() && v != "0");
    match ensure() {
        Ok(lib) => {
            let mut paths = vec![lib];
            if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
                paths.extend(std::env::split_paths(&old));
            }
            let joined = std::env::join_paths(paths).context("joining LD_LIBRARY_PATH")?;
            Ok(vec![
                ("LD_LIBRARY_PATH", joined),
                (REQUIRE_VAR, OsString::from("1")),
            ])
        }
        Err(e) if required => Err(e.context(format!(
            "{REQUIRE_VAR} is set, but NVRTC for the kernels' compile check could not be fetched"
        ))),
        Err(e) => {
            eprintln!(
                "warning: no NVRTC for the tests ({e:#}); the kernels' NVRTC compile check \
                 will skip"
            );
            Ok(Vec::new())
        }
    }
}
