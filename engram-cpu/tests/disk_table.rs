//! The disk tier: a table read through `DiskTable` gathers the same rows as the same table
//! in RAM, bit for bit, reads each page once per gather, and turns a read that fails (a
//! file cut short while open) into an error naming the file and the row.

use std::ops::Range;
use std::path::Path;

use engram_core::checkpoint::{SafetensorsHeader, TableSpec};
use engram_core::dtype::RowDtype;
use engram_core::table::TableStore;
use engram_core::testing::conformance::{check_store, RawTable};
use engram_core::testing::TestRng;
use engram_cpu::table::{
    CpuTable, DiskOptions, DiskTable, ReadEngine, FALLBACK_ENGINE, PAGE_BYTES,
};

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
    // Read threads, one read thread, io_uring, and a ring shallower than a gather's
    // reads (submitted in rounds).
    let engines = [
        ReadEngine::Threads(32),
        ReadEngine::Threads(1),
        ReadEngine::IoUring(64),
        ReadEngine::IoUring(2),
    ];
    for (i, engine) in engines.into_iter().enumerate() {
        let options = DiskOptions { engine };
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
        for engine in [ReadEngine::Threads(8), ReadEngine::IoUring(16)] {
            let disk = DiskTable::open(&path, &spec, DiskOptions { engine }).unwrap();
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
                assert!(
                    same,
                    "{dtype} {engine:?}: {n} rows differ from the table in RAM"
                );
            }
        }
    }
}

/// The file ranges rows `ids` occupy, from the header alone.
fn row_ranges(path: &Path, spec: &TableSpec, ids: &[u64]) -> Vec<Range<u64>> {
    let header = SafetensorsHeader::read_file(path).unwrap();
    let values = header.byte_range(&spec.tensor).unwrap();
    let row_bytes = (values.end - values.start) / spec.rows;
    ids.iter()
        .map(|&r| values.start + r * row_bytes..values.start + (r + 1) * row_bytes)
        .collect()
}

fn pages(r: &Range<u64>) -> Range<u64> {
    r.start / PAGE_BYTES..(r.end - 1) / PAGE_BYTES + 1
}

/// A gather's reads cover every row, read no page twice, and are what the counters say.
#[test]
fn each_page_is_read_once_per_gather() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = TestRng::new(3);
    let raw = RawTable::random(&mut rng, RowDtype::BF16, 4000, 64); // 128-byte rows
    let (path, spec) = write_table(dir.path(), &raw, "pages");
    let disk = DiskTable::open(&path, &spec, DiskOptions::default()).unwrap();
    let random: Vec<u64> = (0..3000).map(|_| rng.below(4000)).collect();
    let cases = [
        vec![0u64, 1, 2, 1, 0, 33, 34, 2],
        vec![5, 1000, 2000, 3999, 1000, 5],
        (0..200).collect(),
        random,
    ];
    for ids in cases {
        let reads = disk.plan_reads(&ids);
        let rows = row_ranges(&path, &spec, &ids);
        for r in &rows {
            assert!(
                reads.iter().any(|x| x.start <= r.start && r.end <= x.end),
                "row bytes {r:?} not read"
            );
        }
        let mut seen: Vec<u64> = reads.iter().flat_map(pages).collect();
        let n = seen.len();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), n, "a page is read twice: {reads:?}");
        // Rows of one page are one read: reads are at most the distinct pages' count.
        let mut row_pages: Vec<u64> = rows.iter().map(|r| r.start / PAGE_BYTES).collect();
        row_pages.sort_unstable();
        row_pages.dedup();
        assert!(
            reads.len() <= row_pages.len(),
            "{} reads for {} pages",
            reads.len(),
            row_pages.len()
        );

        let before = disk.counters();
        let mut out = vec![0f32; ids.len() * 64];
        disk.gather_f32(&ids, &mut out).unwrap();
        let d = disk.counters().since(&before);
        assert_eq!(d.backing_reads, reads.len() as u64);
        assert_eq!(
            d.backing_bytes,
            reads.iter().map(|r| r.end - r.start).sum::<u64>()
        );
    }
    // A run of neighbouring rows is one read.
    assert_eq!(disk.plan_reads(&(0..200).collect::<Vec<_>>()).len(), 1);
}

#[test]
fn a_file_cut_short_while_open_is_an_error_naming_file_and_row() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = TestRng::new(9);
    let raw = RawTable::random(&mut rng, RowDtype::F32, 2000, 64); // 256-byte rows
    let (path, spec) = write_table(dir.path(), &raw, "cut");
    let engines = [ReadEngine::Threads(4), ReadEngine::IoUring(8)];
    let tables: Vec<DiskTable> = engines
        .iter()
        .map(|&engine| DiskTable::open(&path, &spec, DiskOptions { engine }).unwrap())
        .collect();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let len = file.metadata().unwrap().len();
    file.set_len(len / 2).unwrap();

    for disk in &tables {
        let mut out = vec![0f32; 64];
        // A row well inside what is left still reads.
        disk.gather_f32(&[3], &mut out).unwrap();
        assert_eq!(out, raw.decoded_row(3));
        // The last row is gone: an error naming the file and the row, not a signal.
        let e = disk.gather_f32(&[1999], &mut out).unwrap_err().to_string();
        assert!(e.contains("cut.safetensors"), "{disk:?}: {e}");
        assert!(e.contains("row 1999"), "{disk:?}: {e}");
        assert!(e.contains("short"), "{disk:?}: {e}");
    }
}

/// A ring the kernel refuses (deeper than it allows) falls back to read threads, and
/// the rows are still right.
#[test]
fn a_refused_ring_falls_back_to_read_threads() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = TestRng::new(4);
    let raw = RawTable::random(&mut rng, RowDtype::BF16, 100, 64);
    let (path, spec) = write_table(dir.path(), &raw, "fallback");
    let options = DiskOptions {
        engine: ReadEngine::IoUring(1 << 20),
    };
    let disk = DiskTable::open(&path, &spec, options).unwrap();
    assert_eq!(disk.engine(), FALLBACK_ENGINE);
    let mut out = vec![0f32; 64];
    disk.gather_f32(&[42], &mut out).unwrap();
    assert_eq!(out, raw.decoded_row(42));
}
