//! The vector plan of a layer: its heads grouped by order into lane groups, with the
//! constants of the lane kernels.

use super::MAX_WINDOW;
use crate::fastmod::{self, Isa, LANES};
use crate::primes::LayerTableLayout;

pub(super) const NO_OFFSETS: [u64; LANES] = [0; LANES];

/// Up to [`LANES`] heads of one order with the constants of the lane kernels. Lanes past
/// the group's heads repeat its first prime and are computed but not stored.
#[derive(Clone, Debug)]
#[repr(C, align(64))]
pub(super) struct LaneGroup {
    pub(super) primes: [u64; LANES],
    pub(super) inv: [f64; LANES],
    pub(super) offsets: [u64; LANES],
    /// The order of these heads (0 = 2-grams).
    pub(super) order: usize,
    /// Whether this is the first group of its order.
    pub(super) opens_order: bool,
    /// First head (index into the layer's heads) and number of heads (1..=LANES).
    pub(super) first: usize,
    pub(super) len: usize,
}

/// The vectorized path of a layer: every prime in `fastmod`'s exact range.
#[derive(Clone, Debug)]
pub(super) struct VectorPlan {
    pub(super) isa: Isa,
    /// Order-major: `ceil(n_head_per_ngram / LANES)` groups per order.
    pub(super) groups: Vec<LaneGroup>,
    /// Whether `n_head_per_ngram` is a multiple of [`LANES`]: group g covers heads
    /// `LANES * g ..`.
    pub(super) full_groups: bool,
}

impl VectorPlan {
    /// None when a prime is too small (or too large) for the f64 kernels, or the window
    /// is longer than the stack buffers.
    pub(super) fn new(
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
