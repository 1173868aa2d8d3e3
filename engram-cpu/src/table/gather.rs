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

/// Columns sharing one E8M0 scale.
pub const SCALE_BLOCK: usize = 32;

/// The stored rows of a table, borrowed: what every gather reads.
#[derive(Clone, Copy)]
pub(crate) struct Rows<'a> {
    pub dtype: RowDtype,
    pub width: usize,
    /// `[rows, width]` elements of the stored type (F8: one byte each).
    pub values: &'a [u8],
    /// F8 only: `[rows, ceil(width / 32)]` E8M0 bytes.
    pub scales: &'a [u8],
}

impl Rows<'_> {
    /// Bytes of one row of values (scales excluded).
    pub fn value_row_bytes(&self) -> usize {
        match self.dtype {
            RowDtype::F32 => 4 * self.width,
            RowDtype::BF16 | RowDtype::F16 => 2 * self.width,
            RowDtype::F8E4M3Scaled => self.width,
        }
    }

    /// Bytes of one row's scales (0 unless F8).
    pub fn scale_row_bytes(&self) -> usize {
        match self.dtype {
            RowDtype::F8E4M3Scaled => self.width.div_ceil(SCALE_BLOCK),
            _ => 0,
        }
    }

    /// Asks the CPU to start loading the row `ahead` positions further down `ids`, so
    /// many random rows are in flight at once instead of one DRAM latency per row.
    #[inline(always)]
    fn prefetch_ahead(&self, ids: &[u64], i: usize) {
        if let Some(&row) = ids.get(i + PREFETCH_DISTANCE) {
            let n = self.value_row_bytes();
            let start = row as usize * n;
            if let Some(bytes) = self.values.get(start..start + n) {
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

    /// Decodes rows `ids` (already range-checked) into `out` (`[ids.len(), width]`).
    pub fn decode(&self, ids: &[u64], out: &mut [f32]) {
        let w = self.width;
        match self.dtype {
            RowDtype::F32 => {
                for (i, (dst, &row)) in out.chunks_exact_mut(w).zip(ids).enumerate() {
                    self.prefetch_ahead(ids, i);
                    copy_f32_le(self.value_row(row), dst);
                }
            }
            RowDtype::BF16 => {
                for (i, (dst, &row)) in out.chunks_exact_mut(w).zip(ids).enumerate() {
                    self.prefetch_ahead(ids, i);
                    for (o, b) in dst.iter_mut().zip(self.value_row(row).chunks_exact(2)) {
                        *o = bf16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
                    }
                }
            }
            RowDtype::F16 => {
                // Aligned halves, then half's vectorized (F16C where present) conversion.
                let mut halves = vec![f16::ZERO; w];
                for (i, (dst, &row)) in out.chunks_exact_mut(w).zip(ids).enumerate() {
                    self.prefetch_ahead(ids, i);
                    for (h, b) in halves.iter_mut().zip(self.value_row(row).chunks_exact(2)) {
                        *h = f16::from_bits(u16::from_le_bytes([b[0], b[1]]));
                    }
                    halves.convert_to_f32_slice(dst);
                }
            }
            RowDtype::F8E4M3Scaled => {
                let (e4m3, e8m0) = (&*E4M3_LUT, &*E8M0_LUT);
                for (i, (dst, &row)) in out.chunks_exact_mut(w).zip(ids).enumerate() {
                    self.prefetch_ahead(ids, i);
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
                }
            }
        }
    }

    /// Copies rows `ids` (already range-checked) in their stored format into `out`
    /// (`[ids.len(), value_row_bytes + scale_row_bytes]`: each row's values, then its scales).
    pub fn copy_raw(&self, ids: &[u64], out: &mut [u8]) {
        let (vb, sb) = (self.value_row_bytes(), self.scale_row_bytes());
        for (i, (dst, &row)) in out.chunks_exact_mut(vb + sb).zip(ids).enumerate() {
            self.prefetch_ahead(ids, i);
            dst[..vb].copy_from_slice(self.value_row(row));
            if sb > 0 {
                dst[vb..].copy_from_slice(self.scale_row(row));
            }
        }
    }
}

/// Rows requested ahead of the one being copied (enough to cover DRAM latency). Into L2
/// (T1), which has room for more misses in flight than L1's fill buffers: measured here
/// (random 128-byte rows, table 4x the L3) about 0.75x memcpy against 0.65x with T0 at 16.
const PREFETCH_DISTANCE: usize = 32;

/// Prefetch hints for every cache line of `bytes` (no-op off x86-64).
#[inline(always)]
fn prefetch_lines(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in bytes.chunks(64) {
        // SAFETY: a prefetch hint on an address inside a live slice; it never faults.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                line.as_ptr().cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// Whether a 32-column block needs no rounding: its products `e4m3 * 2^(s-127)` are
/// exact f32 with at most 4 significant bits, hence exact in bf16 (`round_bf16` is the
/// identity). True when no value is a NaN code and the scale keeps every product normal:
/// e4m3 magnitudes lie in [2^-9, 448 < 2^9], so s - 136 >= -126 and s - 118 <= 128.
#[inline]
fn exact_block(scale: u8, values: &[u8]) -> bool {
    (10..=246).contains(&scale) && !values.iter().any(|&b| b & 0x7f == 0x7f)
}

/// Little-endian f32 bytes into f32s: one memcpy on little-endian hosts.
#[inline]
fn copy_f32_le(src: &[u8], dst: &mut [f32]) {
    debug_assert_eq!(src.len(), 4 * dst.len());
    if cfg!(target_endian = "little") {
        // SAFETY: `dst` is `4 * dst.len()` initialized bytes, every bit pattern is a valid
        // f32, and `src` and `dst` cannot overlap (`dst` is borrowed mutably).
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                dst.as_mut_ptr().cast::<u8>(),
                std::mem::size_of_val(dst),
            )
        };
        bytes.copy_from_slice(src);
    } else {
        for (o, b) in dst.iter_mut().zip(src.chunks_exact(4)) {
            *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
    }
}

/// Runs `work(ids_chunk, out_chunk)` over `ids` and the matching `per_row`-element slices
/// of `out`: on the calling thread when the gather moves fewer than `parallel_min_bytes`
/// (handing work to other threads costs more than copying a few rows), else in chunks
/// on rayon's pool, several per thread so that slow rows (page faults) balance out.
pub(crate) fn run_chunked<T: Send>(
    ids: &[u64],
    out: &mut [T],
    per_row: usize,
    moved_row_bytes: usize,
    parallel_min_bytes: usize,
    work: impl Fn(&[u64], &mut [T]) + Sync,
) {
    let threads = rayon::current_num_threads();
    if threads <= 1
        || ids.len() < 2
        || ids.len().saturating_mul(moved_row_bytes) < parallel_min_bytes
    {
        work(ids, out);
        return;
    }
    let chunk_rows = ids.len().div_ceil(threads * 4).max(MIN_CHUNK_ROWS);
    ids.par_chunks(chunk_rows)
        .zip(out.par_chunks_mut(chunk_rows * per_row))
        .for_each(|(ids, out)| work(ids, out));
}

/// Fewest rows one parallel task gathers.
const MIN_CHUNK_ROWS: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

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
