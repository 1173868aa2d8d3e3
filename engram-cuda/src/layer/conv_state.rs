//! [`DeviceConvState`] and [`DeviceSegment`]: a sequence's short-conv window in device
//! memory, and one run of its new tokens as a forward takes it.

use engram_core::backend::ShortConvState;
use engram_core::config::EngramConfig;

use crate::backend::CudaBackend;
use crate::error::{CudaBackendError, Result};
use cudarc::driver::CudaSlice;

/// One sequence's short-conv window for one layer, in device memory: the last
/// `(K-1)*dilation` rows of `z` (`hc_mult * hidden_size` channels), oldest first.
pub struct DeviceConvState {
    pub(super) buf: CudaSlice<f32>,
    pub(super) channels: usize,
    pub(super) history: usize,
}

impl DeviceConvState {
    /// A fresh (all-zero) window for `cfg`.
    pub fn new(backend: &CudaBackend, cfg: &EngramConfig) -> Result<Self> {
        Ok(Self {
            buf: backend.alloc_zeros(cfg.conv_history() * cfg.branch_channels())?,
            channels: cfg.branch_channels(),
            history: cfg.conv_history(),
        })
    }

    /// A device copy of a host window.
    pub fn from_host(backend: &CudaBackend, state: &ShortConvState) -> Result<Self> {
        let rows = state.rows();
        let buf = if rows.is_empty() {
            backend.alloc_zeros(1)?
        } else {
            backend.upload(rows)?
        };
        Ok(Self {
            buf,
            channels: state.channels(),
            history: state.history(),
        })
    }

    /// Copies the window back into `state` (same shape).
    pub fn download_into(&self, backend: &CudaBackend, state: &mut ShortConvState) -> Result<()> {
        if state.channels() != self.channels || state.history() != self.history {
            return Err(CudaBackendError::Invalid(format!(
                "conv state of {} rows x {} channels cannot take a window of {} x {}",
                state.history(),
                state.channels(),
                self.history,
                self.channels
            )));
        }
        let n = self.history * self.channels;
        if n == 0 {
            return Ok(());
        }
        let mut rows = vec![0f32; n];
        backend.download_into(&self.buf, &mut rows)?;
        // Pushing a whole window replaces the state's rows.
        state.push_rows(&rows);
        Ok(())
    }

    /// The window as a host state.
    pub fn to_host(&self, backend: &CudaBackend) -> Result<ShortConvState> {
        let mut s = ShortConvState::with_size(self.channels, self.history);
        self.download_into(backend, &mut s)?;
        Ok(s)
    }

    pub fn history(&self) -> usize {
        self.history
    }
    pub fn channels(&self) -> usize {
        self.channels
    }
}

/// One run of consecutive new tokens of one sequence, with its device conv window.
pub struct DeviceSegment<'a> {
    pub len: usize,
    /// `None`: the segment starts its sequence and nothing is remembered after it.
    pub conv: Option<&'a mut DeviceConvState>,
}

impl<'a> DeviceSegment<'a> {
    pub fn fresh(len: usize) -> Self {
        Self { len, conv: None }
    }
    pub fn with_state(len: usize, conv: &'a mut DeviceConvState) -> Self {
        Self {
            len,
            conv: Some(conv),
        }
    }
}
