//! [`ZeroCopyTable`]: the table stays in host memory (RAM or a memory-mapped file), which
//! is registered with the driver (`cuMemHostRegister` with `DEVICEMAP`) so that the gather
//! kernel reads the rows over the bus through a device address. Nothing is staged; only
//! the row ids are copied.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys::{self, CUresult};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
use engram_core::dtype::RowDtype;
use engram_core::table::TableStore;

use super::base::{store_base_accessors, StoreBase};
use super::staging::{write_i64s, Layout};
use super::{launch_gather, DeviceTableStore, GatherSources, Placement, Prefetch};
use crate::backend::{mapped_device_ptr, CudaBackend};
use crate::error::{CudaBackendError, DriverResultExt, Result};
use crate::host_table::HostTable;
use engram_core::table::bytes::Backing;

/// Host memory registered with the driver; unregistered on drop (after the device is idle).
struct Registration {
    ctx: Arc<CudaContext>,
    ptr: *mut c_void,
    backing: Arc<Backing>,
    dptr: u64,
}

// The pointer is only handed to the driver; the memory is owned by `backing`.
unsafe impl Send for Registration {}
unsafe impl Sync for Registration {}

impl Registration {
    fn new(backend: &CudaBackend, backing: &Arc<Backing>) -> Result<Self> {
        let info = backend.info();
        let what = if backing.is_file() {
            "zero-copy reads of a memory-mapped file"
        } else {
            "zero-copy reads of registered host memory"
        };
        if !info.can_map_host_memory {
            return Err(CudaBackendError::Unsupported {
                what: what.into(),
                reason: "the device cannot map host memory".into(),
            });
        }
        let bytes = backing.bytes();
        let ptr = bytes.as_ptr() as *mut c_void;
        let mut flags = vec![sys::CU_MEMHOSTREGISTER_DEVICEMAP | sys::CU_MEMHOSTREGISTER_PORTABLE];
        if backing.is_file() {
            // A read-only file mapping can only be registered read-only.
            flags.insert(
                0,
                sys::CU_MEMHOSTREGISTER_DEVICEMAP
                    | sys::CU_MEMHOSTREGISTER_PORTABLE
                    | sys::CU_MEMHOSTREGISTER_READ_ONLY,
            );
        }
        backend
            .context()
            .bind_to_thread()
            .ctx("binding the context")?;
        let mut refusals = Vec::new();
        for f in flags {
            // Whole pages: a mapping covers its last page entirely.
            let len = bytes.len().next_multiple_of(4096);
            let status = unsafe { sys::cuMemHostRegister_v2(ptr, len, f) };
            if status == CUresult::CUDA_SUCCESS {
                let dptr = match mapped_device_ptr(ptr) {
                    Ok(d) => d,
                    Err(e) => {
                        unsafe { sys::cuMemHostUnregister(ptr) };
                        return Err(e);
                    }
                };
                return Ok(Self {
                    ctx: backend.context().clone(),
                    ptr,
                    backing: backing.clone(),
                    dptr,
                });
            }
            refusals.push(format!("cuMemHostRegister(flags {f:#x}): {status:?}"));
        }
        Err(CudaBackendError::Unsupported {
            what: what.into(),
            reason: refusals.join("; "),
        })
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // No kernel may still read the memory when it is unpinned.
        let _ = self.ctx.synchronize();
        if self.ctx.bind_to_thread().is_ok() {
            unsafe { sys::cuMemHostUnregister(self.ptr) };
        }
    }
}

/// A host table read in place by the gather kernel (UVA zero-copy).
pub struct ZeroCopyTable {
    backend: CudaBackend,
    host: HostTable,
    regs: Vec<Registration>,
    values_dptr: u64,
    scales_dptr: u64,
    base: StoreBase,
}

impl ZeroCopyTable {
    /// Registers `host`'s memory with the driver. Errors with
    /// [`CudaBackendError::Unsupported`] where the driver refuses (some drivers refuse
    /// file mappings).
    pub fn new(backend: &CudaBackend, host: HostTable) -> Result<Self> {
        // Values and scales share one mapping: one registration covers both.
        let bytes = host.bytes();
        let reg = Registration::new(backend, bytes.backing())?;
        let values_dptr = reg.dptr + bytes.values_offset() as u64;
        let scales_dptr = bytes.scales_offset().map_or(0, |o| reg.dptr + o as u64);
        let regs = vec![reg];
        let align = match host.dtype() {
            RowDtype::F32 => 4,
            RowDtype::BF16 | RowDtype::F16 => 2,
            RowDtype::F8E4M3Scaled => 1,
        };
        if !values_dptr.is_multiple_of(align) {
            return Err(CudaBackendError::Unsupported {
                what: "zero-copy reads of this table".into(),
                reason: format!(
                    "its {} rows start at a device address that is not {align}-byte aligned",
                    host.dtype()
                ),
            });
        }
        Ok(Self {
            backend: backend.clone(),
            base: StoreBase::for_table(backend, &host)?,
            host,
            regs,
            values_dptr,
            scales_dptr,
        })
    }

    pub fn host(&self) -> &HostTable {
        &self.host
    }

    /// Whether the table is read from a memory-mapped file.
    pub fn is_file_backed(&self) -> bool {
        self.regs.iter().any(|r| r.backing.is_file())
    }
}

impl DeviceTableStore for ZeroCopyTable {
    store_base_accessors!();

    fn placement(&self) -> Placement {
        Placement::ZeroCopy
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
        let (backend, width, dtype) = (&self.backend, self.host.width(), self.host.dtype());
        let (a_values, a_scales) = (self.values_dptr, self.scales_dptr);
        self.base.ring.with_payload(slot, stream, |base, layout| {
            let srcs = GatherSources {
                a_values,
                a_scales,
                src: base + layout.sources_at as u64,
                ..Default::default()
            };
            launch_gather(backend, stream, srcs, out, n, width, dtype)
        })?;
        let row_bytes = (self.host.value_row_bytes() + self.host.scale_row_bytes()) as u64;
        self.base.stats.gathers += 1;
        self.base.stats.lookups += n as u64;
        self.base.stats.rows_transferred += n as u64;
        self.base.stats.bytes_transferred += n as u64 * row_bytes;
        Ok(())
    }
}
