//! [`PinnedTable`]: the table in host memory; each prefetch gathers the requested rows on
//! the CPU into pinned staging memory and copies them asynchronously on the copy stream.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaSlice, CudaStream};
use engram_core::table::TableStore;
use rayon::prelude::*;

use super::base::{store_base_accessors, StoreBase};
use super::dedupe::Deduper;
use super::staging::{write_i64s, Layout};
use super::{launch_gather, DeviceTableStore, GatherSources, Placement, Prefetch};
use crate::backend::CudaBackend;
use crate::error::Result;
use crate::host_table::HostTable;

/// Rows from which [`stage_rows`] copies from every thread. Random reads of host memory
/// are latency-bound, so many in flight pay early: on the H200 machines (16-core VM)
/// 4096 FP8 rows took 297 us on one thread and 79 us on all of them (`gpu-bench`'s
/// `staging` section), where de-duplicating the same ids was faster on one thread
/// ([`super::dedupe::PARALLEL_IDS`]).
pub const PARALLEL_STAGE_ROWS: usize = 2048;

/// Copies the stored bytes of `rows` into `values` (`[rows, value_row_bytes]`) and
/// `scales` (`[rows, scale_row_bytes]`), from every thread from [`PARALLEL_STAGE_ROWS`].
pub(crate) fn stage_rows(host: &HostTable, rows: &[u64], values: &mut [u8], scales: &mut [u8]) {
    stage_rows_with(
        host,
        rows,
        values,
        scales,
        rows.len() >= PARALLEL_STAGE_ROWS,
    )
}

/// [`stage_rows`], on every thread or on the calling one as `parallel` says.
pub fn stage_rows_with(
    host: &HostTable,
    rows: &[u64],
    values: &mut [u8],
    scales: &mut [u8],
    parallel: bool,
) {
    let (rb, sb) = (host.value_row_bytes(), host.scale_row_bytes());
    // The table's slices once, not per row (each lookup goes through the shared mapping).
    let (table_values, table_scales) = (host.values(), host.scales().unwrap_or(&[]));
    let row = |r: u64, n: usize| -> std::ops::Range<usize> {
        let at = r as usize * n;
        at..at + n
    };
    if parallel {
        values
            .par_chunks_mut(rb)
            .with_min_len(64)
            .zip(rows.par_iter())
            .for_each(|(d, &r)| d.copy_from_slice(&table_values[row(r, rb)]));
        if sb > 0 {
            scales
                .par_chunks_mut(sb)
                .with_min_len(256)
                .zip(rows.par_iter())
                .for_each(|(d, &r)| d.copy_from_slice(&table_scales[row(r, sb)]));
        }
    } else {
        for (d, &r) in values.chunks_exact_mut(rb).zip(rows) {
            d.copy_from_slice(&table_values[row(r, rb)]);
        }
        if sb > 0 {
            for (d, &r) in scales.chunks_exact_mut(sb).zip(rows) {
                d.copy_from_slice(&table_scales[row(r, sb)]);
            }
        }
    }
}

/// The regions of a staging buffer that hold `rows` staged rows.
pub(crate) fn row_regions<'a>(
    buf: &'a mut [u8],
    layout: &Layout,
    rb: usize,
    sb: usize,
) -> (&'a mut [u8], &'a mut [u8]) {
    let (head, tail) = buf.split_at_mut(layout.scales_at);
    (
        &mut head[layout.values_at..layout.values_at + layout.rows * rb],
        &mut tail[..layout.rows * sb],
    )
}

/// A table in host memory, gathered by the CPU into pinned staging buffers and copied to
/// the device on the copy stream (de-duplicated: a row requested twice crosses once).
pub struct PinnedTable {
    backend: CudaBackend,
    host: HostTable,
    base: StoreBase,
    dedupe: Deduper,
}

impl PinnedTable {
    pub fn new(backend: &CudaBackend, host: HostTable) -> Result<Self> {
        Ok(Self {
            backend: backend.clone(),
            base: StoreBase::for_table(backend, &host)?,
            host,
            dedupe: Deduper::default(),
        })
    }

    pub fn host(&self) -> &HostTable {
        &self.host
    }
}

impl DeviceTableStore for PinnedTable {
    store_base_accessors!();

    fn placement(&self) -> Placement {
        Placement::PinnedHost
    }

    fn prefetch(&mut self, row_ids: &[u64]) -> Result<Prefetch> {
        self.base.check_ids(row_ids)?;
        let t0 = Instant::now();
        let (rb, sb) = (self.host.value_row_bytes(), self.host.scale_row_bytes());
        let (unique, index) = self.dedupe.dedupe(row_ids);
        let layout = Layout::new(row_ids.len(), unique.len(), rb, sb, 0);
        let (slot, buf) = self.base.ring.begin(layout, row_ids.len())?;
        write_i64s(buf, layout.sources_at, index.len(), |k| {
            -(index[k] as i64) - 1
        });
        let (values, scales) = row_regions(buf, &layout, rb, sb);
        stage_rows(&self.host, &unique, values, scales);
        self.base.stats.host_gather_ns += t0.elapsed().as_nanos() as u64;
        let ticket = self.base.ring.submit(slot)?;
        self.base.stats.prefetches += 1;
        self.base.stats.rows_transferred += unique.len() as u64;
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
        let has_scales = self.host.scale_row_bytes() > 0;
        self.base.ring.with_payload(slot, stream, |base, layout| {
            let srcs = GatherSources {
                b_values: base + layout.values_at as u64,
                b_scales: if has_scales {
                    base + layout.scales_at as u64
                } else {
                    0
                },
                src: base + layout.sources_at as u64,
                ..Default::default()
            };
            launch_gather(backend, stream, srcs, out, n, width, dtype)
        })?;
        self.base.stats.gathers += 1;
        self.base.stats.lookups += n as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use engram_core::dtype::RowDtype;

    use super::*;

    #[test]
    fn staged_rows_are_the_stored_bytes() {
        let width = 32;
        let values: Vec<u8> = (0..4 * width).map(|i| i as u8).collect();
        let scales = vec![127u8, 128, 129, 130];
        let t = HostTable::from_raw("t", RowDtype::F8E4M3Scaled, width, &values, Some(&scales))
            .unwrap();
        let rows: Vec<u64> = (0..3000).map(|i| (i * 7 % 4) as u64).collect();
        let mut v = vec![0u8; rows.len() * width];
        let mut s = vec![0u8; rows.len()];
        stage_rows(&t, &rows, &mut v, &mut s);
        for (k, &r) in rows.iter().enumerate() {
            assert_eq!(&v[k * width..(k + 1) * width], t.row_values(r));
            assert_eq!(s[k], scales[r as usize]);
        }
    }
}
