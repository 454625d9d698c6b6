//! Layouts that store ternary codes {-1, 0, +1} densely, each with `pack` and its exact inverse
//! `unpack`.
//!
//! | layout | bits per weight | use |
//! | --- | --- | --- |
//! | [`gpu_words`] | 2 | this crate's GPU layout, arranged for `dot4I8Packed` |
//! | [`hf`] | 2 | Hugging Face's offline checkpoints (`microsoft/bitnet-b1.58-2B-4T`) |
//! | [`i2s`] | 2 (+32 bytes per tensor) | GGUF `I2_S` (bitnet.cpp) |
//! | [`base3`] | 1.6 | compact storage: 5 trits per byte |
//!
//! A ternary weight carries log2(3) ≈ 1.585 bits of information, the limit no layout beats; base-3
//! reaches 1.6 (99 % of it) at the price of a division-free but sequential decode, while the 2-bit
//! layouts waste one of four codes in exchange for shifts and masks. Against f32 that is 16x (2
//! bits) and 20x (1.6 bits) less memory.
//!
//! All the 2-bit layouts store `code + 1` (0 = -1, 1 = 0, 2 = +1); the value 3 is never written and
//! is rejected when read.

pub mod base3;
pub mod gpu_words;
pub mod hf;
pub mod i2s;

use crate::{Error, Result};

/// The stored value `code + 1` of a ternary code, rejecting anything outside -1..=1.
fn stored_value(code: i8, index: usize) -> Result<u8> {
    match code {
        -1..=1 => Ok((code + 1) as u8),
        _ => Err(Error::invalid(
            "ternary code",
            format!("{code} at index {index} is not -1, 0 or 1"),
        )),
    }
}

/// The ternary code of a stored 2-bit value, rejecting 3 (never written).
fn code_of(value: u8, index: usize) -> Result<i8> {
    match value {
        0..=2 => Ok(value as i8 - 1),
        _ => Err(Error::invalid(
            "packed ternary value",
            format!("{value} at index {index} is not 0, 1 or 2"),
        )),
    }
}

/// Whether a 2-bit field of `packed` (four per byte) holds 3: both its bits set, seen as the
/// high bits shifted onto the low ones and masked to the low bit of each field, eight bytes at a
/// time (a bit shifted across a byte lands on a high bit, which the mask drops).
fn has_three(packed: &[u8]) -> bool {
    const LOW_BITS: u64 = 0x5555_5555_5555_5555;
    let (words, rest) = packed.as_chunks::<8>();
    let threes = words.iter().fold(0, |acc, word| {
        let w = u64::from_le_bytes(*word);
        acc | (w & (w >> 1) & LOW_BITS)
    });
    threes != 0 || rest.iter().any(|&b| b & (b >> 1) & 0x55 != 0)
}

/// `rows * cols`, or an error where that overflows.
fn element_count(rows: usize, cols: usize) -> Result<usize> {
    rows.checked_mul(cols)
        .ok_or_else(|| Error::invalid("shape", format!("{rows} x {cols} overflows")))
}

/// Errors unless a buffer holds exactly `expected` elements.
fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(Error::shape(what, expected, got))
    }
}
