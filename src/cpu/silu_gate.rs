//! The gated SiLU of the Llama family's feed-forward block.

use crate::{Error, Result};

/// `y[i] = silu(gate[i]) * up[i]` with `silu(g) = g / (1 + e^-g)`: Hugging Face's
/// `ACT2FN["silu"](gate_proj(x)) * up_proj(x)`, as torch computes it in f32.
///
/// ```
/// use bitnet_wgpu::cpu::silu_gate;
/// let y = silu_gate(&[0.0, 20.0, -20.0], &[5.0, 2.0, 1.0])?;
/// assert_eq!(y[..2], [0.0, 40.0]);
/// assert!(y[2] < 0.0 && y[2] > -1e-6);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn silu_gate(gate: &[f32], up: &[f32]) -> Result<Vec<f32>> {
    if gate.len() != up.len() {
        return Err(Error::shape("silu_gate up", gate.len(), up.len()));
    }
    Ok(gate.iter().zip(up).map(|(&g, &u)| silu(g) * u).collect())
}

/// The gradients of [`silu_gate`]: `(dgate, dup)` for the upstream gradient `dy`, with
/// `s = sigmoid(gate)`: `dgate = s * (1 + gate * (1 - s)) * up * dy` and `dup = silu(gate) * dy`.
///
/// ```
/// use bitnet_wgpu::cpu::silu_gate_backward;
/// let (dgate, dup) = silu_gate_backward(&[0.0], &[3.0], &[2.0])?;
/// assert_eq!((dgate, dup), (vec![3.0], vec![0.0]));
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn silu_gate_backward(gate: &[f32], up: &[f32], dy: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
    if gate.len() != up.len() || gate.len() != dy.len() {
        return Err(Error::shape(
            "silu_gate_backward up and gradient",
            gate.len(),
            format!("{} and {}", up.len(), dy.len()),
        ));
    }
    let mut dgate = Vec::with_capacity(gate.len());
    let mut dup = Vec::with_capacity(gate.len());
    for ((&g, &u), &d) in gate.iter().zip(up).zip(dy) {
        let s = 1.0 / (1.0 + (-g).exp());
        dgate.push(s * (1.0 + g * (1.0 - s)) * u * d);
        dup.push(silu(g) * d);
    }
    Ok((dgate, dup))
}

/// `g * sigmoid(g)`, as `g / (1 + e^-g)`.
fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_and_nan() {
        let y = silu_gate(&[1.0, -1.0, f32::NAN], &[1.0, 2.0, 1.0]).unwrap();
        assert!((y[0] - 0.731_058_6).abs() < 1e-6, "{}", y[0]);
        assert!((y[1] + 2.0 * 0.268_941_43).abs() < 1e-6, "{}", y[1]);
        assert!(y[2].is_nan());
        assert!(silu_gate(&[1.0], &[1.0, 2.0]).is_err());
    }

    #[test]
    fn backward_matches_finite_differences() {
        use crate::cpu::gradcheck::{assert_grad_close, numeric_grad, uniform, weighted_sum};
        let gate = uniform(1, 31, -4.0, 4.0);
        let up = uniform(2, 31, -2.0, 2.0);
        let r = uniform(3, 31, -1.0, 1.0);
        let (dgate, dup) = silu_gate_backward(&gate, &up, &r).unwrap();
        let ng = numeric_grad(&gate, 1e-2, |g| {
            weighted_sum(&silu_gate(g, &up).unwrap(), &r)
        });
        let nu = numeric_grad(&up, 1e-2, |u| {
            weighted_sum(&silu_gate(&gate, u).unwrap(), &r)
        });
        assert_grad_close("silu_gate dgate", &dgate, &ng, 1e-3, 1e-3);
        assert_grad_close("silu_gate dup", &dup, &nu, 1e-3, 1e-3);
    }
}
