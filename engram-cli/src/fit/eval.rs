//! `engram eval`: token-level perplexity and next-token accuracy of a model on text
//! files, through the forward `engram fit` trains ([`super::model`]), with the model
//! directory's Engram layers or without them (`--no-engram`, or a model with none).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use engram_core::config::EngramConfig;
use serde::Serialize;

use super::checkpoint::load_layers;
use super::data::{load_windows, model_tokenizer};
use super::llama::Llama;
use super::model::{correct, hidden_of, token_nll, EngramParts};
use crate::init_checkpoint::ENGRAM_FILE;

/// What `engram eval` takes.
#[derive(Clone, Debug, clap::Args)]
pub struct EvalArgs {
    /// The model directory (a checkpoint `engram fit` or `init-checkpoint` wrote, or a
    /// plain model).
    #[arg(long)]
    pub model: PathBuf,
    /// Text files to measure on.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// The host model alone, even where the directory has Engram layers.
    #[arg(long)]
    pub no_engram: bool,
    /// Tokens per window (as `engram fit --window`).
    #[arg(long, default_value_t = 128)]
    pub window: usize,
    /// Windows per forward.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Print {"files", "tokens", "ppl", "accuracy"} as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Perplexity and accuracy over the predicted tokens of every window.
#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub files: usize,
    pub tokens: usize,
    pub ppl: f64,
    pub accuracy: f64,
    /// Whether Engram layers were applied.
    #[serde(skip)]
    pub engram: bool,
}

impl EvalReport {
    pub fn to_text(&self) -> String {
        format!(
            "{} files, {} tokens, {}: perplexity {:.4}, next-token accuracy {:.4}\n",
            self.files,
            self.tokens,
            if self.engram {
                "with Engram"
            } else {
                "host alone"
            },
            self.ppl,
            self.accuracy
        )
    }
}

/// The Engram layers of a model directory, if its config.json has an Engram config and
/// it has `engram.safetensors`.
pub fn load_engram(model: &Path) -> Result<Option<EngramParts>> {
    let config_path = model.join("config.json");
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
    let Some(cfg) = EngramConfig::from_hf_config(&value)
        .with_context(|| format!("{}: the Engram config", config_path.display()))?
    else {
        return Ok(None);
    };
    let (tok_path, tokenizer) = model_tokenizer(model)?;
    let mut parts = EngramParts::without_layers(cfg, &tokenizer, &tok_path)?;
    load_layers(&mut parts, &model.join(ENGRAM_FILE))?;
    Ok(Some(parts))
}

/// Logits `[B, T, vocab]` of inputs `[B][T]` from the token embeddings up.
fn forward(
    llama: &Llama,
    engram: Option<&EngramParts>,
    inputs: &[&[u32]],
) -> Result<candle_core::Tensor> {
    llama.head(&hidden_of(llama, engram, inputs)?)
}

pub fn eval(args: &EvalArgs) -> Result<EvalReport> {
    let (_, tokenizer) = model_tokenizer(&args.model)?;
    let llama = Llama::load(&args.model)?;
    let engram = if args.no_engram {
        None
    } else {
        load_engram(&args.model)?
    };
    let data = load_windows(&tokenizer, &args.files, args.window)?;
    let (mut nll, mut right) = (0f64, 0usize);
    for chunk in data.windows.chunks(args.batch.max(1)) {
        let inputs: Vec<&[u32]> = chunk.iter().map(|w| &w[..args.window]).collect();
        let targets: Vec<&[u32]> = chunk.iter().map(|w| &w[1..]).collect();
        let logits = forward(&llama, engram.as_ref(), &inputs)?;
        nll += token_nll(&logits, &targets)?
            .to_vec1::<f32>()?
            .iter()
            .map(|&v| v as f64)
            .sum::<f64>();
        right += correct(&logits, &targets)?;
    }
    let tokens = data.tokens();
    Ok(EvalReport {
        files: data.files,
        tokens,
        ppl: (nll / tokens as f64).exp(),
        accuracy: right as f64 / tokens as f64,
        engram: engram.is_some(),
    })
}

/// What `engram logits` takes.
#[derive(Clone, Debug, clap::Args)]
pub struct LogitsArgs {
    /// The model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// Token ids of one sequence, comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub ids: Vec<u32>,
    /// The host model alone, even where the directory has Engram layers.
    #[arg(long)]
    pub no_engram: bool,
    /// Where to write the last position's logits (raw little-endian f32, as the
    /// mistral.rs host's `--dump-logits` writes a step).
    #[arg(long)]
    pub out: PathBuf,
}

/// The logits of the last position of `args.ids` through the fit's forward, written to
/// `args.out`; returns how many values.
pub fn last_logits(args: &LogitsArgs) -> Result<usize> {
    let llama = Llama::load(&args.model)?;
    let engram = if args.no_engram {
        None
    } else {
        load_engram(&args.model)?
    };
    anyhow::ensure!(!args.ids.is_empty(), "--ids: no token ids");
    let logits = forward(&llama, engram.as_ref(), &[&args.ids])?;
    let last = logits.get(0)?.get(args.ids.len() - 1)?.to_vec1::<f32>()?;
    let bytes: Vec<u8> = last.iter().flat_map(|v| v.to_le_bytes()).collect();
    let tmp = args.out.with_extension("partial");
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, &args.out)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), args.out.display()))?;
    Ok(last.len())
}
