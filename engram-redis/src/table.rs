//! [`RedisTable`]: one Engram layer's table read from a Redis Cluster, behind the same
//! [`TableStore`] trait as the tables in RAM and memory-mapped files.
//!
//! A gather asks for each distinct row once (`GETRANGE` of its bytes and tag in its
//! block), all of a shard's rows in one pipeline and every shard at once
//! ([`RedisCluster::batch`]): one round trip per shard per gather, whatever the rows.
//! The runtime's prefetcher calls the gather when a step begins, so the round trips
//! overlap the host's earlier layers. Every row is checked against its tag before it is
//! decoded; a missing block, a row of another table, a shard down or past the deadline
//! fail the gather with the table, the block key and the shard named.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use engram_core::checkpoint::SafetensorsHeader;
use engram_core::config::EngramConfig;
use engram_core::dtype::RowDtype;
use engram_core::error::{EngramError, Result};
use engram_core::primes::LayerTableLayout;
use engram_core::table::{StoreCounters, TableStore};

use crate::block::{block_key, check_row, manifest_key, BlockLayout, Identity, RowProblem};
use crate::cluster::{Op, RedisCluster};
use crate::identity::{layer_identity, Manifest};

pub struct RedisTable {
    name: String,
    cluster: Arc<RedisCluster>,
    identity: Identity,
    dtype: RowDtype,
    width: usize,
    layout: BlockLayout,
    round_trips: AtomicU64,
    bytes: AtomicU64,
}

impl RedisTable {
    /// Opens layer `layout.layer_id`'s table in the cluster: the identity is computed
    /// from the layer's other tensors in the file `header` describes (the table itself
    /// need not be there), and the store's manifest under it must match the config.
    pub fn open_layer(
        cluster: Arc<RedisCluster>,
        header: &SafetensorsHeader,
        cfg: &EngramConfig,
        layout: &LayerTableLayout,
    ) -> Result<Self> {
        let identity = layer_identity(header, cfg, layout)?;
        let key = manifest_key(&identity);
        let read = cluster.batch(&key, &[Op::Get { key: key.clone() }])?;
        let text = &read.replies[0];
        if text.is_empty() {
            return Err(EngramError::Other(format!(
                "Engram layer {} of {}: the Redis Cluster ({}) has no table for this checkpoint \
                 (no `{key}`, on shard {}): load it with `engram upload --model DIR --store URL`",
                layout.layer_id,
                header.path().display(),
                cluster.url().seeds.join(","),
                cluster.shard_of(&key).unwrap_or_default(),
            )));
        }
        let manifest: Manifest = serde_json::from_slice(text).map_err(|e| {
            EngramError::Other(format!("the store's `{key}` is not a table manifest: {e}"))
        })?;
        manifest.check(&identity, cfg, layout)?;
        Ok(Self {
            name: format!(
                "redis:{}:{}",
                crate::block::key_prefix(&identity),
                manifest.tensor
            ),
            dtype: manifest.dtype()?,
            width: manifest.width,
            layout: manifest.layout()?,
            cluster,
            identity,
            round_trips: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        })
    }

    pub fn cluster(&self) -> &Arc<RedisCluster> {
        &self.cluster
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The error for row `row`'s read, which `problem` refused.
    fn row_error(&self, row: u64, problem: RowProblem) -> EngramError {
        let (block, _, _) = self.layout.locate(row);
        let key = block_key(&self.identity, block);
        let shard = self.cluster.shard_of(&key).unwrap_or_default();
        let why = match problem {
            RowProblem::Missing => {
                format!("is missing on shard {shard} (restarted empty? `engram upload` refills it)")
            }
            RowProblem::Short(n) => format!("on shard {shard} is too short ({n} bytes read)"),
            RowProblem::Tag => format!(
                "on shard {shard} holds row {row} with the wrong tag: another checkpoint's \
                 block, or damaged; refused"
            ),
        };
        EngramError::Other(format!("table `{}`: block `{key}` {why}", self.name))
    }
}

impl TableStore for RedisTable {
    fn name(&self) -> &str {
        &self.name
    }
    fn num_rows(&self) -> u64 {
        self.layout.rows
    }
    fn width(&self) -> usize {
        self.width
    }
    fn dtype(&self) -> RowDtype {
        self.dtype
    }

    fn counters(&self) -> StoreCounters {
        StoreCounters {
            backing_reads: self.round_trips.load(Ordering::Relaxed),
            backing_bytes: self.bytes.load(Ordering::Relaxed),
            ..Default::default()
        }
    }

    fn gather_f32(&self, row_ids: &[u64], out: &mut [f32]) -> Result<()> {
        self.check_gather(row_ids, out.len())?;
        let mut distinct = row_ids.to_vec();
        distinct.sort_unstable();
        distinct.dedup();
        let ops: Vec<Op> = distinct
            .iter()
            .map(|&row| {
                let (block, start, end) = self.layout.locate(row);
                Op::GetRange {
                    key: block_key(&self.identity, block),
                    start,
                    end,
                }
            })
            .collect();
        let read = self.cluster.batch(&self.name, &ops)?;
        self.round_trips
            .fetch_add(read.round_trips, Ordering::Relaxed);
        self.bytes.fetch_add(read.bytes, Ordering::Relaxed);
        let checked = distinct
            .iter()
            .zip(&read.replies)
            .map(|(&row, r)| {
                check_row(&self.identity, &self.layout, row, r).map_err(|p| self.row_error(row, p))
            })
            .collect::<Result<Vec<&[u8]>>>()?;
        // The rows in the caller's order, values and (F8) scales apart, as decoded.
        let (vb, sb) = (
            self.dtype.value_row_bytes(self.width),
            self.dtype.scale_row_bytes(self.width),
        );
        let mut values = Vec::with_capacity(row_ids.len() * vb);
        let mut scales = Vec::with_capacity(row_ids.len() * sb);
        for row in row_ids {
            let i = distinct
                .binary_search(row)
                .expect("every id is in distinct");
            values.extend_from_slice(&checked[i][..vb]);
            scales.extend_from_slice(&checked[i][vb..]);
        }
        engram_cpu::table::decode_stored_rows(
            &self.name, self.dtype, self.width, &values, &scales, out,
        )
    }
}
