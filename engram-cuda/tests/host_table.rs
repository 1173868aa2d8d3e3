//! `HostTable` on the golden checkpoints (CPU only): a table mapped from a safetensors
//! file gathers exactly what the core's loader reads.

use engram_core::checkpoint::{load_dense_table, table_spec, Checkpoint, SafetensorsHeader};
use engram_core::config::EngramConfig;
use engram_core::primes::table_layouts;
use engram_core::table::TableStore;
use engram_cuda::testing::golden_data_dir;
use engram_cuda::HostTable;

#[test]
fn mapped_checkpoint_tables_match_the_core_loader() {
    let dir = golden_data_dir();
    for file in [
        "forward_demo_small.safetensors",
        "forward_v41_small.safetensors",
    ] {
        let path = dir.join(file);
        let bytes = std::fs::read(&path).unwrap();
        let ck = Checkpoint::parse(&path, &bytes).unwrap();
        let cfg =
            EngramConfig::from_golden_meta(&ck.metadata_json("meta").unwrap().unwrap()).unwrap();
        let header = SafetensorsHeader::read_file(&path).unwrap();
        for layout in table_layouts(&cfg.hash) {
            let spec = table_spec(&ck, &cfg, &layout).unwrap();
            let mapped = HostTable::map_safetensors(&header, &spec).unwrap();
            let dense = load_dense_table(&ck, &spec).unwrap();
            assert_eq!(mapped.num_rows(), dense.num_rows());
            assert_eq!(mapped.dtype(), spec.dtype);
            let rows = mapped.num_rows();
            let ids: Vec<u64> = (0..500u64).map(|i| i * 7919 % rows).collect();
            let mut a = vec![0f32; ids.len() * spec.width];
            let mut b = a.clone();
            mapped.gather_f32(&ids, &mut a).unwrap();
            dense.gather_f32(&ids, &mut b).unwrap();
            let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
            assert!(same, "{file} layer {}: {}", layout.layer_id, spec.dtype);
            println!(
                "{file} layer {}: {} rows of {}",
                layout.layer_id, rows, spec.dtype
            );
        }
    }
}

/// The store suite every table store runs (`engram_core::testing::conformance`), for
/// every row format `HostTable` holds (CPU only: the bytes a device placement reads).
#[test]
fn host_tables_pass_the_store_suite() {
    use engram_core::dtype::RowDtype;
    use engram_core::testing::conformance::{check_store, RawTable};
    let make = |raw: &RawTable| -> Box<dyn TableStore> {
        Box::new(
            HostTable::from_raw(
                "host",
                raw.dtype,
                raw.width,
                &raw.values,
                raw.scales.as_deref(),
            )
            .unwrap(),
        )
    };
    check_store(
        &make,
        &[
            RowDtype::F32,
            RowDtype::BF16,
            RowDtype::F16,
            RowDtype::F8E4M3Scaled,
        ],
    );
}
