//! [`LayerHasher`]: the hashing of one Engram layer (rows for one window, the scalar
//! path, and the entry points of the sequence and window paths).

use strength_reduce::StrengthReducedU64;

use super::block::{SequenceJob, WindowsJob};
use super::kernel::{run_with, WindowJob};
use super::plan::{VectorPlan, NO_OFFSETS};
use super::MAX_WINDOW;
use crate::fastmod::{Isa, LaneKernel, LANES};
use crate::primes::LayerTableLayout;

/// The hashing of one Engram layer.
#[derive(Clone, Debug)]
pub struct LayerHasher {
    pub layer_id: usize,
    /// One odd multiplier per position in the window (x_0 .. x_{max_n-1}).
    pub multipliers: Vec<i64>,
    pub layout: LayerTableLayout,
    pub(super) n_head_per_ngram: usize,
    /// Fast `% prime` for non-negative mixes on the scalar path.
    reducers: Vec<StrengthReducedU64>,
    /// The vectorized path, when every prime allows it.
    pub(super) vector: Option<VectorPlan>,
}

impl LayerHasher {
    pub(super) fn new(
        layout: LayerTableLayout,
        multipliers: Vec<i64>,
        n_head_per_ngram: usize,
        isa: Option<Isa>,
    ) -> Self {
        Self {
            layer_id: layout.layer_id,
            vector: isa
                .and_then(|isa| VectorPlan::new(&layout, n_head_per_ngram, multipliers.len(), isa)),
            reducers: layout
                .primes
                .iter()
                .map(|&p| StrengthReducedU64::new(p))
                .collect(),
            multipliers,
            n_head_per_ngram,
            layout,
        }
    }

    /// Rows of every head for one window (`window[k]` = compressed id at t-k).
    /// `out` has one entry per head; offsets are added when `with_offsets`.
    #[inline]
    pub fn rows_for_window(&self, window: &[i64], with_offsets: bool, out: &mut [u64]) {
        match &self.vector {
            None => self.scalar_rows(window, with_offsets, out),
            Some(plan) => run_with(
                plan.isa,
                WindowJob {
                    layer: self,
                    plan,
                    window,
                    with_offsets,
                    out,
                },
            ),
        }
    }

    /// Rows `[T, heads]` of a whole sequence (ids unchecked: see
    /// [`NgramHasher::hash_sequence`]). `dead` marks tokens that block themselves and every
    /// older position; `out.len()` must be `compressed.len() * heads`.
    ///
    /// [`NgramHasher::hash_sequence`]: super::NgramHasher::hash_sequence
    pub fn rows_for_sequence(
        &self,
        compressed: &[i64],
        dead: Option<&[bool]>,
        pad: i64,
        with_offsets: bool,
        out: &mut [u64],
    ) {
        assert_eq!(
            out.len(),
            compressed.len() * self.heads(),
            "rows_for_sequence: output length"
        );
        if let Some(d) = dead {
            assert_eq!(
                d.len(),
                compressed.len(),
                "rows_for_sequence: dead mask length"
            );
        }
        let job = SequenceJob {
            layer: self,
            compressed,
            dead,
            pad,
            with_offsets,
            out,
        };
        match &self.vector {
            None => job.scalar(),
            Some(plan) => run_with(plan.isa, job),
        }
    }

    /// Rows `[count, heads]` for `count` windows given `[count, max_ngram_size]` (each
    /// newest first, as [`NgramHistory::window`] writes them): [`Self::rows_for_window`]
    /// for many windows at once (a batch of decode steps).
    ///
    /// [`NgramHistory::window`]: super::NgramHistory::window
    pub fn rows_for_windows(&self, windows: &[i64], with_offsets: bool, out: &mut [u64]) {
        let (n, heads) = (self.multipliers.len(), self.heads());
        assert_eq!(windows.len() % n, 0, "rows_for_windows: windows of {n} ids");
        assert_eq!(
            out.len(),
            windows.len() / n * heads,
            "rows_for_windows: output length"
        );
        match &self.vector {
            None => {
                for (w, o) in windows
                    .chunks_exact(n)
                    .zip(out.chunks_exact_mut(heads.max(1)))
                {
                    self.scalar_rows(w, with_offsets, o);
                }
            }
            Some(plan) => run_with(
                plan.isa,
                WindowsJob {
                    layer: self,
                    windows,
                    with_offsets,
                    out,
                },
            ),
        }
    }

    /// Heads (and row ids per position) of this layer.
    #[inline]
    pub fn heads(&self) -> usize {
        self.layout.primes.len()
    }

    /// The instruction set of this layer's lane kernel (None: scalar `%` per head).
    #[inline]
    pub fn isa(&self) -> Option<Isa> {
        self.vector.as_ref().map(|v| v.isa)
    }

    /// The straightforward form: one strength-reduced `%` (or floor-mod) per head.
    pub(super) fn scalar_rows(&self, window: &[i64], with_offsets: bool, out: &mut [u64]) {
        let k = self.n_head_per_ngram;
        let mut mix = window[0].wrapping_mul(self.multipliers[0]);
        for order in 0..self.multipliers.len() - 1 {
            mix ^= window[order + 1].wrapping_mul(self.multipliers[order + 1]);
            let heads = order * k..(order + 1) * k;
            self.scalar_heads(heads.clone(), mix, with_offsets, &mut out[heads]);
        }
    }

    /// Rows of some heads of one order for its mix.
    #[cold]
    pub(super) fn scalar_heads(
        &self,
        heads: std::ops::Range<usize>,
        mix: i64,
        with_offsets: bool,
        out: &mut [u64],
    ) {
        for (o, j) in out.iter_mut().zip(heads) {
            let row = if mix >= 0 {
                mix as u64 % self.reducers[j]
            } else {
                // numpy's floor-mod; reachable only through negative (pass-through) ids.
                mix.rem_euclid(self.layout.primes[j] as i64) as u64
            };
            *o = if with_offsets {
                row + self.layout.offsets[j]
            } else {
                row
            };
        }
    }

    /// Rows of one window with lane kernel `K`.
    ///
    /// # Safety
    /// `K`'s instruction set must be available.
    #[inline(always)]
    pub(super) unsafe fn window_rows<K: LaneKernel>(
        &self,
        plan: &VectorPlan,
        window: &[i64],
        with_offsets: bool,
        out: &mut [u64],
    ) {
        let n = self.multipliers.len();
        let (window, mult) = (&window[..n], &self.multipliers[..n]);
        if !plan.full_groups {
            return self.general_window_rows::<K>(plan, window, with_offsets, out);
        }
        let out = &mut out[..plan.groups.len() * LANES];
        let mut mix = window[0].wrapping_mul(mult[0]);
        let mut mix_f = 0.0;
        for (dst, g) in out.chunks_exact_mut(LANES).zip(&plan.groups) {
            if g.opens_order {
                // The order's newest token joins the mix.
                mix ^= window[g.order + 1].wrapping_mul(mult[g.order + 1]);
                if mix < 0 {
                    return self.general_window_rows::<K>(plan, window, with_offsets, out);
                }
                mix_f = mix as f64;
            }
            let add = if with_offsets {
                &g.offsets
            } else {
                &NO_OFFSETS
            };
            K::rem(
                &K::prepare(&g.primes, &g.inv, add),
                mix as u64,
                mix_f,
                dst.try_into().unwrap(),
            );
        }
    }

    /// [`Self::window_rows`] for partial groups or negative mixes (whose heads take the
    /// scalar path); out of line.
    ///
    /// # Safety
    /// `K`'s instruction set must be available.
    #[inline(never)]
    unsafe fn general_window_rows<K: LaneKernel>(
        &self,
        plan: &VectorPlan,
        window: &[i64],
        with_offsets: bool,
        out: &mut [u64],
    ) {
        let mut mixes = [0i64; MAX_WINDOW];
        let mut mix = window[0].wrapping_mul(self.multipliers[0]);
        for o in 0..self.multipliers.len() - 1 {
            mix ^= window[o + 1].wrapping_mul(self.multipliers[o + 1]);
            mixes[o] = mix;
        }
        for g in &plan.groups {
            let heads = g.first..g.first + g.len;
            let mix = mixes[g.order];
            if mix < 0 {
                self.scalar_heads(heads.clone(), mix, with_offsets, &mut out[heads]);
                continue;
            }
            let add = if with_offsets {
                &g.offsets
            } else {
                &NO_OFFSETS
            };
            let mut all = [0u64; LANES];
            K::rem(
                &K::prepare(&g.primes, &g.inv, add),
                mix as u64,
                mix as f64,
                &mut all,
            );
            out[heads].copy_from_slice(&all[..g.len]);
        }
    }
}
