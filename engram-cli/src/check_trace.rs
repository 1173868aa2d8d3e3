//! `engram check-trace`: a host's Engram trace (`RuntimeOptions::trace_dir`) against the
//! core reference forward on the same hidden states and token ids.
//!
//! Each traced sequence is replayed as one whole-sequence step through a runtime whose
//! layers are the reference math (f64 accumulation), fed the hidden states the host
//! handed its Engram layers; the host's outputs must match. The host may have fed the
//! sequence in any chunks (prefill, decode, batched with others): the replay does not.
//! A sequence the host started again at position 0 is replayed once per start.
//! V4.1 dead-token masks are not in the trace: the replay assumes none (mistral.rs passes
//! none), so a host that passes them cannot be checked this way yet.

use std::path::Path;

use anyhow::{bail, Context, Result};
use engram_plugin::{
    BackendKind, EngramRuntime, OpenOptions, RuntimeOptions, SequenceInput, Trace,
};
use serde::Serialize;

use engram_core::metrics::{relative_error, worse};

/// One sequence at one Engram layer.
#[derive(Clone, Debug, Serialize)]
pub struct LayerCheck {
    pub seq_id: u64,
    /// Which start of the sequence at position 0 (0 for the first; an engine may
    /// recompute a sequence from scratch, which starts a new run).
    pub run: usize,
    pub layer_id: usize,
    pub tokens: usize,
    /// Relative error (L2) of what the layer added to the residual stream (paper variant)
    /// or of its output (V4.1), host vs reference.
    pub rel_err: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TraceReport {
    pub checks: Vec<LayerCheck>,
    /// What the trace cannot be checked on (gaps in positions, layers missing, ...).
    pub problems: Vec<String>,
    pub max_rel_err: f64,
    pub tolerance: f64,
}

impl TraceReport {
    pub fn passed(&self) -> bool {
        self.problems.is_empty() && !self.checks.is_empty() && self.max_rel_err <= self.tolerance
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        for c in &self.checks {
            s.push_str(&format!(
                "sequence {} (run {}) layer {}: {} tokens, rel err {:.3e}\n",
                c.seq_id, c.run, c.layer_id, c.tokens, c.rel_err
            ));
        }
        for p in &self.problems {
            s.push_str(&format!("problem: {p}\n"));
        }
        s.push_str(&format!(
            "{}: {} (sequence, layer) pairs, max rel err {:.3e} (tolerance {:.1e})\n",
            if self.passed() { "PASS" } else { "FAIL" },
            self.checks.len(),
            self.max_rel_err,
            self.tolerance
        ));
        s
    }
}

/// Checks the trace in `trace_dir` against the Engram model at `model` (the directory or
/// file the host opened its runtime from).
pub fn check_trace(model: &Path, trace_dir: &Path, tolerance: f64) -> Result<TraceReport> {
    let options = OpenOptions {
        backend: BackendKind::Reference,
        runtime: RuntimeOptions {
            prefetch: false,
            ..Default::default()
        },
        ..Default::default()
    };
    let runtime = EngramRuntime::open(model, options)?
        .with_context(|| format!("{}: no Engram config", model.display()))?;
    let trace = Trace::read(trace_dir)?;
    let cfg = runtime.config();
    if trace.channels != cfg.branch_channels() || trace.layer_ids != cfg.hash.layer_ids {
        bail!(
            "{}: the trace is of {} channels at layers {:?}; the model at {} has {} at {:?}",
            trace_dir.display(),
            trace.channels,
            trace.layer_ids,
            model.display(),
            cfg.branch_channels(),
            cfg.hash.layer_ids
        );
    }
    let c = trace.channels;
    let mut report = TraceReport {
        checks: Vec::new(),
        problems: Vec::new(),
        max_rel_err: 0.0,
        tolerance,
    };
    for (&seq_id, layers) in &trace.sequences {
        let first = &layers[0];
        let ids: Vec<usize> = layers.iter().map(|l| l.layer_id).collect();
        if ids != trace.layer_ids {
            report.problems.push(format!(
                "sequence {seq_id}: traced at layers {ids:?}, not every Engram layer {:?}",
                trace.layer_ids
            ));
            continue;
        }
        if let Some(l) = layers
            .iter()
            .find(|l| l.positions != first.positions || l.tokens != first.tokens)
        {
            report.problems.push(format!(
                "sequence {seq_id}: layer {} saw other tokens than layer {}",
                l.layer_id, first.layer_id
            ));
            continue;
        }
        let Some(runs) = runs(&first.positions) else {
            report.problems.push(format!(
                "sequence {seq_id}: positions {:?}... do not run 0, 1, 2, ... from each \
                 start at 0 (a reused trace directory, or a host that skipped or repeated \
                 tokens)",
                &first.positions[..first.positions.len().min(8)]
            ));
            continue;
        };
        for (run, tokens) in runs.into_iter().enumerate() {
            let input = SequenceInput {
                seq_id,
                tokens: &first.tokens[tokens.clone()],
                position: 0,
                dead: None,
                context: None,
            };
            let mut step = runtime.begin_step(&[input], &[])?;
            let rows = tokens.start * c..tokens.end * c;
            for layer in layers {
                let hidden = &layer.input[rows.clone()];
                let host = &layer.output[rows.clone()];
                let expected = step.apply_packed(layer.layer_id, hidden)?;
                let rel_err = if cfg.variant.output_is_delta() {
                    let added = |out: &[f32]| -> Vec<f32> {
                        out.iter().zip(hidden).map(|(o, h)| o - h).collect()
                    };
                    relative_error(&added(host), &added(&expected))
                } else {
                    relative_error(host, &expected)
                };
                // `worse` keeps a NaN, which then fails the tolerance check.
                report.max_rel_err = worse(report.max_rel_err, rel_err);
                report.checks.push(LayerCheck {
                    seq_id,
                    run,
                    layer_id: layer.layer_id,
                    tokens: tokens.len(),
                    rel_err,
                });
            }
            step.finish();
            runtime.end_sequences(&[seq_id]);
        }
    }
    Ok(report)
}

/// A sequence's records split where the host started it again at position 0 (an engine
/// may recompute a sequence from scratch); `None` unless each part runs 0, 1, 2, ...
fn runs(positions: &[u64]) -> Option<Vec<std::ops::Range<usize>>> {
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for (i, &p) in positions.iter().enumerate() {
        if p == 0 {
            runs.push(i..i + 1);
            continue;
        }
        let run = runs.last_mut()?;
        if p as usize != i - run.start {
            return None;
        }
        run.end = i + 1;
    }
    Some(runs)
}

#[cfg(test)]
mod tests {
    use super::runs;

    #[test]
    #[allow(clippy::single_range_in_vec_init)]
    fn a_sequence_started_again_at_zero_is_a_new_run() {
        assert_eq!(runs(&[0, 1, 2]), Some(vec![0..3]));
        assert_eq!(runs(&[0, 1, 2, 0, 1, 2, 3]), Some(vec![0..3, 3..7]));
        assert_eq!(runs(&[0, 0]), Some(vec![0..1, 1..2]));
        assert_eq!(runs(&[]), Some(vec![]));
        assert_eq!(runs(&[1, 2]), None);
        assert_eq!(runs(&[0, 1, 3]), None);
        assert_eq!(runs(&[0, 1, 1]), None);
    }
}
