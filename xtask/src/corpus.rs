//! Real text for benchmarks that depend on the distribution of token ids (a hot-row
//! cache does): the reStructuredText sources of the Python 3.11 library documentation,
//! from Debian's `python3.11-doc` package (PSF license), fetched with the system's package
//! client and pinned by a digest of the extracted sources, not of the archive (Debian
//! replaces a security update's .deb with the next one).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::model::cache_root;

/// Files under `html/_sources/library/` and the digest of their sorted names and
/// contents (see [`library_digest`]).
const LIBRARY_FILES: usize = 317;
pub const LIBRARY_SHA256: &str = "a15922f672e021db01787215dd792b8b896c3f80e0bcc6714a749dfff08ecc2d";

/// The library sources' directory in the cache, fetched and checked on first use.
pub fn python_library_docs() -> Result<PathBuf> {
    let root = cache_root()?.join("python3.11-doc");
    let library = root.join("x/usr/share/doc/python3.11/html/_sources/library");
    if library.is_dir() && library_digest(&library)? == LIBRARY_SHA256 {
        return Ok(library);
    }
    fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    eprintln!("xtask: fetching Debian's python3.11-doc (apt-get download)");
    let status = Command::new("apt-get")
        .args(["download", "python3.11-doc"])
        .current_dir(&root)
        .status()
        .context("cannot run apt-get (Debian's package client)")?;
    if !status.success() {
        bail!("apt-get download python3.11-doc failed ({status})");
    }
    let deb = fs::read_dir(&root)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download left no .deb")?;
    let extracted = root.join("x");
    let _ = fs::remove_dir_all(&extracted);
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&extracted)
        .status()
        .context("cannot run dpkg-deb")?;
    if !status.success() {
        bail!("dpkg-deb -x {} failed ({status})", deb.display());
    }
    fs::remove_file(&deb)?;
    let digest = library_digest(&library)?;
    if digest != LIBRARY_SHA256 {
        bail!(
            "{}: the library sources' digest is {digest}, pinned {LIBRARY_SHA256}: Debian's \
             python3.11-doc changed its text",
            library.display()
        );
    }
    Ok(library)
}

/// sha256 over `name \0 sha256(content) \n` of every file, in sorted name order.
pub fn library_digest(dir: &Path) -> Result<String> {
    let files = sorted_files(dir)?;
    if files.len() != LIBRARY_FILES {
        return Ok(format!("{} files", files.len()));
    }
    let mut all = Sha256::new();
    for f in &files {
        let bytes = fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
        let name = f.file_name().unwrap_or_default().to_string_lossy();
        all.update(name.as_bytes());
        all.update([0]);
        all.update(hex(&Sha256::digest(&bytes)).as_bytes());
        all.update(b"\n");
    }
    Ok(hex(&all.finalize()))
}

/// The files of `dir`, sorted by name.
pub fn sorted_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `n` prompts of real text: from every `len / n`-th file, its first `chars` characters
/// of prose (lines of markup and blank lines skipped), asked to be continued.
pub fn doc_prompts(dir: &Path, n: usize, chars: usize) -> Result<Vec<String>> {
    let files = sorted_files(dir)?;
    let step = (files.len() / n.max(1)).max(1);
    let mut prompts = Vec::new();
    for f in files.iter().step_by(step).take(n) {
        let text = fs::read_to_string(f).with_context(|| format!("{}", f.display()))?;
        let mut prose = String::new();
        for line in text.lines() {
            let t = line.trim();
            let markup = t.is_empty()
                || t.starts_with("..")
                || t.starts_with(':')
                || t.chars().all(|c| "=-~*^#".contains(c));
            if !markup {
                prose.push_str(t);
                prose.push(' ');
            }
            if prose.len() >= chars {
                break;
            }
        }
        let cut: String = prose.chars().take(chars).collect();
        prompts.push(format!("Continue this Python documentation:\n\n{cut}"));
    }
    Ok(prompts)
}
