//! The runtime: tables, layers and per-sequence state of every Engram layer of a model,
//! driven by the host one step (one forward pass over a batch) at a time.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use engram_core::backend::EngramLayer;
use engram_core::compress::VocabCompression;
use engram_core::config::{EngramConfig, Variant};
use engram_core::hashing::EngramHasher;
use engram_core::sequence::{hash_step, SequenceState, StepTokens};
use engram_core::table::TableStore;

use crate::device::DeviceRows;
use crate::error::{PluginError, Result};
use crate::prefetch::{FetchJob, FetchSlot, Prefetcher};
use crate::stats::LookupStats;
use crate::step::{PendingFetch, Step};
use crate::trace::{TraceWriter, TracedInput};
use crate::windows::DeviceWindows;

/// One Engram layer as the runtime holds it.
pub struct RuntimeLayer {
    pub layer_id: usize,
    /// The table in host memory.
    pub table: Arc<dyn TableStore>,
    pub layer: Arc<dyn EngramLayer>,
    /// Set when the layer runs on a GPU: the prefetch moves its rows to the device and
    /// `apply` runs the layer there (`table` and `layer` then describe the same table and
    /// math on the host).
    pub device: Option<Arc<DeviceRows>>,
}

impl RuntimeLayer {
    /// A layer whose rows are gathered into host memory for `layer`.
    pub fn on_host(
        layer_id: usize,
        table: Arc<dyn TableStore>,
        layer: Arc<dyn EngramLayer>,
    ) -> Self {
        Self {
            layer_id,
            table,
            layer,
            device: None,
        }
    }
}

/// Where a sequence's new tokens sit along the time axis of the host's `[B, T, ...]` tensor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Padding {
    /// Tokens at `0..len`, padding after.
    #[default]
    Right,
    /// Tokens at `T-len..T`, padding before.
    Left,
}

#[derive(Clone, Debug)]
pub struct RuntimeOptions {
    /// Live sequence states kept at most; beyond it the least recently used is dropped
    /// (a host that never reports ended sequences still stays bounded).
    pub max_sequences: usize,
    /// Fetch rows on a background thread as soon as a step starts (else inside `apply`).
    pub prefetch: bool,
    /// Threads each prefetched gather is split over: a pool of the runtime's own, so a
    /// gather never waits behind the host's compute threads on rayon's global pool.
    /// Default: half the machine's cores, 1 to 8 (see [`default_prefetch_threads`]); 0
    /// counts as 1.
    pub prefetch_threads: usize,
    pub padding: Padding,
    /// Record every Engram layer's inputs and outputs in this directory (see
    /// [`crate::trace`]; for checking an integration, not for serving).
    pub trace_dir: Option<PathBuf>,
}

impl Default for RuntimeOptions {
    fn default() -> Self {
        Self {
            max_sequences: 4096,
            prefetch: true,
            prefetch_threads: default_prefetch_threads(),
            padding: Padding::Right,
            trace_dir: None,
        }
    }
}

/// Half the machine's cores, at least 1 and at most 8: a gather from memory is bound by
/// memory bandwidth well before it uses every core, and the other half stays with the
/// host (on 2 cores, the prefetch gets 1 thread and the host a core of its own).
pub fn default_prefetch_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / 2).clamp(1, 8)
}

/// The new tokens of one sequence in a step, as the host knows them.
#[derive(Clone, Copy, Debug)]
pub struct SequenceInput<'a> {
    /// Stable id of the sequence for its whole life.
    pub seq_id: u64,
    /// Raw tokenizer ids of the new tokens.
    pub tokens: &'a [u32],
    /// Position of the first new token (tokens the sequence had before).
    pub position: usize,
    /// V4.1 dead-token mask of the new tokens.
    pub dead: Option<&'a [bool]>,
    /// The tokens before `position` (at least the last `max_ngram_size - 1`), used to
    /// rebuild the n-gram history when the runtime has no state for this sequence (V4.1
    /// only: the paper variant's conv window cannot be rebuilt from ids).
    pub context: Option<&'a [u32]>,
}

impl<'a> SequenceInput<'a> {
    /// `tokens` of sequence `seq_id` from `position`, without a dead-token mask or context.
    pub fn new(seq_id: u64, tokens: &'a [u32], position: usize) -> Self {
        Self {
            seq_id,
            tokens,
            position,
            dead: None,
            context: None,
        }
    }
}

struct LiveSequence {
    state: SequenceState,
    last_used: u64,
}

#[derive(Default)]
struct SequenceTable {
    live: HashMap<u64, LiveSequence>,
    clock: u64,
}

pub struct EngramRuntime {
    cfg: EngramConfig,
    compression: Arc<VocabCompression>,
    hasher: EngramHasher,
    layers: Vec<RuntimeLayer>,
    options: RuntimeOptions,
    sequences: Mutex<SequenceTable>,
    prefetcher: Option<Prefetcher>,
    totals: Mutex<LookupStats>,
    trace: Option<TraceWriter>,
    /// Conv windows of sequences whose hidden states are on the GPU.
    windows: DeviceWindows,
}

impl EngramRuntime {
    /// A runtime over already opened layers (in `cfg.hash.layer_ids` order).
    pub fn from_parts(
        cfg: EngramConfig,
        compression: Arc<VocabCompression>,
        layers: Vec<RuntimeLayer>,
        options: RuntimeOptions,
    ) -> Result<Self> {
        cfg.validate()?;
        let ids: Vec<usize> = layers.iter().map(|l| l.layer_id).collect();
        if ids != cfg.hash.layer_ids {
            return Err(PluginError::Step(format!(
                "layers {ids:?} do not match the config's layer_ids {:?}",
                cfg.hash.layer_ids
            )));
        }
        let pad = compression.compress_id(cfg.hash.pad_id, 0)?;
        let hasher = EngramHasher::new(&cfg.hash, compression.compressed_vocab_size(), pad)?;
        let prefetcher = if options.prefetch {
            Some(Prefetcher::spawn(options.prefetch_threads).map_err(PluginError::Thread)?)
        } else {
            None
        };
        let trace = match &options.trace_dir {
            Some(dir) => Some(TraceWriter::create(
                dir,
                cfg.branch_channels(),
                &cfg.hash.layer_ids,
            )?),
            None => None,
        };
        Ok(Self {
            cfg,
            compression,
            hasher,
            layers,
            options: RuntimeOptions {
                max_sequences: options.max_sequences.max(1),
                ..options
            },
            sequences: Mutex::default(),
            prefetcher,
            totals: Mutex::default(),
            trace,
            windows: DeviceWindows::default(),
        })
    }

    pub fn config(&self) -> &EngramConfig {
        &self.cfg
    }

    pub fn options(&self) -> &RuntimeOptions {
        &self.options
    }

    pub fn layers(&self) -> &[RuntimeLayer] {
        &self.layers
    }

    /// Whether host layer `layer_id` carries an Engram layer.
    pub fn is_engram_layer(&self, layer_id: usize) -> bool {
        self.cfg.hash.layer_ids.contains(&layer_id)
    }

    /// Sequence states held now (between steps).
    pub fn live_sequences(&self) -> usize {
        self.lock_sequences().live.len()
    }

    /// Totals over every finished step.
    pub fn stats(&self) -> LookupStats {
        *self.totals.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The device stores' own counters (bytes moved, cache hit rate), by layer id; empty
    /// unless the layers run on a GPU.
    pub fn device_table_stats(&self) -> Vec<(usize, engram_cuda::TableStats)> {
        self.layers
            .iter()
            .filter_map(|l| Some((l.layer_id, l.device.as_ref()?.table_stats())))
            .collect()
    }

    /// Frees the state of sequences the host has finished with.
    pub fn end_sequences(&self, seq_ids: &[u64]) {
        let mut table = self.lock_sequences();
        for id in seq_ids {
            table.live.remove(id);
        }
        self.windows.remove(seq_ids);
    }

    /// Starts a step: frees `ended`, hashes every new token of `inputs` (ids alone are
    /// enough) and starts fetching every Engram layer's rows in the background.
    pub fn begin_step(&self, inputs: &[SequenceInput<'_>], ended: &[u64]) -> Result<Step<'_>> {
        let started = Instant::now();
        self.end_sequences(ended);
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = inputs.iter().find(|i| !seen.insert(i.seq_id)) {
            return Err(PluginError::Step(format!(
                "sequence {} appears twice in one step",
                dup.seq_id
            )));
        }
        let compressed = inputs
            .iter()
            .map(|i| {
                let ids: Vec<i64> = i.tokens.iter().map(|&t| t as i64).collect();
                self.compression
                    .compress(&ids)
                    .map_err(|source| PluginError::Sequence {
                        seq_id: i.seq_id,
                        source,
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut states = self.take_states(inputs)?;
        let batch: Vec<StepTokens<'_>> = inputs
            .iter()
            .zip(&compressed)
            .map(|(i, ids)| StepTokens { ids, dead: i.dead })
            .collect();
        let mut refs: Vec<&mut SequenceState> = states.iter_mut().map(|(_, s)| s).collect();
        let rows = match hash_step(&self.hasher, &mut refs, &batch) {
            Ok(rows) => rows,
            Err(e) => {
                self.return_states(states);
                return Err(e.into());
            }
        };
        let fetches = self
            .layers
            .iter()
            .zip(&rows.rows)
            .map(|(layer, r)| {
                let job = FetchJob {
                    table: layer.table.clone(),
                    device: layer.device.clone(),
                    // A host layer projects its rows where they are fetched.
                    project: layer.device.is_none().then(|| layer.layer.clone()),
                    rows: Arc::new(r.clone()),
                    slot: Arc::new(FetchSlot::default()),
                };
                match &self.prefetcher {
                    Some(p) => {
                        let slot = job.slot.clone();
                        p.submit(job);
                        PendingFetch::Queued(slot)
                    }
                    None => PendingFetch::Deferred(job),
                }
            })
            .collect();
        let traced = self.trace.as_ref().map(|_| {
            inputs
                .iter()
                .map(|i| TracedInput {
                    seq_id: i.seq_id,
                    position: i.position,
                    tokens: i.tokens.to_vec(),
                })
                .collect()
        });
        Ok(Step::new(self, states, rows, fetches, traced, started))
    }

    /// Moves each input's state out of the table (or creates it), checking positions.
    fn take_states(&self, inputs: &[SequenceInput<'_>]) -> Result<Vec<(u64, SequenceState)>> {
        let mut table = self.lock_sequences();
        let mut taken = Vec::with_capacity(inputs.len());
        for input in inputs {
            let state = match table.live.remove(&input.seq_id) {
                _ if input.position == 0 => Ok(SequenceState::new(&self.cfg)),
                Some(live) if live.state.position == input.position => Ok(live.state),
                existing => {
                    let reason = match &existing {
                        Some(live) => format!("is at position {}", live.state.position),
                        None => {
                            "holds no state for it (never started at position 0, ended, or evicted)"
                                .into()
                        }
                    };
                    if let Some(live) = existing {
                        table.live.insert(input.seq_id, live);
                    }
                    self.rebuild_state(input).ok_or(PluginError::MissingState {
                        seq_id: input.seq_id,
                        position: input.position,
                        reason,
                    })
                }
            };
            match state {
                Ok(s) => taken.push((input.seq_id, s)),
                Err(e) => {
                    drop(table);
                    self.return_states(taken);
                    return Err(e);
                }
            }
        }
        Ok(taken)
    }

    /// V4.1 state is only the n-gram history, which the ids before `position` give back.
    fn rebuild_state(&self, input: &SequenceInput<'_>) -> Option<SequenceState> {
        let context = input.context?;
        let keep = self.cfg.hash.max_ngram_size - 1;
        if self.cfg.variant != Variant::V41
            || context.len() < keep.min(input.position)
            || context.len() > input.position
        {
            return None;
        }
        let mut state = SequenceState::new(&self.cfg);
        for &t in &context[context.len().saturating_sub(keep)..] {
            let id = self.compression.compress_id(t as i64, 0).ok()?;
            state.history.push(id, false);
        }
        state.position = input.position;
        Some(state)
    }

    /// Puts states back after a step, dropping the least recently used beyond the bound.
    pub(crate) fn return_states(&self, states: Vec<(u64, SequenceState)>) -> u64 {
        let mut table = self.lock_sequences();
        table.clock += 1;
        let now = table.clock;
        for (id, state) in states {
            table.live.insert(
                id,
                LiveSequence {
                    state,
                    last_used: now,
                },
            );
        }
        let mut evicted = 0;
        let excess = table.live.len().saturating_sub(self.options.max_sequences);
        if excess > 0 {
            let mut by_age: Vec<(u64, u64)> = table
                .live
                .iter()
                .map(|(&id, l)| (l.last_used, id))
                .collect();
            by_age.select_nth_unstable(excess - 1);
            for &(_, id) in &by_age[..excess] {
                table.live.remove(&id);
                evicted += 1;
            }
            let ids: Vec<u64> = by_age[..excess].iter().map(|&(_, id)| id).collect();
            self.windows.remove(&ids);
        }
        evicted
    }

    pub(crate) fn windows(&self) -> &DeviceWindows {
        &self.windows
    }

    pub(crate) fn trace(&self) -> Option<&TraceWriter> {
        self.trace.as_ref()
    }

    pub(crate) fn record(&self, stats: &LookupStats) {
        self.totals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add(stats);
    }

    fn lock_sequences(&self) -> std::sync::MutexGuard<'_, SequenceTable> {
        self.sequences.lock().unwrap_or_else(|e| e.into_inner())
    }
}
