//! # engram-cpu
//!
//! The CPU backend of Engram: table stores in RAM or memory-mapped from safetensors,
//! a multi-threaded row gather, the fused gate and short conv of both layer variants on
//! a real GEMM, and per-sequence decode state. It is also the oracle the CUDA backend is
//! checked against.

pub mod cache_size;
pub mod layer;
pub mod table;

pub use cache_size::largest_cache_bytes;
pub use table::CpuTable;
