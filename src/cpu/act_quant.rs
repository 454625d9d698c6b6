use crate::{Error, Result};

/// Int8 activations quantized per row (token) with absmax scaling.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedActivations {
    /// Number of rows (tokens).
    pub rows: usize,
    /// Number of columns (features) per row.
    pub cols: usize,
    /// `rows * cols` codes in [-128, 127], row-major.
    pub codes: Vec<i8>,
    /// One scale per row: `127 / max(max|x|, 1e-5)`; NaN for a row that holds a NaN or infinity.
    pub scales: Vec<f32>,
    /// One sum of codes per row (the ternary matmul subtracts it, see `ternary_matmul_acc`).
    pub sums: Vec<i32>,
}

/// The absmax scale of one row: `127 / max(amax, 1e-5)`, as one IEEE f32 division.
///
/// The floor of `1e-5` keeps an all-zero row finite (its codes are all 0), exactly like the
/// reference implementations; the shader computes the same expression so both sides agree bit for
/// bit.
///
/// ```
/// use bitnet_wgpu::cpu::quant_scale;
/// assert_eq!(quant_scale(127.0), 1.0);
/// assert_eq!(quant_scale(0.0), 127.0 / 1e-5);
/// ```
pub fn quant_scale(amax: f32) -> f32 {
    127.0f32 / amax.max(1e-5)
}

/// Quantizes `rows` rows of `cols` activations to int8 with one absmax scale per row (token).
///
/// Rounding is half-to-even (`round_ties_even`), as in torch and WGSL's `round`, so that the codes
/// match both bit for bit. A row holding a NaN or an infinity gets codes 0, sum 0 and scale NaN:
/// its outputs downstream are NaN, as they would be in torch, instead of silently finite.
///
/// ```
/// use bitnet_wgpu::cpu::act_quant;
/// let q = act_quant(&[1.0, -0.5, 0.25, 0.0], 1, 4)?;
/// assert_eq!(q.codes, [127, -64, 32, 0]); // -63.5 rounds to the even -64
/// assert_eq!(q.sums, [95]);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn act_quant(x: &[f32], rows: usize, cols: usize) -> Result<QuantizedActivations> {
    if cols == 0 {
        return Err(Error::Empty("activation row"));
    }
    let len = rows
        .checked_mul(cols)
        .ok_or_else(|| Error::invalid("activation shape", format!("{rows} x {cols} overflows")))?;
    if x.len() != len {
        return Err(Error::shape(
            "activations",
            format!("{rows} x {cols} = {len}"),
            x.len(),
        ));
    }
    let mut codes = Vec::with_capacity(len);
    let mut scales = Vec::with_capacity(rows);
    let mut sums = Vec::with_capacity(rows);
    for row in x.chunks_exact(cols) {
        let (row_codes, scale) = quantize_row(row);
        sums.push(row_codes.iter().map(|&c| i32::from(c)).sum());
        codes.extend(row_codes);
        scales.push(scale);
    }
    Ok(QuantizedActivations {
        rows,
        cols,
        codes,
        scales,
        sums,
    })
}

/// One row's codes and scale; a non-finite row gives zero codes and a NaN scale.
fn quantize_row(row: &[f32]) -> (Vec<i8>, f32) {
    if row.iter().any(|v| !v.is_finite()) {
        return (vec![0; row.len()], f32::NAN);
    }
    let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let scale = quant_scale(amax);
    let codes = row
        .iter()
        .map(|&v| (v * scale).round_ties_even().clamp(-128.0, 127.0) as i8)
        .collect();
    (codes, scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::SmallRng};

    #[test]
    fn all_zero_row_has_zero_codes() {
        let q = act_quant(&[0.0; 5], 1, 5).unwrap();
        assert_eq!(q.codes, [0; 5]);
        assert_eq!(q.sums, [0]);
        assert_eq!(q.scales, [127.0f32 / 1e-5]);
    }

    #[test]
    fn non_finite_row_gives_nan_scale_and_zero_codes() {
        let x = [1.0, 2.0, f32::NAN, 3.0, f32::INFINITY, 1.0, 2.0, 4.0, -4.0];
        let q = act_quant(&x, 3, 3).unwrap();
        assert_eq!(q.codes[..6], [0; 6]);
        assert_eq!(q.sums[..2], [0, 0]);
        assert!(q.scales[0].is_nan() && q.scales[1].is_nan());
        assert_eq!(q.codes[6..], [64, 127, -127]);
        assert_eq!(q.scales[2], 127.0 / 4.0);
    }

    #[test]
    fn half_way_cases_round_to_even() {
        // amax = 127 gives scale exactly 1, so x * s is x itself.
        let q = act_quant(&[127.0, 2.5, 3.5, -2.5, 0.5, -1.5], 1, 6).unwrap();
        assert_eq!(q.scales, [1.0]);
        assert_eq!(q.codes, [127, 2, 4, -2, 0, -2]);
        assert_eq!(q.sums, [129]);
    }

    #[test]
    fn extreme_magnitudes_stay_in_range() {
        for magnitude in [1e30f32, 1e-30, f32::MAX, f32::MIN_POSITIVE, 1e-45] {
            let x = [magnitude, -magnitude, magnitude * 0.25, 0.0];
            let q = act_quant(&x, 1, 4).unwrap();
            assert!(q.scales[0].is_finite() && q.scales[0] > 0.0);
            if magnitude >= 1.0 {
                assert_eq!(q.codes, [127, -127, 32, 0]);
            } else {
                assert_eq!(q.codes, [0; 4]);
            }
        }
    }

    #[test]
    fn random_rows_match_definition() {
        let mut rng = SmallRng::seed_from_u64(7);
        for case in 0..200 {
            let rows = rng.random_range(0..5);
            let cols = [1, 3, 15, 17, 127, 129][case % 6];
            let range = 10f32.powi(rng.random_range(-6..6));
            let x: Vec<f32> = (0..rows * cols)
                .map(|_| rng.random_range(-range..=range))
                .collect();
            let q = act_quant(&x, rows, cols).unwrap();
            assert_eq!(
                (q.codes.len(), q.scales.len(), q.sums.len()),
                (x.len(), rows, rows)
            );
            for (r, row) in x.chunks(cols).enumerate() {
                let amax = row.iter().map(|v| v.abs()).fold(0.0, f32::max);
                assert_eq!(q.scales[r], quant_scale(amax));
                let codes = &q.codes[r * cols..(r + 1) * cols];
                for (&c, &v) in codes.iter().zip(row) {
                    // Within half a step of x * s, and never beyond ±127 (the row's own amax).
                    let exact = f64::from(v) * f64::from(q.scales[r]);
                    assert!((f64::from(c) - exact).abs() <= 0.5 + 1e-4, "{c} vs {exact}");
                    assert!((-127..=127).contains(&c));
                }
                assert_eq!(q.sums[r], codes.iter().map(|&c| i32::from(c)).sum::<i32>());
            }
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(matches!(
            act_quant(&[1.0; 5], 2, 3),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(act_quant(&[], 2, 0), Err(Error::Empty(_))));
        assert!(act_quant(&[], usize::MAX, 2).is_err());
        let empty = act_quant(&[], 0, 4).unwrap();
        assert!(empty.codes.is_empty() && empty.scales.is_empty() && empty.sums.is_empty());
    }
}
