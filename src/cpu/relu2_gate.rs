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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_gates_close_and_positive_square() {
        let y = relu2_gate(&[-1.0, 0.0, 1.5, 4.0], &[5.0, 5.0, 2.0, -0.25]).unwrap();
        assert_eq!(y, [0.0, 0.0, 4.5, -4.0]);
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
