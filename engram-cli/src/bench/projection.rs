//! `engram bench`'s projection figures: the layer's projection (the paper layer's
//! `[2048, 1024]` weight) at the small token counts of decode steps, computed both ways
//! `engram_cpu::layer::matmul` can (one product per token, or one blocked GEMM) in the
//! same run, so the path the layer takes at each count (`PER_TOKEN_MAX_TOKENS`) can be
//! checked against this machine's crossover.

use anyhow::Result;
use engram_core::testing::TestRng;
use engram_cpu::layer::matmul::{Projection, ProjectionPath};
use serde::Serialize;

use super::best_of;

/// Token counts measured: decode steps of 1 to 32 sequences.
const TOKENS: [usize; 7] = [1, 2, 4, 8, 16, 24, 32];

/// One token count's timings.
#[derive(Debug, Clone, Serialize)]
pub struct ProjectionPoint {
    pub tokens: usize,
    /// Microseconds per call, one product per token (best of 20).
    pub per_token_us: f64,
    /// Microseconds per call, one blocked GEMM (best of 20): the baseline.
    pub blocked_us: f64,
    /// `blocked_us / per_token_us`: above 1, one token at a time is faster.
    pub blocked_over_per_token: f64,
    /// Whether `Projection::apply` takes the per-token path at this count.
    pub per_token_taken: bool,
}

/// The projection benchmark: one row per token count, all threads.
#[derive(Debug, Clone, Serialize)]
pub struct ProjectionBench {
    pub out_dim: usize,
    pub in_dim: usize,
    pub points: Vec<ProjectionPoint>,
}

pub fn bench_projection() -> Result<ProjectionBench> {
    let (out_dim, in_dim) = (2048, 1024);
    let mut rng = TestRng::new(4);
    let p = Projection::new(rng.vec(out_dim * in_dim, 1.0), out_dim, in_dim);
    let points = TOKENS
        .iter()
        .map(|&tokens| {
            let x = rng.vec(tokens * in_dim, 1.0);
            let mut out = vec![0f32; tokens * out_dim];
            let mut time = |path| {
                best_of(20, || {
                    p.apply_with(path, &x, &mut out);
                    Ok(())
                })
                .map(|d| d.as_secs_f64() * 1e6)
            };
            let per_token_us = time(ProjectionPath::PerToken)?;
            let blocked_us = time(ProjectionPath::Blocked)?;
            Ok(ProjectionPoint {
                tokens,
                per_token_us,
                blocked_us,
                blocked_over_per_token: blocked_us / per_token_us,
                per_token_taken: ProjectionPath::for_tokens(tokens) == ProjectionPath::PerToken,
            })
        })
        .collect::<Result<_>>()?;
    Ok(ProjectionBench {
        out_dim,
        in_dim,
        points,
    })
}
