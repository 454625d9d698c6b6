//! Rotary position embedding in Hugging Face's `rotate_half` convention.

use crate::{Error, Result};

/// The rotary frequencies `inv_freq[i] = 1 / theta^((2i) / head_dim)`, `i < head_dim / 2`.
///
/// Computed as transformers' default RoPE does: the exponent `(2i as f32) / (head_dim as f32)` and
/// the power and reciprocal in f32, so the angles agree with a float32 transformers run.
///
/// ```
/// use bitnet_wgpu::cpu::rope_inv_freq;
/// assert_eq!(rope_inv_freq(4, 10000.0), [1.0, 0.01]);
/// ```
pub fn rope_inv_freq(head_dim: usize, theta: f32) -> Vec<f32> {
    (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect()
}

/// Rotates, in place, the query or key rows `x` (`[positions.len(), heads * head_dim]`, row-major)
/// by their positions. Within each head, dimension `i < d/2` pairs with `i + d/2` (the two halves,
/// not interleaved neighbours), with `angle = position as f32 * inv_freq[i]`:
///
/// `x'[i] = x[i] * cos(angle) + (-x[i + d/2]) * sin(angle)`
/// `x'[i + d/2] = x[i + d/2] * cos(angle) + x[i] * sin(angle)`
///
/// This is transformers' `q * cos + rotate_half(q) * sin` with `cos`/`sin` of `cat(freqs, freqs)`,
/// the convention Hugging Face BitNet checkpoints are trained in, evaluated in f32.
/// Errors: an odd or zero `head_dim`, or `x` whose length disagrees with the shape.
///
/// ```
/// use bitnet_wgpu::cpu::rope;
/// // Position 0 is the identity.
/// let mut x = [1.0, 2.0, 3.0, 4.0];
/// rope(&mut x, &[0], 1, 4, 10000.0)?;
/// assert_eq!(x, [1.0, 2.0, 3.0, 4.0]);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn rope(
    x: &mut [f32],
    positions: &[usize],
    heads: usize,
    head_dim: usize,
    theta: f32,
) -> Result<()> {
    let row_len = check_shape(x, positions, heads, head_dim)?;
    let half = head_dim / 2;
    let inv_freq = rope_inv_freq(head_dim, theta);
    for (&pos, row) in positions.iter().zip(x.chunks_exact_mut(row_len.max(1))) {
        let (cos, sin) = cos_sin(&inv_freq, pos);
        for head in row.chunks_exact_mut(head_dim) {
            let (low, high) = head.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (low[i], high[i]);
                low[i] = a * cos[i] + (-b) * sin[i];
                high[i] = b * cos[i] + a * sin[i];
            }
        }
    }
    Ok(())
}

/// The gradient of [`rope`], in place: `dx` holds the gradient wrt rope's output and leaves
/// holding the gradient wrt its input. A rotation's transpose is the rotation back, so each pair
/// turns by `-angle`:
///
/// `dx'[i] = dx[i] * cos(angle) + dx[i + d/2] * sin(angle)`
/// `dx'[i + d/2] = dx[i + d/2] * cos(angle) - dx[i] * sin(angle)`
///
/// with the forward's angles, computed the same way. Errors as [`rope`].
///
/// ```
/// use bitnet_wgpu::cpu::{rope, rope_backward};
/// let mut x = [0.3, -1.0, 2.0, 0.5];
/// rope(&mut x, &[3], 1, 4, 10000.0)?;
/// rope_backward(&mut x, &[3], 1, 4, 10000.0)?;
/// assert!(x.iter().zip([0.3, -1.0, 2.0, 0.5]).all(|(a, b)| (a - b).abs() < 1e-6));
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn rope_backward(
    dx: &mut [f32],
    positions: &[usize],
    heads: usize,
    head_dim: usize,
    theta: f32,
) -> Result<()> {
    let row_len = check_shape(dx, positions, heads, head_dim)?;
    let half = head_dim / 2;
    let inv_freq = rope_inv_freq(head_dim, theta);
    for (&pos, row) in positions.iter().zip(dx.chunks_exact_mut(row_len.max(1))) {
        let (cos, sin) = cos_sin(&inv_freq, pos);
        for head in row.chunks_exact_mut(head_dim) {
            let (low, high) = head.split_at_mut(half);
            for i in 0..half {
                let (da, db) = (low[i], high[i]);
                low[i] = da * cos[i] + db * sin[i];
                high[i] = db * cos[i] - da * sin[i];
            }
        }
    }
    Ok(())
}

/// The row length `heads * head_dim`, after checking `x` against the shape.
fn check_shape(x: &[f32], positions: &[usize], heads: usize, head_dim: usize) -> Result<usize> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(Error::invalid(
            "rope head_dim",
            format!("{head_dim} is not a positive even number"),
        ));
    }
    let row_len = heads
        .checked_mul(head_dim)
        .ok_or_else(|| Error::invalid("rope shape", "heads * head_dim overflows"))?;
    if positions.len().checked_mul(row_len) != Some(x.len()) {
        return Err(Error::shape(
            "rope input",
            format!("{} x {heads} x {head_dim}", positions.len()),
            x.len(),
        ));
    }
    Ok(row_len)
}

/// The cosines and sines of one position's angles.
fn cos_sin(inv_freq: &[f32], pos: usize) -> (Vec<f32>, Vec<f32>) {
    inv_freq
        .iter()
        .map(|&f| {
            let angle = pos as f32 * f;
            (angle.cos(), angle.sin())
        })
        .unzip()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_zero_is_identity() {
        let x: Vec<f32> = (0..24).map(|i| i as f32 * 0.37 - 3.0).collect();
        let mut y = x.clone();
        rope(&mut y, &[0, 0], 3, 4, 500_000.0).unwrap();
        assert_eq!(y, x);
    }

    #[test]
    fn rotates_the_two_halves_by_hand() {
        // head_dim 4: pairs (0, 2) at frequency 1 and (1, 3) at frequency 1/theta^(1/2) = 0.01.
        let mut x = [1.0, 1.0, 0.0, 0.0];
        rope(&mut x, &[2], 1, 4, 10000.0).unwrap();
        let expect = [2f32.cos(), 0.02f32.cos(), 2f32.sin(), 0.02f32.sin()];
        for (a, b) in x.iter().zip(expect) {
            assert!((a - b).abs() < 1e-6, "{x:?}");
        }
    }

    #[test]
    fn preserves_norms_and_relative_angles() {
        // q·k after rotation depends only on the distance between positions.
        let q = [0.3, -1.2, 0.8, 0.5, 2.0, -0.1];
        let k = [1.1, 0.4, -0.7, 0.9, 0.2, 1.5];
        let dot_at = |pq: usize, pk: usize| {
            let (mut q, mut k) = (q, k);
            rope(&mut q, &[pq], 1, 6, 100.0).unwrap();
            rope(&mut k, &[pk], 1, 6, 100.0).unwrap();
            q.iter().zip(&k).map(|(a, b)| a * b).sum::<f32>()
        };
        assert!((dot_at(5, 2) - dot_at(13, 10)).abs() < 1e-5);
        let mut v = q;
        rope(&mut v, &[7], 1, 6, 100.0).unwrap();
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((norm(&v) - norm(&q)).abs() < 1e-5);
    }

    #[test]
    fn backward_matches_finite_differences() {
        use crate::cpu::gradcheck::{assert_grad_close, numeric_grad, uniform, weighted_sum};
        for (seed, positions, heads, head_dim) in [
            (1, vec![0], 1, 2),
            (2, vec![5, 1, 9], 3, 6),
            (3, vec![2, 3], 2, 4),
        ] {
            let n = positions.len() * heads * head_dim;
            let x = uniform(seed, n, -2.0, 2.0);
            let r = uniform(seed + 10, n, -1.0, 1.0);
            let mut dx = r.clone();
            rope_backward(&mut dx, &positions, heads, head_dim, 100.0).unwrap();
            let numeric = numeric_grad(&x, 1e-2, |x| {
                let mut y = x.to_vec();
                rope(&mut y, &positions, heads, head_dim, 100.0).unwrap();
                weighted_sum(&y, &r)
            });
            assert_grad_close("rope dx", &dx, &numeric, 1e-3, 1e-3);
        }
        assert!(rope_backward(&mut [0.0; 6], &[0], 1, 4, 1e4).is_err());
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(rope(&mut [0.0; 3], &[0], 1, 3, 1e4).is_err());
        assert!(matches!(
            rope(&mut [0.0; 8], &[0], 1, 4, 1e4),
            Err(Error::Shape { .. })
        ));
    }
}
