//! N-gram hashing (SPEC sections 3-5): compressed token ids -> table rows, per layer.
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
//! `max_ngram_size - 1` ids are kept in an [`NgramHistory`].

use strength_reduce::StrengthReducedU64;

use crate::config::HashConfig;
use crate::error::{EngramError, Result};
use crate::numpy_rng::layer_multipliers;
use crate::primes::{table_layouts, LayerTableLayout};

/// The hashing of one Engram layer.
#[derive(Clone, Debug)]
pub struct LayerHasher {
    pub layer_id: usize,
    /// One odd multiplier per position in the window (x_0 .. x_{max_n-1}).
    pub multipliers: Vec<i64>,
    pub layout: LayerTableLayout,
    n_head_per_ngram: usize,
    /// Fast `% prime` for non-negative mixes (the only kind valid ids produce).
    reducers: Vec<StrengthReducedU64>,
}

impl LayerHasher {
    /// Rows of every head for one window (`window[k]` = compressed id at t-k).
    /// `out` has one entry per head; offsets are added when `with_offsets`.
    #[inline]
    pub fn rows_for_window(&self, window: &[i64], with_offsets: bool, out: &mut [u64]) {
        let k = self.n_head_per_ngram;
        let mut mix = window[0].wrapping_mul(self.multipliers[0]);
        for order in 0..self.multipliers.len() - 1 {
            mix ^= window[order + 1].wrapping_mul(self.multipliers[order + 1]);
            let heads = order * k..(order + 1) * k;
            for j in heads {
                let row = if mix >= 0 {
                    mix as u64 % self.reducers[j]
                } else {
                    // numpy's floor-mod; reachable only through negative (pass-through) ids.
                    mix.rem_euclid(self.layout.primes[j] as i64) as u64
                };
                out[j] = if with_offsets {
                    row + self.layout.offsets[j]
                } else {
                    row
                };
            }
        }
    }

    /// Heads (and row ids per position) of this layer.
    pub fn heads(&self) -> usize {
        self.layout.primes.len()
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
    pub fn window(&self, id: i64, dead: bool, pad: i64, window: &mut [i64]) {
        let mut blocked = dead;
        window[0] = if blocked { pad } else { id };
        for (k, slot) in self.slots.iter().enumerate() {
            blocked |= slot.is_none();
            window[k + 1] = if blocked { pad } else { slot.unwrap_or(pad) };
        }
    }

    /// Records a token as the newest id of the sequence.
    pub fn push(&mut self, id: i64, dead: bool) {
        if self.slots.is_empty() {
            return;
        }
        self.slots.rotate_right(1);
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
        let is_dead = |p: usize| dead.is_some_and(|d| d[p]);
        let mut window = vec![0i64; self.window_len()];
        for (t, &id) in compressed.iter().enumerate() {
            self.check_id(id, t)?;
            let mut blocked = false;
            for (k, slot) in window.iter_mut().enumerate() {
                blocked |= k > t || is_dead(t - k);
                *slot = if blocked {
                    self.pad()
                } else {
                    compressed[t - k]
                };
            }
            hasher.rows_for_window(&window, with_offsets, &mut out[t * heads..(t + 1) * heads]);
        }
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
        let mut window = vec![0i64; self.window_len()];
        history.window(id, dead, self.pad(), &mut window);
        for (l, hasher) in self.layers().iter().enumerate() {
            hasher.rows_for_window(&window, true, &mut out[l * heads..(l + 1) * heads]);
        }
        history.push(id, dead);
        Ok(())
    }
}

fn check_len(what: &str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(EngramError::shape(
            what,
            format!("{expected} elements"),
            format!("{got}"),
        ))
    }
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
            .map(|layout| LayerHasher {
                layer_id: layout.layer_id,
                multipliers: layer_multipliers(
                    compressed_vocab_size as u64,
                    cfg.seed,
                    layout.layer_id as u64,
                    cfg.max_ngram_size,
                ),
                n_head_per_ngram: cfg.n_head_per_ngram,
                reducers: layout
                    .primes
                    .iter()
                    .map(|&p| StrengthReducedU64::new(p))
                    .collect(),
                layout,
            })
            .collect();
        Ok(Self {
            layers,
            max_ngram_size: cfg.max_ngram_size,
            compressed_vocab_size,
            compressed_pad,
        })
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
    fn layers(&self) -> &[LayerHasher] {
        &self.layers
    }
    fn pad(&self) -> i64 {
        self.compressed_pad
    }
    fn window_len(&self) -> usize {
        self.max_ngram_size
    }
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
