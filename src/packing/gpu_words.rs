//! This crate's GPU layout: 16 ternary codes per `u32`, interleaved so that one shift and one mask
//! yield four int8 lanes ready for WGSL's `dot4I8Packed`.
//!
//! Word `j` of row `n` holds the codes of columns `k = 16j + l`, `l = 0..16`. With `t = l / 4` and
//! `i = l % 4`, the value `code + 1` sits at bit `8i + 2t`. So `(word >> 2t) & 0x03030303` is four
//! bytes holding `w + 1` for `k = 16j + 4t + i`, `i = 0..4`: the shader multiplies them against four
//! consecutive int8 activations and subtracts `sum(x)` (see [`crate::cpu::ternary_matmul_acc`]).
//! Each row starts on a fresh word; columns past the end hold value 1 (a zero weight), so padding
//! adds nothing to a dot product.

use super::{check_len, code_of, element_count, stored_value};
use crate::{Error, Result};

/// Codes per word.
const CODES_PER_WORD: usize = 16;
/// Every 2-bit field set to 1: a word of zero weights, the padding.
const ZERO_WORD: u32 = 0x5555_5555;

/// Words per row: rows are padded to a whole word so that each row starts word-aligned.
///
/// ```
/// use bitnet_wgpu::packing::gpu_words::words_per_row;
/// assert_eq!(words_per_row(2560), 160);
/// assert_eq!(words_per_row(17), 2);
/// ```
pub fn words_per_row(cols: usize) -> usize {
    cols.div_ceil(CODES_PER_WORD)
}

/// The bit offset of column `l` (0..16) within its word.
fn shift(l: usize) -> usize {
    8 * (l % 4) + 2 * (l / 4)
}

/// Packs `rows * cols` row-major codes into `rows * words_per_row(cols)` words.
///
/// ```
/// use bitnet_wgpu::packing::gpu_words::{pack, unpack};
/// let codes = [1, -1, 0];
/// let words = pack(&codes, 1, 3)?;
/// assert_eq!(words, [0x5555_5456]); // 2 at bits 0-1, 0 at bits 8-9, 1 at bits 16-17
/// assert_eq!(unpack(&words, 1, 3)?, codes);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn pack(codes: &[i8], rows: usize, cols: usize) -> Result<Vec<u32>> {
    check_len("ternary codes", element_count(rows, cols)?, codes.len())?;
    let per_row = words_per_row(cols);
    let mut words = vec![ZERO_WORD; rows * per_row];
    if cols == 0 {
        return Ok(words);
    }
    for (r, (row, row_words)) in codes
        .chunks_exact(cols)
        .zip(words.chunks_exact_mut(per_row))
        .enumerate()
    {
        for (j, (chunk, word)) in row.chunks(CODES_PER_WORD).zip(row_words).enumerate() {
            for (l, &code) in chunk.iter().enumerate() {
                let value = stored_value(code, r * cols + j * CODES_PER_WORD + l)?;
                *word = (*word & !(0b11 << shift(l))) | (u32::from(value) << shift(l));
            }
        }
    }
    Ok(words)
}

/// Unpacks words made by [`pack`], rejecting value 3 and padding that is not a zero weight.
pub fn unpack(words: &[u32], rows: usize, cols: usize) -> Result<Vec<i8>> {
    let per_row = words_per_row(cols);
    check_len("packed words", element_count(rows, per_row)?, words.len())?;
    let mut codes = Vec::with_capacity(rows * cols);
    for (r, row_words) in words.chunks_exact(per_row.max(1)).enumerate() {
        for (j, &word) in row_words.iter().enumerate() {
            for l in 0..CODES_PER_WORD {
                let value = ((word >> shift(l)) & 0b11) as u8;
                let k = j * CODES_PER_WORD + l;
                if k < cols {
                    codes.push(code_of(value, r * cols + k)?);
                } else if value != 1 {
                    return Err(Error::invalid(
                        "packed words",
                        format!("padding of row {r}, column {k} holds {value}, not 1"),
                    ));
                }
            }
        }
    }
    Ok(codes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::SmallRng};

    #[test]
    fn one_full_word_by_hand() {
        let codes = [1, 0, -1, 0, -1, -1, 1, 1, 0, 0, 0, 1, 1, -1, 0, -1];
        // Byte i holds l = i, i + 4, i + 8, i + 12 at bits 0, 2, 4, 6 (values code + 1):
        // byte 0: 2, 0, 1, 2 = 0x92; byte 1: 1, 0, 1, 0 = 0x11;
        // byte 2: 0, 2, 1, 1 = 0x58; byte 3: 1, 2, 2, 0 = 0x29.
        assert_eq!(pack(&codes, 1, 16).unwrap(), [0x2958_1192]);
        assert_eq!(unpack(&[0x2958_1192], 1, 16).unwrap(), codes);
    }

    #[test]
    fn mask_gives_four_consecutive_lanes() {
        let mut rng = SmallRng::seed_from_u64(2);
        let codes: Vec<i8> = (0..16).map(|_| rng.random_range(-1..=1)).collect();
        let word = pack(&codes, 1, 16).unwrap()[0];
        for t in 0..4 {
            let lanes = ((word >> (2 * t)) & 0x0303_0303).to_le_bytes();
            for (i, &lane) in lanes.iter().enumerate() {
                assert_eq!(lane as i8 - 1, codes[4 * t + i]);
            }
        }
    }

    #[test]
    fn padding_is_zero_weight() {
        assert_eq!(pack(&[1], 1, 1).unwrap(), [0x5555_5556]);
        assert_eq!(pack(&[0; 17], 1, 17).unwrap(), [ZERO_WORD; 2]);
        assert!(pack(&[], 3, 0).unwrap().is_empty());
    }

    #[test]
    fn random_round_trips() {
        let mut rng = SmallRng::seed_from_u64(4);
        for case in 0..200 {
            let rows = rng.random_range(1..4);
            let cols = [1, 3, 15, 16, 17, 31, 127, 129][case % 8];
            let codes: Vec<i8> = (0..rows * cols).map(|_| rng.random_range(-1..=1)).collect();
            let words = pack(&codes, rows, cols).unwrap();
            assert_eq!(words.len(), rows * words_per_row(cols));
            assert_eq!(unpack(&words, rows, cols).unwrap(), codes);
        }
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(matches!(pack(&[0; 3], 2, 2), Err(Error::Shape { .. })));
        assert!(matches!(pack(&[0, 2], 1, 2), Err(Error::Invalid { .. })));
        assert!(matches!(pack(&[-2], 1, 1), Err(Error::Invalid { .. })));
        assert!(matches!(
            unpack(&[ZERO_WORD; 3], 2, 17),
            Err(Error::Shape { .. })
        ));
        // Value 3 in a used field, and padding that is not 1.
        assert!(matches!(
            unpack(&[ZERO_WORD | 0b11], 1, 1),
            Err(Error::Invalid { .. })
        ));
        assert_eq!(unpack(&[0x5555_5554], 1, 1).unwrap(), [-1]);
        assert!(matches!(
            unpack(&[0x5555_5515], 1, 1),
            Err(Error::Invalid { .. })
        ));
    }
}
