//! Row decoding and the (optionally multi-threaded) gather driver.
//!
//! Decoding works on plain byte slices (the stored rows and, for V4.1, the scales), so
//! memory-mapped and in-RAM tables share one code path.

use std::sync::LazyLock;

use engram_core::dtype::{bf16_bits_to_f32, e8m0_to_f32, f8e4m3_to_f32, round_bf16, RowDtype};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// FP8 E4M3 byte -> f32, exactly [`f8e4m3_to_f32`].
static E4M3_LUT: LazyLock<[f32; 256]> =
    LazyLock::new(|| std::array::from_fn(|b| f8e4m3_to_f32(b as u8)));
/// E8M0 scale byte -> 2^(b-127), exactly [`e8m0_to_f32`].
static E8M0_LUT: LazyLock<[f32; 256]> =
    LazyLock::new(|| std::array::from_fn(|b| e8m0_to_f32(b as u8)));

/// Columns sharing one E8M0 scale: the core's
/// [`FP8_SCALE_BLOCK`](engram_core::dtype::FP8_SCALE_BLOCK), under the name this
/// crate has always exported.
pub use engram_core::dtype::FP8_SCALE_BLOCK as SCALE_BLOCK;

/// The stored rows of a table, borrowed: what every gather reads.
#[derive(Clone, Copy)]
pub(crate) struct Rows<'a> {
    pub dtype: RowDtype,
    pub width: usize,
    /// Rows in the table: ids at or past it are refused.
    pub rows: u64,
    /// `[rows, width]` elements of the stored type (F8: one byte each).
    pub values: &'a [u8],
    /// F8 only: `[rows, ceil(width / SCALE_BLOCK)]` E8M0 bytes.
    pub scales: &'a [u8],
}

impl Rows<'_> {
    /// Bytes of one row of values (scales excluded).
    pub fn value_row_bytes(&self) -> usize {
        self.dtype.value_row_bytes(self.width)
    }

    /// Bytes of one row's scales (0 unless F8).
    pub fn scale_row_bytes(&self) -> usize {
        self.dtype.scale_row_bytes(self.width)
    }

    /// Asks the CPU to start loading the row [`prefetch_distance`] positions further down
    /// `ids` (rows of `value_bytes` bytes, a constant where the caller's loop has one), so
    /// many random rows are in flight at once instead of one DRAM latency per row.
    #[inline(always)]
    fn prefetch_ahead(&self, ids: &[u64], i: usize, value_bytes: usize) {
        if let Some(&row) = ids.get(i + prefetch_distance(value_bytes)) {
            let start = row as usize * value_bytes;
            if let Some(bytes) = self.values.get(start..).and_then(|r| r.get(..value_bytes)) {
                prefetch_lines(bytes);
            }
            let sn = self.scale_row_bytes();
            if let Some(bytes) = self.scales.get(row as usize * sn..(row as usize + 1) * sn) {
                prefetch_lines(bytes);
            }
        }
    }

    fn value_row(&self, row: u64) -> &[u8] {
        let n = self.value_row_bytes();
        let start = row as usize * n;
        &self.values[start..start + n]
    }

    fn scale_row(&self, row: u64) -> &[u8] {
        let n = self.scale_row_bytes();
        let start = row as usize * n;
        &self.scales[start..start + n]
    }

    /// Calls `copy(row, dst)` for each id of `ids` and its `per_row`-element slice of
    /// `out`, prefetching rows ahead. Ids are checked a block at a time, just before the
    /// block is copied, so the check costs no extra pass over them: the first block with
    /// an id past the table stops the copy with that id (earlier blocks stay written).
    #[inline(always)]
    fn for_each_row<T>(
        &self,
        ids: &[u64],
        out: &mut [T],
        per_row: usize,
        value_bytes: usize,
        mut copy: impl FnMut(u64, &mut [T]),
    ) -> Result<(), u64> {
        let blocks = ids
            .chunks(CHECK_BLOCK)
            .zip(out.chunks_mut(CHECK_BLOCK * per_row));
        for (b, (block_ids, block_out)) in blocks.enumerate() {
            self.check_block(block_ids)?;
            let rows = block_out.chunks_exact_mut(per_row).zip(block_ids);
            for (i, (dst, &row)) in rows.enumerate() {
                self.prefetch_ahead(ids, b * CHECK_BLOCK + i, value_bytes);
                copy(row, dst);
            }
        }
        Ok(())
    }

    /// `Err(id)` for the largest id of `block` when it is past the table (a maximum, as it
    /// vectorizes where a search would not).
    #[inline(always)]
    fn check_block(&self, block: &[u64]) -> Result<(), u64> {
        match block.iter().copied().max() {
            Some(max) if max >= self.rows => Err(max),
            _ => Ok(()),
        }
    }

    /// Decodes rows `ids` into `out` (`[ids.len(), width]`); `Err(id)` for an id past the
    /// table. F32 rows are written with `stores`; the converting dtypes use cached stores.
    pub fn decode(&self, ids: &[u64], out: &mut [f32], stores: OutputStores) -> Result<(), u64> {
        let (w, vb) = (self.width, self.value_row_bytes());
        match self.dtype {
            RowDtype::F32 if cfg!(target_endian = "little") => {
                // SAFETY: `out` is `4 * out.len()` initialized bytes and any bytes written
                // make valid f32s; the f32 view is not used while this one lives.
                let bytes = unsafe {
                    std::slice::from_raw_parts_mut(
                        out.as_mut_ptr().cast::<u8>(),
                        std::mem::size_of_val(out),
                    )
                };
                self.copy_value_rows(ids, bytes, stores)
            }
            RowDtype::F32 => self.for_each_row(ids, out, w, vb, |row, dst| {
                for (o, b) in dst.iter_mut().zip(self.value_row(row).chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }),
            RowDtype::BF16 => self.for_each_row(ids, out, w, vb, |row, dst| {
                for (o, b) in dst.iter_mut().zip(self.value_row(row).chunks_exact(2)) {
                    *o = bf16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
                }
            }),
            RowDtype::F16 => {
                // Aligned halves, then half's vectorized (F16C where present) conversion.
                let mut halves = vec![f16::ZERO; w];
                self.for_each_row(ids, out, w, vb, |row, dst| {
                    for (h, b) in halves.iter_mut().zip(self.value_row(row).chunks_exact(2)) {
                        *h = f16::from_bits(u16::from_le_bytes([b[0], b[1]]));
                    }
                    halves.convert_to_f32_slice(dst);
                })
            }
            RowDtype::F8E4M3Scaled => {
                let (e4m3, e8m0) = (&*E4M3_LUT, &*E8M0_LUT);
                self.for_each_row(ids, out, w, vb, |row, dst| {
                    let blocks = dst
                        .chunks_mut(SCALE_BLOCK)
                        .zip(self.value_row(row).chunks(SCALE_BLOCK))
                        .zip(self.scale_row(row));
                    for ((o, v), &s) in blocks {
                        let scale = e8m0[s as usize];
                        if exact_block(s, v) {
                            for (o, &b) in o.iter_mut().zip(v) {
                                *o = e4m3[b as usize] * scale;
                            }
                        } else {
                            for (o, &b) in o.iter_mut().zip(v) {
                                *o = round_bf16(e4m3[b as usize] * scale);
                            }
                        }
                    }
                })
            }
        }
    }

    /// Copies rows `ids` in their stored format into `out`
    /// (`[ids.len(), value_row_bytes + scale_row_bytes]`: each row's values, then its
    /// scales), the values with `stores`; `Err(id)` for an id past the table.
    pub fn copy_raw(&self, ids: &[u64], out: &mut [u8], stores: OutputStores) -> Result<(), u64> {
        let (vb, sb) = (self.value_row_bytes(), self.scale_row_bytes());
        if sb == 0 {
            return self.copy_value_rows(ids, out, stores);
        }
        self.for_each_row(ids, out, vb + sb, vb, |row, dst| {
            dst[..vb].copy_from_slice(self.value_row(row));
            dst[vb..].copy_from_slice(self.scale_row(row));
        })
    }

    /// Copies rows of a table without scales, as stored, into `out`
    /// (`[ids.len(), value_row_bytes]`) with `stores`; `Err(id)` for an id past the table.
    /// Common row sizes get a loop of their own with the size known at compile time:
    /// 128-byte rows were gathered about 20% faster that way than through one loop over a
    /// size known only at run time (streaming stores, table 4x the L3).
    fn copy_value_rows(
        &self,
        ids: &[u64],
        out: &mut [u8],
        stores: OutputStores,
    ) -> Result<(), u64> {
        let done = match self.value_row_bytes() {
            64 => self.copy_rows_of::<64>(ids, out, stores),
            128 => self.copy_rows_of::<128>(ids, out, stores),
            256 => self.copy_rows_of::<256>(ids, out, stores),
            512 => self.copy_rows_of::<512>(ids, out, stores),
            1024 => self.copy_rows_of::<1024>(ids, out, stores),
            n => self.copy_rows_sized(n, ids, out, stores),
        };
        stores.finish();
        done
    }

    fn copy_rows_of<const ROW_BYTES: usize>(
        &self,
        ids: &[u64],
        out: &mut [u8],
        stores: OutputStores,
    ) -> Result<(), u64> {
        self.copy_rows_sized(ROW_BYTES, ids, out, stores)
    }

    /// The loop of [`Self::copy_value_rows`] for rows of `n` bytes; inlined, so a
    /// constant `n` unrolls the copy and the prefetch.
    #[inline(always)]
    fn copy_rows_sized(
        &self,
        n: usize,
        ids: &[u64],
        out: &mut [u8],
        stores: OutputStores,
    ) -> Result<(), u64> {
        // Not `for_each_row`: this loop, with the row's prefetch written out, measured
        // 10-30% faster at 128-byte rows (0.91-1.17x memcpy against 0.74-0.99x; the gather
        // on 2 threads, memcpy on 1, as `engram bench` compared them before 94cfd4c).
        let blocks = ids.chunks(CHECK_BLOCK).zip(out.chunks_mut(CHECK_BLOCK * n));
        for (b, (block_ids, block_out)) in blocks.enumerate() {
            self.check_block(block_ids)?;
            let rows = block_out.chunks_exact_mut(n).zip(block_ids);
            for (i, (dst, &row)) in rows.enumerate() {
                if let Some(&ahead) = ids.get(b * CHECK_BLOCK + i + prefetch_distance(n)) {
                    let ahead = ahead as usize * n;
                    if let Some(bytes) = self.values.get(ahead..).and_then(|r| r.get(..n)) {
                        prefetch_lines(bytes);
                    }
                }
                let start = row as usize * n;
                stores.copy(&self.values[start..start + n], dst);
            }
        }
        Ok(())
    }
}

/// Ids checked at once before their rows are copied: small enough to stay in L1 between
/// the check and the copy.
const CHECK_BLOCK: usize = 256;

/// Rows requested ahead of the one being copied, for rows of `row_bytes`: enough to cover
/// DRAM latency, 4 KiB of rows (32 rows of 128 bytes) and 4 to 32 rows. Into L2 (T1),
/// which has room for more misses in flight than L1's fill buffers: measured here (random
/// 128-byte rows, table 4x the L3) about 0.75x memcpy against 0.65x with T0 at 16 rows
/// (gather on 2 threads, memcpy on 1).
/// A fixed 32 rows put 512 lines in flight for 1 KiB rows, more than L2 tracks.
#[inline(always)]
fn prefetch_distance(row_bytes: usize) -> usize {
    (PREFETCH_BYTES / row_bytes.max(1)).clamp(4, 32)
}

const PREFETCH_BYTES: usize = 4096;

/// Prefetch hints for every cache line of `bytes` (no-op off x86-64).
#[inline(always)]
fn prefetch_lines(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for k in (0..bytes.len()).step_by(64) {
        // SAFETY: a prefetch hint on an address inside a live slice; it never faults.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                bytes.as_ptr().add(k).cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// Whether a block of [`SCALE_BLOCK`] columns needs no rounding: its products `e4m3 * 2^(s-127)` are
/// exact f32 with at most 4 significant bits, hence exact in bf16 (`round_bf16` is the
/// identity). True when no value is a NaN code and the scale keeps every product normal:
/// e4m3 magnitudes lie in [2^-9, 448 < 2^9], so s - 136 >= -126 and s - 118 <= 128.
#[inline]
fn exact_block(scale: u8, values: &[u8]) -> bool {
    (10..=246).contains(&scale) && !values.iter().any(|&b| b & 0x7f == 0x7f)
}

/// How a gather writes its output rows (public so that `engram bench` can copy with the
/// same stores for its memcpy baseline).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputStores {
    /// Ordinary stores: the output stays in cache for whoever reads it next (one step's
    /// rows, read by the gate right after).
    Cached,
    /// Non-temporal stores, straight to memory. For outputs larger than the largest cache,
    /// which could not stay cached anyway: an ordinary store first reads each output line
    /// from memory (write-allocate), so a gather moves 3 bytes per byte copied instead of 2.
    /// glibc's memcpy does the same above its non-temporal threshold (derived from the
    /// shared cache size it detects: 192 MiB on a 32 MiB-L3 VM, so not for every copy
    /// this large). Measured (`engram bench`: random 128-byte
    /// rows, table 4x the L3, 600 MB out, 5 runs each; gather on 2 threads, memcpy on 1):
    /// 0.91-1.15x memcpy, against 0.66-0.83x with ordinary stores (docs/benchmarks.md).
    Streaming,
}

impl OutputStores {
    /// The stores for an output of `out` with rows of `row_bytes` bytes: streaming when it
    /// is larger than the largest cache and every row starts 16-byte aligned (which the
    /// stores need), else cached.
    pub fn for_output<T>(out: &[T], row_bytes: usize) -> Self {
        let aligned = (out.as_ptr() as usize).is_multiple_of(STREAM_ALIGN)
            && row_bytes.is_multiple_of(STREAM_ALIGN);
        if cfg!(target_arch = "x86_64")
            && aligned
            && std::mem::size_of_val(out) > crate::cache_size::largest_cache_bytes()
        {
            OutputStores::Streaming
        } else {
            OutputStores::Cached
        }
    }

    /// Copies `src` into `dst` (same length). A `dst` that is not 16-byte aligned and a
    /// multiple of 16 long is copied with ordinary stores.
    #[inline(always)]
    pub fn copy(self, src: &[u8], dst: &mut [u8]) {
        debug_assert_eq!(src.len(), dst.len());
        #[cfg(target_arch = "x86_64")]
        if self == OutputStores::Streaming
            && (dst.as_ptr() as usize).is_multiple_of(STREAM_ALIGN)
            && dst.len().is_multiple_of(STREAM_ALIGN)
            && src.len() == dst.len()
        {
            use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_stream_si128};
            let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
            let stream16 = |k: usize| {
                // SAFETY: SSE2 is part of x86-64; callers pass `k + 16 <= len` for both
                // slices (same length), and `d + k` is 16-byte aligned (`d` is, checked
                // above, and `k` is a multiple of 16), as the streaming store requires.
                unsafe {
                    let v = _mm_loadu_si128(s.add(k).cast::<__m128i>());
                    _mm_stream_si128(d.add(k).cast::<__m128i>(), v);
                }
            };
            // Whole 64-byte lines, four stores each, then any 16-byte tail.
            let lines = dst.len() / 64;
            for line in 0..lines {
                for j in 0..4 {
                    stream16(64 * line + 16 * j);
                }
            }
            for k in (64 * lines..dst.len()).step_by(16) {
                stream16(k);
            }
            return;
        }
        dst.copy_from_slice(src);
    }

    /// Orders this thread's streaming stores before its later stores (the pool's
    /// completion signal), so whoever joins the gather reads the rows written.
    #[inline]
    pub fn finish(self) {
        #[cfg(target_arch = "x86_64")]
        if self == OutputStores::Streaming {
            // SAFETY: a store fence has no preconditions.
            unsafe { std::arch::x86_64::_mm_sfence() };
        }
    }
}

/// Alignment and granularity of the streaming stores (SSE2, 16 bytes).
const STREAM_ALIGN: usize = 16;

/// Runs `work(ids_chunk, out_chunk)` over `ids` and the matching `per_row`-element slices
/// of `out`: on the calling thread when the gather moves fewer than `parallel_min_bytes`
/// (handing work to other threads costs more than copying a few rows), else in chunks
/// on rayon's pool, several per thread so that slow rows (page faults) balance out.
/// Stops at the first chunk that fails, with its error.
pub(crate) fn run_chunked<T: Send>(
    ids: &[u64],
    out: &mut [T],
    per_row: usize,
    moved_row_bytes: usize,
    parallel_min_bytes: usize,
    work: impl Fn(&[u64], &mut [T]) -> Result<(), u64> + Sync,
) -> Result<(), u64> {
    let threads = rayon::current_num_threads();
    if threads <= 1
        || ids.len() < 2
        || ids.len().saturating_mul(moved_row_bytes) < parallel_min_bytes
    {
        return work(ids, out);
    }
    let chunk_rows = ids.len().div_ceil(threads * 4).max(MIN_CHUNK_ROWS);
    ids.par_chunks(chunk_rows)
        .zip(out.par_chunks_mut(chunk_rows * per_row))
        .try_for_each(|(ids, out)| work(ids, out))
}

/// Fewest rows one parallel task gathers.
const MIN_CHUNK_ROWS: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    /// `rows` f32 rows of `width` columns, row r column c = r * 1000 + c, as stored bytes.
    fn f32_table(rows: usize, width: usize) -> Vec<u8> {
        (0..rows * width)
            .flat_map(|i| ((i / width * 1000 + i % width) as f32).to_le_bytes())
            .collect()
    }

    /// A `len`-element f32 buffer whose first element sits `offset` bytes past a 64-byte
    /// boundary.
    fn buffer_at(storage: &mut Vec<f32>, len: usize, offset: usize) -> &mut [f32] {
        storage.clear();
        storage.resize(len + 32, f32::NAN);
        let base = storage.as_ptr() as usize;
        let skip = ((64 - base % 64) % 64 + offset) / 4;
        &mut storage[skip..skip + len]
    }

    /// Streaming and cached stores give the same rows, for row sizes with a loop of their
    /// own (64, 128 bytes) and without (48, 96: a 16-byte tail; 20: not a multiple of 16,
    /// so cached stores), into aligned and unaligned outputs, across check blocks.
    #[test]
    fn streaming_stores_copy_the_same_rows() {
        let ids: Vec<u64> = (0..CHECK_BLOCK as u64 * 3 + 7)
            .map(|i| (i * 7919) % 500)
            .collect();
        let mut storage = Vec::new();
        for width in [5usize, 12, 16, 24, 32] {
            let values = f32_table(500, width);
            let rows = Rows {
                dtype: RowDtype::F32,
                width,
                rows: 500,
                values: &values,
                scales: &[],
            };
            let expected: Vec<f32> = ids
                .iter()
                .flat_map(|&r| (0..width).map(move |c| (r as usize * 1000 + c) as f32))
                .collect();
            for offset in [0usize, 4, 16, 32] {
                for stores in [OutputStores::Cached, OutputStores::Streaming] {
                    let out = buffer_at(&mut storage, ids.len() * width, offset);
                    rows.decode(&ids, out, stores).unwrap();
                    assert_eq!(
                        out,
                        &expected[..],
                        "width {width} offset {offset} {stores:?}"
                    );
                    let mut raw = vec![0u8; ids.len() * 4 * width];
                    rows.copy_raw(&ids, &mut raw, stores).unwrap();
                    let raw: Vec<f32> = raw
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect();
                    assert_eq!(raw, expected, "raw, width {width} {stores:?}");
                }
            }
        }
    }

    /// An id past the table is reported wherever it falls, here in a later check block,
    /// for every dtype's loop.
    #[test]
    fn an_id_past_the_table_stops_the_gather() {
        let mut ids: Vec<u64> = (0..CHECK_BLOCK as u64 * 2).map(|i| i % 10).collect();
        ids[CHECK_BLOCK + 3] = 10;
        // Room for 10 rows of any dtype.
        let values = vec![0u8; 10 * 32 * 4];
        let scales = vec![127u8; 10];
        for dtype in [
            RowDtype::F32,
            RowDtype::BF16,
            RowDtype::F16,
            RowDtype::F8E4M3Scaled,
        ] {
            let rows = Rows {
                dtype,
                width: 32,
                rows: 10,
                values: &values,
                scales: if dtype == RowDtype::F8E4M3Scaled {
                    &scales
                } else {
                    &[]
                },
            };
            let mut out = vec![0f32; ids.len() * 32];
            assert_eq!(
                rows.decode(&ids, &mut out, OutputStores::Cached),
                Err(10),
                "{dtype:?}"
            );
            let mut raw =
                vec![0u8; ids.len() * rows.value_row_bytes() + ids.len() * rows.scale_row_bytes()];
            assert_eq!(
                rows.copy_raw(&ids, &mut raw, OutputStores::Streaming),
                Err(10),
                "{dtype:?}"
            );
        }
    }

    /// The unrounded path is taken only where it equals the rounded one, bit for bit:
    /// every scale byte against every value byte.
    #[test]
    fn exact_blocks_need_no_rounding() {
        for scale in 0..=255u8 {
            for b in 0..=255u8 {
                let product = E4M3_LUT[b as usize] * E8M0_LUT[scale as usize];
                if exact_block(scale, &[b]) {
                    assert_eq!(
                        product.to_bits(),
                        round_bf16(product).to_bits(),
                        "{scale} {b}"
                    );
                }
            }
        }
        assert!(exact_block(127, &[0x38; 32]) && !exact_block(127, &[0x38, 0xff]));
        assert!(!exact_block(9, &[0]) && !exact_block(247, &[0]));
    }
}
