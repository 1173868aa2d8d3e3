//! Reusable work buffers of a layer forward, kept in a small pool so repeated forwards
//! (decode steps) do not reallocate and concurrent forwards on one layer do not contend.

use std::sync::Mutex;

/// Buffers one forward needs; each grows to the largest batch seen and stays.
#[derive(Default)]
pub(crate) struct Scratch {
    /// Projection output `[tokens, (hc_mult + 1) * hidden_size]`.
    pub kv: Vec<f32>,
    /// Paper: the normalized value `z` `[tokens, hc_mult * hidden_size]`.
    pub z: Vec<f32>,
    /// Paper: the segment each token belongs to.
    pub token_segment: Vec<u32>,
    /// Paper: the first token of each segment.
    pub segment_start: Vec<usize>,
    /// Paper: the conv pre-activation of one token when running serially.
    pub y: Vec<f32>,
    /// bf16 path: the f32 copies of the hidden states and of the output.
    pub hidden: Vec<f32>,
    pub out: Vec<f32>,
}

/// `buf[..len]`, growing `buf` if needed (new elements are zero; old ones keep stale values
/// that the caller overwrites).
pub(crate) fn sized<T: Copy + Default>(buf: &mut Vec<T>, len: usize) -> &mut [T] {
    if buf.len() < len {
        buf.resize(len, T::default());
    }
    &mut buf[..len]
}

/// A pool of [`Scratch`]es: `take` one, use it, `put` it back.
#[derive(Default)]
pub(crate) struct ScratchPool(Mutex<Vec<Scratch>>);

impl ScratchPool {
    pub(crate) fn take(&self) -> Scratch {
        self.0
            .lock()
            .ok()
            .and_then(|mut v| v.pop())
            .unwrap_or_default()
    }

    pub(crate) fn put(&self, s: Scratch) {
        if let Ok(mut v) = self.0.lock() {
            v.push(s);
        }
    }
}
