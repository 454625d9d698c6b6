//! Root-mean-square normalization, as Hugging Face's `BitNetRMSNorm` computes it in f32.

use super::tree_sum;
use crate::{Error, Result};

/// Normalizes each of `rows` rows of `x` (row length `weight.len()`) to unit root mean square and
/// scales it by `weight`:
///
/// `y[r, i] = (x[r, i] * (1 / sqrt(tree_sum(x[r, ..]²) / n + eps))) * weight[i]`
///
/// This is `BitNetRMSNorm` in f32: the mean of squares, `rsqrt(mean + eps)` (eps inside the root),
/// the product with `x`, and the weight multiplied last. The sum of squares uses [`tree_sum`], the
/// order of the GPU's workgroup reduction, so that the mean agrees with the shader bit for bit;
/// `1 / sqrt` is spelled out because WGSL's `inverseSqrt` is not correctly rounded.
///
/// ```
/// use bitnet_wgpu::cpu::rmsnorm;
/// // mean([3², 4²]) = 12.5; 3 / sqrt(12.5) = 0.8485..., 4 / sqrt(12.5) = 1.1313...
/// let y = rmsnorm(&[3.0, 4.0], 1, &[1.0, 2.0], 0.0)?;
/// assert!((y[0] - 0.848_528_1).abs() < 1e-6 && (y[1] - 2.262_741_7).abs() < 1e-6);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn rmsnorm(x: &[f32], rows: usize, weight: &[f32], eps: f32) -> Result<Vec<f32>> {
    let cols = weight.len();
    if cols == 0 {
        return Err(Error::Empty("rmsnorm weight"));
    }
    if rows.checked_mul(cols) != Some(x.len()) {
        return Err(Error::shape(
            "rmsnorm input",
            format!("{rows} x {cols}"),
            x.len(),
        ));
    }
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks_exact(cols) {
        let squares: Vec<f32> = row.iter().map(|&v| v * v).collect();
        let mean = tree_sum(&squares) / cols as f32;
        let inv_rms = 1.0 / (mean + eps).sqrt();
        y.extend(row.iter().zip(weight).map(|(&v, &w)| (v * inv_rms) * w));
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_four_by_hand() {
        // mean of squares 12.5, eps 0.5 -> rms sqrt(13) exactly as the formula states.
        let y = rmsnorm(&[3.0, 4.0, 0.0, 0.0], 2, &[1.0, -1.0], 0.5).unwrap();
        let r = 13f32.sqrt();
        assert!((y[0] - 3.0 / r).abs() < 1e-6);
        assert!((y[1] + 4.0 / r).abs() < 1e-6);
        // An all-zero row stays zero (eps keeps it finite).
        assert_eq!(&y[2..], [0.0, 0.0]);
    }

    #[test]
    fn unit_rms_rows_are_kept() {
        let x = [1.0, -1.0, 1.0, -1.0];
        assert_eq!(rmsnorm(&x, 1, &[1.0; 4], 0.0).unwrap(), x);
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(matches!(
            rmsnorm(&[1.0; 5], 2, &[1.0; 3], 1e-5),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(rmsnorm(&[], 0, &[], 1e-5), Err(Error::Empty(_))));
        assert!(rmsnorm(&[], 0, &[1.0], 1e-5).unwrap().is_empty());
    }
}
