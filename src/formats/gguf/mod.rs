//! GGUF checkpoints (bitnet.cpp / llama.cpp), with I2_S ternary tensors.
//!
//! [`GgufFile::parse`] reads a whole file held in memory (so the browser can hand over the bytes
//! it fetched); [`load`] maps one from disk. [`to_model`] turns a BitNet checkpoint into
//! [`crate::model::ModelWeights`], [`tokenizer`] extracts the embedded vocabulary, and
//! [`write_model`] produces a GGUF v3 file that bitnet.cpp's `bitnet-b1.58` architecture and this
//! reader both accept.
//!
//! Every size and offset in a file is untrusted: arithmetic on them is checked, and a truncated or
//! inconsistent file is an [`crate::Error`] that names the field or tensor, never a panic.

mod model;
mod reader;
mod writer;

#[cfg(test)]
mod tests;

pub use model::{GgufModel, GgufTokenizer, to_model, tokenizer};
pub use writer::{BITNET_CPP_ROW_MULTIPLE, TableType, check_bitnet_cpp_rows, write_model};

use crate::cpu::TernaryWeights;
use crate::formats::scale::divisor_of;
use crate::packing::i2s;
use crate::{Error, Result};

/// ggml tensor type of 32-bit floats.
pub const GGML_TYPE_F32: u32 = 0;
/// ggml tensor type of IEEE half floats.
pub const GGML_TYPE_F16: u32 = 1;
/// ggml tensor type of bfloat16.
pub const GGML_TYPE_BF16: u32 = 30;
/// ggml tensor type of bitnet.cpp's 2-bit ternary layout (see [`crate::packing::i2s`]).
pub const GGML_TYPE_I2_S: u32 = 36;

/// The alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: usize = 32;

/// One metadata value. Arrays keep their element type so that an empty array can be written back
/// unchanged.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array {
        /// The GGUF value type of every element (0-12, 9 for nested arrays).
        element_type: u32,
        values: Vec<GgufValue>,
    },
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    /// The GGUF value type code written before this value.
    pub fn type_code(&self) -> u32 {
        match self {
            GgufValue::U8(_) => 0,
            GgufValue::I8(_) => 1,
            GgufValue::U16(_) => 2,
            GgufValue::I16(_) => 3,
            GgufValue::U32(_) => 4,
            GgufValue::I32(_) => 5,
            GgufValue::F32(_) => 6,
            GgufValue::Bool(_) => 7,
            GgufValue::String(_) => 8,
            GgufValue::Array { .. } => 9,
            GgufValue::U64(_) => 10,
            GgufValue::I64(_) => 11,
            GgufValue::F64(_) => 12,
        }
    }

    /// Any integer value, signed or not, as an i128 (writers disagree on which width they use
    /// for counts and token ids).
    fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(v) => v.into(),
            GgufValue::I8(v) => v.into(),
            GgufValue::U16(v) => v.into(),
            GgufValue::I16(v) => v.into(),
            GgufValue::U32(v) => v.into(),
            GgufValue::I32(v) => v.into(),
            GgufValue::U64(v) => v.into(),
            GgufValue::I64(v) => v.into(),
            _ => return None,
        })
    }
}

/// A tensor's entry in the header: where its data lies and how to read it.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml's `ne`: `dims[0]` is the innermost (fastest-varying) dimension, so a linear weight
    /// `[out, in]` in row-major order has `dims == [in, out]`.
    pub dims: Vec<u64>,
    /// The ggml type ([`GGML_TYPE_F32`], [`GGML_TYPE_I2_S`], ...).
    pub ggml_type: u32,
    /// Byte offset from the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// The number of elements, checked against overflow.
    pub fn element_count(&self) -> Result<usize> {
        self.dims.iter().try_fold(1usize, |acc, &d| {
            usize::try_from(d)
                .ok()
                .and_then(|d| acc.checked_mul(d))
                .ok_or_else(|| {
                    Error::invalid(
                        "GGUF tensor",
                        format!("{}: shape {:?} overflows", self.name, self.dims),
                    )
                })
        })
    }

    /// The unsupported-type error, worded once for every decoder.
    fn unsupported(&self) -> Error {
        Error::invalid(
            "GGUF tensor type",
            format!(
                "type {} of tensor {} is not supported (supported: F32, F16, BF16, I2_S)",
                self.ggml_type, self.name
            ),
        )
    }

    /// The byte size of the tensor's data, for the types this crate reads.
    fn byte_len(&self) -> Result<usize> {
        let n = self.element_count()?;
        let overflow = || {
            Error::invalid(
                "GGUF tensor",
                format!("{}: byte size of {n} elements overflows", self.name),
            )
        };
        match self.ggml_type {
            GGML_TYPE_F32 => n.checked_mul(4).ok_or_else(overflow),
            GGML_TYPE_F16 | GGML_TYPE_BF16 => n.checked_mul(2).ok_or_else(overflow),
            GGML_TYPE_I2_S => Ok(i2s::byte_len(n)),
            _ => Err(self.unsupported()),
        }
    }
}

/// A parsed GGUF file: header, metadata and tensor directory, over the file's bytes (borrowed
/// from the caller, or owned when read from disk).
#[derive(Clone, Debug)]
pub struct GgufFile<'a> {
    /// 2 or 3 (version 1 used 32-bit counts and is not read).
    pub version: u32,
    /// Key/value pairs in file order.
    pub metadata: Vec<(String, GgufValue)>,
    pub tensors: Vec<GgufTensorInfo>,
    /// `general.alignment`, or [`DEFAULT_ALIGNMENT`].
    pub alignment: usize,
    /// Where the data section starts in the file.
    pub data_offset: usize,
    bytes: Bytes<'a>,
}

/// A file's bytes: the caller's, owned, or mapped from disk (one mapping shared by clones).
#[derive(Clone, Debug)]
enum Bytes<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
    #[cfg(not(target_arch = "wasm32"))]
    Mapped(std::sync::Arc<memmap2::Mmap>),
}

impl std::ops::Deref for Bytes<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Borrowed(b) => b,
            Bytes::Owned(b) => b,
            #[cfg(not(target_arch = "wasm32"))]
            Bytes::Mapped(m) => m,
        }
    }
}

/// Maps and parses a GGUF file on disk: its bytes are read as they are used (tensors a model
/// does not need, never), and are the page cache's, not a copy.
#[cfg(not(target_arch = "wasm32"))]
pub fn load(path: impl AsRef<std::path::Path>) -> Result<GgufFile<'static>> {
    GgufFile::from_map(std::sync::Arc::new(super::map(path)?))
}

impl<'a> GgufFile<'a> {
    /// Parses a file held in memory without copying it.
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        reader::parse(Bytes::Borrowed(bytes))
    }

    /// Parses a file and keeps its bytes, for callers that cannot keep the buffer alive.
    pub fn from_vec(bytes: Vec<u8>) -> Result<GgufFile<'static>> {
        reader::parse(Bytes::Owned(bytes))
    }

    /// Parses a mapped file ([`super::map`]), sharing the mapping.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn from_map(map: std::sync::Arc<memmap2::Mmap>) -> Result<GgufFile<'static>> {
        reader::parse(Bytes::Mapped(map))
    }

    /// The mapping the file is read from, where it is mapped ([`GgufFile::from_map`]).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn mapping(&self) -> Option<&std::sync::Arc<memmap2::Mmap>> {
        match &self.bytes {
            Bytes::Mapped(map) => Some(map),
            _ => None,
        }
    }

    /// Lets go of the pages of a mapped file ([`GgufFile::from_map`]) that this process has
    /// read: the page cache keeps them, and a later read maps them again. A reader that has
    /// copied what it needs calls this, so that its memory does not grow by the file's size.
    /// Nothing for bytes in memory.
    pub fn release(&self) {
        #[cfg(not(target_arch = "wasm32"))]
        if let Bytes::Mapped(map) = &self.bytes {
            super::release(map);
        }
    }

    /// The value of a metadata key.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata
            .iter()
            .find_map(|(k, v)| (k == key).then_some(v))
    }

    /// An integer key as u32 (any integer type whose value fits); `None` when absent.
    pub fn get_u32(&self, key: &str) -> Result<Option<u32>> {
        self.get(key)
            .map(|v| {
                v.as_integer()
                    .and_then(|i| u32::try_from(i).ok())
                    .ok_or_else(|| wrong_type(key, "an integer in u32 range", v))
            })
            .transpose()
    }

    /// A float key (f32, or f64 narrowed) as f32; `None` when absent.
    pub fn get_f32(&self, key: &str) -> Result<Option<f32>> {
        self.get(key)
            .map(|v| match *v {
                GgufValue::F32(x) => Ok(x),
                GgufValue::F64(x) => Ok(x as f32),
                _ => Err(wrong_type(key, "a float", v)),
            })
            .transpose()
    }

    /// A boolean key; `None` when absent.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| match *v {
                GgufValue::Bool(b) => Ok(b),
                _ => Err(wrong_type(key, "a bool", v)),
            })
            .transpose()
    }

    /// A string key; `None` when absent.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key)
            .map(|v| match v {
                GgufValue::String(s) => Ok(s.as_str()),
                _ => Err(wrong_type(key, "a string", v)),
            })
            .transpose()
    }

    /// An array-of-strings key; `None` when absent.
    pub fn get_string_array(&self, key: &str) -> Result<Option<Vec<&str>>> {
        self.get_array(key, "an array of strings", |v| match v {
            GgufValue::String(s) => Some(s.as_str()),
            _ => None,
        })
    }

    /// An array-of-integers key as i32 values; `None` when absent.
    pub fn get_i32_array(&self, key: &str) -> Result<Option<Vec<i32>>> {
        self.get_array(key, "an array of i32", |v| {
            v.as_integer().and_then(|i| i32::try_from(i).ok())
        })
    }

    /// An array key whose every element `convert` accepts.
    fn get_array<'s, T>(
        &'s self,
        key: &str,
        expected: &str,
        convert: impl Fn(&'s GgufValue) -> Option<T>,
    ) -> Result<Option<Vec<T>>> {
        self.get(key)
            .map(|v| match v {
                GgufValue::Array { values, .. } => values
                    .iter()
                    .map(&convert)
                    .collect::<Option<Vec<T>>>()
                    .ok_or_else(|| wrong_type(key, expected, v)),
                _ => Err(wrong_type(key, expected, v)),
            })
            .transpose()
    }

    /// The directory entry of a tensor.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The raw bytes of a tensor, after checking that they lie inside the file.
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> Result<&[u8]> {
        let len = info.byte_len()?;
        let start = usize::try_from(info.offset)
            .ok()
            .and_then(|o| self.data_offset.checked_add(o));
        let end = start.and_then(|s| s.checked_add(len));
        match (start, end) {
            (Some(start), Some(end)) if end <= self.bytes.len() => Ok(&self.bytes[start..end]),
            _ => Err(Error::invalid(
                "GGUF tensor data",
                format!(
                    "tensor {}: {len} bytes at data offset {} run past the end of the file \
                     ({} bytes, data section at {})",
                    info.name,
                    info.offset,
                    self.bytes.len(),
                    self.data_offset
                ),
            )),
        }
    }

    /// A float tensor (F32, F16 or BF16) widened to f32.
    pub fn tensor_f32(&self, info: &GgufTensorInfo) -> Result<Vec<f32>> {
        let bytes = self.tensor_bytes(info)?;
        match info.ggml_type {
            GGML_TYPE_F32 => Ok(bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()),
            GGML_TYPE_F16 => Ok(bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect()),
            GGML_TYPE_BF16 => Ok(bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect()),
            GGML_TYPE_I2_S => Err(Error::invalid(
                "GGUF tensor type",
                format!(
                    "tensor {} is I2_S (ternary) where a float tensor is expected",
                    info.name
                ),
            )),
            _ => Err(info.unsupported()),
        }
    }

    /// An I2_S matrix `[rows = dims[1], cols = dims[0]]` as ternary codes with one scale in
    /// Hugging Face's convention (`W ≈ codes / scale`).
    ///
    /// bitnet.cpp stores `W ≈ code * s` with `s = max|W| = mean|W|`, so the scale returned is
    /// `1 / s`. A stored `s` of 0 (bitnet.cpp's value for an all-zero matrix) gives
    /// `1 / 1e-5`, the scale [`crate::cpu::weight_quant`] assigns to such a matrix.
    pub fn tensor_ternary(&self, info: &GgufTensorInfo) -> Result<TernaryWeights> {
        let (rows, cols, bytes) = self.i2s_matrix(info)?;
        let (codes, stored) = i2s::unpack(bytes, rows * cols).map_err(|e| in_tensor(info, e))?;
        let scale = divisor(info, stored, || codes.iter().all(|&c| c == 0))?;
        Ok(TernaryWeights {
            rows,
            cols,
            codes,
            scales: vec![scale],
        })
    }

    /// An I2_S matrix whose rows are whole blocks (`dims[0]` a multiple of 128) as its file
    /// holds it, checked as [`GgufFile::tensor_ternary`] checks it, with the scale that
    /// [`GgufFile::tensor_ternary`] gives.
    pub fn tensor_blocks(&self, info: &GgufTensorInfo) -> Result<(i2s::BlockRows<'_>, f32)> {
        let (rows, cols, bytes) = self.i2s_matrix(info)?;
        let (packed, stored) = i2s::split(bytes, rows * cols).map_err(|e| in_tensor(info, e))?;
        let blocks = i2s::BlockRows::new(packed, rows, cols).map_err(|e| in_tensor(info, e))?;
        let scale = divisor(info, stored, || blocks.is_zero())?;
        Ok((blocks, scale))
    }

    /// `(rows, cols, bytes)` of an I2_S matrix: its type and shape checked, its bytes inside the
    /// file.
    fn i2s_matrix(&self, info: &GgufTensorInfo) -> Result<(usize, usize, &[u8])> {
        if info.ggml_type != GGML_TYPE_I2_S {
            return Err(match info.ggml_type {
                GGML_TYPE_F32 | GGML_TYPE_F16 | GGML_TYPE_BF16 => Error::invalid(
                    "GGUF tensor type",
                    format!(
                        "tensor {} is a float tensor where I2_S (ternary) is expected",
                        info.name
                    ),
                ),
                _ => info.unsupported(),
            });
        }
        let n = info.element_count()?;
        match info.dims[..] {
            [c, r] if n > 0 => Ok((r as usize, c as usize, self.tensor_bytes(info)?)),
            _ => Err(Error::invalid(
                "GGUF tensor",
                format!(
                    "{}: an I2_S matrix needs 2 non-zero dimensions, got {:?}",
                    info.name, info.dims
                ),
            )),
        }
    }
}

/// An error of a tensor's data, naming the tensor.
fn in_tensor(info: &GgufTensorInfo, e: Error) -> Error {
    Error::invalid("GGUF tensor", format!("{}: {e}", info.name))
}

/// The in-memory divisor of an I2_S tensor's `stored` multiplier; a stored 0 is taken where
/// every code is 0 (`all_zero`, asked only then).
fn divisor(info: &GgufTensorInfo, stored: f32, all_zero: impl FnOnce() -> bool) -> Result<f32> {
    if stored == 0.0 && all_zero() {
        Ok(1.0 / 1e-5f32)
    } else if stored.is_finite() && stored > 0.0 {
        Ok(divisor_of(stored))
    } else {
        Err(Error::invalid(
            "GGUF tensor",
            format!(
                "{}: I2_S scale {stored} is not a positive finite number",
                info.name
            ),
        ))
    }
}

/// The error for a metadata key of the wrong type.
fn wrong_type(key: &str, expected: &str, got: &GgufValue) -> Error {
    Error::invalid(
        "GGUF metadata",
        format!(
            "{key} should be {expected}, found a value of GGUF type {}",
            got.type_code()
        ),
    )
}
