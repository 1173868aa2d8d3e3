//! Loading a checkpoint's table into the cluster, resumably: a block already in the
//! store with the header this upload would write (same table, block, rows and body
//! checksum) is skipped, so a second run after an interruption, or after a shard came
//! back empty, writes only what is missing. The manifest goes in last: a table whose
//! upload did not finish cannot be opened.

use engram_core::checkpoint::{SafetensorsHeader, TableSpec};
use engram_core::config::EngramConfig;
use engram_core::error::Result;
use engram_core::primes::LayerTableLayout;
use engram_core::table::TableStore;
use engram_cpu::CpuTable;

use crate::block::{block_key, encode_block, manifest_key, BlockLayout, HEADER_BYTES};
use crate::cluster::{Op, RedisCluster};
use crate::identity::{layer_identity, Manifest, MANIFEST_FORMAT};

/// Rows per block unless told otherwise: 256 rows of the demo's 256-byte rows make
/// 66 KiB values, few enough keys for a table of millions of rows.
pub const DEFAULT_BLOCK_ROWS: u32 = 256;
/// Blocks compared and written per batch.
const BATCH_BLOCKS: u64 = 64;

/// What an upload did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct UploadReport {
    pub blocks: u64,
    /// Blocks written (missing or different).
    pub written: u64,
    /// Blocks already there, unchanged.
    pub skipped: u64,
    pub bytes_written: u64,
}

/// Uploads layer `layout.layer_id`'s table (`spec`, in the file `header` describes) in
/// blocks of `block_rows` rows; `progress(n)` after each batch of `n` blocks.
pub fn upload_layer(
    cluster: &RedisCluster,
    header: &SafetensorsHeader,
    cfg: &EngramConfig,
    layout: &LayerTableLayout,
    spec: &TableSpec,
    block_rows: u32,
    mut progress: impl FnMut(u64),
) -> Result<UploadReport> {
    let identity = layer_identity(header, cfg, layout)?;
    let table = CpuTable::open_mmap(header.path(), spec)?;
    let blocks = BlockLayout {
        rows: spec.rows,
        block_rows: block_rows.max(1),
        row_bytes: table.row_bytes(),
    };
    let what = table.name().to_string();
    let mut report = UploadReport {
        blocks: blocks.blocks(),
        ..Default::default()
    };
    let mut raw = Vec::new();
    for first in (0..blocks.blocks()).step_by(BATCH_BLOCKS as usize) {
        let batch: Vec<u64> = (first..(first + BATCH_BLOCKS).min(blocks.blocks())).collect();
        let encoded = batch
            .iter()
            .map(|&b| {
                let start = b * blocks.block_rows as u64;
                let ids: Vec<u64> = (start..start + blocks.rows_in(b) as u64).collect();
                raw.resize(ids.len() * blocks.row_bytes, 0);
                table.gather_raw(&ids, &mut raw)?;
                Ok(encode_block(&identity, &blocks, b, &raw))
            })
            .collect::<Result<Vec<_>>>()?;
        let heads: Vec<Op> = batch
            .iter()
            .map(|&b| Op::GetRange {
                key: block_key(&identity, b),
                start: 0,
                end: HEADER_BYTES as u64 - 1,
            })
            .collect();
        let there = cluster.batch(&what, &heads)?.replies;
        let writes: Vec<Op> = batch
            .iter()
            .zip(encoded)
            .zip(&there)
            .filter(|((_, block), head)| head.as_slice() != &block[..HEADER_BYTES])
            .map(|((&b, block), _)| Op::Set {
                key: block_key(&identity, b),
                value: block,
            })
            .collect();
        report.skipped += (batch.len() - writes.len()) as u64;
        report.written += writes.len() as u64;
        report.bytes_written += writes
            .iter()
            .map(|w| match w {
                Op::Set { value, .. } => value.len() as u64,
                _ => 0,
            })
            .sum::<u64>();
        if !writes.is_empty() {
            cluster.batch(&what, &writes)?;
        }
        progress(batch.len() as u64);
    }
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        identity: hex::encode(identity),
        layer_id: layout.layer_id,
        tensor: spec.tensor.clone(),
        scale_tensor: spec.scale_tensor.clone(),
        dtype: spec.dtype.name().to_string(),
        rows: spec.rows,
        width: spec.width,
        block_rows: blocks.block_rows,
    };
    let json = serde_json::to_vec(&manifest).expect("a manifest serializes");
    cluster.batch(
        &what,
        &[Op::Set {
            key: manifest_key(&identity),
            value: json,
        }],
    )?;
    Ok(report)
}
