//! Hugging Face's offline BitNet layout (`microsoft/bitnet-b1.58-2B-4T`): a `[out, in]` ternary
//! matrix stored as `uint8` of shape `[out / 4, in]`.
//!
//! The matrix is cut into four contiguous quarters of `out / 4` rows; byte `(r, c)` holds
//! `code[i * out / 4 + r][c] + 1` in bits `2i..2i + 2` (least significant first) for `i = 0..4`.
//! The format has no padding, so `out` must be a multiple of 4. The checkpoint's `weight_scale` is
//! the same convention as [`crate::cpu::TernaryWeights::scales`] (`W = code / weight_scale`).

use super::i2s::{BLOCK, BlockRows};
use super::{check_len, code_of, element_count, has_three, stored_value};
use crate::{Error, Result};

/// Rows of each quarter, or an error where `rows` is not a multiple of 4.
fn quarter(rows: usize) -> Result<usize> {
    if rows.is_multiple_of(4) {
        Ok(rows / 4)
    } else {
        Err(Error::invalid(
            "Hugging Face packed rows",
            format!("{rows} is not a multiple of 4"),
        ))
    }
}

/// Packs `rows = out_features` by `cols = in_features` row-major codes into `rows / 4 * cols`
/// bytes, shape `[rows / 4, cols]` row-major.
///
/// ```
/// use bitnet_wgpu::packing::hf::{pack, unpack};
/// let codes = [1, 0, -1, 1]; // out = 4, in = 1
/// let bytes = pack(&codes, 4, 1)?;
/// assert_eq!(bytes, [0b10_00_01_10]);
/// assert_eq!(unpack(&bytes, 4, 1)?, codes);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn pack(codes: &[i8], rows: usize, cols: usize) -> Result<Vec<u8>> {
    check_len("ternary codes", element_count(rows, cols)?, codes.len())?;
    let q = quarter(rows)?;
    let mut bytes = vec![0u8; q * cols];
    for (index, &code) in codes.iter().enumerate() {
        let (row, col) = (index / cols, index % cols);
        let (i, r) = (row / q, row % q);
        bytes[r * cols + col] |= stored_value(code, index)? << (2 * i);
    }
    Ok(bytes)
}

/// Unpacks `[rows / 4, cols]` bytes made by [`pack`] into `rows * cols` row-major codes, rejecting
/// the value 3.
pub fn unpack(bytes: &[u8], rows: usize, cols: usize) -> Result<Vec<i8>> {
    let q = quarter(rows)?;
    check_len(
        "Hugging Face packed bytes",
        element_count(q, cols)?,
        bytes.len(),
    )?;
    (0..element_count(rows, cols)?)
        .map(|index| {
            let (row, col) = (index / cols, index % cols);
            let (i, r) = (row / q, row % q);
            code_of((bytes[r * cols + col] >> (2 * i)) & 0b11, index)
        })
        .collect()
}

/// The matrix of [`pack`]'s bytes as I2_S rows ([`BlockRows`], `cols` a multiple of 128):
/// equal to [`crate::packing::i2s::pack`] of [`unpack`]'s codes row by row, made a block at a
/// time from the stored values as they lie (both layouts store `code + 1` in 2 bits), and with
/// [`unpack`]'s error for a stored 3.
///
/// ```
/// use bitnet_wgpu::packing::{hf, i2s};
/// let codes: Vec<i8> = (0..4 * 128).map(|i| (i % 3) as i8 - 1).collect();
/// let rows = hf::to_block_rows(&hf::pack(&codes, 4, 128)?, 4, 128)?;
/// assert_eq!(rows.bytes(), &i2s::pack(&codes, 1.0)?[..4 * 32]);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn to_block_rows(bytes: &[u8], rows: usize, cols: usize) -> Result<BlockRows<'static>> {
    let q = quarter(rows)?;
    check_len(
        "Hugging Face packed bytes",
        element_count(q, cols)?,
        bytes.len(),
    )?;
    if !cols.is_multiple_of(BLOCK) {
        return Err(Error::invalid(
            "I2_S row length",
            format!("{cols} is not a multiple of {BLOCK}"),
        ));
    }
    // Checked here, as they lie, so that a 3 is named at its index in this layout.
    if has_three(bytes) {
        unpack(bytes, rows, cols)?;
    }
    let row_bytes = cols / 4;
    let mut out = vec![0u8; rows * row_bytes];
    for (r, src) in bytes.chunks_exact(cols.max(1)).enumerate() {
        // Row `i * q + r` is field `i` of source row `r`.
        for i in 0..4 {
            let dst = &mut out[(i * q + r) * row_bytes..][..row_bytes];
            let shift = 2 * i;
            for (dst, src) in dst.chunks_exact_mut(BLOCK / 4).zip(src.chunks_exact(BLOCK)) {
                let (a, rest) = src.split_at(32);
                let (b, rest) = rest.split_at(32);
                let (c, d) = rest.split_at(32);
                // Whole slices of 32: the loop runs a vector at a time.
                for ((((o, &a), &b), &c), &d) in dst.iter_mut().zip(a).zip(b).zip(c).zip(d) {
                    let v = |x: u8| (x >> shift) & 0b11;
                    *o = v(a) << 6 | v(b) << 4 | v(c) << 2 | v(d);
                }
            }
        }
    }
    BlockRows::from_checked_vec(out, rows, cols)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::SmallRng};

    #[test]
    fn four_rows_two_columns_by_hand() {
        // Rows: [-1, 1], [0, 0], [1, -1], [1, 0]; one quarter row, so byte c stacks column c.
        let codes = [-1, 1, 0, 0, 1, -1, 1, 0];
        // Column 0: values 0, 1, 2, 2 -> 0 + 4 + 32 + 128; column 1: 2, 1, 0, 1 -> 2 + 4 + 0 + 64.
        let expected = [164, 70];
        assert_eq!(pack(&codes, 4, 2).unwrap(), expected);
        assert_eq!(unpack(&expected, 4, 2).unwrap(), codes);
    }

    #[test]
    fn eight_rows_one_column_by_hand() {
        let codes = [1, -1, 0, 1, -1, -1, 1, 0];
        // Byte 0 holds rows 0, 2, 4, 6 (values 2, 1, 0, 2) -> 2 + 4 + 0 + 128;
        // byte 1 holds rows 1, 3, 5, 7 (values 0, 2, 0, 1) -> 0 + 8 + 0 + 64.
        let expected = [134, 72];
        assert_eq!(pack(&codes, 8, 1).unwrap(), expected);
        assert_eq!(unpack(&expected, 8, 1).unwrap(), codes);
    }

    #[test]
    fn random_round_trips() {
        let mut rng = SmallRng::seed_from_u64(6);
        for case in 0..200 {
            let rows = 4 * rng.random_range(1..6);
            let cols = [1, 3, 15, 17, 127, 129][case % 6];
            let codes: Vec<i8> = (0..rows * cols).map(|_| rng.random_range(-1..=1)).collect();
            let bytes = pack(&codes, rows, cols).unwrap();
            assert_eq!(bytes.len(), rows / 4 * cols);
            assert_eq!(unpack(&bytes, rows, cols).unwrap(), codes);
        }
    }

    #[test]
    fn block_rows_equal_the_codes_packed_as_i2s() {
        let mut rng = SmallRng::seed_from_u64(7);
        for (rows, cols) in [(4, 128), (12, 384), (8, 256)] {
            let codes: Vec<i8> = (0..rows * cols).map(|_| rng.random_range(-1..=1)).collect();
            let bytes = pack(&codes, rows, cols).unwrap();
            let got = to_block_rows(&bytes, rows, cols).unwrap();
            let want = crate::packing::i2s::pack(&codes, 1.0).unwrap();
            assert_eq!((got.rows(), got.cols()), (rows, cols));
            assert_eq!(got.bytes(), &want[..rows * cols / 4]);
        }
        let mut bytes = pack(&[0; 8 * 128], 8, 128).unwrap();
        bytes[130] = 0b00_11_01_01; // field 2 of (1, 2): row 2 * 2 + 1 = 5, column 2
        let e = to_block_rows(&bytes, 8, 128).unwrap_err().to_string();
        assert!(e.contains(&format!("at index {}", 5 * 128 + 2)), "{e}");
        assert!(to_block_rows(&bytes[..1], 8, 128).is_err());
        assert!(to_block_rows(&[0x55; 4 * 100], 16, 100).is_err());
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(matches!(pack(&[0; 6], 6, 1), Err(Error::Invalid { .. })));
        assert!(matches!(pack(&[0; 7], 4, 2), Err(Error::Shape { .. })));
        assert!(matches!(
            pack(&[0, 0, 5, 0], 4, 1),
            Err(Error::Invalid { .. })
        ));
        assert!(matches!(unpack(&[0; 3], 4, 2), Err(Error::Shape { .. })));
        assert!(matches!(unpack(&[0; 3], 3, 3), Err(Error::Invalid { .. })));
        assert!(matches!(
            unpack(&[0b11_00_00_00], 4, 1),
            Err(Error::Invalid { .. })
        ));
    }
}
