//! A record of what a host handed each Engram layer and what it got back, per sequence
//! and token: with it an integration can be checked against the reference forward on the
//! same hidden states and ids (`engram check-trace`). Off by default
//! ([`RuntimeOptions::trace_dir`](crate::RuntimeOptions)); meant for tests and debugging.
//!
//! Layout of a trace directory:
//! - `trace.json`: `{"format": 1, "channels": C, "layer_ids": [...]}`;
//! - `seq{S}.layer{L}.bin`: one record per token of sequence `S` at Engram layer `L`, in
//!   the order the host fed them: position (u64 LE), raw token id (u32 LE), the `C`
//!   hidden values in and the `C` out (f32 LE).

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use engram_core::EngramError;

use crate::error::{PluginError, Result};

const FORMAT: u64 = 1;
const INDEX: &str = "trace.json";

/// Writes trace records; one per runtime.
pub(crate) struct TraceWriter {
    dir: PathBuf,
    channels: usize,
    /// Serializes appends from concurrent steps.
    lock: Mutex<()>,
}

/// One sequence's new tokens in a step, as the trace needs them.
#[derive(Clone, Debug)]
pub(crate) struct TracedInput {
    pub seq_id: u64,
    pub position: usize,
    pub tokens: Vec<u32>,
}

impl TraceWriter {
    pub(crate) fn create(dir: &Path, channels: usize, layer_ids: &[usize]) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| EngramError::file(dir, e))?;
        let index = dir.join(INDEX);
        let text = serde_json::json!({
            "format": FORMAT,
            "channels": channels,
            "layer_ids": layer_ids,
        });
        fs::write(&index, format!("{text}\n")).map_err(|e| EngramError::file(&index, e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            channels,
            lock: Mutex::new(()),
        })
    }

    /// Appends layer `layer_id`'s packed inputs and outputs (`inputs`' tokens back to back).
    pub(crate) fn record(
        &self,
        layer_id: usize,
        inputs: &[TracedInput],
        hidden: &[f32],
        out: &[f32],
    ) -> Result<()> {
        let c = self.channels;
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut at = 0;
        for input in inputs {
            let path = self
                .dir
                .join(format!("seq{}.layer{layer_id}.bin", input.seq_id));
            let mut bytes = Vec::with_capacity(input.tokens.len() * (12 + 8 * c));
            for (i, &token) in input.tokens.iter().enumerate() {
                bytes.extend_from_slice(&((input.position + i) as u64).to_le_bytes());
                bytes.extend_from_slice(&token.to_le_bytes());
                let row = (at + i) * c..(at + i + 1) * c;
                for v in hidden[row.clone()].iter().chain(&out[row]) {
                    bytes.extend_from_slice(&v.to_le_bytes());
                }
            }
            at += input.tokens.len();
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .and_then(|mut f| f.write_all(&bytes))
                .map_err(|e| EngramError::file(&path, format!("cannot write the trace: {e}")))?;
        }
        Ok(())
    }
}

/// Everything one sequence went through at one Engram layer, in the order it was fed.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerTrace {
    pub seq_id: u64,
    pub layer_id: usize,
    pub positions: Vec<u64>,
    pub tokens: Vec<u32>,
    /// `[tokens, channels]` hidden states handed to the layer.
    pub input: Vec<f32>,
    /// `[tokens, channels]` the residual stream the layer gave back.
    pub output: Vec<f32>,
}

/// A trace directory read back.
#[derive(Clone, Debug)]
pub struct Trace {
    pub channels: usize,
    pub layer_ids: Vec<usize>,
    /// By sequence id, then in `layer_ids` order (layers a sequence never reached are absent).
    pub sequences: BTreeMap<u64, Vec<LayerTrace>>,
}

impl Trace {
    /// Reads `dir`, refusing a record file whose size is not whole records.
    pub fn read(dir: &Path) -> Result<Self> {
        let index_path = dir.join(INDEX);
        let text =
            fs::read_to_string(&index_path).map_err(|e| EngramError::file(&index_path, e))?;
        let bad = |why: String| PluginError::Engram(EngramError::file(&index_path, why));
        let index: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        if index["format"].as_u64() != Some(FORMAT) {
            return Err(bad(format!("not an Engram trace of format {FORMAT}")));
        }
        let channels = index["channels"]
            .as_u64()
            .filter(|&c| c > 0)
            .ok_or_else(|| bad("no `channels`".into()))? as usize;
        let layer_ids: Vec<usize> = index["layer_ids"]
            .as_array()
            .ok_or_else(|| bad("no `layer_ids`".into()))?
            .iter()
            .map(|v| v.as_u64().map(|x| x as usize))
            .collect::<Option<_>>()
            .ok_or_else(|| bad("`layer_ids` must be integers".into()))?;

        let mut sequences: BTreeMap<u64, Vec<LayerTrace>> = BTreeMap::new();
        let entries = fs::read_dir(dir).map_err(|e| EngramError::file(dir, e))?;
        for entry in entries {
            let path = entry.map_err(|e| EngramError::file(dir, e))?.path();
            let Some((seq_id, layer_id)) = parse_record_name(&path) else {
                continue;
            };
            let layer = read_records(&path, seq_id, layer_id, channels)?;
            sequences.entry(seq_id).or_default().push(layer);
        }
        for layers in sequences.values_mut() {
            layers.sort_by_key(|l| {
                layer_ids
                    .iter()
                    .position(|&id| id == l.layer_id)
                    .unwrap_or(usize::MAX)
            });
        }
        Ok(Self {
            channels,
            layer_ids,
            sequences,
        })
    }
}

/// `seq{S}.layer{L}.bin` -> (S, L).
fn parse_record_name(path: &Path) -> Option<(u64, usize)> {
    let name = path.file_name()?.to_str()?;
    let rest = name.strip_prefix("seq")?.strip_suffix(".bin")?;
    let (seq, layer) = rest.split_once(".layer")?;
    Some((seq.parse().ok()?, layer.parse().ok()?))
}

fn read_records(path: &Path, seq_id: u64, layer_id: usize, c: usize) -> Result<LayerTrace> {
    let record = c
        .checked_mul(8)
        .and_then(|b| b.checked_add(12))
        .ok_or_else(|| {
            PluginError::Engram(EngramError::file(
                path,
                format!("{c} channels per record is more than any trace holds"),
            ))
        })?;
    let bytes = fs::read(path).map_err(|e| EngramError::file(path, e))?;
    if bytes.len() % record != 0 {
        return Err(PluginError::Engram(EngramError::file(
            path,
            format!(
                "{} bytes is not a whole number of {record}-byte records ({c} channels)",
                bytes.len()
            ),
        )));
    }
    let n = bytes.len() / record;
    let f32_at = |at: usize| f32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    let mut trace = LayerTrace {
        seq_id,
        layer_id,
        positions: Vec::with_capacity(n),
        tokens: Vec::with_capacity(n),
        input: Vec::with_capacity(n * c),
        output: Vec::with_capacity(n * c),
    };
    for r in bytes.chunks_exact(record) {
        trace
            .positions
            .push(u64::from_le_bytes(r[..8].try_into().unwrap()));
        trace
            .tokens
            .push(u32::from_le_bytes(r[8..12].try_into().unwrap()));
    }
    for i in 0..n {
        let base = i * record + 12;
        trace.input.extend((0..c).map(|j| f32_at(base + 4 * j)));
        trace
            .output
            .extend((0..c).map(|j| f32_at(base + 4 * (c + j))));
    }
    Ok(trace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_in_order_and_torn_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let w = TraceWriter::create(dir.path(), 2, &[3, 1]).unwrap();
        let a = TracedInput {
            seq_id: 7,
            position: 0,
            tokens: vec![10, 11],
        };
        let b = TracedInput {
            seq_id: 9,
            position: 4,
            tokens: vec![12],
        };
        let hidden = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let out = [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0];
        w.record(3, &[a.clone(), b], &hidden, &out).unwrap();
        let a2 = TracedInput {
            position: 2,
            tokens: vec![13],
            ..a
        };
        w.record(3, std::slice::from_ref(&a2), &[7.0, 8.0], &[-7.0, -8.0])
            .unwrap();
        w.record(1, &[a2], &[0.5, 0.25], &[0.0, 1.0]).unwrap();

        let t = Trace::read(dir.path()).unwrap();
        assert_eq!((t.channels, t.layer_ids.clone()), (2, vec![3, 1]));
        let seven = &t.sequences[&7];
        assert_eq!(seven.iter().map(|l| l.layer_id).collect::<Vec<_>>(), [3, 1]);
        assert_eq!(seven[0].positions, [0, 1, 2]);
        assert_eq!(seven[0].tokens, [10, 11, 13]);
        assert_eq!(seven[0].input, [1.0, 2.0, 3.0, 4.0, 7.0, 8.0]);
        assert_eq!(seven[0].output, [-1.0, -2.0, -3.0, -4.0, -7.0, -8.0]);
        assert_eq!(t.sequences[&9][0].positions, [4]);
        assert_eq!(t.sequences[&9][0].input, [5.0, 6.0]);

        let torn = dir.path().join("seq9.layer3.bin");
        let mut bytes = fs::read(&torn).unwrap();
        bytes.pop();
        fs::write(&torn, bytes).unwrap();
        let err = Trace::read(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("seq9.layer3.bin") && err.contains("whole number"),
            "{err}"
        );
    }

    #[test]
    fn a_channel_count_past_any_record_size_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let w = TraceWriter::create(dir.path(), 2, &[1]).unwrap();
        let a = TracedInput {
            seq_id: 1,
            position: 0,
            tokens: vec![5],
        };
        w.record(1, &[a], &[1.0, 2.0], &[3.0, 4.0]).unwrap();
        // 8 * 2^61 wraps to 0 in a u64: unchecked, records would be 12 bytes long.
        for channels in [1u64 << 61, u64::MAX] {
            let index = serde_json::json!({"format": 1, "channels": channels, "layer_ids": [1]});
            fs::write(dir.path().join(INDEX), index.to_string()).unwrap();
            let err = Trace::read(dir.path()).unwrap_err().to_string();
            assert!(
                err.contains("seq1.layer1.bin") && err.contains("channels"),
                "{err}"
            );
        }
    }
}
