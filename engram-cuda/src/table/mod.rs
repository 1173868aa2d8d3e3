//! Table placements behind one trait, [`DeviceTableStore`]: rows gathered into a device
//! buffer of f32 embeddings, whichever memory holds the table.
//!
//! | placement | where the table lives | how rows reach the device |
//! |---|---|---|
//! | [`DeviceTable`] | device memory | a gather kernel |
//! | [`PinnedTable`] | host memory | CPU gather into pinned staging, async copy on the copy stream |
//! | [`ZeroCopyTable`] | registered host memory (RAM or a mapped file) | the gather kernel reads host memory over the bus |
//! | [`CachedTable`] | host memory, hot rows in a device cache | hits from the cache, misses staged like [`PinnedTable`] |
//!
//! Every gather is split in two so that row transfers can overlap the host model's own
//! layers: [`DeviceTableStore::prefetch`] starts moving rows (row ids are known from the
//! token ids before layer 0 runs) and returns a [`Prefetch`] ticket;
//! [`DeviceTableStore::gather_prefetched`] orders the compute stream after the transfer
//! (an event, not a host wait) and writes the embeddings. Each store double-buffers its
//! staging: two prefetches may be outstanding; a third reuses the oldest buffer and makes
//! its ticket stale (refused with an error, never silently wrong).

mod base;
mod cache;
mod dedupe;
mod device;
mod pinned;
mod staging;
mod zero_copy;

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, LaunchConfig};
use engram_core::dtype::RowDtype;
use serde::Serialize;

pub use cache::{CachePlan, CachePlanner, CachedTable, FrequencySketch};
pub use dedupe::{Deduper, PARALLEL_IDS};
pub use device::DeviceTable;
pub use pinned::PinnedTable;
pub use pinned::{stage_rows_with, PARALLEL_STAGE_ROWS};
pub use zero_copy::ZeroCopyTable;

use crate::backend::{CudaBackend, BLOCK, WARPS_PER_BLOCK};
use crate::error::{CudaBackendError, Result};
use crate::kernels::{In, Out};

/// Where a store keeps its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Placement {
    Device,
    PinnedHost,
    ZeroCopy,
    DeviceCache,
}

impl Placement {
    pub fn name(self) -> &'static str {
        match self {
            Placement::Device => "device",
            Placement::PinnedHost => "pinned-host",
            Placement::ZeroCopy => "zero-copy",
            Placement::DeviceCache => "device-cache",
        }
    }
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Counters of one store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct TableStats {
    pub prefetches: u64,
    pub gathers: u64,
    /// Row lookups (one per requested id).
    pub lookups: u64,
    /// Lookups served from device memory (all of them for a device table, the cache hits
    /// of a cached table, none for the host placements).
    pub hits: u64,
    /// Rows that crossed the host-device link (after de-duplication).
    pub rows_transferred: u64,
    /// Bytes that crossed the host-device link (rows and ids).
    pub bytes_transferred: u64,
    /// Host time spent gathering rows into staging buffers.
    pub host_gather_ns: u64,
}

impl TableStats {
    /// Fraction of lookups served from device memory.
    pub fn hit_rate(&self) -> f64 {
        if self.lookups == 0 {
            0.0
        } else {
            self.hits as f64 / self.lookups as f64
        }
    }
}

/// A started transfer of rows; hand it back to [`DeviceTableStore::gather_prefetched`]
/// of the store that issued it.
#[derive(Debug)]
#[must_use = "a prefetch does nothing until its rows are gathered"]
pub struct Prefetch {
    store: u64,
    slot: usize,
    generation: u64,
    rows: usize,
}

impl Prefetch {
    /// Rows (ids) the prefetch covers.
    pub fn rows(&self) -> usize {
        self.rows
    }
}

/// A table whose rows can be gathered into device memory.
pub trait DeviceTableStore: Send {
    fn name(&self) -> &str;
    fn placement(&self) -> Placement;
    fn num_rows(&self) -> u64;
    /// Columns of one row.
    fn width(&self) -> usize;
    fn dtype(&self) -> RowDtype;

    /// Starts moving rows `row_ids` toward the device (host gathers and copies run now;
    /// the device side is queued on the copy stream). At most two prefetches of one store
    /// may be outstanding.
    fn prefetch(&mut self, row_ids: &[u64]) -> Result<Prefetch>;

    /// Writes the prefetched rows, decoded to f32, into `out[..rows * width]`, ordered on
    /// `stream` after their transfer.
    fn gather_prefetched(
        &mut self,
        ticket: Prefetch,
        out: &mut CudaSlice<f32>,
        stream: &Arc<CudaStream>,
    ) -> Result<()>;

    /// [`Self::prefetch`] then [`Self::gather_prefetched`].
    fn gather_to_device(
        &mut self,
        row_ids: &[u64],
        out: &mut CudaSlice<f32>,
        stream: &Arc<CudaStream>,
    ) -> Result<()> {
        let ticket = self.prefetch(row_ids)?;
        self.gather_prefetched(ticket, out, stream)
    }

    fn stats(&self) -> TableStats;
    fn reset_stats(&mut self);
}

/// A fresh id for each store, so tickets cannot be handed to the wrong one.
pub(crate) fn next_store_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Where the gather kernel reads: table A (indexed by non-negative sources) and table B
/// (staged rows, indexed by negative sources), as device addresses (0 = none).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct GatherSources {
    pub a_values: u64,
    pub a_scales: u64,
    pub b_values: u64,
    pub b_scales: u64,
    /// Device address of the i64 sources, or 0 for "row i of B".
    pub src: u64,
}

/// Launches `engram_gather_rows` for `n` output rows into `out` on `stream`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_gather(
    backend: &CudaBackend,
    stream: &Arc<CudaStream>,
    srcs: GatherSources,
    out: &mut CudaSlice<f32>,
    n: usize,
    width: usize,
    dtype: RowDtype,
) -> Result<()> {
    if out.len() < n * width {
        return Err(CudaBackendError::Invalid(format!(
            "gather of {n} rows x {width} columns into a device buffer of {} floats",
            out.len()
        )));
    }
    if n == 0 {
        return Ok(());
    }
    let n_i = i32::try_from(n)
        .map_err(|_| CudaBackendError::Invalid(format!("{n} rows in one gather")))?;
    let width_i = width as i32;
    let code = crate::host_table::dtype_code(dtype);
    let rb = crate::host_table::value_row_bytes(dtype, width) as i64;
    let sb = crate::host_table::scale_row_bytes(dtype, width) as i64;
    let cfg = LaunchConfig {
        // One warp per row.
        grid_dim: (backend.grid(n.div_ceil(WARPS_PER_BLOCK)), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe {
        backend.kernels().gather_rows(
            stream,
            cfg,
            In::Addr(srcs.a_values),
            In::Addr(srcs.a_scales),
            In::Addr(srcs.b_values),
            In::Addr(srcs.b_scales),
            In::Addr(srcs.src),
            Out::Buf(out),
            n_i,
            width_i,
            code,
            rb,
            sb,
        )
    }
}
