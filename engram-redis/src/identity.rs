//! A table's identity and its manifest in the store.
//!
//! The identity is SHA-256 of the Engram layer's id, the table's row count and width, and
//! every non-table tensor of the layer (name and bytes, in the order
//! [`expected_layer_tensors`] lists them). Those tensors are what a host that serves the
//! table from the store still has on disk, so it can compute the identity without the
//! table; two checkpoints trained apart differ in them. (Two checkpoints with the same
//! layer weights and different tables would share an identity: not a case the training
//! produces, and the row tags still hold each row to its table's bytes as uploaded.)
//!
//! The manifest (JSON at [`crate::block::manifest_key`]) says how the table is stored:
//! tensor names, dtype, shape, rows per block. A host opens a table by its identity: no
//! manifest under it means another checkpoint's rows, or none, are in the store.

use engram_core::checkpoint::{expected_layer_tensors, SafetensorsHeader, TensorKind};
use engram_core::config::EngramConfig;
use engram_core::dtype::RowDtype;
use engram_core::error::{EngramError, Result};
use engram_core::primes::LayerTableLayout;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::block::{BlockLayout, Identity};

/// The identity of layer `layout.layer_id`'s table, from the layer's other tensors in
/// the file `header` describes.
pub fn layer_identity(
    header: &SafetensorsHeader,
    cfg: &EngramConfig,
    layout: &LayerTableLayout,
) -> Result<Identity> {
    let mut h = Sha256::new();
    h.update(b"engram-table-identity-v1\0");
    h.update((layout.layer_id as u64).to_le_bytes());
    h.update(layout.total_rows.to_le_bytes());
    h.update((cfg.head_dim as u64).to_le_bytes());
    for t in expected_layer_tensors(cfg, layout) {
        if t.kind != TensorKind::Weight {
            continue;
        }
        let bytes = header.read_tensor_bytes(&t.name)?;
        h.update((t.name.len() as u64).to_le_bytes());
        h.update(t.name.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    Ok(h.finalize().into())
}

/// How a table is stored; written by the upload after its last block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// The identity, in hex.
    pub identity: String,
    pub layer_id: usize,
    pub tensor: String,
    pub scale_tensor: Option<String>,
    /// [`RowDtype::name`].
    pub dtype: String,
    pub rows: u64,
    pub width: usize,
    pub block_rows: u32,
}

/// The manifest format this crate writes and reads.
pub const MANIFEST_FORMAT: u32 = 1;

impl Manifest {
    pub fn dtype(&self) -> Result<RowDtype> {
        [
            RowDtype::F32,
            RowDtype::BF16,
            RowDtype::F16,
            RowDtype::F8E4M3Scaled,
        ]
        .into_iter()
        .find(|d| d.name() == self.dtype)
        .ok_or_else(|| {
            EngramError::Other(format!(
                "the store's manifest of table `{}` has an unknown dtype `{}`",
                self.tensor, self.dtype
            ))
        })
    }

    pub fn layout(&self) -> Result<BlockLayout> {
        Ok(BlockLayout {
            rows: self.rows,
            block_rows: self.block_rows,
            row_bytes: self.dtype()?.row_bytes(self.width),
        })
    }

    /// Checks the manifest against the table the config expects for `layout`'s layer.
    pub fn check(
        &self,
        identity: &Identity,
        cfg: &EngramConfig,
        layout: &LayerTableLayout,
    ) -> Result<()> {
        let fail = |why: String| {
            Err(EngramError::Other(format!(
                "the store's manifest of Engram layer {}'s table `{}` {why}",
                layout.layer_id, self.tensor
            )))
        };
        if self.format != MANIFEST_FORMAT {
            return fail(format!(
                "has format {}, this build reads {MANIFEST_FORMAT}",
                self.format
            ));
        }
        if self.identity != hex::encode(identity) {
            return fail("belongs to another checkpoint (identity differs)".into());
        }
        if (self.layer_id, self.rows, self.width)
            != (layout.layer_id, layout.total_rows, cfg.head_dim)
        {
            return fail(format!(
                "is for layer {} with {} rows x {} columns; the config expects layer {} with {} x {}",
                self.layer_id, self.rows, self.width, layout.layer_id, layout.total_rows, cfg.head_dim
            ));
        }
        if self.block_rows == 0 {
            return fail("has 0 rows per block".into());
        }
        self.dtype().map(|_| ())
    }
}
