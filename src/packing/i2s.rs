//! GGUF `I2_S` (ggml type 36), bitnet.cpp's ternary tensor layout: 2 bits per weight and one f32
//! scale per tensor.
//!
//! The tensor, flattened row-major, is cut into blocks of 128 weights stored in 32 bytes: byte `j`
//! of a block holds `w[j] + 1` in bits 7-6, `w[32 + j] + 1` in bits 5-4, `w[64 + j] + 1` in bits
//! 3-2 and `w[96 + j] + 1` in bits 1-0. After the `n / 4` packed bytes come the scale (f32, little
//! endian) and zero padding, `n / 4 + 32` bytes in all.
//!
//! The scale follows bitnet.cpp's convention, `W ≈ code * scale`: it is the reciprocal of Hugging
//! Face's `weight_scale` and of [`crate::cpu::TernaryWeights::scales`] (`W ≈ code / scale`). Convert
//! with `1.0 / scale` when moving between the two.

use super::{check_len, code_of, has_three, stored_value};
use crate::{Error, Result};
use std::borrow::Cow;

/// Weights per block.
pub const BLOCK: usize = 128;
/// Weights per bit pair within a block (and bytes per block).
const LANE: usize = 32;
/// Bytes reserved after the packed codes for the scale and its padding.
const TRAILER: usize = 32;

/// Total bytes of an `I2_S` tensor of `n` weights (`n` a multiple of 128): `n / 4` packed bytes,
/// then 32 bytes holding the scale.
///
/// ```
/// assert_eq!(bitnet_wgpu::packing::i2s::byte_len(2560 * 2560), 1_638_432);
/// ```
pub fn byte_len(n: usize) -> usize {
    n / 4 + TRAILER
}

/// Errors unless `n` is a whole number of blocks.
fn check_blocks(n: usize) -> Result<()> {
    if n.is_multiple_of(BLOCK) {
        Ok(())
    } else {
        Err(Error::invalid(
            "I2_S weight count",
            format!("{n} is not a multiple of {BLOCK}"),
        ))
    }
}

/// The bit offset of `w[32 * lane + j]` within byte `j` of its block.
fn shift(lane: usize) -> usize {
    6 - 2 * lane
}

/// Packs `codes` (a flattened tensor, length a multiple of 128) and its bitnet.cpp-convention
/// `scale` (`W ≈ code * scale`) into [`byte_len`] bytes.
///
/// ```
/// use bitnet_wgpu::packing::i2s::{pack, unpack};
/// let mut codes = [0i8; 128];
/// codes[0] = 1; // value 2 in the top bits of byte 0; the other three weights are 0 (value 1)
/// let bytes = pack(&codes, 0.25)?;
/// assert_eq!(bytes[..2], [0b10_01_01_01, 0b01_01_01_01]);
/// assert_eq!(bytes[32..36], 0.25f32.to_le_bytes());
/// assert_eq!(unpack(&bytes, 128)?, (codes.to_vec(), 0.25));
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn pack(codes: &[i8], scale: f32) -> Result<Vec<u8>> {
    let n = codes.len();
    check_blocks(n)?;
    let mut bytes = vec![0u8; byte_len(n)];
    for (index, &code) in codes.iter().enumerate() {
        let (block, within) = (index / BLOCK, index % BLOCK);
        let (lane, j) = (within / LANE, within % LANE);
        bytes[block * LANE + j] |= stored_value(code, index)? << shift(lane);
    }
    bytes[n / 4..n / 4 + 4].copy_from_slice(&scale.to_le_bytes());
    Ok(bytes)
}

/// Unpacks `n` codes and the scale from bytes made by [`pack`], rejecting the value 3.
///
/// The 28 padding bytes after the scale are not inspected: writers are not known to zero them.
pub fn unpack(bytes: &[u8], n: usize) -> Result<(Vec<i8>, f32)> {
    let (packed, scale) = split(bytes, n)?;
    let codes = (0..n)
        .map(|index| {
            let (block, within) = (index / BLOCK, index % BLOCK);
            let (lane, j) = (within / LANE, within % LANE);
            code_of((packed[block * LANE + j] >> shift(lane)) & 0b11, index)
        })
        .collect::<Result<Vec<i8>>>()?;
    Ok((codes, scale))
}

/// The `n / 4` packed bytes of a tensor of `n` weights made by [`pack`] and its scale, unchecked.
pub fn split(bytes: &[u8], n: usize) -> Result<(&[u8], f32)> {
    check_blocks(n)?;
    check_len("I2_S bytes", byte_len(n), bytes.len())?;
    let (packed, trailer) = bytes.split_at(n / 4);
    let mut scale_bytes = [0u8; 4];
    scale_bytes.copy_from_slice(&trailer[..4]);
    Ok((packed, f32::from_le_bytes(scale_bytes)))
}

/// A matrix `[rows, cols]` of [`pack`]'s blocks whose rows are whole blocks (`cols` a multiple
/// of 128): row `r` is bytes `r * cols / 4..(r + 1) * cols / 4`, a layout engines can keep as it
/// is. Checked to hold codes only (no value 3).
///
/// ```
/// use bitnet_wgpu::packing::i2s::{BlockRows, pack, split};
/// let codes: Vec<i8> = (0..512).map(|i| (i % 3) as i8 - 1).collect();
/// let bytes = pack(&codes, 0.5)?;
/// let (packed, scale) = split(&bytes, 512)?;
/// let rows = BlockRows::new(packed, 2, 256)?;
/// assert_eq!((rows.rows(), rows.cols(), rows.bytes().len(), scale), (2, 256, 128, 0.5));
/// let mut bad = packed.to_vec();
/// bad[40] |= 0b11; // weight 96 + 8 of block 1: index 232
/// assert!(BlockRows::new(&bad, 2, 256).unwrap_err().to_string().contains("3 at index 232"));
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct BlockRows<'a> {
    rows: usize,
    cols: usize,
    bytes: Cow<'a, [u8]>,
}

impl<'a> BlockRows<'a> {
    /// The rows of `packed` (a tensor's packed bytes, as [`split`] gives them), with [`unpack`]'s
    /// error for a stored 3.
    pub fn new(packed: &'a [u8], rows: usize, cols: usize) -> Result<Self> {
        Self::from_bytes(Cow::Borrowed(packed), rows, cols)
    }

    /// Rows of bytes of its own made from a layout whose codes were checked as it was read (no
    /// value 3), so that only the shape is checked here.
    pub(super) fn from_checked_vec(
        packed: Vec<u8>,
        rows: usize,
        cols: usize,
    ) -> Result<BlockRows<'static>> {
        BlockRows::shaped(Cow::Owned(packed), rows, cols)
    }

    fn from_bytes(packed: Cow<'a, [u8]>, rows: usize, cols: usize) -> Result<Self> {
        check_codes(&packed)?;
        Self::shaped(packed, rows, cols)
    }

    /// `packed` as `rows` of `cols` weights, or an error where it is not that.
    fn shaped(packed: Cow<'a, [u8]>, rows: usize, cols: usize) -> Result<Self> {
        if cols == 0 || !cols.is_multiple_of(BLOCK) {
            return Err(Error::invalid(
                "I2_S row length",
                format!("{cols} is not a positive multiple of {BLOCK}"),
            ));
        }
        let expected = rows
            .checked_mul(cols / 4)
            .ok_or_else(|| Error::invalid("I2_S rows", format!("{rows} x {cols} overflows")))?;
        check_len("I2_S bytes", expected, packed.len())?;
        Ok(BlockRows {
            rows,
            cols,
            bytes: packed,
        })
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The packed bytes, row after row.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Whether every code is 0 (every stored value 1).
    pub fn is_zero(&self) -> bool {
        self.bytes.iter().all(|&b| b == 0b01_01_01_01)
    }
}

/// Errors unless every 2-bit field of `packed` (whole blocks) is 0, 1 or 2, naming the first
/// weight that is not as [`unpack`] does.
fn check_codes(packed: &[u8]) -> Result<()> {
    for (block, bytes) in packed.chunks_exact(LANE).enumerate() {
        if has_three(bytes) {
            // The lowest index first, as `unpack` meets them: lane by lane, then byte by byte.
            for lane in 0..4 {
                for (j, &b) in bytes.iter().enumerate() {
                    code_of((b >> shift(lane)) & 0b11, block * BLOCK + lane * LANE + j)?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::SmallRng};

    #[test]
    fn one_block_by_hand() {
        let mut codes = [0i8; 128];
        (codes[0], codes[32], codes[64], codes[96]) = (1, -1, 0, 1);
        (codes[1], codes[33], codes[65], codes[97]) = (-1, 1, 1, -1);
        codes[127] = -1;
        let bytes = pack(&codes, 0.5).unwrap();
        assert_eq!(bytes.len(), 64);
        // Byte 0: values 2, 0, 1, 2 at bits 7-6, 5-4, 3-2, 1-0 = 128 + 0 + 4 + 2.
        // Byte 1: values 0, 2, 2, 0 = 0 + 32 + 8 + 0. Untouched bytes hold four 1s: 0x55.
        // Byte 31 holds w[31], w[63], w[95], w[127] = 0, 0, 0, -1: 0x54.
        let mut expected = vec![0x55u8; 32];
        (expected[0], expected[1], expected[31]) = (134, 40, 0x54);
        expected.extend([0, 0, 0, 0x3f]); // 0.5f32 little endian
        expected.extend([0; 28]);
        assert_eq!(bytes, expected);
        assert_eq!(unpack(&expected, 128).unwrap(), (codes.to_vec(), 0.5));
    }

    #[test]
    fn random_round_trips() {
        let mut rng = SmallRng::seed_from_u64(8);
        for _ in 0..200 {
            let n = 128 * rng.random_range(0..9);
            let codes: Vec<i8> = (0..n).map(|_| rng.random_range(-1..=1)).collect();
            let scale: f32 = rng.random_range(1e-3..10.0);
            let bytes = pack(&codes, scale).unwrap();
            assert_eq!(bytes.len(), byte_len(n));
            assert_eq!(unpack(&bytes, n).unwrap(), (codes, scale));
        }
    }

    #[test]
    fn bad_input_is_an_error() {
        for n in [1, 3, 127, 129] {
            assert!(matches!(pack(&vec![0; n], 1.0), Err(Error::Invalid { .. })));
            assert!(matches!(unpack(&[0; 64], n), Err(Error::Invalid { .. })));
        }
        let mut codes = [0i8; 128];
        codes[5] = 2;
        assert!(matches!(pack(&codes, 1.0), Err(Error::Invalid { .. })));
        assert!(matches!(unpack(&[0; 63], 128), Err(Error::Shape { .. })));
        let mut bytes = pack(&[0; 128], 1.0).unwrap();
        bytes[7] = 0b01_11_01_01;
        assert!(matches!(unpack(&bytes, 128), Err(Error::Invalid { .. })));
    }

    #[test]
    fn block_rows_refuse_what_unpack_refuses_with_its_error() {
        let mut rng = SmallRng::seed_from_u64(9);
        let codes: Vec<i8> = (0..6 * 256).map(|_| rng.random_range(-1..=1)).collect();
        let bytes = pack(&codes, 1.0).unwrap();
        let packed = &bytes[..codes.len() / 4];
        let rows = BlockRows::new(packed, 6, 256).unwrap();
        assert_eq!((rows.rows(), rows.cols(), rows.bytes()), (6, 256, packed));
        assert!(!rows.is_zero());
        assert!(BlockRows::new(&[0x55; 32], 1, 128).unwrap().is_zero());
        for _ in 0..200 {
            let mut bad = bytes.clone();
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..packed.len());
                bad[at] |= 0b11 << (2 * rng.random_range(0..4));
            }
            let want = unpack(&bad, codes.len()).unwrap_err().to_string();
            let got = BlockRows::new(&bad[..packed.len()], 6, 256).unwrap_err();
            assert_eq!(got.to_string(), want);
        }
        assert!(BlockRows::new(packed, 3, 512).is_ok());
        assert!(matches!(
            BlockRows::new(packed, 6, 200),
            Err(Error::Invalid { .. })
        ));
        assert!(matches!(
            BlockRows::new(packed, 5, 256),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            BlockRows::new(&[], 0, 0),
            Err(Error::Invalid { .. })
        ));
    }
}
