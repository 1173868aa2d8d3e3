//! Text files to token windows for `engram fit` and `engram eval`: each file is tokenized
//! alone (no special tokens) and cut into windows of `window + 1` ids with a stride of
//! `window`, so every token after a file's first is predicted exactly once; a file's tail
//! shorter than a window is left out. Each window is a sequence of its own (attention and
//! Engram's n-gram history start empty), as a prompt of that text would be in a host.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tokenizers::Tokenizer;

/// The windows of a set of files.
pub struct Windows {
    /// Each `window + 1` ids: inputs are the first `window`, targets the last `window`.
    pub windows: Vec<Vec<u32>>,
    pub files: usize,
    pub window: usize,
}

impl Windows {
    /// Predicted tokens over all windows.
    pub fn tokens(&self) -> usize {
        self.windows.len() * self.window
    }
}

/// `tokenizer.json` of a model directory, with a clear error when it is missing.
pub fn model_tokenizer(model: &Path) -> Result<(PathBuf, Tokenizer)> {
    let path = model.join("tokenizer.json");
    if !path.is_file() {
        bail!(
            "{}: no tokenizer.json in the model directory",
            model.display()
        );
    }
    let tok = Tokenizer::from_file(&path)
        .map_err(|e| anyhow::anyhow!("{}: cannot load: {e}", path.display()))?;
    Ok((path, tok))
}

/// Tokenizes `files` and cuts them into windows; a file that is not UTF-8, is empty, or
/// has fewer tokens than one window is an error naming it.
pub fn load_windows(tok: &Tokenizer, files: &[PathBuf], window: usize) -> Result<Windows> {
    if files.is_empty() {
        bail!("no text files given");
    }
    if window == 0 {
        bail!("--window must be at least 1");
    }
    let mut windows = Vec::new();
    for f in files {
        let ids = tokenize_file(tok, f)?;
        if ids.len() < window + 1 {
            bail!(
                "{}: {} tokens, fewer than one window of {} (--window {window})",
                f.display(),
                ids.len(),
                window + 1
            );
        }
        let mut start = 0;
        while start + window < ids.len() {
            windows.push(ids[start..start + window + 1].to_vec());
            start += window;
        }
    }
    Ok(Windows {
        windows,
        files: files.len(),
        window,
    })
}

/// The token ids of a text file (no special tokens); a file that is not UTF-8 or is empty
/// is an error naming it.
pub fn tokenize_file(tok: &Tokenizer, f: &Path) -> Result<Vec<u32>> {
    let bytes = fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "{}: not UTF-8 text (invalid byte at offset {})",
            f.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    if text.trim().is_empty() {
        bail!("{}: empty", f.display());
    }
    Ok(tok
        .encode(text.as_str(), false)
        .map_err(|e| anyhow::anyhow!("{}: cannot tokenize: {e}", f.display()))?
        .get_ids()
        .to_vec())
}
