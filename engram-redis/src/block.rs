//! How a table's rows are laid out in the store: blocks of consecutive rows, one key
//! each, named by the table's identity and the block's index.
//!
//! A block is a 64-byte header (magic, the table's identity, the block's index, its row
//! count and row size, a checksum of the rest) followed by its rows, each row's stored
//! bytes (values, then F8 scales) followed by an 8-byte tag: XXH3-64 of the row, seeded
//! with the table's identity and the row's id. A gather reads single rows out of blocks
//! (`GETRANGE`), so each row carries its own check: a row whose tag does not match was
//! written for another table, another row, or was damaged, and is refused rather than
//! used. The header's checksum is what `engram upload` compares to skip a block already
//! there.

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// Bytes of a block's header.
pub const HEADER_BYTES: usize = 64;
/// Bytes of the tag after each row.
pub const TAG_BYTES: usize = 8;
const MAGIC: &[u8; 8] = b"ENGRAMB1";

/// A table's identity: SHA-256 of what tells one checkpoint's table from another's
/// ([`crate::identity`]).
pub type Identity = [u8; 32];

/// Where a table's blocks lie: rows per block and bytes per row.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockLayout {
    pub rows: u64,
    pub block_rows: u32,
    pub row_bytes: usize,
}

impl BlockLayout {
    pub fn blocks(&self) -> u64 {
        self.rows.div_ceil(self.block_rows as u64)
    }

    /// Bytes of one row in a block: the row, then its tag.
    pub fn stride(&self) -> usize {
        self.row_bytes + TAG_BYTES
    }

    /// Rows in block `block` (the last may be short).
    pub fn rows_in(&self, block: u64) -> u32 {
        let start = block * self.block_rows as u64;
        (self.rows - start).min(self.block_rows as u64) as u32
    }

    /// The block holding `row` and the byte range (inclusive end, as `GETRANGE` takes it)
    /// of the row and its tag in that block.
    pub fn locate(&self, row: u64) -> (u64, u64, u64) {
        let block = row / self.block_rows as u64;
        let start = (HEADER_BYTES + (row % self.block_rows as u64) as usize * self.stride()) as u64;
        (block, start, start + self.stride() as u64 - 1)
    }
}

/// The key prefix of a table's blocks: `engram:` and the first 16 bytes of its identity
/// in hex. No hash tag, so a table's blocks spread over every shard of the cluster.
pub fn key_prefix(identity: &Identity) -> String {
    format!("engram:{}", hex::encode(&identity[..16]))
}

/// The key of block `block` of the table `identity`.
pub fn block_key(identity: &Identity, block: u64) -> String {
    format!("{}:{block}", key_prefix(identity))
}

/// The key of the table's manifest ([`crate::identity::Manifest`]).
pub fn manifest_key(identity: &Identity) -> String {
    format!("{}:manifest", key_prefix(identity))
}

/// The tag of row `row` of the table `identity` holding `bytes`.
pub fn row_tag(identity: &Identity, row: u64, bytes: &[u8]) -> u64 {
    let seed = u64::from_le_bytes(identity[..8].try_into().expect("8 bytes"));
    // An odd multiplier spreads consecutive ids over the whole seed space.
    xxh3_64_with_seed(bytes, seed ^ row.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Checks a row read from a block: its length and its tag. `Ok(row bytes)`.
pub fn check_row<'a>(
    identity: &Identity,
    layout: &BlockLayout,
    row: u64,
    read: &'a [u8],
) -> Result<&'a [u8], RowProblem> {
    if read.is_empty() {
        return Err(RowProblem::Missing);
    }
    if read.len() != layout.stride() {
        return Err(RowProblem::Short(read.len()));
    }
    let (bytes, tag) = read.split_at(layout.row_bytes);
    let tag = u64::from_le_bytes(tag.try_into().expect("TAG_BYTES"));
    if tag != row_tag(identity, row, bytes) {
        return Err(RowProblem::Tag);
    }
    Ok(bytes)
}

/// Why a row read from a block was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum RowProblem {
    /// The block's key does not exist (a shard restarted empty, an upload not finished).
    Missing,
    /// The block is shorter than the row's place in it.
    Short(usize),
    /// The row's tag does not match: another table's (checkpoint's) row, or damaged.
    Tag,
}

/// Builds block `block`: its header, then each of `rows` (`rows_in(block)` rows of
/// `row_bytes` bytes, one after another) with its tag.
pub fn encode_block(identity: &Identity, layout: &BlockLayout, block: u64, rows: &[u8]) -> Vec<u8> {
    let n = layout.rows_in(block) as usize;
    assert_eq!(rows.len(), n * layout.row_bytes, "rows of block {block}");
    let first = block * layout.block_rows as u64;
    let mut out = vec![0u8; HEADER_BYTES];
    out.reserve(n * layout.stride());
    for (i, row) in rows
        .chunks_exact(layout.row_bytes.max(1))
        .enumerate()
        .take(n)
    {
        out.extend_from_slice(row);
        out.extend_from_slice(&row_tag(identity, first + i as u64, row).to_le_bytes());
    }
    let header = encode_header(identity, layout, block, xxh3_64(&out[HEADER_BYTES..]));
    out[..HEADER_BYTES].copy_from_slice(&header);
    out
}

/// The header of block `block` holding a body whose XXH3-64 is `body_hash`.
pub fn encode_header(
    identity: &Identity,
    layout: &BlockLayout,
    block: u64,
    body_hash: u64,
) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[..8].copy_from_slice(MAGIC);
    h[8..40].copy_from_slice(identity);
    h[40..48].copy_from_slice(&block.to_le_bytes());
    h[48..52].copy_from_slice(&layout.rows_in(block).to_le_bytes());
    h[52..56].copy_from_slice(&(layout.row_bytes as u32).to_le_bytes());
    h[56..64].copy_from_slice(&body_hash.to_le_bytes());
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAYOUT: BlockLayout = BlockLayout {
        rows: 10,
        block_rows: 4,
        row_bytes: 3,
    };

    #[test]
    fn rows_are_found_in_their_block_and_checked() {
        let id = [7u8; 32];
        assert_eq!((LAYOUT.blocks(), LAYOUT.rows_in(2)), (3, 2));
        let rows: Vec<u8> = (0..6).collect(); // rows 8 and 9
        let block = encode_block(&id, &LAYOUT, 2, &rows);
        assert_eq!(block.len(), HEADER_BYTES + 2 * LAYOUT.stride());
        let (b, start, end) = LAYOUT.locate(9);
        assert_eq!((b, start), (2, (HEADER_BYTES + LAYOUT.stride()) as u64));
        let read = &block[start as usize..=end as usize];
        assert_eq!(check_row(&id, &LAYOUT, 9, read), Ok(&[3u8, 4, 5][..]));
        // The same bytes are refused as another row, for another table, damaged, or absent.
        assert_eq!(check_row(&id, &LAYOUT, 8, read), Err(RowProblem::Tag));
        assert_eq!(check_row(&[8; 32], &LAYOUT, 9, read), Err(RowProblem::Tag));
        let mut bad = read.to_vec();
        bad[1] ^= 1;
        assert_eq!(check_row(&id, &LAYOUT, 9, &bad), Err(RowProblem::Tag));
        assert_eq!(
            check_row(&id, &LAYOUT, 9, &read[..5]),
            Err(RowProblem::Short(5))
        );
        assert_eq!(check_row(&id, &LAYOUT, 9, &[]), Err(RowProblem::Missing));
        // The header names the table and block, and changes with the body.
        assert_eq!(&block[8..40], &id);
        let other = encode_block(&id, &LAYOUT, 2, &[0, 1, 2, 3, 4, 6]);
        assert_ne!(block[..HEADER_BYTES], other[..HEADER_BYTES]);
        assert!(block_key(&id, 2).starts_with("engram:0707") && block_key(&id, 2).ends_with(":2"));
    }
}
