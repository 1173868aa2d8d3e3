//! Verification: checks of the model directory against the GGUF by code paths that
//! share nothing with the conversion (config, tokenizer, weights, q/k layout).

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value as Json;
use tokenizers::Tokenizer;

use engram_core::metrics::{worse, worst as worst_of};

use super::gguf::Gguf;
use super::params::{tensor_maps, LlamaParams};
use super::tokenizer::TOKEN_CONTROL;

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
