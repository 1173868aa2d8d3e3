//! Errors the runtime hands back to the host engine (never panics). Each failure keeps its
//! source as a value, so a host can tell "no CUDA device" ([`PluginError::Cuda`] with
//! [`engram_cuda::CudaBackendError::is_unavailable`]) from "bad token id"
//! ([`PluginError::Sequence`]) or a failed row fetch ([`PluginError::Fetch`]) without
//! reading messages.

use engram_core::EngramError;
use engram_cuda::CudaBackendError;

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error(transparent)]
    Engram(#[from] EngramError),

    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),

    /// The CUDA backend failed: no driver or device, out of memory, a failed launch. `what`
    /// says what the runtime was doing.
    #[error("{what}: {source}")]
    Cuda {
        what: String,
        #[source]
        source: CudaBackendError,
    },

    /// One sequence's input cannot be used (a token id the tokenizer does not have, say).
    #[error("sequence {seq_id}: {source}")]
    Sequence {
        seq_id: u64,
        #[source]
        source: EngramError,
    },

    /// The host's call does not fit the step it belongs to.
    #[error("{0}")]
    Step(String),

    /// A sequence continues at a position the runtime has no state for.
    #[error("sequence {seq_id} continues at position {position}, but the runtime {reason}")]
    MissingState {
        seq_id: u64,
        position: usize,
        reason: String,
    },

    /// A setting (an environment variable, say) the runtime cannot use.
    #[error("{name}={value:?}: {reason}")]
    Setting {
        name: String,
        value: String,
        reason: String,
    },

    /// The background fetch of a layer's rows failed.
    #[error("row fetch for Engram layer {layer_id} failed: {source}")]
    Fetch {
        layer_id: usize,
        #[source]
        source: FetchError,
    },

    /// The runtime could not start its prefetch thread.
    #[error("cannot start the prefetch thread: {0}")]
    Thread(#[source] std::io::Error),
}

impl PluginError {
    /// Whether this is the CUDA backend saying no GPU is usable (no driver, no device, no
    /// NVRTC): the host may fall back to another backend.
    pub fn is_device_unavailable(&self) -> bool {
        matches!(self, PluginError::Cuda { source, .. } if source.is_unavailable())
    }
}

/// Why a background row fetch failed. It crosses from the fetch thread to the host's
/// thread as a value, not as text.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The table store refused the gather (a row id past the table, a read error).
    #[error(transparent)]
    Table(#[from] EngramError),
    /// The device store refused the prefetch.
    #[error(transparent)]
    Device(#[from] CudaBackendError),
    /// The layer refused to project the gathered rows.
    #[error("projecting the gathered rows: {0}")]
    Project(#[source] EngramError),
    /// The table store panicked while gathering.
    #[error("the table store `{table}` panicked while gathering")]
    Panicked { table: String },
}

pub type Result<T, E = PluginError> = std::result::Result<T, E>;
