//! Loading Engram layer weights from safetensors, with every tensor's name, dtype and
//! shape checked against the config before any element is read.
//!
//! Names follow the original module's state_dict under `layers.{L}.engram.` (listed in
//! docs/algorithm.md section 10). The table itself is described by a [`TableSpec`];
//! backends open it their own way (in RAM, memory-mapped, on a device).

use std::io::{Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::config::{EngramConfig, Variant};
use crate::dtype::{
    bf16_bits_to_f32, dequant_f8_row, e8m0_to_f32, f16_bits_to_f32, f8e4m3_to_f32, RowDtype,
    FP8_SCALE_BLOCK,
};
use crate::error::{EngramError, Result};
use crate::primes::LayerTableLayout;
use crate::table::DenseTable;

/// Tensor-name prefix of Engram layer `layer_id`.
pub fn layer_prefix(layer_id: usize) -> String {
    format!("layers.{layer_id}.engram.")
}

/// A parsed safetensors buffer and the file it came from (for messages).
pub struct Checkpoint<'a> {
    path: PathBuf,
    st: SafeTensors<'a>,
    metadata: std::collections::HashMap<String, String>,
}

impl<'a> Checkpoint<'a> {
    /// Parses the header and checks that every tensor lies inside `bytes`.
    pub fn parse(path: impl Into<PathBuf>, bytes: &'a [u8]) -> Result<Self> {
        let path = path.into();
        let st = SafeTensors::deserialize(bytes).map_err(|e| {
            // The header alone says which tensor a short buffer cuts.
            match SafetensorsHeader::parse(&path, bytes, bytes.len() as u64)
                .and_then(|h| h.check_complete())
            {
                Err(precise) => precise,
                Ok(()) => EngramError::file(
                    &path,
                    format!("not a valid safetensors file (truncated or corrupt?): {e:?}"),
                ),
            }
        })?;
        let metadata = SafeTensors::read_metadata(bytes)
            .ok()
            .and_then(|(_, m)| m.metadata().clone())
            .unwrap_or_default();
        Ok(Self { path, st, metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn tensors(&self) -> &SafeTensors<'a> {
        &self.st
    }

    /// The string metadata value `key`, parsed as JSON.
    pub fn metadata_json(&self, key: &str) -> Result<Option<Value>> {
        let Some(raw) = self.metadata.get(key) else {
            return Ok(None);
        };
        serde_json::from_str(raw).map(Some).map_err(|e| {
            EngramError::file(
                &self.path,
                format!("metadata `{key}` is not valid JSON: {e}"),
            )
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.st.tensor(name).is_ok()
    }

    /// The tensor `name`, which must exist with one of `dtypes` and exactly `shape`.
    pub fn expect(
        &self,
        name: &str,
        dtypes: &[Dtype],
        shape: &[usize],
    ) -> Result<safetensors::tensor::TensorView<'a>> {
        let view = self.st.tensor(name).ok();
        check_tensor(
            &self.path,
            name,
            view.as_ref().map(|v| (v.dtype(), v.shape())),
            dtypes,
            shape,
        )?;
        Ok(view.expect("checked present"))
    }

    /// A float tensor (F32, BF16 or F16) of exactly `shape`, as f32.
    pub fn f32_tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let view = self.expect(name, &[Dtype::F32, Dtype::BF16, Dtype::F16], shape)?;
        Ok(to_f32(view.dtype(), view.data()))
    }

    /// An integer tensor (I64 or I32) of exactly `shape`.
    pub fn i64_tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<i64>> {
        let view = self.expect(name, INTS, shape)?;
        Ok(ints_to_i64(view.dtype(), view.data()))
    }

    /// Shape of tensor `name`, or an error naming it.
    pub fn shape_of(&self, name: &str) -> Result<Vec<usize>> {
        self.st
            .tensor(name)
            .map(|v| v.shape().to_vec())
            .map_err(|_| EngramError::tensor(&self.path, name, "missing"))
    }
}

/// Checks one tensor's description: present (`found`), one of `dtypes`, exactly `shape`.
/// The one place the "missing / dtype / shape" messages are phrased.
pub fn check_tensor(
    path: &Path,
    name: &str,
    found: Option<(Dtype, &[usize])>,
    dtypes: &[Dtype],
    shape: &[usize],
) -> Result<()> {
    let Some((dtype, got)) = found else {
        return Err(EngramError::tensor(path, name, "missing"));
    };
    if !dtypes.contains(&dtype) {
        return Err(EngramError::tensor(
            path,
            name,
            format!("dtype {dtype:?}, expected {}", dtype_list(dtypes)),
        ));
    }
    if got != shape {
        return Err(EngramError::tensor(
            path,
            name,
            format!("shape {got:?}, expected {shape:?}"),
        ));
    }
    Ok(())
}

/// `F32 or BF16 or F16`.
pub fn dtype_list(dtypes: &[Dtype]) -> String {
    dtypes
        .iter()
        .map(|d| format!("{d:?}"))
        .collect::<Vec<_>>()
        .join(" or ")
}

/// Little-endian float bytes to f32.
pub fn to_f32(dtype: Dtype, data: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| bf16_bits_to_f32(u16::from_le_bytes([b[0], b[1]])))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]])))
            .collect(),
        Dtype::F8_E4M3 => data.iter().map(|&b| f8e4m3_to_f32(b)).collect(),
        Dtype::F8_E8M0 => data.iter().map(|&b| e8m0_to_f32(b)).collect(),
        other => unreachable!("to_f32 called on {other:?}"),
    }
}

/// Where a layer's table lives in a checkpoint, checked against the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableSpec {
    pub layer_id: usize,
    pub tensor: String,
    /// V4.1: the E8M0 scales, one per [`FP8_SCALE_BLOCK`] columns.
    pub scale_tensor: Option<String>,
    pub dtype: RowDtype,
    pub rows: u64,
    pub width: usize,
}

/// Finds and checks the table of layer `layer_id`: rows must equal the sum of the layer's
/// primes and width the head dim; a stored offsets tensor must equal the computed one.
pub fn table_spec(
    ck: &Checkpoint<'_>,
    cfg: &EngramConfig,
    layout: &LayerTableLayout,
) -> Result<TableSpec> {
    table_spec_with(
        ck.path(),
        cfg,
        layout,
        |name, dtypes, shape| ck.expect(name, dtypes, shape).map(|v| v.dtype()),
        |name, shape| {
            if ck.contains(name) {
                ck.i64_tensor(name, shape).map(Some)
            } else {
                Ok(None)
            }
        },
    )
}

/// [`table_spec`] from a file's header alone ([`SafetensorsHeader`]): nothing of the table
/// is read, and its bytes (and the scales') must lie inside the file. A stored offsets
/// tensor (a few bytes) is read from the file and compared.
pub fn table_spec_from_header(
    header: &SafetensorsHeader,
    cfg: &EngramConfig,
    layout: &LayerTableLayout,
) -> Result<TableSpec> {
    table_spec_with(
        header.path(),
        cfg,
        layout,
        |name, dtypes, shape| header.expect(name, dtypes, shape).map(|i| i.dtype),
        |name, shape| {
            if header.info(name).is_some() {
                header.read_i64_tensor(name, shape).map(Some)
            } else {
                Ok(None)
            }
        },
    )
}

/// The table checks shared by [`table_spec`] and [`table_spec_from_header`]: `expect`
/// checks one tensor and returns its dtype, `stored_offsets` reads an optional i64 tensor.
fn table_spec_with(
    path: &Path,
    cfg: &EngramConfig,
    layout: &LayerTableLayout,
    expect: impl Fn(&str, &[Dtype], &[usize]) -> Result<Dtype>,
    stored_offsets: impl Fn(&str, &[usize]) -> Result<Option<Vec<i64>>>,
) -> Result<TableSpec> {
    let mut spec = TableSpec {
        layer_id: layout.layer_id,
        tensor: String::new(),
        scale_tensor: None,
        dtype: RowDtype::F32,
        rows: layout.total_rows,
        width: cfg.head_dim,
    };
    for t in expected_table_tensors(cfg, layout) {
        match t.kind {
            TensorKind::Table => {
                spec.dtype = match expect(&t.name, t.dtypes, &t.shape)? {
                    Dtype::F32 => RowDtype::F32,
                    Dtype::BF16 => RowDtype::BF16,
                    Dtype::F16 => RowDtype::F16,
                    _ => RowDtype::F8E4M3Scaled,
                };
                spec.tensor = t.name;
            }
            TensorKind::TableScale => {
                expect(&t.name, t.dtypes, &t.shape)?;
                spec.scale_tensor = Some(t.name);
            }
            TensorKind::Offsets => {
                if let Some(stored) = stored_offsets(&t.name, &t.shape)? {
                    check_stored_offsets(path, &t.name, &stored, layout)?;
                }
            }
            TensorKind::Weight => {}
        }
    }
    Ok(spec)
}

/// A stored offsets tensor must equal the offsets the config's primes give.
pub fn check_stored_offsets(
    path: &Path,
    name: &str,
    stored: &[i64],
    layout: &LayerTableLayout,
) -> Result<()> {
    let computed: Vec<i64> = layout.offsets.iter().map(|&o| o as i64).collect();
    if stored != computed.as_slice() {
        return Err(EngramError::tensor(
            path,
            name,
            format!("offsets {stored:?} differ from the config's primes, which give {computed:?}"),
        ));
    }
    Ok(())
}

/// What part of an Engram layer a tensor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorKind {
    /// The embedding table (`[rows, head_dim]`).
    Table,
    /// V4.1: the table's E8M0 scales, one per [`FP8_SCALE_BLOCK`] columns.
    TableScale,
    /// Paper variant: the stored head offsets (optional; checked against the primes).
    Offsets,
    /// Everything else: projections, norms, conv, gate weights.
    Weight,
}

/// One tensor an Engram layer of a config carries, and what it must look like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectedTensor {
    pub name: String,
    pub kind: TensorKind,
    /// Accepted dtypes.
    pub dtypes: &'static [Dtype],
    pub shape: Vec<usize>,
    /// May be absent (the paper variant's offsets); when present it must match.
    pub optional: bool,
}

const FLOATS: &[Dtype] = &[Dtype::F32, Dtype::BF16, Dtype::F16];
const INTS: &[Dtype] = &[Dtype::I64, Dtype::I32];
const E4M3: &[Dtype] = &[Dtype::F8_E4M3];
const E8M0: &[Dtype] = &[Dtype::F8_E8M0];
const BF16_ONLY: &[Dtype] = &[Dtype::BF16];

/// The table tensors of one layer (table first), as [`table_spec`] checks them.
pub fn expected_table_tensors(
    cfg: &EngramConfig,
    layout: &LayerTableLayout,
) -> Vec<ExpectedTensor> {
    let p = layer_prefix(layout.layer_id);
    let (rows, width) = (layout.total_rows as usize, cfg.head_dim);
    let t = |name: String, kind, dtypes, shape: Vec<usize>| ExpectedTensor {
        name,
        kind,
        dtypes,
        shape,
        optional: kind == TensorKind::Offsets,
    };
    match cfg.variant {
        Variant::Paper => vec![
            t(
                format!("{p}multi_head_embedding.embedding.weight"),
                TensorKind::Table,
                FLOATS,
                vec![rows, width],
            ),
            t(
                format!("{p}multi_head_embedding.offsets"),
                TensorKind::Offsets,
                INTS,
                vec![layout.offsets.len()],
            ),
        ],
        Variant::V41 => vec![
            t(
                format!("{p}embed.weight"),
                TensorKind::Table,
                E4M3,
                vec![rows, width],
            ),
            t(
                format!("{p}embed.scale"),
                TensorKind::TableScale,
                E8M0,
                vec![rows, width.div_ceil(FP8_SCALE_BLOCK)],
            ),
        ],
    }
}

/// Every tensor of one Engram layer (docs/algorithm.md section 10): the table tensors, then
/// the weights [`load_layer_weights`] reads, with the dtypes and shapes it accepts.
pub fn expected_layer_tensors(
    cfg: &EngramConfig,
    layout: &LayerTableLayout,
) -> Vec<ExpectedTensor> {
    let p = layer_prefix(layout.layer_id);
    let (g, d, e) = (cfg.hc_mult, cfg.hidden_size, cfg.embed_dim());
    let mut out = expected_table_tensors(cfg, layout);
    let mut w = |name: String, dtypes, shape: Vec<usize>| {
        out.push(ExpectedTensor {
            name,
            kind: TensorKind::Weight,
            dtypes,
            shape,
            optional: false,
        })
    };
    match cfg.variant {
        Variant::Paper => {
            for h in 0..g {
                w(format!("{p}key_projs.{h}.weight"), FLOATS, vec![d, e]);
                w(format!("{p}key_projs.{h}.bias"), FLOATS, vec![d]);
            }
            w(format!("{p}value_proj.weight"), FLOATS, vec![d, e]);
            w(format!("{p}value_proj.bias"), FLOATS, vec![d]);
            for stem in ["norm1", "norm2"] {
                for h in 0..g {
                    w(format!("{p}{stem}.{h}.weight"), FLOATS, vec![d]);
                }
            }
            w(
                format!("{p}short_conv.conv.weight"),
                FLOATS,
                vec![g * d, 1, cfg.kernel_size],
            );
            for h in 0..g {
                w(format!("{p}short_conv.norms.{h}.weight"), FLOATS, vec![d]);
            }
        }
        Variant::V41 => {
            let rows = (g + 1) * d;
            w(format!("{p}wkv.weight"), E4M3, vec![rows, e]);
            w(
                format!("{p}wkv.scale"),
                E8M0,
                vec![rows.div_ceil(FP8_SCALE_BLOCK), e.div_ceil(FP8_SCALE_BLOCK)],
            );
            w(format!("{p}q_weight"), BF16_ONLY, vec![g, d]);
            w(format!("{p}k_weight"), BF16_ONLY, vec![g, d]);
        }
    }
    out
}

/// The header of a safetensors file, read without its data: every tensor's dtype, shape
/// and byte range, and the file's length. Each tensor is checked against the length
/// before any of its bytes is touched, so a truncated file is refused with the tensor's
/// name (and never becomes a SIGBUS in a memory map). Reading it costs one small read,
/// whatever the size of the file.
#[derive(Clone, Debug)]
pub struct SafetensorsHeader {
    path: PathBuf,
    /// Offset of the data section: 8 + header length.
    data_start: u64,
    file_len: u64,
    meta: Metadata,
}

/// The 8-byte little-endian header length that starts every safetensors file.
const N_LEN: u64 = 8;
/// safetensors' own limit on the JSON header.
const MAX_HEADER_LEN: u64 = 100_000_000;

impl SafetensorsHeader {
    /// Reads the header of the file at `path` (8 bytes, then the JSON header).
    pub fn read_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mut file = std::fs::File::open(path).map_err(|e| EngramError::file(path, e))?;
        let file_len = file
            .metadata()
            .map_err(|e| EngramError::file(path, e))?
            .len();
        let mut len_bytes = [0u8; N_LEN as usize];
        let n = Self::header_len(path, file_len, || {
            file.read_exact(&mut len_bytes)?;
            Ok(len_bytes)
        })?;
        let mut json = vec![0u8; n as usize];
        file.read_exact(&mut json)
            .map_err(|e| EngramError::file(path, format!("cannot read the header: {e}")))?;
        Self::from_json(path, &json, file_len)
    }

    /// Parses the header at the start of `prefix`, the first bytes of a file (or buffer)
    /// of `file_len` bytes; `prefix` may be the whole file or a memory map of it.
    pub fn parse(path: impl AsRef<Path>, prefix: &[u8], file_len: u64) -> Result<Self> {
        let path = path.as_ref();
        let n = Self::header_len(path, file_len, || {
            prefix
                .get(..N_LEN as usize)
                .map(|b| b.try_into().unwrap())
                .ok_or_else(|| std::io::ErrorKind::UnexpectedEof.into())
        })?;
        let json = prefix
            .get(N_LEN as usize..(N_LEN + n) as usize)
            .ok_or_else(|| EngramError::file(path, "the buffer does not hold the whole header"))?;
        Self::from_json(path, json, file_len)
    }

    /// Length of the JSON header, checked against the file length.
    fn header_len(
        path: &Path,
        file_len: u64,
        first8: impl FnOnce() -> std::io::Result<[u8; 8]>,
    ) -> Result<u64> {
        if file_len < N_LEN {
            return Err(EngramError::file(
                path,
                format!("only {file_len} bytes: too short for a safetensors header (truncated?)"),
            ));
        }
        let bytes = first8().map_err(|e| EngramError::file(path, format!("cannot read: {e}")))?;
        let n = u64::from_le_bytes(bytes);
        if n > MAX_HEADER_LEN {
            return Err(EngramError::file(
                path,
                format!("not a safetensors file: header length {n} is over the 100 MB limit"),
            ));
        }
        if N_LEN + n > file_len {
            return Err(EngramError::file(
                path,
                format!(
                    "the safetensors header needs {} bytes but the file has only {file_len} (truncated?)",
                    N_LEN + n
                ),
            ));
        }
        Ok(n)
    }

    fn from_json(path: &Path, json: &[u8], file_len: u64) -> Result<Self> {
        let meta: Metadata = serde_json::from_slice(json)
            .map_err(|e| EngramError::file(path, format!("not a valid safetensors header: {e}")))?;
        Ok(Self {
            path: path.to_path_buf(),
            data_start: N_LEN + json.len() as u64,
            file_len,
            meta,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn file_len(&self) -> u64 {
        self.file_len
    }
    /// Offset of the first data byte in the file.
    pub fn data_start(&self) -> u64 {
        self.data_start
    }
    /// The parsed header.
    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }
    /// Tensor names in file order.
    pub fn names(&self) -> Vec<String> {
        self.meta.offset_keys()
    }
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.meta.info(name)
    }

    /// The string metadata value `key`, parsed as JSON.
    pub fn metadata_json(&self, key: &str) -> Result<Option<Value>> {
        let Some(raw) = self.meta.metadata().as_ref().and_then(|m| m.get(key)) else {
            return Ok(None);
        };
        serde_json::from_str(raw).map(Some).map_err(|e| {
            EngramError::file(
                &self.path,
                format!("metadata `{key}` is not valid JSON: {e}"),
            )
        })
    }

    /// Where tensor `name`'s bytes lie in the file; an error naming the file and the
    /// tensor when it is missing or reaches past the end of the file.
    pub fn byte_range(&self, name: &str) -> Result<Range<u64>> {
        let info = self
            .info(name)
            .ok_or_else(|| EngramError::tensor(&self.path, name, "missing"))?;
        let (s, e) = info.data_offsets;
        let range = self.data_start + s as u64..self.data_start + e as u64;
        if range.end > self.file_len {
            return Err(EngramError::tensor(
                &self.path,
                name,
                format!(
                    "data ends at byte {} but the file has only {} bytes (truncated?)",
                    range.end, self.file_len
                ),
            ));
        }
        Ok(range)
    }

    /// Checks tensor `name`: present, one of `dtypes`, exactly `shape`, inside the file.
    pub fn expect(&self, name: &str, dtypes: &[Dtype], shape: &[usize]) -> Result<&TensorInfo> {
        let info = self.info(name);
        check_tensor(
            &self.path,
            name,
            info.map(|i| (i.dtype, i.shape.as_slice())),
            dtypes,
            shape,
        )?;
        self.byte_range(name)?;
        Ok(info.expect("checked present"))
    }

    /// Every tensor lies inside the file and the data section ends where the file does
    /// (what safetensors requires); the first tensor that does not is named.
    pub fn check_complete(&self) -> Result<()> {
        for name in self.names() {
            self.byte_range(&name)?;
        }
        let end = self.data_start + self.meta.data_len() as u64;
        if end != self.file_len {
            return Err(EngramError::file(
                &self.path,
                format!(
                    "the tensors end at byte {end} but the file has {} bytes (corrupt?)",
                    self.file_len
                ),
            ));
        }
        Ok(())
    }

    /// Reads the bytes of tensor `name` from the file (for small tensors).
    pub fn read_tensor_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let range = self.byte_range(name)?;
        let io =
            |e: std::io::Error| EngramError::tensor(&self.path, name, format!("cannot read: {e}"));
        let mut file = std::fs::File::open(&self.path).map_err(io)?;
        file.seek(SeekFrom::Start(range.start)).map_err(io)?;
        let mut bytes = vec![0u8; (range.end - range.start) as usize];
        file.read_exact(&mut bytes).map_err(io)?;
        Ok(bytes)
    }

    /// An integer tensor (I64 or I32) of exactly `shape`, read from the file.
    pub fn read_i64_tensor(&self, name: &str, shape: &[usize]) -> Result<Vec<i64>> {
        let info = self.expect(name, INTS, shape)?;
        Ok(ints_to_i64(info.dtype, &self.read_tensor_bytes(name)?))
    }
}

/// Little-endian I64 or I32 bytes to i64.
fn ints_to_i64(dtype: Dtype, data: &[u8]) -> Vec<i64> {
    match dtype {
        Dtype::I64 => data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        _ => data
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as i64)
            .collect(),
    }
}

/// Reads a whole table into RAM as f32 (reference math and small checkpoints).
pub fn load_dense_table(ck: &Checkpoint<'_>, spec: &TableSpec) -> Result<DenseTable> {
    let name = format!("{}:{}", ck.path().display(), spec.tensor);
    let view = ck
        .st
        .tensor(&spec.tensor)
        .map_err(|_| EngramError::tensor(ck.path(), &spec.tensor, "missing"))?;
    let data = match &spec.scale_tensor {
        None => to_f32(view.dtype(), view.data()),
        Some(scale) => {
            let scales = ck
                .st
                .tensor(scale)
                .map_err(|_| EngramError::tensor(ck.path(), scale, "missing"))?;
            let (w, sw) = (spec.width, spec.dtype.scale_row_bytes(spec.width));
            let mut out = vec![0f32; spec.rows as usize * w];
            for ((dst, v), s) in out
                .chunks_exact_mut(w)
                .zip(view.data().chunks_exact(w))
                .zip(scales.data().chunks_exact(sw))
            {
                dequant_f8_row(v, s, dst);
            }
            out
        }
    };
    DenseTable::new(name, spec.width, data)
}

/// Paper-variant weights of one layer, as f32 (docs/algorithm.md section 7).
#[derive(Clone, Debug)]
pub struct PaperWeights {
    /// `[hc_mult][D * E]`, row-major `[D, E]`.
    pub key_weight: Vec<Vec<f32>>,
    pub key_bias: Vec<Vec<f32>>,
    /// `[D * E]`.
    pub value_weight: Vec<f32>,
    pub value_bias: Vec<f32>,
    pub norm1: Vec<Vec<f32>>,
    pub norm2: Vec<Vec<f32>>,
    /// `[hc_mult * D, kernel_size]` (the middle dimension of 1 dropped).
    pub conv_weight: Vec<f32>,
    pub conv_norms: Vec<Vec<f32>>,
}

/// V4.1 weights of one layer, dequantized to f32 (docs/algorithm.md section 8).
#[derive(Clone, Debug)]
pub struct V41Weights {
    /// `[(hc_mult + 1) * D, E]`: hc_mult keys, then the value.
    pub wkv: Vec<f32>,
    /// `[hc_mult, D]`, bf16 values.
    pub q_weight: Vec<f32>,
    pub k_weight: Vec<f32>,
}

/// The non-table weights of one Engram layer.
#[derive(Clone, Debug)]
pub enum LayerWeights {
    Paper(PaperWeights),
    V41(V41Weights),
}

impl LayerWeights {
    /// Checks that the weights are of `cfg`'s variant and every vector has the length
    /// `cfg` gives it: an error naming the first tensor (and branch) that does not. Every
    /// backend's layer constructor calls this before it touches the weights.
    pub fn check(&self, cfg: &EngramConfig) -> Result<()> {
        let (g, d, e) = (cfg.hc_mult, cfg.hidden_size, cfg.embed_dim());
        let len = |what: String, want: usize, got: usize| -> Result<()> {
            if got == want {
                Ok(())
            } else {
                Err(EngramError::shape(what, want, got))
            }
        };
        let branches = |name: &str, v: &[Vec<f32>], each: usize| -> Result<()> {
            len(format!("paper weights `{name}`: branches"), g, v.len())?;
            v.iter()
                .enumerate()
                .try_for_each(|(h, x)| len(format!("paper weights `{name}.{h}`"), each, x.len()))
        };
        match (self, cfg.variant) {
            (LayerWeights::Paper(w), Variant::Paper) => {
                branches("key_projs.weight", &w.key_weight, d * e)?;
                branches("key_projs.bias", &w.key_bias, d)?;
                len(
                    "paper weights `value_proj.weight`".into(),
                    d * e,
                    w.value_weight.len(),
                )?;
                len(
                    "paper weights `value_proj.bias`".into(),
                    d,
                    w.value_bias.len(),
                )?;
                branches("norm1", &w.norm1, d)?;
                branches("norm2", &w.norm2, d)?;
                branches("short_conv.norms", &w.conv_norms, d)?;
                len(
                    "paper weights `short_conv.conv.weight`".into(),
                    g * d * cfg.kernel_size,
                    w.conv_weight.len(),
                )
            }
            (LayerWeights::V41(w), Variant::V41) => {
                len(
                    "V4.1 weights `wkv.weight`".into(),
                    (g + 1) * d * e,
                    w.wkv.len(),
                )?;
                len("V4.1 weights `q_weight`".into(), g * d, w.q_weight.len())?;
                len("V4.1 weights `k_weight`".into(), g * d, w.k_weight.len())
            }
            _ => Err(EngramError::config(
                "variant",
                "weights are for the other variant",
            )),
        }
    }
}

/// Loads and checks the non-table weights of layer `layer_id`.
pub fn load_layer_weights(
    ck: &Checkpoint<'_>,
    cfg: &EngramConfig,
    layer_id: usize,
) -> Result<LayerWeights> {
    let p = layer_prefix(layer_id);
    let (g, d, e) = (cfg.hc_mult, cfg.hidden_size, cfg.embed_dim());
    match cfg.variant {
        Variant::Paper => {
            let per_branch = |stem: &str, shape: &[usize]| -> Result<Vec<Vec<f32>>> {
                (0..g)
                    .map(|h| ck.f32_tensor(&format!("{p}{stem}.{h}.weight"), shape))
                    .collect()
            };
            let key_bias = (0..g)
                .map(|h| ck.f32_tensor(&format!("{p}key_projs.{h}.bias"), &[d]))
                .collect::<Result<_>>()?;
            Ok(LayerWeights::Paper(PaperWeights {
                key_weight: per_branch("key_projs", &[d, e])?,
                key_bias,
                value_weight: ck.f32_tensor(&format!("{p}value_proj.weight"), &[d, e])?,
                value_bias: ck.f32_tensor(&format!("{p}value_proj.bias"), &[d])?,
                norm1: per_branch("norm1", &[d])?,
                norm2: per_branch("norm2", &[d])?,
                conv_weight: ck.f32_tensor(
                    &format!("{p}short_conv.conv.weight"),
                    &[g * d, 1, cfg.kernel_size],
                )?,
                conv_norms: per_branch("short_conv.norms", &[d])?,
            }))
        }
        Variant::V41 => {
            let rows = (g + 1) * d;
            let wname = format!("{p}wkv.weight");
            let sname = format!("{p}wkv.scale");
            let w = ck.expect(&wname, &[Dtype::F8_E4M3], &[rows, e])?;
            let (sr, sc) = (rows.div_ceil(FP8_SCALE_BLOCK), e.div_ceil(FP8_SCALE_BLOCK));
            let s = ck.expect(&sname, &[Dtype::F8_E8M0], &[sr, sc])?;
            let scales: Vec<f32> = s.data().iter().map(|&b| e8m0_to_f32(b)).collect();
            let wkv = w
                .data()
                .iter()
                .enumerate()
                .map(|(i, &b)| {
                    f8e4m3_to_f32(b)
                        * scales[(i / e / FP8_SCALE_BLOCK) * sc + (i % e) / FP8_SCALE_BLOCK]
                })
                .collect();
            let bf16_only = [Dtype::BF16];
            let q = ck.expect(&format!("{p}q_weight"), &bf16_only, &[g, d])?;
            let k = ck.expect(&format!("{p}k_weight"), &bf16_only, &[g, d])?;
            Ok(LayerWeights::V41(V41Weights {
                wkv,
                q_weight: to_f32(Dtype::BF16, q.data()),
                k_weight: to_f32(Dtype::BF16, k.data()),
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::primes::table_layouts;
    use safetensors::tensor::TensorView;
    use serde_json::json;

    fn configs() -> Vec<EngramConfig> {
        let paper = json!({"engram": {"engram_vocab_size": [13, 17], "max_ngram_size": 3,
            "n_embed_per_ngram": 16, "n_head_per_ngram": 2, "layer_ids": [1, 3],
            "pad_id": 2, "seed": 0, "kernel_size": 3},
            "backbone": {"hidden_size": 8, "hc_mult": 2}});
        let v41 = json!({"variant": "v41", "engram": {"engram_vocab_size": [11, 11, 11],
            "max_ngram_size": 4, "n_head_per_ngram": 2, "engram_head_dim": 32,
            "layer_ids": [2], "pad_id": 2, "seed": 0},
            "backbone": {"hidden_size": 32, "hc_mult": 2, "rms_norm_eps": 1e-20}});
        [paper, v41]
            .iter()
            .map(|m| EngramConfig::from_golden_meta(m).unwrap())
            .collect()
    }

    /// A file holding `tensors` (zeros), with `edit` applied to each description first.
    fn file_with(
        tensors: &[ExpectedTensor],
        edit: impl Fn(&ExpectedTensor) -> Option<(Dtype, Vec<usize>)>,
    ) -> Vec<u8> {
        let described: Vec<(String, Dtype, Vec<usize>)> = tensors
            .iter()
            .filter_map(|t| edit(t).map(|(d, s)| (t.name.clone(), d, s)))
            .collect();
        let data: Vec<Vec<u8>> = described
            .iter()
            .map(|(_, d, s)| vec![0u8; s.iter().product::<usize>() * d.bitsize() / 8])
            .collect();
        let views: Vec<(String, TensorView<'_>)> = described
            .iter()
            .zip(&data)
            .map(|((n, d, s), b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize(views, None).unwrap()
    }

    fn load_all(bytes: &[u8], cfg: &EngramConfig, layout: &LayerTableLayout) -> Result<()> {
        let ck = Checkpoint::parse("t.safetensors", bytes)?;
        table_spec(&ck, cfg, layout)?;
        let h = SafetensorsHeader::parse("t.safetensors", bytes, bytes.len() as u64)?;
        h.check_complete()?;
        load_layer_weights(&ck, cfg, layout.layer_id).map(|_| ())
    }

    /// The expected-tensor list is what the loaders accept: the file it describes loads,
    /// and dropping or reshaping any required tensor makes them fail naming it.
    #[test]
    fn expected_tensors_match_the_loaders() {
        for cfg in configs() {
            for layout in table_layouts(&cfg.hash) {
                // Zero offsets would be refused: leave the optional tensor out.
                let mut expected = expected_layer_tensors(&cfg, &layout);
                expected.retain(|t| !t.optional);
                let as_is = |t: &ExpectedTensor| Some((t.dtypes[0], t.shape.clone()));
                load_all(&file_with(&expected, as_is), &cfg, &layout).unwrap();
                for victim in &expected {
                    let dropped = file_with(&expected, |t| {
                        (t.name != victim.name).then(|| (t.dtypes[0], t.shape.clone()))
                    });
                    let e = load_all(&dropped, &cfg, &layout).unwrap_err().to_string();
                    assert!(e.contains(&victim.name) && e.contains("missing"), "{e}");
                    let reshaped = file_with(&expected, |t| {
                        let mut s = t.shape.clone();
                        if t.name == victim.name {
                            s[0] += 1;
                        }
                        Some((t.dtypes[0], s))
                    });
                    let e = load_all(&reshaped, &cfg, &layout).unwrap_err().to_string();
                    assert!(e.contains(&victim.name) && e.contains("shape"), "{e}");
                }
            }
        }
    }

    #[test]
    fn truncation_names_the_tensor() {
        let cfg = &configs()[1];
        let layout = &table_layouts(&cfg.hash)[0];
        let expected = expected_layer_tensors(cfg, layout);
        let bytes = file_with(&expected, |t| Some((t.dtypes[0], t.shape.clone())));
        let cut = &bytes[..bytes.len() - 1];
        let e = Checkpoint::parse("t.safetensors", cut)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("t.safetensors") && e.contains("tensor `") && e.contains("truncated"),
            "{e}"
        );
        let e = SafetensorsHeader::parse("t.safetensors", cut, 20)
            .unwrap_err()
            .to_string();
        assert!(e.contains("header") && e.contains("truncated"), "{e}");
        let e = SafetensorsHeader::parse("t.safetensors", &cut[..4], 4)
            .unwrap_err()
            .to_string();
        assert!(e.contains("too short"), "{e}");
    }
}
