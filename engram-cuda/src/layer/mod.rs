//! [`CudaLayer`]: a whole Engram layer on the device for a batch of segments, with the
//! same semantics as [`engram_core::backend::EngramLayer::forward`] (which it also
//! implements, by copying host buffers to the device and back).
//!
//! Per batch: one GEMM `kv = E @ W^T` for the keys and the value of every branch (cuBLAS
//! sgemm, f32), then one fused gate kernel (paper: gate, value and the short conv's
//! normalized input; V4.1: gate and the bf16 output), then (paper) the short conv, which
//! reads each segment's remembered `z` rows, and the update of those windows.
//!
//! - `weights`: [`CudaLayer::new`], checking the weights and uploading them in the
//!   layout the kernels read;
//! - `forward`: the device forward (checks, the GEMM, each variant's gate kernel) and
//!   [`CudaLayer::forward_rows`], which gathers the rows from a table first;
//! - `short_conv`: the paper variant's short conv and the update of the windows;
//! - `conv_state`: [`DeviceConvState`] and [`DeviceSegment`], the per-sequence windows
//!   in device memory;
//! - `host`: the forwards on host buffers, and [`EngramLayer`] for [`CudaLayer`];
//! - `profile`: timing events between the stages of a forward.
//!
//! [`EngramLayer`]: engram_core::backend::EngramLayer

mod conv_state;
mod forward;
mod host;
mod profile;
mod short_conv;
mod weights;

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaStream, LaunchConfig};
use engram_core::config::EngramConfig;

use crate::backend::{CudaBackend, BLOCK};

pub use conv_state::{DeviceConvState, DeviceSegment};
pub use forward::Rows;
use weights::DeviceWeights;

/// An Engram layer whose math runs on the device.
pub struct CudaLayer {
    backend: CudaBackend,
    cfg: EngramConfig,
    layer_id: usize,
    weights: DeviceWeights,
    /// Serializes forwards of this layer (one cuBLAS handle, one stream).
    lock: Mutex<()>,
}

impl CudaLayer {
    pub fn backend(&self) -> &CudaBackend {
        &self.backend
    }

    fn stream(&self) -> &Arc<CudaStream> {
        self.backend.stream()
    }

    fn cfg1d(&self, items: usize) -> LaunchConfig {
        self.backend.launch_cfg(items)
    }
}

// The block size the kernels assume (a multiple of 32).
const _: () = assert!(BLOCK.is_multiple_of(32) && BLOCK <= 1024);
