//! The gated squared-ReLU of BitNet's feed-forward block.

use crate::{Error, Result};

/// `y[i] = relu(gate[i])² * up[i]`: Hugging Face's `ACT2FN["relu2"](gate_proj(x)) * up_proj(x)`,
/// with the square taken as `r * r` before the product, in that order.
///
/// ```
/// use bitnet_wgpu::cpu::relu2_gate;
/// assert_eq!(relu2_gate(&[3.0, -2.0, 0.5], &[2.0, 7.0, -4.0])?, [18.0, 0.0, -1.0]);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn relu2_gate(gate: &[f32], up: &[f32]) -> Result<Vec<f32>> {
    if gate.len() != up.len() {
        return Err(Error::shape("relu2_gate up", gate.len(), up.len()));
    }
    Ok(gate
        .iter()
        .zip(up)
        .map(|(&g, &u)| {
            // Not `g.max(0.0)`: that turns NaN into 0, where torch's relu keeps it.
            let r = if g < 0.0 { 0.0 } else { g };
            (r * r) * u
        })
        .collect())
}

/// The gradients of [`relu2_gate`]: `(dgate, dup)` for the upstream gradient `dy`, with
/// `r = relu(gate)`: `dgate = 2 * r * up * dy` (zero where the gate is closed, at 0 included) and
/// `dup = r² * dy`.
///
/// ```
/// use bitnet_wgpu::cpu::relu2_gate_backward;
/// let (dgate, dup) = relu2_gate_backward(&[3.0, -2.0], &[2.0, 7.0], &[1.0, 1.0])?;
/// assert_eq!((dgate, dup), (vec![12.0, 0.0], vec![9.0, 0.0]));
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn relu2_gate_backward(gate: &[f32], up: &[f32], dy: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
    if gate.len() != up.len() || gate.len() != dy.len() {
        return Err(Error::shape(
            "relu2_gate_backward up and gradient",
            gate.len(),
            format!("{} and {}", up.len(), dy.len()),
        ));
    }
    let mut dgate = Vec::with_capacity(gate.len());
    let mut dup = Vec::with_capacity(gate.len());
    for ((&g, &u), &d) in gate.iter().zip(up).zip(dy) {
        let r = if g < 0.0 { 0.0 } else { g };
        dgate.push(2.0 * r * u * d);
        dup.push(r * r * d);
    }
    Ok((dgate, dup))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_gates_close_and_positive_square() {
        let y = relu2_gate(&[-1.0, 0.0, 1.5, 4.0], &[5.0, 5.0, 2.0, -0.25]).unwrap();
        assert_eq!(y, [0.0, 0.0, 4.5, -4.0]);
    }

    #[test]
    fn backward_matches_finite_differences() {
        use crate::cpu::gradcheck::{assert_grad_close, numeric_grad, uniform, weighted_sum};
        // Gates kept away from the kink at 0 by more than the step.
        let gate: Vec<f32> = uniform(1, 31, -2.0, 2.0)
            .into_iter()
            .map(|g| if g.abs() < 0.05 { g + 0.1 } else { g })
            .collect();
        let up = uniform(2, 31, -2.0, 2.0);
        let r = uniform(3, 31, -1.0, 1.0);
        let (dgate, dup) = relu2_gate_backward(&gate, &up, &r).unwrap();
        let ng = numeric_grad(&gate, 1e-2, |g| {
            weighted_sum(&relu2_gate(g, &up).unwrap(), &r)
        });
        let nu = numeric_grad(&up, 1e-2, |u| {
            weighted_sum(&relu2_gate(&gate, u).unwrap(), &r)
        });
        assert_grad_close("relu2_gate dgate", &dgate, &ng, 1e-3, 1e-3);
        assert_grad_close("relu2_gate dup", &dup, &nu, 1e-3, 1e-3);
        assert!(relu2_gate_backward(&[1.0; 2], &[1.0; 2], &[1.0; 3]).is_err());
    }

    #[test]
    fn nan_propagates() {
        assert!(relu2_gate(&[f32::NAN], &[1.0]).unwrap()[0].is_nan());
    }

    #[test]
    fn length_mismatch_is_an_error() {
        assert!(matches!(
            relu2_gate(&[1.0; 3], &[1.0; 2]),
            Err(Error::Shape { .. })
        ));
    }
}
