//! Per-sequence decode state and the hashing stage of a batched step.
//!
//! A batching engine feeds each sequence in pieces: a prompt in prefill chunks, then one
//! token per decode step, with sequences at different positions in the same batch. What
//! a sequence must carry between steps is small: the last `max_ngram_size - 1`
//! compressed ids (for hashing) and, per paper-variant layer, the short conv's window.
//! With that, any chunking gives the outputs of the whole-sequence forward.

use crate::backend::{Segment, ShortConvState};
use crate::config::EngramConfig;
use crate::error::{EngramError, Result};
use crate::hashing::{EngramHasher, NgramHasher, NgramHistory};

/// What one sequence remembers between steps.
#[derive(Clone, Debug, PartialEq)]
pub struct SequenceState {
    pub history: NgramHistory,
    /// One short-conv window per Engram layer (empty for V4.1, which has no conv).
    pub conv: Vec<ShortConvState>,
    /// Tokens seen so far (the position of the next token).
    pub position: usize,
}

impl SequenceState {
    pub fn new(cfg: &EngramConfig) -> Self {
        let conv = match cfg.variant {
            crate::config::Variant::Paper => {
                vec![ShortConvState::new(cfg); cfg.hash.layer_ids.len()]
            }
            crate::config::Variant::V41 => Vec::new(),
        };
        Self {
            history: NgramHistory::new(cfg.hash.max_ngram_size),
            conv,
            position: 0,
        }
    }

    /// Bytes held (for bounding memory).
    pub fn bytes(&self) -> usize {
        self.conv.iter().map(|c| c.rows().len() * 4).sum::<usize>()
            + self.history.slots().len() * 16
    }
}

/// The new tokens of one sequence in a step.
#[derive(Clone, Copy, Debug)]
pub struct StepTokens<'a> {
    /// Compressed ids.
    pub ids: &'a [i64],
    /// V4.1 dead-token mask (same length), if any.
    pub dead: Option<&'a [bool]>,
}

/// Row ids (offsets added) of every Engram layer for the tokens of one step.
#[derive(Clone, Debug, Default)]
pub struct StepRows {
    /// Tokens per sequence, in batch order.
    pub lens: Vec<usize>,
    pub heads: usize,
    /// `[layer][token * heads + head]`.
    pub rows: Vec<Vec<u64>>,
    /// Dead mask over all tokens of the step, when any sequence gave one.
    pub dead: Option<Vec<bool>>,
}

impl StepRows {
    pub fn tokens(&self) -> usize {
        self.lens.iter().sum()
    }
}

/// Hashes the new tokens of every sequence of a step and advances their histories.
/// Nothing is changed when an id is out of range (the error names it).
pub fn hash_step(
    hasher: &EngramHasher,
    states: &mut [&mut SequenceState],
    batch: &[StepTokens<'_>],
) -> Result<StepRows> {
    if states.len() != batch.len() {
        return Err(EngramError::shape(
            "sequence states",
            batch.len(),
            states.len(),
        ));
    }
    for (b, t) in batch.iter().enumerate() {
        if let Some(d) = t.dead {
            if d.len() != t.ids.len() {
                return Err(EngramError::shape(
                    format!("dead mask of sequence {b}"),
                    t.ids.len(),
                    d.len(),
                ));
            }
        }
        for (i, &id) in t.ids.iter().enumerate() {
            hasher.check_id(id, states[b].position + i)?;
        }
    }
    let heads = hasher.heads();
    let n = hasher.window_len();
    let tokens: usize = batch.iter().map(|t| t.ids.len()).sum();
    // Every token's window (advancing the histories), then each layer's rows at once.
    let mut windows = vec![0i64; tokens * n];
    let mut token_windows = windows.chunks_exact_mut(n);
    for (state, t) in states.iter_mut().zip(batch) {
        for (i, &id) in t.ids.iter().enumerate() {
            let dead = t.dead.is_some_and(|d| d[i]);
            let window = token_windows.next().expect("one window per token");
            state.history.window(id, dead, hasher.pad(), window);
            state.history.push(id, dead);
            state.position += 1;
        }
    }
    let rows = hasher
        .layers()
        .iter()
        .map(|layer| {
            let mut rows = vec![0u64; tokens * heads];
            layer.rows_for_windows(&windows, true, &mut rows);
            rows
        })
        .collect();
    let dead = batch.iter().any(|t| t.dead.is_some()).then(|| {
        batch
            .iter()
            .flat_map(|t| (0..t.ids.len()).map(move |i| t.dead.is_some_and(|d| d[i])))
            .collect()
    });
    Ok(StepRows {
        lens: batch.iter().map(|t| t.ids.len()).collect(),
        heads,
        rows,
        dead,
    })
}

/// The segments of layer `layer_index` for a step: each sequence's tokens with its conv window.
pub fn layer_segments<'a>(
    states: &'a mut [&mut SequenceState],
    lens: &[usize],
    layer_index: usize,
) -> Vec<Segment<'a>> {
    states
        .iter_mut()
        .zip(lens)
        .map(|(s, &len)| Segment {
            len,
            conv: s.conv.get_mut(layer_index),
        })
        .collect()
}
