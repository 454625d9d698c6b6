//! The two meanings a file's per-tensor ternary scale can have, and the exact conversion between
//! them. In memory ([`crate::cpu::TernaryWeights::scales`]) a scale is a divisor, `1 / mean|W|`
//! (`W ≈ codes / s`); the released 2B-4T's `weight_scale` (transformers' `AutoBitLinear`) and
//! GGUF's I2_S scale are multipliers, `mean|W|` (`W ≈ codes · m`).

/// The in-memory divisor of a file's multiplier: `1 / m`, one correctly rounded f32 division.
///
/// Against transformers' own product, `(x̂ · codesᵀ) · m`, the kernels compute
/// `acc / (s_x · (1 / m))`: the reciprocal adds at most half an ulp of relative error to the
/// scale, so an output differs by a few ulp at most, far below the int8 activation step.
pub fn divisor_of(multiplier: f32) -> f32 {
    1.0 / multiplier
}

/// The multiplier to write for an in-memory divisor `s`: the f32 nearest `1 / s` among those
/// whose reciprocal ([`divisor_of`]) is exactly `s`, or plain `1 / s` where no f32 has that
/// reciprocal. Every divisor [`crate::cpu::weight_quant`] computes is `1 / gamma` for an f32
/// `gamma`, so for those the round trip through a file is exact.
///
/// ```
/// use bitnet_wgpu::formats::scale::{divisor_of, multiplier_of};
/// for gamma in [1.5f32, 0.3, 7e-4, 1e-5] {
///     let s = 1.0 / gamma;
///     assert_eq!(divisor_of(multiplier_of(s)), s);
/// }
/// ```
pub fn multiplier_of(s: f32) -> f32 {
    let nearest = 1.0 / s;
    [0i32, -1, 1, -2, 2]
        .into_iter()
        .filter_map(|step| {
            nearest
                .to_bits()
                .checked_add_signed(step)
                .map(f32::from_bits)
        })
        .find(|&m| m.is_finite() && m > 0.0 && divisor_of(m) == s)
        .unwrap_or(nearest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::SmallRng};

    #[test]
    fn every_weight_quant_scale_round_trips() {
        let mut rng = SmallRng::seed_from_u64(3);
        for _ in 0..20_000 {
            let gamma: f32 = 10f32.powf(rng.random_range(-5.0..3.0));
            let s = 1.0f32 / gamma.max(1e-5);
            let m = multiplier_of(s);
            assert_eq!(divisor_of(m), s, "gamma {gamma}");
            assert!((m * s - 1.0).abs() < 1e-6);
        }
    }

    #[test]
    fn a_divisor_without_an_exact_reciprocal_gets_the_nearest() {
        // Scales written by other tools need not be reciprocals of an f32; count those that are
        // not, and check they still come within one ulp.
        let mut rng = SmallRng::seed_from_u64(4);
        let mut inexact = 0;
        for _ in 0..20_000 {
            let s: f32 = rng.random_range(0.5..2.0);
            let back = divisor_of(multiplier_of(s));
            if back != s {
                inexact += 1;
                assert!(
                    (back.to_bits() as i64 - s.to_bits() as i64).abs() <= 1,
                    "{s}"
                );
            }
        }
        assert!(inexact > 0, "some f32 are no f32's reciprocal");
    }
}
