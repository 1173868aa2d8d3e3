//! Synthetic inputs: tables, row ids, layer configs and weights. Never zeros (they hide
//! unwritten outputs and can run faster than real data).

use std::path::PathBuf;

use engram_core::checkpoint::{LayerWeights, PaperWeights, V41Weights};
use engram_core::config::{EngramConfig, HashConfig, Variant};
use engram_core::dtype::{round_bf16, RowDtype};
use engram_cuda::HostTable;
use rayon::prelude::*;

use crate::report::Res;

/// A cheap, parallel fill of a big table: values from a hash of the position, every
/// element finite.
pub fn make_table(dtype: RowDtype, rows: u64, width: usize) -> Res<HostTable> {
    let t = HostTable::build(format!("bench-{dtype}"), dtype, rows, width, |v, s| {
        v.par_chunks_mut(1 << 16).enumerate().for_each(|(k, c)| {
            for (i, b) in c.iter_mut().enumerate() {
                let h = ((k << 16) + i).wrapping_mul(0x9e37_79b9) >> 13;
                *b = (h as u8) & 0x7e | ((h >> 8) as u8 & 0x80);
            }
        });
        s.par_chunks_mut(1 << 16).for_each(|c| c.fill(124));
        // Keep the exponent's top bits small in the byte that holds them.
        match dtype {
            RowDtype::F32 => v.par_chunks_mut(4).for_each(|c| c[3] &= 0x3f),
            RowDtype::BF16 | RowDtype::F16 => v.par_chunks_mut(2).for_each(|c| c[1] &= 0x3f),
            RowDtype::F8E4M3Scaled => {}
        }
    })?;
    Ok(t)
}

/// `n` distinct row ids of a table of `rows` rows (`n <= rows`), scattered: the k-th is
/// `(k + start) * P mod rows` for a prime P that does not divide `rows`.
pub fn distinct_ids(n: usize, rows: u64, start: u64) -> Vec<u64> {
    const P: u128 = 1_000_003;
    debug_assert!(!(rows as u128).is_multiple_of(P) && n as u64 <= rows);
    (0..n as u64)
        .map(|k| (((k + start) as u128 * P) % rows as u128) as u64)
        .collect()
}

/// Zipf-like row ids (log-uniform ranks, scattered over the table): the skew real
/// n-gram lookups have.
pub fn zipf_ids(n: usize, rows: u64, seed: u64) -> Vec<u64> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            let u = (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64;
            let rank = ((rows as f64).powf(u) as u64).saturating_sub(1);
            rank.wrapping_mul(0x9e37_79b9_7f4a_7c15) % rows
        })
        .collect()
}

pub fn tempfile_dir() -> Res<PathBuf> {
    let dir = std::env::temp_dir().join(format!("engram-gpu-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A one-layer config: orders 2..=`max_n`, `heads` heads per order.
pub fn cfg(
    variant: Variant,
    g: usize,
    d: usize,
    head_dim: usize,
    heads: usize,
    max_n: usize,
) -> Res<EngramConfig> {
    let c = EngramConfig {
        variant,
        hash: HashConfig {
            engram_vocab_size: vec![1009; max_n - 1],
            max_ngram_size: max_n,
            n_head_per_ngram: heads,
            layer_ids: vec![1],
            pad_id: 2,
            seed: 0,
            compressed_vocab_size: None,
        },
        head_dim,
        kernel_size: if variant == Variant::Paper { 4 } else { 0 },
        hidden_size: d,
        hc_mult: g,
        rms_norm_eps: 1e-20,
    };
    c.validate()?;
    Ok(c)
}

/// Uniform noise in `[-scale, scale)`, a hash of the index and `seed`.
pub fn noise(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    (0..n)
        .into_par_iter()
        .map(|i| {
            let h = (i as u64 ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            ((h >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale
        })
        .collect()
}

pub fn weights(c: &EngramConfig) -> LayerWeights {
    let (g, d, e) = (c.hc_mult, c.hidden_size, c.embed_dim());
    let ws = 1.0 / (e as f32).sqrt();
    match c.variant {
        Variant::Paper => LayerWeights::Paper(PaperWeights {
            key_weight: (0..g).map(|h| noise(d * e, ws, h as u64)).collect(),
            key_bias: (0..g).map(|h| noise(d, 0.1, 10 + h as u64)).collect(),
            value_weight: noise(d * e, ws, 20),
            value_bias: noise(d, 0.1, 21),
            norm1: vec![vec![1.0; d]; g],
            norm2: vec![vec![1.0; d]; g],
            conv_weight: noise(g * d * c.kernel_size, 0.5, 22),
            conv_norms: vec![vec![1.0; d]; g],
        }),
        Variant::V41 => LayerWeights::V41(V41Weights {
            wkv: noise((g + 1) * d * e, ws, 30),
            q_weight: noise(g * d, 1.0, 31).into_iter().map(round_bf16).collect(),
            k_weight: noise(g * d, 1.0, 32).into_iter().map(round_bf16).collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_ids_are_distinct_and_in_range() {
        for rows in [1u64 << 20, 1_000_000, 4096] {
            let mut ids = distinct_ids(4096, rows, 17);
            assert!(ids.iter().all(|&i| i < rows));
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(ids.len(), 4096);
        }
    }
}
