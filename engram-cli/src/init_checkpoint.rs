//! `engram init-checkpoint`: a paper-variant Engram checkpoint for an existing Hugging
//! Face model, with seeded random weights.
//!
//! The output directory is the model with Engram added: every file of the model is
//! linked (or copied where links fail), `config.json` is the model's with an `engram`
//! object (the golden form, read by [`EngramConfig::from_hf_config`]), and
//! `engram.safetensors` holds the Engram layers under `layers.{L}.engram.` (listed
//! in docs/algorithm.md section 10), exactly the tensors [`expected_layer_tensors`] lists.
//!
//! The weights are chosen so that the model still writes coherent text with Engram on:
//! table rows are uniform in [-1, 1) (bf16), and the value projection and short conv are
//! scaled so that what Engram adds to the residual stream has an RMS of about
//! `value_scale` (the gate is in (0, 1)). With `zero_value` the value projection's weight
//! and bias are exactly zero, and so is everything Engram adds: the identity test.
//!
//! The file is written by several threads at once (`parallel_write`: positioned writes
//! into a preallocated file, around the page cache where the filesystem allows); the demo
//! size is about 1.3 GB of bf16 per layer, and `--vocab` scales it to tens of gigabytes.
//! Each chunk of table rows draws from its own seeded generator, so the file does not
//! depend on the number of threads. The tensor data starts on a 4096-byte page, so a row
//! whose size divides the page (128 bytes at head dim 64 in bf16) never straddles two
//! pages: a disk read of one row is one page.

mod parallel_write;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use engram_core::checkpoint::{
    expected_layer_tensors, ExpectedTensor, SafetensorsHeader, TensorKind,
};
use engram_core::config::EngramConfig;
use engram_core::primes::{table_layouts, LayerTableLayout};
use engram_core::testing::TestRng;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

/// The Engram weights file written into the output directory.
pub const ENGRAM_FILE: &str = "engram.safetensors";
/// Table rows per seeded generator: 64 Ki rows, 8 MiB at head dim 64.
const CHUNK_ROWS: u64 = 1 << 16;
/// Tensor data starts at a multiple of this in the file (a page; tables first, so each
/// table's rows lie on whole multiples of the row size from a page boundary).
const DATA_ALIGN: usize = 4096;

/// What `engram init-checkpoint` takes.
#[derive(Clone, Debug, clap::Args)]
pub struct InitArgs {
    /// The model's Hugging Face directory (config.json with hidden_size, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Where to write the model with Engram added (created; files in it are replaced).
    #[arg(long)]
    pub out: PathBuf,
    /// Transformer layers that get an Engram layer, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 15])]
    pub layers: Vec<usize>,
    /// Largest n-gram order (orders 2..=N).
    #[arg(long, default_value_t = 3)]
    pub max_ngram: usize,
    /// Hash heads per n-gram order.
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    /// Embedding width per n-gram order (split over its heads: head dim = this / heads).
    #[arg(long, default_value_t = 512)]
    pub n_embed_per_ngram: usize,
    /// Table vocabulary per n-gram order (each head gets the next unused prime above it).
    #[arg(long, default_value_t = 646_400)]
    pub vocab: u64,
    /// Seed of the hash multipliers (the config's `seed`) and of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// About the RMS of what Engram adds to the residual stream.
    #[arg(long, default_value_t = 0.01)]
    pub value_scale: f32,
    /// Value projection weight and bias exactly zero: Engram then adds exactly zero.
    #[arg(long)]
    pub zero_value: bool,
    /// Pad token id for hashing (default: the model's pad token, else its eos token).
    #[arg(long)]
    pub pad_id: Option<i64>,
    /// Writer threads (default: four per core). The file is the same for any number.
    #[arg(long)]
    pub threads: Option<usize>,
}

impl InitArgs {
    /// The defaults of the command line, for `model` and `out`.
    pub fn new(model: impl Into<PathBuf>, out: impl Into<PathBuf>) -> Self {
        Self {
            model: model.into(),
            out: out.into(),
            layers: vec![1, 15],
            max_ngram: 3,
            heads: 8,
            n_embed_per_ngram: 512,
            vocab: 646_400,
            seed: 0,
            value_scale: 0.01,
            zero_value: false,
            pad_id: None,
            threads: None,
        }
    }
}

/// What was written.
#[derive(Clone, Debug)]
pub struct InitReport {
    pub out: PathBuf,
    pub config: EngramConfig,
    pub engram_file: PathBuf,
    pub bytes: u64,
    /// `(layer_id, table rows)` per Engram layer.
    pub tables: Vec<(usize, u64)>,
    /// Files of the model linked into the output (`linked`) or copied (`copied`).
    pub linked: Vec<String>,
    pub copied: Vec<String>,
    pub seconds: f64,
}

impl InitReport {
    pub fn to_text(&self) -> String {
        let c = &self.config;
        let mut s = format!(
            "wrote {} ({} bytes, {:.1} GiB, in {:.1} s)\n",
            self.engram_file.display(),
            self.bytes,
            self.bytes as f64 / (1u64 << 30) as f64,
            self.seconds
        );
        s += &format!(
            "engram: layers {:?}, orders 2..={}, {} heads per order, head dim {}, vocab {:?}, pad id {}, seed {}, hidden {}\n",
            c.hash.layer_ids,
            c.hash.max_ngram_size,
            c.hash.n_head_per_ngram,
            c.head_dim,
            c.hash.engram_vocab_size,
            c.hash.pad_id,
            c.hash.seed,
            c.hidden_size
        );
        for (layer, rows) in &self.tables {
            s += &format!("layer {layer}: table {rows} rows x {}\n", c.head_dim);
        }
        s += &format!(
            "model files: {} linked, {} copied; config.json rewritten with an `engram` object\n",
            self.linked.len(),
            self.copied.len()
        );
        s
    }
}

/// Writes the checkpoint described by `args`.
pub fn init_checkpoint(args: &InitArgs) -> Result<InitReport> {
    let started = Instant::now();
    ensure!(
        args.value_scale.is_finite() && args.value_scale >= 0.0,
        "--value-scale must be finite and >= 0, got {}",
        args.value_scale
    );
    let shape = EngramShape {
        layers: args.layers.clone(),
        max_ngram: args.max_ngram,
        heads: args.heads,
        n_embed_per_ngram: args.n_embed_per_ngram,
        vocab: args.vocab,
        seed: args.seed,
        pad_id: args.pad_id,
    };
    let (config, cfg) = model_config_with_engram(&args.model, &shape)?;

    let model_dir = fs::canonicalize(&args.model)
        .with_context(|| format!("cannot resolve {}", args.model.display()))?;
    fs::create_dir_all(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let out_dir = fs::canonicalize(&args.out)?;
    ensure!(
        out_dir != model_dir,
        "--out must not be the model directory ({})",
        model_dir.display()
    );
    let (linked, copied) = link_model_files(&model_dir, &out_dir)?;
    let mut text = serde_json::to_string_pretty(&config)?;
    text.push('\n');
    let config_out = out_dir.join("config.json");
    if config_out.is_symlink() {
        fs::remove_file(&config_out)?;
    }
    fs::write(&config_out, text)
        .with_context(|| format!("cannot write {}", config_out.display()))?;

    let engram_file = out_dir.join(ENGRAM_FILE);
    let layouts = table_layouts(&cfg.hash);
    let bytes = write_engram_file(&engram_file, &cfg, &layouts, args)?;
    Ok(InitReport {
        out: out_dir,
        tables: layouts.iter().map(|l| (l.layer_id, l.total_rows)).collect(),
        config: cfg,
        engram_file,
        bytes,
        linked,
        copied,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The Engram layout `init-checkpoint` and `fit` give a model.
#[derive(Clone, Debug)]
pub struct EngramShape {
    pub layers: Vec<usize>,
    pub max_ngram: usize,
    pub heads: usize,
    pub n_embed_per_ngram: usize,
    pub vocab: u64,
    pub seed: u64,
    pub pad_id: Option<i64>,
}

/// The model's `config.json` with an `engram` object for `shape`, and that config as read
/// back by [`EngramConfig::from_hf_config`] (what the runtime will read).
pub fn model_config_with_engram(
    model: &Path,
    shape: &EngramShape,
) -> Result<(Value, EngramConfig)> {
    let model_config_path = model.join("config.json");
    let text = fs::read_to_string(&model_config_path)
        .with_context(|| format!("cannot read {}", model_config_path.display()))?;
    let mut config: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", model_config_path.display()))?;
    ensure!(
        config.is_object(),
        "{}: expected a JSON object",
        model_config_path.display()
    );
    let root = config.get("text_config").unwrap_or(&config);
    let hidden = root
        .get("hidden_size")
        .and_then(Value::as_u64)
        .ok_or_else(|| anyhow!("{}: no `hidden_size`", model_config_path.display()))?;
    if let Some(n) = root.get("num_hidden_layers").and_then(Value::as_u64) {
        if let Some(&bad) = shape.layers.iter().find(|&&l| l as u64 >= n) {
            bail!("--layers: layer {bad} does not exist, the model has {n} layers (0..{n})");
        }
    }
    let pad_id = match shape.pad_id {
        Some(p) => p,
        None => model_pad_id(model, &config)?,
    };
    let section = json!({
        "engram_vocab_size": vec![shape.vocab; shape.max_ngram.saturating_sub(1)],
        "max_ngram_size": shape.max_ngram,
        "n_embed_per_ngram": shape.n_embed_per_ngram,
        "n_head_per_ngram": shape.heads,
        "layer_ids": shape.layers,
        "pad_id": pad_id,
        "seed": shape.seed,
        "kernel_size": 4,
        "hc_mult": 1,
    });
    config["engram"] = section;
    let cfg = EngramConfig::from_hf_config(&config)
        .context("the Engram config")?
        .ok_or_else(|| anyhow!("the Engram config was not recognised"))?;
    ensure!(
        cfg.hidden_size as u64 == hidden,
        "the Engram config reads hidden size {}, the model has {hidden}",
        cfg.hidden_size
    );

    Ok((config, cfg))
}

/// The model's pad token id: `pad_token_id`, else `eos_token_id` (the first of a list),
/// from config.json, generation_config.json, then tokenizer_config.json's token strings.
fn model_pad_id(model: &Path, config: &Value) -> Result<i64> {
    let id_of = |v: &Value, key: &str| -> Option<i64> {
        let x = v.get(key)?;
        x.as_i64()
            .or_else(|| x.as_array().and_then(|a| a.first()).and_then(Value::as_i64))
    };
    let read = |name: &str| -> Option<Value> {
        serde_json::from_str(&fs::read_to_string(model.join(name)).ok()?).ok()
    };
    let text_config = config.get("text_config").cloned();
    let generation = read("generation_config.json");
    let sources: Vec<&Value> = [Some(config), text_config.as_ref(), generation.as_ref()]
        .into_iter()
        .flatten()
        .collect();
    for key in ["pad_token_id", "eos_token_id"] {
        if let Some(id) = sources.iter().find_map(|v| id_of(v, key)) {
            return Ok(id);
        }
    }
    if let Some(tc) = read("tokenizer_config.json") {
        let tokenizer = model.join("tokenizer.json");
        for key in ["pad_token", "eos_token"] {
            let content = match tc.get(key) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(v) => v.get("content").and_then(Value::as_str).map(String::from),
                None => None,
            };
            if let Some(content) = content {
                let tok = tokenizers::Tokenizer::from_file(&tokenizer)
                    .map_err(|e| anyhow!("{}: {e}", tokenizer.display()))?;
                if let Some(id) = tok.token_to_id(&content) {
                    return Ok(id as i64);
                }
            }
        }
    }
    bail!(
        "{}: no pad or eos token id in config.json, generation_config.json or \
         tokenizer_config.json; pass --pad-id",
        model.display()
    )
}

/// Links every file of `model` into `out` (copies where a link cannot be made), except
/// `config.json` (rewritten), hidden files and an Engram file of the model's own.
pub(crate) fn link_model_files(model: &Path, out: &Path) -> Result<(Vec<String>, Vec<String>)> {
    let (mut linked, mut copied) = (Vec::new(), Vec::new());
    let mut entries: Vec<PathBuf> = fs::read_dir(model)
        .with_context(|| format!("cannot list {}", model.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()?;
    entries.sort();
    for src in entries {
        let Some(name) = src.file_name().and_then(|n| n.to_str()).map(String::from) else {
            continue;
        };
        if name.starts_with('.') || name == "config.json" || name == ENGRAM_FILE {
            continue;
        }
        let dst = out.join(&name);
        if dst.is_symlink() || dst.is_file() {
            fs::remove_file(&dst).with_context(|| format!("cannot replace {}", dst.display()))?;
        } else if dst.exists() {
            bail!(
                "{} exists and is not a file or a link; not replacing it",
                dst.display()
            );
        }
        if symlink(&src, &dst).is_ok() {
            linked.push(name);
        } else if src.is_file() {
            fs::copy(&src, &dst).with_context(|| {
                format!("cannot link or copy {} to {}", src.display(), dst.display())
            })?;
            copied.push(name);
        } else {
            eprintln!(
                "warning: cannot link directory {} into {}; skipped",
                src.display(),
                out.display()
            );
        }
    }
    Ok((linked, copied))
}

#[cfg(unix)]
fn symlink(src: &Path, dst: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(src, dst)
}

#[cfg(windows)]
fn symlink(src: &Path, dst: &Path) -> std::io::Result<()> {
    if src.is_dir() {
        std::os::windows::fs::symlink_dir(src, dst)
    } else {
        std::os::windows::fs::symlink_file(src, dst)
    }
}

#[cfg(not(any(unix, windows)))]
fn symlink(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::Error::other("no symbolic links on this platform"))
}

/// A seed for one tensor (or table chunk) of one layer: the run's seed, the layer and the
/// tensor's name, mixed (FNV-1a over the name, then SplitMix64 in [`TestRng`]).
fn tensor_seed(seed: u64, layer_id: usize, name: &str, chunk: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut rng = TestRng::new(seed ^ h.rotate_left(17));
    rng.next_u64()
        ^ (layer_id as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ chunk.wrapping_mul(0xd6e8_feb8_6659_fd93)
}

/// The values of one non-table tensor (f32), from its name.
fn weight_values(
    t: &ExpectedTensor,
    layer_id: usize,
    cfg: &EngramConfig,
    args: &InitArgs,
) -> Vec<f32> {
    let n: usize = t.shape.iter().product();
    let mut rng = TestRng::new(tensor_seed(args.seed, layer_id, &t.name, 0));
    let e = cfg.embed_dim() as f32;
    let vs = args.value_scale;
    let stem = t
        .name
        .strip_prefix(&engram_core::checkpoint::layer_prefix(layer_id))
        .unwrap_or(&t.name);
    let uniform = |rng: &mut TestRng, scale: f32| -> Vec<f32> { rng.vec(n, scale) };
    let around_one =
        |rng: &mut TestRng| -> Vec<f32> { rng.vec(n, 0.1).into_iter().map(|x| 1.0 + x).collect() };
    if stem.starts_with("value_proj.") && args.zero_value {
        return vec![0.0; n];
    }
    // Table rows are uniform in [-1, 1) (variance 1/3) and E wide; a weight uniform in
    // [-a, a) (variance a^2/3) gives a projection of RMS a * sqrt(E) / 3.
    if stem == "value_proj.weight" {
        uniform(&mut rng, 3.0 * vs / e.sqrt())
    } else if stem == "value_proj.bias" {
        uniform(&mut rng, 0.1 * vs)
    } else if stem.starts_with("key_projs.") && stem.ends_with(".weight") {
        uniform(&mut rng, 3.0 / e.sqrt())
    } else if stem.starts_with("key_projs.") {
        uniform(&mut rng, 0.1)
    } else if stem == "short_conv.conv.weight" {
        // z has RMS ~1 after its norm; K taps of variance a^2/3 give RMS a * sqrt(K/3).
        let k = cfg.kernel_size.max(1) as f32;
        uniform(&mut rng, vs * (3.0 / k).sqrt())
    } else {
        // norm1, norm2, short_conv.norms: RMS-norm weights near one.
        around_one(&mut rng)
    }
}

/// The bf16 bits of every table value, by the 16 random bits it is drawn from: the
/// value is `bits as i16 / 32768` (exact in f32), rounded to bf16. A lookup is several
/// times faster than the conversion, and gives the same bits by construction.
fn bf16_of_bits() -> &'static [u16] {
    static TABLE: std::sync::OnceLock<Vec<u16>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX)
            .map(|bits| half::bf16::from_f32(bits as i16 as f32 / 32768.0).to_bits())
            .collect()
    })
}

/// One table's values: uniform in [-1, 1) (bf16), chunk `c` of [`CHUNK_ROWS`] rows
/// drawn from its own seeded generator, value `k` of a chunk from 16 bits (lane `k % 4`)
/// of the generator's draw `k / 4`. Any range of it can be made without the rest.
struct TableValues {
    seed: u64,
    layer_id: usize,
    name: String,
    width: u64,
    rows: u64,
}

impl TableValues {
    /// The table's bytes from byte `start` on, into `out` (`start` and `out.len()` even).
    fn fill(&self, start: u64, out: &mut [u8]) {
        debug_assert!(start.is_multiple_of(2) && out.len().is_multiple_of(2));
        let per_chunk = CHUNK_ROWS * self.width;
        let mut value = start / 2;
        let mut rest = out;
        while !rest.is_empty() {
            let (chunk, in_chunk) = (value / per_chunk, value % per_chunk);
            let here = (rest.len() as u64 / 2)
                .min(per_chunk - in_chunk)
                .min(self.rows * self.width - value);
            let (now, later) = rest.split_at_mut(2 * here as usize);
            let mut rng = TestRng::new(tensor_seed(self.seed, self.layer_id, &self.name, chunk));
            rng.skip(in_chunk / 4);
            fill_values(&mut rng, (in_chunk % 4) as u32, now);
            value += here;
            rest = later;
        }
    }
}

/// Values from `rng`'s draws into `out` (bf16 bytes), the first from lane `lane` of the
/// next draw: four values per draw, written as one 8-byte word where whole.
fn fill_values(rng: &mut TestRng, lane: u32, out: &mut [u8]) {
    let lut = bf16_of_bits();
    let value = |draw: u64, lane: u32| lut[(draw >> (16 * lane)) as u16 as usize];
    let mut out = out;
    if lane != 0 {
        let draw = rng.next_u64();
        let n = ((4 - lane) as usize).min(out.len() / 2);
        for (i, b) in out[..2 * n].chunks_exact_mut(2).enumerate() {
            b.copy_from_slice(&value(draw, lane + i as u32).to_le_bytes());
        }
        out = &mut out[2 * n..];
    }
    let mut words = out.chunks_exact_mut(8);
    for w in &mut words {
        let draw = rng.next_u64();
        let packed = (0..4).fold(0u64, |acc, l| acc | (value(draw, l) as u64) << (16 * l));
        w.copy_from_slice(&packed.to_le_bytes());
    }
    let tail = words.into_remainder();
    if !tail.is_empty() {
        let draw = rng.next_u64();
        for (i, b) in tail.chunks_exact_mut(2).enumerate() {
            b.copy_from_slice(&value(draw, i as u32).to_le_bytes());
        }
    }
}

/// What one range of the file holds.
enum Content {
    Bytes(Vec<u8>),
    Table(TableValues),
}

/// The file as consecutive ranges, from offset 0 (the header) to its end.
struct FileLayout {
    /// `(start offset, length, content)`, in file order, without gaps.
    parts: Vec<(u64, u64, Content)>,
    total: u64,
}

impl FileLayout {
    /// The file's bytes from `offset` on, into `out`.
    fn fill(&self, offset: u64, out: &mut [u8]) {
        let first = self.parts.partition_point(|(s, len, _)| s + len <= offset);
        let mut done = 0usize;
        for (start, len, content) in &self.parts[first..] {
            if done == out.len() {
                break;
            }
            let at = offset + done as u64;
            let from = at - start;
            let n = ((len - from) as usize).min(out.len() - done);
            let dst = &mut out[done..done + n];
            match content {
                Content::Bytes(b) => dst.copy_from_slice(&b[from as usize..from as usize + n]),
                Content::Table(t) => t.fill(from, dst),
            }
            done += n;
        }
        debug_assert_eq!(done, out.len(), "the layout covers the file");
    }
}

/// One tensor of the file, in write order.
struct Planned {
    layer_id: usize,
    tensor: ExpectedTensor,
    dtype: &'static str,
    bytes: u64,
}

/// A safetensors header (the JSON, without its 8-byte length) padded with spaces so the
/// tensor data after it starts at a multiple of 4096 bytes (a page).
pub fn aligned_header(header: &Value) -> String {
    let mut text = header.to_string();
    let pad = (8 + text.len()).next_multiple_of(DATA_ALIGN) - (8 + text.len());
    text.extend(std::iter::repeat_n(' ', pad));
    text
}

/// The file `write_engram_file` writes: header, tables, then each layer's small tensors.
fn plan_engram_file(
    cfg: &EngramConfig,
    layouts: &[LayerTableLayout],
    args: &InitArgs,
) -> Result<FileLayout> {
    // Tables first (large, aligned), then every layer's small tensors.
    let mut plan = Vec::new();
    for table_pass in [true, false] {
        for layout in layouts {
            for t in expected_layer_tensors(cfg, layout) {
                if (t.kind == TensorKind::Table) != table_pass {
                    continue;
                }
                let n: u64 = t.shape.iter().map(|&d| d as u64).product();
                let (dtype, size) = match t.kind {
                    TensorKind::Table => ("BF16", 2),
                    TensorKind::Offsets => ("I64", 8),
                    TensorKind::Weight => ("F32", 4),
                    TensorKind::TableScale => bail!("the paper variant has no table scales"),
                };
                plan.push(Planned {
                    layer_id: layout.layer_id,
                    tensor: t,
                    dtype,
                    bytes: n * size,
                });
            }
        }
    }
    let mut header = serde_json::Map::new();
    let init = json!({
        "tool": "engram init-checkpoint",
        "seed": args.seed,
        "value_scale": args.value_scale,
        "zero_value": args.zero_value,
        "table": "uniform [-1, 1) bf16",
    });
    header.insert(
        "__metadata__".into(),
        json!({"format": "pt", "engram_init": init.to_string()}),
    );
    let mut offset = 0u64;
    for p in &plan {
        header.insert(
            p.tensor.name.clone(),
            json!({"dtype": p.dtype, "shape": p.tensor.shape, "data_offsets": [offset, offset + p.bytes]}),
        );
        offset += p.bytes;
    }
    let header = aligned_header(&Value::Object(header));
    let mut head = (header.len() as u64).to_le_bytes().to_vec();
    head.extend_from_slice(header.as_bytes());
    let data_start = head.len() as u64;
    let mut parts = vec![(0, data_start, Content::Bytes(head))];
    let mut at = data_start;
    for p in plan {
        let t = &p.tensor;
        let content = match t.kind {
            TensorKind::Table => Content::Table(TableValues {
                seed: args.seed,
                layer_id: p.layer_id,
                name: t.name.clone(),
                width: t.shape[1] as u64,
                rows: t.shape[0] as u64,
            }),
            TensorKind::Offsets => {
                let layout = layouts
                    .iter()
                    .find(|l| l.layer_id == p.layer_id)
                    .expect("planned from the layouts");
                Content::Bytes(
                    layout
                        .offsets
                        .iter()
                        .flat_map(|&o| (o as i64).to_le_bytes())
                        .collect(),
                )
            }
            TensorKind::Weight => Content::Bytes(
                weight_values(t, p.layer_id, cfg, args)
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            ),
            TensorKind::TableScale => unreachable!("refused when planned"),
        };
        if let Content::Bytes(b) = &content {
            ensure!(b.len() as u64 == p.bytes, "{}: planned size", t.name);
        }
        // Tables start on even offsets (everything before them is of even size), as
        // `TableValues::fill` needs.
        ensure!(at.is_multiple_of(2), "{}: odd offset {at}", t.name);
        parts.push((at, p.bytes, content));
        at += p.bytes;
    }
    Ok(FileLayout { parts, total: at })
}

/// Writes the checkpoint's Engram file under a temporary name, checks it, and renames it.
fn write_engram_file(
    path: &Path,
    cfg: &EngramConfig,
    layouts: &[LayerTableLayout],
    args: &InitArgs,
) -> Result<u64> {
    let layout = plan_engram_file(cfg, layouts, args)?;
    let total = layout.total;
    let partial = path.with_extension("safetensors.partial");
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_message(format!("writing {}", partial.display()));
    let threads = args.threads.unwrap_or_else(default_threads);
    parallel_write::write_parallel(&partial, total, threads, &|o, b| layout.fill(o, b), &bar)?;
    bar.finish_and_clear();
    let written = fs::metadata(&partial)?.len();
    ensure!(
        written == total,
        "{}: wrote {written} bytes, expected {total}",
        partial.display()
    );
    SafetensorsHeader::read_file(&partial)
        .and_then(|h| h.check_complete())
        .with_context(|| format!("{} does not read back", partial.display()))?;
    fs::rename(&partial, path)
        .with_context(|| format!("cannot move {} to {}", partial.display(), path.display()))?;
    Ok(total)
}

/// Writer threads: four per core, so that while some generate, others' writes keep the
/// disk busy (measured here: 8 threads on 2 cores beat 2 and 4; docs/benchmarks-e2e.md).
fn default_threads() -> usize {
    4 * std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The code that wrote table chunks before the parallel writer (one chunk from its
    /// start, through `half`'s conversion): the reference the ranges must equal.
    fn table_chunk(seed: u64, layer_id: usize, name: &str, chunk: u64, values: usize) -> Vec<u8> {
        let mut rng = TestRng::new(tensor_seed(seed, layer_id, name, chunk));
        let mut out = Vec::with_capacity(values * 2);
        let mut left = values;
        while left > 0 {
            let r = rng.next_u64();
            for lane in 0..4.min(left) {
                let bits = (r >> (16 * lane)) as u16 as i16;
                let x = bits as f32 / 32768.0;
                out.extend_from_slice(&half::bf16::from_f32(x).to_le_bytes());
            }
            left -= 4.min(left);
        }
        out
    }

    fn table(rows: u64, width: u64) -> TableValues {
        TableValues {
            seed: 3,
            layer_id: 1,
            name: "t".into(),
            width,
            rows,
        }
    }

    /// The whole table, chunk after chunk, the way it was written before.
    fn reference(t: &TableValues) -> Vec<u8> {
        let chunks = t.rows.div_ceil(CHUNK_ROWS);
        (0..chunks)
            .flat_map(|c| {
                let rows = CHUNK_ROWS.min(t.rows - c * CHUNK_ROWS);
                table_chunk(t.seed, t.layer_id, &t.name, c, (rows * t.width) as usize)
            })
            .collect()
    }

    #[test]
    fn table_chunks_are_uniform_bf16_and_seeded() {
        let a = table_chunk(0, 1, "t", 3, 1001);
        assert_eq!(a.len(), 2002);
        assert_eq!(a, table_chunk(0, 1, "t", 3, 1001));
        assert_ne!(a, table_chunk(0, 1, "t", 4, 1001));
        assert_ne!(a, table_chunk(1, 1, "t", 3, 1001));
        let x: Vec<f32> = a
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect();
        assert!(x.iter().all(|v| (-1.0..=1.0).contains(v)));
        let mean = x.iter().sum::<f32>() / x.len() as f32;
        let var = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
        assert!(mean.abs() < 0.1, "{mean}");
        assert!((var - 1.0 / 3.0).abs() < 0.05, "{var}");
    }

    #[test]
    fn any_range_of_a_table_equals_the_sequential_chunks() {
        // Three chunks and a partial one; width 6 so chunks end mid-draw (6 * 2^16 / 4 is
        // whole, but ranges below start at every lane).
        let t = table(3 * CHUNK_ROWS + 1000, 6);
        let want = reference(&t);
        let mut whole = vec![0u8; want.len()];
        t.fill(0, &mut whole);
        assert!(whole == want, "the whole table differs");
        let chunk_bytes = CHUNK_ROWS * 6 * 2;
        for (start, len) in [
            (2, 10),
            (4, 2),
            (6, 8),
            (chunk_bytes - 6, 20),
            (2 * chunk_bytes - 2, chunk_bytes + 4),
            (want.len() as u64 - 14, 14),
        ] {
            let mut got = vec![0u8; len as usize];
            t.fill(start, &mut got);
            assert!(
                got[..] == want[start as usize..(start + len) as usize],
                "bytes {start}..+{len} differ"
            );
        }
    }

    #[test]
    fn a_range_past_4_gib_is_the_chunk_it_falls_in() {
        // A 50 GB table (u64 offsets): the bytes at 40 GB are those of their chunk.
        let t = table(400_000_000, 64);
        let chunk_bytes = CHUNK_ROWS * 64 * 2;
        let c = 40_000_000_000 / chunk_bytes;
        let start = c * chunk_bytes + 4096;
        let mut got = vec![0u8; 8192];
        t.fill(start, &mut got);
        let want = table_chunk(3, 1, "t", c, 6144);
        assert!(got[..] == want[4096..], "the bytes at 40 GB differ");
    }

    #[test]
    fn the_header_pads_the_data_to_a_page() {
        for n in 0..10 {
            let h = aligned_header(&json!({"x": "y".repeat(n * 1000)}));
            assert!((8 + h.len()).is_multiple_of(4096), "{}", h.len());
        }
    }
}
