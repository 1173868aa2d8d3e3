//! What every placement shares: its table's name and shape, its staging ring, its
//! counters, and the checks of row ids and prefetch tickets. A placement holds a
//! [`StoreBase`] and gets the plain [`super::DeviceTableStore`] accessors from
//! [`store_base_accessors!`].

use engram_core::dtype::RowDtype;
use engram_core::table::TableStore;

use super::staging::Ring;
use super::{next_store_id, Prefetch, TableStats};
use crate::backend::CudaBackend;
use crate::error::{CudaBackendError, Result};
use crate::host_table::HostTable;

pub(crate) struct StoreBase {
    pub name: String,
    pub dtype: RowDtype,
    pub rows: u64,
    pub width: usize,
    pub ring: Ring,
    pub stats: TableStats,
}

impl StoreBase {
    /// A store of a table of `rows` x `width` in `dtype`, with a fresh id for its tickets.
    pub fn new(
        backend: &CudaBackend,
        name: impl Into<String>,
        dtype: RowDtype,
        rows: u64,
        width: usize,
    ) -> Result<Self> {
        Ok(Self {
            name: name.into(),
            dtype,
            rows,
            width,
            ring: Ring::new(backend, next_store_id())?,
            stats: TableStats::default(),
        })
    }

    /// A store of `host`'s table.
    pub fn for_table(backend: &CudaBackend, host: &HostTable) -> Result<Self> {
        Self::new(
            backend,
            host.name(),
            host.dtype(),
            host.num_rows(),
            host.width(),
        )
    }

    /// Every id must name a row of the table.
    pub fn check_ids(&self, ids: &[u64]) -> Result<()> {
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

    /// The ring slot of `ticket`: issued by this store, not yet gathered, not stale.
    pub fn slot_of(&self, ticket: &Prefetch) -> Result<usize> {
        if ticket.store != self.ring.store {
            return Err(CudaBackendError::Invalid(format!(
                "a prefetch ticket of another table was handed to `{}`",
                self.name
            )));
        }
        self.ring.validate(ticket)
    }
}

/// The accessors of [`super::DeviceTableStore`] that read a placement's `base`
/// ([`StoreBase`]) field; used inside each `impl DeviceTableStore`.
macro_rules! store_base_accessors {
    () => {
        fn name(&self) -> &str {
            &self.base.name
        }
        fn num_rows(&self) -> u64 {
            self.base.rows
        }
        fn width(&self) -> usize {
            self.base.width
        }
        fn dtype(&self) -> engram_core::dtype::RowDtype {
            self.base.dtype
        }
        fn stats(&self) -> $crate::table::TableStats {
            self.base.stats
        }
        fn reset_stats(&mut self) {
            self.base.stats = $crate::table::TableStats::default();
        }
    };
}
pub(crate) use store_base_accessors;
