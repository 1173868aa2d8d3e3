//! nvcc and the CUDA headers for building the CUDA host (`cargo xtask mistralrs-build
//! --cuda`) on a machine with no GPU and no CUDA install: five pinned PyPI wheels, each
//! checked against its sha256, unpacked together into the cache. Together they give a
//! working `nvidia/cu13/bin/nvcc` (nvcc needs `nvvm/bin/cicc` from `nvidia-nvvm`) with the
//! runtime headers and `libcudart` that candle's and mistralrs-quant's kernels build against.
//! No GPU and no driver is needed to build; the binary loads CUDA at run time.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::model::cache_root;
use crate::pypi::{self, sha256_file, Wheel};

/// The wheels, with the sha256 of each wheel file (as PyPI lists it). CUDA 13.0: what the
/// device machines' driver runs, and what NVRTC (`crate::nvrtc`) is pinned to.
const WHEELS: [(Wheel<'static>, &str); 5] = [
    (
        Wheel {
            requirement: "nvidia-cuda-nvcc==13.0.88",
            file_prefix: "nvidia_cuda_nvcc-13.0.88-",
        },
        "56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03",
    ),
    (
        Wheel {
            requirement: "nvidia-cuda-crt==13.0.88",
            file_prefix: "nvidia_cuda_crt-13.0.88-",
        },
        "2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4",
    ),
    (
        Wheel {
            requirement: "nvidia-cuda-runtime==13.0.96",
            file_prefix: "nvidia_cuda_runtime-13.0.96-",
        },
        "7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548",
    ),
    (
        Wheel {
            requirement: "nvidia-cuda-cccl==13.0.85",
            file_prefix: "nvidia_cuda_cccl-13.0.85-",
        },
        "e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649",
    ),
    (
        Wheel {
            requirement: "nvidia-nvvm==13.0.88",
            file_prefix: "nvidia_nvvm-13.0.88-",
        },
        "c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0",
    ),
];

/// The unpacked toolkit: `root` is the directory holding `bin/nvcc`, `include/`, `lib/`.
pub struct Toolkit {
    pub root: PathBuf,
}

impl Toolkit {
    pub fn bin(&self) -> PathBuf {
        self.root.join("bin")
    }
    pub fn lib(&self) -> PathBuf {
        self.root.join("lib")
    }
    pub fn nvcc(&self) -> PathBuf {
        self.bin().join("nvcc")
    }
}

/// The checked toolkit in the cache, fetched and unpacked on first use.
pub fn ensure() -> Result<Toolkit> {
    if !cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        bail!("the pinned CUDA toolkit wheels are for Linux on x86_64 only");
    }
    let cache = cache_root()?.join("cuda-toolkit-13.0");
    let unpacked = cache.join("unpacked");
    let toolkit = Toolkit {
        root: unpacked.join("nvidia").join("cu13"),
    };
    let stamp = cache.join("unpacked.stamp");
    let stamp_text = stamp_text();
    if toolkit.nvcc().is_file() && fs::read_to_string(&stamp).is_ok_and(|s| s == stamp_text) {
        eprintln!("nvcc      {} (cached)", toolkit.nvcc().display());
        return Ok(toolkit);
    }
    let _ = fs::remove_file(&stamp);
    let download = cache.join("download");
    let mut wheels = Vec::new();
    for (wheel, sha256) in &WHEELS {
        wheels.push(checked_wheel(&download, wheel, sha256)?);
    }
    // Unpack into a fresh directory, renamed into place once complete.
    let part = cache.join("unpacked.part");
    if part.exists() {
        fs::remove_dir_all(&part).with_context(|| format!("removing {}", part.display()))?;
    }
    fs::create_dir_all(&part)?;
    for wheel in &wheels {
        unzip(wheel, &part)?;
    }
    let part_root = part.join("nvidia").join("cu13");
    // zipfile drops the executable bits: give them back to the tools nvcc runs.
    for dir in [part_root.join("bin"), part_root.join("nvvm").join("bin")] {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_file() {
                set_executable(&path)?;
            }
        }
    }
    // The MoE kernels of candle-kernels link `-lcudart`; the wheel ships only the soname.
    let lib = part_root.join("lib");
    let cudart = lib.join("libcudart.so");
    if !cudart.exists() {
        std::os::unix::fs::symlink("libcudart.so.13", &cudart)
            .with_context(|| format!("linking {}", cudart.display()))?;
    }
    if unpacked.exists() {
        fs::remove_dir_all(&unpacked)
            .with_context(|| format!("removing {}", unpacked.display()))?;
    }
    fs::rename(&part, &unpacked)
        .with_context(|| format!("renaming {} into place", part.display()))?;
    check_nvcc(&toolkit)?;
    fs::write(&stamp, stamp_text)?;
    // The wheels (about 100 MiB) are unpacked: drop them.
    fs::remove_dir_all(&download).with_context(|| format!("removing {}", download.display()))?;
    eprintln!("nvcc      {} (unpacked)", toolkit.nvcc().display());
    Ok(toolkit)
}

fn stamp_text() -> String {
    WHEELS
        .iter()
        .map(|(w, sha)| format!("{} {sha}\n", w.requirement))
        .collect()
}

/// The wheel file in `dir` (downloaded when absent), checked against `sha256`; a wheel that
/// differs is deleted and is an error.
fn checked_wheel(dir: &Path, wheel: &Wheel, sha256: &str) -> Result<PathBuf> {
    let path = pypi::wheel_file(dir, wheel)?;
    let got = sha256_file(&path, &format!("verifying {}", wheel.requirement))?;
    if got != sha256 {
        let _ = fs::remove_file(&path);
        bail!(
            "{}: sha256 {got}, expected {sha256}. This is not the wheel this project was \
             written and checked for; it was deleted, run again to download it anew (if it \
             still differs, the package on PyPI changed)",
            path.display()
        );
    }
    eprintln!("wheel     {} (sha256 OK)", path.display());
    Ok(path)
}

fn unzip(wheel: &Path, into: &Path) -> Result<()> {
    const SCRIPT: &str = concat!(
        "import sys, zipfile\n",
        "with zipfile.ZipFile(sys.argv[1]) as z:\n",
        "    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith('nvidia/')])\n",
    );
    let out = Command::new(pypi::python())
        .args(["-c", SCRIPT])
        .arg(wheel)
        .arg(into)
        .output()
        .with_context(|| format!("cannot run `{}`", pypi::python()))?;
    if !out.status.success() {
        bail!(
            "cannot unpack {}: {}",
            wheel.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn set_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut perms = fs::metadata(path)?.permissions();
    perms.set_mode(perms.mode() | 0o755);
    fs::set_permissions(path, perms).with_context(|| format!("chmod {}", path.display()))
}

/// `nvcc --version` runs: the wheels fit together.
fn check_nvcc(toolkit: &Toolkit) -> Result<()> {
    let out = Command::new(toolkit.nvcc())
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run {}", toolkit.nvcc().display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !text.contains("release 13.0") {
        bail!(
            "{} --version did not report CUDA 13.0 ({}):\n{text}{}",
            toolkit.nvcc().display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
