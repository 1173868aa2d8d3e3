//! Errors the runtime hands back to the host engine (never panics).

use engram_core::EngramError;

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error(transparent)]
    Engram(#[from] EngramError),

    #[error("tensor error: {0}")]
    Tensor(#[from] candle_core::Error),

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

    /// The background fetch failed (its message says why) or its worker is gone.
    #[error("row fetch for Engram layer {layer_id} failed: {message}")]
    Fetch { layer_id: usize, message: String },
}

pub type Result<T, E = PluginError> = std::result::Result<T, E>;
