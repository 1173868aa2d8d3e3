//! # engram-cuda
//!
//! The CUDA backend of Engram: kernels compiled at run time with NVRTC, table placements
//! (device-resident, pinned host with prefetch, zero-copy host, hot-row cache), and the
//! host-to-device prefetch pipeline. CUDA is loaded at run time, so this crate builds and
//! its tests pass on machines with no GPU and no CUDA toolkit.
//!
//! - [`CudaBackend::try_new`] opens a device (an error, never a panic, when there is no
//!   driver, no device or no NVRTC) and compiles the kernels of `src/kernels/*.cu`;
//! - [`HostTable`] holds a table's stored bytes in host memory (RAM or a mapped file);
//! - [`table`]: the placements behind [`DeviceTableStore`], with prefetch tickets;
//! - [`CudaLayer`]: a whole Engram layer on the device for a batch of segments; it also
//!   implements [`engram_core::backend::EngramLayer`] for host buffers.
//!
//! GPU tests are `#[ignore]`d (a plain `cargo test` shows them as ignored); `cargo xtask
//! test-gpu` runs them with `--include-ignored`, where they fail without a GPU (see
//! [`testing`]).

pub mod backend;
pub mod error;
pub mod host_table;
pub mod kernels;
pub mod layer;
pub mod probe;
pub mod table;
pub mod testing;

pub use backend::{CudaBackend, DeviceInfo, GemmEngine};
pub use error::{CudaBackendError, Result};
pub use host_table::HostTable;
pub use layer::{CudaLayer, DeviceConvState, DeviceSegment, Rows};
pub use probe::{probe, ProbeReport};
pub use table::{
    CachedTable, DeviceTable, DeviceTableStore, PinnedTable, Placement, Prefetch, TableStats,
    ZeroCopyTable,
};

/// Re-exported so callers can name device buffers and streams without depending on
/// cudarc themselves.
pub use cudarc;
