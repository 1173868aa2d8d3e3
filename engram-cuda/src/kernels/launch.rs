//! What each kernel takes, declared once, and its typed launch.
//!
//! A kernel's arguments cross into the driver as untyped bytes: an argument dropped,
//! added or given the wrong width on the Rust side compiles, launches and computes
//! garbage, and this could only be seen on a GPU. So every kernel's parameters are
//! declared here in Rust types that name a C type ([`KernelArg::c_type`]); the
//! `launch_signatures_match_the_sources` test compares the declarations with the
//! definitions in the `.cu` files on any machine, and callers can only launch through the
//! typed methods this generates on [`Kernels`].

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, LaunchArgs,
    LaunchConfig, PushKernelArg,
};

use crate::error::{CudaBackendError, DriverResultExt, Result};

/// An element or scalar type of the kernels, with its name there (`common.cuh`'s
/// typedefs for the fixed-width integers).
pub(crate) trait CScalar: DeviceRepr {
    const C_NAME: &'static str;
}

macro_rules! c_scalars {
    ($($t:ty => $c:literal),* $(,)?) => {
        $(impl CScalar for $t {
            const C_NAME: &'static str = $c;
        })*
    };
}

c_scalars!(f32 => "float", i32 => "int", i64 => "i64", u64 => "u64", u8 => "u8");

/// A device array the kernel reads (`const T*`).
pub(crate) enum In<'b, T> {
    /// A buffer: the launch records its use on the stream (cudarc's event tracking).
    Buf(&'b CudaSlice<T>),
    /// A raw device address, whose user keeps the memory alive and ordered; 0 is null.
    Addr(u64),
}

/// A device array the kernel writes (`T*`).
pub(crate) enum Out<'b, T> {
    /// A buffer: the launch records its use on the stream (cudarc's event tracking).
    Buf(&'b mut CudaSlice<T>),
    /// A raw device address, whose user keeps the memory alive and ordered; 0 is null.
    Addr(u64),
}

/// One kernel argument: the C type it stands for, and how it is pushed.
pub(crate) trait KernelArg {
    /// The parameter's type as the kernel's definition spells it (`const float*`).
    fn c_type() -> String;
    fn push<'a>(&'a mut self, args: &mut LaunchArgs<'a>);
}

impl<T: CScalar> KernelArg for In<'_, T> {
    fn c_type() -> String {
        format!("const {}*", T::C_NAME)
    }
    fn push<'a>(&'a mut self, args: &mut LaunchArgs<'a>) {
        match self {
            In::Buf(buf) => args.arg(*buf),
            In::Addr(addr) => args.arg(&*addr),
        };
    }
}

impl<T: CScalar> KernelArg for Out<'_, T> {
    fn c_type() -> String {
        format!("{}*", T::C_NAME)
    }
    fn push<'a>(&'a mut self, args: &mut LaunchArgs<'a>) {
        match self {
            Out::Buf(buf) => args.arg(&mut **buf),
            Out::Addr(addr) => args.arg(&*addr),
        };
    }
}

macro_rules! scalar_args {
    ($($t:ty),*) => {
        $(impl KernelArg for $t {
            fn c_type() -> String {
                <$t as CScalar>::C_NAME.to_string()
            }
            fn push<'a>(&'a mut self, args: &mut LaunchArgs<'a>) {
                args.arg(&*self);
            }
        })*
    };
}

scalar_args!(f32, i32, i64, u64);

/// Declares the kernels: the loaded functions ([`Kernels`]), one typed, unsafe launch
/// method per kernel, [`KERNEL_NAMES`] and [`declared_signatures`] (the signature check's
/// input).
macro_rules! declare_kernels {
    ($(
        $(#[$doc:meta])*
        fn $method:ident = $c_name:ident($($param:ident: $ty:ty),* $(,)?);
    )*) => {
        /// Every kernel the crate launches, by name.
        pub const KERNEL_NAMES: &[&str] = &[$(stringify!($c_name)),*];

        struct Functions {
            $($method: CudaFunction,)*
        }

        /// The loaded module and its kernels, launched through typed methods.
        pub(crate) struct Kernels {
            _module: Arc<CudaModule>,
            functions: Functions,
            /// The `--gpu-architecture` the program was compiled for ("" = NVRTC's
            /// default).
            pub arch: String,
        }

        impl std::fmt::Debug for Kernels {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.debug_struct("Kernels").field("arch", &self.arch).finish_non_exhaustive()
            }
        }

        impl Kernels {
            fn from_module(module: Arc<CudaModule>, arch: String) -> Result<Self> {
                let f = |name: &str| {
                    module
                        .load_function(name)
                        .ctx(&format!("loading kernel `{name}`"))
                };
                let functions = Functions {
                    $($method: f(stringify!($c_name))?,)*
                };
                Ok(Self { _module: module, functions, arch })
            }

            $(
                $(#[$doc])*
                ///
                /// # Safety
                /// The buffers and addresses must hold what the kernel reads and writes
                /// for the sizes passed, until the stream has run it.
                #[allow(clippy::too_many_arguments)]
                pub(crate) unsafe fn $method(
                    &self,
                    stream: &CudaStream,
                    cfg: LaunchConfig,
                    $(mut $param: $ty,)*
                ) -> Result<()> {
                    let mut args = stream.launch_builder(&self.functions.$method);
                    $(KernelArg::push(&mut $param, &mut args);)*
                    unsafe { args.launch(cfg) }
                        .ctx(concat!("launching ", stringify!($c_name)))?;
                    Ok(())
                }
            )*
        }

        /// Each kernel's name and the C types of the arguments its launch passes, in
        /// order (`const float*`, `int`, ...).
        pub fn declared_signatures() -> Vec<(&'static str, Vec<String>)> {
            vec![$((stringify!($c_name), vec![$(<$ty as KernelArg>::c_type()),*])),*]
        }
    };
}

declare_kernels! {
    /// Output row `i` from table A (`src[i] >= 0`), from row `-src[i] - 1` of table B
    /// (staged rows), or from row `i` of B when `src` is null; dequantized to f32.
    fn gather_rows = engram_gather_rows(
        a_values: In<'_, u8>, a_scales: In<'_, u8>, b_values: In<'_, u8>, b_scales: In<'_, u8>,
        src: In<'_, i64>, out: Out<'_, f32>,
        n: i32, width: i32, dtype: i32, row_bytes: i64, scale_bytes: i64,
    );
    /// Copies staged rows into cache slots: `pairs` holds `(slot, staged row)` pairs.
    fn cache_insert = engram_cache_insert(
        cache_values: Out<'_, u8>, cache_scales: Out<'_, u8>,
        staged_values: In<'_, u8>, staged_scales: In<'_, u8>,
        pairs: In<'_, i64>, m: i32, row_bytes: i64, scale_bytes: i64,
    );
    /// FP8 E4M3 values with E8M0 scales to f32, `[rows, width]`.
    fn dequant_f8 = engram_dequant_f8(
        values: In<'_, u8>, scales: In<'_, u8>, out: Out<'_, f32>, rows: i64, width: i32,
    );
    /// The paper variant's gate: the gated value and the short conv's normed input.
    fn paper_gate = engram_paper_gate(
        hidden: In<'_, f32>, kv: In<'_, f32>, bias: In<'_, f32>,
        norm1: In<'_, f32>, norm2: In<'_, f32>, conv_norm: In<'_, f32>,
        val: Out<'_, f32>, z: Out<'_, f32>,
        tokens: i32, g: i32, d: i32, gate_eps: f32, conv_eps: f32, clamp: f32,
    );
    /// The V4.1 variant's gate, written into the updated hidden states (`dead` may be
    /// null).
    fn v41_gate = engram_v41_gate(
        hidden: In<'_, f32>, kv: In<'_, f32>, wqk: In<'_, f32>, dead: In<'_, u8>,
        out: Out<'_, f32>, tokens: i32, g: i32, d: i32, eps: f32, clamp: f32,
    );
    /// The short conv over all segments, reading remembered rows through `hist` (device
    /// addresses of the windows, 0 for a sequence's start).
    fn short_conv = engram_short_conv(
        val: In<'_, f32>, z: In<'_, f32>, conv_w: In<'_, f32>,
        seg_of: In<'_, i32>, pos_of: In<'_, i32>, hist: In<'_, u64>, out: Out<'_, f32>,
        tokens: i32, c: i32, k: i32, dil: i32, h: i32,
    );
    /// Each segment's next window, into `scratch`.
    fn conv_window = engram_conv_window(
        z: In<'_, f32>, hist: In<'_, u64>, seg_start: In<'_, i32>, seg_len: In<'_, i32>,
        scratch: Out<'_, f32>, s: i32, c: i32, h: i32,
    );
    /// The windows of `scratch` into their places.
    fn store_windows = engram_store_windows(
        scratch: In<'_, f32>, hist: In<'_, u64>, s: i32, c: i32, h: i32,
    );
    /// The fallback GEMM: `c[m, n] = a[m, k] @ b[n, k]^T`.
    fn sgemm_nt = engram_sgemm_nt(
        a: In<'_, f32>, b: In<'_, f32>, c: Out<'_, f32>, m: i32, n: i32, k: i32,
    );
    /// Keeps each block busy for `ns` nanoseconds.
    fn spin = engram_spin(ns: u64);
}

impl Kernels {
    /// Compiles and loads the crate's program on `ctx`.
    pub(crate) fn load(ctx: &Arc<CudaContext>, cc: Option<(i32, i32)>) -> Result<Self> {
        let (ptx, arch) = super::compile("engram", &super::program_source(), cc)?;
        let module = ctx.load_module(ptx).map_err(|e| {
            let nvrtc = super::nvrtc_version()
                .map(|(a, b)| format!("{a}.{b}"))
                .unwrap_or_else(|| "?".into());
            CudaBackendError::Driver {
                op: format!(
                    "loading the NVRTC {nvrtc} output (architecture `{arch}`) into the driver \
                     (a driver older than NVRTC cannot load its PTX)"
                ),
                message: format!("{e:?}"),
            }
        })?;
        Self::from_module(module, arch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The C type of each parameter of every `extern "C" __global__` definition in
    /// `src`, parameter names dropped and spacing normalized (`const float*`).
    fn defined_signatures(src: &str) -> Vec<(String, Vec<String>)> {
        let marker = "extern \"C\" __global__ void ";
        let mut out = Vec::new();
        let mut rest = src;
        while let Some(at) = rest.find(marker) {
            rest = &rest[at + marker.len()..];
            let open = rest.find('(').expect("a parameter list");
            let close = rest.find(')').expect("a closed parameter list");
            let name = rest[..open].trim().to_string();
            let params = rest[open + 1..close]
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty() && *p != "void")
                .map(|p| {
                    let name_at = p
                        .rfind(|ch: char| !(ch.is_alphanumeric() || ch == '_'))
                        .expect("a parameter has a type and a name");
                    let ty = p[..=name_at]
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ");
                    ty.replace(" *", "*")
                })
                .collect();
            out.push((name, params));
            rest = &rest[close..];
        }
        out
    }

    #[test]
    fn the_source_parser_reads_types() {
        let src = "extern \"C\" __global__ void k(const float *a, u64 b,\n int  c)\n{}\n\
                   extern \"C\" __global__ void e()\n{}";
        assert_eq!(
            defined_signatures(src),
            [
                (
                    "k".to_string(),
                    vec!["const float*".into(), "u64".into(), "int".into()]
                ),
                ("e".to_string(), vec![])
            ]
        );
    }

    /// Every kernel is declared here with the parameter types of its definition, in
    /// order, and nothing else is declared.
    #[test]
    fn launch_signatures_match_the_sources() {
        let defined = defined_signatures(&super::super::program_source());
        let declared = declared_signatures();
        assert_eq!(defined.len(), declared.len(), "defined {defined:?}");
        for (name, types) in declared {
            let found: Vec<_> = defined.iter().filter(|(n, _)| n == name).collect();
            assert_eq!(found.len(), 1, "{name} is defined {} times", found.len());
            assert_eq!(
                found[0].1, types,
                "{name}: the .cu definition against launch.rs"
            );
        }
    }

    /// The fixed-width names the declarations use are `common.cuh`'s typedefs of these
    /// widths (`char` is one byte and `long long` eight on every CUDA target).
    #[test]
    fn fixed_width_names_are_defined() {
        for typedef in [
            "typedef unsigned char u8;",
            "typedef long long i64;",
            "typedef unsigned long long u64;",
        ] {
            assert!(
                super::super::COMMON.contains(typedef),
                "common.cuh lacks `{typedef}`"
            );
        }
    }
}
