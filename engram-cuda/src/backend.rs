//! [`CudaBackend`]: one device, its streams, the compiled kernels and the GEMM engine.

use std::sync::Arc;

use cudarc::cublas::sys::{cublasMath_t, cublasOperation_t};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::sys::{self, CUdevice_attribute};
use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, DeviceRepr, LaunchConfig, ValidAsZeroBits,
};
use engram_core::dtype::RowDtype;
use serde::Serialize;

use crate::error::{CudaBackendError, DriverResultExt, Result};
use crate::kernels::{In, Kernels, Out};
use crate::probe;

/// Threads per block of every 1-D kernel launch.
pub(crate) const BLOCK: u32 = 256;
/// Warps in a block of [`BLOCK`] threads (kernels that give each work item one warp).
pub(crate) const WARPS_PER_BLOCK: usize = BLOCK as usize / 32;

/// Which engine computes the projections.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum GemmEngine {
    /// cuBLAS `sgemm` (f32 in and out, f32 accumulation, no TF32).
    Cublas,
    /// The crate's own tiled kernel, used when cuBLAS cannot be loaded.
    FallbackKernel { reason: String },
}

/// What the backend found out about its device.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub multiprocessors: u32,
    pub total_memory: usize,
    pub driver_version: Option<String>,
    pub nvrtc_version: Option<String>,
    /// The `--gpu-architecture` the kernels were compiled for ("" = NVRTC's default).
    pub kernel_arch: String,
    pub gemm: GemmEngine,
    pub can_map_host_memory: bool,
    pub host_register_supported: bool,
    pub read_only_host_register_supported: bool,
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gemm = match &self.gemm {
            GemmEngine::Cublas => "cuBLAS".to_string(),
            GemmEngine::FallbackKernel { reason } => format!("fallback kernel ({reason})"),
        };
        write!(
            f,
            "device {} `{}` (sm_{}{}, {} SMs, {:.1} GiB), driver CUDA {}, NVRTC {}, kernels for `{}`, GEMM {}",
            self.ordinal,
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.multiprocessors,
            self.total_memory as f64 / (1u64 << 30) as f64,
            self.driver_version.as_deref().unwrap_or("?"),
            self.nvrtc_version.as_deref().unwrap_or("?"),
            if self.kernel_arch.is_empty() { "default" } else { &self.kernel_arch },
            gemm
        )
    }
}

struct Inner {
    ctx: Arc<CudaContext>,
    /// Where the layer math runs.
    stream: Arc<CudaStream>,
    /// Where host-to-device row transfers run, overlapping the compute stream.
    copy_stream: Arc<CudaStream>,
    kernels: Kernels,
    blas: Option<CudaBlas>,
    info: DeviceInfo,
}

/// One CUDA device ready for Engram work: a context, a compute stream and a copy stream,
/// the NVRTC-compiled kernels and a GEMM engine. Cheap to clone (shared).
///
/// Select it "when asked and a device exists": [`CudaBackend::try_new`] returns an error
/// (never panics) when there is no driver, no device or no NVRTC.
#[derive(Clone)]
pub struct CudaBackend {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("info", &self.inner.info)
            .finish()
    }
}

impl CudaBackend {
    /// Opens device `ordinal` and compiles the kernels.
    ///
    /// Errors: [`CudaBackendError::NoDriver`] when libcuda cannot be loaded,
    /// [`CudaBackendError::NoDevice`] when the driver has no such device,
    /// [`CudaBackendError::NoNvrtc`] without NVRTC, [`CudaBackendError::Nvrtc`] (with the
    /// log) when the kernels do not compile.
    pub fn try_new(ordinal: usize) -> Result<Self> {
        probe::check_device(ordinal)?;
        let ctx = CudaContext::new(ordinal).map_err(|e| CudaBackendError::NoDevice {
            ordinal,
            reason: format!("cannot create a context: {e:?}"),
        })?;
        if !probe::libraries().nvrtc {
            return Err(CudaBackendError::NoNvrtc);
        }
        let attr = |a: CUdevice_attribute| ctx.attribute(a).unwrap_or(0);
        let cc = ctx.compute_capability().ok();
        let kernels = Kernels::load(&ctx, cc)?;
        let stream = ctx.new_stream().ctx("creating the compute stream")?;
        let copy_stream = ctx.new_stream().ctx("creating the copy stream")?;
        let (blas, gemm) = if probe::libraries().cublas {
            match CudaBlas::new(stream.clone()) {
                Ok(blas) => {
                    // f32 GEMMs stay f32: no TF32 tensor-core shortcut.
                    let status = unsafe {
                        cudarc::cublas::sys::cublasSetMathMode(
                            *blas.handle(),
                            cublasMath_t::CUBLAS_DEFAULT_MATH,
                        )
                    };
                    if status == cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                        (Some(blas), GemmEngine::Cublas)
                    } else {
                        (
                            None,
                            GemmEngine::FallbackKernel {
                                reason: format!("cublasSetMathMode: {status:?}"),
                            },
                        )
                    }
                }
                Err(e) => (
                    None,
                    GemmEngine::FallbackKernel {
                        reason: format!("cublasCreate: {e:?}"),
                    },
                ),
            }
        } else {
            (
                None,
                GemmEngine::FallbackKernel {
                    reason: "libcublas not found".into(),
                },
            )
        };
        let info = DeviceInfo {
            ordinal,
            name: ctx.name().unwrap_or_else(|_| "?".into()),
            compute_capability: cc.unwrap_or((0, 0)),
            multiprocessors: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .max(1) as u32,
            total_memory: ctx.total_mem().unwrap_or(0),
            driver_version: probe::driver_version().map(|(a, b)| format!("{a}.{b}")),
            nvrtc_version: crate::kernels::nvrtc_version().map(|(a, b)| format!("{a}.{b}")),
            kernel_arch: kernels.arch.clone(),
            gemm,
            can_map_host_memory: attr(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY)
                != 0,
            host_register_supported: attr(
                CUdevice_attribute::CU_DEVICE_ATTRIBUTE_HOST_REGISTER_SUPPORTED,
            ) != 0,
            read_only_host_register_supported: attr(
                CUdevice_attribute::CU_DEVICE_ATTRIBUTE_READ_ONLY_HOST_REGISTER_SUPPORTED,
            ) != 0,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                ctx,
                stream,
                copy_stream,
                kernels,
                blas,
                info,
            }),
        })
    }

    /// Whether a backend on device 0 could be created here (libraries and a device
    /// present); does not compile anything. Never panics.
    pub fn available() -> bool {
        probe::probe().unavailable.is_none()
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.inner.info
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.inner.ctx
    }

    /// The compute stream: gathers into embeddings and the layer math run here.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    /// The copy stream: host-to-device row transfers of the staged placements.
    pub fn copy_stream(&self) -> &Arc<CudaStream> {
        &self.inner.copy_stream
    }

    pub(crate) fn kernels(&self) -> &Kernels {
        &self.inner.kernels
    }

    /// Waits for all work of the device.
    pub fn synchronize(&self) -> Result<()> {
        self.inner.ctx.synchronize().ctx("synchronizing the device")
    }

    /// Copies `data` to a new device buffer (ordered on the compute stream).
    pub fn upload<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        if data.is_empty() {
            return self.stream().null().ctx("allocating an empty buffer");
        }
        self.stream()
            .clone_htod(data)
            .ctx("copying host data to the device")
    }

    /// Copies a device buffer back (waits for the compute stream).
    pub fn download<T: DeviceRepr>(&self, data: &CudaSlice<T>) -> Result<Vec<T>> {
        if data.is_empty() {
            return Ok(Vec::new());
        }
        self.stream()
            .clone_dtoh(data)
            .ctx("copying device data to the host")
    }

    /// Copies the first `dst.len()` elements of `src` back.
    pub fn download_into<T: DeviceRepr>(&self, src: &CudaSlice<T>, dst: &mut [T]) -> Result<()> {
        if dst.is_empty() {
            return Ok(());
        }
        if src.len() < dst.len() {
            return Err(CudaBackendError::Invalid(format!(
                "download of {} elements from a device buffer of {}",
                dst.len(),
                src.len()
            )));
        }
        self.stream()
            .memcpy_dtoh(&src.slice(..dst.len()), dst)
            .ctx("copying device data to the host")
    }

    /// A zeroed device buffer of `len` elements (at least one, so it has an address).
    pub fn alloc_zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream()
            .alloc_zeros(len.max(1))
            .ctx("allocating device memory")
    }

    /// Compiles `source` with the backend's NVRTC settings (a check; nothing is loaded).
    /// Returns the architecture used; errors carry NVRTC's log.
    pub fn compile_check(&self, name: &str, source: &str) -> Result<String> {
        let cc = Some(self.inner.info.compute_capability).filter(|c| c.0 > 0);
        crate::kernels::compile(name, source, cc).map(|(_, arch)| arch)
    }

    /// Grid size for `items` independent work items of one block each.
    pub(crate) fn grid(&self, items: usize) -> u32 {
        let cap = self.inner.info.multiprocessors as usize * 32;
        items.clamp(1, cap.max(1)) as u32
    }

    pub(crate) fn launch_cfg(&self, items: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (self.grid(items), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Occupies the device for `ns` nanoseconds on `stream` (one block per SM): the
    /// benchmark's stand-in for the host model's own layers.
    pub fn spin(&self, stream: &Arc<CudaStream>, ns: u64) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (self.inner.info.multiprocessors, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { self.kernels().spin(stream, cfg, ns) }
    }

    /// Dequantizes FP8 E4M3 values with E8M0 scales (one per
    /// [`FP8_SCALE_BLOCK`](engram_core::dtype::FP8_SCALE_BLOCK) columns) on the device:
    /// `bf16(f32(e4m3) * 2^(s-127))` as f32, `[rows, width]`.
    pub fn dequant_f8(
        &self,
        values: &CudaSlice<u8>,
        scales: &CudaSlice<u8>,
        rows: usize,
        width: usize,
    ) -> Result<CudaSlice<f32>> {
        let sw = RowDtype::F8E4M3Scaled.scale_row_bytes(width);
        if values.len() < rows * width || scales.len() < rows * sw {
            return Err(CudaBackendError::Invalid(format!(
                "dequant_f8: {rows} rows x {width} columns need {} value and {} scale bytes, got {} and {}",
                rows * width,
                rows * sw,
                values.len(),
                scales.len()
            )));
        }
        let total = rows * width;
        let mut out = self.alloc_zeros::<f32>(total)?;
        if total == 0 {
            return Ok(out);
        }
        let (rows_i, width_i) = (rows as i64, width as i32);
        let cfg = self.launch_cfg(total.div_ceil(BLOCK as usize));
        unsafe {
            self.kernels().dequant_f8(
                self.stream(),
                cfg,
                In::Buf(values),
                In::Buf(scales),
                Out::Buf(&mut out),
                rows_i,
                width_i,
            )
        }?;
        Ok(out)
    }

    /// `c[m, n] = a[m, k] @ b[n, k]^T` (row-major f32) on the compute stream.
    pub(crate) fn gemm_nt(
        &self,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        c: &mut CudaSlice<f32>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<()> {
        if a.len() < m * k || b.len() < n * k || c.len() < m * n {
            return Err(CudaBackendError::Invalid(format!(
                "gemm: [{m}x{k}] @ [{n}x{k}]^T with buffers of {}, {} and {} elements",
                a.len(),
                b.len(),
                c.len()
            )));
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        let to_int = |v: usize| {
            i32::try_from(v).map_err(|_| {
                CudaBackendError::Invalid(format!("gemm dimension {v} does not fit in an int"))
            })
        };
        let (mi, ni, ki) = (to_int(m)?, to_int(n)?, to_int(k)?);
        match &self.inner.blas {
            Some(blas) => {
                // Column-major view: C^T [n, m] = B [n, k] . A^T [k, m].
                let cfg = GemmConfig {
                    transa: cublasOperation_t::CUBLAS_OP_T,
                    transb: cublasOperation_t::CUBLAS_OP_N,
                    m: ni,
                    n: mi,
                    k: ki,
                    alpha: 1.0f32,
                    lda: ki,
                    ldb: ki,
                    beta: 0.0f32,
                    ldc: ni,
                };
                unsafe { blas.gemm(cfg, b, a, c) }.ctx("sgemm")
            }
            None => {
                let cfg = LaunchConfig {
                    grid_dim: (n.div_ceil(16) as u32, m.div_ceil(16) as u32, 1),
                    block_dim: (16, 16, 1),
                    shared_mem_bytes: 0,
                };
                unsafe {
                    self.kernels().sgemm_nt(
                        self.stream(),
                        cfg,
                        In::Buf(a),
                        In::Buf(b),
                        Out::Buf(c),
                        mi,
                        ni,
                        ki,
                    )
                }
            }
        }
    }
}

/// The device address of a host pointer registered with `cuMemHostRegister`.
pub(crate) fn mapped_device_ptr(host: *mut std::ffi::c_void) -> Result<u64> {
    let mut dptr: sys::CUdeviceptr = 0;
    crate::error::check(
        unsafe { sys::cuMemHostGetDevicePointer_v2(&mut dptr, host, 0) },
        "getting the device address of registered host memory",
    )?;
    Ok(dptr)
}
