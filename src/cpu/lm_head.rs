//! The float output projection: logits from hidden states.

use crate::{Error, Result};

/// `logits[r, v] = x[r] · table[v]` for the `rows` rows of `x` (`[rows, hidden]`) against the
/// `[vocab, hidden]` table (lm_head, or the tied embeddings): `[rows, vocab]`. Each dot product
/// runs left to right in f32; the shader twin adds in another order and is compared with a
/// tolerance relative to `sum |x_i * w_i|`.
///
/// ```
/// let table = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]; // vocab 3, hidden 2
/// assert_eq!(bitnet_wgpu::cpu::lm_head(&[2.0, 3.0], 1, &table, 3, 2)?, [2.0, 3.0, 5.0]);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn lm_head(
    x: &[f32],
    rows: usize,
    table: &[f32],
    vocab: usize,
    hidden: usize,
) -> Result<Vec<f32>> {
    if hidden == 0 {
        return Err(Error::Empty("lm_head hidden size"));
    }
    if x.len() != rows * hidden {
        return Err(Error::shape(
            "lm_head input",
            format!("{rows} x {hidden}"),
            x.len(),
        ));
    }
    if table.len() != vocab * hidden {
        return Err(Error::shape(
            "lm_head table",
            format!("{vocab} x {hidden}"),
            table.len(),
        ));
    }
    let mut logits = Vec::with_capacity(rows * vocab);
    for row in x.chunks_exact(hidden) {
        for w in table.chunks_exact(hidden) {
            logits.push(row.iter().zip(w).map(|(&a, &b)| a * b).sum());
        }
    }
    Ok(logits)
}

/// The gradients of [`lm_head`]: `(dx, dtable)` for the upstream gradient `dlogits`
/// (`[rows, vocab]`): `dx = dlogits · table` (`[rows, hidden]`) and `dtable = dlogitsᵀ · x`
/// (`[vocab, hidden]`), each sum running over rows, or over vocabulary entries, in order. With tied
/// embeddings `dtable` adds to the embedding's own gradient. Errors as [`lm_head`], and a
/// `dlogits` shaped unlike the logits.
///
/// ```
/// let table = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]; // vocab 3, hidden 2
/// let (dx, dtable) = bitnet_wgpu::cpu::lm_head_backward(&[2.0, 3.0], 1, &table, 3, 2, &[1.0, 0.0, 2.0])?;
/// assert_eq!(dx, [3.0, 2.0]);
/// assert_eq!(dtable, [2.0, 3.0, 0.0, 0.0, 4.0, 6.0]);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn lm_head_backward(
    x: &[f32],
    rows: usize,
    table: &[f32],
    vocab: usize,
    hidden: usize,
    dlogits: &[f32],
) -> Result<(Vec<f32>, Vec<f32>)> {
    // The forward's checks, on the forward's operands.
    lm_head(&[], 0, table, vocab, hidden)?;
    if x.len() != rows * hidden || dlogits.len() != rows * vocab {
        return Err(Error::shape(
            "lm_head_backward input and gradient",
            format!("{rows} x {hidden} and {rows} x {vocab}"),
            format!("{} and {}", x.len(), dlogits.len()),
        ));
    }
    let mut dx = vec![0.0f32; x.len()];
    let mut dtable = vec![0.0f32; table.len()];
    for ((x_row, dx_row), d_row) in x
        .chunks_exact(hidden)
        .zip(dx.chunks_exact_mut(hidden))
        .zip(dlogits.chunks_exact(vocab.max(1)))
    {
        for ((&d, w), dw) in d_row
            .iter()
            .zip(table.chunks_exact(hidden))
            .zip(dtable.chunks_exact_mut(hidden))
        {
            for i in 0..hidden {
                dx_row[i] += d * w[i];
                dw[i] += d * x_row[i];
            }
        }
    }
    Ok((dx, dtable))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gradcheck::{assert_grad_close, numeric_grad, uniform, weighted_sum};

    #[test]
    fn backward_matches_finite_differences() {
        for (seed, rows, vocab, hidden) in [(1, 1, 1, 1), (2, 3, 7, 5), (3, 2, 37, 16)] {
            let x = uniform(seed, rows * hidden, -1.0, 1.0);
            let table = uniform(seed + 10, vocab * hidden, -1.0, 1.0);
            let r = uniform(seed + 20, rows * vocab, -1.0, 1.0);
            let (dx, dtable) = lm_head_backward(&x, rows, &table, vocab, hidden, &r).unwrap();
            let nx = numeric_grad(&x, 1e-2, |x| {
                weighted_sum(&lm_head(x, rows, &table, vocab, hidden).unwrap(), &r)
            });
            let nt = numeric_grad(&table, 1e-2, |t| {
                weighted_sum(&lm_head(&x, rows, t, vocab, hidden).unwrap(), &r)
            });
            assert_grad_close("lm_head dx", &dx, &nx, 1e-3, 1e-3);
            assert_grad_close("lm_head dtable", &dtable, &nt, 1e-3, 1e-3);
        }
        assert!(lm_head_backward(&[0.0; 2], 1, &[0.0; 6], 3, 2, &[0.0; 2]).is_err());
    }
}
