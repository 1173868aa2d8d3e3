//! Short-conv windows kept in device memory for sequences whose hidden states live on the
//! GPU (paper variant; V4.1 has no conv): a CUDA step reads and updates them in place, so
//! no window crosses the bus between steps.
//!
//! The host window in [`SequenceState`](engram_core::sequence::SequenceState) stays the
//! authority whenever the device has no current copy: a device window is current only
//! for the position it was written at, and a host (CPU tensor) step of the same sequence
//! first takes the device window back. A sequence that restarts, was evicted or ended
//! never reads a stale window. When a CUDA layer fails, the windows it was updating are
//! lost (the host copies are stale): the sequence's next step at a later position is an
//! error until it restarts at position 0.

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use engram_core::backend::ShortConvState;
use engram_cuda::DeviceConvState;

/// One device window: written by a step that left its sequence at `position`.
pub(crate) struct DeviceWindow {
    pub position: usize,
    pub state: DeviceConvState,
}

/// Device windows by sequence id, one slot per Engram layer.
#[derive(Default)]
pub(crate) struct DeviceWindows {
    by_sequence: Mutex<HashMap<u64, Vec<Option<DeviceWindow>>>>,
    /// (sequence, layer index) whose window a failed layer left unusable.
    lost: Mutex<HashSet<(u64, usize)>>,
}

impl DeviceWindows {
    /// The window of `seq_id` at layer `layer_index` if it is current for a step starting at
    /// `position`, taken out of the store (the step puts it back when done).
    pub fn take_current(
        &self,
        seq_id: u64,
        layer_index: usize,
        position: usize,
    ) -> Option<DeviceConvState> {
        let mut map = self.lock();
        let slot = map.get_mut(&seq_id)?.get_mut(layer_index)?;
        match slot.take() {
            Some(w) if w.position == position => Some(w.state),
            _ => None,
        }
    }

    /// Stores the window a step left `seq_id` at `position` with.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn put(&self, seq_id: u64, layer_index: usize, layers: usize, window: DeviceWindow) {
        let mut map = self.lock();
        let slots = map.entry(seq_id).or_insert_with(|| {
            std::iter::repeat_with(|| None)
                .take(layers)
                .collect::<Vec<_>>()
        });
        if let Some(slot) = slots.get_mut(layer_index) {
            *slot = Some(window);
        }
    }

    /// Before a host step of `seq_id` starting at `position`: a current device window of
    /// the layer is copied into the host window (which the step then updates) and dropped.
    pub fn sync_to_host(
        &self,
        backend: &engram_cuda::CudaBackend,
        seq_id: u64,
        layer_index: usize,
        position: usize,
        host: &mut ShortConvState,
    ) -> engram_cuda::Result<()> {
        match self.take_current(seq_id, layer_index, position) {
            Some(window) => window.download_into(backend, host),
            None => Ok(()),
        }
    }

    /// Drops every window of these sequences (ended or evicted).
    pub fn remove(&self, seq_ids: &[u64]) {
        {
            let mut lost = self.lock_lost();
            if !lost.is_empty() {
                lost.retain(|(id, _)| !seq_ids.contains(id));
            }
        }
        let mut map = self.lock();
        if map.is_empty() {
            return;
        }
        for id in seq_ids {
            map.remove(id);
        }
    }

    /// Records that a failed layer left the window of `seq_id` at `layer_index` unusable.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn mark_lost(&self, seq_id: u64, layer_index: usize) {
        self.lock_lost().insert((seq_id, layer_index));
    }

    /// Whether the window is lost for a step starting at `position` (a restart at 0 clears it).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn is_lost(&self, seq_id: u64, layer_index: usize, position: usize) -> bool {
        let mut lost = self.lock_lost();
        if position == 0 {
            lost.remove(&(seq_id, layer_index));
            return false;
        }
        lost.contains(&(seq_id, layer_index))
    }

    fn lock_lost(&self) -> MutexGuard<'_, HashSet<(u64, usize)>> {
        self.lost.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether any window is held (a host step checks before syncing).
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Vec<Option<DeviceWindow>>>> {
        self.by_sequence.lock().unwrap_or_else(|e| e.into_inner())
    }
}
