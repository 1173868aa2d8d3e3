//! The block path: rows of many positions at once (a whole sequence, or a batch of
//! windows), by blocks of [`BLOCK`] positions whose mixes stay in L1.

use super::kernel::KernelJob;
use super::plan::{VectorPlan, NO_OFFSETS};
use super::{LayerHasher, MAX_WINDOW};
use crate::fastmod::{LaneKernel, LANES};

/// Positions per block of the sequence path (its mixes stay in L1).
pub(super) const BLOCK: usize = 32;

/// Sequence outputs of at least this many rows (8 MiB) are written with
/// non-temporal stores.
pub(super) const STREAM_MIN_ROWS: usize = 1 << 20;

/// [`LayerHasher::rows_for_sequence`].
pub(super) struct SequenceJob<'a> {
    pub(super) layer: &'a LayerHasher,
    pub(super) compressed: &'a [i64],
    pub(super) dead: Option<&'a [bool]>,
    pub(super) pad: i64,
    pub(super) with_offsets: bool,
    pub(super) out: &'a mut [u64],
}

impl SequenceJob<'_> {
    /// The scalar path: one window per position.
    pub(super) fn scalar(self) {
        let layer = self.layer;
        let (n, heads) = (layer.multipliers.len(), layer.heads());
        if heads == 0 {
            return;
        }
        let mut window = vec![0i64; n];
        let mut live = 0usize;
        for (t, row) in self.out.chunks_exact_mut(heads).enumerate() {
            live = if self.dead.is_some_and(|d| d[t]) {
                0
            } else {
                live + 1
            };
            for (k, slot) in window.iter_mut().enumerate() {
                *slot = if k < live {
                    self.compressed[t - k]
                } else {
                    self.pad
                };
            }
            layer.scalar_rows(&window, self.with_offsets, row);
        }
    }
}

impl KernelJob for SequenceJob<'_> {
    /// Blocks of [`BLOCK`] positions: the mixes of the block (see [`BlockMixes`]), then
    /// its rows.
    #[inline(always)]
    unsafe fn run<K: LaneKernel>(self) {
        let SequenceJob {
            layer,
            compressed,
            dead,
            pad,
            with_offsets,
            out,
        } = self;
        let plan = layer.vector.as_ref().unwrap();
        let (n, heads) = (layer.multipliers.len(), layer.heads());
        if heads == 0 {
            return;
        }
        let mut mixes = BlockMixes::new();
        let mut slots = [[0i64; BLOCK]; MAX_WINDOW];
        // Slot k of position t reads compressed[t - k] when k < the number of consecutive
        // live positions ending at t (sticky blocking by dead tokens and the start of the
        // sequence); otherwise the pad id. `live` counts them up to the block's start.
        let mut live = 0usize;
        // Large outputs do not stay in cache: write them with non-temporal stores from an
        // L1 staging block, which saves reading every line before writing it.
        let stream = K::STREAMS && out.len() >= STREAM_MIN_ROWS;
        let mut stage = vec![0u64; if stream { BLOCK * heads + LANES } else { 0 }];
        // Cache-line aligned, so that (with rows of whole groups) every kernel store is.
        let stage_at = stage.as_ptr().align_offset(64).min(LANES) * stream as usize;
        for (b, out_rows) in out.chunks_mut(BLOCK * heads).enumerate() {
            let t0 = b * BLOCK;
            let len = out_rows.len() / heads;
            let block_dead = dead.map(|d| &d[t0..t0 + len]);
            if live + 1 >= n && !block_dead.is_some_and(|d| d.contains(&true)) {
                // Every slot reads an id.
                mixes.compute(layer, len, |k| &compressed[t0 - k..t0 - k + len]);
                live += len;
            } else {
                for i in 0..len {
                    live = if block_dead.is_some_and(|d| d[i]) {
                        0
                    } else {
                        live + 1
                    };
                    for (k, slot) in slots[..n].iter_mut().enumerate() {
                        slot[i] = if k < live {
                            compressed[t0 + i - k]
                        } else {
                            pad
                        };
                    }
                }
                mixes.compute(layer, len, |k| &slots[k][..len]);
            }
            if stream {
                let rows = &mut stage[stage_at..stage_at + len * heads];
                mixes.rows::<K>(layer, plan, with_offsets, rows);
                K::stream_copy(rows, out_rows);
            } else {
                mixes.rows::<K>(layer, plan, with_offsets, out_rows);
            }
        }
        if stream {
            K::stream_fence();
        }
    }
}

/// [`LayerHasher::rows_for_windows`].
pub(super) struct WindowsJob<'a> {
    pub(super) layer: &'a LayerHasher,
    /// `[count, n]`, newest first.
    pub(super) windows: &'a [i64],
    pub(super) with_offsets: bool,
    pub(super) out: &'a mut [u64],
}

impl KernelJob for WindowsJob<'_> {
    #[inline(always)]
    unsafe fn run<K: LaneKernel>(self) {
        let WindowsJob {
            layer,
            windows,
            with_offsets,
            out,
        } = self;
        let plan = layer.vector.as_ref().unwrap();
        let (n, heads) = (layer.multipliers.len(), layer.heads());
        if heads == 0 {
            return;
        }
        let mut mixes = BlockMixes::new();
        let mut slots = [[0i64; BLOCK]; MAX_WINDOW];
        for (rows, block) in out.chunks_mut(BLOCK * heads).zip(windows.chunks(BLOCK * n)) {
            let len = rows.len() / heads;
            for (i, window) in block.chunks_exact(n).enumerate() {
                for (slot, &id) in slots.iter_mut().zip(window) {
                    slot[i] = id;
                }
            }
            mixes.compute(layer, len, |k| &slots[k][..len]);
            mixes.rows::<K>(layer, plan, with_offsets, rows);
        }
    }
}

/// The mixes of every order for up to [`BLOCK`] positions, and their f64 values.
struct BlockMixes {
    len: usize,
    mix: [[i64; BLOCK]; MAX_WINDOW - 1],
    mix_f: [[f64; BLOCK]; MAX_WINDOW - 1],
}

impl BlockMixes {
    fn new() -> Self {
        Self {
            len: 0,
            mix: [[0; BLOCK]; MAX_WINDOW - 1],
            mix_f: [[0.0; BLOCK]; MAX_WINDOW - 1],
        }
    }

    /// Mixes of `len` positions, where `slot(k)[i]` is the id in slot k of position i:
    /// loops over positions, which vectorize.
    #[inline(always)]
    fn compute<'a>(&mut self, layer: &LayerHasher, len: usize, slot: impl Fn(usize) -> &'a [i64]) {
        let mult = &layer.multipliers;
        self.len = len;
        let mut acc = [0i64; BLOCK];
        for (a, &x) in acc[..len].iter_mut().zip(&slot(0)[..len]) {
            *a = x.wrapping_mul(mult[0]);
        }
        for (k, &m) in mult.iter().enumerate().skip(1) {
            let x = &slot(k)[..len];
            let (mix, mix_f) = (&mut self.mix[k - 1][..len], &mut self.mix_f[k - 1][..len]);
            for i in 0..len {
                acc[i] ^= x[i].wrapping_mul(m);
                mix[i] = acc[i];
                mix_f[i] = acc[i] as f64;
            }
        }
    }

    /// Rows `[len, heads]` of the positions: each group of heads over the positions, with
    /// the group's constants loaded once; negative mixes take the scalar path.
    ///
    /// # Safety
    /// `K`'s instruction set must be available.
    #[inline(always)]
    unsafe fn rows<K: LaneKernel>(
        &self,
        layer: &LayerHasher,
        plan: &VectorPlan,
        with_offsets: bool,
        rows: &mut [u64],
    ) {
        let (len, heads) = (self.len, layer.heads());
        let rows = &mut rows[..len * heads];
        for g in &plan.groups {
            let add = if with_offsets {
                &g.offsets
            } else {
                &NO_OFFSETS
            };
            let c = K::prepare(&g.primes, &g.inv, add);
            let (mix, mix_f) = (&self.mix[g.order][..len], &self.mix_f[g.order][..len]);
            let cols = g.first..g.first + g.len;
            for ((row, &m), &m_f) in rows.chunks_exact_mut(heads).zip(mix).zip(mix_f) {
                let dst = &mut row[cols.clone()];
                if m < 0 {
                    layer.scalar_heads(cols.clone(), m, with_offsets, dst);
                } else if let Ok(dst) = <&mut [u64; LANES]>::try_from(&mut *dst) {
                    K::rem(&c, m as u64, m_f, dst);
                } else {
                    let mut all = [0u64; LANES];
                    K::rem(&c, m as u64, m_f, &mut all);
                    dst.copy_from_slice(&all[..g.len]);
                }
            }
        }
    }
}
