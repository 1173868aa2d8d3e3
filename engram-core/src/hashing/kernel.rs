//! Running work with one lane kernel: [`run_with`] dispatches to a function compiled for
//! the kernel's instruction set; the one-window jobs (one layer, every layer) run there.

use super::plan::VectorPlan;
use super::LayerHasher;
use crate::fastmod::{self, Isa, LaneKernel};

/// Work that runs with one lane kernel. [`run_with`] calls `run` inside a function
/// compiled for the kernel's instruction set, where `run` (inline) and the kernel's
/// intrinsics inline.
pub(super) trait KernelJob {
    /// # Safety
    /// `K`'s instruction set must be available.
    unsafe fn run<K: LaneKernel>(self);
}

/// Runs `job` with the lane kernel of `isa`, which must come from [`Isa::detect`] or have
/// passed [`Isa::available`] (every plan's ISA does).
pub(super) fn run_with<J: KernelJob>(isa: Isa, job: J) {
    // SAFETY: the ISA was checked on this CPU.
    unsafe {
        match isa {
            Isa::Portable => job.run::<fastmod::Portable>(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => run_avx512(job),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => run_avx2(job),
            #[cfg(not(target_arch = "x86_64"))]
            _ => job.run::<fastmod::Portable>(),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq")]
unsafe fn run_avx512<J: KernelJob>(job: J) {
    job.run::<fastmod::Avx512>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn run_avx2<J: KernelJob>(job: J) {
    job.run::<fastmod::Avx2>()
}

/// [`LayerHasher::rows_for_window`] on the vector path.
pub(super) struct WindowJob<'a> {
    pub(super) layer: &'a LayerHasher,
    pub(super) plan: &'a VectorPlan,
    pub(super) window: &'a [i64],
    pub(super) with_offsets: bool,
    pub(super) out: &'a mut [u64],
}

impl KernelJob for WindowJob<'_> {
    #[inline(always)]
    unsafe fn run<K: LaneKernel>(self) {
        self.layer
            .window_rows::<K>(self.plan, self.window, self.with_offsets, self.out)
    }
}

/// Rows of every layer (`[layers, heads]`, offsets added) for one window.
pub(super) struct StepJob<'a> {
    pub(super) layers: &'a [LayerHasher],
    pub(super) window: &'a [i64],
    pub(super) heads: usize,
    pub(super) out: &'a mut [u64],
}

impl StepJob<'_> {
    /// One dispatch for every layer when they share a kernel.
    #[inline]
    pub(super) fn run_all(self) {
        let isa = self.layers.first().and_then(LayerHasher::isa);
        match isa {
            Some(isa) if self.layers.iter().all(|l| l.isa() == Some(isa)) => run_with(isa, self),
            _ => {
                for (l, layer) in self.layers.iter().enumerate() {
                    let out = &mut self.out[l * self.heads..(l + 1) * self.heads];
                    layer.rows_for_window(self.window, true, out);
                }
            }
        }
    }
}

impl KernelJob for StepJob<'_> {
    #[inline(always)]
    unsafe fn run<K: LaneKernel>(self) {
        for (l, layer) in self.layers.iter().enumerate() {
            let plan = layer.vector.as_ref().unwrap();
            let out = &mut self.out[l * self.heads..(l + 1) * self.heads];
            layer.window_rows::<K>(plan, self.window, true, out);
        }
    }
}
