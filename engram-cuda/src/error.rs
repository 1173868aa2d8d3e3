//! The crate's error: every public entry point returns it instead of panicking, also on
//! machines with no CUDA driver, no device or no toolkit.

use cudarc::driver::DriverError;
use engram_core::EngramError;

/// What can go wrong in the CUDA backend.
#[derive(Debug, thiserror::Error)]
pub enum CudaBackendError {
    /// The CUDA driver library could not be loaded.
    #[error("no CUDA driver (libcuda not found)")]
    NoDriver,

    /// The driver loaded but there is no usable device with this ordinal.
    #[error("no CUDA device {ordinal}: {reason}")]
    NoDevice { ordinal: usize, reason: String },

    /// The run-time compiler library could not be loaded.
    #[error(
        "NVRTC not found (libnvrtc): the CUDA kernels cannot be compiled; put the CUDA \
         toolkit's lib64 (or the nvidia-cuda-nvrtc wheel's lib) on LD_LIBRARY_PATH"
    )]
    NoNvrtc,

    /// NVRTC refused a program; `log` is its compile log.
    #[error("NVRTC could not compile `{program}` (options {options:?}): {status}\n{log}")]
    Nvrtc {
        program: String,
        options: Vec<String>,
        status: String,
        log: String,
    },

    /// A driver call failed.
    #[error("CUDA driver error while {op}: {message}")]
    Driver { op: String, message: String },

    /// A cuBLAS call failed.
    #[error("cuBLAS error while {op}: {message}")]
    Cublas { op: String, message: String },

    /// The driver or device does not allow something (zero-copy of a file mapping, say).
    #[error("{what} is not supported here: {reason}")]
    Unsupported { what: String, reason: String },

    /// A caller's argument is wrong (sizes, ids, tickets).
    #[error("{0}")]
    Invalid(String),

    /// An error of the core (shapes, configs, checkpoints).
    #[error(transparent)]
    Engram(#[from] EngramError),
}

/// Result with [`CudaBackendError`].
pub type Result<T, E = CudaBackendError> = std::result::Result<T, E>;

impl CudaBackendError {
    /// Whether this error only says that no GPU is usable here (no driver, no device, no
    /// NVRTC), as opposed to a failure on a working GPU.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::NoDriver | Self::NoDevice { .. } | Self::NoNvrtc)
    }
}

impl From<CudaBackendError> for EngramError {
    fn from(e: CudaBackendError) -> Self {
        match e {
            CudaBackendError::Engram(inner) => inner,
            other => EngramError::Other(format!("CUDA backend: {other}")),
        }
    }
}

/// Adds what was being done to a driver error.
pub(crate) trait DriverResultExt<T> {
    fn ctx(self, op: &str) -> Result<T>;
}

impl<T> DriverResultExt<T> for std::result::Result<T, DriverError> {
    fn ctx(self, op: &str) -> Result<T> {
        self.map_err(|e| CudaBackendError::Driver {
            op: op.to_string(),
            message: format!("{e:?}"),
        })
    }
}

impl<T> DriverResultExt<T> for std::result::Result<T, cudarc::cublas::result::CublasError> {
    fn ctx(self, op: &str) -> Result<T> {
        self.map_err(|e| CudaBackendError::Cublas {
            op: op.to_string(),
            message: format!("{e:?}"),
        })
    }
}

/// A driver status code as a `Result`.
pub(crate) fn check(status: cudarc::driver::sys::CUresult, op: &str) -> Result<()> {
    status.result().ctx(op)
}
