//! A linear layer with its input's RMS norm and quantization in front, as decoding runs it in one
//! step (`shaders/norm_matmul.wgsl`).

use super::{TernaryWeights, act_quant, relu2_gate, rmsnorm, ternary_matmul};
use crate::{Error, Result};

/// `ternary_matmul(act_quant(rmsnorm(x, rows, norm_weight, eps)), w)`: `[rows, w.rows]`.
/// With `gated`, `w` is gate_proj stacked on up_proj (gate rows first) and the result is
/// `relu2_gate(gate, up)`: `[rows, w.rows / 2]`.
///
/// ```
/// use bitnet_wgpu::cpu::{TernaryWeights, norm_matmul};
/// // Gate row [1, 1], up row [1, -1]: the norm maps [3, 4] to about [0.85, 1.13].
/// let w = TernaryWeights { rows: 2, cols: 2, codes: vec![1, 1, 1, -1], scales: vec![1.0] };
/// let y = norm_matmul(&[3.0, 4.0], 1, &[1.0, 1.0], 1e-5, &w, true)?;
/// let (gate, up) = (1.98f32, -0.28f32);
/// assert!((y[0] - gate * gate * up).abs() < 0.02);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn norm_matmul(
    x: &[f32],
    rows: usize,
    norm_weight: &[f32],
    eps: f32,
    w: &TernaryWeights,
    gated: bool,
) -> Result<Vec<f32>> {
    if norm_weight.len() != w.cols {
        return Err(Error::shape(
            "norm_matmul norm weight",
            w.cols,
            norm_weight.len(),
        ));
    }
    let h = rmsnorm(x, rows, norm_weight, eps)?;
    let y = ternary_matmul(&act_quant(&h, rows, w.cols)?, w, None)?;
    if !gated {
        return Ok(y);
    }
    if !w.rows.is_multiple_of(2) {
        return Err(Error::invalid(
            "gated norm_matmul",
            format!("{} stacked gate and up rows is odd", w.rows),
        ));
    }
    let n = w.rows / 2;
    let mut out = Vec::with_capacity(rows * n);
    for row in y.chunks_exact(w.rows) {
        out.extend(relu2_gate(&row[..n], &row[n..])?);
    }
    Ok(out)
}
