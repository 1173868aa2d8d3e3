//! The projections of both layer variants as one f32 GEMM over all tokens of a batch:
//! `out[t, n] = sum_k x[t, k] * W[n, k]` with `W` in PyTorch's Linear layout `[out, in]`.

use gemm::Parallelism;

/// Below this many multiply-adds a GEMM runs on the calling thread: spreading a small
/// product over the rayon pool costs more than it saves.
const PARALLEL_MIN_MACS: usize = 1 << 20;

/// A bias-free linear map `[out_dim, in_dim]`, row-major.
#[derive(Clone, Debug)]
pub(crate) struct Projection {
    weight: Vec<f32>,
    out_dim: usize,
    in_dim: usize,
}

impl Projection {
    /// `weight` must hold `out_dim * in_dim` values (callers check and report sizes).
    pub(crate) fn new(weight: Vec<f32>, out_dim: usize, in_dim: usize) -> Self {
        assert_eq!(weight.len(), out_dim * in_dim, "projection weight size");
        Self {
            weight,
            out_dim,
            in_dim,
        }
    }

    pub(crate) fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// `out [tokens, out_dim] = x [tokens, in_dim] @ W^T`, overwriting `out`.
    pub(crate) fn apply(&self, x: &[f32], out: &mut [f32]) {
        let (n, k) = (self.out_dim, self.in_dim);
        assert!(k > 0 && x.len().is_multiple_of(k), "projection input size");
        let m = x.len() / k;
        assert_eq!(out.len(), m * n, "projection output size");
        if m == 0 || n == 0 {
            return;
        }
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
                parallelism(m * n * k),
            )
        }
    }
}

fn parallelism(macs: usize) -> Parallelism {
    let threads = rayon::current_num_threads();
    if threads > 1 && macs >= PARALLEL_MIN_MACS {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_product() {
        let (m, n, k) = (5, 7, 11);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0)
            .collect();
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0)
            .collect();
        let p = Projection::new(w.clone(), n, k);
        let mut out = vec![f32::NAN; m * n];
        p.apply(&x, &mut out);
        for t in 0..m {
            for o in 0..n {
                let want: f32 = (0..k).map(|i| x[t * k + i] * w[o * k + i]).sum();
                assert_eq!(out[t * n + o], want, "({t}, {o})");
            }
        }
    }
}
