//! Test data and comparisons shared by the GPU tests and the emulated-kernel tests.
#![allow(dead_code)]

use engram_core::checkpoint::{LayerWeights, PaperWeights, V41Weights};
use engram_core::config::{EngramConfig, Variant};
use engram_core::dtype::RowDtype;
use engram_core::table::TableStore;
use engram_core::testing::conformance::{self, Dims, RawTable};
use engram_cuda::HostTable;

/// The one seeded RNG of every crate's tests (`engram_core::testing`).
pub use engram_core::testing::TestRng as Rng;

// Each test binary uses some of these.
#[allow(unused_imports)]
pub use engram_core::metrics::{bf16_distance, bf16_distance_over, relative_error as rel_err};

pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// A one-layer (layer 1) config from the conformance suite's builder.
pub fn config(
    variant: Variant,
    g: usize,
    d: usize,
    head_dim: usize,
    heads: usize,
    max_n: usize,
) -> EngramConfig {
    let dims = Dims {
        hc_mult: g,
        hidden: d,
        max_ngram: max_n,
        heads,
        head_dim,
        kernel: 4,
    };
    let mut cfg = conformance::config(variant, &dims);
    cfg.hash.layer_ids = vec![1];
    cfg.validate().unwrap();
    cfg
}

pub fn paper_weights(cfg: &EngramConfig, rng: &mut Rng) -> PaperWeights {
    match conformance::paper_weights(rng, cfg) {
        LayerWeights::Paper(w) => w,
        LayerWeights::V41(_) => unreachable!("paper_weights builds paper weights"),
    }
}

pub fn v41_weights(cfg: &EngramConfig, rng: &mut Rng) -> V41Weights {
    match conformance::v41_weights(rng, cfg) {
        LayerWeights::V41(w) => w,
        LayerWeights::Paper(_) => unreachable!("v41_weights builds V4.1 weights"),
    }
}

/// A host table of `rows` random rows in `dtype` (the conformance suite's tables).
pub fn random_table(dtype: RowDtype, rows: u64, width: usize, rng: &mut Rng) -> HostTable {
    let raw = RawTable::random(rng, dtype, rows, width);
    HostTable::from_raw("random", dtype, width, &raw.values, raw.scales.as_deref()).unwrap()
}

/// The CPU's answer for a gather (the core's exact conversions).
pub fn cpu_gather(t: &HostTable, ids: &[u64]) -> Vec<f32> {
    let mut out = vec![0f32; ids.len() * t.width()];
    t.gather_f32(ids, &mut out).unwrap();
    out
}
