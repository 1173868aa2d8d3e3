//! Finding out, without panicking, whether CUDA can be used here.
//!
//! cudarc loads the CUDA libraries on first use and panics when one is missing, so every
//! entry point of this crate checks [`libraries`] first; the driver's own answer (no
//! device, a stub library, a driver too old) then comes back as an error.

use std::sync::OnceLock;

use cudarc::driver::sys::CUresult;
use serde::Serialize;

use crate::error::{CudaBackendError, Result};

/// Which CUDA libraries can be loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Libraries {
    /// libcuda (the driver).
    pub driver: bool,
    /// libnvrtc (the run-time compiler).
    pub nvrtc: bool,
    /// libcublas.
    pub cublas: bool,
}

/// Loads each library once (dlopen) and remembers the answer.
pub fn libraries() -> Libraries {
    static LIBS: OnceLock<Libraries> = OnceLock::new();
    *LIBS.get_or_init(|| unsafe {
        Libraries {
            driver: cudarc::driver::sys::is_culib_present(),
            nvrtc: cudarc::nvrtc::sys::is_culib_present(),
            cublas: cudarc::cublas::sys::is_culib_present(),
        }
    })
}

/// Initializes the driver (once) and returns its result.
fn init() -> Result<()> {
    if !libraries().driver {
        return Err(CudaBackendError::NoDriver);
    }
    static INIT: OnceLock<std::result::Result<(), CUresult>> = OnceLock::new();
    let status = *INIT.get_or_init(|| cudarc::driver::result::init().map_err(|e| e.0));
    status.map_err(|code| init_error(code, 0))
}

fn init_error(code: CUresult, ordinal: usize) -> CudaBackendError {
    let reason = match code {
        CUresult::CUDA_ERROR_NO_DEVICE => "the CUDA driver found no device".to_string(),
        CUresult::CUDA_ERROR_STUB_LIBRARY => {
            "libcuda is the toolkit's stub library, not a real driver".to_string()
        }
        CUresult::CUDA_ERROR_NOT_SUPPORTED
        | CUresult::CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE => {
            format!("the driver does not support this device or CUDA version: {code:?}")
        }
        other => format!("cuInit failed: {other:?}"),
    };
    CudaBackendError::NoDevice { ordinal, reason }
}

/// Number of CUDA devices; an error when there is no driver or the driver has no device.
pub fn device_count() -> Result<usize> {
    init()?;
    let mut n = 0;
    let status = unsafe { cudarc::driver::sys::cuDeviceGetCount(&mut n) };
    if status != CUresult::CUDA_SUCCESS {
        return Err(init_error(status, 0));
    }
    Ok(n.max(0) as usize)
}

/// The driver's CUDA version as `(major, minor)` (12040 -> (12, 4)).
pub fn driver_version() -> Option<(i32, i32)> {
    init().ok()?;
    let mut v = 0;
    let status = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    (status == CUresult::CUDA_SUCCESS).then_some((v / 1000, (v % 1000) / 10))
}

/// Checks that device `ordinal` exists (the driver is loaded and initialized).
pub(crate) fn check_device(ordinal: usize) -> Result<()> {
    let count = device_count().map_err(|e| match e {
        CudaBackendError::NoDevice { reason, .. } => CudaBackendError::NoDevice { ordinal, reason },
        other => other,
    })?;
    if ordinal >= count {
        return Err(CudaBackendError::NoDevice {
            ordinal,
            reason: format!("the CUDA driver sees {count} device(s)"),
        });
    }
    Ok(())
}

/// What this machine offers, for messages and the benchmark's report.
#[derive(Clone, Debug, Serialize)]
pub struct ProbeReport {
    pub libraries: Libraries,
    pub driver_version: Option<String>,
    pub nvrtc_version: Option<String>,
    pub devices: Option<usize>,
    /// Why no GPU can be used, when none can.
    pub unavailable: Option<String>,
}

/// Probes the libraries and devices; never panics.
pub fn probe() -> ProbeReport {
    let libraries = libraries();
    let devices = device_count();
    let unavailable = match &devices {
        Err(e) => Some(e.to_string()),
        Ok(0) => Some(
            CudaBackendError::NoDevice {
                ordinal: 0,
                reason: "the CUDA driver sees 0 device(s)".into(),
            }
            .to_string(),
        ),
        Ok(_) if !libraries.nvrtc => Some(CudaBackendError::NoNvrtc.to_string()),
        Ok(_) => None,
    };
    ProbeReport {
        libraries,
        driver_version: driver_version().map(|(a, b)| format!("{a}.{b}")),
        nvrtc_version: crate::kernels::nvrtc_version().map(|(a, b)| format!("{a}.{b}")),
        devices: devices.ok(),
        unavailable,
    }
}

impl std::fmt::Display for ProbeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let yes = |b: bool| if b { "found" } else { "not found" };
        write!(
            f,
            "libcuda {}, libnvrtc {}, libcublas {}",
            yes(self.libraries.driver),
            yes(self.libraries.nvrtc),
            yes(self.libraries.cublas)
        )?;
        if let Some(v) = &self.driver_version {
            write!(f, "; driver CUDA {v}")?;
        }
        if let Some(v) = &self.nvrtc_version {
            write!(f, "; NVRTC {v}")?;
        }
        if let Some(n) = self.devices {
            write!(f, "; {n} device(s)")?;
        }
        if let Some(why) = &self.unavailable {
            write!(f, "; unavailable: {why}")?;
        }
        Ok(())
    }
}
