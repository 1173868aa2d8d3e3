//! N-gram hashing (docs/algorithm.md sections 3-5): compressed token ids -> table rows,
//! per layer.
//!
//! For position t, `x_k` is the compressed token at t-k. Each order n mixes one more
//! token into a running XOR of products with the layer's odd multipliers, and every head
//! of that order reduces the same mix modulo its own prime.
//!
//! Positions before the start of a sequence, and (V4.1) dead tokens together with every
//! older position behind them, read as the pad id: see [`NgramHistory`].
//!
//! Two entry points give the same rows: [`NgramHasher::hash_sequence`] for a whole
//! sequence, and [`NgramHasher::hash_step`] for one new token of a sequence whose last
//! `max_ngram_size - 1` ids are kept in an [`NgramHistory`]
//! ([`LayerHasher::rows_for_windows`] hashes many such windows at once).
//!
//! How: when every prime of a layer is in [`fastmod`]'s exact range (2^13..=2^62), heads
//! are grouped by order into groups of [`LANES`] and reduced with a SIMD lane kernel
//! (AVX-512, AVX2 or portable, detected once at construction); otherwise, and for
//! negative mixes (negative pass-through ids), a strength-reduced `%` per head. A
//! sequence goes by blocks of positions: the block's mixes in loops over positions, then
//! each group over the block with its constants in registers; outputs too large for the
//! cache are written with non-temporal stores. Every path gives the same rows.

use strength_reduce::StrengthReducedU64;

use crate::config::HashConfig;
use crate::error::{EngramError, Result};
use crate::fastmod::{self, Isa, LaneKernel, LANES};
use crate::numpy_rng::layer_multipliers;
use crate::primes::{table_layouts, LayerTableLayout};

/// Longest window the stack buffers hold: the largest order a validated config allows.
const MAX_WINDOW: usize = crate::config::limits::MAX_NGRAM_SIZE;
/// Positions per block of the sequence path (its mixes stay in L1).
const BLOCK: usize = 32;

/// Sequence outputs of at least this many rows (8 MiB) are written with
/// non-temporal stores.
const STREAM_MIN_ROWS: usize = 1 << 20;

const NO_OFFSETS: [u64; LANES] = [0; LANES];

/// Up to [`LANES`] heads of one order with the constants of the lane kernels. Lanes past
/// the group's heads repeat its first prime and are computed but not stored.
#[derive(Clone, Debug)]
#[repr(C, align(64))]
struct LaneGroup {
    primes: [u64; LANES],
    inv: [f64; LANES],
    offsets: [u64; LANES],
    /// The order of these heads (0 = 2-grams).
    order: usize,
    /// Whether this is the first group of its order.
    opens_order: bool,
    /// First head (index into the layer's heads) and number of heads (1..=LANES).
    first: usize,
    len: usize,
}

/// The vectorized path of a layer: every prime in `fastmod`'s exact range.
#[derive(Clone, Debug)]
struct VectorPlan {
    isa: Isa,
    /// Order-major: `ceil(n_head_per_ngram / LANES)` groups per order.
    groups: Vec<LaneGroup>,
    /// Whether `n_head_per_ngram` is a multiple of [`LANES`]: group g covers heads
    /// `LANES * g ..`.
    full_groups: bool,
}

impl VectorPlan {
    /// None when a prime is too small (or too large) for the f64 kernels, or the window
    /// is longer than the stack buffers.
    fn new(
        layout: &LayerTableLayout,
        n_head_per_ngram: usize,
        window: usize,
        isa: Isa,
    ) -> Option<Self> {
        let primes = &layout.primes;
        if window > MAX_WINDOW
            || n_head_per_ngram == 0
            || !primes.iter().all(|&p| fastmod::supported(p))
        {
            return None;
        }
        let mut groups = Vec::new();
        for (order, heads) in primes.chunks(n_head_per_ngram).enumerate() {
            for (c, chunk) in heads.chunks(LANES).enumerate() {
                let first = order * n_head_per_ngram + c * LANES;
                let mut g = LaneGroup {
                    primes: [chunk[0]; LANES],
                    inv: [fastmod::reciprocal(chunk[0]); LANES],
                    offsets: [0; LANES],
                    order,
                    opens_order: c == 0,
                    first,
                    len: chunk.len(),
                };
                for (l, &p) in chunk.iter().enumerate() {
                    g.primes[l] = p;
                    g.inv[l] = fastmod::reciprocal(p);
                    g.offsets[l] = layout.offsets[first + l];
                }
                groups.push(g);
            }
        }
        Some(Self {
            isa: isa.for_moduli(primes),
            groups,
            full_groups: n_head_per_ngram.is_multiple_of(LANES),
        })
    }
}

/// The hashing of one Engram layer.
#[derive(Clone, Debug)]
pub struct LayerHasher {
    pub layer_id: usize,
    /// One odd multiplier per position in the window (x_0 .. x_{max_n-1}).
    pub multipliers: Vec<i64>,
    pub layout: LayerTableLayout,
    n_head_per_ngram: usize,
    /// Fast `% prime` for non-negative mixes on the scalar path.
    reducers: Vec<StrengthReducedU64>,
    /// The vectorized path, when every prime allows it.
    vector: Option<VectorPlan>,
}

impl LayerHasher {
    fn new(
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
    fn scalar_rows(&self, window: &[i64], with_offsets: bool, out: &mut [u64]) {
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
    fn scalar_heads(
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
    unsafe fn window_rows<K: LaneKernel>(
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

/// Work that runs with one lane kernel. [`run_with`] calls `run` inside a function
/// compiled for the kernel's instruction set, where `run` (inline) and the kernel's
/// intrinsics inline.
trait KernelJob {
    /// # Safety
    /// `K`'s instruction set must be available.
    unsafe fn run<K: LaneKernel>(self);
}

/// Runs `job` with the lane kernel of `isa`, which must come from [`Isa::detect`] or have
/// passed [`Isa::available`] (every plan's ISA does).
fn run_with<J: KernelJob>(isa: Isa, job: J) {
    // SAFETY: the ISA was checked on this CPU.
    unsafe {
        match isa {
            Isa::Portable => job.run::<fastmod::Portable>(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => run_avx512(job),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => run_avx2(job),
            #[cfg(not(target_arch = "x86_64"))]
            _ => job.run::<fastmod::Portable>(),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn run_avx512<J: KernelJob>(job: J) {
    job.run::<fastmod::Avx512>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn run_avx2<J: KernelJob>(job: J) {
    job.run::<fastmod::Avx2>()
}

/// [`LayerHasher::rows_for_window`] on the vector path.
struct WindowJob<'a> {
    layer: &'a LayerHasher,
    plan: &'a VectorPlan,
    window: &'a [i64],
    with_offsets: bool,
    out: &'a mut [u64],
}

impl KernelJob for WindowJob<'_> {
    #[inline(always)]
    unsafe fn run<K: LaneKernel>(self) {
        self.layer
            .window_rows::<K>(self.plan, self.window, self.with_offsets, self.out)
    }
}

/// Rows of every layer (`[layers, heads]`, offsets added) for one window.
struct StepJob<'a> {
    layers: &'a [LayerHasher],
    window: &'a [i64],
    heads: usize,
    out: &'a mut [u64],
}

impl StepJob<'_> {
    /// One dispatch for every layer when they share a kernel.
    #[inline]
    fn run_all(self) {
        let isa = self.layers.first().and_then(LayerHasher::isa);
        match isa {
            Some(isa) if self.layers.iter().all(|l| l.isa() == Some(isa)) => run_with(isa, self),
            _ => {
                for (l, layer) in self.layers.iter().enumerate() {
                    let out = &mut self.out[l * self.heads..(l + 1) * self.heads];
                    layer.rows_for_window(self.window, true, out);
                }
            }
        }
    }
}

impl KernelJob for StepJob<'_> {
    #[inline(always)]
    unsafe fn run<K: LaneKernel>(self) {
        for (l, layer) in self.layers.iter().enumerate() {
            let plan = layer.vector.as_ref().unwrap();
            let out = &mut self.out[l * self.heads..(l + 1) * self.heads];
            layer.window_rows::<K>(plan, self.window, true, out);
        }
    }
}

/// [`LayerHasher::rows_for_sequence`].
struct SequenceJob<'a> {
    layer: &'a LayerHasher,
    compressed: &'a [i64],
    dead: Option<&'a [bool]>,
    pad: i64,
    with_offsets: bool,
    out: &'a mut [u64],
}

impl SequenceJob<'_> {
    /// The scalar path: one window per position.
    fn scalar(self) {
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
struct WindowsJob<'a> {
    layer: &'a LayerHasher,
    /// `[count, n]`, newest first.
    windows: &'a [i64],
    with_offsets: bool,
    out: &'a mut [u64],
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

/// The last `max_ngram_size - 1` compressed ids of one sequence, newest first.
///
/// A slot is either an id or *blocked* (before the start, or a dead token): a blocked slot
/// and every older slot read as the pad id when a window is built (sticky blocking).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NgramHistory {
    slots: Vec<Option<i64>>,
}

impl NgramHistory {
    /// A fresh sequence: every slot lies before the start.
    pub fn new(max_ngram_size: usize) -> Self {
        Self {
            slots: vec![None; max_ngram_size.saturating_sub(1)],
        }
    }

    /// The window for a new token, newest first; `window.len()` = max_ngram_size.
    #[inline]
    pub fn window(&self, id: i64, dead: bool, pad: i64, window: &mut [i64]) {
        let mut blocked = dead;
        window[0] = if blocked { pad } else { id };
        for (k, slot) in self.slots.iter().enumerate() {
            blocked |= slot.is_none();
            window[k + 1] = if blocked { pad } else { slot.unwrap_or(pad) };
        }
    }

    /// Records a token as the newest id of the sequence.
    #[inline]
    pub fn push(&mut self, id: i64, dead: bool) {
        if self.slots.is_empty() {
            return;
        }
        // A plain shift (`rotate_right` calls memmove: slow for a few slots).
        for k in (1..self.slots.len()).rev() {
            self.slots[k] = self.slots[k - 1];
        }
        self.slots[0] = if dead { None } else { Some(id) };
    }

    /// The remembered ids, newest first (`None` = blocked).
    pub fn slots(&self) -> &[Option<i64>] {
        &self.slots
    }
}

/// Hashing for every Engram layer of a config.
#[derive(Clone, Debug)]
pub struct EngramHasher {
    layers: Vec<LayerHasher>,
    max_ngram_size: usize,
    compressed_vocab_size: usize,
    compressed_pad: i64,
}

/// What a hasher must provide: rows for one window; the sequence and step forms follow.
pub trait NgramHasher {
    /// Engram layers, in config order.
    fn layers(&self) -> &[LayerHasher];
    /// Compressed pad id used for blocked slots.
    fn pad(&self) -> i64;
    /// Window length (max_ngram_size).
    fn window_len(&self) -> usize;
    /// Checks one compressed id (`position` is for the message).
    fn check_id(&self, id: i64, position: usize) -> Result<()>;

    /// Heads per layer.
    fn heads(&self) -> usize {
        self.layers().first().map_or(0, LayerHasher::heads)
    }

    /// Rows `[T, heads]` of one layer for a whole sequence of compressed ids.
    /// `dead` (V4.1) marks tokens that block themselves and every older position.
    fn hash_sequence(
        &self,
        layer: usize,
        compressed: &[i64],
        dead: Option<&[bool]>,
        with_offsets: bool,
        out: &mut [u64],
    ) -> Result<()> {
        let heads = self.heads();
        check_len("hash output", compressed.len() * heads, out.len())?;
        if let Some(d) = dead {
            check_len("dead mask", compressed.len(), d.len())?;
        }
        let hasher = layer_at(self.layers(), layer)?;
        for (t, &id) in compressed.iter().enumerate() {
            self.check_id(id, t)?;
        }
        hasher.rows_for_sequence(compressed, dead, self.pad(), with_offsets, out);
        Ok(())
    }

    /// Rows of every layer (`[layers, heads]`, offsets added) for the next token of a
    /// sequence, then records the token in `history`.
    fn hash_step(
        &self,
        history: &mut NgramHistory,
        id: i64,
        dead: bool,
        position: usize,
        out: &mut [u64],
    ) -> Result<()> {
        let heads = self.heads();
        check_len("hash output", self.layers().len() * heads, out.len())?;
        self.check_id(id, position)?;
        let n = self.window_len();
        let mut long_window;
        let mut short_window = [0i64; MAX_WINDOW];
        let window: &mut [i64] = if n <= MAX_WINDOW {
            &mut short_window[..n]
        } else {
            long_window = vec![0i64; n];
            &mut long_window
        };
        history.window(id, dead, self.pad(), window);
        StepJob {
            layers: self.layers(),
            window,
            heads,
            out,
        }
        .run_all();
        history.push(id, dead);
        Ok(())
    }
}

#[inline]
fn check_len(what: &str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(len_error(what, expected, got))
    }
}

#[cold]
#[inline(never)]
fn len_error(what: &str, expected: usize, got: usize) -> EngramError {
    EngramError::shape(what, format!("{expected} elements"), format!("{got}"))
}

fn layer_at(layers: &[LayerHasher], layer: usize) -> Result<&LayerHasher> {
    layers.get(layer).ok_or_else(|| {
        EngramError::Other(format!(
            "Engram layer index {layer} out of range: {} layers",
            layers.len()
        ))
    })
}

impl EngramHasher {
    /// Multipliers and primes for every layer of `cfg`, for a tokenizer whose compression
    /// has `compressed_vocab_size` ids and maps the pad token to `compressed_pad`.
    pub fn new(
        cfg: &HashConfig,
        compressed_vocab_size: usize,
        compressed_pad: i64,
    ) -> Result<Self> {
        cfg.validate()?;
        if compressed_vocab_size == 0 {
            return Err(EngramError::config(
                "compressed_vocab_size",
                "the tokenizer compresses to 0 ids",
            ));
        }
        if let Some(expected) = cfg.compressed_vocab_size {
            if expected != compressed_vocab_size {
                return Err(EngramError::config(
                    "compressed_vocab_size",
                    format!("config says {expected}, the tokenizer compresses to {compressed_vocab_size}"),
                ));
            }
        }
        if compressed_pad < 0 || compressed_pad as usize >= compressed_vocab_size {
            return Err(EngramError::config(
                "pad_id",
                format!("compressed pad id {compressed_pad} is outside 0..{compressed_vocab_size}"),
            ));
        }
        let layers = table_layouts(cfg)
            .into_iter()
            .map(|layout| {
                let multipliers = layer_multipliers(
                    compressed_vocab_size as u64,
                    cfg.seed,
                    layout.layer_id as u64,
                    cfg.max_ngram_size,
                );
                LayerHasher::new(
                    layout,
                    multipliers,
                    cfg.n_head_per_ngram,
                    Some(Isa::detect()),
                )
            })
            .collect();
        Ok(Self {
            layers,
            max_ngram_size: cfg.max_ngram_size,
            compressed_vocab_size,
            compressed_pad,
        })
    }

    /// The same hasher with another lane kernel for every layer (for tests and
    /// benchmarks): `None` is the scalar `%` per head; an ISA this CPU lacks falls back to
    /// the portable kernel. Rows do not depend on the choice.
    pub fn with_isa(mut self, isa: Option<Isa>) -> Self {
        let isa = isa.map(|i| if i.available() { i } else { Isa::Portable });
        for layer in &mut self.layers {
            layer.vector = isa.and_then(|isa| {
                VectorPlan::new(
                    &layer.layout,
                    layer.n_head_per_ngram,
                    layer.multipliers.len(),
                    isa,
                )
            });
        }
        self
    }

    /// Size of the compressed vocabulary the multipliers were drawn for.
    pub fn compressed_vocab_size(&self) -> usize {
        self.compressed_vocab_size
    }

    /// Rows `[B, T, heads]` of one layer for a batch of equal-length sequences.
    pub fn hash_batch(
        &self,
        layer: usize,
        compressed: &[i64],
        batch: usize,
        dead: Option<&[bool]>,
        with_offsets: bool,
    ) -> Result<Vec<u64>> {
        if batch == 0 || !compressed.len().is_multiple_of(batch) {
            return Err(EngramError::shape(
                "batch of ids",
                format!("a multiple of batch size {batch}"),
                compressed.len(),
            ));
        }
        let t = compressed.len() / batch;
        let heads = self.heads();
        let mut out = vec![0u64; compressed.len() * heads];
        for b in 0..batch {
            self.hash_sequence(
                layer,
                &compressed[b * t..(b + 1) * t],
                dead.map(|d| &d[b * t..(b + 1) * t]),
                with_offsets,
                &mut out[b * t * heads..(b + 1) * t * heads],
            )?;
        }
        Ok(out)
    }
}

impl NgramHasher for EngramHasher {
    #[inline]
    fn layers(&self) -> &[LayerHasher] {
        &self.layers
    }
    #[inline]
    fn pad(&self) -> i64 {
        self.compressed_pad
    }
    #[inline]
    fn window_len(&self) -> usize {
        self.max_ngram_size
    }
    #[inline]
    fn check_id(&self, id: i64, position: usize) -> Result<()> {
        // Negative ids pass through compression unchanged (the original's convention).
        if id >= 0 && id as usize >= self.compressed_vocab_size {
            return Err(EngramError::TokenOutOfRange {
                id,
                position,
                vocab_size: self.compressed_vocab_size,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v41_config(vocab: Vec<u64>, max_ngram_size: usize, heads: usize) -> HashConfig {
        HashConfig {
            engram_vocab_size: vocab,
            max_ngram_size,
            n_head_per_ngram: heads,
            layer_ids: vec![1, 14],
            pad_id: 2,
            seed: 0,
            compressed_vocab_size: None,
        }
    }

    /// docs/algorithm.md section 5 written out directly: a window per position,
    /// `rem_euclid` per head.
    fn naive_rows(
        layer: &LayerHasher,
        compressed: &[i64],
        dead: Option<&[bool]>,
        pad: i64,
        with_offsets: bool,
    ) -> Vec<u64> {
        let n = layer.multipliers.len();
        let k = layer.layout.primes.len() / (n - 1);
        let mut out = Vec::new();
        for t in 0..compressed.len() {
            let mut blocked = false;
            let window: Vec<i64> = (0..n)
                .map(|j| {
                    blocked |= j > t || dead.is_some_and(|d| d[t - j]);
                    if blocked {
                        pad
                    } else {
                        compressed[t - j]
                    }
                })
                .collect();
            let mut mix = window[0].wrapping_mul(layer.multipliers[0]);
            for order in 0..n - 1 {
                mix ^= window[order + 1].wrapping_mul(layer.multipliers[order + 1]);
                for h in 0..k {
                    let j = order * k + h;
                    let row = mix.rem_euclid(layer.layout.primes[j] as i64) as u64;
                    out.push(
                        row + if with_offsets {
                            layer.layout.offsets[j]
                        } else {
                            0
                        },
                    );
                }
            }
        }
        out
    }

    fn isas() -> Vec<Option<Isa>> {
        let mut v = vec![None, Some(Isa::Portable)];
        v.extend(
            [Isa::Avx2, Isa::Avx512]
                .into_iter()
                .filter(|i| i.available())
                .map(Some),
        );
        v
    }

    /// Every kernel, for sequences with dead tokens, negative pass-through ids and (through
    /// `rows_for_window`) ids beyond the vocabulary, against the naive form.
    fn check_config(cfg: &HashConfig, vocab: usize, ids: &[i64], dead: &[bool], pad: i64) {
        let base = EngramHasher::new(cfg, vocab, pad).unwrap();
        for isa in isas() {
            let hasher = base.clone().with_isa(isa);
            let heads = hasher.heads();
            for (l, layer) in hasher.layers().iter().enumerate() {
                for with_offsets in [false, true] {
                    for mask in [None, Some(dead)] {
                        let expected = naive_rows(layer, ids, mask, pad, with_offsets);
                        let mut out = vec![u64::MAX; ids.len() * heads];
                        hasher
                            .hash_sequence(l, ids, mask, with_offsets, &mut out)
                            .unwrap();
                        assert_eq!(out, expected, "{isa:?}, layer {l}, offsets {with_offsets}");
                    }
                }
            }
            // The windows of every position, through a history, hashed at once.
            let n = cfg.max_ngram_size;
            let mut history = NgramHistory::new(n);
            let mut windows = vec![0i64; ids.len() * n];
            for (t, (&id, &d)) in ids.iter().zip(dead).enumerate() {
                history.window(id, d, pad, &mut windows[t * n..(t + 1) * n]);
                history.push(id, d);
            }
            for (l, layer) in hasher.layers().iter().enumerate() {
                for with_offsets in [false, true] {
                    let mut out = vec![u64::MAX; ids.len() * heads];
                    layer.rows_for_windows(&windows, with_offsets, &mut out);
                    let expected = naive_rows(layer, ids, Some(dead), pad, with_offsets);
                    assert_eq!(out, expected, "{isa:?} windows, layer {l}");
                }
            }
            let mut history = NgramHistory::new(cfg.max_ngram_size);
            let mut step = vec![0u64; hasher.layers().len() * heads];
            for (t, (&id, &d)) in ids.iter().zip(dead).enumerate() {
                hasher.hash_step(&mut history, id, d, t, &mut step).unwrap();
                for (l, layer) in hasher.layers().iter().enumerate() {
                    let expected = naive_rows(layer, &ids[..=t], Some(&dead[..=t]), pad, true);
                    assert_eq!(
                        &step[l * heads..(l + 1) * heads],
                        &expected[t * heads..],
                        "{isa:?} step {t}"
                    );
                }
            }
        }
    }

    #[test]
    fn every_kernel_matches_the_naive_hash() {
        let cfg = v41_config(vec![16_000_000; 3], 4, 8);
        let mut rng = crate::testing::TestRng::new(3);
        let ids: Vec<i64> = (0..300).map(|_| rng.below(99_092) as i64).collect();
        let dead: Vec<bool> = (0..300).map(|_| rng.below(13) == 0).collect();
        check_config(&cfg, 99_092, &ids, &dead, 2);
    }

    #[test]
    fn long_sequences_written_with_streaming_stores() {
        // Over STREAM_MIN_ROWS rows, with a ragged last block and an unaligned output.
        let cfg = v41_config(vec![16_000_000; 3], 4, 8);
        let base = EngramHasher::new(&cfg, 99_092, 2).unwrap();
        let t = STREAM_MIN_ROWS / 24 + BLOCK + 5;
        let mut rng = crate::testing::TestRng::new(9);
        let ids: Vec<i64> = (0..t).map(|_| rng.below(99_092) as i64).collect();
        let dead: Vec<bool> = (0..t).map(|_| rng.below(1000) == 0).collect();
        let scalar = base.clone().with_isa(None);
        for isa in isas().into_iter().flatten() {
            let hasher = base.clone().with_isa(Some(isa));
            for mask in [None, Some(&dead[..])] {
                let mut expected = vec![0u64; t * 24];
                scalar
                    .hash_sequence(1, &ids, mask, true, &mut expected)
                    .unwrap();
                let mut buf = vec![u64::MAX; t * 24 + 1];
                hasher
                    .hash_sequence(1, &ids, mask, true, &mut buf[1..])
                    .unwrap();
                assert!(buf[1..] == expected[..], "{isa:?}");
            }
        }
    }

    #[test]
    fn windows_with_large_or_negative_mixes() {
        // Ids outside the vocabulary wrap the products (rows_for_window does not check).
        let hasher = EngramHasher::new(&v41_config(vec![16_000_000; 3], 4, 8), 99_092, 2).unwrap();
        for isa in isas() {
            let h = hasher.clone().with_isa(isa);
            let layer = &h.layers()[0];
            for window in [
                [i64::MAX, -1, 5, 0],
                [-3, -3, -3, -3],
                [99_091, 99_091, 99_091, 99_091],
                [1 << 40, 1 << 41, 3, 4],
                [0, 0, 0, 0],
            ] {
                let mut out = vec![0u64; layer.heads()];
                layer.rows_for_window(&window, true, &mut out);
                let mut expected = vec![0u64; layer.heads()];
                hasher.clone().with_isa(None).layers()[0].rows_for_window(
                    &window,
                    true,
                    &mut expected,
                );
                let naive: Vec<u64> = {
                    let mut mix = window[0].wrapping_mul(layer.multipliers[0]);
                    let mut v = Vec::new();
                    for o in 0..3 {
                        mix ^= window[o + 1].wrapping_mul(layer.multipliers[o + 1]);
                        for hd in 0..8 {
                            let j = o * 8 + hd;
                            v.push(
                                mix.rem_euclid(layer.layout.primes[j] as i64) as u64
                                    + layer.layout.offsets[j],
                            );
                        }
                    }
                    v
                };
                assert_eq!(out, naive, "{isa:?} {window:?}");
                assert_eq!(expected, naive, "scalar {window:?}");
            }
        }
    }

    fn config_strategy() -> impl Strategy<Value = (HashConfig, usize)> {
        (
            prop_oneof![
                Just(2u64),
                Just(100),
                Just(8_000),
                Just(9_000),
                Just(16_000_000),
                Just((1 << 32) - 20),
                Just((1 << 40) - 100),
                2u64..1 << 40,
            ],
            2usize..=6,
            1usize..=11,
            prop_oneof![Just(2usize), Just(99_092), 3usize..1 << 20],
        )
            .prop_map(|(v, n, heads, vocab)| (v41_config(vec![v; n - 1], n, heads), vocab))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn optimized_hashing_matches_the_naive_form(
            (cfg, vocab) in config_strategy(),
            seq in proptest::collection::vec((0u64..1 << 20, 0u8..20), 0..40),
            pad_seed in 0u64..1 << 20,
        ) {
            let pad = (pad_seed % vocab as u64) as i64;
            let ids: Vec<i64> = seq.iter().map(|&(id, _)| {
                let id = (id % vocab as u64) as i64;
                // Now and then a negative pass-through id.
                if id % 37 == 5 { -id } else { id }
            }).collect();
            let dead: Vec<bool> = seq.iter().map(|&(_, d)| d == 0).collect();
            check_config(&cfg, vocab, &ids, &dead, pad);
        }
    }
}
