//! `engram fit`: trains the Engram layers of a frozen host model on text files and writes
//! an ordinary Engram checkpoint directory (what `init-checkpoint` writes, with fitted
//! weights).
//!
//! The host's weights never change, so the hidden states entering the lowest Engram
//! layer depend on the text only: they are computed once per window before the first
//! step and kept in memory, and a step runs (and backpropagates through) only the blocks
//! from that layer up. Gradients come from candle's autograd: the blocks above an Engram
//! layer (attention, MLP, the LM head) are needed for the gradient at that layer, and a
//! hand-written backward of a whole Llama block would be long and error-prone for no
//! speed a 2-core CPU would show. The table is the exception: candle only ever sees the
//! distinct rows a batch reads (see [`super::layer`]), which get a row-wise Adagrad step;
//! the dense weights get Adam.
//!
//! Everything is written into `OUT.partial/` first: the resumable state every
//! `--save-every` steps (state file under a temporary name, then renamed), the checkpoint
//! at the end; then the directory is renamed to `OUT`. A fit interrupted at any point
//! leaves no `OUT`, and the same command continues from the last saved state.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use engram_core::primes::table_layouts;
use engram_core::testing::TestRng;
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::adam::{adam_step, Moments};
use super::checkpoint::{engram_tensors, save_atomic};
use super::data::{load_windows, model_tokenizer, Windows};
use super::layer::{initial_dense, DenseWeights, SparseTable};
use super::llama::Llama;
use super::model::{
    hidden_before, ids_tensor, logits_from, token_nll, EngramLayerParts, EngramParts,
};
use crate::init_checkpoint::{
    link_model_files, model_config_with_engram, EngramShape, ENGRAM_FILE,
};

/// What `engram fit` takes.
#[derive(Clone, Debug, clap::Args, Serialize, Deserialize)]
pub struct FitArgs {
    /// The host model's Hugging Face directory (Llama architecture, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Text files to fit on.
    #[arg(long, num_args = 1.., required = true)]
    pub corpus: Vec<PathBuf>,
    /// The checkpoint directory to write (must not exist; `OUT.partial` holds a fit in
    /// progress, and the same command resumes it).
    #[arg(long)]
    pub out: PathBuf,
    /// Transformer layers that get an Engram layer, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = [20usize])]
    pub layers: Vec<usize>,
    /// Largest n-gram order (orders 2..=N).
    #[arg(long, default_value_t = 3)]
    pub max_ngram: usize,
    /// Hash heads per n-gram order.
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// Embedding width per n-gram order (head dim = this / heads).
    #[arg(long, default_value_t = 256)]
    pub n_embed_per_ngram: usize,
    /// Table vocabulary per n-gram order (each head gets the next unused prime above it).
    #[arg(long, default_value_t = 100_000)]
    pub vocab: u64,
    /// Seed of the hash multipliers, the initial weights and the batch order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Tokens per window (each window a sequence of its own).
    #[arg(long, default_value_t = 128)]
    pub window: usize,
    /// Windows per step.
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Steps in all (a resumed fit runs up to this many; 0 writes the initial weights,
    /// which add exactly nothing).
    #[arg(long, default_value_t = 200)]
    pub steps: u64,
    /// Adam learning rate of the dense Engram weights.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f32,
    /// Row-wise Adagrad learning rate of the table rows.
    #[arg(long, default_value_t = 0.1)]
    pub table_lr: f32,
    /// Initial table rows are uniform in +-this.
    #[arg(long, default_value_t = 1.0)]
    pub table_init: f32,
    /// Save the resumable state every this many steps (and at the end).
    #[arg(long, default_value_t = 50)]
    pub save_every: u64,
    /// Stop (with an error) after this many steps of this run, leaving the saved state
    /// as an interruption would: for the resume test.
    #[arg(long, hide = true)]
    #[serde(skip)]
    pub stop_after: Option<u64>,
    /// No progress bar (tests, logs).
    #[arg(long)]
    #[serde(skip)]
    pub quiet: bool,
}

impl FitArgs {
    /// The settings a resumed fit must share with the one it continues (all but the step
    /// count, the save interval and the progress bar).
    fn fingerprint(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("plain fields");
        for k in ["steps", "save_every", "out", "stop_after"] {
            v.as_object_mut().expect("a struct").remove(k);
        }
        v
    }
}

/// What a fit did.
#[derive(Clone, Debug, Serialize)]
pub struct FitReport {
    pub out: PathBuf,
    pub files: usize,
    /// Predicted tokens in the fit windows.
    pub fit_tokens: usize,
    pub steps: u64,
    /// Steps this run made (fewer than `steps` when resumed).
    pub steps_run: u64,
    pub resumed_from: u64,
    /// Mean next-token loss of each step, from step 0 (resumed runs: those saved too).
    pub losses: Vec<f32>,
    pub table_rows: Vec<u64>,
    pub table_bytes: u64,
    /// Seconds to compute the cached hidden states, and of the steps of this run.
    pub cache_seconds: f64,
    pub step_seconds: f64,
    pub tokens_per_second: f64,
}

#[derive(Serialize, Deserialize)]
struct SavedState {
    settings: serde_json::Value,
    step: u64,
    /// The tensor file of this step, in the same directory.
    file: String,
    losses: Vec<f32>,
}

const STATE_JSON: &str = "fit-state.json";

fn state_file(step: u64) -> String {
    format!("fit-state-{step}.safetensors")
}

/// `OUT.partial`, beside `OUT`.
pub fn partial_dir(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    out.with_file_name(name)
}

/// Runs (or resumes) the fit of `args`.
pub fn fit(args: &FitArgs) -> Result<FitReport> {
    ensure!(args.batch > 0, "--batch must be at least 1");
    ensure!(!args.layers.is_empty(), "--layers: at least one layer");
    if args.out.exists() {
        bail!(
            "{} exists{}; choose another --out or remove it",
            args.out.display(),
            if args.out.join(ENGRAM_FILE).exists() {
                " and holds an Engram checkpoint"
            } else {
                ""
            }
        );
    }
    let (tok_path, tokenizer) = model_tokenizer(&args.model)?;
    let shape = EngramShape {
        layers: args.layers.clone(),
        max_ngram: args.max_ngram,
        heads: args.heads,
        n_embed_per_ngram: args.n_embed_per_ngram,
        vocab: args.vocab,
        seed: args.seed,
        pad_id: None,
    };
    let (model_config, cfg) = model_config_with_engram(&args.model, &shape)?;
    let llama = Llama::load(&args.model)?;
    let data = load_windows(&tokenizer, &args.corpus, args.window)?;
    let mut parts = EngramParts::without_layers(cfg, &tokenizer, &tok_path)?;

    let partial = partial_dir(&args.out);
    let state_json = partial.join(STATE_JSON);
    let mut moments: Vec<BTreeMap<String, Moments>> = vec![BTreeMap::new(); args.layers.len()];
    let (start_step, mut losses) = if state_json.is_file() {
        let saved: SavedState = serde_json::from_str(
            &fs::read_to_string(&state_json)
                .with_context(|| format!("cannot read {}", state_json.display()))?,
        )
        .with_context(|| format!("{} is not a fit state", state_json.display()))?;
        if saved.settings != args.fingerprint() {
            bail!(
                "{} holds a fit with other settings ({}); use them, or remove it to start over",
                partial.display(),
                saved.settings
            );
        }
        load_state(&mut parts, &mut moments, &partial.join(&saved.file))?;
        (saved.step, saved.losses)
    } else {
        if partial.exists() {
            clear_unsaved(&partial)?;
        }
        fs::create_dir_all(&partial)
            .with_context(|| format!("cannot create {}", partial.display()))?;
        init_layers(&mut parts, args);
        (0, Vec::new())
    };
    ensure!(
        start_step <= args.steps,
        "{} is at step {start_step}, past --steps {}",
        partial.display(),
        args.steps
    );

    let lowest = parts.lowest_layer();
    let cache_started = Instant::now();
    let cache = cache_hidden(&llama, &data, lowest, args.batch, args.quiet)?;
    let cache_seconds = cache_started.elapsed().as_secs_f64();

    let bar = progress(args.steps, args.quiet, "fit");
    bar.set_position(start_step);
    let started = Instant::now();
    let tokens_per_step = args.batch * args.window;
    for step in start_step..args.steps {
        let batch = batch_windows(args.seed, step, args.batch, data.windows.len());
        let inputs: Vec<&[u32]> = batch
            .iter()
            .map(|&w| &data.windows[w][..args.window])
            .collect();
        let targets: Vec<&[u32]> = batch.iter().map(|&w| &data.windows[w][1..]).collect();
        let x = Tensor::stack(&batch.iter().map(|&w| &cache[w]).collect::<Vec<_>>(), 0)?;
        let gathered = parts.gather(&inputs)?;
        let logits = logits_from(&llama, lowest, x, Some((&parts, &gathered)))?;
        let loss = token_nll(&logits, &targets)?.mean_all()?;
        let grads = loss.backward()?;
        let loss = loss.to_scalar::<f32>()?;
        ensure!(loss.is_finite(), "step {step}: the loss is {loss}");
        for ((layer, g), mo) in parts.layers.iter_mut().zip(&gathered).zip(&mut moments) {
            adam_step(&layer.dense.vars, mo, &grads, args.lr, step + 1)?;
            if let Some(rows_grad) = grads.get(&g.rows) {
                layer.table.adagrad(g, rows_grad, args.table_lr)?;
            }
        }
        losses.push(loss);
        let done = step + 1 - start_step;
        let rate = (done as usize * tokens_per_step) as f64 / started.elapsed().as_secs_f64();
        bar.set_message(format!("loss {loss:.3} | {rate:.0} tok/s"));
        bar.inc(1);
        if (step + 1) % args.save_every.max(1) == 0 && step + 1 < args.steps {
            save_state(&parts, &moments, args, step + 1, &losses, &partial)?;
        }
        if args.stop_after == Some(step + 1 - start_step) {
            bar.finish_and_clear();
            bail!(
                "stopped after {} steps (--stop-after); the state saved last is in {}",
                step + 1 - start_step,
                partial.display()
            );
        }
    }
    bar.finish_and_clear();
    let step_seconds = started.elapsed().as_secs_f64();
    let steps_run = args.steps - start_step;
    save_state(&parts, &moments, args, args.steps, &losses, &partial)?;

    // The checkpoint: the model's files linked, config.json with the engram object, the
    // Engram layers, and a record of the fit.
    link_model_files(&fs::canonicalize(&args.model)?, &partial)?;
    write_atomic(
        &partial.join("config.json"),
        &(serde_json::to_string_pretty(&model_config)? + "\n"),
    )?;
    save_atomic(&engram_tensors(&parts)?, &partial.join(ENGRAM_FILE))?;
    let layouts = table_layouts(&parts.cfg.hash);
    let table_rows: Vec<u64> = layouts.iter().map(|l| l.total_rows).collect();
    let report = FitReport {
        out: args.out.clone(),
        files: data.files,
        fit_tokens: data.tokens(),
        steps: args.steps,
        steps_run,
        resumed_from: start_step,
        losses,
        table_bytes: table_rows.iter().sum::<u64>() * parts.cfg.head_dim as u64 * 4,
        table_rows,
        cache_seconds,
        step_seconds,
        tokens_per_second: (steps_run as usize * tokens_per_step) as f64 / step_seconds.max(1e-9),
    };
    write_atomic(
        &partial.join("fit.json"),
        &(serde_json::to_string_pretty(&json!({"settings": args, "report": report}))? + "\n"),
    )?;
    fs::remove_file(partial.join(state_file(args.steps)))?;
    fs::remove_file(partial.join(STATE_JSON))?;
    fs::rename(&partial, &args.out).with_context(|| {
        format!(
            "cannot move {} to {}",
            partial.display(),
            args.out.display()
        )
    })?;
    Ok(report)
}

/// An `OUT.partial` with no saved state is what a fit leaves that stopped (a full disk, a
/// kill) before its first state was saved: nothing in it but a state file being written
/// (`fit-state*`). Those files are removed, so the fit starts over; anything else is
/// refused, as the directory may not be a fit's.
fn clear_unsaved(partial: &Path) -> Result<()> {
    let entries: Vec<PathBuf> = fs::read_dir(partial)
        .with_context(|| format!("cannot list {}", partial.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    let ours = |p: &PathBuf| {
        p.is_file()
            && p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("fit-state"))
    };
    if let Some(other) = entries.iter().find(|p| !ours(p)) {
        bail!(
            "{} exists but holds no fit state (and {}, which a fit does not write before its first saved state); remove it",
            partial.display(),
            other.display()
        );
    }
    for p in entries {
        fs::remove_file(&p).with_context(|| format!("cannot remove {}", p.display()))?;
    }
    Ok(())
}

fn init_layers(parts: &mut EngramParts, args: &FitArgs) {
    let cfg = parts.cfg.clone();
    let mut rng = TestRng::new(args.seed ^ 0x656e_6772_616d_6669);
    for layout in table_layouts(&cfg.hash) {
        let table = SparseTable::random(layout.total_rows, cfg.head_dim, args.table_init, &mut rng);
        let dense = DenseWeights::new(&cfg, &initial_dense(&cfg, &mut rng))
            .expect("initial weights have the config's shapes");
        parts.layers.push(EngramLayerParts {
            layer_id: layout.layer_id,
            table,
            dense,
        });
    }
}

/// The windows of step `step`: a seeded permutation of all windows per epoch, read in order.
pub fn batch_windows(seed: u64, step: u64, batch: usize, n: usize) -> Vec<usize> {
    let mut out = Vec::with_capacity(batch);
    let mut cached: Option<(u64, Vec<usize>)> = None;
    for i in 0..batch as u64 {
        let pos = step * batch as u64 + i;
        let epoch = pos / n as u64;
        if cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
            let mut perm: Vec<usize> = (0..n).collect();
            let mut rng = TestRng::new(seed.wrapping_add(epoch.wrapping_mul(0x9e37_79b9)));
            for j in (1..n).rev() {
                perm.swap(j, rng.below(j as u64 + 1) as usize);
            }
            cached = Some((epoch, perm));
        }
        out.push(cached.as_ref().expect("set above").1[(pos % n as u64) as usize]);
    }
    out
}

/// The hidden states entering block `lowest` of every window, `[window, hidden]` each.
fn cache_hidden(
    llama: &Llama,
    data: &Windows,
    lowest: usize,
    batch: usize,
    quiet: bool,
) -> Result<Vec<Tensor>> {
    let bar = progress(data.windows.len() as u64, quiet, "caching hidden states");
    let mut out = Vec::with_capacity(data.windows.len());
    for chunk in data.windows.chunks(batch) {
        let inputs: Vec<&[u32]> = chunk.iter().map(|w| &w[..data.window]).collect();
        let x = hidden_before(llama, &ids_tensor(&inputs)?, lowest)?;
        for i in 0..chunk.len() {
            out.push(x.get(i)?.contiguous()?);
        }
        bar.inc(chunk.len() as u64);
    }
    bar.finish_and_clear();
    Ok(out)
}

fn progress(len: u64, quiet: bool, what: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{what} [{{bar:30}}] {{pos}}/{{len}} {{msg}} | {{elapsed_precise}} eta {{eta_precise}}"
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("partial");
    fs::write(&tmp, text).with_context(|| format!("cannot write {}", tmp.display()))?;
    fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
}

/// Tables, Adagrad accumulators, dense weights and Adam moments into a file named by the
/// step, then the JSON that names it, then the previous state file goes: an interrupted
/// save leaves the previous JSON and the file it names intact.
fn save_state(
    parts: &EngramParts,
    moments: &[BTreeMap<String, Moments>],
    args: &FitArgs,
    step: u64,
    losses: &[f32],
    dir: &Path,
) -> Result<()> {
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let dev = Device::Cpu;
    for (l, mo) in parts.layers.iter().zip(moments) {
        let p = format!("{}.", l.layer_id);
        t.insert(
            format!("{p}table"),
            Tensor::from_slice(&l.table.data, l.table.data.len(), &dev)?,
        );
        t.insert(
            format!("{p}accum"),
            Tensor::from_slice(&l.table.accum, l.table.accum.len(), &dev)?,
        );
        for (name, var) in &l.dense.vars {
            t.insert(format!("{p}dense.{name}"), var.flatten_all()?);
        }
        for (name, m) in mo {
            t.insert(
                format!("{p}m.{name}"),
                Tensor::from_slice(&m.m, m.m.len(), &dev)?,
            );
            t.insert(
                format!("{p}v.{name}"),
                Tensor::from_slice(&m.v, m.v.len(), &dev)?,
            );
        }
    }
    let json_path = dir.join(STATE_JSON);
    let previous = fs::read_to_string(&json_path)
        .ok()
        .and_then(|t| serde_json::from_str::<SavedState>(&t).ok())
        .map(|s| s.file);
    let file = state_file(step);
    save_atomic(&t, &dir.join(&file))?;
    let saved = SavedState {
        settings: args.fingerprint(),
        step,
        file: file.clone(),
        losses: losses.to_vec(),
    };
    write_atomic(&json_path, &serde_json::to_string(&saved)?)?;
    if let Some(old) = previous.filter(|old| *old != file) {
        fs::remove_file(dir.join(old))?;
    }
    Ok(())
}

fn load_state(
    parts: &mut EngramParts,
    moments: &mut [BTreeMap<String, Moments>],
    file: &Path,
) -> Result<()> {
    let mut all = candle_core::safetensors::load(file, &Device::Cpu)
        .with_context(|| format!("cannot read {}", file.display()))?;
    let mut take = |name: String| -> Result<Vec<f32>> {
        all.remove(&name)
            .ok_or_else(|| anyhow!("{}: no tensor {name}", file.display()))?
            .to_vec1::<f32>()
            .map_err(Into::into)
    };
    let cfg = parts.cfg.clone();
    for (layout, mo) in table_layouts(&cfg.hash).into_iter().zip(moments.iter_mut()) {
        let p = format!("{}.", layout.layer_id);
        let data = take(format!("{p}table"))?;
        let accum = take(format!("{p}accum"))?;
        ensure!(
            data.len() == accum.len() * cfg.head_dim && accum.len() as u64 == layout.total_rows,
            "{}: layer {} table of the wrong size",
            file.display(),
            layout.layer_id
        );
        let mut dense = BTreeMap::new();
        for (name, _) in super::layer::dense_shapes(&cfg) {
            dense.insert(name.to_string(), take(format!("{p}dense.{name}"))?);
            if let (Ok(m), Ok(v)) = (take(format!("{p}m.{name}")), take(format!("{p}v.{name}"))) {
                mo.insert(name.to_string(), Moments { m, v });
            }
        }
        parts.layers.push(EngramLayerParts {
            layer_id: layout.layer_id,
            table: SparseTable {
                width: cfg.head_dim,
                data,
                accum,
            },
            dense: DenseWeights::new(&cfg, &dense)?,
        });
    }
    Ok(())
}
