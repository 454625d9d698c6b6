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
    check_rows(table, vocab, hidden, "lm_head table")?;
    check_rows(x, rows, hidden, "lm_head input")?;
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

/// Columns that share one activation scale in [`lm_head_int8`].
pub const INT8_HEAD_BLOCK: usize = 128;

/// An lm_head table in 8 bits ([`int8_table`]): `table[v] ≈ codes[v] * scales[v]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Int8Table {
    pub rows: usize,
    pub cols: usize,
    /// `[rows, cols]`, each in -127..=127.
    pub codes: Vec<i8>,
    /// One per row.
    pub scales: Vec<f32>,
}

/// `values` in 8 bits, symmetric absmax: `scale = max|v| / 127` and
/// `code = clamp(round_ties_even(v * 127 / max|v|), -127, 127)` (so that `v ≈ code * scale`);
/// all zeros give a zero scale, a NaN or an infinity a NaN scale, zero codes both.
///
/// ```
/// let mut codes = [0i8; 3];
/// let scale = bitnet_wgpu::cpu::quantize_int8(&[0.5, -1.0, 0.25], &mut codes);
/// assert_eq!((codes, scale), ([64, -127, 32], 1.0 / 127.0));
/// ```
#[inline]
pub fn quantize_int8(values: &[f32], codes: &mut [i8]) -> f32 {
    let max = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    if !values.iter().all(|v| v.is_finite()) || max == 0.0 {
        codes.fill(0);
        return if max == 0.0 { 0.0 } else { f32::NAN };
    }
    let inverse = 127.0 / max;
    for (c, &v) in codes.iter_mut().zip(values) {
        *c = (v * inverse).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    max / 127.0
}

/// The `[vocab, hidden]` table row by row in 8 bits ([`quantize_int8`]): a quarter of its f32
/// bytes, half of its f16 ones, for [`lm_head_int8`].
pub fn int8_table(table: &[f32], vocab: usize, hidden: usize) -> Result<Int8Table> {
    check_rows(table, vocab, hidden, "lm_head table")?;
    let mut codes = vec![0i8; table.len()];
    let scales = table
        .chunks_exact(hidden)
        .zip(codes.chunks_exact_mut(hidden))
        .map(|(row, codes)| quantize_int8(row, codes))
        .collect();
    Ok(Int8Table {
        rows: vocab,
        cols: hidden,
        codes,
        scales,
    })
}

/// An approximation of [`lm_head`] that reads a quarter of the bytes of an f32 table: each row
/// of `x` is quantized in blocks of [`INT8_HEAD_BLOCK`] columns ([`quantize_int8`], scale `s_b`,
/// codes `q`), and `logits[r, v] = (sum_b dot_b * s_b) * scales[v]` with `dot_b` the exact
/// integer product of block `b`'s codes with the table's codes (the blocks summed in order in
/// f32, from `0.0`). Errors as [`lm_head`].
///
/// ```
/// use bitnet_wgpu::cpu::{int8_table, lm_head, lm_head_int8};
/// let table = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]; // vocab 3, hidden 2
/// let logits = lm_head_int8(&[2.0, 3.0], 1, &int8_table(&table, 3, 2)?)?;
/// let exact = lm_head(&[2.0, 3.0], 1, &table, 3, 2)?;
/// assert!(logits.iter().zip(&exact).all(|(a, b)| (a - b).abs() < 0.02));
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn lm_head_int8(x: &[f32], rows: usize, table: &Int8Table) -> Result<Vec<f32>> {
    let hidden = table.cols;
    check_rows(x, rows, hidden, "lm_head input")?;
    let mut logits = Vec::with_capacity(rows * table.rows);
    for row in x.chunks_exact(hidden) {
        let mut codes = vec![0i8; hidden];
        let scales: Vec<f32> = row
            .chunks(INT8_HEAD_BLOCK)
            .zip(codes.chunks_mut(INT8_HEAD_BLOCK))
            .map(|(values, codes)| quantize_int8(values, codes))
            .collect();
        for (w, &scale) in table.codes.chunks_exact(hidden).zip(&table.scales) {
            let mut sum = 0.0f32;
            for ((x, w), &s) in codes
                .chunks(INT8_HEAD_BLOCK)
                .zip(w.chunks(INT8_HEAD_BLOCK))
                .zip(&scales)
            {
                let dot: i32 = x
                    .iter()
                    .zip(w)
                    .map(|(&a, &b)| i32::from(a) * i32::from(b))
                    .sum();
                sum += dot as f32 * s;
            }
            logits.push(sum * scale);
        }
    }
    Ok(logits)
}

/// Refuses a hidden size of 0 and `values` (the input, or the table, as `what` names it) that
/// are not `[rows, hidden]`.
fn check_rows(values: &[f32], rows: usize, hidden: usize, what: &'static str) -> Result<()> {
    if hidden == 0 {
        return Err(Error::Empty("lm_head hidden size"));
    }
    if values.len() != rows * hidden {
        return Err(Error::shape(
            what,
            format!("{rows} x {hidden}"),
            values.len(),
        ));
    }
    Ok(())
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
