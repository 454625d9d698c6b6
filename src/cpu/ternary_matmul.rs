//! The BitLinear product of int8 activations and ternary weights: exact in i32, then rescaled.

use super::{QuantizedActivations, TernaryWeights};
use crate::{Error, Result};

/// The longest row the i32 accumulation supports: the GPU forms `dot(x, w + 1)`, up to
/// `128 * 2` per term, and that must not overflow i32.
const MAX_COLS: usize = i32::MAX as usize / 256;

/// The exact integer products `acc[m, n] = sum_k x[m, k] * w[n, k]`, shape `[x.rows, w.rows]`
/// row-major.
///
/// The GPU stores `w + 1` in {0, 1, 2} (two bits, no sign) and computes `dot(x, w + 1) - sum(x)`
/// with `dot4I8Packed`; since `sum x (w + 1) = sum x w + sum x`, that is the same integer, which is
/// why [`QuantizedActivations::sums`] exists. Rows longer than `i32::MAX / 256` are refused: there
/// `dot(x, w + 1)` could overflow i32.
///
/// ```
/// use bitnet_wgpu::cpu::{QuantizedActivations, TernaryWeights, ternary_matmul_acc};
/// let x = QuantizedActivations { rows: 1, cols: 3, codes: vec![5, -7, 100], scales: vec![1.0], sums: vec![98] };
/// let w = TernaryWeights { rows: 2, cols: 3, codes: vec![1, 1, 0, -1, 0, 1], scales: vec![1.0] };
/// assert_eq!(ternary_matmul_acc(&x, &w)?, [-2, 95]);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn ternary_matmul_acc(x: &QuantizedActivations, w: &TernaryWeights) -> Result<Vec<i32>> {
    check_shapes(x, w)?;
    let k = x.cols;
    let mut acc = Vec::with_capacity(x.rows * w.rows);
    for x_row in x.codes.chunks_exact(k) {
        for w_row in w.codes.chunks_exact(k) {
            let dot = x_row
                .iter()
                .zip(w_row)
                .map(|(&a, &b)| i32::from(a) * i32::from(b))
                .sum();
            acc.push(dot);
        }
    }
    Ok(acc)
}

/// The BitLinear output `y[m, n] = acc[m, n] / (x.scales[m] * sw[n]) (+ bias[n])`, shape
/// `[x.rows, w.rows]` row-major, where `sw` is the weights' single scale or their per-channel one.
///
/// Both scales are multipliers (`x ≈ codes / sx`, `W ≈ codes / sw`), so the product is divided by
/// them; the f32 operations are in exactly this order, the shader's. A row of `x` with a NaN scale
/// (non-finite input) gives NaN outputs.
///
/// ```
/// use bitnet_wgpu::cpu::{QuantizedActivations, TernaryWeights, ternary_matmul};
/// let x = QuantizedActivations { rows: 1, cols: 2, codes: vec![127, -64], scales: vec![127.0], sums: vec![63] };
/// let w = TernaryWeights { rows: 2, cols: 2, codes: vec![1, 1, 0, -1], scales: vec![0.5] };
/// // acc = [63, 64]; y = acc / (127 * 0.5) + bias
/// let y = ternary_matmul(&x, &w, Some(&[0.0, 1.0]))?;
/// assert_eq!(y, [63.0 / 63.5, 64.0 / 63.5 + 1.0]);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn ternary_matmul(
    x: &QuantizedActivations,
    w: &TernaryWeights,
    bias: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let acc = ternary_matmul_acc(x, w)?;
    let n = w.rows;
    let weight_scale = |col: usize| {
        if w.scales.len() == 1 {
            w.scales[0]
        } else {
            w.scales[col]
        }
    };
    if let Some(bad) = bias.filter(|b| b.len() != n) {
        return Err(Error::shape("bias", n, bad.len()));
    }
    let mut y = Vec::with_capacity(acc.len());
    for (m, acc_row) in acc.chunks_exact(n.max(1)).enumerate() {
        for (col, &a) in acc_row.iter().enumerate() {
            let value = a as f32 / (x.scales[m] * weight_scale(col));
            y.push(bias.map_or(value, |b| value + b[col]));
        }
    }
    Ok(y)
}

/// The straight-through (STE) gradients of the BitLinear product `y = x̂ · Ŵᵀ` for the upstream
/// gradient `dy` (`[x.rows, w.rows]`): `(dx, dw)` with
///
/// `dx[m, k] = sum_n dy[m, n] * Ŵ[n, k]` (`[x.rows, x.cols]`) and
/// `dw[n, k] = sum_m dy[m, n] * x̂[m, k]` (`[w.rows, w.cols]`),
///
/// where `Ŵ = codes / sw` and `x̂ = codes / sx` are the dequantized operands. Both quantizers are
/// taken as the identity in the backward (transformers' `WeightQuant` and `ActQuant` return the
/// gradient unchanged), so `dx` is the gradient wrt the float input that `act_quant` read and `dw`
/// the gradient wrt the latent float weights that `weight_quant` read. Errors as
/// [`ternary_matmul`], and a `dy` shaped unlike its output.
///
/// ```
/// use bitnet_wgpu::cpu::{QuantizedActivations, TernaryWeights, ternary_matmul_backward};
/// let x = QuantizedActivations { rows: 1, cols: 2, codes: vec![127, -64], scales: vec![127.0], sums: vec![63] };
/// let w = TernaryWeights { rows: 2, cols: 2, codes: vec![1, 1, 0, -1], scales: vec![0.5] };
/// let (dx, dw) = ternary_matmul_backward(&x, &w, &[1.0, 2.0])?;
/// assert_eq!(dx, [2.0, -2.0]); // [1, 2] · [[2, 2], [0, -2]]
/// assert_eq!(dw, [1.0, -64.0 / 127.0, 2.0, -128.0 / 127.0]);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn ternary_matmul_backward(
    x: &QuantizedActivations,
    w: &TernaryWeights,
    dy: &[f32],
) -> Result<(Vec<f32>, Vec<f32>)> {
    check_shapes(x, w)?;
    let (m_rows, n_rows, k) = (x.rows, w.rows, x.cols);
    if m_rows.checked_mul(n_rows) != Some(dy.len()) {
        return Err(Error::shape(
            "ternary matmul output gradient",
            format!("{m_rows} x {n_rows}"),
            dy.len(),
        ));
    }
    let weight_scale = |n: usize| {
        if w.scales.len() == 1 {
            w.scales[0]
        } else {
            w.scales[n]
        }
    };
    let w_hat: Vec<f32> = (0..n_rows * k)
        .map(|i| f32::from(w.codes[i]) / weight_scale(i / k))
        .collect();
    let x_hat: Vec<f32> = (0..m_rows * k)
        .map(|i| f32::from(x.codes[i]) / x.scales[i / k])
        .collect();
    let mut dx = vec![0.0f32; m_rows * k];
    let mut dw = vec![0.0f32; n_rows * k];
    for m in 0..m_rows {
        for n in 0..n_rows {
            let d = dy[m * n_rows + n];
            for c in 0..k {
                dx[m * k + c] += d * w_hat[n * k + c];
                dw[n * k + c] += d * x_hat[m * k + c];
            }
        }
    }
    Ok((dx, dw))
}

/// Checks that the operands agree with each other and with their own lengths.
fn check_shapes(x: &QuantizedActivations, w: &TernaryWeights) -> Result<()> {
    if x.cols != w.cols {
        return Err(Error::shape(
            "ternary matmul inner dimension",
            x.cols,
            w.cols,
        ));
    }
    if x.cols == 0 {
        return Err(Error::Empty("ternary matmul inner dimension"));
    }
    if x.cols > MAX_COLS {
        return Err(Error::invalid(
            "ternary matmul inner dimension",
            format!("{} exceeds the i32-safe maximum {MAX_COLS}", x.cols),
        ));
    }
    let expect = |what, rows: usize, got: usize, per_row: usize| match rows.checked_mul(per_row) {
        Some(len) if len == got => Ok(()),
        _ => Err(Error::shape(what, format!("{rows} x {per_row}"), got)),
    };
    expect("activation codes", x.rows, x.codes.len(), x.cols)?;
    expect("activation scales", x.rows, x.scales.len(), 1)?;
    expect("weight codes", w.rows, w.codes.len(), w.cols)?;
    if w.scales.len() != 1 && w.scales.len() != w.rows {
        return Err(Error::shape(
            "weight scales",
            format!("1 or {}", w.rows),
            w.scales.len(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{ScaleGranularity, WeightQuantOptions, act_quant, weight_quant};
    use rand::{Rng, SeedableRng, rngs::SmallRng};

    fn random_case(
        rng: &mut SmallRng,
        m: usize,
        n: usize,
        k: usize,
    ) -> (QuantizedActivations, TernaryWeights) {
        let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-3.0..3.0)).collect();
        let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-0.05..0.05)).collect();
        let granularity = if rng.random() {
            ScaleGranularity::PerChannel
        } else {
            ScaleGranularity::PerTensor
        };
        let opts = WeightQuantOptions {
            granularity,
            threshold: 0.5,
        };
        (
            act_quant(&x, m, k).unwrap(),
            weight_quant(&w, n, k, opts).unwrap(),
        )
    }

    #[test]
    fn matches_naive_wide_computation() {
        let mut rng = SmallRng::seed_from_u64(5);
        for case in 0..200 {
            let m = rng.random_range(1..5);
            let n = [1, 3, 15, 17][case % 4];
            let k = [1, 3, 15, 17, 127, 129, 300][case % 7];
            let (x, w) = random_case(&mut rng, m, n, k);
            let acc = ternary_matmul_acc(&x, &w).unwrap();
            let y = ternary_matmul(&x, &w, None).unwrap();
            assert_eq!((acc.len(), y.len()), (m * n, m * n));
            for i in 0..m {
                for j in 0..n {
                    let wide: i64 = (0..k)
                        .map(|c| i64::from(x.codes[i * k + c]) * i64::from(w.codes[j * k + c]))
                        .sum();
                    assert_eq!(i64::from(acc[i * n + j]), wide);
                    let sw = if w.scales.len() == 1 {
                        w.scales[0]
                    } else {
                        w.scales[j]
                    };
                    let exact = wide as f64 / (f64::from(x.scales[i]) * f64::from(sw));
                    let got = f64::from(y[i * n + j]);
                    assert!(
                        (got - exact).abs() <= exact.abs() * 1e-6,
                        "{got} vs {exact}"
                    );
                    // The GPU's form gives the same integer.
                    let shifted: i64 = (0..k)
                        .map(|c| i64::from(x.codes[i * k + c]) * i64::from(w.codes[j * k + c] + 1))
                        .sum();
                    assert_eq!(shifted - i64::from(x.sums[i]), wide);
                }
            }
        }
    }

    #[test]
    fn backward_is_the_straight_through_formula() {
        // dx = dy · Ŵ and dw = dyᵀ · x̂, formed in f64 from act_quant's and weight_quant's
        // outputs, for both scale granularities, a single row and odd sizes.
        let mut rng = SmallRng::seed_from_u64(3);
        for (m, n, k) in [(1, 1, 1), (1, 5, 9), (3, 4, 17), (7, 3, 2)] {
            let (x, w) = random_case(&mut rng, m, n, k);
            let dy: Vec<f32> = (0..m * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let (dx, dw) = ternary_matmul_backward(&x, &w, &dy).unwrap();
            let sw = |r: usize| f64::from(w.scales[if w.scales.len() == 1 { 0 } else { r }]);
            let w_hat = |r: usize, c: usize| f64::from(w.codes[r * k + c]) / sw(r);
            let x_hat = |r: usize, c: usize| f64::from(x.codes[r * k + c]) / f64::from(x.scales[r]);
            for r in 0..m {
                for c in 0..k {
                    let want: f64 = (0..n).map(|j| f64::from(dy[r * n + j]) * w_hat(j, c)).sum();
                    let scale: f64 = (0..n)
                        .map(|j| (f64::from(dy[r * n + j]) * w_hat(j, c)).abs())
                        .sum();
                    assert!((f64::from(dx[r * k + c]) - want).abs() <= 1e-6 * scale.max(1e-30));
                }
            }
            for j in 0..n {
                for c in 0..k {
                    let want: f64 = (0..m).map(|r| f64::from(dy[r * n + j]) * x_hat(r, c)).sum();
                    let scale: f64 = (0..m)
                        .map(|r| (f64::from(dy[r * n + j]) * x_hat(r, c)).abs())
                        .sum();
                    assert!((f64::from(dw[j * k + c]) - want).abs() <= 1e-6 * scale.max(1e-30));
                }
            }
        }
        let (x, w) = random_case(&mut rng, 2, 3, 4);
        assert!(ternary_matmul_backward(&x, &w, &[0.0; 5]).is_err());
    }

    #[test]
    fn bias_is_added_per_output() {
        let mut rng = SmallRng::seed_from_u64(9);
        let (x, w) = random_case(&mut rng, 3, 4, 33);
        let bias = [1.0, -2.0, 0.5, 8.0];
        let plain = ternary_matmul(&x, &w, None).unwrap();
        let biased = ternary_matmul(&x, &w, Some(&bias)).unwrap();
        for (i, (&p, &b)) in plain.iter().zip(&biased).enumerate() {
            assert_eq!(b, p + bias[i % 4]);
        }
    }

    #[test]
    fn non_finite_activation_row_gives_nan() {
        let x = act_quant(&[1.0, f32::NAN, 1.0, 2.0], 2, 2).unwrap();
        let w = weight_quant(&[1.0, -1.0], 1, 2, WeightQuantOptions::default()).unwrap();
        let y = ternary_matmul(&x, &w, None).unwrap();
        assert!(y[0].is_nan());
        assert_eq!(y[1], -63.0 / 63.5); // codes [64, 127] . [1, -1]
    }

    #[test]
    fn shape_errors_are_errors() {
        let mut rng = SmallRng::seed_from_u64(1);
        let (x, w) = random_case(&mut rng, 2, 3, 8);
        let (_, w_other) = random_case(&mut rng, 2, 3, 9);
        assert!(matches!(
            ternary_matmul_acc(&x, &w_other),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(
            ternary_matmul(&x, &w, Some(&[0.0; 2])),
            Err(Error::Shape { .. })
        ));
        let mut broken = w.clone();
        broken.codes.pop();
        assert!(ternary_matmul_acc(&x, &broken).is_err());
        let mut broken = w.clone();
        broken.scales = vec![1.0; 2];
        assert!(ternary_matmul(&x, &broken, None).is_err());
        let mut broken = x.clone();
        broken.scales.pop();
        assert!(ternary_matmul(&broken, &w, None).is_err());
    }
}
