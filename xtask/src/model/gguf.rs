//! Reading the GGUF: its header (metadata and tensor index) with typed metadata access,
//! and its tensors.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::Device;

/// A GGUF file's header (metadata and tensor index), with typed metadata access.
pub struct Gguf {
    pub(super) path: PathBuf,
    pub(super) content: Content,
}

fn as_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x as u64),
        Value::U16(x) => Some(x as u64),
        Value::U32(x) => Some(x as u64),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Self> {
        let mut reader = BufReader::new(
            File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
        );
        let content = Content::read(&mut reader)
            .map_err(|e| anyhow!("{}: not a readable GGUF file: {e}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            content,
        })
    }

    pub(super) fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    pub(super) fn req(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| anyhow!("{}: metadata `{key}` is missing", self.path.display()))
    }

    pub(super) fn uint(&self, key: &str) -> Result<u64> {
        let v = self.req(key)?;
        as_u64(v).ok_or_else(|| {
            anyhow!(
                "{}: metadata `{key}` is {v:?}, expected a non-negative integer",
                self.path.display()
            )
        })
    }

    pub(super) fn opt_uint(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.uint(key).map(Some),
        }
    }

    /// A float as the shortest decimal that reads back as the stored value: an f32
    /// `1e-5` becomes `1e-5`, not `9.999999747378752e-6`.
    pub(super) fn float(&self, key: &str) -> Result<f64> {
        match self.req(key)? {
            Value::F32(x) => Ok(format!("{x}").parse().expect("f32 display parses")),
            Value::F64(x) => Ok(*x),
            v => as_u64(v).map(|u| u as f64).ok_or_else(|| {
                anyhow!(
                    "{}: metadata `{key}` is {v:?}, expected a number",
                    self.path.display()
                )
            }),
        }
    }

    pub(super) fn opt_float(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.float(key).map(Some),
        }
    }

    pub(super) fn opt_bool(&self, key: &str) -> Option<bool> {
        match self.get(key) {
            Some(Value::Bool(b)) => Some(*b),
            Some(v) => as_u64(v).map(|u| u != 0),
            None => None,
        }
    }

    pub(super) fn string(&self, key: &str) -> Result<&str> {
        match self.req(key)? {
            Value::String(s) => Ok(s),
            v => bail!(
                "{}: metadata `{key}` is {v:?}, expected a string",
                self.path.display()
            ),
        }
    }

    pub(super) fn opt_string(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(_) => self.string(key).map(Some),
        }
    }

    pub(super) fn strings(&self, key: &str) -> Result<Vec<&str>> {
        let arr = match self.req(key)? {
            Value::Array(a) => a,
            v => bail!(
                "{}: metadata `{key}` is {:?}, expected an array of strings",
                self.path.display(),
                v.value_type()
            ),
        };
        arr.iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.as_str()),
                other => bail!(
                    "{}: metadata `{key}` holds {:?}, expected strings",
                    self.path.display(),
                    other.value_type()
                ),
            })
            .collect()
    }

    pub(super) fn opt_ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        let Value::Array(arr) = v else {
            bail!(
                "{}: metadata `{key}` is {:?}, expected an array of integers",
                self.path.display(),
                v.value_type()
            );
        };
        arr.iter()
            .map(|x| match *x {
                Value::I32(i) => Ok(i as i64),
                Value::I64(i) => Ok(i),
                ref other => as_u64(other).map(|u| u as i64).ok_or_else(|| {
                    anyhow!(
                        "{}: metadata `{key}` holds {:?}, expected integers",
                        self.path.display(),
                        other.value_type()
                    )
                }),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }

    /// Shape of tensor `name` in row-major order (`[out, in]` for a matrix), and its type.
    pub(super) fn tensor_info(&self, name: &str) -> Result<(Vec<usize>, GgmlDType)> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| anyhow!("{}: no tensor `{name}`", self.path.display()))?;
        Ok((info.shape.dims().to_vec(), info.ggml_dtype))
    }

    /// Tensor `name` dequantized by candle, row-major f32.
    pub(super) fn dequantized(&self, reader: &mut BufReader<File>, name: &str) -> Result<Vec<f32>> {
        let q = self
            .content
            .tensor(reader, name, &Device::Cpu)
            .map_err(|e| anyhow!("{}: tensor `{name}`: {e}", self.path.display()))?;
        let t = q
            .dequantize(&Device::Cpu)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| {
                anyhow!(
                    "{}: tensor `{name}`: cannot dequantize: {e}",
                    self.path.display()
                )
            })?;
        Ok(t)
    }

    /// The stored bytes of tensor `name`, as they are in the file.
    pub(super) fn raw_bytes(&self, name: &str) -> Result<(Vec<u8>, GgmlDType, Vec<usize>)> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| anyhow!("{}: no tensor `{name}`", self.path.display()))?;
        let elems = info.shape.elem_count();
        let dtype = info.ggml_dtype;
        let bytes = elems / dtype.block_size() * dtype.type_size();
        let mut file = File::open(&self.path)?;
        file.seek(SeekFrom::Start(
            self.content.tensor_data_offset + info.offset,
        ))?;
        let mut buf = vec![0u8; bytes];
        file.read_exact(&mut buf)?;
        Ok((buf, dtype, info.shape.dims().to_vec()))
    }
}
