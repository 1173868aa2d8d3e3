//! Double-buffered host-to-device staging shared by every placement.
//!
//! A prefetch writes one *payload* into a pinned (page-locked, write-combined) host
//! buffer: the i64 row sources of the gather, the staged rows' values and scales, and
//! the device cache's insert pairs, each region 256-byte aligned. One async copy on the
//! backend's copy stream moves it to the slot's device buffer and records `copy_done`;
//! the gather on the compute stream waits for that event and records `consumed` when it
//! has read the buffer. Two slots alternate, so the host can fill one while the other is
//! in flight:
//! - before the host writes a slot's pinned buffer it waits for that slot's previous copy
//!   (`copy_done`, a host wait that only blocks with more than two prefetches in flight);
//! - before the copy stream overwrites a slot's device buffer it waits for the gather that
//!   read it (`consumed`, a stream wait).

use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, PinnedHostSlice};

use rayon::prelude::*;

use super::Prefetch;
use crate::backend::CudaBackend;
use crate::error::{CudaBackendError, DriverResultExt, Result};

const ALIGN: usize = 256;

/// Where each region of a payload lies (byte offsets into the slot's buffers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Number of i64 gather sources (0: the gather reads staged row i for output i).
    pub sources: usize,
    /// Rows staged (values and scales).
    pub rows: usize,
    /// Cache insert pairs (two i64 each).
    pub pairs: usize,
    pub sources_at: usize,
    pub values_at: usize,
    pub scales_at: usize,
    pub pairs_at: usize,
    pub len: usize,
}

impl Layout {
    pub fn new(
        sources: usize,
        rows: usize,
        row_bytes: usize,
        scale_bytes: usize,
        pairs: usize,
    ) -> Self {
        let mut at = 0;
        let mut region = |bytes: usize| {
            let start = at;
            at = (at + bytes).next_multiple_of(ALIGN);
            start
        };
        let sources_at = region(sources * 8);
        let values_at = region(rows * row_bytes);
        let scales_at = region(rows * scale_bytes);
        let pairs_at = region(pairs * 16);
        Self {
            sources,
            rows,
            pairs,
            sources_at,
            values_at,
            scales_at,
            pairs_at,
            len: at,
        }
    }
}

pub(crate) struct Slot {
    host: Option<PinnedHostSlice<u8>>,
    dev: Option<CudaSlice<u8>>,
    cap: usize,
    copy_done: CudaEvent,
    consumed: CudaEvent,
    pub generation: u64,
    /// Prefetch sequence number of the payload the slot holds.
    pub seq: u64,
    /// Submitted and not yet gathered.
    pub pending: bool,
    pub layout: Layout,
    /// Output rows of the payload's prefetch.
    pub out_rows: usize,
}

pub(crate) struct Ring {
    backend: CudaBackend,
    slots: [Slot; 2],
    next: usize,
    seq: u64,
    pub store: u64,
}

fn put_i64s(dst: &mut [u8], values: impl IntoIterator<Item = i64>) {
    for (d, v) in dst.chunks_exact_mut(8).zip(values) {
        d.copy_from_slice(&v.to_le_bytes());
    }
}

impl Ring {
    pub fn new(backend: &CudaBackend, store: u64) -> Result<Self> {
        let ctx = backend.context();
        let slot = || -> Result<Slot> {
            Ok(Slot {
                host: None,
                dev: None,
                cap: 0,
                copy_done: ctx.new_event(None).ctx("creating an event")?,
                consumed: ctx.new_event(None).ctx("creating an event")?,
                generation: 0,
                seq: 0,
                pending: false,
                layout: Layout::default(),
                out_rows: 0,
            })
        };
        Ok(Self {
            backend: backend.clone(),
            slots: [slot()?, slot()?],
            next: 0,
            seq: 0,
            store,
        })
    }

    /// The slot the next [`Ring::begin`] will fill.
    pub fn next_slot(&self) -> usize {
        self.next
    }

    pub fn slot(&self, i: usize) -> &Slot {
        &self.slots[i]
    }

    /// Takes the next slot for a payload of `layout` and returns it with the pinned host
    /// buffer to fill (`layout.len` bytes). A payload still in the slot becomes stale.
    pub fn begin(&mut self, layout: Layout, out_rows: usize) -> Result<(usize, &mut [u8])> {
        let i = self.next;
        self.next ^= 1;
        let ctx = self.backend.context().clone();
        let copy = self.backend.copy_stream().clone();
        let s = &mut self.slots[i];
        // The previous copy out of the pinned buffer must be done before it is rewritten.
        s.copy_done
            .synchronize()
            .ctx("waiting for a staging buffer's previous copy")?;
        if layout.len > s.cap {
            // The device buffer may still be read by the last gather.
            s.consumed
                .synchronize()
                .ctx("waiting for a staging buffer's last reader")?;
            // Grown rarely: freeing pinned memory can stall the host, and a step whose
            // payload outgrows its slot pays for it.
            let cap = layout.len.max(2 * s.cap).max(1 << 20);
            s.host = None;
            s.dev = None;
            s.host = Some(
                unsafe { ctx.alloc_pinned::<u8>(cap) }
                    .ctx("allocating pinned host staging memory")?,
            );
            // Ordered on the copy stream, which writes it first; the compute stream reads
            // it only after `copy_done`. (Allocating on the compute stream would need a
            // host wait for everything queued there, the model's earlier layers included.)
            s.dev = Some(unsafe { copy.alloc::<u8>(cap) }.ctx("allocating device staging memory")?);
            s.cap = cap;
        }
        s.generation += 1;
        s.pending = false;
        s.layout = layout;
        s.out_rows = out_rows;
        let host = match s.host.as_mut() {
            Some(h) => {
                &mut h.as_mut_slice().ctx("mapping pinned host staging memory")?[..layout.len]
            }
            None => &mut [][..],
        };
        Ok((i, host))
    }

    /// Queues the slot's payload on the copy stream and returns its ticket.
    pub fn submit(&mut self, i: usize) -> Result<Prefetch> {
        let copy = self.backend.copy_stream().clone();
        self.seq += 1;
        let s = &mut self.slots[i];
        let len = s.layout.len;
        if len > 0 {
            copy.wait(&s.consumed)
                .ctx("ordering a staging copy after the last gather")?;
            let host = s
                .host
                .as_ref()
                .expect("allocated by begin")
                .as_slice()
                .ctx("mapping pinned host staging memory")?;
            let dev = s.dev.as_mut().expect("allocated by begin");
            let (dptr, guard) = dev.device_ptr_mut(&copy);
            // The raw copy below needs the context current on this thread.
            copy.context().bind_to_thread().ctx("binding the context")?;
            unsafe {
                cudarc::driver::result::memcpy_htod_async(dptr, &host[..len], copy.cu_stream())
            }
            .ctx("queueing a host-to-device staging copy")?;
            drop(guard);
            s.copy_done
                .record(&copy)
                .ctx("recording a staging copy's event")?;
        }
        s.pending = true;
        s.seq = self.seq;
        Ok(Prefetch {
            store: self.store,
            slot: i,
            generation: s.generation,
            rows: s.out_rows,
        })
    }

    /// The slot of a valid, not yet gathered ticket.
    pub fn validate(&self, ticket: &Prefetch) -> Result<usize> {
        let s = &self.slots[ticket.slot];
        if s.generation != ticket.generation || !s.pending {
            return Err(CudaBackendError::Invalid(
                "stale prefetch ticket: its staging buffer was reused (at most two prefetches \
                 of one table may be outstanding) or its rows were already gathered"
                    .into(),
            ));
        }
        Ok(ticket.slot)
    }

    /// Orders `stream` after the slot's copy and calls `f` with the device address of the
    /// slot's payload; then records that `stream` has read it.
    pub fn with_payload<R>(
        &mut self,
        i: usize,
        stream: &Arc<CudaStream>,
        f: impl FnOnce(u64, &Layout) -> Result<R>,
    ) -> Result<R> {
        let s = &mut self.slots[i];
        stream
            .wait(&s.copy_done)
            .ctx("ordering a gather after its staging copy")?;
        let r = match s.dev.as_ref() {
            Some(dev) => {
                let (base, guard) = dev.device_ptr(stream);
                let r = f(base, &s.layout);
                drop(guard);
                r
            }
            None => f(0, &s.layout),
        }?;
        s.consumed
            .record(stream)
            .ctx("recording a staging buffer's reader")?;
        s.pending = false;
        Ok(r)
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // A copy may still read a pinned buffer (a prefetch that was never gathered);
        // the buffer must outlive it.
        for s in &self.slots {
            let _ = s.copy_done.synchronize();
        }
    }
}

/// Writes `value(0..n)` as little-endian i64 into the region at `at` (a large batch from
/// every thread: the staging memory is write-combined, so each thread's run of stores
/// leaves as whole lines).
pub(crate) fn write_i64s(buf: &mut [u8], at: usize, n: usize, value: impl Fn(usize) -> i64 + Sync) {
    let region = &mut buf[at..at + 8 * n];
    if n >= super::dedupe::PARALLEL_IDS {
        region
            .par_chunks_mut(8)
            .with_min_len(1024)
            .enumerate()
            .for_each(|(k, d)| d.copy_from_slice(&value(k).to_le_bytes()));
    } else {
        put_i64s(region, (0..n).map(value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_aligned_and_disjoint() {
        let l = Layout::new(3, 5, 1024, 0, 2);
        assert_eq!(l.sources_at, 0);
        assert_eq!(l.values_at, 256);
        assert_eq!(l.scales_at, 256 + 5 * 1024);
        assert_eq!(l.pairs_at, l.scales_at);
        assert_eq!(l.len, l.pairs_at + 256);
        let f8 = Layout::new(0, 7, 256, 8, 0);
        assert_eq!(f8.values_at, 0);
        assert_eq!(f8.scales_at, 7 * 256);
        assert!(f8.len >= f8.scales_at + 56 && f8.len.is_multiple_of(ALIGN));
        let mut buf = vec![0u8; 32];
        write_i64s(&mut buf, 8, 2, |k| [-1i64, 7][k]);
        let n = super::super::dedupe::PARALLEL_IDS + 5;
        let mut big = vec![0u8; 8 * n];
        write_i64s(&mut big, 0, n, |k| k as i64 - 7);
        for k in [0, 4095, n - 1] {
            assert_eq!(&big[8 * k..8 * k + 8], &(k as i64 - 7).to_le_bytes());
        }
        assert_eq!(&buf[8..16], &(-1i64).to_le_bytes());
        assert_eq!(&buf[16..24], &7i64.to_le_bytes());
    }
}
