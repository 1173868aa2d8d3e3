//! # engram-plugin
//!
//! The runtime a host inference engine calls: it holds every Engram layer's table and
//! weights, computes row indices at the start of each step, prefetches rows in the
//! background while the host's earlier layers run, and applies Engram to the host's
//! hidden states (candle tensors) at each Engram layer.
//!
//! A host drives it like this, once per forward pass:
//! ```text
//! let mut step = runtime.begin_step(&inputs, &ended)?;   // hash + start fetching
//! for layer in 0..n_layers {
//!     if runtime.is_engram_layer(layer) { xs = step.apply(layer, &xs)?; }
//!     xs = block(layer, xs);
//! }
//! let stats = step.finish();                              // rows, bytes, fetch vs exposed
//! ```

pub mod device;
pub mod error;
pub mod hot_cache;
pub mod open;
pub mod prefetch;
pub mod remote;
pub mod runtime;
pub mod stats;
pub mod stats_log;
pub mod step;
pub mod trace;
mod windows;

/// The core a host's own checks may need (configs, the error measures of
/// [`engram_core::metrics`]) without depending on it separately.
pub use engram_core;

pub use device::{CudaTables, DeviceRows};
pub use error::{FetchError, PluginError, Result};
pub use hot_cache::{HotCache, HOT_CACHE_ENV};
pub use open::{BackendKind, OpenOptions, BACKEND_ENV, CUDA_TABLES_ENV, PREFETCH_ENV, TABLES_ENV};
pub use runtime::{
    default_prefetch_threads, EngramRuntime, Padding, RuntimeLayer, RuntimeOptions, SequenceInput,
};
pub use stats::LookupStats;
pub use step::Step;
pub use trace::{LayerTrace, Trace};
