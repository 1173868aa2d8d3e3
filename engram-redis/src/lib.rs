//! # engram-redis
//!
//! Engram tables served from a Redis Cluster, for tables that outgrow one host or that
//! many serving hosts share: [`RedisTable`] is a [`TableStore`](engram_core::table::TableStore)
//! like the tables in RAM and memory-mapped files, so the CPU backend and the runtime use
//! it unchanged; [`upload_layer`] loads a checkpoint's table into the cluster (what
//! `engram upload` runs).
//!
//! Rows are stored in blocks keyed by the table's identity and the block's index
//! ([`block`]); a gather is one pipeline per shard, the shards at once, under a deadline
//! ([`cluster`]). Why Redis Cluster rather than Mooncake Store: docs/distributed-store.md.

pub mod block;
pub mod cluster;
pub mod identity;
pub mod table;
#[cfg(feature = "testing")]
pub mod testing;
pub mod upload;

pub use cluster::{ClusterUrl, RedisCluster, ShardStats};
pub use table::RedisTable;
pub use upload::{upload_layer, UploadReport, DEFAULT_BLOCK_ROWS};
