//! [`DeviceTable`]: the whole table in device memory, in its stored format.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::base::{store_base_accessors, StoreBase};
use super::staging::{write_i64s, Layout};
use super::{launch_gather, DeviceTableStore, GatherSources, Placement, Prefetch};
use crate::backend::CudaBackend;
use crate::error::Result;
use crate::host_table::HostTable;

/// A table resident in device memory (FP8 tables stay FP8: a quarter of the f32 bytes).
/// Only the row ids cross the bus, through the staging ring.
pub struct DeviceTable {
    backend: CudaBackend,
    base: StoreBase,
    values: CudaSlice<u8>,
    scales: Option<CudaSlice<u8>>,
}

impl DeviceTable {
    /// Copies `host`'s stored bytes to the device.
    pub fn upload(backend: &CudaBackend, host: &HostTable) -> Result<Self> {
        let values = backend.upload(host.values())?;
        let scales = host.scales().map(|s| backend.upload(s)).transpose()?;
        Ok(Self {
            backend: backend.clone(),
            base: StoreBase::for_table(backend, host)?,
            values,
            scales,
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
        let r = launch_gather(
            &self.backend,
            stream,
            srcs,
            out,
            n,
            self.base.width,
            self.base.dtype,
        );
        drop((g1, g2, scales));
        r
    }
}

impl DeviceTableStore for DeviceTable {
    store_base_accessors!();

    fn placement(&self) -> Placement {
        Placement::Device
    }

    fn prefetch(&mut self, row_ids: &[u64]) -> Result<Prefetch> {
        self.base.check_ids(row_ids)?;
        let layout = Layout::new(row_ids.len(), 0, 0, 0, 0);
        let (slot, buf) = self.base.ring.begin(layout, row_ids.len())?;
        write_i64s(buf, layout.sources_at, row_ids.len(), |k| row_ids[k] as i64);
        let ticket = self.base.ring.submit(slot)?;
        self.base.stats.prefetches += 1;
        self.base.stats.bytes_transferred += layout.len as u64;
        Ok(ticket)
    }

    fn gather_prefetched(
        &mut self,
        ticket: Prefetch,
        out: &mut CudaSlice<f32>,
        stream: &Arc<CudaStream>,
    ) -> Result<()> {
        let slot = self.base.slot_of(&ticket)?;
        let n = ticket.rows();
        let (backend, width, dtype) = (&self.backend, self.base.width, self.base.dtype);
        let (values, scales) = (&self.values, &self.scales);
        self.base.ring.with_payload(slot, stream, |base, layout| {
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
        self.base.stats.gathers += 1;
        self.base.stats.lookups += n as u64;
        self.base.stats.hits += n as u64;
        Ok(())
    }
}
