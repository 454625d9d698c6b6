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
/// Non-finite values follow IEEE, as in torch: a NaN makes every output of its row NaN, and an
/// infinity (`1 / sqrt(inf) = 0`) gives NaN for itself and signed zeros for the row's finite
/// values. The shaders follow the same rule.
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
    let mut y = vec![0.0; x.len()];
    rmsnorm_rows(x, weight, eps, &mut y);
    Ok(y)
}

/// [`rmsnorm`]'s arithmetic on whole rows of `weight.len()` values, into `y` (as long as `x`):
/// shared with the CPU engine, which runs it on a part of the rows per thread.
pub(crate) fn rmsnorm_rows(x: &[f32], weight: &[f32], eps: f32, y: &mut [f32]) {
    let cols = weight.len();
    let mut squares = Vec::with_capacity(cols);
    for (row, y) in x.chunks_exact(cols).zip(y.chunks_exact_mut(cols)) {
        squares.clear();
        squares.extend(row.iter().map(|&v| v * v));
        let mean = tree_sum(&squares) / cols as f32;
        let inv_rms = 1.0 / (mean + eps).sqrt();
        for ((y, &v), &w) in y.iter_mut().zip(row).zip(weight) {
            *y = (v * inv_rms) * w;
        }
    }
}

/// The gradients of [`rmsnorm`]: `(dx, dweight)` for the upstream gradient `dy` (`[rows, n]`).
///
/// With `r = 1 / sqrt(mean(x²) + eps)` per row and `g = dy * weight`:
/// `dx[i] = r * g[i] - r³ * x[i] * (g · x) / n` (the second term is the path through `r`), and
/// `dweight[i] = sum over rows of dy[i] * x[i] * r`. The mean of squares is formed exactly as the
/// forward forms it.
///
/// ```
/// use bitnet_wgpu::cpu::rmsnorm_backward;
/// // A gradient along x itself is blocked by the norm (the output does not grow with |x|).
/// let (dx, dw) = rmsnorm_backward(&[3.0, 4.0], 1, &[1.0, 1.0], 0.0, &[3.0, 4.0])?;
/// assert!(dx.iter().all(|v| v.abs() < 1e-6));
/// assert!((dw[0] - 9.0 / 12.5f32.sqrt()).abs() < 1e-5);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn rmsnorm_backward(
    x: &[f32],
    rows: usize,
    weight: &[f32],
    eps: f32,
    dy: &[f32],
) -> Result<(Vec<f32>, Vec<f32>)> {
    let cols = weight.len();
    if cols == 0 {
        return Err(Error::Empty("rmsnorm weight"));
    }
    if rows.checked_mul(cols) != Some(x.len()) || dy.len() != x.len() {
        return Err(Error::shape(
            "rmsnorm_backward input and gradient",
            format!("{rows} x {cols} each"),
            format!("{} and {}", x.len(), dy.len()),
        ));
    }
    let mut dx = Vec::with_capacity(x.len());
    let mut dweight = vec![0.0f32; cols];
    for (row, dy_row) in x.chunks_exact(cols).zip(dy.chunks_exact(cols)) {
        let squares: Vec<f32> = row.iter().map(|&v| v * v).collect();
        let mean = tree_sum(&squares) / cols as f32;
        let inv_rms = 1.0 / (mean + eps).sqrt();
        let g: Vec<f32> = dy_row.iter().zip(weight).map(|(&d, &w)| d * w).collect();
        let g_dot_x: f32 = g.iter().zip(row).map(|(&a, &b)| a * b).sum();
        let through_r = inv_rms * inv_rms * inv_rms * g_dot_x / cols as f32;
        dx.extend(
            row.iter()
                .zip(&g)
                .map(|(&v, &gi)| inv_rms * gi - through_r * v),
        );
        for ((dw, &d), &v) in dweight.iter_mut().zip(dy_row).zip(row) {
            *dw += d * v * inv_rms;
        }
    }
    Ok((dx, dweight))
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
    fn non_finite_values_follow_ieee() {
        let y = rmsnorm(
            &[1.0, f32::NAN, 2.0, 3.0, f32::INFINITY, -2.0],
            2,
            &[1.0; 3],
            1e-5,
        )
        .unwrap();
        assert!(y[..3].iter().all(|v| v.is_nan()), "{y:?}");
        assert!(y[4].is_nan() && y[3] == 0.0 && y[5] == 0.0 && y[5].is_sign_negative());
    }

    #[test]
    fn unit_rms_rows_are_kept() {
        let x = [1.0, -1.0, 1.0, -1.0];
        assert_eq!(rmsnorm(&x, 1, &[1.0; 4], 0.0).unwrap(), x);
    }

    #[test]
    fn backward_matches_finite_differences() {
        use crate::cpu::gradcheck::{assert_grad_close, numeric_grad, uniform, weighted_sum};
        for (seed, rows, cols, eps) in [(1, 1, 1, 0.5), (2, 3, 7, 1e-5), (3, 2, 33, 0.1)] {
            let x = uniform(seed, rows * cols, -2.0, 2.0);
            let w = uniform(seed + 10, cols, 0.5, 1.5);
            let r = uniform(seed + 20, rows * cols, -1.0, 1.0);
            let (dx, dw) = rmsnorm_backward(&x, rows, &w, eps, &r).unwrap();
            let nx = numeric_grad(&x, 1e-2, |x| {
                weighted_sum(&rmsnorm(x, rows, &w, eps).unwrap(), &r)
            });
            let nw = numeric_grad(&w, 1e-2, |w| {
                weighted_sum(&rmsnorm(&x, rows, w, eps).unwrap(), &r)
            });
            assert_grad_close("rmsnorm dx", &dx, &nx, 2e-3, 1e-2);
            assert_grad_close("rmsnorm dweight", &dw, &nw, 2e-3, 1e-2);
        }
        assert!(rmsnorm_backward(&[1.0; 4], 2, &[1.0; 2], 0.0, &[1.0; 3]).is_err());
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
