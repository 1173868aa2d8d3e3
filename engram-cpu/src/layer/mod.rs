//! The CPU implementation of one Engram layer (both variants), computing what
//! [`engram_core::reference::ReferenceLayer`] computes: the projections (f32, through the
//! `gemm` crate), then fused per-token loops (gate, value, and for the
//! paper variant the short conv), parallel over tokens when the batch is large.
//!
//! - `matmul`: the projections (per token for small batches, else one GEMM);
//! - `paper`: docs/algorithm.md section 7 (keys + value, gate, short conv with
//!   per-sequence state);
//! - `v41`: docs/algorithm.md section 8 (fused wkv, bf16 kv, gate, bf16 output, dead
//!   tokens);
//! - `scratch`: work buffers reused across forwards.

pub mod matmul;
mod paper;
mod scratch;
mod v41;

use engram_core::backend::{check_forward_args, EngramLayer, Segment};
use engram_core::checkpoint::LayerWeights;
use engram_core::config::{EngramConfig, Variant};
use engram_core::{EngramError, Result};
use half::bf16;
use rayon::prelude::*;

use paper::PaperLayer;
use scratch::{sized, Scratch, ScratchPool};
use v41::V41Layer;

/// Inner-loop elements below which a pass over tokens stays on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 15;

/// `Some(min tokens per rayon job)` when a pass over `tokens` tokens of
/// `work_per_token` elements each is worth spreading over threads.
pub(crate) fn token_grain(tokens: usize, work_per_token: usize) -> Option<usize> {
    let parallel = tokens >= 2
        && tokens.saturating_mul(work_per_token) >= PARALLEL_MIN_WORK
        && rayon::current_num_threads() > 1;
    parallel.then(|| (PARALLEL_MIN_WORK / 8 / work_per_token.max(1)).max(1))
}

/// `dst[i] = f(src[i])`, on rayon for large buffers.
fn convert<A: Copy + Sync, B: Send>(src: &[A], dst: &mut [B], f: impl Fn(A) -> B + Sync) {
    if src.len() >= PARALLEL_MIN_WORK && rayon::current_num_threads() > 1 {
        dst.par_iter_mut()
            .zip(src)
            .with_min_len(PARALLEL_MIN_WORK / 8)
            .for_each(|(d, &s)| *d = f(s));
    } else {
        dst.iter_mut().zip(src).for_each(|(d, &s)| *d = f(s));
    }
}

#[derive(Clone, Debug)]
enum Math {
    Paper(PaperLayer),
    V41(V41Layer),
}

/// One Engram layer on the CPU. Cheap to share across threads (`&self` forwards).
pub struct CpuLayer {
    cfg: EngramConfig,
    layer_id: usize,
    math: Math,
    scratch: ScratchPool,
}

impl std::fmt::Debug for CpuLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuLayer")
            .field("variant", &self.cfg.variant)
            .field("layer_id", &self.layer_id)
            .finish_non_exhaustive()
    }
}

impl CpuLayer {
    /// Builds the layer from checked weights of the config's variant. Errors when
    /// `layer_id` is not an Engram layer of `cfg`, when the weights are of the other
    /// variant, or when any weight has the wrong size (the message names it).
    pub fn new(cfg: EngramConfig, layer_id: usize, weights: LayerWeights) -> Result<Self> {
        cfg.validate()?;
        cfg.layer_index(layer_id)?;
        weights.check(&cfg)?;
        let math = match (weights, cfg.variant) {
            (LayerWeights::Paper(w), Variant::Paper) => Math::Paper(PaperLayer::new(&cfg, &w)?),
            (LayerWeights::V41(w), Variant::V41) => Math::V41(V41Layer::new(&cfg, w)?),
            _ => {
                return Err(EngramError::config(
                    "variant",
                    "weights are for the other variant",
                ))
            }
        };
        Ok(Self {
            cfg,
            layer_id,
            math,
            scratch: ScratchPool::default(),
        })
    }

    /// [`EngramLayer::forward`] with bf16 hidden states and output (computed in f32
    /// inside; V4.1 outputs are bf16 values anyway, so nothing is lost there).
    pub fn forward_bf16(
        &self,
        hidden: &[bf16],
        embeddings: &[f32],
        dead: Option<&[bool]>,
        segments: &mut [Segment<'_>],
        out: &mut [bf16],
    ) -> Result<()> {
        check_forward_args(
            &self.cfg,
            hidden.len(),
            embeddings.len(),
            dead,
            segments,
            out.len(),
        )?;
        let mut s = self.scratch.take();
        let (mut h32, mut o32) = (std::mem::take(&mut s.hidden), std::mem::take(&mut s.out));
        let (h, o) = (sized(&mut h32, hidden.len()), sized(&mut o32, out.len()));
        convert(hidden, h, |v| v.to_f32());
        self.run(h, embeddings, dead, segments, o, &mut s);
        convert(o, out, bf16::from_f32);
        (s.hidden, s.out) = (h32, o32);
        self.scratch.put(s);
        Ok(())
    }

    fn projection(&self) -> &matmul::Projection {
        match &self.math {
            Math::Paper(m) => m.projection(),
            Math::V41(m) => m.projection(),
        }
    }

    /// The math, on checked arguments.
    fn run(
        &self,
        hidden: &[f32],
        embeddings: &[f32],
        dead: Option<&[bool]>,
        segments: &mut [Segment<'_>],
        out: &mut [f32],
        s: &mut Scratch,
    ) {
        if out.is_empty() {
            return;
        }
        match &self.math {
            Math::Paper(m) => m.forward(hidden, embeddings, segments, out, s),
            Math::V41(m) => m.forward(hidden, embeddings, dead, out, s),
        }
    }
}

impl EngramLayer for CpuLayer {
    fn config(&self) -> &EngramConfig {
        &self.cfg
    }

    fn layer_id(&self) -> usize {
        self.layer_id
    }

    fn forward(
        &self,
        hidden: &[f32],
        embeddings: &[f32],
        dead: Option<&[bool]>,
        segments: &mut [Segment<'_>],
        out: &mut [f32],
    ) -> Result<()> {
        check_forward_args(
            &self.cfg,
            hidden.len(),
            embeddings.len(),
            dead,
            segments,
            out.len(),
        )?;
        let mut s = self.scratch.take();
        self.run(hidden, embeddings, dead, segments, out, &mut s);
        self.scratch.put(s);
        Ok(())
    }

    /// The rows' projection, on the calling thread's pool (a fetcher's own). The output
    /// equals what `forward` computes inside on any pool: a per-token product runs on one
    /// thread either way, and the blocked GEMM splits the output, not the sums
    /// (`projecting_on_a_fetcher_pool_changes_no_bit`).
    fn project(&self, embeddings: &[f32]) -> Result<Option<Vec<f32>>> {
        let e = self.cfg.embed_dim();
        if !embeddings.len().is_multiple_of(e) {
            return Err(EngramError::shape(
                "embeddings",
                format!("a multiple of {e} (tokens x embed_dim)"),
                embeddings.len(),
            ));
        }
        let proj = self.projection();
        let mut kv = vec![0f32; embeddings.len() / e * proj.out_dim()];
        proj.apply(embeddings, &mut kv);
        Ok(Some(kv))
    }

    fn forward_projected(
        &self,
        hidden: &[f32],
        projected: &mut [f32],
        dead: Option<&[bool]>,
        segments: &mut [Segment<'_>],
        out: &mut [f32],
    ) -> Result<()> {
        let tokens: usize = segments.iter().map(|s| s.len).sum();
        let n = self.projection().out_dim();
        if projected.len() != tokens * n {
            return Err(EngramError::shape(
                "projected rows",
                format!("{tokens} tokens x {n} = {}", tokens * n),
                projected.len(),
            ));
        }
        // The embeddings' size stands in for the rows they were projected from.
        check_forward_args(
            &self.cfg,
            hidden.len(),
            tokens * self.cfg.embed_dim(),
            dead,
            segments,
            out.len(),
        )?;
        if out.is_empty() {
            return Ok(());
        }
        let mut s = self.scratch.take();
        match &self.math {
            Math::Paper(m) => m.forward_projected(hidden, projected, segments, out, &mut s),
            Math::V41(m) => m.forward_projected(hidden, projected, dead, out),
        }
        self.scratch.put(s);
        Ok(())
    }
}
