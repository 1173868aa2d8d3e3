//! Table stores: every dtype gathers exactly what the dense reference loader reads,
//! memory-mapped and in-RAM tables agree, and broken files are refused at open with the
//! file and tensor named.

use std::path::{Path, PathBuf};
use std::time::Instant;

use engram_core::checkpoint::{
    load_dense_table, table_spec, table_spec_from_header, Checkpoint, SafetensorsHeader, TableSpec,
};
use engram_core::config::EngramConfig;
use engram_core::dtype::{RowDtype, FP8_SCALE_BLOCK};
use engram_core::primes::{table_layouts, LayerTableLayout};
use engram_core::table::TableStore;
use engram_cpu::table::{CpuTable, TableMode};
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::json;

use engram_core::testing::TestRng as Rng;

fn paper_cfg() -> EngramConfig {
    EngramConfig::from_golden_meta(&json!({
        "engram": {"engram_vocab_size": [211, 307], "max_ngram_size": 3,
            "n_embed_per_ngram": 160, "n_head_per_ngram": 4, "layer_ids": [1, 3],
            "pad_id": 2, "seed": 0, "kernel_size": 4},
        "backbone": {"hidden_size": 32, "hc_mult": 2}}))
    .unwrap()
}

fn v41_cfg() -> EngramConfig {
    EngramConfig::from_golden_meta(&json!({
        "variant": "v41",
        "engram": {"engram_vocab_size": [101, 103, 107], "max_ngram_size": 4,
            "n_head_per_ngram": 2, "engram_head_dim": 96, "layer_ids": [2, 5],
            "pad_id": 2, "seed": 0},
        "backbone": {"hidden_size": 32, "hc_mult": 2, "rms_norm_eps": 1e-20}}))
    .unwrap()
}

/// A tensor to write: name, dtype, shape, bytes.
type Tensor = (String, Dtype, Vec<usize>, Vec<u8>);

fn write(path: &Path, tensors: &[Tensor]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn elem_bytes(d: Dtype) -> usize {
    d.bitsize() / 8
}

/// The tensors of one layer's table with random rows, plus a neighbour before and after
/// it (so the table does not start at the data section's first byte), for `row_dtype`.
fn table_tensors(
    cfg: &EngramConfig,
    layout: &LayerTableLayout,
    row_dtype: Dtype,
    rows: usize,
    width: usize,
    seed: u64,
) -> Vec<Tensor> {
    let mut rng = Rng::new(seed);
    let p = format!("layers.{}.engram.", layout.layer_id);
    let mut out: Vec<Tensor> = vec![
        (format!("{p}aaa.before"), Dtype::U8, vec![13], rng.bytes(13)),
        (format!("{p}zzz.after"), Dtype::F32, vec![3], rng.bytes(12)),
    ];
    if row_dtype == Dtype::F8_E4M3 {
        let sw = width.div_ceil(FP8_SCALE_BLOCK);
        out.push((
            format!("{p}embed.weight"),
            Dtype::F8_E4M3,
            vec![rows, width],
            rng.bytes(rows * width),
        ));
        // Scales around 2^0 with a spread, including the extremes.
        let mut scales: Vec<u8> = (0..rows * sw).map(|_| 112 + rng.below(30) as u8).collect();
        scales[0] = 0;
        scales[1] = 254;
        out.push((
            format!("{p}embed.scale"),
            Dtype::F8_E8M0,
            vec![rows, sw],
            scales,
        ));
    } else {
        let n = rows * width * elem_bytes(row_dtype);
        out.push((
            format!("{p}multi_head_embedding.embedding.weight"),
            row_dtype,
            vec![rows, width],
            rng.bytes(n),
        ));
        let offsets: Vec<u8> = layout
            .offsets
            .iter()
            .flat_map(|&o| (o as i64).to_le_bytes())
            .collect();
        out.push((
            format!("{p}multi_head_embedding.offsets"),
            Dtype::I64,
            vec![layout.offsets.len()],
            offsets,
        ));
    }
    let _ = cfg;
    out
}

/// A file with a correct table of `row_dtype` for the first layer of `cfg`.
fn good_file(dir: &Path, cfg: &EngramConfig, row_dtype: Dtype) -> (PathBuf, LayerTableLayout) {
    let layout = table_layouts(&cfg.hash).remove(0);
    let path = dir.join(format!("{row_dtype:?}.safetensors"));
    let tensors = table_tensors(
        cfg,
        &layout,
        row_dtype,
        layout.total_rows as usize,
        cfg.head_dim,
        7,
    );
    write(&path, &tensors);
    (path, layout)
}

fn random_ids(rows: u64, n: usize, seed: u64) -> Vec<u64> {
    let mut rng = Rng::new(seed);
    let mut ids: Vec<u64> = (0..n).map(|_| rng.below(rows)).collect();
    ids.extend([0, rows - 1, 0, rows - 1]);
    ids
}

fn bits(x: &[f32]) -> Vec<u32> {
    x.iter().map(|v| v.to_bits()).collect()
}

/// Every dtype: mmap, load and from_bytes gather exactly the dense reference's rows
/// (bit for bit, NaNs included), on one thread and on many, and raw rows are the stored bytes.
#[test]
fn every_dtype_gathers_the_reference_rows() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (paper_cfg(), Dtype::F32, RowDtype::F32),
        (paper_cfg(), Dtype::BF16, RowDtype::BF16),
        (paper_cfg(), Dtype::F16, RowDtype::F16),
        (v41_cfg(), Dtype::F8_E4M3, RowDtype::F8E4M3Scaled),
    ];
    for (cfg, file_dtype, row_dtype) in cases {
        let (path, layout) = good_file(dir.path(), &cfg, file_dtype);
        let bytes = std::fs::read(&path).unwrap();
        let ck = Checkpoint::parse(&path, &bytes).unwrap();
        let spec = table_spec(&ck, &cfg, &layout).unwrap();
        let header = SafetensorsHeader::read_file(&path).unwrap();
        assert_eq!(
            table_spec_from_header(&header, &cfg, &layout).unwrap(),
            spec
        );
        assert_eq!(spec.dtype, row_dtype);
        let dense = load_dense_table(&ck, &spec).unwrap();

        let ids = random_ids(spec.rows, 3000, 11);
        let w = spec.width;
        let mut want = vec![0f32; ids.len() * w];
        dense.gather_f32(&ids, &mut want).unwrap();

        let mut stores = vec![
            CpuTable::open_mmap(&path, &spec).unwrap(),
            CpuTable::load(&path, &spec).unwrap(),
            CpuTable::from_bytes(&path, &bytes, &spec).unwrap(),
            CpuTable::open_layer(&path, &cfg, &layout, TableMode::Mmap).unwrap(),
            CpuTable::open_layer(&path, &cfg, &layout, TableMode::Ram).unwrap(),
        ];
        assert!(stores[0].is_mmap() && !stores[1].is_mmap());
        let stored = ck.tensors().tensor(&spec.tensor).unwrap().data().to_vec();
        let scales = spec
            .scale_tensor
            .as_ref()
            .map(|s| ck.tensors().tensor(s).unwrap().data().to_vec())
            .unwrap_or_default();
        for store in &mut stores {
            assert_eq!(store.num_rows(), spec.rows);
            assert_eq!(store.width(), w);
            assert_eq!(store.dtype(), row_dtype);
            assert_eq!(store.row_bytes(), row_dtype.row_bytes(w));
            assert_eq!(store.values_bytes(), &stored[..]);
            assert_eq!(store.scales_bytes(), &scales[..]);
            for min_bytes in [0, usize::MAX] {
                store.set_parallel_min_bytes(min_bytes);
                let mut got = vec![f32::NAN; ids.len() * w];
                store.gather_f32(&ids, &mut got).unwrap();
                assert!(bits(&got) == bits(&want), "{row_dtype} {:?} differs", store);

                let rb = store.row_bytes();
                let mut raw = vec![0u8; ids.len() * rb];
                store.gather_raw(&ids, &mut raw).unwrap();
                let (vb, sb) = (
                    stored.len() / spec.rows as usize,
                    scales.len() / spec.rows as usize,
                );
                for (r, &id) in raw.chunks_exact(rb).zip(&ids) {
                    let id = id as usize;
                    assert_eq!(&r[..vb], &stored[id * vb..][..vb]);
                    assert_eq!(&r[vb..], &scales[id * sb..][..sb]);
                }
            }
            // Empty gathers are fine.
            store.gather_f32(&[], &mut []).unwrap();
        }
        if row_dtype == RowDtype::F8E4M3Scaled {
            // Random bytes include the NaN encodings; the gather must have produced some.
            assert!(want.iter().any(|v| v.is_nan()) && want.iter().any(|v| *v != 0.0));
        }
    }
}

/// The golden V4.1 file's real tables: the store equals the dense reference.
#[test]
fn golden_v41_tables_match_the_reference() {
    let path = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/data/forward_v41_small.safetensors"
    ));
    let bytes = std::fs::read(path).unwrap();
    let ck = Checkpoint::parse(path, &bytes).unwrap();
    let meta = ck.metadata_json("meta").unwrap().unwrap();
    let cfg = EngramConfig::from_golden_meta(&meta).unwrap();
    for layout in table_layouts(&cfg.hash) {
        let spec = table_spec(&ck, &cfg, &layout).unwrap();
        let dense = load_dense_table(&ck, &spec).unwrap();
        let table = CpuTable::open_mmap(path, &spec).unwrap();
        let ids: Vec<u64> = (0..spec.rows).collect();
        let (mut a, mut b) = (
            vec![0f32; ids.len() * spec.width],
            vec![1f32; ids.len() * spec.width],
        );
        dense.gather_f32(&ids, &mut a).unwrap();
        table.gather_f32(&ids, &mut b).unwrap();
        assert!(bits(&a) == bits(&b));
    }
}

fn expect_err<T: std::fmt::Debug>(r: engram_core::Result<T>) -> String {
    r.expect_err("must be refused").to_string()
}

/// Cut at several points (inside the length prefix, mid-header, in the data before the
/// table, mid-table, the last byte): refused at open by every constructor, naming the
/// file (and, once the header is whole, the tensor that is cut).
#[test]
fn truncated_files_are_refused_at_open() {
    let dir = tempfile::tempdir().unwrap();
    for (cfg, dtype) in [(paper_cfg(), Dtype::F32), (v41_cfg(), Dtype::F8_E4M3)] {
        let (path, layout) = good_file(dir.path(), &cfg, dtype);
        let bytes = std::fs::read(&path).unwrap();
        let spec =
            table_spec_from_header(&SafetensorsHeader::read_file(&path).unwrap(), &cfg, &layout)
                .unwrap();
        let header = SafetensorsHeader::read_file(&path).unwrap();
        let table_start = header.byte_range(&spec.tensor).unwrap().start as usize;
        let data_start = header.data_start() as usize;
        // The first tensor, in file order, that a cut at `cut` leaves incomplete.
        let first_cut = |cut: usize| {
            header
                .names()
                .into_iter()
                .find(|n| header.byte_range(n).unwrap().end as usize > cut)
                .unwrap()
        };
        let cuts = [
            (3, None),
            (data_start / 2, None),
            (data_start + 5, Some(first_cut(data_start + 5))),
            (table_start + 100, Some(spec.tensor.clone())),
            (bytes.len() - 1, Some(first_cut(bytes.len() - 1))),
        ];
        assert_eq!(first_cut(table_start + 100), spec.tensor);
        for (cut, tensor) in cuts {
            let short = dir.path().join(format!("cut{cut}.safetensors"));
            std::fs::write(&short, &bytes[..cut]).unwrap();
            let name = short.file_name().unwrap().to_str().unwrap();
            for e in [
                expect_err(CpuTable::open_mmap(&short, &spec)),
                expect_err(CpuTable::load(&short, &spec)),
                expect_err(CpuTable::from_bytes(&short, &bytes[..cut], &spec)),
                expect_err(CpuTable::open_layer(&short, &cfg, &layout, TableMode::Mmap)),
            ] {
                assert!(e.contains(name), "cut at {cut}: {e}");
                assert!(e.contains("truncated"), "cut at {cut}: {e}");
                if let Some(t) = &tensor {
                    assert!(e.contains(&format!("tensor `{t}`")), "cut at {cut}: {e}");
                }
            }
            // The reference loader names the tensor too.
            if cut > data_start {
                let e = expect_err(Checkpoint::parse(&short, &bytes[..cut]).map(|_| ()));
                assert!(e.contains(name) && e.contains("tensor `"), "{e}");
            }
        }
    }
}

/// The table's description differs from the config or the spec: refused, naming the
/// file, the tensor and what is wrong.
#[test]
fn wrong_dtype_rows_width_and_scales_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = paper_cfg();
    let (good, layout) = good_file(dir.path(), &cfg, Dtype::F32);
    let spec = table_spec_from_header(&SafetensorsHeader::read_file(&good).unwrap(), &cfg, &layout)
        .unwrap();
    let (rows, width) = (layout.total_rows as usize, cfg.head_dim);
    let name = &spec.tensor;

    let bad = |file: &str, dtype: Dtype, rows: usize, width: usize| {
        let path = dir.path().join(file);
        write(&path, &table_tensors(&cfg, &layout, dtype, rows, width, 3));
        path
    };
    let cases = [
        (
            bad("dtype.safetensors", Dtype::BF16, rows, width),
            "dtype BF16, expected F32",
        ),
        (
            bad("rows.safetensors", Dtype::F32, rows + 1, width),
            "shape",
        ),
        (
            bad("width.safetensors", Dtype::F32, rows, width + 1),
            "shape",
        ),
    ];
    for (path, what) in &cases {
        let file = path.file_name().unwrap().to_str().unwrap();
        for e in [
            expect_err(CpuTable::open_mmap(path, &spec)),
            expect_err(CpuTable::load(path, &spec)),
        ] {
            assert!(
                e.contains(file) && e.contains(name.as_str()) && e.contains(what),
                "{e}"
            );
        }
    }
    // From the config: rows must be the sum of the primes, width the head dim.
    for (path, expected) in [
        (&cases[1].0, format!("expected [{rows}, {width}]")),
        (&cases[2].0, format!("expected [{rows}, {width}]")),
    ] {
        let e = expect_err(table_spec_from_header(
            &SafetensorsHeader::read_file(path).unwrap(),
            &cfg,
            &layout,
        ));
        assert!(e.contains(name.as_str()) && e.contains(&expected), "{e}");
        let e = expect_err(CpuTable::open_layer(path, &cfg, &layout, TableMode::Mmap));
        assert!(e.contains(name.as_str()) && e.contains(&expected), "{e}");
    }
    // A V4.1 config on a paper file: the V4.1 table is missing.
    let v41 = v41_cfg();
    let v41_layout = table_layouts(&v41.hash).remove(0);
    let e = expect_err(CpuTable::open_layer(
        &good,
        &v41,
        &v41_layout,
        TableMode::Mmap,
    ));
    assert!(e.contains("embed.weight") && e.contains("missing"), "{e}");

    // Wrong stored offsets are refused from the header path too.
    let mut tensors = table_tensors(&cfg, &layout, Dtype::F32, rows, width, 3);
    tensors
        .iter_mut()
        .find(|t| t.0.ends_with("offsets"))
        .unwrap()
        .3[8] ^= 1;
    let path = dir.path().join("offsets.safetensors");
    write(&path, &tensors);
    let e = expect_err(CpuTable::open_layer(&path, &cfg, &layout, TableMode::Mmap));
    assert!(
        e.contains("multi_head_embedding.offsets") && e.contains("differ"),
        "{e}"
    );

    // V4.1: scales of the wrong shape or dtype, and specs that do not fit the rows.
    let (v41_good, _) = good_file(dir.path(), &v41, Dtype::F8_E4M3);
    let v41_spec = table_spec_from_header(
        &SafetensorsHeader::read_file(&v41_good).unwrap(),
        &v41,
        &v41_layout,
    )
    .unwrap();
    let mut tensors = table_tensors(
        &v41,
        &v41_layout,
        Dtype::F8_E4M3,
        v41_layout.total_rows as usize,
        v41.head_dim,
        5,
    );
    let scale = tensors
        .iter_mut()
        .find(|t| t.0.ends_with("embed.scale"))
        .unwrap();
    scale.2[1] += 1;
    scale.3.extend(vec![127u8; scale.2[0]]);
    let path = dir.path().join("scale.safetensors");
    write(&path, &tensors);
    let e = expect_err(CpuTable::open_mmap(&path, &v41_spec));
    assert!(e.contains("embed.scale") && e.contains("shape"), "{e}");
    let no_scale = TableSpec {
        scale_tensor: None,
        ..v41_spec.clone()
    };
    let e = expect_err(CpuTable::open_mmap(&v41_good, &no_scale));
    assert!(e.contains("embed.weight") && e.contains("scale"), "{e}");
    let f32_with_scale = TableSpec {
        scale_tensor: Some("x".into()),
        ..spec.clone()
    };
    let e = expect_err(CpuTable::open_mmap(&good, &f32_with_scale));
    assert!(e.contains("`x`"), "{e}");
}

/// Ids past the end and buffers of the wrong size are errors naming the id and table;
/// the process carries on and the table still works.
#[test]
fn bad_ids_and_buffers_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = v41_cfg();
    let (path, layout) = good_file(dir.path(), &cfg, Dtype::F8_E4M3);
    for mode in [TableMode::Mmap, TableMode::Ram] {
        let table = CpuTable::open_layer(&path, &cfg, &layout, mode).unwrap();
        let (rows, w) = (table.num_rows(), table.width());
        let mut out = vec![0f32; 3 * w];
        let e = expect_err(table.gather_f32(&[0, rows, 1], &mut out));
        assert!(
            e.contains(&format!("row id {rows}")) && e.contains(table.name()),
            "{e}"
        );
        assert!(
            table.name().contains("F8_E4M3.safetensors") && table.name().contains("embed.weight")
        );
        let e = expect_err(table.gather_f32(&[u64::MAX], &mut out[..w]));
        assert!(e.contains(&u64::MAX.to_string()), "{e}");
        let mut raw = vec![0u8; 3 * table.row_bytes()];
        let e = expect_err(table.gather_raw(&[0, 1, rows + 7], &mut raw));
        assert!(e.contains(&format!("row id {}", rows + 7)), "{e}");
        assert!(table.gather_f32(&[0, 1], &mut out).is_err());
        assert!(table.gather_raw(&[0, 1], &mut raw).is_err());
        table.gather_f32(&[0, 1, rows - 1], &mut out).unwrap();
    }
}

fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()
        .map(|kb| kb * 1024)
}

/// DeepSeek-V4.1's real layer-1 table (384,006,168 rows of 256 F8 columns, about 101 GB
/// with scales) as a sparse file: opening reads the header only, and gathering rows
/// touches only their pages.
#[test]
fn opening_a_100_gb_table_is_instant() {
    let cfg = EngramConfig::from_hf_config(&json!({"engram_layer_ids": [1, 14],
        "engram_max_ngram_size": 4, "engram_vocab_size": 16000000, "engram_n_heads": 8,
        "engram_head_dim": 256, "engram_pad_token_id": 2, "hidden_size": 5120, "hc_mult": 4,
        "rms_norm_eps": 1e-20}))
    .unwrap()
    .unwrap();
    let layout = table_layouts(&cfg.hash).remove(0);
    assert_eq!(layout.total_rows, 384_006_168);
    let (rows, w, sw) = (layout.total_rows, 256u64, 8u64);
    let header = json!({
        "layers.1.engram.embed.weight": {"dtype": "F8_E4M3", "shape": [rows, w], "data_offsets": [0, rows * w]},
        "layers.1.engram.embed.scale": {"dtype": "F8_E8M0", "shape": [rows, sw], "data_offsets": [rows * w, rows * (w + sw)]},
    })
    .to_string();
    let mut file_bytes = (header.len() as u64).to_le_bytes().to_vec();
    file_bytes.extend(header.as_bytes());
    let total = file_bytes.len() as u64 + rows * (w + sw);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.safetensors");
    std::fs::write(&path, &file_bytes).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    // Every filesystem a test runs on here (ext4, xfs, overlayfs, tmpfs) has sparse
    // files; one without them fails this test rather than skipping it.
    if let Err(e) = f.set_len(total) {
        panic!(
            "this test needs a {total}-byte sparse file in {} (TMPDIR picks another \
             filesystem): {e}",
            dir.path().display()
        );
    }
    drop(f);

    let rss0 = rss_bytes();
    let t = Instant::now();
    let table = CpuTable::open_layer(&path, &cfg, &layout, TableMode::Mmap).unwrap();
    let opened = t.elapsed();
    let ids = random_ids(rows, 20_000, 3);
    let mut out = vec![1f32; ids.len() * 256];
    let t = Instant::now();
    table.gather_f32(&ids, &mut out).unwrap();
    let gathered = t.elapsed();
    // Holes read as zero bytes: e4m3 0 times 2^-127 is 0.
    assert!(out.iter().all(|&v| v == 0.0));
    let grown = rss_bytes().zip(rss0).map(|(a, b)| a.saturating_sub(b));
    eprintln!(
        "{total} bytes: open {opened:?}, gather of {} rows {gathered:?}, resident growth {grown:?} bytes",
        ids.len()
    );
    assert!(opened.as_secs_f64() < 1.0, "open took {opened:?}");
    // 20,000 rows touch at most 40,000 pages (160 MB); never the 101 GB file.
    if let Some(g) = grown {
        assert!(g < 1 << 30, "resident memory grew by {g} bytes");
    }
}

/// The store suite every table store runs (`engram_core::testing::conformance`), on a
/// table read into RAM and on one memory-mapped, for every row format.
#[test]
fn cpu_tables_pass_the_store_suite() {
    use engram_core::testing::conformance::{check_store, RawTable};
    let all = [
        RowDtype::F32,
        RowDtype::BF16,
        RowDtype::F16,
        RowDtype::F8E4M3Scaled,
    ];
    let ram = |raw: &RawTable| -> Box<dyn TableStore> {
        let (bytes, spec) = raw.to_safetensors();
        Box::new(CpuTable::from_bytes("ram.safetensors", &bytes, &spec).unwrap())
    };
    check_store(&ram, &all);
    let dir = tempfile::tempdir().unwrap();
    let mapped = |raw: &RawTable| -> Box<dyn TableStore> {
        let (bytes, spec) = raw.to_safetensors();
        let path = dir
            .path()
            .join(format!("{}-{}.safetensors", raw.dtype, raw.rows));
        std::fs::write(&path, bytes).unwrap();
        Box::new(CpuTable::open_mmap(&path, &spec).unwrap())
    };
    check_store(&mapped, &all);
}
