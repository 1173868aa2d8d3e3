//! [`EngramHasher`] (every Engram layer of a config) and the [`NgramHasher`] trait: the
//! checked entry points for a whole sequence, a batch, and one decode step.

use super::kernel::StepJob;
use super::plan::VectorPlan;
use super::{LayerHasher, NgramHistory, MAX_WINDOW};
use crate::config::HashConfig;
use crate::error::{EngramError, Result};
use crate::fastmod::Isa;
use crate::numpy_rng::layer_multipliers;
use crate::primes::table_layouts;

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
