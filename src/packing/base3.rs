//! 1.6-bit storage: five ternary codes per byte as a base-3 number, for files and downloads where
//! size matters more than decode speed.
//!
//! A byte holds `sum_{i<5} (w_i + 1) * 3^i` over five consecutive weights (the first one least
//! significant), at most `3^5 - 1 = 242`. The last byte is padded with zero weights (value 1).

use super::{check_len, stored_value};
use crate::{Error, Result};

/// Codes per byte.
const TRITS: usize = 5;
/// The largest byte a valid packing contains: `3^5 - 1`.
const MAX_BYTE: u8 = 242;

/// Bytes for `n` codes: `ceil(n / 5)`.
///
/// ```
/// assert_eq!(bitnet_wgpu::packing::base3::byte_len(11), 3);
/// ```
pub fn byte_len(n: usize) -> usize {
    n.div_ceil(TRITS)
}

/// Packs codes five to a byte.
///
/// ```
/// use bitnet_wgpu::packing::base3::{pack, unpack};
/// let codes = [1, 1, 1, 1, 1, -1];
/// let bytes = pack(&codes)?;
/// assert_eq!(bytes, [242, 0 + 3 + 9 + 27 + 81]); // the second byte's padding is four zeros
/// assert_eq!(unpack(&bytes, 6)?, codes);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn pack(codes: &[i8]) -> Result<Vec<u8>> {
    codes
        .chunks(TRITS)
        .enumerate()
        .map(|(b, chunk)| {
            let mut byte = 0u8;
            for i in (0..TRITS).rev() {
                let value = match chunk.get(i) {
                    Some(&code) => stored_value(code, b * TRITS + i)?,
                    None => 1,
                };
                byte = byte * 3 + value;
            }
            Ok(byte)
        })
        .collect()
}

/// Unpacks `n` codes from bytes made by [`pack`], rejecting bytes above 242 and padding that is not
/// a zero weight.
pub fn unpack(bytes: &[u8], n: usize) -> Result<Vec<i8>> {
    check_len("base-3 bytes", byte_len(n), bytes.len())?;
    let mut codes = Vec::with_capacity(n);
    for (b, &byte) in bytes.iter().enumerate() {
        if byte > MAX_BYTE {
            return Err(Error::invalid(
                "base-3 byte",
                format!("{byte} at index {b} exceeds {MAX_BYTE}"),
            ));
        }
        let mut rest = byte;
        for i in 0..TRITS {
            let code = (rest % 3) as i8 - 1;
            rest /= 3;
            if b * TRITS + i < n {
                codes.push(code);
            } else if code != 0 {
                return Err(Error::invalid(
                    "base-3 padding",
                    format!("trit {i} of the last byte ({byte}) is not a zero weight"),
                ));
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
    fn one_byte_by_hand() {
        // Values 0, 1, 2, 2, 0: 0 * 1 + 1 * 3 + 2 * 9 + 2 * 27 + 0 * 81 = 75.
        assert_eq!(pack(&[-1, 0, 1, 1, -1]).unwrap(), [75]);
        assert_eq!(unpack(&[75], 5).unwrap(), [-1, 0, 1, 1, -1]);
        // One +1 and four padding zeros: 2 + 3 + 9 + 27 + 81 = 122.
        assert_eq!(pack(&[1]).unwrap(), [122]);
        assert_eq!(pack(&[-1; 5]).unwrap(), [0]);
        assert!(pack(&[]).unwrap().is_empty());
    }

    #[test]
    fn random_round_trips() {
        let mut rng = SmallRng::seed_from_u64(10);
        for case in 0..200 {
            let n = [0, 1, 3, 4, 5, 6, 15, 17, 127, 129][case % 10] + rng.random_range(0..3);
            let codes: Vec<i8> = (0..n).map(|_| rng.random_range(-1..=1)).collect();
            let bytes = pack(&codes).unwrap();
            assert_eq!(bytes.len(), byte_len(n));
            assert!(bytes.iter().all(|&b| b <= MAX_BYTE));
            assert_eq!(unpack(&bytes, n).unwrap(), codes);
        }
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(matches!(
            pack(&[0, 0, 0, 0, 0, 0, -2]),
            Err(Error::Invalid { .. })
        ));
        assert!(matches!(unpack(&[0, 0], 5), Err(Error::Shape { .. })));
        assert!(matches!(unpack(&[243], 5), Err(Error::Invalid { .. })));
        assert!(matches!(unpack(&[255], 1), Err(Error::Invalid { .. })));
        // 75 decodes to [-1, 0, 1, 1, -1]: as 2 codes its padding trits are not zero weights.
        assert!(matches!(unpack(&[75], 2), Err(Error::Invalid { .. })));
        assert_eq!(unpack(&[121], 1).unwrap(), [0]);
    }
}
