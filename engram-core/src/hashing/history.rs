//! [`NgramHistory`]: the window and pad logic of one sequence decoded token by token.

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
