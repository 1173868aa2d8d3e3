//! The projections of both layer variants: `out[t, n] = sum_k x[t, k] * W[n, k]` with `W`
//! in PyTorch's Linear layout `[out, in]`, computed by the `gemm` crate one of two ways
//! (`ProjectionPath`), chosen by the number of tokens.
//!
//! Why two: gemm's blocked GEMM packs all of `W` on every call, a fixed cost of about
//! 0.85 ms for a 1152 x 1024 weight on one core of a Zen 3 VM, where the product itself
//! is ~60 us a token. Its matrix-vector path (one token, `m = 1`) reads `W` as it is. So a
//! decode step of 2 to 8 sequences took 2-7x as long as the same tokens one at a time;
//! `engram bench` (`projection`) measures both paths at each token count on the machine
//! it runs on.

use gemm::Parallelism;
use rayon::prelude::*;

/// Below this many multiply-adds a product runs on the calling thread: spreading a small
/// product over the rayon pool costs more than it saves.
const PARALLEL_MIN_MACS: usize = 1 << 20;

/// Up to this many tokens a projection runs one token at a time. The measured crossover
/// with the blocked GEMM lies between 16 and 24 tokens on 2 threads (between 16 and 32
/// on one).
pub const PER_TOKEN_MAX_TOKENS: usize = 16;

/// How a projection is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProjectionPath {
    /// One matrix-vector product per token (gemm with `m = 1`), tokens spread over the
    /// rayon pool. A token's output does not depend on the other tokens of the batch.
    PerToken,
    /// One blocked GEMM over all tokens, on the rayon pool when large.
    Blocked,
}

impl ProjectionPath {
    /// The path [`Projection::apply`] takes for `tokens` tokens.
    pub fn for_tokens(tokens: usize) -> Self {
        if tokens <= PER_TOKEN_MAX_TOKENS {
            Self::PerToken
        } else {
            Self::Blocked
        }
    }
}

/// A bias-free linear map `[out_dim, in_dim]`, row-major.
#[derive(Clone, Debug)]
pub struct Projection {
    weight: Vec<f32>,
    out_dim: usize,
    in_dim: usize,
}

impl Projection {
    /// `weight` must hold `out_dim * in_dim` values (callers check and report sizes).
    pub fn new(weight: Vec<f32>, out_dim: usize, in_dim: usize) -> Self {
        assert_eq!(weight.len(), out_dim * in_dim, "projection weight size");
        Self {
            weight,
            out_dim,
            in_dim,
        }
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// `out [tokens, out_dim] = x [tokens, in_dim] @ W^T`, overwriting `out`, by the path
    /// suited to the token count.
    pub fn apply(&self, x: &[f32], out: &mut [f32]) {
        let tokens = x.len() / self.in_dim.max(1);
        self.apply_with(ProjectionPath::for_tokens(tokens), x, out)
    }

    /// [`Self::apply`] by a given path (both give the product; they differ in rounding
    /// order only).
    pub fn apply_with(&self, path: ProjectionPath, x: &[f32], out: &mut [f32]) {
        let (n, k) = (self.out_dim, self.in_dim);
        assert!(k > 0 && x.len().is_multiple_of(k), "projection input size");
        let m = x.len() / k;
        assert_eq!(out.len(), m * n, "projection output size");
        if m == 0 || n == 0 {
            return;
        }
        match path {
            ProjectionPath::Blocked => self.gemm(m, x, out, parallelism(m * n * k)),
            ProjectionPath::PerToken if m >= 2 && spread(m * n * k) => {
                x.par_chunks(k)
                    .zip(out.par_chunks_mut(n))
                    .for_each(|(xt, ot)| self.gemm(1, xt, ot, Parallelism::None));
            }
            ProjectionPath::PerToken => x
                .chunks(k)
                .zip(out.chunks_mut(n))
                .for_each(|(xt, ot)| self.gemm(1, xt, ot, Parallelism::None)),
        }
    }

    /// `out [m, n] = x [m, k] @ W^T` through gemm.
    fn gemm(&self, m: usize, x: &[f32], out: &mut [f32], parallelism: Parallelism) {
        let (n, k) = (self.out_dim, self.in_dim);
        assert!(x.len() == m * k && out.len() == m * n, "projection sizes");
        // SAFETY: dst is `[m, n]` row-major (row stride n), lhs `[m, k]` row-major (row
        // stride k) and rhs = W^T, i.e. element (kk, nn) at W[nn * k + kk]: every index the
        // kernel touches lies inside the three slices, whose lengths were checked above,
        // and dst does not alias the inputs (it is a distinct `&mut`).
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                out.as_mut_ptr(),
                1,
                n as isize,
                false,
                x.as_ptr(),
                1,
                k as isize,
                self.weight.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            )
        }
    }
}

/// Whether a product of `macs` multiply-adds is worth the rayon pool.
fn spread(macs: usize) -> bool {
    rayon::current_num_threads() > 1 && macs >= PARALLEL_MIN_MACS
}

fn parallelism(macs: usize) -> Parallelism {
    if spread(macs) {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values whose products and sums are exact in f32, so every path must match the
    /// naive sum bit for bit.
    fn exact_case(m: usize, n: usize, k: usize) -> (Vec<f32>, Vec<f32>) {
        let w = (0..n * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0)
            .collect();
        let x = (0..m * k)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0)
            .collect();
        (w, x)
    }

    #[test]
    fn both_paths_match_naive_product() {
        // 40 tokens: past PER_TOKEN_MAX_TOKENS; 1152 x 256 x 40 is past PARALLEL_MIN_MACS,
        // so the pool paths run too.
        for (m, n, k) in [(1, 7, 11), (5, 7, 11), (40, 1152, 256)] {
            let (w, x) = exact_case(m, n, k);
            let p = Projection::new(w.clone(), n, k);
            for path in [ProjectionPath::PerToken, ProjectionPath::Blocked] {
                let mut out = vec![f32::NAN; m * n];
                p.apply_with(path, &x, &mut out);
                for t in 0..m {
                    for o in 0..n {
                        let want: f32 = (0..k).map(|i| x[t * k + i] * w[o * k + i]).sum();
                        assert_eq!(out[t * n + o], want, "{path:?} ({t}, {o}) of {m}x{n}x{k}");
                    }
                }
            }
        }
    }

    #[test]
    fn small_batches_give_each_token_what_it_gets_alone() {
        // Values with rounding, so that a different summation order would show.
        let (n, k) = (1152, 1024);
        let mut rng = engram_core::testing::TestRng::new(5);
        let p = Projection::new(rng.vec(n * k, 1.0), n, k);
        let x = rng.vec(PER_TOKEN_MAX_TOKENS * k, 1.0);
        let mut alone = vec![0f32; n];
        let mut batch = vec![0f32; PER_TOKEN_MAX_TOKENS * n];
        p.apply(&x, &mut batch);
        for t in 0..PER_TOKEN_MAX_TOKENS {
            p.apply(&x[t * k..(t + 1) * k], &mut alone);
            assert_eq!(&batch[t * n..(t + 1) * n], &alone[..], "token {t}");
        }
    }

    #[test]
    fn the_path_follows_the_token_count() {
        assert_eq!(ProjectionPath::for_tokens(1), ProjectionPath::PerToken);
        assert_eq!(
            ProjectionPath::for_tokens(PER_TOKEN_MAX_TOKENS),
            ProjectionPath::PerToken
        );
        assert_eq!(
            ProjectionPath::for_tokens(PER_TOKEN_MAX_TOKENS + 1),
            ProjectionPath::Blocked
        );
    }
}
