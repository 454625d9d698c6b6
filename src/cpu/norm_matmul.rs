//! A linear layer with its input's RMS norm and quantization in front, as decoding runs it in one
//! step (`shaders/norm_matmul.wgsl`).

use super::{TernaryWeights, act_quant, rmsnorm, ternary_matmul};
use crate::model::Activation;
use crate::{Error, Result};

/// `ternary_matmul(act_quant(rmsnorm(x, rows, norm_weight, eps)), w)`: `[rows, w.rows]`, without
/// the norm (act_quant alone) where `norm_weight` is `None` (a family without sub-norms). With
/// `gate`, `w` is gate_proj stacked on up_proj (gate rows first) and the result is
/// `gate.gate(gate rows, up rows)`: `[rows, w.rows / 2]`.
///
/// ```
/// use bitnet_wgpu::cpu::{TernaryWeights, norm_matmul};
/// use bitnet_wgpu::model::Activation;
/// // Gate row [1, 1], up row [1, -1]: the norm maps [3, 4] to about [0.85, 1.13].
/// let w = TernaryWeights { rows: 2, cols: 2, codes: vec![1, 1, 1, -1], scales: vec![1.0] };
/// let y = norm_matmul(&[3.0, 4.0], 1, Some(&[1.0, 1.0]), 1e-5, &w, Some(Activation::Relu2))?;
/// let (gate, up) = (1.98f32, -0.28f32);
/// assert!((y[0] - gate * gate * up).abs() < 0.02);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn norm_matmul(
    x: &[f32],
    rows: usize,
    norm_weight: Option<&[f32]>,
    eps: f32,
    w: &TernaryWeights,
    gate: Option<Activation>,
) -> Result<Vec<f32>> {
    let y = match norm_weight {
        Some(norm) => {
            if norm.len() != w.cols {
                return Err(Error::shape("norm_matmul norm weight", w.cols, norm.len()));
            }
            let h = rmsnorm(x, rows, norm, eps)?;
            ternary_matmul(&act_quant(&h, rows, w.cols)?, w, None)?
        }
        None => ternary_matmul(&act_quant(x, rows, w.cols)?, w, None)?,
    };
    let Some(activation) = gate else {
        return Ok(y);
    };
    if !w.rows.is_multiple_of(2) {
        return Err(Error::invalid(
            "gated norm_matmul",
            format!("{} stacked gate and up rows is odd", w.rows),
        ));
    }
    let n = w.rows / 2;
    let mut out = Vec::with_capacity(rows * n);
    for row in y.chunks_exact(w.rows) {
        out.extend(activation.gate(&row[..n], &row[n..])?);
    }
    Ok(out)
}
