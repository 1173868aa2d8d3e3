//! What each kernel costs in machine resources on a given architecture, read from
//! ptxas's report when NVRTC compiles the program to machine code (`sm_90`): registers,
//! shared memory, stack, spills. NVRTC needs no GPU, so this runs wherever it is found;
//! the unit test below checks that every kernel can be launched with any block the crate
//! uses (at most 1024 threads) on Hopper.

use std::ffi::CString;

use cudarc::nvrtc::result;

use crate::error::{CudaBackendError, Result};

/// One kernel's resources, as ptxas reports them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelResources {
    pub name: String,
    /// Registers per thread.
    pub registers: u32,
    /// Static shared memory per block, bytes.
    pub shared_bytes: u32,
    /// Stack frame per thread, bytes.
    pub stack_bytes: u32,
    pub spill_store_bytes: u32,
    pub spill_load_bytes: u32,
}

/// Compiles `source` to machine code for `arch` (`sm_90`) with ptxas's verbose report and
/// returns each kernel's resources, in ptxas's order.
pub fn machine_code_resources(source: &str, arch: &str) -> Result<Vec<KernelResources>> {
    if !crate::probe::libraries().nvrtc {
        return Err(CudaBackendError::NoNvrtc);
    }
    let src = CString::new(source)
        .map_err(|_| CudaBackendError::Invalid("CUDA source contains a NUL byte".into()))?;
    let name = CString::new("engram.cu").expect("no NUL");
    let nvrtc_err = |op: &str, e: result::NvrtcError| CudaBackendError::Nvrtc {
        program: "engram".into(),
        options: vec![format!("--gpu-architecture={arch}")],
        status: format!("{op}: {e:?}"),
        log: String::new(),
    };
    let prog = result::create_program(&src, Some(&name)).map_err(|e| nvrtc_err("create", e))?;
    let options = [
        format!("--gpu-architecture={arch}"),
        "--ptxas-options=-v".to_string(),
    ];
    // SAFETY: `prog` is a live program until it is destroyed below, once.
    let compiled = unsafe { result::compile_program(prog, &options) };
    let log = unsafe { result::get_program_log(prog) };
    let _ = unsafe { result::destroy_program(prog) };
    let log: Vec<u8> = log
        .map_err(|e| nvrtc_err("log", e))?
        .iter()
        .map(|&c| c as u8)
        .collect();
    // The log can hold NULs between its parts (ptxas's report, then its errors).
    let log = String::from_utf8_lossy(&log).replace('\0', "");
    if let Err(e) = compiled {
        return Err(CudaBackendError::Nvrtc {
            program: "engram".into(),
            options: options.to_vec(),
            status: format!("{e:?}"),
            log,
        });
    }
    Ok(parse_ptxas_report(&log))
}

/// The per-kernel figures of a `ptxas -v` report.
fn parse_ptxas_report(log: &str) -> Vec<KernelResources> {
    let mut out: Vec<KernelResources> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default();
            out.push(KernelResources {
                name: name.to_string(),
                ..Default::default()
            });
            continue;
        }
        let Some(k) = out.last_mut() else { continue };
        if line.contains("bytes stack frame") {
            k.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
            k.spill_store_bytes = number_before(line, "bytes spill stores").unwrap_or(0);
            k.spill_load_bytes = number_before(line, "bytes spill loads").unwrap_or(0);
        } else if line.contains("Used ") && line.contains(" registers") {
            k.registers = number_before(line, "registers").unwrap_or(0);
            k.shared_bytes = number_before(line, "bytes smem").unwrap_or(0);
        }
    }
    out
}

/// The number just before `what` in `line` (`"Used 46 registers"`, "registers": 46).
fn number_before(line: &str, what: &str) -> Option<u32> {
    let head = &line[..line.find(what)?];
    head.split(|c: char| !c.is_ascii_digit())
        .rfind(|s| !s.is_empty())?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'engram_spin' for 'sm_90'
ptxas info    : Function properties for engram_spin
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers
ptxas info    : Compiling entry function 'engram_sgemm_nt' for 'sm_90'
ptxas info    : Function properties for engram_sgemm_nt
ptxas         .     16 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 2176 bytes smem
";

    #[test]
    fn reads_a_ptxas_report() {
        let r = parse_ptxas_report(REPORT);
        assert_eq!(
            r,
            [
                KernelResources {
                    name: "engram_spin".into(),
                    registers: 8,
                    ..Default::default()
                },
                KernelResources {
                    name: "engram_sgemm_nt".into(),
                    registers: 32,
                    shared_bytes: 2176,
                    stack_bytes: 16,
                    spill_store_bytes: 4,
                    spill_load_bytes: 8,
                }
            ]
        );
    }

    /// On Hopper, every kernel compiles to machine code and fits a block of 1024 threads
    /// (the largest the crate's conventions allow): registers x 1024 within the 64 Ki
    /// registers of a block, static shared memory within 48 KiB. Skips without NVRTC,
    /// fails without it under `ENGRAM_REQUIRE_NVRTC=1`.
    #[test]
    fn every_kernel_fits_a_full_block_on_hopper() {
        if !crate::testing::nvrtc_or_skip("every_kernel_fits_a_full_block_on_hopper") {
            return;
        }
        let report = machine_code_resources(&super::super::program_source(), "sm_90")
            .unwrap_or_else(|e| panic!("{e}"));
        for name in super::super::KERNEL_NAMES {
            let k = report
                .iter()
                .find(|k| k.name == *name)
                .unwrap_or_else(|| panic!("{name} missing from ptxas's report: {report:?}"));
            println!("{k:?}");
            assert!(k.registers > 0, "{k:?}");
            assert!(k.registers * 1024 <= 64 * 1024, "{k:?}");
            assert!(k.shared_bytes <= 48 * 1024, "{k:?}");
        }
    }
}
