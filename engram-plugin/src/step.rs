//! One forward pass of the host: rows were hashed and their fetch started when the step
//! began; at each Engram layer the host hands over its hidden states and gets them back
//! with Engram applied, waiting only for rows not yet fetched.

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor};
use engram_core::sequence::{layer_segments, SequenceState, StepRows};

use crate::error::{PluginError, Result};
use crate::prefetch::{FetchJob, FetchOutcome, FetchSlot, FetchedRows};
use crate::runtime::{EngramRuntime, Padding};
use crate::stats::LookupStats;
use crate::trace::TracedInput;

#[cfg(feature = "cuda")]
mod cuda;

/// A layer's rows: queued on the prefetch thread, or to be gathered when asked for.
pub(crate) enum PendingFetch {
    Queued(Arc<FetchSlot>),
    Deferred(FetchJob),
    Consumed,
}

pub struct Step<'r> {
    runtime: &'r EngramRuntime,
    states: Vec<(u64, SequenceState)>,
    rows: StepRows,
    fetches: Vec<PendingFetch>,
    stats: LookupStats,
    closed: bool,
    /// The step's inputs, kept only when the runtime traces.
    traced: Option<Vec<TracedInput>>,
}

impl<'r> Step<'r> {
    pub(crate) fn new(
        runtime: &'r EngramRuntime,
        states: Vec<(u64, SequenceState)>,
        rows: StepRows,
        fetches: Vec<PendingFetch>,
        traced: Option<Vec<TracedInput>>,
        began: Instant,
    ) -> Self {
        let tokens = rows.tokens() as u64;
        let row_count: u64 = rows.rows.iter().map(|r| r.len() as u64).sum();
        let bytes: u64 = runtime
            .layers()
            .iter()
            .zip(&rows.rows)
            .map(|(l, r)| (r.len() * l.table.row_bytes()) as u64)
            .sum();
        Self {
            runtime,
            states,
            rows,
            fetches,
            stats: LookupStats {
                steps: 1,
                tokens,
                rows_fetched: row_count,
                bytes_fetched: bytes,
                host_time: began.elapsed(),
                ..Default::default()
            },
            closed: false,
            traced,
        }
    }

    /// New tokens of each sequence, in batch order.
    pub fn lens(&self) -> &[usize] {
        &self.rows.lens
    }

    /// Row ids (offsets added) of Engram layer `layer_id`, `[tokens, heads]`.
    pub fn row_ids(&self, layer_id: usize) -> Result<&[u64]> {
        Ok(&self.rows.rows[self.runtime.config().layer_index(layer_id)?])
    }

    /// Applies Engram layer `layer_id` to packed hidden states `[tokens, hc_mult*hidden]`
    /// (each sequence's new tokens back to back, in batch order) and returns the new
    /// hidden states (the residual stream after Engram), same layout.
    pub fn apply_packed(&mut self, layer_id: usize, hidden: &[f32]) -> Result<Vec<f32>> {
        let started = Instant::now();
        let out = self.apply_host(layer_id, hidden);
        self.stats.host_time += started.elapsed();
        out
    }

    /// [`Self::apply_packed`], untimed.
    fn apply_host(&mut self, layer_id: usize, hidden: &[f32]) -> Result<Vec<f32>> {
        let cfg = self.runtime.config();
        let l = cfg.layer_index(layer_id)?;
        let fetched = self.take_rows(l, layer_id)?;
        self.windows_to_host(l)?;
        let mut out = vec![0f32; hidden.len()];
        let mut refs: Vec<&mut SequenceState> = self.states.iter_mut().map(|(_, s)| s).collect();
        let mut segments = layer_segments(&mut refs, &self.rows.lens, l);
        let layer = &self.runtime.layers()[l];
        let dead = self.rows.dead.as_deref();
        match (fetched, &layer.device) {
            (FetchedRows::Host(emb), _) => {
                layer
                    .layer
                    .forward(hidden, &emb, dead, &mut segments, &mut out)?;
            }
            (FetchedRows::Projected(mut kv), _) => {
                layer
                    .layer
                    .forward_projected(hidden, &mut kv, dead, &mut segments, &mut out)?;
            }
            (FetchedRows::Device(ticket), Some(device)) => device
                .apply(ticket, hidden, dead, &mut segments, &mut out)
                .map_err(|source| PluginError::Cuda {
                    what: format!("Engram layer {layer_id} on the GPU"),
                    source,
                })?,
            (FetchedRows::Device(_), None) => {
                return Err(PluginError::Step(format!(
                    "Engram layer {layer_id}: device rows for a layer on the host"
                )))
            }
        }
        if cfg.variant.output_is_delta() {
            for (o, &h) in out.iter_mut().zip(hidden) {
                // A zero delta leaves the value's bits alone (-0.0 + 0.0 would give +0.0),
                // so a layer that adds nothing is exactly the identity.
                *o = if *o == 0.0 { h } else { h + *o };
            }
        }
        if let (Some(trace), Some(inputs)) = (self.runtime.trace(), &self.traced) {
            trace.record(layer_id, inputs, hidden, &out)?;
        }
        Ok(out)
    }

    /// Applies Engram layer `layer_id` to the host's hidden states `[B, T, C]` or
    /// `[B, T, hc_mult, hidden]` (B = sequences of the step in order; each sequence's new
    /// tokens along T as the runtime's [`Padding`] says). Returns the same shape, dtype
    /// and device; padding positions are returned unchanged.
    pub fn apply(&mut self, layer_id: usize, hidden: &Tensor) -> Result<Tensor> {
        let started = Instant::now();
        let out = self.apply_tensor(layer_id, hidden);
        self.stats.host_time += started.elapsed();
        out
    }

    /// [`Self::apply`], untimed.
    fn apply_tensor(&mut self, layer_id: usize, hidden: &Tensor) -> Result<Tensor> {
        let cfg = self.runtime.config();
        let c = cfg.branch_channels();
        let dims = hidden.dims().to_vec();
        let (b, t) = match dims.as_slice() {
            [b, t, rest @ ..] if rest.iter().product::<usize>() == c && !rest.is_empty() => (*b, *t),
            _ => {
                return Err(PluginError::Step(format!(
                    "hidden states of Engram layer {layer_id} have shape {dims:?}; expected [batch, tokens, {c}] or [batch, tokens, {}, {}]",
                    cfg.hc_mult, cfg.hidden_size
                )))
            }
        };
        let lens = self.rows.lens.clone();
        if b != lens.len() || lens.iter().any(|&n| n > t) {
            return Err(PluginError::Step(format!(
                "hidden states of Engram layer {layer_id} have shape {dims:?}, but the step has {} sequences of {:?} new tokens",
                lens.len(),
                lens
            )));
        }
        if hidden.device().is_cuda() {
            #[cfg(feature = "cuda")]
            if let Some(device) = self.runtime.layers()[cfg.layer_index(layer_id)?]
                .device
                .clone()
            {
                return self.apply_cuda(layer_id, hidden, &device, t);
            }
            // A runtime opened on the host (or a plugin built without `cuda`): the hidden
            // states make the round trip through host memory. Said once, not per layer.
            static ROUND_TRIP: std::sync::Once = std::sync::Once::new();
            ROUND_TRIP.call_once(|| {
                tracing::warn!(
                    "Engram: hidden states on {:?} are copied to the host and back at every \
                     Engram layer ({})",
                    hidden.device().location(),
                    if cfg!(feature = "cuda") {
                        "the runtime's layers are not on a GPU: set ENGRAM_BACKEND=cuda"
                    } else {
                        "engram-plugin was built without its `cuda` feature"
                    }
                )
            });
        }
        let (dtype, device) = (hidden.dtype(), hidden.device().clone());
        let mut full = hidden
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let start_of = |seq: usize, len: usize| match self.runtime.options().padding {
            Padding::Right => seq * t,
            Padding::Left => seq * t + t - len,
        };
        let mut packed = Vec::with_capacity(lens.iter().sum::<usize>() * c);
        for (seq, &len) in lens.iter().enumerate() {
            let s = start_of(seq, len);
            packed.extend_from_slice(&full[s * c..(s + len) * c]);
        }
        let updated = self.apply_host(layer_id, &packed)?;
        let mut at = 0;
        for (seq, &len) in lens.iter().enumerate() {
            let s = start_of(seq, len);
            full[s * c..(s + len) * c].copy_from_slice(&updated[at * c..(at + len) * c]);
            at += len;
        }
        Ok(Tensor::from_vec(full, dims, &candle_core::Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(&device)?)
    }

    /// Ends the step: states go back to the runtime, stats are recorded and returned.
    pub fn finish(mut self) -> LookupStats {
        self.close();
        self.stats
    }

    /// Before a host apply of layer `l`: sequences whose window an earlier CUDA step left
    /// in device memory take it back into their host state (only when hosts mix CPU and
    /// CUDA tensors for one sequence).
    fn windows_to_host(&mut self, l: usize) -> Result<()> {
        let windows = self.runtime.windows();
        let Some(device) = &self.runtime.layers()[l].device else {
            return Ok(());
        };
        if windows.is_empty() {
            return Ok(());
        }
        for ((seq_id, state), &len) in self.states.iter_mut().zip(&self.rows.lens) {
            let start = state.position.saturating_sub(len);
            if let Some(host) = state.conv.get_mut(l) {
                windows
                    .sync_to_host(device.backend(), *seq_id, l, start, host)
                    .map_err(|source| PluginError::Cuda {
                        what: format!("sequence {seq_id}: taking its conv window to the host"),
                        source,
                    })?;
            }
        }
        Ok(())
    }

    fn take_rows(&mut self, l: usize, layer_id: usize) -> Result<FetchedRows> {
        let (outcome, waited) =
            match std::mem::replace(&mut self.fetches[l], PendingFetch::Consumed) {
                PendingFetch::Queued(slot) => slot.wait(),
                PendingFetch::Deferred(job) => {
                    let slot = job.slot.clone();
                    job.run();
                    let (outcome, _) = slot.wait();
                    // Fetching inside `apply` is all exposed.
                    let took = outcome.took;
                    (outcome, took)
                }
                PendingFetch::Consumed => {
                    return Err(PluginError::Step(format!(
                        "Engram layer {layer_id} was applied twice in one step"
                    )))
                }
            };
        self.count(&outcome);
        self.stats.exposed_wait += waited;
        outcome
            .rows
            .map_err(|source| PluginError::Fetch { layer_id, source })
    }

    fn count(&mut self, outcome: &FetchOutcome) {
        self.stats.fetch_time += outcome.took;
        // Layers' caches are separate: their sizes add up within a step.
        self.stats.store.add(&outcome.store);
    }

    fn close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        let started = Instant::now();
        // Rows never asked for still had to be fetched; wait so the stats stay whole.
        let mut unapplied = Vec::new();
        for (l, f) in self.fetches.iter_mut().enumerate() {
            if !matches!(f, PendingFetch::Consumed) {
                tracing::warn!(
                    layer = self.runtime.layers()[l].layer_id,
                    "Engram layer not applied in this step"
                );
            }
            if let PendingFetch::Queued(slot) = std::mem::replace(f, PendingFetch::Consumed) {
                unapplied.push(slot.wait().0);
            }
        }
        for outcome in &unapplied {
            self.count(outcome);
        }
        self.stats.evicted_sequences = self.runtime.return_states(std::mem::take(&mut self.states));
        self.stats.host_time += started.elapsed();
        self.runtime.record(&self.stats);
    }
}

impl Drop for Step<'_> {
    fn drop(&mut self) {
        self.close();
    }
}
