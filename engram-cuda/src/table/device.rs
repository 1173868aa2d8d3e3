//! [`DeviceTable`]: the whole table in device memory, in its stored format.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use engram_core::dtype::RowDtype;
use engram_core::table::TableStore;

use super::staging::{write_i64s, Layout, Ring};
use super::{
    check_ticket, launch_gather, next_store_id, DeviceTableStore, GatherSources, Placement,
    Prefetch, TableStats,
};
use crate::backend::CudaBackend;
use crate::error::Result;
use crate::host_table::HostTable;

/// A table resident in device memory (FP8 tables stay FP8: a quarter of the f32 bytes).
/// Only the row ids cross the bus, through the staging ring.
pub struct DeviceTable {
    backend: CudaBackend,
    name: String,
    dtype: RowDtype,
    rows: u64,
    width: usize,
    values: CudaSlice<u8>,
    scales: Option<CudaSlice<u8>>,
    ring: Ring,
    stats: TableStats,
}

impl DeviceTable {
    /// Copies `host`'s stored bytes to the device.
    pub fn upload(backend: &CudaBackend, host: &HostTable) -> Result<Self> {
        let values = backend.upload(host.values())?;
        let scales = host.scales().map(|s| backend.upload(s)).transpose()?;
        let store = next_store_id();
        Ok(Self {
            backend: backend.clone(),
            name: host.name().to_string(),
            dtype: host.dtype(),
            rows: host.num_rows(),
            width: host.width(),
            values,
            scales,
            ring: Ring::new(backend, store)?,
            stats: TableStats::default(),
        })
    }

    /// Device bytes the table occupies.
    pub fn device_bytes(&self) -> usize {
        self.values.len() + self.scales.as_ref().map_or(0, CudaSlice::len)
    }

    /// Gathers rows whose ids are already on the device (`ids[..n]`, offsets added) into
    /// `out`, on `stream`: one kernel, nothing crosses the bus. For a pipeline that hashes
    /// or uploads ids itself, and for timing the kernel back to back.
    ///
    /// # Safety
    /// Every id must be below [`DeviceTableStore::num_rows`]: ids on the device are not
    /// checked, and the kernel reads wherever an id points.
    pub unsafe fn gather_device_ids(
        &self,
        ids: &CudaSlice<i64>,
        n: usize,
        out: &mut CudaSlice<f32>,
        stream: &Arc<CudaStream>,
    ) -> Result<()> {
        if ids.len() < n {
            return Err(crate::error::CudaBackendError::Invalid(format!(
                "{n} rows asked of a device buffer of {} ids",
                ids.len()
            )));
        }
        let (a_values, g1) = self.values.device_ptr(stream);
        let scales = self.scales.as_ref().map(|s| s.device_ptr(stream));
        let (src, g2) = ids.device_ptr(stream);
        let srcs = GatherSources {
            a_values,
            a_scales: scales.as_ref().map_or(0, |(p, _)| *p),
            src,
            ..Default::default()
        };
        let r = launch_gather(&self.backend, stream, srcs, out, n, self.width, self.dtype);
        drop((g1, g2, scales));
        r
    }

    fn check_ids(&self, ids: &[u64]) -> Result<()> {
        if let Some(&row) = ids.iter().find(|&&r| r >= self.rows) {
            return Err(engram_core::EngramError::RowOutOfRange {
                row,
                rows: self.rows,
                table: self.name.clone(),
            }
            .into());
        }
        Ok(())
    }
}

impl DeviceTableStore for DeviceTable {
    fn name(&self) -> &str {
        &self.name
    }
    fn placement(&self) -> Placement {
        Placement::Device
    }
    fn num_rows(&self) -> u64 {
        self.rows
    }
    fn width(&self) -> usize {
        self.width
    }
    fn dtype(&self) -> RowDtype {
        self.dtype
    }

    fn prefetch(&mut self, row_ids: &[u64]) -> Result<Prefetch> {
        self.check_ids(row_ids)?;
        let layout = Layout::new(row_ids.len(), 0, 0, 0, 0);
        let (slot, buf) = self.ring.begin(layout, row_ids.len())?;
        write_i64s(buf, layout.sources_at, row_ids.len(), |k| row_ids[k] as i64);
        let ticket = self.ring.submit(slot)?;
        self.stats.prefetches += 1;
        self.stats.bytes_transferred += layout.len as u64;
        Ok(ticket)
    }

    fn gather_prefetched(
        &mut self,
        ticket: Prefetch,
        out: &mut CudaSlice<f32>,
        stream: &Arc<CudaStream>,
    ) -> Result<()> {
        check_ticket(&ticket, self.ring.store, &self.name)?;
        let slot = self.ring.validate(&ticket)?;
        let n = ticket.rows();
        let (backend, width, dtype) = (&self.backend, self.width, self.dtype);
        let (values, scales) = (&self.values, &self.scales);
        self.ring.with_payload(slot, stream, |base, layout| {
            let (a_values, g1) = values.device_ptr(stream);
            let scales_ptr = scales.as_ref().map(|s| s.device_ptr(stream));
            let srcs = GatherSources {
                a_values,
                a_scales: scales_ptr.as_ref().map_or(0, |(p, _)| *p),
                src: base + layout.sources_at as u64,
                ..Default::default()
            };
            let r = launch_gather(backend, stream, srcs, out, n, width, dtype);
            drop(g1);
            drop(scales_ptr);
            r
        })?;
        self.stats.gathers += 1;
        self.stats.lookups += n as u64;
        self.stats.hits += n as u64;
        Ok(())
    }

    fn stats(&self) -> TableStats {
        self.stats
    }
    fn reset_stats(&mut self) {
        self.stats = TableStats::default();
    }
}
