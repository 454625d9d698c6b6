//! Float tables (the embeddings, an untied lm_head) as a model's source holds them: f32 values in
//! memory, or a file's 16- or 32-bit values widened a block of rows at a time, so that a large
//! table (2B4T's embeddings: 1.3 GB as f32, 0.66 GB as stored) is never widened whole on its
//! way to an engine.

use std::borrow::Cow;
use std::ops::Range;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};

use crate::{Error, Result};

/// How a file stores a table's values (little-endian).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FloatType {
    F32,
    F16,
    Bf16,
}

impl FloatType {
    pub(crate) fn bytes(self) -> usize {
        match self {
            FloatType::F32 => 4,
            FloatType::F16 | FloatType::Bf16 => 2,
        }
    }

    /// The values of `bytes` as f32 (the 16-bit types widen exactly).
    pub(crate) fn widen(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            FloatType::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            FloatType::F16 => widen_half::<f16>(bytes),
            FloatType::Bf16 => widen_half::<bf16>(bytes),
        }
    }
}

/// 16-bit float bytes (little endian) as f32, converted a whole slice at a time (F16C for f16,
/// a shift for bf16: 8 values per instruction); the bytes are reinterpreted in place where they
/// are 2-byte aligned on a little-endian machine, else gathered value by value first.
fn widen_half<T: bytemuck::Pod>(bytes: &[u8]) -> Vec<f32>
where
    [T]: HalfFloatSliceExt,
{
    let gathered: Vec<T>;
    let values = match bytemuck::try_cast_slice::<u8, T>(bytes) {
        Ok(values) if cfg!(target_endian = "little") => values,
        _ => {
            gathered = bytes
                .chunks_exact(2)
                .map(|b| bytemuck::cast(u16::from_le_bytes([b[0], b[1]])))
                .collect();
            &gathered
        }
    };
    let mut out = vec![0.0f32; values.len()];
    values.convert_to_f32_slice(&mut out);
    out
}

/// A row-major table of `cols` values per row, read a block of rows at a time.
///
/// ```
/// use bitnet_wgpu::table::{FloatType, Table};
/// let bytes: Vec<u8> = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]
///     .iter()
///     .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
///     .collect();
/// let table = Table::stored("embeddings", FloatType::Bf16, &bytes, 3, 2)?;
/// assert_eq!(table.rows(), 3);
/// assert_eq!(*table.read(1..3)?, [3.0, 4.0, 5.0, 6.0]);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Table<'a> {
    cols: usize,
    data: Data<'a>,
}

#[derive(Clone, Debug)]
enum Data<'a> {
    Values(Cow<'a, [f32]>),
    /// A file's bytes, checked finite when read; `name` says which tensor, for errors.
    Stored {
        name: String,
        dtype: FloatType,
        bytes: &'a [u8],
        /// The mapped file `bytes` lie in, where the source said so ([`Table::in_mapping`]).
        #[cfg(not(target_arch = "wasm32"))]
        mapping: Option<Mapping>,
    },
}

/// A file mapped into memory, shared by its readers ([`crate::formats::map`]).
#[cfg(not(target_arch = "wasm32"))]
pub type Mapping = std::sync::Arc<memmap2::Mmap>;

/// Where a stored table lies in a mapped file ([`Table::mapped`]): an engine that keeps this
/// reads rows from the page cache as it needs them instead of holding a copy. Equal when it is
/// the same place of the same mapping.
#[cfg(not(target_arch = "wasm32"))]
#[derive(Clone, Debug)]
pub struct MappedTable {
    pub mapping: Mapping,
    /// The first byte of the table in the mapping.
    pub offset: usize,
    pub dtype: FloatType,
}

#[cfg(not(target_arch = "wasm32"))]
impl PartialEq for MappedTable {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.mapping, &other.mapping)
            && (self.offset, self.dtype) == (other.offset, other.dtype)
    }
}

impl<'a> Table<'a> {
    /// f32 values already in memory, `cols` per row (a last partial row makes
    /// [`Table::len`] disagree with `rows() * cols()`, which the engines refuse).
    pub fn values(values: impl Into<Cow<'a, [f32]>>, cols: usize) -> Self {
        Table {
            cols,
            data: Data::Values(values.into()),
        }
    }

    /// A file's `rows x cols` values of type `dtype`; `name` is how errors refer to it.
    pub fn stored(
        name: impl Into<String>,
        dtype: FloatType,
        bytes: &'a [u8],
        rows: usize,
        cols: usize,
    ) -> Result<Self> {
        let name = name.into();
        let expected = rows
            .checked_mul(cols)
            .and_then(|n| n.checked_mul(dtype.bytes()));
        if expected != Some(bytes.len()) {
            return Err(Error::shape(
                "table bytes",
                format!("{rows} x {cols} {dtype:?} values"),
                format!("{} bytes in {name}", bytes.len()),
            ));
        }
        Ok(Table {
            cols,
            data: Data::Stored {
                name,
                dtype,
                bytes,
                #[cfg(not(target_arch = "wasm32"))]
                mapping: None,
            },
        })
    }

    /// Says that a stored table's bytes lie in `mapping`, so that an engine may keep reading
    /// them there ([`Table::mapped`]); an error where they do not, or the values are in memory.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn in_mapping(mut self, mapping: Mapping) -> Result<Self> {
        let Data::Stored {
            bytes, mapping: at, ..
        } = &mut self.data
        else {
            return Err(Error::invalid("table", "its values are not a file's"));
        };
        let within = mapping.as_ptr_range();
        let range = bytes.as_ptr_range();
        if range.start < within.start || range.end > within.end {
            return Err(Error::invalid("table", "its bytes are not in the mapping"));
        }
        *at = Some(mapping);
        Ok(self)
    }

    /// Where the table lies in a mapped file; `None` for values in memory, or a file's bytes
    /// not said to be mapped ([`Table::in_mapping`]).
    #[cfg(not(target_arch = "wasm32"))]
    pub fn mapped(&self) -> Option<MappedTable> {
        let Data::Stored {
            dtype,
            bytes,
            mapping: Some(mapping),
            ..
        } = &self.data
        else {
            return None;
        };
        Some(MappedTable {
            offset: bytes.as_ptr() as usize - mapping.as_ptr() as usize,
            mapping: mapping.clone(),
            dtype: *dtype,
        })
    }

    /// Values per row.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Whole rows.
    pub fn rows(&self) -> usize {
        self.len() / self.cols.max(1)
    }

    /// Values in all.
    pub fn len(&self) -> usize {
        match &self.data {
            Data::Values(v) => v.len(),
            Data::Stored { dtype, bytes, .. } => bytes.len() / dtype.bytes(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows `range` (within [`Table::rows`]), row-major as f32. A file's values are widened
    /// here and must be finite: an error names the tensor, row and column.
    pub fn read(&self, range: Range<usize>) -> Result<Cow<'_, [f32]>> {
        let (start, end) = self.value_range(range)?;
        match &self.data {
            Data::Values(v) => Ok(Cow::Borrowed(&v[start..end])),
            Data::Stored {
                name, dtype, bytes, ..
            } => {
                let size = dtype.bytes();
                let values = dtype.widen(&bytes[start * size..end * size]);
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    return Err(self.not_finite(name, values[i], start + i));
                }
                Ok(Cow::Owned(values))
            }
        }
    }

    /// How a file stores the values; `None` for values in memory.
    pub fn stored_type(&self) -> Option<FloatType> {
        match &self.data {
            Data::Values(_) => None,
            Data::Stored { dtype, .. } => Some(*dtype),
        }
    }

    /// Rows `range` of a table a file stores in 16 bits (F16 or BF16, [`Table::stored_type`]),
    /// as the bits of its values, checked as [`Table::read`] checks them; an error for any other
    /// table. Nothing is widened: an engine that keeps 16-bit values takes them as they are, and
    /// nothing is copied where the bytes are 2-byte aligned on a little-endian machine (a mapped
    /// GGUF's tensors are): a copy of 2B4T's table is 0.66 GB of fresh pages to fault in.
    pub fn read_half(&self, range: Range<usize>) -> Result<Cow<'_, [u16]>> {
        // An all-ones exponent is an infinity or a NaN.
        let (name, bytes, exponent) = match &self.data {
            Data::Stored {
                name,
                dtype: FloatType::F16,
                bytes,
                ..
            } => (name, bytes, 0x7c00),
            Data::Stored {
                name,
                dtype: FloatType::Bf16,
                bytes,
                ..
            } => (name, bytes, 0x7f80),
            _ => {
                return Err(Error::invalid(
                    "table",
                    "its values are not stored as F16 or BF16",
                ));
            }
        };
        let (start, end) = self.value_range(range)?;
        let bytes = &bytes[2 * start..2 * end];
        let bits = match bytemuck::try_cast_slice::<u8, u16>(bytes) {
            Ok(bits) if cfg!(target_endian = "little") => Cow::Borrowed(bits),
            _ => Cow::Owned(
                bytes
                    .chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]))
                    .collect(),
            ),
        };
        // Checked without stopping early, which runs a vector at a time; the value is looked
        // for only when there is one.
        let not_finite = |h: u16| h & exponent == exponent;
        if bits.iter().fold(false, |any, &h| any | not_finite(h))
            && let Some(i) = bits.iter().position(|&h| not_finite(h))
        {
            let value = match exponent {
                0x7c00 => f16::from_bits(bits[i]).to_f32(),
                _ => bf16::from_bits(bits[i]).to_f32(),
            };
            return Err(self.not_finite(name, value, start + i));
        }
        Ok(bits)
    }

    /// The values of rows `range`, or an error where it is not within the table.
    fn value_range(&self, range: Range<usize>) -> Result<(usize, usize)> {
        if range.start > range.end || range.end > self.rows() {
            return Err(Error::invalid(
                "table rows",
                format!("{range:?} of a table of {} rows", self.rows()),
            ));
        }
        Ok((range.start * self.cols, range.end * self.cols))
    }

    /// The error for a value that is not finite at (row-major) value index `at`.
    fn not_finite(&self, name: &str, value: f32, at: usize) -> Error {
        Error::invalid(
            "table",
            format!(
                "{name} holds {value} at row {}, column {}",
                at / self.cols,
                at % self.cols
            ),
        )
    }

    /// Every value, row-major ([`Table::read`] of all rows).
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        Ok(self.read(0..self.rows())?.into_owned())
    }

    /// The row blocks of at most `rows` rows (at least one) that cover the table, in order.
    pub fn blocks(&self, rows: usize) -> impl Iterator<Item = Range<usize>> + use<> {
        let (total, step) = (self.rows(), rows.max(1));
        (0..total)
            .step_by(step)
            .map(move |start| start..(start + step).min(total))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_cover_the_rows_in_order() {
        let values: Vec<f32> = (0..21).map(|i| i as f32).collect();
        let table = Table::values(&values[..], 3);
        let blocks: Vec<_> = table.blocks(3).collect();
        assert_eq!(blocks, [0..3, 3..6, 6..7]);
        let read: Vec<f32> = blocks
            .into_iter()
            .flat_map(|b| table.read(b).unwrap().into_owned())
            .collect();
        assert_eq!(read, values);
        assert_eq!(table.blocks(0).count(), 7);
        assert!(table.read(5..8).is_err());
        assert!(table.stored_type().is_none() && table.read_half(0..1).is_err());
    }

    #[test]
    fn stored_values_widen_exactly_and_must_be_finite() {
        let values = [1.5f32, -2.25, 3.0e-3, 65504.0, 7.0, -0.0];
        for (dtype, bytes) in [
            (
                FloatType::F32,
                values
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>(),
            ),
            (
                FloatType::F16,
                values
                    .iter()
                    .flat_map(|v| f16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
            (
                FloatType::Bf16,
                values
                    .iter()
                    .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
                    .collect(),
            ),
        ] {
            let table = Table::stored("t", dtype, &bytes, 2, 3).unwrap();
            let expected: Vec<f32> = match dtype {
                FloatType::F32 => values.to_vec(),
                FloatType::F16 => values.iter().map(|v| f16::from_f32(*v).to_f32()).collect(),
                FloatType::Bf16 => values.iter().map(|v| bf16::from_f32(*v).to_f32()).collect(),
            };
            assert_eq!(table.to_vec().unwrap(), expected, "{dtype:?}");
            assert_eq!(table.stored_type(), Some(dtype));
            if let Ok(bits) = table.read_half(0..2) {
                let widened: Vec<f32> = match dtype {
                    FloatType::F16 => bits.iter().map(|&h| f16::from_bits(h).to_f32()).collect(),
                    _ => bits.iter().map(|&h| bf16::from_bits(h).to_f32()).collect(),
                };
                assert_ne!(dtype, FloatType::F32);
                assert_eq!(widened, expected);
                // Bytes at an odd address are copied, to the same bits.
                let shifted = [&[0u8][..], &bytes].concat();
                let shifted = Table::stored("t", dtype, &shifted[1..], 2, 3).unwrap();
                assert_eq!(shifted.read_half(0..2).unwrap(), bits);
                assert_eq!(shifted.to_vec().unwrap(), expected);
            } else {
                assert_eq!(dtype, FloatType::F32);
            }
            assert!(Table::stored("t", dtype, &bytes[1..], 2, 3).is_err());
            let mut bad = bytes.clone();
            let size = dtype.bytes();
            bad[4 * size..5 * size].fill(0xff);
            let bad = Table::stored("tensor x", dtype, &bad, 2, 3).unwrap();
            assert_eq!(*bad.read(0..1).unwrap(), expected[..3]);
            let e = bad.read(1..2).unwrap_err().to_string();
            assert!(
                e.contains("tensor x") && e.contains("row 1, column 1"),
                "{e}"
            );
            if dtype != FloatType::F32 {
                assert_eq!(bad.read_half(1..2).unwrap_err().to_string(), e);
                assert!(bad.read_half(0..1).is_ok() && bad.read_half(1..3).is_err());
            }
        }
    }
}
