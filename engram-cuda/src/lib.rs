//! # engram-cuda
//!
//! The CUDA backend of Engram: kernels compiled at run time with NVRTC, table placements
//! (device-resident, pinned host with prefetch, zero-copy host, hot-row cache), and the
//! host-to-device prefetch pipeline. CUDA is loaded at run time, so this crate builds and
//! its tests pass on machines with no GPU and no CUDA toolkit.
