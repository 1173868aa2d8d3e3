//! `engram greedy-examples`: prompts cut from text files and continued greedily through
//! the forward `engram fit` trains ([`super::model`]), with a model directory's Engram
//! layers and without them; which continuations are the text's own, counted over every
//! prompt, and a few examples where Engram's is and the host's is not, picked by a stated
//! rule ([`RULE`], [`choose_examples`]) rather than by hand.
//!
//! Each step recomputes the whole prefix (no KV cache): at 32 + 8 tokens a step costs
//! one forward of at most 40 tokens, and a prompt stops being continued at its first
//! token that differs from the text (the rest cannot make it match), so most prompts take
//! one or two forwards.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::D;
use serde::Serialize;
use tokenizers::Tokenizer;

use super::data::{model_tokenizer, tokenize_file};
use super::eval::load_engram;
use super::llama::Llama;
use super::model::{hidden_of, EngramParts};

/// How the examples are chosen, as the report states it.
pub const RULE: &str = "each file is cut into prompts of --prompt-tokens tokens (stride the \
    same, from its first token; a prompt needs --new-tokens more tokens after it); each \
    prompt is continued greedily by --new-tokens tokens with Engram and without; a prompt \
    qualifies when the continuation with Engram equals the text's next tokens exactly and \
    the host's does not; the examples are taken from the qualifying prompts in rounds, the \
    first of each file (files in the order given), then the second of each, and so on, at \
    most --examples of them";

/// What `engram greedy-examples` takes.
#[derive(Clone, Debug, clap::Args)]
pub struct GreedyArgs {
    /// The model directory (a checkpoint with Engram layers).
    #[arg(long)]
    pub model: PathBuf,
    /// Text files, walked in the order given.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Tokens per prompt (and the stride between prompts).
    #[arg(long, default_value_t = 32)]
    pub prompt_tokens: usize,
    /// Tokens generated after each prompt.
    #[arg(long, default_value_t = 8)]
    pub new_tokens: usize,
    /// How many examples to show at most.
    #[arg(long, default_value_t = 3)]
    pub examples: usize,
    /// Prompts per forward.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// One prompt: where it starts, and how many leading tokens of each greedy continuation
/// are the text's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub file: usize,
    pub start: usize,
    pub host_agrees: usize,
    pub engram_agrees: usize,
}

/// Prompts by which continuation is the text's (all `new_tokens` of it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub prompts: usize,
    pub both_right: usize,
    pub engram_only: usize,
    pub host_only: usize,
    pub neither: usize,
}

impl Counts {
    pub fn of(outcomes: &[Outcome], new_tokens: usize) -> Self {
        let mut c = Self::default();
        for o in outcomes {
            c.prompts += 1;
            match (o.host_agrees == new_tokens, o.engram_agrees == new_tokens) {
                (true, true) => c.both_right += 1,
                (false, true) => c.engram_only += 1,
                (true, false) => c.host_only += 1,
                (false, false) => c.neither += 1,
            }
        }
        c
    }
}

/// [`RULE`]: indices into `outcomes` (files in order, each file's prompts in text order)
/// of prompts whose Engram continuation is the text's and whose host continuation is not,
/// taken in rounds (the first such prompt of each file, then the second of each, ...),
/// at most `n`.
pub fn choose_examples(outcomes: &[Outcome], new_tokens: usize, n: usize) -> Vec<usize> {
    let mut by_file: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, o) in outcomes.iter().enumerate() {
        if o.engram_agrees == new_tokens && o.host_agrees < new_tokens {
            by_file.entry(o.file).or_default().push(i);
        }
    }
    let rounds = by_file.values().map(Vec::len).max().unwrap_or(0);
    (0..rounds)
        .flat_map(|r| by_file.values().filter_map(move |v| v.get(r).copied()))
        .take(n)
        .collect()
}

/// The greedy next token (argmax of the last position's logits) of each of `inputs`
/// (all one length).
pub fn next_tokens(
    llama: &Llama,
    engram: Option<&EngramParts>,
    inputs: &[&[u32]],
) -> Result<Vec<u32>> {
    let h = hidden_of(llama, engram, inputs)?;
    let t = h.dim(1)?;
    let logits = llama.head(&h.narrow(1, t - 1, 1)?)?.squeeze(1)?;
    Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
}

/// Greedy continuations of `prompts` (all one length), `k` tokens each, `batch` prompts
/// per forward, each prefix recomputed in full every step. With `text`, a prompt is not
/// continued past its first token that differs from its text's (`text[i][j]` the text's
/// token `j` after prompt `i`): its continuation then ends with that token.
pub fn greedy(
    llama: &Llama,
    engram: Option<&EngramParts>,
    prompts: &[&[u32]],
    k: usize,
    text: Option<&[&[u32]]>,
    batch: usize,
) -> Result<Vec<Vec<u32>>> {
    let t = prompts.first().map_or(1, |p| p.len());
    ensure!(
        t > 0 && prompts.iter().all(|p| p.len() == t),
        "greedy: prompts must share one nonzero length"
    );
    if let Some(text) = text {
        ensure!(
            text.len() == prompts.len() && text.iter().all(|x| x.len() >= k),
            "greedy: a text of at least {k} tokens per prompt"
        );
    }
    let mut seqs: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
    let mut active: Vec<usize> = (0..prompts.len()).collect();
    for step in 0..k {
        let mut still = Vec::with_capacity(active.len());
        for chunk in active.chunks(batch.max(1)) {
            let inputs: Vec<&[u32]> = chunk.iter().map(|&i| seqs[i].as_slice()).collect();
            let next = next_tokens(llama, engram, &inputs)?;
            for (&i, tok) in chunk.iter().zip(next) {
                seqs[i].push(tok);
                if text.is_none_or(|x| x[i][step] == tok) {
                    still.push(i);
                }
            }
        }
        active = still;
    }
    Ok(seqs.into_iter().map(|s| s[t..].to_vec()).collect())
}

/// How many leading tokens of `got` are `want`'s.
pub fn agreeing(got: &[u32], want: &[u32]) -> usize {
    got.iter().zip(want).take_while(|(a, b)| a == b).count()
}

/// A prompt whose Engram continuation is the text's and whose host continuation is not.
#[derive(Clone, Debug, Serialize)]
pub struct Example {
    /// The file's name.
    pub file: String,
    /// The prompt's first token, counted in the file's tokens.
    pub token_offset: usize,
    pub prompt: String,
    /// The text's next tokens, which are also the continuation with Engram.
    pub engram: String,
    /// The host's continuation.
    pub host: String,
    /// How many leading tokens of the host's continuation are the text's.
    pub host_agrees: usize,
    pub prompt_ids: Vec<u32>,
    pub engram_ids: Vec<u32>,
    pub host_ids: Vec<u32>,
}

/// What `engram greedy-examples` reports.
#[derive(Clone, Debug, Serialize)]
pub struct GreedyReport {
    pub rule: &'static str,
    pub files: Vec<String>,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub counts: Counts,
    pub examples: Vec<Example>,
    pub seconds: f64,
}

impl GreedyReport {
    pub fn to_text(&self) -> String {
        let c = &self.counts;
        let mut out = format!(
            "{} prompts of {} tokens in {} files, {} tokens generated each: right with Engram \
             and without {}, with Engram only {}, host only {}, neither {} ({:.1} s)\n",
            c.prompts,
            self.prompt_tokens,
            self.files.len(),
            self.new_tokens,
            c.both_right,
            c.engram_only,
            c.host_only,
            c.neither,
            self.seconds
        );
        for e in &self.examples {
            out += &format!(
                "\n{} (token {}):\n  prompt:      {:?}\n  with Engram: {:?}\n  host alone:  {:?}\n",
                e.file, e.token_offset, e.prompt, e.engram, e.host
            );
        }
        out
    }
}

fn decode(tok: &Tokenizer, ids: &[u32]) -> Result<String> {
    tok.decode(ids, false)
        .map_err(|e| anyhow::anyhow!("cannot decode {ids:?}: {e}"))
}

pub fn greedy_examples(args: &GreedyArgs) -> Result<GreedyReport> {
    let started = Instant::now();
    let (p, k) = (args.prompt_tokens, args.new_tokens);
    ensure!(
        p > 0 && k > 0,
        "--prompt-tokens and --new-tokens must be at least 1"
    );
    let (_, tokenizer) = model_tokenizer(&args.model)?;
    let llama = Llama::load(&args.model)?;
    let engram = load_engram(&args.model)?.with_context(|| {
        format!(
            "{}: no Engram layers to compare with the host",
            args.model.display()
        )
    })?;
    let texts: Vec<Vec<u32>> = args
        .files
        .iter()
        .map(|f| tokenize_file(&tokenizer, f))
        .collect::<Result<_>>()?;
    let mut windows: Vec<(usize, usize)> = Vec::new();
    for (f, ids) in texts.iter().enumerate() {
        windows.extend(
            (0..)
                .step_by(p)
                .take_while(|s| s + p + k <= ids.len())
                .map(|s| (f, s)),
        );
    }
    ensure!(
        !windows.is_empty(),
        "no file has {} tokens (--prompt-tokens {p} + --new-tokens {k})",
        p + k
    );
    let prompts: Vec<&[u32]> = windows.iter().map(|&(f, s)| &texts[f][s..s + p]).collect();
    let want: Vec<&[u32]> = windows
        .iter()
        .map(|&(f, s)| &texts[f][s + p..s + p + k])
        .collect();
    let host = greedy(&llama, None, &prompts, k, Some(&want), args.batch)?;
    let with = greedy(&llama, Some(&engram), &prompts, k, Some(&want), args.batch)?;
    let outcomes: Vec<Outcome> = windows
        .iter()
        .enumerate()
        .map(|(i, &(file, start))| Outcome {
            file,
            start,
            host_agrees: agreeing(&host[i], want[i]),
            engram_agrees: agreeing(&with[i], want[i]),
        })
        .collect();
    let chosen = choose_examples(&outcomes, k, args.examples);
    // The host's whole continuation of the chosen prompts (the run above stopped each at
    // its first miss).
    let chosen_prompts: Vec<&[u32]> = chosen.iter().map(|&i| prompts[i]).collect();
    let host_full = greedy(&llama, None, &chosen_prompts, k, None, args.batch)?;
    let name = |f: usize| {
        args.files[f]
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned()
    };
    let examples = chosen
        .iter()
        .zip(host_full)
        .map(|(&i, host_ids)| {
            let o = outcomes[i];
            Ok(Example {
                file: name(o.file),
                token_offset: o.start,
                prompt: decode(&tokenizer, prompts[i])?,
                engram: decode(&tokenizer, &with[i])?,
                host: decode(&tokenizer, &host_ids)?,
                host_agrees: o.host_agrees,
                prompt_ids: prompts[i].to_vec(),
                engram_ids: with[i].clone(),
                host_ids,
            })
        })
        .collect::<Result<_>>()?;
    Ok(GreedyReport {
        rule: RULE,
        files: (0..args.files.len()).map(name).collect(),
        prompt_tokens: p,
        new_tokens: k,
        counts: Counts::of(&outcomes, k),
        examples,
        seconds: started.elapsed().as_secs_f64(),
    })
}
