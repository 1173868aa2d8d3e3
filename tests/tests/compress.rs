//! Tokenizer compression against the original's table for the DeepSeek-V4 tokenizer.

use std::path::PathBuf;

use engram_core::compress::VocabCompression;
use engram_core::EngramError;
use engram_tests::data_path as data;

/// Reads a 1-D little-endian int32 `.npy` (format 1.0 or 2.0).
fn read_npy_i32(path: &PathBuf) -> anyhow::Result<Vec<i32>> {
    let bytes = std::fs::read(path)?;
    anyhow::ensure!(bytes.starts_with(b"\x93NUMPY"), "not an npy file");
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        _ => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
    };
    let header = std::str::from_utf8(&bytes[start..start + header_len])?;
    anyhow::ensure!(header.contains("'descr': '<i4'"), "dtype: {header}");
    anyhow::ensure!(header.contains("'fortran_order': False"), "order: {header}");
    let shape = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .ok_or_else(|| anyhow::anyhow!("no shape in {header}"))?;
    let n: usize = shape.trim().parse()?;
    let body = &bytes[start + header_len..];
    anyhow::ensure!(
        body.len() == n * 4,
        "body of {} bytes for {n} values",
        body.len()
    );
    Ok(body
        .chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

#[test]
fn deepseek_v4_matches_original_table() -> anyhow::Result<()> {
    let comp = VocabCompression::from_tokenizer_file(data("deepseek-v4-tokenizer/tokenizer.json"))?;
    assert_eq!(comp.vocab_size(), 129_280);
    assert_eq!(comp.compressed_vocab_size(), 99_092);

    let expected = read_npy_i32(&data("compressed_lookup_deepseek_v4.npy"))?;
    assert_eq!(expected.len(), comp.vocab_size());
    let mismatches: Vec<_> = comp
        .lookup()
        .iter()
        .zip(&expected)
        .enumerate()
        .filter(|(_, (&got, &want))| got as i64 != want as i64)
        .map(|(tid, (&got, &want))| (tid, got, want))
        .collect();
    assert!(
        mismatches.is_empty(),
        "{} ids differ from the original, first: {:?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(10)]
    );

    assert_eq!(
        comp.lookup_sha256_i64le(),
        "26b9be2936d236a124ba318a998c417bc7032e3e92a3107fe98deee49f1dc496"
    );
    Ok(())
}

#[test]
fn missing_tokenizer_file_names_the_path() {
    let path = data("no-such-dir/tokenizer.json");
    let err = VocabCompression::from_tokenizer_file(&path).unwrap_err();
    assert!(matches!(err, EngramError::File { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
}

#[test]
fn unparseable_tokenizer_file_names_the_path() -> anyhow::Result<()> {
    // The .npy next to it is certainly not tokenizer JSON.
    let path = data("compressed_lookup_deepseek_v4.npy");
    let err = VocabCompression::from_tokenizer_file(&path).unwrap_err();
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
    Ok(())
}

#[test]
fn compress_ids_and_out_of_range() -> anyhow::Result<()> {
    let comp = VocabCompression::from_lookup(vec![0, 1, 0, 2, 1])?;
    assert_eq!(comp.vocab_size(), 5);
    assert_eq!(comp.compressed_vocab_size(), 3);
    assert_eq!(
        comp.compress(&[0, 1, 2, 3, 4, -1, -100])?,
        vec![0, 1, 0, 2, 1, -1, -100]
    );

    let err = comp.compress(&[0, 3, 5, 1]).unwrap_err();
    match &err {
        EngramError::TokenOutOfRange {
            id,
            position,
            vocab_size,
        } => assert_eq!((*id, *position, *vocab_size), (5, 2, 5)),
        other => panic!("unexpected error {other:?}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("token id 5") && msg.contains("position 2"),
        "{msg}"
    );

    let err = comp.compress_id(i64::MAX, 7).unwrap_err();
    assert!(err.to_string().contains(&i64::MAX.to_string()), "{err}");
    Ok(())
}

#[test]
fn from_lookup_empty() -> anyhow::Result<()> {
    let comp = VocabCompression::from_lookup(Vec::new())?;
    assert_eq!((comp.vocab_size(), comp.compressed_vocab_size()), (0, 0));
    assert!(comp.compress(&[0]).is_err());
    assert_eq!(comp.compress(&[-1])?, vec![-1]);
    Ok(())
}
