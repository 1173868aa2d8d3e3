//! The disk tier: a table read through `DiskTable` gathers the same rows as the same table
//! in RAM, bit for bit, reads each page once per gather, and turns a read that fails (a
//! file cut short while open) into an error naming the file and the row.

use std::path::Path;

use engram_core::checkpoint::{SafetensorsHeader, TableSpec};
use engram_core::dtype::RowDtype;
use engram_core::table::TableStore;
use engram_core::testing::conformance::{check_store, RawTable};
use engram_core::testing::TestRng;
use engram_cpu::table::{CpuTable, DiskOptions, DiskTable, ReadEngine, PAGE_BYTES};

const ALL: [RowDtype; 4] = [
    RowDtype::F32,
    RowDtype::BF16,
    RowDtype::F16,
    RowDtype::F8E4M3Scaled,
];

fn write_table(dir: &Path, raw: &RawTable, tag: &str) -> (std::path::PathBuf, TableSpec) {
    let (bytes, spec) = raw.to_safetensors();
    let path = dir.join(format!("{}-{}-{tag}.safetensors", raw.dtype, raw.rows));
    std::fs::write(&path, bytes).unwrap();
    (path, spec)
}

#[test]
fn disk_tables_pass_the_store_suite() {
    let dir = tempfile::tempdir().unwrap();
    // Default reads, one page per read (nothing merged), and a single read thread.
    let variants = [
        DiskOptions::default(),
        DiskOptions {
            max_read_bytes: PAGE_BYTES,
            ..DiskOptions::default()
        },
        DiskOptions {
            engine: ReadEngine::Threads(1),
            ..DiskOptions::default()
        },
    ];
    for (i, options) in variants.into_iter().enumerate() {
        let disk = |raw: &RawTable| -> Box<dyn TableStore> {
            let (path, spec) = write_table(dir.path(), raw, &i.to_string());
            Box::new(DiskTable::open(&path, &spec, options).unwrap())
        };
        check_store(&disk, &ALL);
    }
}

/// A table of many pages, read with small reads: every gather equals the same table in
/// RAM bit for bit.
#[test]
fn a_many_page_table_reads_as_in_ram() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = TestRng::new(11);
    for dtype in ALL {
        let raw = RawTable::random(&mut rng, dtype, 3001, 96);
        let (path, spec) = write_table(dir.path(), &raw, "big");
        let bytes = std::fs::read(&path).unwrap();
        let ram = CpuTable::from_bytes(&path, &bytes, &spec).unwrap();
        let disk = DiskTable::open(
            &path,
            &spec,
            DiskOptions {
                max_read_bytes: 3 * PAGE_BYTES,
                ..DiskOptions::default()
            },
        )
        .unwrap();
        for n in [1usize, 7, 500, 4000] {
            let ids: Vec<u64> = (0..n).map(|_| rng.below(raw.rows)).collect();
            let mut want = vec![0f32; n * 96];
            let mut got = vec![f32::NAN; n * 96];
            ram.gather_f32(&ids, &mut want).unwrap();
            disk.gather_f32(&ids, &mut got).unwrap();
            let same = want
                .iter()
                .zip(&got)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{dtype}: {n} rows differ from the table in RAM");
        }
    }
}

/// The pages a set of rows covers, worked out from the header alone: how many, in how
/// many runs of neighbours, and their bytes (the file's last page cut at its end).
fn pages_of(path: &Path, spec: &TableSpec, rows: &[u64]) -> (u64, u64, u64) {
    let header = SafetensorsHeader::read_file(path).unwrap();
    let values = header.byte_range(&spec.tensor).unwrap();
    let row_bytes = (values.end - values.start) / spec.rows;
    let mut pages: Vec<u64> = rows
        .iter()
        .flat_map(|&r| {
            let start = values.start + r * row_bytes;
            start / PAGE_BYTES..=(start + row_bytes - 1) / PAGE_BYTES
        })
        .collect();
    pages.sort_unstable();
    pages.dedup();
    let runs = 1 + pages.windows(2).filter(|w| w[1] != w[0] + 1).count() as u64;
    let file_len = header.file_len();
    let bytes = pages
        .iter()
        .map(|p| ((p + 1) * PAGE_BYTES).min(file_len) - p * PAGE_BYTES)
        .sum();
    (pages.len() as u64, runs, bytes)
}

#[test]
fn each_page_is_read_once_per_gather() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = TestRng::new(3);
    let raw = RawTable::random(&mut rng, RowDtype::BF16, 4000, 64); // 128-byte rows
    let (path, spec) = write_table(dir.path(), &raw, "pages");
    let disk = DiskTable::open(
        &path,
        &spec,
        DiskOptions {
            max_read_bytes: PAGE_BYTES, // one read per page: reads count pages
            ..DiskOptions::default()
        },
    )
    .unwrap();
    // Rows sharing pages, repeated; and rows far apart.
    for ids in [
        vec![0u64, 1, 2, 1, 0, 33, 34, 2],
        vec![5, 1000, 2000, 3999, 1000, 5],
    ] {
        let before = disk.counters();
        let mut out = vec![0f32; ids.len() * 64];
        disk.gather_f32(&ids, &mut out).unwrap();
        let d = disk.counters().since(&before);
        let (pages, _, bytes) = pages_of(&path, &spec, &ids);
        assert_eq!(d.backing_reads, pages, "{ids:?}: reads");
        assert_eq!(d.backing_bytes, bytes, "{ids:?}: bytes");
    }
    // With merging, neighbouring pages are one read: a run of rows, and two rows in
    // pages that only touch (neither row straddles the boundary).
    let merged = DiskTable::open(&path, &spec, DiskOptions::default()).unwrap();
    let values_start = SafetensorsHeader::read_file(&path)
        .unwrap()
        .byte_range(&spec.tensor)
        .unwrap()
        .start;
    let page_of = |r: u64| (values_start + r * 128) / PAGE_BYTES;
    let inside = |r: u64| page_of(r) == (values_start + r * 128 + 127) / PAGE_BYTES;
    let a = (0..4000).find(|&r| inside(r)).unwrap();
    let b = (a..4000)
        .find(|&r| inside(r) && page_of(r) == page_of(a) + 1)
        .unwrap();
    for ids in [(0..200).collect::<Vec<u64>>(), vec![a, b]] {
        let before = merged.counters();
        let mut out = vec![0f32; ids.len() * 64];
        merged.gather_f32(&ids, &mut out).unwrap();
        let (_, runs, _) = pages_of(&path, &spec, &ids);
        assert_eq!(merged.counters().since(&before).backing_reads, runs);
        assert_eq!(runs, 1);
    }
}

#[test]
fn a_file_cut_short_while_open_is_an_error_naming_file_and_row() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = TestRng::new(9);
    let raw = RawTable::random(&mut rng, RowDtype::F32, 2000, 64); // 256-byte rows
    let (path, spec) = write_table(dir.path(), &raw, "cut");
    let disk = DiskTable::open(&path, &spec, DiskOptions::default()).unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let len = file.metadata().unwrap().len();
    file.set_len(len / 2).unwrap();

    let mut out = vec![0f32; 64];
    // A row well inside what is left still reads.
    disk.gather_f32(&[3], &mut out).unwrap();
    assert_eq!(out, raw.decoded_row(3));
    // The last row is gone: an error naming the file and the row, not a signal.
    let e = disk.gather_f32(&[1999], &mut out).unwrap_err().to_string();
    assert!(e.contains("cut.safetensors"), "{e}");
    assert!(e.contains("row 1999"), "{e}");
    assert!(e.contains("short"), "{e}");
}
