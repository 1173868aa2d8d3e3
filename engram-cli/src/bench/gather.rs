//! Gather vs memcpy: random rows out of a table in RAM and memory-mapped, against a copy
//! of the same bytes, both sides on one thread and on all threads, measured in one run.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use engram_core::dtype::RowDtype;
use engram_core::table::TableStore;
use engram_core::testing::TestRng;
use engram_cpu::table::{AlignedBytes, OutputStores};
use engram_cpu::{largest_cache_bytes, CpuTable};
use rayon::prelude::*;
use serde::Serialize;

use super::{bench_table_spec, mapped_table};

/// Row sizes measured; the first (128 bytes, the smallest size the target names) is the
/// one every ratio is about.
const ROW_BYTES: [usize; 4] = [128, 256, 512, 1024];

/// Passes per measurement; each figure is the best of them.
const REPS: usize = 5;

/// Throughputs at 128-byte rows at one thread count, measured interleaved (one pass of
/// each in turn, best of 5 each), so drift in the machine's memory bandwidth reaches
/// all of them alike.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Throughputs {
    /// Gather from the table read into RAM, GB/s of rows.
    pub ram: f64,
    /// Gather from the memory-mapped table, GB/s of rows.
    pub mmap: f64,
    /// Copy of the same number of bytes with the C library's memcpy (`copy_from_slice`),
    /// GB/s.
    pub memcpy_libc: f64,
    /// The same copy with the stores the gather uses for this output
    /// (`OutputStores::for_output`: streaming when it is larger than the largest cache),
    /// GB/s.
    pub memcpy_streaming: f64,
}

impl Throughputs {
    /// The four figures in field order (for tests' fixtures).
    #[cfg(test)]
    pub(super) fn of(ram: f64, mmap: f64, memcpy_libc: f64, memcpy_streaming: f64) -> Self {
        Self {
            ram,
            mmap,
            memcpy_libc,
            memcpy_streaming,
        }
    }

    /// The baseline: the faster of the two copies.
    pub fn memcpy(&self) -> f64 {
        self.memcpy_libc.max(self.memcpy_streaming)
    }
}

/// The gather part of `engram bench` (flattened into [`super::BenchReport`]: these keys
/// are top-level in its JSON).
#[derive(Debug, Clone, Serialize)]
pub struct GatherReport {
    /// Size of each table (4x the largest CPU cache, at least 256 MiB, at most 2 GiB),
    /// f32 rows.
    pub gather_table_bytes: usize,
    /// Bytes of rows moved per pass (2x the largest cache, 64 MiB to 1 GiB), into one
    /// page-aligned output (so the gather streams it to memory, as memcpy does at that
    /// size when the C library's threshold for non-temporal stores is below it).
    pub gather_pass_bytes: usize,
    /// Gather throughput in GB/s (bytes of rows copied per second), random rows of the
    /// table read into RAM (`TableMode::Ram`: huge pages where the kernel offers them),
    /// all threads, best of 5 passes; keyed by row bytes (128, 256, 512, 1024).
    pub gather_gb_per_s_by_row_bytes: Vec<(usize, f64)>,
    /// The same gathers from the same file memory-mapped (`TableMode::Mmap`, page cache
    /// warmed; rows starting on a page of the file, as `engram init-checkpoint` writes them).
    pub gather_mmap_gb_per_s_by_row_bytes: Vec<(usize, f64)>,
    /// Gather from RAM at 128-byte rows, all threads.
    pub gather_gb_per_s: f64,
    /// Gather from RAM at 128-byte rows, one thread.
    pub gather_gb_per_s_1_thread: f64,
    /// Gather from the mapped table at 128-byte rows, all threads.
    pub gather_mmap_gb_per_s: f64,
    /// Gather from the mapped table at 128-byte rows, one thread.
    pub gather_mmap_gb_per_s_1_thread: f64,
    /// Copy of one pass's bytes out of the RAM table into the gathers' output, split in
    /// one contiguous share per thread of rayon's pool, all threads, best of 5: the
    /// faster of `memcpy_libc_gb_per_s` and `memcpy_streaming_gb_per_s`. The memory
    /// bandwidth baseline for the all-threads gathers.
    pub memcpy_gb_per_s: f64,
    /// The same on one thread: the baseline for the one-thread gathers.
    pub memcpy_gb_per_s_1_thread: f64,
    /// The copy with the C library's memcpy (`copy_from_slice`), all threads. Whether it
    /// uses non-temporal stores at this size depends on the library's threshold (glibc
    /// derives it from the shared cache size it detects).
    pub memcpy_libc_gb_per_s: f64,
    /// The same, one thread.
    pub memcpy_libc_gb_per_s_1_thread: f64,
    /// The copy with the stores the gather uses for this output (streaming stores when it
    /// is larger than the largest cache), all threads.
    pub memcpy_streaming_gb_per_s: f64,
    /// The same, one thread.
    pub memcpy_streaming_gb_per_s_1_thread: f64,
    /// gather / memcpy at 128-byte rows from RAM, all threads on both sides (the same as
    /// `gather_vs_memcpy_all_threads`).
    pub gather_vs_memcpy: f64,
    /// gather / memcpy at 128-byte rows from RAM, one thread on both sides.
    pub gather_vs_memcpy_1_thread: f64,
    /// gather / memcpy at 128-byte rows from RAM, all threads on both sides.
    pub gather_vs_memcpy_all_threads: f64,
    /// gather from the mapped table / memcpy, all threads on both sides (the same as
    /// `gather_mmap_vs_memcpy_all_threads`).
    pub gather_mmap_vs_memcpy: f64,
    /// gather from the mapped table / memcpy, one thread on both sides.
    pub gather_mmap_vs_memcpy_1_thread: f64,
    /// gather from the mapped table / memcpy, all threads on both sides.
    pub gather_mmap_vs_memcpy_all_threads: f64,
}

impl GatherReport {
    /// The report of measured throughputs: `one` and `all` at 128-byte rows on one thread
    /// and on all threads, `ram`/`mmap` all-threads gathers by row size.
    pub fn new(
        table_bytes: usize,
        pass_bytes: usize,
        ram: Vec<(usize, f64)>,
        mmap: Vec<(usize, f64)>,
        one: Throughputs,
        all: Throughputs,
    ) -> Self {
        Self {
            gather_table_bytes: table_bytes,
            gather_pass_bytes: pass_bytes,
            gather_gb_per_s_by_row_bytes: ram,
            gather_mmap_gb_per_s_by_row_bytes: mmap,
            gather_gb_per_s: all.ram,
            gather_gb_per_s_1_thread: one.ram,
            gather_mmap_gb_per_s: all.mmap,
            gather_mmap_gb_per_s_1_thread: one.mmap,
            memcpy_gb_per_s: all.memcpy(),
            memcpy_gb_per_s_1_thread: one.memcpy(),
            memcpy_libc_gb_per_s: all.memcpy_libc,
            memcpy_libc_gb_per_s_1_thread: one.memcpy_libc,
            memcpy_streaming_gb_per_s: all.memcpy_streaming,
            memcpy_streaming_gb_per_s_1_thread: one.memcpy_streaming,
            gather_vs_memcpy: all.ram / all.memcpy(),
            gather_vs_memcpy_1_thread: one.ram / one.memcpy(),
            gather_vs_memcpy_all_threads: all.ram / all.memcpy(),
            gather_mmap_vs_memcpy: all.mmap / all.memcpy(),
            gather_mmap_vs_memcpy_1_thread: one.mmap / one.memcpy(),
            gather_mmap_vs_memcpy_all_threads: all.mmap / all.memcpy(),
        }
    }
}

/// One timed pass: what it runs, and on which pool (`None`: rayon's global pool, all
/// threads).
type Pass<'a> = (
    Option<&'a rayon::ThreadPool>,
    &'a (dyn Fn(&mut OutputBuffer) -> Result<()> + Sync),
);

/// Best time of each pass over `REPS` rounds, the passes taken in turn within a round.
fn best_interleaved(out: &mut OutputBuffer, passes: &[Pass<'_>]) -> Result<Vec<Duration>> {
    let mut best = vec![Duration::MAX; passes.len()];
    for _ in 0..REPS {
        for (b, (pool, pass)) in best.iter_mut().zip(passes) {
            let t = Instant::now();
            match pool {
                Some(pool) => pool.install(|| pass(out))?,
                None => pass(out)?,
            }
            *b = (*b).min(t.elapsed());
        }
    }
    Ok(best)
}

/// Copies `src` into `dst` (same length) in one contiguous share per thread of the
/// current rayon pool, each with `stores` (`OutputStores::Cached`: the C library's
/// memcpy).
fn parallel_copy(dst: &mut [u8], src: &[u8], stores: OutputStores) {
    let share = dst
        .len()
        .div_ceil(rayon::current_num_threads())
        .next_multiple_of(4096)
        .max(4096);
    dst.par_chunks_mut(share)
        .zip(src.par_chunks(share))
        .for_each(|(d, s)| {
            stores.copy(s, d);
            stores.finish();
        });
}

pub fn bench_gather(dir: &Path) -> Result<GatherReport> {
    // Both sides must come from memory, not cache: the table is 4x the largest cache and
    // each pass (the gather's output, the copy's source) 2x, so no pass can stay cached
    // for the next (a 300 MiB L3 is seen on cloud VMs).
    let cache = largest_cache_bytes();
    let table_bytes = (4 * cache).clamp(256 << 20, 2 << 30);
    let pass_bytes = (2 * cache).clamp(64 << 20, 1 << 30);
    let gb_per_s = |took: Duration| pass_bytes as f64 / took.as_secs_f64() / 1e9;
    // One output for every pass, gathers and copy alike: page-aligned (so 64-byte
    // aligned, as the runtime's buffers are), huge pages where offered, touched before.
    let mut out = OutputBuffer::new(pass_bytes)?;
    let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let (mut ram, mut mmap) = (Vec::new(), Vec::new());
    let (mut one, mut all) = (None, None);
    for (i, row_bytes) in ROW_BYTES.into_iter().enumerate() {
        let width = row_bytes / 4;
        let rows = table_bytes / row_bytes;
        let name = format!("gather{row_bytes}");
        let mapped = mapped_table(dir, &name, rows, width, RowDtype::F32, i as u64)?;
        let path = dir.join(format!("{name}.safetensors"));
        let in_ram = CpuTable::load(&path, &bench_table_spec(rows, width, RowDtype::F32))?;
        let mut rng = TestRng::new(7 + i as u64);
        let ids: Vec<u64> = (0..pass_bytes / row_bytes)
            .map(|_| rng.below(rows as u64))
            .collect();
        let gather_ram = |out: &mut OutputBuffer| Ok(in_ram.gather_f32(&ids, out.f32s())?);
        let gather_mmap = |out: &mut OutputBuffer| Ok(mapped.gather_f32(&ids, out.f32s())?);
        if i == 0 {
            // The copy's source: the RAM table's first pass of bytes.
            let src = &in_ram.values_bytes()[..pass_bytes];
            // The gather decides its stores on the whole output; so does the copy.
            let streaming = OutputStores::for_output(out.bytes(), row_bytes);
            let copy_with = |stores| {
                move |out: &mut OutputBuffer| {
                    parallel_copy(out.bytes(), src, stores);
                    black_box(out.bytes());
                    Ok(())
                }
            };
            let (libc, stream) = (copy_with(OutputStores::Cached), copy_with(streaming));
            let mut passes: Vec<Pass<'_>> = Vec::new();
            for pool in [None, Some(&one_thread)] {
                passes.extend([
                    (pool, &gather_ram as _),
                    (pool, &gather_mmap as _),
                    (pool, &libc as _),
                    (pool, &stream as _),
                ]);
            }
            let g: Vec<f64> = best_interleaved(&mut out, &passes)?
                .into_iter()
                .map(gb_per_s)
                .collect();
            let at = |k: usize| Throughputs {
                ram: g[k],
                mmap: g[k + 1],
                memcpy_libc: g[k + 2],
                memcpy_streaming: g[k + 3],
            };
            (all, one) = (Some(at(0)), Some(at(4)));
            ram.push((row_bytes, g[0]));
            mmap.push((row_bytes, g[1]));
        } else {
            let t = best_interleaved(&mut out, &[(None, &gather_ram), (None, &gather_mmap)])?;
            ram.push((row_bytes, gb_per_s(t[0])));
            mmap.push((row_bytes, gb_per_s(t[1])));
        }
        drop((mapped, in_ram));
        std::fs::remove_file(&path).ok();
    }
    let (one, all) = one.zip(all).context("no 128-byte rows measured")?;
    Ok(GatherReport::new(
        table_bytes,
        pass_bytes,
        ram,
        mmap,
        one,
        all,
    ))
}

/// The gathers' (and the copy's) output: the CPU backend's own RAM buffer (page-aligned,
/// huge pages where offered), every page touched before the first pass.
pub(super) struct OutputBuffer(AlignedBytes);

impl OutputBuffer {
    fn new(bytes: usize) -> Result<Self> {
        let mut buf = AlignedBytes::zeroed(bytes).context("bench output buffer")?;
        buf.as_mut_slice()
            .iter_mut()
            .step_by(4096)
            .for_each(|b| *b = 0);
        Ok(Self(buf))
    }

    fn bytes(&mut self) -> &mut [u8] {
        self.0.as_mut_slice()
    }

    fn f32s(&mut self) -> &mut [f32] {
        let bytes = self.0.as_mut_slice();
        let len = bytes.len() / 4;
        // SAFETY: the buffer is page-aligned, holds at least `4 * len` initialized bytes
        // and any bytes are a valid f32; the view borrows `self` mutably.
        unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<f32>(), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_compare_like_thread_counts() {
        // The baseline is the faster copy, whichever it is.
        let one = Throughputs::of(1.0, 2.0, 4.0, 3.0);
        let all = Throughputs::of(9.0, 7.0, 8.0, 10.0);
        let r = GatherReport::new(1, 1, vec![(128, 9.0)], vec![(128, 7.0)], one, all);
        assert_eq!(r.gather_vs_memcpy_1_thread, 0.25);
        assert_eq!(r.gather_mmap_vs_memcpy_1_thread, 0.5);
        assert_eq!(r.gather_vs_memcpy_all_threads, 0.9);
        assert_eq!(r.gather_mmap_vs_memcpy_all_threads, 0.7);
        // The headline ratios are the all-threads ones.
        assert_eq!(r.gather_vs_memcpy, 0.9);
        assert_eq!(r.gather_mmap_vs_memcpy, 0.7);
        assert_eq!((r.memcpy_gb_per_s, r.memcpy_gb_per_s_1_thread), (10.0, 4.0));
        assert_eq!((r.gather_gb_per_s, r.gather_gb_per_s_1_thread), (9.0, 1.0));
        assert_eq!(
            (r.gather_mmap_gb_per_s, r.gather_mmap_gb_per_s_1_thread),
            (7.0, 2.0)
        );
    }

    fn bytemuck_u8(v: &mut [u128]) -> &mut [u8] {
        // SAFETY: any bytes are valid u8 and the view borrows `v` mutably.
        unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), v.len() * 16) }
    }

    #[test]
    fn parallel_copy_copies_every_byte() {
        // Lengths that do not split evenly, on pools of several sizes.
        for threads in [1, 2, 3, 8] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for len in [0usize, 1, 4095, 4097, 3 * 4096 + 17, 100_000] {
                let src: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
                for stores in [OutputStores::Cached, OutputStores::Streaming] {
                    // 16-byte aligned, as streaming stores need (else they fall back).
                    let mut dst = vec![0u128; len.div_ceil(16)];
                    let dst = &mut bytemuck_u8(&mut dst)[..len];
                    pool.install(|| parallel_copy(dst, &src, stores));
                    assert_eq!(dst, &src[..], "{threads} threads, {len} bytes, {stores:?}");
                }
            }
        }
    }
}
