//! The CUDA kernels run on the CPU: their sources, compiled as C++ against a small
//! emulation of the CUDA execution model (tests/emu: real threads per block, barriers for
//! `__syncthreads`, per-warp exchange for `__shfl_xor_sync`), launched with the same
//! arguments as the crate's launches and checked against the core's reference math.
//!
//! This checks the kernels' logic on machines with no GPU; it says nothing about the
//! GPU itself (memory model, NVRTC, the driver). Skipped when no C++20 compiler exists.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use engram_core::backend::{EngramLayer, Segment, ShortConvState};
use engram_core::checkpoint::LayerWeights;
use engram_core::config::{
    EngramConfig, Variant, GATE_SCORE_CLAMP, PAPER_CONV_NORM_EPS, PAPER_GATE_NORM_EPS,
};
use engram_core::dtype::{e8m0_to_f32, f8e4m3_to_f32, round_bf16, RowDtype};
use engram_core::reference::ReferenceLayer;
use engram_cuda::host_table::{scale_row_bytes, value_row_bytes};
use engram_cuda::kernels;

mod common;
use common::*;

/// One kernel argument.
enum A {
    Buf(Vec<u8>),
    I32(i32),
    I64(i64),
    F32(f32),
    Null,
    /// An array of the addresses of other buffer arguments (index, or None for 0).
    Table(Vec<Option<usize>>),
    /// The address of byte `offset` of buffer argument `index`.
    At(usize, u64),
}

fn f32s(v: &[f32]) -> A {
    A::Buf(v.iter().flat_map(|x| x.to_le_bytes()).collect())
}
fn i64s(v: &[i64]) -> A {
    A::Buf(v.iter().flat_map(|x| x.to_le_bytes()).collect())
}
fn i32s(v: &[i32]) -> A {
    A::Buf(v.iter().flat_map(|x| x.to_le_bytes()).collect())
}
fn zeros(n_f32: usize) -> A {
    A::Buf(vec![0u8; 4 * n_f32])
}
fn read_f32(a: &A) -> Vec<f32> {
    match a {
        A::Buf(b) => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        _ => panic!("not a buffer"),
    }
}

struct Emu {
    exe: PathBuf,
    dir: tempfile::TempDir,
    runs: AtomicUsize,
}

impl Emu {
    /// The emulator, compiled once per test process; None (after "skipped: ...") without
    /// a C++20 compiler, or a failed test when `ENGRAM_REQUIRE_CXX20` is set (CI sets it,
    /// so the emulation never skips there).
    fn new(test: &str) -> Option<&'static Self> {
        static EMU: std::sync::OnceLock<Option<Emu>> = std::sync::OnceLock::new();
        let emu = EMU.get_or_init(Self::build).as_ref();
        if emu.is_none() {
            let required =
                std::env::var("ENGRAM_REQUIRE_CXX20").is_ok_and(|v| !v.is_empty() && v != "0");
            assert!(
                !required,
                "{test}: ENGRAM_REQUIRE_CXX20 is set but no C++20 compiler builds the kernel \
                 emulation (set CXX, or install g++ 10 or later)"
            );
            println!("skipped: {test}: no C++20 compiler for the kernel emulation");
        }
        emu
    }

    fn build() -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let probe = dir.path().join("probe.cpp");
        std::fs::write(
            &probe,
            "#include <barrier>\nint main() { std::barrier<> b(1); b.arrive_and_wait(); }\n",
        )
        .unwrap();
        let ok = Command::new(&cxx)
            .args(["-std=c++20", "-pthread", "-o"])
            .arg(dir.path().join("probe"))
            .arg(&probe)
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return None;
        }
        let src = [
            include_str!("emu/shim.hpp"),
            kernels::COMMON,
            kernels::GATHER,
            kernels::GATE,
            kernels::CONV,
            kernels::UTIL,
            include_str!("emu/runner.cpp"),
        ]
        .join("\n");
        let cpp = dir.path().join("emu.cpp");
        std::fs::write(&cpp, src).unwrap();
        let exe = dir.path().join("emu");
        let out = Command::new(&cxx)
            .args(["-std=c++20", "-O1", "-pthread", "-w", "-o"])
            .arg(&exe)
            .arg(&cpp)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "the kernels do not compile as C++ with the emulator:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(Self {
            exe,
            dir,
            runs: AtomicUsize::new(0),
        })
    }

    /// Runs kernel `name`; buffer arguments are updated in place.
    fn launch(&self, name: &str, grid: (u32, u32), block: (u32, u32), args: &mut [A]) {
        let k = self.runs.fetch_add(1, Ordering::Relaxed);
        let (inp, outp) = (
            self.dir.path().join(format!("in{k}")),
            self.dir.path().join(format!("out{k}")),
        );
        let mut w = Vec::new();
        w.extend((name.len() as u32).to_le_bytes());
        w.extend(name.as_bytes());
        for v in [grid.0, grid.1, block.0, block.1, args.len() as u32] {
            w.extend(v.to_le_bytes());
        }
        for a in args.iter() {
            match a {
                A::Buf(b) => {
                    w.push(0);
                    w.extend((b.len() as u64).to_le_bytes());
                    w.extend(b);
                }
                A::I32(v) => {
                    w.push(1);
                    w.extend(v.to_le_bytes());
                }
                A::I64(v) => {
                    w.push(2);
                    w.extend(v.to_le_bytes());
                }
                A::F32(v) => {
                    w.push(3);
                    w.extend(v.to_le_bytes());
                }
                A::Null => w.push(5),
                A::Table(t) => {
                    w.push(6);
                    w.extend((t.len() as u32).to_le_bytes());
                    for e in t {
                        w.extend(e.map_or(-1i32, |i| i as i32).to_le_bytes());
                    }
                }
                A::At(i, off) => {
                    w.push(7);
                    w.extend((*i as u32).to_le_bytes());
                    w.extend(off.to_le_bytes());
                }
            }
        }
        std::fs::write(&inp, w).unwrap();
        let out = Command::new(&self.exe)
            .arg(&inp)
            .arg(&outp)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let back = std::fs::read(&outp).unwrap();
        let mut at = 0;
        for a in args.iter_mut() {
            if let A::Buf(b) = a {
                let n = b.len();
                b.copy_from_slice(&back[at..at + n]);
                at += n;
            }
        }
        assert_eq!(at, back.len());
        let _ = std::fs::remove_file(inp);
        let _ = std::fs::remove_file(outp);
    }
}

const BLOCK: (u32, u32) = (256, 1);

/// `c[m, n] = a[m, k] @ b[n, k]^T` with the fallback GEMM kernel.
fn emu_gemm(emu: &Emu, a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut args = [
        f32s(a),
        f32s(b),
        zeros(m * n),
        A::I32(m as i32),
        A::I32(n as i32),
        A::I32(k as i32),
    ];
    let grid = (n.div_ceil(16) as u32, m.div_ceil(16) as u32);
    emu.launch("engram_sgemm_nt", grid, (16, 16), &mut args);
    read_f32(&args[2])
}

#[test]
fn emulated_gemm_and_dequant() {
    let Some(emu) = Emu::new("emulated_gemm_and_dequant") else {
        return;
    };
    let mut rng = Rng::new(1);
    let (m, n, k) = (19, 37, 45);
    let a = rng.vec(m * k, 1.0);
    let b = rng.vec(n * k, 1.0);
    let c = emu_gemm(emu, &a, &b, m, n, k);
    let want: Vec<f32> = (0..m * n)
        .map(|i| {
            let (r, col) = (i / n, i % n);
            (0..k)
                .map(|j| a[r * k + j] as f64 * b[col * k + j] as f64)
                .sum::<f64>() as f32
        })
        .collect();
    assert!(rel_err(&c, &want) < 1e-6);

    // Every E4M3 code against extreme scales, bit-exact.
    let codes: Vec<u8> = vec![0, 1, 100, 127, 135, 254];
    let width = 256;
    let values: Vec<u8> = codes
        .iter()
        .flat_map(|_| (0..width).map(|c| c as u8))
        .collect();
    let scales: Vec<u8> = codes.iter().flat_map(|&s| [s; 8]).collect();
    let rows = codes.len();
    let mut args = [
        A::Buf(values.clone()),
        A::Buf(scales.clone()),
        zeros(rows * width),
        A::I64(rows as i64),
        A::I32(width as i32),
    ];
    emu.launch("engram_dequant_f8", (3, 1), BLOCK, &mut args);
    let got = read_f32(&args[2]);
    for (i, g) in got.iter().enumerate() {
        let want = round_bf16(f8e4m3_to_f32(values[i]) * e8m0_to_f32(scales[i / 32]));
        assert!(
            g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
            "element {i}: {g:e} vs {want:e}"
        );
    }
}

#[test]
fn emulated_gathers_and_cache_inserts() {
    let Some(emu) = Emu::new("emulated_gathers_and_cache_inserts") else {
        return;
    };
    let mut rng = Rng::new(2);
    for dtype in [
        RowDtype::F32,
        RowDtype::BF16,
        RowDtype::F16,
        RowDtype::F8E4M3Scaled,
    ] {
        let width = 64;
        let host = random_table(dtype, 50, width, &mut rng);
        let (rb, sb) = (value_row_bytes(dtype, width), scale_row_bytes(dtype, width));
        let code = match dtype {
            RowDtype::F32 => 0,
            RowDtype::BF16 => 1,
            RowDtype::F16 => 2,
            RowDtype::F8E4M3Scaled => 3,
        };
        let scales = || match host.scales() {
            Some(s) => A::Buf(s.to_vec()),
            None => A::Null,
        };
        // Table A indexed by ids.
        let ids: Vec<u64> = (0..23).map(|_| rng.below(50)).collect();
        let mut args = [
            A::Buf(host.values().to_vec()),
            scales(),
            A::Null,
            A::Null,
            i64s(&ids.iter().map(|&r| r as i64).collect::<Vec<_>>()),
            zeros(ids.len() * width),
            A::I32(ids.len() as i32),
            A::I32(width as i32),
            A::I32(code),
            A::I64(rb as i64),
            A::I64(sb as i64),
        ];
        emu.launch("engram_gather_rows", (4, 1), BLOCK, &mut args);
        assert_eq!(
            bits(&read_f32(&args[5])),
            bits(&cpu_gather(&host, &ids)),
            "{dtype} from A"
        );

        // Staged rows (B) inside a payload, sources mixing A and B, then the same with
        // no sources (row i of B) — as the staged placements lay them out.
        let staged: Vec<u64> = vec![7, 3, 49];
        let mut payload = vec![0u8; 4096];
        let (values_at, scales_at) = (256usize, 2048usize);
        for (j, &r) in staged.iter().enumerate() {
            payload[values_at + j * rb..values_at + (j + 1) * rb]
                .copy_from_slice(host.row_values(r));
            payload[scales_at + j * sb..scales_at + (j + 1) * sb]
                .copy_from_slice(host.row_scales(r));
        }
        let src: Vec<i64> = vec![5, -1, -3, 5, -2, 0];
        let want_rows: Vec<u64> = vec![5, 7, 49, 5, 3, 0];
        let has_scales = sb > 0;
        let mut args = [
            A::Buf(host.values().to_vec()),
            scales(),
            A::At(12, values_at as u64),
            if has_scales {
                A::At(12, scales_at as u64)
            } else {
                A::Null
            },
            i64s(&src),
            zeros(src.len() * width),
            A::I32(src.len() as i32),
            A::I32(width as i32),
            A::I32(code),
            A::I64(rb as i64),
            A::I64(sb as i64),
            A::Null, // padding so the payload is argument 12
            A::Buf(payload.clone()),
        ];
        emu.launch("engram_gather_rows", (2, 1), BLOCK, &mut args);
        assert_eq!(
            bits(&read_f32(&args[5])),
            bits(&cpu_gather(&host, &want_rows)),
            "{dtype} from A and B"
        );
        let mut args = [
            A::Null,
            A::Null,
            A::At(12, values_at as u64),
            if has_scales {
                A::At(12, scales_at as u64)
            } else {
                A::Null
            },
            A::Null,
            zeros(staged.len() * width),
            A::I32(staged.len() as i32),
            A::I32(width as i32),
            A::I32(code),
            A::I64(rb as i64),
            A::I64(sb as i64),
            A::Null,
            A::Buf(payload.clone()),
        ];
        emu.launch("engram_gather_rows", (1, 1), BLOCK, &mut args);
        assert_eq!(
            bits(&read_f32(&args[5])),
            bits(&cpu_gather(&host, &staged)),
            "{dtype} B in order"
        );
        // The same rows 4 bytes further on: too misaligned for the wide loads, so every
        // format takes the one-column-per-lane path.
        let mut shifted = vec![0u8; 4096];
        shifted[values_at + 4..values_at + 4 + staged.len() * rb]
            .copy_from_slice(&payload[values_at..values_at + staged.len() * rb]);
        shifted[scales_at..].copy_from_slice(&payload[scales_at..]);
        args[2] = A::At(12, values_at as u64 + 4);
        args[5] = zeros(staged.len() * width);
        args[12] = A::Buf(shifted);
        emu.launch("engram_gather_rows", (1, 1), BLOCK, &mut args);
        assert_eq!(
            bits(&read_f32(&args[5])),
            bits(&cpu_gather(&host, &staged)),
            "{dtype} B misaligned"
        );

        // Cache inserts: staged rows 2 and 0 into slots 1 and 3.
        let slots = 4;
        let pairs: Vec<i64> = vec![1, 2, 3, 0];
        let mut args = [
            A::Buf(vec![0u8; slots * rb]),
            if has_scales {
                A::Buf(vec![0u8; slots * sb])
            } else {
                A::Null
            },
            A::At(9, values_at as u64),
            if has_scales {
                A::At(9, scales_at as u64)
            } else {
                A::Null
            },
            i64s(&pairs),
            A::I32(2),
            A::I64(rb as i64),
            A::I64(sb as i64),
            A::Null,
            A::Buf(payload),
        ];
        emu.launch("engram_cache_insert", (1, 1), BLOCK, &mut args);
        let A::Buf(cache) = &args[0] else {
            unreachable!()
        };
        assert_eq!(&cache[rb..2 * rb], host.row_values(49));
        assert_eq!(&cache[3 * rb..4 * rb], host.row_values(7));
        assert!(cache[..rb].iter().all(|&b| b == 0));
        if let A::Buf(cs) = &args[1] {
            assert_eq!(&cs[sb..2 * sb], host.row_scales(49));
        }
    }
}

/// The paper layer as `CudaLayer::forward_device` launches it, with the emulated kernels.
fn emu_paper(
    emu: &Emu,
    cfg: &EngramConfig,
    w: &engram_core::checkpoint::PaperWeights,
    hidden: &[f32],
    emb: &[f32],
    lens: &[usize],
    states: &mut [Option<&mut ShortConvState>],
) -> Vec<f32> {
    let (g, d, e, c) = (
        cfg.hc_mult,
        cfg.hidden_size,
        cfg.embed_dim(),
        cfg.branch_channels(),
    );
    let tokens: usize = lens.iter().sum();
    let mut wcat = Vec::new();
    let mut bias = Vec::new();
    for h in 0..g {
        wcat.extend_from_slice(&w.key_weight[h]);
        bias.extend_from_slice(&w.key_bias[h]);
    }
    wcat.extend_from_slice(&w.value_weight);
    bias.extend_from_slice(&w.value_bias);
    let n_kv = (g + 1) * d;
    let kv = emu_gemm(emu, emb, &wcat, tokens, n_kv, e);
    let mut args = [
        f32s(hidden),
        f32s(&kv),
        f32s(&bias),
        f32s(&w.norm1.concat()),
        f32s(&w.norm2.concat()),
        f32s(&w.conv_norms.concat()),
        zeros(tokens * c),
        zeros(tokens * c),
        A::I32(tokens as i32),
        A::I32(g as i32),
        A::I32(d as i32),
        A::F32(PAPER_GATE_NORM_EPS),
        A::F32(PAPER_CONV_NORM_EPS),
        A::F32(GATE_SCORE_CLAMP as f32),
    ];
    emu.launch("engram_paper_gate", (5, 1), BLOCK, &mut args);
    let (val, z) = (read_f32(&args[6]), read_f32(&args[7]));

    let (k, dil, h) = (cfg.kernel_size, cfg.conv_dilation(), cfg.conv_history());
    let (mut seg_of, mut pos_of, mut seg_start, mut seg_len) = (vec![], vec![], vec![], vec![]);
    let mut start = 0;
    for (i, &len) in lens.iter().enumerate() {
        seg_start.push(start as i32);
        seg_len.push(len as i32);
        for p in 0..len {
            seg_of.push(i as i32);
            pos_of.push(p as i32);
        }
        start += len;
    }
    let s = lens.len();
    // Windows follow the kernel's own arguments; the pointer table names them.
    let first = 12;
    let table: Vec<Option<usize>> = states
        .iter()
        .enumerate()
        .map(|(i, st)| st.as_ref().map(|_| first + i))
        .collect();
    let windows = |states: &[Option<&mut ShortConvState>]| -> Vec<A> {
        states
            .iter()
            .map(|st| match st {
                Some(st) => f32s(st.rows()),
                None => A::Buf(vec![0u8; 4]),
            })
            .collect()
    };
    let mut args: Vec<A> = vec![
        f32s(&val),
        f32s(&z),
        f32s(&w.conv_weight),
        i32s(&seg_of),
        i32s(&pos_of),
        A::Table(table.clone()),
        zeros(tokens * c),
        A::I32(tokens as i32),
        A::I32(c as i32),
        A::I32(k as i32),
        A::I32(dil as i32),
        A::I32(h as i32),
    ];
    args.extend(windows(states));
    emu.launch("engram_short_conv", (3, 1), BLOCK, &mut args);
    let out = read_f32(&args[6]);

    if table.iter().any(Option::is_some) {
        let first = 8;
        let table: Vec<Option<usize>> = states
            .iter()
            .enumerate()
            .map(|(i, st)| st.as_ref().map(|_| first + i))
            .collect();
        let mut args: Vec<A> = vec![
            f32s(&z),
            A::Table(table.clone()),
            i32s(&seg_start),
            i32s(&seg_len),
            zeros(s * h * c),
            A::I32(s as i32),
            A::I32(c as i32),
            A::I32(h as i32),
        ];
        args.extend(windows(states));
        emu.launch("engram_conv_window", (4, 1), BLOCK, &mut args);
        let scratch = read_f32(&args[4]);
        let first = 5;
        let table: Vec<Option<usize>> = states
            .iter()
            .enumerate()
            .map(|(i, st)| st.as_ref().map(|_| first + i))
            .collect();
        let mut args: Vec<A> = vec![
            f32s(&scratch),
            A::Table(table),
            A::I32(s as i32),
            A::I32(c as i32),
            A::I32(h as i32),
        ];
        args.extend(windows(states));
        emu.launch("engram_store_windows", (4, 1), BLOCK, &mut args);
        for (i, st) in states.iter_mut().enumerate() {
            if let Some(st) = st {
                let rows = read_f32(&args[first + i]);
                st.push_rows(&rows);
            }
        }
    }
    out
}

#[test]
fn emulated_paper_layer_matches_the_reference() {
    let Some(emu) = Emu::new("emulated_paper_layer_matches_the_reference") else {
        return;
    };
    for (cfg, seed) in [
        (config(Variant::Paper, 2, 40, 8, 2, 3), 41u64),
        (config(Variant::Paper, 1, 300, 8, 3, 2), 42),
    ] {
        let mut rng = Rng::new(seed);
        let w = paper_weights(&cfg, &mut rng);
        let reference =
            ReferenceLayer::new(cfg.clone(), 1, LayerWeights::Paper(w.clone())).unwrap();
        let (c, e) = (cfg.branch_channels(), cfg.embed_dim());
        let lens = [7usize, 4, 1, 2];
        let tokens: usize = lens.iter().sum();
        let hidden = rng.vec(tokens * c, 2.0);
        let emb = rng.vec(tokens * e, 1.0);
        let mut s_ref: Vec<ShortConvState> = (0..3).map(|_| ShortConvState::new(&cfg)).collect();
        for s in &mut s_ref {
            s.push_rows(&rng.vec(cfg.conv_history() * c, 1.0));
        }
        let mut s_emu = s_ref.clone();
        let mut want = vec![0f32; tokens * c];
        {
            let [a, b, d] = &mut s_ref[..] else {
                unreachable!()
            };
            let mut segs = [
                Segment::fresh(7),
                Segment::with_state(4, a),
                Segment::with_state(1, b),
                Segment::with_state(2, d),
            ];
            reference
                .forward(&hidden, &emb, None, &mut segs, &mut want)
                .unwrap();
        }
        let got = {
            let [a, b, d] = &mut s_emu[..] else {
                unreachable!()
            };
            let mut states = [None, Some(a), Some(b), Some(d)];
            emu_paper(emu, &cfg, &w, &hidden, &emb, &lens, &mut states)
        };
        let err = rel_err(&got, &want);
        println!(
            "emulated paper G={} D={}: rel err {err:.2e}",
            cfg.hc_mult, cfg.hidden_size
        );
        assert!(err <= 1e-5, "rel err {err:e}");
        for (i, (a, b)) in s_emu.iter().zip(&s_ref).enumerate() {
            let err = rel_err(a.rows(), b.rows());
            assert!(err <= 1e-5, "window {i}: rel err {err:e}");
        }
    }
}

#[test]
fn emulated_v41_layer_matches_the_reference() {
    let Some(emu) = Emu::new("emulated_v41_layer_matches_the_reference") else {
        return;
    };
    let cfg = config(Variant::V41, 2, 64, 32, 2, 4);
    let mut rng = Rng::new(9);
    let w = v41_weights(&cfg, &mut rng);
    let reference = ReferenceLayer::new(cfg.clone(), 1, LayerWeights::V41(w.clone())).unwrap();
    let (g, d, e, c) = (
        cfg.hc_mult,
        cfg.hidden_size,
        cfg.embed_dim(),
        cfg.branch_channels(),
    );
    let t = 11;
    let hidden: Vec<f32> = rng.vec(t * c, 3.0).into_iter().map(round_bf16).collect();
    let emb: Vec<f32> = rng.vec(t * e, 1.0).into_iter().map(round_bf16).collect();
    let dead: Vec<bool> = (0..t).map(|i| i % 4 == 1).collect();
    let mut want = vec![0f32; t * c];
    reference
        .forward(
            &hidden,
            &emb,
            Some(&dead),
            &mut [Segment::fresh(t)],
            &mut want,
        )
        .unwrap();
    let kv = emu_gemm(emu, &emb, &w.wkv, t, (g + 1) * d, e);
    let wqk: Vec<f32> = w
        .q_weight
        .iter()
        .zip(&w.k_weight)
        .map(|(q, k)| q * k)
        .collect();
    let mut args = [
        f32s(&hidden),
        f32s(&kv),
        f32s(&wqk),
        A::Buf(dead.iter().map(|&b| b as u8).collect()),
        zeros(t * c),
        A::I32(t as i32),
        A::I32(g as i32),
        A::I32(d as i32),
        A::F32(cfg.rms_norm_eps as f32),
        A::F32(GATE_SCORE_CLAMP as f32),
    ];
    emu.launch("engram_v41_gate", (3, 1), BLOCK, &mut args);
    let got = read_f32(&args[4]);
    let (off, max_ulp) = bf16_distance(&got, &want);
    println!("emulated V4.1: {off} elements off (max {max_ulp} ulp)");
    assert!(
        max_ulp <= 1 && off as f64 <= 0.01 * want.len() as f64,
        "{off} off, max {max_ulp}"
    );
    for (ti, &is_dead) in dead.iter().enumerate() {
        if is_dead {
            assert_eq!(&got[ti * c..(ti + 1) * c], &hidden[ti * c..(ti + 1) * c]);
        }
    }
}
