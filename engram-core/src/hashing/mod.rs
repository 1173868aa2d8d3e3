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
//!
//! The files: `layer.rs` holds [`LayerHasher`] (one layer's rows for one window, and the
//! scalar path); `plan.rs` the lane groups of the vector path; `kernel.rs` the dispatch
//! to a lane kernel's instruction set; `block.rs` the block path (whole sequences and
//! batches of windows); `history.rs` [`NgramHistory`] (the window and pad logic of one
//! sequence); `hasher.rs` [`EngramHasher`] and the [`NgramHasher`] trait.
//!
//! [`fastmod`]: crate::fastmod
//! [`LANES`]: crate::fastmod::LANES

mod block;
mod hasher;
mod history;
mod kernel;
mod layer;
mod plan;
#[cfg(test)]
mod tests;

pub use hasher::{EngramHasher, NgramHasher};
pub use history::NgramHistory;
pub use layer::LayerHasher;

/// Longest window the stack buffers hold: the largest order a validated config allows.
const MAX_WINDOW: usize = crate::config::limits::MAX_NGRAM_SIZE;
