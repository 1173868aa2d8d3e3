//! # engram-core
//!
//! The backend-independent heart of Engram ("Conditional Memory via Scalable Lookup"):
//! everything needed to turn token ids into table rows and to define what a correct
//! Engram layer computes. Backends (`engram-cpu`, `engram-cuda`) implement the traits
//! declared here and are checked against the reference math here.
//!
//! The data path, module by module:
//! - [`config`]: the two variants (paper and DeepSeek-V4.1) and their validation;
//! - [`compress`]: tokenizer compression (token id -> compressed id);
//! - [`numpy_rng`], [`primes`]: numpy-exact multipliers and the global prime search;
//! - [`hashing`]: n-gram hashing of whole batches and of one sequence token by token;
//! - [`table`], [`backend`]: the traits a backend implements (table store, layer);
//! - [`checkpoint`]: loading and validating layer weights from safetensors;
//! - [`reference`]: the reference forward of both layer variants (plain loops, f64 sums);
//! - [`sequence`]: per-sequence decode state and the hashing stage of a batched step;
//! - [`metrics`]: the error measures every check uses (NaN never passes);
//! - [`golden`]: the inputs of a golden forward file;
//! - `testing` (feature `testing`): the test kit and the conformance suite every backend runs.

pub mod backend;
pub mod checkpoint;
pub mod compress;
pub mod config;
pub mod dtype;
pub mod error;
pub mod fastmod;
pub mod golden;
pub mod hashing;
pub mod metrics;
pub mod numpy_rng;
pub mod primes;
pub mod reference;
pub mod sequence;
pub mod table;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use error::{EngramError, Result};
