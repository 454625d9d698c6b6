//! Quantize-and-pack in one step: latent f32 weights to the GPU's 2-bit words.

use super::{WeightQuantOptions, weight_quant};
use crate::Result;
use crate::packing::gpu_words;

/// A ternary matrix in the GPU layout ([`gpu_words`]), as the shaders consume it.
#[derive(Clone, Debug, PartialEq)]
pub struct PackedTernary {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// `rows * words_per_row(cols)` words, 16 codes each.
    pub words: Vec<u32>,
    /// `W ≈ code / scale`; one value (per tensor) or `rows` values (per channel).
    pub scales: Vec<f32>,
}

/// Quantizes `w` (`[rows, cols]`, row-major) with [`weight_quant`] and packs the codes into GPU
/// words: what the `ternary_pack` shader does on the device, after every training step.
///
/// ```
/// use bitnet_wgpu::cpu::{WeightQuantOptions, ternary_pack};
/// let packed = ternary_pack(&[0.5, -2.0, 0.0], 1, 3, WeightQuantOptions::default())?;
/// assert_eq!(packed.words, [0x5555_5456]); // codes [1, -1, 0], the rest padding
/// assert_eq!(packed.scales, [1.2]);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn ternary_pack(
    w: &[f32],
    rows: usize,
    cols: usize,
    opts: WeightQuantOptions,
) -> Result<PackedTernary> {
    let ternary = weight_quant(w, rows, cols, opts)?;
    Ok(PackedTernary {
        rows,
        cols,
        words: gpu_words::pack(&ternary.codes, rows, cols)?,
        scales: ternary.scales,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::ScaleGranularity;
    use rand::{Rng, SeedableRng, rngs::SmallRng};

    #[test]
    fn equals_quantize_then_pack() {
        let mut rng = SmallRng::seed_from_u64(12);
        for case in 0..200 {
            let rows = [1, 3, 17][case % 3];
            let cols = [1, 15, 16, 17, 129][case % 5];
            let w: Vec<f32> = (0..rows * cols)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let opts = WeightQuantOptions {
                granularity: if case % 2 == 0 {
                    ScaleGranularity::PerTensor
                } else {
                    ScaleGranularity::PerChannel
                },
                threshold: 0.5,
            };
            let packed = ternary_pack(&w, rows, cols, opts).unwrap();
            let ternary = weight_quant(&w, rows, cols, opts).unwrap();
            assert_eq!(packed.scales, ternary.scales);
            assert_eq!(
                gpu_words::unpack(&packed.words, rows, cols).unwrap(),
                ternary.codes
            );
        }
    }

    #[test]
    fn bad_input_is_an_error() {
        let opts = WeightQuantOptions::default();
        assert!(ternary_pack(&[1.0; 3], 2, 2, opts).is_err());
        assert!(ternary_pack(&[f32::NAN], 1, 1, opts).is_err());
    }
}
