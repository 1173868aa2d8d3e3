//! [`HostTable`]: an Engram table's stored bytes in host memory, in the checkpoint's own
//! format (f32, bf16, f16, or FP8 E4M3 values with E8M0 scales), held in an anonymous
//! page-aligned mapping or memory-mapped from a file (a safetensors checkpoint, say).
//!
//! It is what the host-side placements move or expose to the device, and it implements
//! [`TableStore`] (a CPU gather with the core's exact conversions), which makes it the
//! oracle of the device gathers too.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use engram_core::checkpoint::{SafetensorsHeader, TableSpec};
use engram_core::dtype::{
    bf16_bits_to_f32, dequant_f8_row, f16_bits_to_f32, RowDtype, FP8_SCALE_BLOCK,
};
use engram_core::table::bytes::TableBytes;
use engram_core::table::{DenseTable, TableStore};
use engram_core::{EngramError, Result as CoreResult};

use crate::error::{CudaBackendError, Result};

/// Bytes of one row's values (scales excluded): [`RowDtype::value_row_bytes`].
pub fn value_row_bytes(dtype: RowDtype, width: usize) -> usize {
    dtype.value_row_bytes(width)
}

/// Bytes of one row's scales (FP8 rows only: one per [`FP8_SCALE_BLOCK`] columns):
/// [`RowDtype::scale_row_bytes`].
pub fn scale_row_bytes(dtype: RowDtype, width: usize) -> usize {
    dtype.scale_row_bytes(width)
}

/// The kernels' code for a row format.
pub(crate) fn dtype_code(dtype: RowDtype) -> i32 {
    match dtype {
        RowDtype::F32 => 0,
        RowDtype::BF16 => 1,
        RowDtype::F16 => 2,
        RowDtype::F8E4M3Scaled => 3,
    }
}

/// One Engram table's rows in host memory, in their stored format.
#[derive(Clone)]
pub struct HostTable {
    name: String,
    dtype: RowDtype,
    rows: u64,
    width: usize,
    bytes: TableBytes,
}

impl std::fmt::Debug for HostTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostTable")
            .field("name", &self.name)
            .field("dtype", &self.dtype)
            .field("rows", &self.rows)
            .field("width", &self.width)
            .field("mapped_file", &self.mapped_file())
            .finish()
    }
}

impl HostTable {
    /// A table of `rows` rows whose bytes `fill(values, scales)` writes (scales is empty
    /// unless `dtype` is FP8). The memory is anonymous and page-aligned.
    pub fn build(
        name: impl Into<String>,
        dtype: RowDtype,
        rows: u64,
        width: usize,
        fill: impl FnOnce(&mut [u8], &mut [u8]),
    ) -> Result<Self> {
        let name = name.into();
        if width == 0 {
            return Err(CudaBackendError::Invalid(format!(
                "table `{name}`: row width must be >= 1"
            )));
        }
        if dtype == RowDtype::F8E4M3Scaled && !width.is_multiple_of(FP8_SCALE_BLOCK) {
            return Err(CudaBackendError::Invalid(format!(
                "table `{name}`: FP8 rows carry one scale per {FP8_SCALE_BLOCK} columns; width {width} is not a multiple of {FP8_SCALE_BLOCK}"
            )));
        }
        let too_large = || CudaBackendError::Invalid(format!("table `{name}` is too large"));
        let rows_n = usize::try_from(rows).map_err(|_| too_large())?;
        let vlen = rows_n
            .checked_mul(value_row_bytes(dtype, width))
            .ok_or_else(too_large)?;
        let slen = rows_n
            .checked_mul(scale_row_bytes(dtype, width))
            .ok_or_else(too_large)?;
        // Values and scales in one mapping, the scales on their own page.
        let bytes = TableBytes::build(vlen, slen, fill)
            .map_err(|e| CudaBackendError::Invalid(format!("table `{name}`: {e}")))?;
        Ok(Self::new(name, dtype, rows, width, bytes))
    }

    fn new(name: String, dtype: RowDtype, rows: u64, width: usize, bytes: TableBytes) -> Self {
        Self {
            name,
            dtype,
            rows,
            width,
            bytes,
        }
    }

    /// A copy of raw stored bytes: `values` is `[rows, width]` in `dtype` (little-endian),
    /// `scales` the E8M0 bytes `[rows, width / FP8_SCALE_BLOCK]` of an FP8 table.
    pub fn from_raw(
        name: impl Into<String>,
        dtype: RowDtype,
        width: usize,
        values: &[u8],
        scales: Option<&[u8]>,
    ) -> Result<Self> {
        let name = name.into();
        let rb = value_row_bytes(dtype, width);
        if width == 0 || !values.len().is_multiple_of(rb) {
            return Err(CudaBackendError::Invalid(format!(
                "table `{name}`: {} value bytes are not whole rows of {rb} bytes",
                values.len()
            )));
        }
        let rows = (values.len() / rb) as u64;
        let want = rows as usize * scale_row_bytes(dtype, width);
        let got = scales.map_or(0, <[u8]>::len);
        if got != want {
            return Err(CudaBackendError::Invalid(format!(
                "table `{name}`: {rows} rows of {dtype} need {want} scale bytes, got {got}"
            )));
        }
        Self::build(name, dtype, rows, width, |v, s| {
            v.copy_from_slice(values);
            if let Some(src) = scales {
                s.copy_from_slice(src);
            }
        })
    }

    /// An f32 table (`data` is `[rows, width]`).
    pub fn from_f32(name: impl Into<String>, width: usize, data: &[f32]) -> Result<Self> {
        let name = name.into();
        if width == 0 || !data.len().is_multiple_of(width) {
            return Err(CudaBackendError::Invalid(format!(
                "table `{name}`: {} values are not whole rows of {width}",
                data.len()
            )));
        }
        Self::build(
            name,
            RowDtype::F32,
            (data.len() / width) as u64,
            width,
            |v, _| {
                for (dst, x) in v.chunks_exact_mut(4).zip(data) {
                    dst.copy_from_slice(&x.to_le_bytes());
                }
            },
        )
    }

    /// A copy of a core [`DenseTable`].
    pub fn from_dense(table: &DenseTable) -> Result<Self> {
        Self::from_f32(table.name(), table.width(), table.data())
    }

    /// Maps a file read-only: the values start at byte `values_offset`, the scales of an
    /// FP8 table at `scales_offset`. Nothing is read until rows are gathered.
    pub fn map_file(
        path: impl AsRef<Path>,
        dtype: RowDtype,
        rows: u64,
        width: usize,
        values_offset: u64,
        scales_offset: Option<u64>,
    ) -> Result<Self> {
        let path = path.as_ref();
        let name = path.display().to_string();
        let range = |what: &str, offset: u64, row_bytes: usize| -> Result<std::ops::Range<u64>> {
            rows.checked_mul(row_bytes as u64)
                .and_then(|len| Some(offset..offset.checked_add(len)?))
                .ok_or_else(|| {
                    CudaBackendError::from(EngramError::file(
                        path,
                        format!("the table's {what} ({rows} rows at byte {offset}) do not fit in 64 bits"),
                    ))
                })
        };
        let values = range("values", values_offset, value_row_bytes(dtype, width))?;
        let scales = match (scale_row_bytes(dtype, width), scales_offset) {
            (0, _) => None,
            (_, None) => {
                return Err(CudaBackendError::Invalid(format!(
                    "{name}: an FP8 table needs the offset of its scales"
                )))
            }
            (sb, Some(off)) => Some(range("scales", off, sb)?),
        };
        let bytes = TableBytes::map_file(path, values, scales)?;
        Ok(Self::new(name, dtype, rows, width, bytes))
    }

    /// Maps the table a checked [`TableSpec`] describes from its safetensors file.
    pub fn map_safetensors(header: &SafetensorsHeader, spec: &TableSpec) -> Result<Self> {
        let values = header.byte_range(&spec.tensor)?;
        let scales = match &spec.scale_tensor {
            Some(s) => Some(header.byte_range(s)?.start),
            None => None,
        };
        let mut t = Self::map_file(
            header.path(),
            spec.dtype,
            spec.rows,
            spec.width,
            values.start,
            scales,
        )?;
        t.name = format!("{}:{}", header.path().display(), spec.tensor);
        Ok(t)
    }

    /// Writes the stored bytes to `path` (values, then the scales on a 4096-byte boundary)
    /// and returns the scales' offset, for [`HostTable::map_file`].
    pub fn write_raw(&self, path: impl AsRef<Path>) -> Result<Option<u64>> {
        let path = path.as_ref();
        let io = |e: std::io::Error| CudaBackendError::from(EngramError::file(path, e));
        let mut f = std::io::BufWriter::new(File::create(path).map_err(io)?);
        let values = self.values();
        f.write_all(values).map_err(io)?;
        let mut scales_at = None;
        if let Some(s) = self.scales() {
            let at = values.len().next_multiple_of(4096);
            f.write_all(&vec![0u8; at - values.len()]).map_err(io)?;
            f.write_all(s).map_err(io)?;
            scales_at = Some(at as u64);
        }
        f.flush().map_err(io)?;
        Ok(scales_at)
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The file the table is mapped from, if it is.
    pub fn mapped_file(&self) -> Option<&Path> {
        self.bytes.path()
    }

    /// The stored bytes: the values, the scales and the memory they live in.
    pub fn bytes(&self) -> &TableBytes {
        &self.bytes
    }

    /// Bytes of one row's values.
    pub fn value_row_bytes(&self) -> usize {
        value_row_bytes(self.dtype, self.width)
    }

    /// Bytes of one row's scales (0 unless FP8).
    pub fn scale_row_bytes(&self) -> usize {
        scale_row_bytes(self.dtype, self.width)
    }

    /// All stored value bytes, `[rows, value_row_bytes]`.
    pub fn values(&self) -> &[u8] {
        self.bytes.values()
    }

    /// All stored scale bytes (FP8 tables), `[rows, scale_row_bytes]`.
    pub fn scales(&self) -> Option<&[u8]> {
        self.bytes.scales()
    }

    /// The stored value bytes of row `row`.
    #[inline]
    pub fn row_values(&self, row: u64) -> &[u8] {
        let rb = self.value_row_bytes();
        let at = row as usize * rb;
        &self.values()[at..at + rb]
    }

    /// The stored scale bytes of row `row` (empty unless FP8).
    #[inline]
    pub fn row_scales(&self, row: u64) -> &[u8] {
        let sb = self.scale_row_bytes();
        match self.scales() {
            Some(s) => &s[row as usize * sb..(row as usize + 1) * sb],
            None => &[],
        }
    }

    /// Decodes one row to f32 as the model sees it.
    pub fn decode_row(&self, row: u64, out: &mut [f32]) {
        let v = self.row_values(row);
        match self.dtype {
            RowDtype::F32 => {
                for (o, b) in out.iter_mut().zip(v.chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            RowDtype::BF16 => {
                for (o, b) in out.iter_mut().zip(v.chunks_exact(2)) {
                    *o = bf16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
                }
            }
            RowDtype::F16 => {
                for (o, b) in out.iter_mut().zip(v.chunks_exact(2)) {
                    *o = f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
                }
            }
            RowDtype::F8E4M3Scaled => dequant_f8_row(v, self.row_scales(row), out),
        }
    }
}

impl TableStore for HostTable {
    fn name(&self) -> &str {
        &self.name
    }
    fn num_rows(&self) -> u64 {
        self.rows
    }
    fn width(&self) -> usize {
        self.width
    }
    fn dtype(&self) -> RowDtype {
        self.dtype
    }
    fn gather_f32(&self, row_ids: &[u64], out: &mut [f32]) -> CoreResult<()> {
        self.check_gather(row_ids, out.len())?;
        for (dst, &row) in out.chunks_exact_mut(self.width).zip(row_ids) {
            self.decode_row(row, dst);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_rows_round_trip_and_map_from_a_file() {
        let data: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
        let t = HostTable::from_f32("t", 4, &data).unwrap();
        assert_eq!(t.num_rows(), 6);
        let mut out = vec![0f32; 8];
        t.gather_f32(&[5, 1], &mut out).unwrap();
        assert_eq!(out, [&data[20..24], &data[4..8]].concat());
        assert!(t.gather_f32(&[6, 0], &mut out).is_err());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bin");
        assert_eq!(t.write_raw(&path).unwrap(), None);
        let m = HostTable::map_file(&path, RowDtype::F32, 6, 4, 0, None).unwrap();
        assert_eq!(m.mapped_file(), Some(path.as_path()));
        let mut out2 = vec![0f32; 8];
        m.gather_f32(&[5, 1], &mut out2).unwrap();
        assert_eq!(out, out2);
        let e = HostTable::map_file(&path, RowDtype::F32, 7, 4, 0, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("truncated") && e.contains("t.bin"), "{e}");
        // Sizes past 64 bits are errors too, not overflows.
        let e = HostTable::map_file(&path, RowDtype::F32, u64::MAX, 4, 0, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("t.bin") && e.contains("64 bits"), "{e}");
    }

    #[test]
    fn fp8_rows_dequantize_exactly_like_the_core() {
        let width = 64;
        let values: Vec<u8> = (0..3 * width).map(|i| (i * 37 % 255) as u8).collect();
        let scales: Vec<u8> = vec![120, 127, 130, 0, 134, 125];
        let t = HostTable::from_raw("f8", RowDtype::F8E4M3Scaled, width, &values, Some(&scales))
            .unwrap();
        let mut out = vec![0f32; width];
        t.gather_f32(&[2], &mut out).unwrap();
        let mut want = vec![0f32; width];
        dequant_f8_row(&values[2 * width..], &scales[4..6], &mut want);
        assert_eq!(
            out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f8.bin");
        let at = t.write_raw(&path).unwrap().unwrap();
        assert_eq!(at % 4096, 0);
        let m = HostTable::map_file(&path, RowDtype::F8E4M3Scaled, 3, width, 0, Some(at)).unwrap();
        assert_eq!(m.row_scales(2), &scales[4..6]);
        assert!(m.bytes().is_file() && !t.bytes().is_file());
        let e = HostTable::map_file(&path, RowDtype::F8E4M3Scaled, 3, width, 0, Some(at + 1))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("f8.bin") && e.contains("scales") && e.contains("truncated"),
            "{e}"
        );
        assert!(HostTable::from_raw("bad", RowDtype::F8E4M3Scaled, width, &values, None).is_err());
    }
}
