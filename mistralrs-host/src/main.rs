//! `engram-mistralrs-host`: greedy generation on the CPU through mistral.rs built with the
//! `engram` feature (mistralrs-core 0.8.1 plus patches/mistralrs-core-0.8.1-engram.patch;
//! build with `cargo xtask mistralrs-build`, see docs/mistralrs.md).
//!
//! The patched mistralrs-core opens the Engram layers itself when the model directory's
//! `config.json` has an Engram config; this binary only drives a request and reports.
//! `--no-engram` runs the same directory with the Engram config hidden: a shadow directory
//! whose `config.json` lacks the Engram keys and whose other files link to the originals.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use mistralrs::{
    ModelDType, RequestBuilder, Tensor, TextMessageRole, TextMessages, TextModelBuilder,
};
use serde_json::{json, Value};

#[derive(Parser)]
#[command(name = "engram-mistralrs-host", version)]
struct Args {
    /// Model directory in Hugging Face format (config.json, *.safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// The user message (sent through the model's chat template). Repeat it to send
    /// several requests at once: mistral.rs then batches them.
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Run without Engram even if the model directory has an Engram config.
    #[arg(long)]
    no_engram: bool,
    /// Send the prompts one after another (each alone in its batch) instead of all at once.
    #[arg(long)]
    sequential: bool,
    /// Activation dtype: f32, bf16, f16 or auto.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Where the model runs: `cpu`, or `cuda` (device 0; needs the host built with
    /// `cargo xtask mistralrs-build --cuda`). Engram's own backend is chosen by
    /// ENGRAM_BACKEND (set ENGRAM_BACKEND=cuda to keep its layers on the GPU too).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print one JSON object instead of text and a summary.
    #[arg(long)]
    json: bool,
    /// Recompute the whole sequence at every step (mistral.rs `no_kv_cache`): Engram then
    /// starts every step from position 0, a check of the incremental decode path.
    #[arg(long)]
    no_kv_cache: bool,
    /// Turn mistral.rs's prefix cache off (it is always off for a model with Engram layers).
    #[arg(long)]
    no_prefix_cache: bool,
    /// Turn on mistral.rs logging.
    #[arg(long)]
    verbose: bool,
    /// Write the logits the sampler sees at every step (the last position's, f32, before
    /// sampling) to FILE as raw little-endian f32: request after request, step after step,
    /// `vocab` values each. The JSON summary (`--json`) gives the shape, each step's
    /// argmax (the greedy token ids) and each request's context ids at its last step.
    #[arg(long)]
    dump_logits: Option<PathBuf>,
}

/// One request's logits, step by step, as the sampler's logits processor saw them.
#[derive(Default)]
struct LogitsLog {
    /// (context length, logits) per sampling call.
    steps: Vec<(usize, Vec<f32>)>,
    /// The token ids of the context at the last sampling call: the request's prompt as
    /// the engine tokenized it, then every generated token but the last.
    last_context: Vec<u32>,
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if !args.model.join("config.json").is_file() {
        bail!("{}: no config.json", args.model.display());
    }
    let model_dir = args.model.canonicalize()?;
    let shadow = if args.no_engram {
        Some(ShadowDir::without_engram(&model_dir)?)
    } else {
        None
    };
    let dir = shadow
        .as_ref()
        .map_or(model_dir.as_path(), |s| s.path.as_path());
    let dtype = match args.dtype.as_str() {
        "f32" => ModelDType::F32,
        "bf16" => ModelDType::BF16,
        "f16" => ModelDType::F16,
        "auto" => ModelDType::Auto,
        other => bail!("unknown dtype {other:?} (f32, bf16, f16 or auto)"),
    };

    let load_start = Instant::now();
    let mut builder = TextModelBuilder::new(dir.display())
        .with_dtype(dtype)
        .with_max_num_seqs(args.prompt.len());
    builder = match args.device.as_str() {
        "cpu" => builder.with_force_cpu(),
        // cudarc panics where it cannot load libcuda: made an error here.
        "cuda" => match std::panic::catch_unwind(|| mistralrs::Device::new_cuda(0)) {
            Ok(device) => builder.with_device(device.context(
                "--device cuda: cannot open CUDA device 0 (is this host built with --cuda?)",
            )?),
            Err(_) => bail!("--device cuda: no CUDA driver (libcuda) could be loaded"),
        },
        other => bail!("unknown device {other:?} (cpu or cuda)"),
    };
    if args.no_prefix_cache {
        builder = builder.with_prefix_cache_n(None);
    }
    if args.no_kv_cache {
        builder = builder.with_no_kv_cache();
    }
    if args.verbose {
        builder = builder.with_logging();
    }
    let model = builder
        .build()
        .await
        .with_context(|| format!("loading {}", dir.display()))?;
    let load_secs = load_start.elapsed().as_secs_f64();

    // Stats so far (the engine's warm-up request at load) are left out of the report.
    let before = mistralrs_core::engram::stats();
    let io_before = process_read_bytes();
    let gen_start = Instant::now();
    let model = Arc::new(model);
    let mut requests = tokio::task::JoinSet::new();
    let mut responses = Vec::new();
    let mut logs = Vec::new();
    for (i, prompt) in args.prompt.iter().enumerate() {
        let mut request =
            RequestBuilder::from(TextMessages::new().add_message(TextMessageRole::User, prompt))
                .set_deterministic_sampler()
                .set_sampler_max_len(args.max_tokens);
        if args.dump_logits.is_some() {
            let log = Arc::new(Mutex::new(LogitsLog::default()));
            logs.push(log.clone());
            let processor = move |logits: &Tensor, context: &[u32]| -> mistralrs::Result<Tensor> {
                let values = logits
                    .to_dtype(mistralrs::DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let mut log = log.lock().expect("logits log poisoned");
                log.steps.push((context.len(), values));
                log.last_context = context.to_vec();
                Ok(logits.clone())
            };
            request = request.add_logits_processor(Arc::new(processor));
        }
        let model = model.clone();
        requests.spawn(async move { (i, model.send_chat_request(request).await) });
        if args.sequential {
            let (i, response) = requests.join_next().await.context("request lost")??;
            responses.push((i, response?));
        }
    }
    while let Some(done) = requests.join_next().await {
        let (i, response) = done?;
        responses.push((i, response?));
    }
    responses.sort_by_key(|(i, _)| *i);
    let gen_secs = gen_start.elapsed().as_secs_f64();

    let engram: Vec<Value> = mistralrs_core::engram::stats()
        .into_iter()
        .map(|(model_id, total)| {
            let earlier = before
                .iter()
                .find(|(id, _)| *id == model_id)
                .map(|(_, s)| *s)
                .unwrap_or_default();
            let stats = total.since(&earlier);
            json!({
                "model_id": model_id,
                "stats": stats,
                "exposed_fraction": stats.exposed_fraction(),
                "cache_hit_rate": stats.store.hit_rate(),
            })
        })
        .collect();
    let mut outputs = Vec::new();
    for (_, response) in &responses {
        let choice = response
            .choices
            .first()
            .context("no choice in the response")?;
        let usage = &response.usage;
        outputs.push(json!({
            "text": choice.message.content.clone().unwrap_or_default(),
            "finish_reason": choice.finish_reason,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "prompt_tok_per_s": usage.avg_prompt_tok_per_sec,
            "completion_tok_per_s": usage.avg_compl_tok_per_sec,
        }));
    }
    let logits = match &args.dump_logits {
        Some(path) => Some(write_logits(path, &logs)?),
        None => None,
    };
    let summary = json!({
        "logits": logits,
        "model": model_dir,
        "engram": !engram.is_empty(),
        "kv_cache": !args.no_kv_cache,
        "load_s": load_secs,
        "generate_s": gen_secs,
        // Bytes this process had read from storage while generating (Linux
        // /proc/self/io `read_bytes`: disk reads, page cache hits excluded).
        "storage_read_bytes": process_read_bytes().zip(io_before).map(|(a, b)| a - b),
        "outputs": outputs,
        "lookup_stats": engram,
    });
    if args.json {
        println!("{summary}");
        return Ok(());
    }
    for (i, out) in outputs.iter().enumerate() {
        if outputs.len() > 1 {
            println!("[{i}]");
        }
        println!("{}", out["text"].as_str().unwrap_or_default());
    }
    eprintln!("---");
    for out in &outputs {
        eprintln!(
            "prompt: {} tokens at {:.1} tok/s; completion: {} tokens at {:.1} tok/s ({})",
            out["prompt_tokens"],
            out["prompt_tok_per_s"].as_f64().unwrap_or(0.0),
            out["completion_tokens"],
            out["completion_tok_per_s"].as_f64().unwrap_or(0.0),
            out["finish_reason"].as_str().unwrap_or_default(),
        );
    }
    eprintln!("load {load_secs:.1} s, generation {gen_secs:.2} s");
    if engram.is_empty() {
        eprintln!(
            "engram: off ({})",
            if args.no_engram {
                "--no-engram"
            } else {
                "no Engram config in the model directory"
            }
        );
    }
    for e in &engram {
        eprintln!("engram lookup stats: {}", e["stats"]);
        let s = &e["stats"];
        let count = |key: &str| s[key].as_u64().unwrap_or(0);
        let (hits, misses) = (count("cache_hits"), count("cache_misses"));
        if hits + misses > 0 {
            eprintln!(
                "engram hot-row cache: {hits} hits, {misses} misses ({:.1}% hit), {:.1} MiB held",
                100.0 * e["cache_hit_rate"].as_f64().unwrap_or(0.0),
                count("cache_bytes") as f64 / (1u64 << 20) as f64
            );
        }
        if count("backing_reads") > 0 {
            eprintln!(
                "engram table reads: {} reads, {:.1} MiB",
                count("backing_reads"),
                count("backing_bytes") as f64 / (1u64 << 20) as f64
            );
        }
    }
    Ok(())
}

/// `read_bytes` of /proc/self/io: bytes this process caused to be read from storage.
fn process_read_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("read_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Writes every request's logits to `path` (raw f32 LE) and returns their shape, the
/// context length at each step, each step's argmax and the last step's context ids.
fn write_logits(path: &Path, logs: &[Arc<Mutex<LogitsLog>>]) -> Result<Value> {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut vocab = None;
    let mut requests = Vec::new();
    for log in logs {
        let log = log.lock().expect("logits log poisoned");
        let mut ids = Vec::new();
        let mut context = Vec::new();
        for (len, values) in &log.steps {
            if *vocab.get_or_insert(values.len()) != values.len() {
                bail!(
                    "logits of different lengths ({} and {})",
                    vocab.unwrap_or(0),
                    values.len()
                );
            }
            for v in values {
                out.write_all(&v.to_le_bytes())?;
            }
            ids.push(argmax(values));
            context.push(*len);
        }
        requests.push(
            json!({"steps": log.steps.len(), "context_len": context, "argmax_ids": ids,
                             "context_ids": log.last_context}),
        );
    }
    out.flush()?;
    Ok(json!({"file": path, "vocab": vocab.unwrap_or(0), "requests": requests}))
}

/// A temporary copy of a model directory without its Engram config: `config.json` is
/// rewritten without the Engram keys, every other file is a symbolic link.
struct ShadowDir {
    path: PathBuf,
}

impl ShadowDir {
    fn without_engram(model: &Path) -> Result<Self> {
        let path =
            std::env::temp_dir().join(format!("engram-mistralrs-host-{}", std::process::id()));
        if path.exists() {
            std::fs::remove_dir_all(&path)?;
        }
        std::fs::create_dir_all(&path)?;
        let shadow = Self { path };
        for entry in std::fs::read_dir(model)? {
            let entry = entry?;
            let name = entry.file_name();
            if name == "config.json" {
                continue;
            }
            link(&entry.path(), &shadow.path.join(&name))?;
        }
        let mut config: Value =
            serde_json::from_str(&std::fs::read_to_string(model.join("config.json"))?)?;
        strip_engram(&mut config);
        if let Some(text) = config.get_mut("text_config") {
            strip_engram(text);
        }
        std::fs::write(
            shadow.path.join("config.json"),
            serde_json::to_vec_pretty(&config)?,
        )?;
        Ok(shadow)
    }
}

impl Drop for ShadowDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Removes the keys `EngramConfig::from_hf_config` reads: `engram` and `engram_*`.
fn strip_engram(config: &mut Value) {
    if let Some(map) = config.as_object_mut() {
        map.retain(|k, _| k != "engram" && !k.starts_with("engram_"));
    }
}

#[cfg(unix)]
fn link(from: &Path, to: &Path) -> Result<()> {
    std::os::unix::fs::symlink(from, to)
        .with_context(|| format!("linking {} to {}", to.display(), from.display()))
}

#[cfg(not(unix))]
fn link(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to)
        .map(drop)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))
}
