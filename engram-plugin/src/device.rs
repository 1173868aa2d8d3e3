//! The runtime's GPU path: a layer's rows are moved to the device by the prefetch thread
//! (for a host table: a CPU gather into pinned staging and an async copy on the copy
//! stream) while the host computes its earlier layers; when the host reaches the layer,
//! the device gather is ordered after that copy by an event, not a host wait, and the
//! layer's math runs on the device.
//!
//! With host (CPU tensor) hidden states, they and the conv windows cross the bus at each
//! layer. With the `cuda` feature, hidden states that are candle CUDA tensors are read and
//! written in device memory and the windows stay there (`step/cuda.rs`).

use std::sync::{Arc, Mutex, MutexGuard};

use engram_core::backend::Segment;
use engram_cuda::{
    CachedTable, CudaBackend, CudaLayer, DeviceTable, DeviceTableStore, HostTable, PinnedTable,
    Placement, Prefetch, Rows, TableStats, ZeroCopyTable,
};

/// Where the CUDA backend keeps each layer's table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CudaTables {
    /// In host memory (RAM or the mapped checkpoint); the rows a step needs are gathered
    /// into pinned staging and copied on the copy stream ahead of the layer.
    #[default]
    PinnedHost,
    /// Uploaded whole to device memory at open (the table must fit).
    Device,
    /// Registered host memory read by the gather kernel over the bus (where the driver
    /// allows registering it).
    ZeroCopy,
    /// Host memory with a device cache of `rows` hot rows in front of it.
    Cached { rows: usize },
}

impl std::str::FromStr for CudaTables {
    type Err = String;

    /// `pinned-host`, `device`, `zero-copy`, or `cache:ROWS`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pinned-host" => Ok(Self::PinnedHost),
            "device" => Ok(Self::Device),
            "zero-copy" => Ok(Self::ZeroCopy),
            _ => match s.strip_prefix("cache:").map(str::parse::<usize>) {
                Some(Ok(rows)) if rows > 0 => Ok(Self::Cached { rows }),
                _ => {
                    Err("expected pinned-host, device, zero-copy or cache:ROWS (ROWS >= 1)".into())
                }
            },
        }
    }
}

/// One layer's table as the device sees it, with the layer that reads it.
pub struct DeviceRows {
    store: Mutex<Box<dyn DeviceTableStore>>,
    layer: Arc<CudaLayer>,
}

impl DeviceRows {
    /// Places `host` as `tables` says, for `layer`.
    pub fn new(
        backend: &CudaBackend,
        host: HostTable,
        tables: CudaTables,
        layer: Arc<CudaLayer>,
    ) -> engram_cuda::Result<Self> {
        let store: Box<dyn DeviceTableStore> = match tables {
            CudaTables::PinnedHost => Box::new(PinnedTable::new(backend, host)?),
            CudaTables::Device => Box::new(DeviceTable::upload(backend, &host)?),
            CudaTables::ZeroCopy => Box::new(ZeroCopyTable::new(backend, host)?),
            CudaTables::Cached { rows } => Box::new(CachedTable::new(backend, host, rows)?),
        };
        Ok(Self {
            store: Mutex::new(store),
            layer,
        })
    }

    pub fn placement(&self) -> Placement {
        self.lock().placement()
    }

    /// The store's counters (transfers, cache hits, host staging time).
    pub fn table_stats(&self) -> TableStats {
        self.lock().stats()
    }

    /// Starts moving `row_ids` toward the device (run on the prefetch thread).
    pub(crate) fn prefetch(&self, row_ids: &[u64]) -> engram_cuda::Result<Prefetch> {
        self.lock().prefetch(row_ids)
    }

    /// The layer on host buffers, its rows from `ticket`.
    pub(crate) fn apply(
        &self,
        ticket: Prefetch,
        hidden: &[f32],
        dead: Option<&[bool]>,
        segments: &mut [Segment<'_>],
        out: &mut [f32],
    ) -> engram_cuda::Result<()> {
        let mut store = self.lock();
        self.layer.forward_host_rows(
            store.as_mut(),
            Rows::Prefetched(ticket),
            hidden,
            dead,
            segments,
            out,
        )
    }

    /// The backend (device, streams) the layer runs on.
    pub fn backend(&self) -> &CudaBackend {
        self.layer.backend()
    }

    /// Runs `f` with the layer and its table store (locked): a forward on device buffers
    /// (`step/cuda.rs`), queued on the backend's compute stream.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn with_layer<R>(
        &self,
        f: impl FnOnce(&CudaLayer, &mut dyn DeviceTableStore) -> R,
    ) -> R {
        f(&self.layer, self.lock().as_mut())
    }

    fn lock(&self) -> MutexGuard<'_, Box<dyn DeviceTableStore>> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }
}
