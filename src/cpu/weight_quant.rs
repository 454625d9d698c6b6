use super::tree_sum;
use crate::{Error, Result};

/// How many absmean scales a ternary weight matrix carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ScaleGranularity {
    /// One scale for the whole matrix (the paper's default, and Hugging Face's format).
    #[default]
    PerTensor,
    /// One scale per output channel (row).
    PerChannel,
}

/// Options of [`weight_quant`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WeightQuantOptions {
    /// One scale for the matrix or one per output channel.
    pub granularity: ScaleGranularity,
    /// A weight becomes ±1 when `|w| * scale > threshold`, else 0. 0.5 is round-to-nearest
    /// (the paper); larger values give sparser matrices.
    pub threshold: f32,
}

impl Default for WeightQuantOptions {
    fn default() -> Self {
        WeightQuantOptions {
            granularity: ScaleGranularity::PerTensor,
            threshold: 0.5,
        }
    }
}

/// A ternary weight matrix `[rows = out_features, cols = in_features]` with its scale(s).
#[derive(Clone, Debug, PartialEq)]
pub struct TernaryWeights {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// `rows * cols` codes in {-1, 0, +1}, row-major.
    pub codes: Vec<i8>,
    /// Hugging Face's `weight_scale` convention: `1 / max(mean|W|, 1e-5)`, so that
    /// `W ≈ codes / scale`. One value (per tensor) or `rows` values (per channel).
    pub scales: Vec<f32>,
}

/// Quantizes a latent weight matrix `[rows, cols]` (row-major) to ternary codes with absmean
/// scaling: `gamma = mean|W|` per scale group, `scale = 1 / max(gamma, 1e-5)`, and a weight becomes
/// `sign(w)` when `|w * scale| > threshold`, else 0.
///
/// The mean uses [`tree_sum`] so the GPU's scale matches bit for bit. With the default threshold 0.5
/// this is exactly Hugging Face's `clamp(round(w * s), -1, 1)` (a tie at 0.5 rounds to even, 0).
/// Errors: a shape that disagrees with `w.len()`, an empty matrix, a NaN or infinity in `w`, a
/// threshold that is negative or not finite, and a group whose `sum|W|` overflows f32 (its scale
/// would be 0 and `codes / scale` meaningless).
///
/// ```
/// use bitnet_wgpu::cpu::{WeightQuantOptions, weight_quant};
/// // mean|W| = 0.5, so scale = 2 and w * scale = [0.5, -1.5, 1, 2, -0.5, -0.5].
/// let w = [0.25, -0.75, 0.5, 1.0, -0.25, -0.25];
/// let t = weight_quant(&w, 2, 3, WeightQuantOptions::default())?;
/// assert_eq!(t.codes, [0, -1, 1, 1, 0, 0]); // 0.5 is not above the threshold 0.5
/// assert_eq!(t.scales, [2.0]);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn weight_quant(
    w: &[f32],
    rows: usize,
    cols: usize,
    opts: WeightQuantOptions,
) -> Result<TernaryWeights> {
    if rows == 0 || cols == 0 {
        return Err(Error::Empty("weight matrix"));
    }
    let len = rows
        .checked_mul(cols)
        .ok_or_else(|| Error::invalid("weight shape", format!("{rows} x {cols} overflows")))?;
    if w.len() != len {
        return Err(Error::shape(
            "weights",
            format!("{rows} x {cols} = {len}"),
            w.len(),
        ));
    }
    if !(opts.threshold.is_finite() && opts.threshold >= 0.0) {
        return Err(Error::invalid(
            "threshold",
            format!("{} is not a finite value >= 0", opts.threshold),
        ));
    }
    if let Some(i) = w.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            what: "weights",
            row: i / cols,
            col: i % cols,
            value: w[i],
        });
    }
    let group_len = match opts.granularity {
        ScaleGranularity::PerTensor => len,
        ScaleGranularity::PerChannel => cols,
    };
    let mut codes = Vec::with_capacity(len);
    let mut scales = Vec::new();
    for group in w.chunks(group_len) {
        let scale = absmean_scale(group)?;
        codes.extend(
            group
                .iter()
                .map(|&v| ternary_code(v, scale, opts.threshold)),
        );
        scales.push(scale);
    }
    Ok(TernaryWeights {
        rows,
        cols,
        codes,
        scales,
    })
}

/// `1 / max(mean|W|, 1e-5)` over one scale group, erroring where the sum overflows.
fn absmean_scale(group: &[f32]) -> Result<f32> {
    let abs: Vec<f32> = group.iter().map(|v| v.abs()).collect();
    let gamma = tree_sum(&abs) / group.len() as f32;
    if !gamma.is_finite() {
        return Err(Error::invalid(
            "weights",
            "sum of |w| over a scale group overflows f32",
        ));
    }
    Ok(1.0f32 / gamma.max(1e-5))
}

/// The ternary code of one weight: its sign if `|w * scale|` exceeds the threshold, else 0.
fn ternary_code(w: f32, scale: f32, threshold: f32) -> i8 {
    let v = w * scale;
    if v.abs() > threshold {
        if v > 0.0 { 1 } else { -1 }
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::SmallRng};

    fn per_channel(threshold: f32) -> WeightQuantOptions {
        WeightQuantOptions {
            granularity: ScaleGranularity::PerChannel,
            threshold,
        }
    }

    #[test]
    fn default_threshold_equals_hugging_face_rounding() {
        let mut rng = SmallRng::seed_from_u64(11);
        for case in 0..200 {
            let rows = [1, 3, 15, 17][case % 4];
            let cols = [1, 3, 16, 127, 129][case % 5];
            let w: Vec<f32> = (0..rows * cols)
                .map(|_| rng.random_range(-0.1..0.1))
                .collect();
            for opts in [WeightQuantOptions::default(), per_channel(0.5)] {
                let t = weight_quant(&w, rows, cols, opts).unwrap();
                for (i, (&c, &v)) in t.codes.iter().zip(&w).enumerate() {
                    let s = if t.scales.len() == 1 {
                        t.scales[0]
                    } else {
                        t.scales[i / cols]
                    };
                    let hf = (v * s).round_ties_even().clamp(-1.0, 1.0) as i8;
                    assert_eq!(c, hf, "w={v} s={s}");
                }
            }
        }
    }

    #[test]
    fn ties_at_one_half_become_zero() {
        // mean|W| = 1, so scale = 1 and the 0.5 entries sit exactly on the threshold.
        let t = weight_quant(&[0.5, 1.5, -0.5, 1.5], 1, 4, WeightQuantOptions::default()).unwrap();
        assert_eq!(t.scales, [1.0]);
        assert_eq!(t.codes, [0, 1, 0, 1]);
    }

    #[test]
    fn scales_follow_the_granularity() {
        let w = [1.0, -1.0, 3.0, 0.0, 0.25, -0.25];
        let t = weight_quant(&w, 3, 2, per_channel(0.5)).unwrap();
        assert_eq!(t.scales, [1.0, 1.0 / 1.5, 4.0]);
        assert_eq!(t.codes, [1, -1, 1, 0, 1, -1]);
        let t = weight_quant(&w, 3, 2, WeightQuantOptions::default()).unwrap();
        assert_eq!(t.scales, [1.0 / (5.5 / 6.0)]);
        assert_eq!(t.codes, [1, -1, 1, 0, 0, 0]);
    }

    #[test]
    fn threshold_controls_sparsity() {
        let w = [0.2, -0.6, 1.0, 2.2];
        let codes = |threshold| {
            weight_quant(&w, 1, 4, per_channel(threshold))
                .unwrap()
                .codes
        };
        assert_eq!(codes(0.0), [1, -1, 1, 1]);
        assert_eq!(codes(0.5), [0, -1, 1, 1]);
        assert_eq!(codes(1.5), [0, 0, 0, 1]);
        assert_eq!(codes(10.0), [0; 4]);
    }

    #[test]
    fn all_zero_matrix_is_all_zero_codes() {
        let t = weight_quant(&[0.0; 6], 2, 3, WeightQuantOptions::default()).unwrap();
        assert_eq!(t.codes, [0; 6]);
        assert_eq!(t.scales, [1.0f32 / 1e-5]);
    }

    #[test]
    fn bad_input_is_an_error() {
        let ok = WeightQuantOptions::default();
        assert!(matches!(
            weight_quant(&[1.0; 5], 2, 3, ok),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(weight_quant(&[], 0, 3, ok), Err(Error::Empty(_))));
        assert!(matches!(weight_quant(&[], 3, 0, ok), Err(Error::Empty(_))));
        let nan = weight_quant(&[1.0, 2.0, 3.0, f32::NAN], 2, 2, ok);
        assert!(matches!(nan, Err(Error::NonFinite { row: 1, col: 1, .. })));
        let inf = weight_quant(&[f32::NEG_INFINITY, 1.0], 1, 2, ok);
        assert!(matches!(inf, Err(Error::NonFinite { row: 0, col: 0, .. })));
        for threshold in [-0.1, f32::NAN, f32::INFINITY] {
            let opts = WeightQuantOptions { threshold, ..ok };
            assert!(matches!(
                weight_quant(&[1.0], 1, 1, opts),
                Err(Error::Invalid { .. })
            ));
        }
        let huge = weight_quant(&[f32::MAX, f32::MAX], 1, 2, ok);
        assert!(matches!(huge, Err(Error::Invalid { .. })));
    }
}
