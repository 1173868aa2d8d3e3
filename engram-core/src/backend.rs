//! The traits a backend implements, and the per-sequence state they share.
//!
//! A forward pass over a batch works on *tokens*, not on a padded `[B, T]` grid: the batch
//! is a list of segments, each a run of consecutive new tokens of one sequence (a whole
//! prompt, a prefill chunk, or one decode step). Hidden states are `[tokens, hc_mult,
//! hidden_size]` and embeddings `[tokens, embed_dim]`, segments back to back.

use crate::config::EngramConfig;
use crate::error::{EngramError, Result};
use crate::table::TableStore;

/// The short conv's memory of one sequence for one layer: the last `(K-1) * dilation`
/// rows of the normalized value `z` (`hc_mult * hidden_size` channels), oldest first.
/// A fresh state is all zeros, which is the conv's zero padding before the start.
#[derive(Clone, Debug, PartialEq)]
pub struct ShortConvState {
    channels: usize,
    rows: Vec<f32>,
}

impl ShortConvState {
    pub fn new(cfg: &EngramConfig) -> Self {
        Self::with_size(cfg.branch_channels(), cfg.conv_history())
    }

    pub fn with_size(channels: usize, history: usize) -> Self {
        Self {
            channels,
            rows: vec![0.0; channels * history],
        }
    }

    /// Rows remembered.
    pub fn history(&self) -> usize {
        self.rows.len().checked_div(self.channels).unwrap_or(0)
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    /// The row `back` steps before the first new token (`1..=history`).
    #[inline]
    pub fn row_back(&self, back: usize) -> &[f32] {
        let h = self.history();
        let r = h - back;
        &self.rows[r * self.channels..(r + 1) * self.channels]
    }

    /// Appends `z` rows (`[n, channels]`), keeping only the newest `history`.
    pub fn push_rows(&mut self, z: &[f32]) {
        let h = self.history();
        if h == 0 {
            return;
        }
        let n = z.len() / self.channels;
        if n >= h {
            self.rows.copy_from_slice(&z[(n - h) * self.channels..]);
        } else {
            self.rows.copy_within(n * self.channels.., 0);
            let keep = (h - n) * self.channels;
            self.rows[keep..].copy_from_slice(z);
        }
    }

    /// All remembered rows, oldest first.
    pub fn rows(&self) -> &[f32] {
        &self.rows
    }
}

/// One run of consecutive new tokens of one sequence inside a batch.
#[derive(Debug)]
pub struct Segment<'a> {
    pub len: usize,
    /// The sequence's conv state for this layer (paper variant), updated by the forward.
    /// `None`: the segment starts a sequence and nothing is remembered after it.
    pub conv: Option<&'a mut ShortConvState>,
}

impl<'a> Segment<'a> {
    pub fn fresh(len: usize) -> Self {
        Self { len, conv: None }
    }
    pub fn with_state(len: usize, conv: &'a mut ShortConvState) -> Self {
        Self {
            len,
            conv: Some(conv),
        }
    }
}

/// One Engram layer's gate, value and (paper) short conv, given gathered embeddings.
pub trait EngramLayer: Send + Sync {
    fn config(&self) -> &EngramConfig;
    fn layer_id(&self) -> usize;

    /// Computes the layer for the tokens of `segments` (back to back).
    ///
    /// `hidden`: `[tokens, hc_mult, hidden_size]`; `embeddings`: `[tokens, embed_dim]`
    /// (the gathered rows, heads concatenated); `dead`: per token (V4.1; dead tokens pass
    /// through). `out` gets what the variant returns: the delta the block adds (paper)
    /// or the updated hidden states (V4.1), see [`crate::config::Variant::output_is_delta`].
    fn forward(
        &self,
        hidden: &[f32],
        embeddings: &[f32],
        dead: Option<&[bool]>,
        segments: &mut [Segment<'_>],
        out: &mut [f32],
    ) -> Result<()>;

    /// The part of [`Self::forward`] that depends on the gathered rows alone (the layer's
    /// projections of `embeddings`, `[tokens, embed_dim]`), so that a fetcher can compute
    /// it while the host's earlier layers run; [`Self::forward_projected`] does the rest.
    /// `None`: this layer does not split its forward (the default).
    fn project(&self, embeddings: &[f32]) -> Result<Option<Vec<f32>>> {
        let _ = embeddings;
        Ok(None)
    }

    /// [`Self::forward`] from what [`Self::project`] returned for the same rows (it may
    /// be overwritten). Gives the same output as `forward` on those rows.
    fn forward_projected(
        &self,
        hidden: &[f32],
        projected: &mut [f32],
        dead: Option<&[bool]>,
        segments: &mut [Segment<'_>],
        out: &mut [f32],
    ) -> Result<()> {
        let _ = (hidden, projected, dead, segments, out);
        Err(EngramError::Other(format!(
            "Engram layer {} does not precompute its projections",
            self.layer_id()
        )))
    }
}

/// Checks the buffers handed to [`EngramLayer::forward`]; returns the token count.
pub fn check_forward_args(
    cfg: &EngramConfig,
    hidden: usize,
    embeddings: usize,
    dead: Option<&[bool]>,
    segments: &[Segment<'_>],
    out: usize,
) -> Result<usize> {
    let tokens: usize = segments.iter().map(|s| s.len).sum();
    let expect = |what: &str, per_token: usize, got: usize| {
        if got == tokens * per_token {
            Ok(())
        } else {
            Err(EngramError::shape(
                what,
                format!("{tokens} tokens x {per_token} = {}", tokens * per_token),
                got,
            ))
        }
    };
    expect("hidden states", cfg.branch_channels(), hidden)?;
    expect("embeddings", cfg.embed_dim(), embeddings)?;
    expect("output", cfg.branch_channels(), out)?;
    if let Some(d) = dead {
        expect("dead-token mask", 1, d.len())?;
    }
    for s in segments {
        if let Some(c) = &s.conv {
            if c.channels() != cfg.branch_channels() || c.history() != cfg.conv_history() {
                return Err(EngramError::shape(
                    "short-conv state",
                    format!(
                        "{} rows x {} channels",
                        cfg.conv_history(),
                        cfg.branch_channels()
                    ),
                    format!("{} rows x {} channels", c.history(), c.channels()),
                ));
            }
        }
    }
    Ok(tokens)
}

/// Gathers every head's row for each token into `[tokens, embed_dim]` (heads concatenated).
pub fn gather_embeddings(table: &dyn TableStore, row_ids: &[u64], out: &mut [f32]) -> Result<()> {
    table.gather_f32(row_ids, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv_state_keeps_newest_rows() {
        let mut s = ShortConvState::with_size(2, 3);
        s.push_rows(&[1., 1., 2., 2.]);
        assert_eq!(s.rows(), &[0., 0., 1., 1., 2., 2.]);
        s.push_rows(&[3., 3., 4., 4., 5., 5., 6., 6.]);
        assert_eq!(s.rows(), &[4., 4., 5., 5., 6., 6.]);
        assert_eq!(s.row_back(1), &[6., 6.]);
        assert_eq!(s.row_back(3), &[4., 4.]);
    }
}
