//! Tables served from a distributed store instead of the checkpoint's file:
//! `ENGRAM_TABLES=redis://host:port[,host:port...]` (or [`OpenOptions::remote_tables`])
//! reads every layer's table from a Redis Cluster that `engram upload` filled
//! ([`engram_redis`]). The checkpoint's file still gives the layers' weights, and with
//! them the tables' identity; the tables themselves need not be in it.

use std::path::Path;
use std::sync::Arc;

use engram_core::checkpoint::SafetensorsHeader;
use engram_core::config::EngramConfig;
use engram_core::primes::LayerTableLayout;
use engram_core::table::TableStore;
use engram_redis::{ClusterUrl, RedisCluster, RedisTable};

use crate::error::Result;
#[cfg(doc)]
use crate::OpenOptions;

/// Connects to the cluster `url` names (one connection per shard, shared by the tables).
pub fn connect(url: &ClusterUrl) -> Result<Arc<RedisCluster>> {
    Ok(Arc::new(RedisCluster::connect(url.clone())?))
}

/// Layer `layout.layer_id`'s table in `cluster`, identified by the layer's weights in
/// the safetensors file `file`.
pub fn open_table(
    cluster: &Arc<RedisCluster>,
    file: &Path,
    cfg: &EngramConfig,
    layout: &LayerTableLayout,
) -> Result<Arc<dyn TableStore>> {
    let header = SafetensorsHeader::read_file(file)?;
    Ok(Arc::new(RedisTable::open_layer(
        cluster.clone(),
        &header,
        cfg,
        layout,
    )?))
}
