//! Conversion: the Hugging Face files (config, weights as f32 safetensors) written from
//! the GGUF, with a marker so that a finished conversion is not redone.

use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value as Json};

use crate::progress::{count_bar, human};

use super::fetch::{GGUF_SHA256, PACKAGE, WHEEL_MEMBER};
use super::gguf::Gguf;
use super::params::{tensor_maps, unpermute_rows, LlamaParams, TensorMap};
use super::tokenizer::write_tokenizer_files;

/// Bump when the converted files change: cached conversions of an older version are redone.
const CONVERTER_VERSION: u64 = 1;
/// Written last into the model directory: what it was converted from, and by which version.
const MARKER: &str = ".converted";

fn marker_json() -> Json {
    json!({"gguf_sha256": GGUF_SHA256, "converter_version": CONVERTER_VERSION})
}

pub(super) fn ensure_converted(gguf: &Path, model_dir: &Path, force: bool) -> Result<()> {
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

pub(super) fn write_json(path: &Path, value: &Json) -> Result<()> {
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
