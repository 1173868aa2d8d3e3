//! `engram bench`'s projection figures: the layer's projection (the paper layer's
//! `[2048, 1024]` weight) at the small token counts of decode steps, computed both ways
//! `engram_cpu::layer::matmul` can (one product per token, or one blocked GEMM) in the
//! same run, so the path the layer takes at each count (`PER_TOKEN_MAX_TOKENS`) can be
//! checked against this machine's crossover; and the per-token path with the weight in
//! cache (warm: the baseline) and after a buffer larger than the caches was read (cold: a
//! decode step, the model's weights having streamed through the caches since the last),
//! which is why the plugin projects the rows on its fetcher ahead of the layer.

use anyhow::Result;
use engram_core::testing::TestRng;
use engram_cpu::layer::matmul::{Projection, ProjectionPath};
use serde::Serialize;

use super::best_of;

/// Token counts measured: decode steps of 1 to 32 sequences.
const TOKENS: [usize; 7] = [1, 2, 4, 8, 16, 24, 32];
/// Token counts of the warm / cold comparison.
const COLD_TOKENS: [usize; 4] = [1, 2, 4, 8];
/// Bytes read between calls for a cold figure: past any L3 of the machines we run on.
const EVICT_BYTES: usize = 256 << 20;

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

/// One token count's per-token timings, weight in cache or not.
#[derive(Debug, Clone, Serialize)]
pub struct ColdPoint {
    pub tokens: usize,
    /// Microseconds per call (best of 20), the weight in cache: the baseline.
    pub warm_us: f64,
    /// Microseconds per call (best of 10), each call after reading [`EVICT_BYTES`].
    pub cold_us: f64,
    /// `cold_us / warm_us`.
    pub cold_over_warm: f64,
}

/// The projection benchmark: one row per token count, all threads.
#[derive(Debug, Clone, Serialize)]
pub struct ProjectionBench {
    pub out_dim: usize,
    pub in_dim: usize,
    pub points: Vec<ProjectionPoint>,
    pub cold_points: Vec<ColdPoint>,
}

/// Reads `buf` whole (a sum the optimizer cannot drop), evicting what the caches held.
fn evict(buf: &[u64]) {
    std::hint::black_box(buf.iter().fold(0u64, |a, &v| a.wrapping_add(v)));
}

/// Best of `reps` calls of `f`, each timed alone after `evict`.
fn best_cold(reps: usize, buf: &[u64], mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            evict(buf);
            let t = std::time::Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .fold(f64::INFINITY, f64::min)
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

    let buf: Vec<u64> = (0..EVICT_BYTES / 8).map(|i| i as u64).collect();
    let cold_points = COLD_TOKENS
        .iter()
        .map(|&tokens| {
            let x = rng.vec(tokens * in_dim, 1.0);
            let mut out = vec![0f32; tokens * out_dim];
            let warm_us = best_of(20, || {
                p.apply_with(ProjectionPath::PerToken, &x, &mut out);
                Ok(())
            })?
            .as_secs_f64()
                * 1e6;
            let cold_us = best_cold(10, &buf, || {
                p.apply_with(ProjectionPath::PerToken, &x, &mut out)
            });
            Ok(ColdPoint {
                tokens,
                warm_us,
                cold_us,
                cold_over_warm: cold_us / warm_us,
            })
        })
        .collect::<Result<_>>()?;
    Ok(ProjectionBench {
        out_dim,
        in_dim,
        points,
        cold_points,
    })
}
