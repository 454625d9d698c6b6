//! Every packed-layout unpacker, and each pack as the exact inverse of its unpack: bytes an
//! unpack accepts pack back to the same bytes (I2_S's up to its unread padding). The input is the layout (first byte: 0 GPU words,
//! 1 Hugging Face, 2 I2_S, 3 base-3), the rows and columns (a byte each; I2_S and base-3 take
//! their product as the length), then the packed bytes.
#![no_main]

use bitnet_wgpu::packing::{base3, gpu_words, hf, i2s};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [layout, rows, cols, packed @ ..] = data else {
        return;
    };
    let (rows, cols) = (*rows as usize, *cols as usize);
    match layout % 4 {
        0 => {
            let words: Vec<u32> = packed
                .chunks_exact(4)
                .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
                .collect();
            if let Ok(codes) = gpu_words::unpack(&words, rows, cols) {
                assert_eq!(gpu_words::pack(&codes, rows, cols).unwrap(), words);
            }
        }
        1 => {
            if let Ok(codes) = hf::unpack(packed, rows, cols) {
                assert_eq!(hf::pack(&codes, rows, cols).unwrap(), packed);
            }
        }
        2 => {
            if let Ok((codes, scale)) = i2s::unpack(packed, rows * cols) {
                // The padding after the scale is not read (writers are not known to zero it).
                let read = rows * cols / 4 + 4;
                assert_eq!(i2s::pack(&codes, scale).unwrap()[..read], packed[..read]);
            }
        }
        _ => {
            if let Ok(codes) = base3::unpack(packed, rows * cols) {
                assert_eq!(base3::pack(&codes).unwrap(), packed);
            }
        }
    }
});
