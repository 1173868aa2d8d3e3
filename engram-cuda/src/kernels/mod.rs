//! The CUDA C kernels, compiled at run time with NVRTC.
//!
//! The sources live in `src/kernels/*.cu` (with the shared helpers of `common.cuh`) and
//! are compiled as one program when a [`crate::CudaBackend`] is created: first for the
//! device's own compute capability, then for `compute_90`, then with NVRTC's default
//! architecture. A compile error is returned with NVRTC's log. `launch` declares what
//! each kernel takes and is the only way to launch one (typed, checked against these
//! sources by a test).

mod launch;
mod resources;

use cudarc::nvrtc::{CompileError, CompileOptions, Ptx};

use crate::error::{CudaBackendError, Result};

pub use launch::{declared_signatures, KERNEL_NAMES};
pub(crate) use launch::{In, Kernels, Out};
pub use resources::{machine_code_resources, KernelResources};

/// Shared helpers, prepended to every program.
pub const COMMON: &str = include_str!("common.cuh");
/// Row gathers, the device cache's insert, FP8 dequantization.
pub const GATHER: &str = include_str!("gather.cu");
/// The fused gates of both variants.
pub const GATE: &str = include_str!("gate.cu");
/// The short conv and its per-sequence window.
pub const CONV: &str = include_str!("conv.cu");
/// The fallback GEMM and the benchmark's busy kernel.
pub const UTIL: &str = include_str!("util.cu");

/// The whole program NVRTC compiles.
pub fn program_source() -> String {
    [COMMON, GATHER, GATE, CONV, UTIL].join("\n")
}

/// NVRTC's version, `(major, minor)`.
pub fn nvrtc_version() -> Option<(i32, i32)> {
    if !crate::probe::libraries().nvrtc {
        return None;
    }
    let (mut major, mut minor) = (0, 0);
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    (status == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS).then_some((major, minor))
}

/// Architectures to try, best first: the device's own, then `compute_90`, then none.
fn arch_candidates(cc: Option<(i32, i32)>) -> Vec<String> {
    let mut out = Vec::new();
    if let Some((major, minor)) = cc {
        out.push(format!("compute_{major}{minor}"));
    }
    for fallback in ["compute_90", ""] {
        if !out.iter().any(|a| a == fallback) {
            out.push(fallback.to_string());
        }
    }
    out
}

/// Compiles `source` with NVRTC, trying each architecture of [`arch_candidates`] in turn.
/// Returns the PTX and the architecture it is for; on failure, the first attempt's error
/// (the device's own architecture), whose log names the faulty line.
pub(crate) fn compile(name: &str, source: &str, cc: Option<(i32, i32)>) -> Result<(Ptx, String)> {
    if !crate::probe::libraries().nvrtc {
        return Err(CudaBackendError::NoNvrtc);
    }
    if source.contains('\0') {
        return Err(CudaBackendError::Invalid(format!(
            "CUDA source `{name}` contains a NUL byte"
        )));
    }
    let mut first_err: Option<CudaBackendError> = None;
    let mut tried = Vec::new();
    for arch in arch_candidates(cc) {
        let mut options = Vec::new();
        if !arch.is_empty() {
            options.push(format!("--gpu-architecture={arch}"));
        }
        let opts = CompileOptions {
            options,
            name: Some(format!("{name}.cu")),
            ..Default::default()
        };
        match cudarc::nvrtc::compile_ptx_with_opts(source, opts) {
            Ok(ptx) => return Ok((ptx, arch)),
            Err(e) => {
                tried.push(if arch.is_empty() {
                    "default".into()
                } else {
                    arch
                });
                first_err.get_or_insert(nvrtc_error(name, e));
            }
        }
    }
    let mut err = first_err.expect("at least one architecture was tried");
    if let CudaBackendError::Nvrtc { log, .. } = &mut err {
        log.push_str(&format!("\n(architectures tried: {})", tried.join(", ")));
    }
    Err(err)
}

fn nvrtc_error(program: &str, e: CompileError) -> CudaBackendError {
    match e {
        CompileError::CompileError {
            nvrtc,
            options,
            log,
        } => CudaBackendError::Nvrtc {
            program: program.to_string(),
            options,
            status: format!("{nvrtc:?}"),
            log: log.to_string_lossy().into_owned(),
        },
        other => CudaBackendError::Nvrtc {
            program: program.to_string(),
            options: Vec::new(),
            status: format!("{other:?}"),
            log: String::new(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel the crate loads is defined, `extern "C"`, exactly once.
    #[test]
    fn every_kernel_is_defined_once() {
        let src = program_source();
        for name in KERNEL_NAMES {
            let decl = format!("extern \"C\" __global__ void {name}(");
            assert_eq!(src.matches(&decl).count(), 1, "{name}");
        }
        assert_eq!(
            src.matches("__global__").count(),
            KERNEL_NAMES.len(),
            "a kernel is missing from KERNEL_NAMES"
        );
    }

    /// Braces and parentheses balance in every file (a cheap guard for sources that can
    /// only be compiled on a machine with NVRTC).
    #[test]
    fn sources_are_balanced() {
        for (name, src) in [
            ("common", COMMON),
            ("gather", GATHER),
            ("gate", GATE),
            ("conv", CONV),
            ("util", UTIL),
        ] {
            let code: String = src
                .lines()
                .map(|l| l.split("//").next().unwrap_or(""))
                .collect::<Vec<_>>()
                .join("\n");
            for (open, close) in [('{', '}'), ('(', ')'), ('[', ']')] {
                assert_eq!(
                    code.matches(open).count(),
                    code.matches(close).count(),
                    "{name}: {open}{close}"
                );
            }
            assert!(!src.contains("#include"), "{name}: NVRTC gets no headers");
        }
    }

    /// Where NVRTC can be loaded (no driver or GPU needed), the whole program compiles
    /// for Hopper and a broken one returns NVRTC's log. `cargo xtask test` fetches NVRTC
    /// and sets `ENGRAM_REQUIRE_NVRTC=1`, under which a missing NVRTC fails.
    #[test]
    fn program_compiles_with_nvrtc_where_present() {
        if !crate::testing::nvrtc_or_skip("program_compiles_with_nvrtc_where_present") {
            return;
        }
        match compile("engram", &program_source(), Some((9, 0))) {
            Ok((ptx, arch)) => {
                assert_eq!(arch, "compute_90");
                let text = ptx.to_src();
                for name in KERNEL_NAMES {
                    assert!(text.contains(name), "{name} missing from the PTX");
                }
            }
            Err(e) => panic!("{e}"),
        }
        let e = compile(
            "broken",
            "extern \"C\" __global__ void k() { nope; }",
            Some((9, 0)),
        )
        .unwrap_err();
        match e {
            CudaBackendError::Nvrtc { log, .. } => assert!(log.contains("nope"), "{log}"),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn architectures_fall_back_to_hopper_then_default() {
        assert_eq!(
            arch_candidates(Some((8, 9))),
            ["compute_89", "compute_90", ""]
        );
        assert_eq!(arch_candidates(Some((9, 0))), ["compute_90", ""]);
        assert_eq!(arch_candidates(None), ["compute_90", ""]);
    }
}
