//! The linear layers of training: BitLinear with straight-through gradients, or plain float.

use crate::cpu::{
    QuantizedActivations, TernaryWeights, WeightQuantOptions, act_quant, ternary_matmul,
    ternary_matmul_backward, weight_quant,
};
use crate::{Error, Result};

/// How the linear layers compute, in the forward and the backward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Quant {
    /// BitNet b1.58: per-token int8 activations and per-tensor absmean ternary weights in the
    /// forward (exactly the inference path), the straight-through estimator in the backward.
    #[default]
    BitNet,
    /// Full-precision linears `y = x · Wᵀ` on the latent weights: the quantizers switched off.
    None,
}

/// A linear weight as one training step uses it: quantized once per step from the latent matrix,
/// or the latent matrix itself.
pub(crate) enum StepWeight<'a> {
    Ternary(TernaryWeights),
    Float {
        w: &'a [f32],
        rows: usize,
        cols: usize,
    },
}

impl<'a> StepWeight<'a> {
    /// The latent `[rows, cols]` matrix `w` as `quant` computes with it.
    pub(crate) fn new(w: &'a [f32], rows: usize, cols: usize, quant: Quant) -> Result<Self> {
        match quant {
            Quant::BitNet => Ok(StepWeight::Ternary(weight_quant(
                w,
                rows,
                cols,
                WeightQuantOptions::default(),
            )?)),
            Quant::None => {
                if rows * cols != w.len() {
                    return Err(Error::shape(
                        "linear weight",
                        format!("{rows} x {cols}"),
                        w.len(),
                    ));
                }
                Ok(StepWeight::Float { w, rows, cols })
            }
        }
    }
}

/// A linear's input as its forward reads it and its backward needs it: int8 codes and scales
/// (`x̂`), or the float rows themselves.
pub(crate) enum LinearInput {
    Quantized(QuantizedActivations),
    Float {
        x: Vec<f32>,
        rows: usize,
        cols: usize,
    },
}

impl LinearInput {
    /// `rows` rows of `cols` features as `quant` feeds them to a linear. Several linears that read
    /// the same input (q, k, v; gate, up) share one: BitLinear would quantize it identically each
    /// time.
    pub(crate) fn new(x: Vec<f32>, rows: usize, cols: usize, quant: Quant) -> Result<Self> {
        match quant {
            Quant::BitNet => Ok(LinearInput::Quantized(act_quant(&x, rows, cols)?)),
            Quant::None => {
                if rows * cols != x.len() {
                    return Err(Error::shape(
                        "linear input",
                        format!("{rows} x {cols}"),
                        x.len(),
                    ));
                }
                Ok(LinearInput::Float { x, rows, cols })
            }
        }
    }
}

/// `y = x · Wᵀ`: `[rows, w.rows]`. The BitLinear case is the inference path itself,
/// [`ternary_matmul`], so that training and inference agree bit for bit.
pub(crate) fn linear(x: &LinearInput, w: &StepWeight) -> Result<Vec<f32>> {
    match (x, w) {
        (LinearInput::Quantized(x), StepWeight::Ternary(w)) => ternary_matmul(x, w, None),
        (
            LinearInput::Float { x, rows, cols },
            StepWeight::Float {
                w,
                rows: n,
                cols: k,
            },
        ) => {
            check_inner(*cols, *k)?;
            let mut y = Vec::with_capacity(rows * n);
            for x_row in x.chunks_exact(*cols) {
                for w_row in w.chunks_exact(*k) {
                    y.push(x_row.iter().zip(w_row).map(|(&a, &b)| a * b).sum());
                }
            }
            Ok(y)
        }
        _ => Err(mixed_operands()),
    }
}

/// The gradients `(dx, dW)` of [`linear`] for the upstream gradient `dy`: `dx = dy · W` and
/// `dW = dyᵀ · x`, with `Ŵ` and `x̂` in place of `W` and `x` under BitNet (the straight-through
/// estimator, [`ternary_matmul_backward`]).
pub(crate) fn linear_backward(
    x: &LinearInput,
    w: &StepWeight,
    dy: &[f32],
) -> Result<(Vec<f32>, Vec<f32>)> {
    match (x, w) {
        (LinearInput::Quantized(x), StepWeight::Ternary(w)) => ternary_matmul_backward(x, w, dy),
        (
            LinearInput::Float { x, rows, cols },
            StepWeight::Float {
                w,
                rows: n,
                cols: k,
            },
        ) => {
            check_inner(*cols, *k)?;
            if dy.len() != rows * n {
                return Err(Error::shape(
                    "linear output gradient",
                    format!("{rows} x {n}"),
                    dy.len(),
                ));
            }
            let mut dx = vec![0.0f32; x.len()];
            let mut dw = vec![0.0f32; w.len()];
            for m in 0..*rows {
                for j in 0..*n {
                    let d = dy[m * n + j];
                    for c in 0..*k {
                        dx[m * k + c] += d * w[j * k + c];
                        dw[j * k + c] += d * x[m * k + c];
                    }
                }
            }
            Ok((dx, dw))
        }
        _ => Err(mixed_operands()),
    }
}

fn check_inner(x_cols: usize, w_cols: usize) -> Result<()> {
    if x_cols == w_cols {
        Ok(())
    } else {
        Err(Error::shape("linear inner dimension", w_cols, x_cols))
    }
}

/// One operand made for BitNet and the other for float: two [`Quant`] settings mixed in a step.
fn mixed_operands() -> Error {
    Error::invalid(
        "linear operands",
        "a quantized and a float operand (made under different Quant settings)",
    )
}
