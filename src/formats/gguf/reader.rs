//! Parsing of the GGUF header, metadata and tensor directory.

use super::{Bytes, DEFAULT_ALIGNMENT, GgufFile, GgufTensorInfo, GgufValue};
use crate::{Error, Result};

/// The four bytes every GGUF file starts with.
pub(super) const MAGIC: &[u8; 4] = b"GGUF";

/// ggml's limit on tensor dimensions.
const MAX_DIMS: u32 = 4;

/// Arrays nested deeper than this are rejected: real files nest at most once, and unbounded
/// recursion on a hostile file would overflow the stack.
const MAX_NESTING: usize = 16;

/// A little-endian reader over the file that reports where and what it ran out on.
struct Cursor<'b> {
    bytes: &'b [u8],
    pos: usize,
}

impl<'b> Cursor<'b> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'b [u8]> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.bytes.len() => {
                let out = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(out)
            }
            _ => Err(Error::invalid(
                "GGUF file",
                format!(
                    "truncated: {what} needs {n} bytes at offset {} but the file has {}",
                    self.pos,
                    self.bytes.len()
                ),
            )),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A length or count from the file, which must at least fit in memory.
    fn len(&mut self, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        usize::try_from(n)
            .map_err(|_| Error::invalid("GGUF file", format!("{what} {n} does not fit in memory")))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.len(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| {
            Error::invalid(
                "GGUF file",
                format!("{what} at offset {} is not UTF-8", self.pos - len),
            )
        })
    }

    fn value(&mut self, type_code: u32, key: &str, depth: usize) -> Result<GgufValue> {
        Ok(match type_code {
            0 => GgufValue::U8(self.array::<1>(key)?[0]),
            1 => GgufValue::I8(i8::from_le_bytes(self.array(key)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => GgufValue::U32(self.u32(key)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => match self.array::<1>(key)?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => {
                    return Err(Error::invalid(
                        "GGUF metadata",
                        format!("{key}: bool byte {b} is neither 0 nor 1"),
                    ));
                }
            },
            8 => GgufValue::String(self.string(key)?),
            9 => {
                if depth >= MAX_NESTING {
                    return Err(Error::invalid(
                        "GGUF metadata",
                        format!("{key}: arrays nested deeper than {MAX_NESTING}"),
                    ));
                }
                let element_type = self.u32(key)?;
                let count = self.len(key)?;
                // Every element takes at least one byte, so the rest of the file bounds the
                // allocation whatever count the file claims.
                let mut values = Vec::with_capacity(count.min(self.bytes.len() - self.pos));
                for _ in 0..count {
                    values.push(self.value(element_type, key, depth + 1)?);
                }
                GgufValue::Array {
                    element_type,
                    values,
                }
            }
            10 => GgufValue::U64(self.u64(key)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(key)?)),
            t => {
                return Err(Error::invalid(
                    "GGUF metadata",
                    format!("{key}: unknown value type {t}"),
                ));
            }
        })
    }
}

/// `n` rounded up to a multiple of `align`, or `None` on overflow.
pub(super) fn align_up(n: usize, align: usize) -> Option<usize> {
    n.checked_next_multiple_of(align)
}

/// Parses header, metadata and tensor directory; tensor data is only located, not read.
pub(super) fn parse(bytes: Bytes<'_>) -> Result<GgufFile<'_>> {
    let mut c = Cursor {
        bytes: &bytes,
        pos: 0,
    };
    let magic = c.array::<4>("magic")?;
    if &magic != MAGIC {
        return Err(Error::invalid(
            "GGUF file",
            format!("magic {magic:02x?} is not \"GGUF\""),
        ));
    }
    let version = c.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(Error::invalid(
            "GGUF file",
            format!("version {version} is not supported (supported: 2, 3)"),
        ));
    }
    let tensor_count = c.len("tensor count")?;
    let kv_count = c.len("metadata count")?;
    let remaining = c.bytes.len() - c.pos;
    let mut metadata = Vec::with_capacity(kv_count.min(remaining));
    for _ in 0..kv_count {
        let key = c.string("metadata key")?;
        let type_code = c.u32(&key)?;
        let value = c.value(type_code, &key, 0)?;
        metadata.push((key, value));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, GgufValue::U32(a))) if *a > 0 => *a as usize,
        Some((_, v)) => {
            return Err(Error::invalid(
                "GGUF metadata",
                format!("general.alignment must be a non-zero u32, found {v:?}"),
            ));
        }
    };
    let remaining = c.bytes.len() - c.pos;
    let mut tensors = Vec::with_capacity(tensor_count.min(remaining));
    for _ in 0..tensor_count {
        let name = c.string("tensor name")?;
        let n_dims = c.u32(&name)?;
        if n_dims > MAX_DIMS {
            return Err(Error::invalid(
                "GGUF tensor",
                format!("{name}: {n_dims} dimensions (at most {MAX_DIMS})"),
            ));
        }
        let dims = (0..n_dims)
            .map(|_| c.u64(&name))
            .collect::<Result<Vec<u64>>>()?;
        let ggml_type = c.u32(&name)?;
        let offset = c.u64(&name)?;
        if offset % alignment as u64 != 0 {
            return Err(Error::invalid(
                "GGUF tensor",
                format!(
                    "{name}: data offset {offset} is not a multiple of the alignment {alignment}"
                ),
            ));
        }
        tensors.push(GgufTensorInfo {
            name,
            dims,
            ggml_type,
            offset,
        });
    }
    let data_offset = align_up(c.pos, alignment)
        .ok_or_else(|| Error::invalid("GGUF file", "data section offset overflows"))?;
    Ok(GgufFile {
        version,
        metadata,
        tensors,
        alignment,
        data_offset,
        bytes,
    })
}
