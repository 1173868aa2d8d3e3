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

/// The package version whose text was pinned (the digest is the text's, so another
/// version with the same library sources would do as well).
pub const PINNED_VERSION: &str = "3.11.2-6+deb12u9";

/// The library sources' directory in the cache, fetched and checked on first use. Every
/// version the package client offers is tried, the pinned one first, until one holds the
/// pinned text: a machine whose package lists are older or newer than the pin may still
/// offer it (bookworm and bookworm-security carry different versions).
pub fn python_library_docs() -> Result<PathBuf> {
    let root = cache_root()?.join("python3.11-doc");
    let library = root.join("x/usr/share/doc/python3.11/html/_sources/library");
    if library.is_dir() && library_digest(&library)? == LIBRARY_SHA256 {
        return Ok(library);
    }
    fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    let mut tried = Vec::new();
    for version in candidate_versions()? {
        eprintln!("xtask: fetching Debian's python3.11-doc {version} (apt-get download)");
        let digest = fetch_and_extract(&root, &version)?;
        if digest == LIBRARY_SHA256 {
            return Ok(library);
        }
        tried.push(format!("{version}: {digest}"));
    }
    bail!(
        "none of the python3.11-doc versions the package client offers holds the pinned \
         library text (sha256 {LIBRARY_SHA256}, version {PINNED_VERSION}); tried [{}]. \
         `apt-get update` may bring it",
        tried.join("; ")
    )
}

/// The versions `apt-cache madison` lists, the pinned one first.
fn candidate_versions() -> Result<Vec<String>> {
    let out = Command::new("apt-cache")
        .args(["madison", "python3.11-doc"])
        .output()
        .context("cannot run apt-cache (Debian's package client)")?;
    let mut versions: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split('|').nth(1).map(|v| v.trim().to_string()))
        .filter(|v| !v.is_empty())
        .collect();
    versions.dedup();
    versions.sort_by_key(|v| v != PINNED_VERSION);
    if versions.is_empty() {
        bail!("apt-cache madison python3.11-doc lists no version (run apt-get update)");
    }
    Ok(versions)
}

/// Downloads one version of the package into `root`, extracts it to `root/x` (replacing
/// what was there) and returns the digest of its library sources.
fn fetch_and_extract(root: &Path, version: &str) -> Result<String> {
    for stale in fs::read_dir(root)?.filter_map(|e| e.ok().map(|e| e.path())) {
        if stale.extension().is_some_and(|x| x == "deb") {
            fs::remove_file(&stale)?;
        }
    }
    let status = Command::new("apt-get")
        .arg("download")
        .arg(format!("python3.11-doc={version}"))
        .current_dir(root)
        .status()
        .context("cannot run apt-get (Debian's package client)")?;
    if !status.success() {
        bail!("apt-get download python3.11-doc={version} failed ({status})");
    }
    let deb = fs::read_dir(root)?
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
    library_digest(&extracted.join("usr/share/doc/python3.11/html/_sources/library"))
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
