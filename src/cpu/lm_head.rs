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

/// [`lm_head`]'s logits wherever they could be the largest, [`lm_head_int8`]'s elsewhere: an
/// int8 screen that reads half an f16 table's bytes, and greedy ids (the first largest logit)
/// that are [`lm_head`]'s. For each row of `x`, every logit of the screen is taken; the row
/// with the largest (the first, on ties) is computed exactly, and so is every row whose screen
/// logit, raised by a bound on its error ([`ScreenBound`]), reaches that exact value. A row left
/// out is then provably below a row computed exactly, so it cannot be the largest. A row of `x`
/// that is not finite gets [`lm_head`]'s logits throughout. `int8` is `table` in 8 bits
/// ([`int8_table`]); errors as [`lm_head`].
///
/// ```
/// use bitnet_wgpu::cpu::{int8_table, lm_head, lm_head_screened};
/// let table = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.01]; // vocab 4, hidden 2
/// let x = [2.0, 3.0];
/// let logits = lm_head_screened(&x, 1, &table, &int8_table(&table, 4, 2)?)?;
/// let exact = lm_head(&x, 1, &table, 4, 2)?;
/// assert_eq!(logits[2..], exact[2..]); // 5.0 and 5.03: either could be the largest
/// assert_ne!(logits[0], exact[0]); // 2.0 could not: the screen's 2.0079 stays
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn lm_head_screened(
    x: &[f32],
    rows: usize,
    table: &[f32],
    int8: &Int8Table,
) -> Result<Vec<f32>> {
    let (vocab, hidden) = (int8.rows, int8.cols);
    check_rows(table, vocab, hidden, "lm_head table")?;
    let mut logits = lm_head_int8(x, rows, int8)?;
    for (row, logits) in x
        .chunks_exact(hidden)
        .zip(logits.chunks_exact_mut(vocab.max(1)))
    {
        let exact = |v: usize| lm_head(row, 1, &table[v * hidden..][..hidden], 1, hidden);
        let Some(bound) = ScreenBound::new(row) else {
            logits.copy_from_slice(&lm_head(row, 1, table, vocab, hidden)?);
            continue;
        };
        let top = first_largest(logits);
        let best = exact(top)?[0];
        for (v, codes) in int8.codes.chunks_exact(hidden).enumerate() {
            let sums = codes
                .chunks(INT8_HEAD_BLOCK)
                .map(|b| b.iter().map(|c| u16::from(c.unsigned_abs())).sum());
            let total = codes.iter().map(|c| u32::from(c.unsigned_abs())).sum();
            if v == top || bound.admits(logits[v], int8.scales[v], total, sums, best) {
                logits[v] = exact(v)?[0];
            }
        }
    }
    Ok(logits)
}

/// The index of the first largest value (0 for an empty slice).
pub(crate) fn first_largest(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

/// How far an [`lm_head_int8`] logit can be from [`lm_head`]'s, for one input row `x`, and the
/// test [`lm_head_screened`] makes with it. With the row's codes `q` and scale `s`, the input's
/// codes `p` and block scales `t_b`, both rounded to within half a code (and a few ulps):
/// `x · w - s Σ_b t_b q_b · p_b = Σ (w - s q) x + s Σ q (x - t_b p)`, at most
/// `s (½ |x|₁ + ½ Σ_b t_b |q_b|₁)`. To that come the f32 rounding of the exact sum (at most
/// `cols` ulps of `Σ |w x| ≤ 127 s |x|₁`) and of the screen's (a few ulps): the slack in the two
/// factors below covers both with room to spare.
pub struct ScreenBound {
    /// The `|x|₁` term, its factor applied.
    l1: f32,
    /// The block terms' factors times each block's scale `t_b`.
    blocks: Vec<f32>,
    /// The largest of `blocks`.
    widest: f32,
}

impl ScreenBound {
    /// The bound for input row `x`; `None` where it is not finite (no bound holds then).
    pub fn new(x: &[f32]) -> Option<Self> {
        let l1: f32 = x.iter().map(|v| v.abs()).sum();
        if !l1.is_finite() {
            return None;
        }
        let rounding = 128.0 * x.len() as f32 * f32::EPSILON;
        let mut codes = [0i8; INT8_HEAD_BLOCK];
        let blocks: Vec<f32> = x
            .chunks(INT8_HEAD_BLOCK)
            .map(|b| 0.501 * quantize_int8(b, &mut codes[..b.len()]))
            .collect();
        Some(ScreenBound {
            l1: (0.51 + rounding) * l1,
            widest: blocks.iter().fold(0.0, |m, &t| m.max(t)),
            blocks,
        })
    }

    /// Whether a row whose screen logit is `approx` may reach `best`: its row scale `scale`, its
    /// codes' absolute sum `total` and their sums per [`INT8_HEAD_BLOCK`] `sums`. Tested first
    /// with every block at the widest scale (no per-block work for most rows), then block by
    /// block.
    pub fn admits(
        &self,
        approx: f32,
        scale: f32,
        total: u32,
        sums: impl Iterator<Item = u16>,
        best: f32,
    ) -> bool {
        approx + scale * (self.l1 + self.widest * total as f32) >= best
            && approx
                + scale
                    * sums
                        .zip(&self.blocks)
                        .fold(self.l1, |acc, (c, t)| acc + t * f32::from(c))
                >= best
    }
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

    /// A `[rows, cols]` table whose rows come in near-twins (a row, then that row nudged by
    /// less than the screen's error), so that the screen alone cannot order them.
    fn twin_table(seed: u64, rows: usize, cols: usize) -> Vec<f32> {
        let base = uniform(seed, rows * cols, -1.0, 1.0);
        let nudge = uniform(seed + 1, rows * cols, -1e-4, 1e-4);
        let mut table = base.clone();
        for r in (1..rows).step_by(2) {
            for k in 0..cols {
                table[r * cols + k] = base[(r - 1) * cols + k] + nudge[r * cols + k];
            }
        }
        table
    }

    #[test]
    fn the_screen_keeps_the_greedy_id_and_its_logit() {
        for (seed, rows, cols, n) in [
            (1, 1, 1, 1),
            (2, 9, 5, 2),
            (3, 64, 130, 3),
            (4, 501, 300, 2),
        ] {
            let table = twin_table(seed, rows, cols);
            let x = uniform(seed + 2, n * cols, -2.0, 2.0);
            let int8 = int8_table(&table, rows, cols).unwrap();
            let got = lm_head_screened(&x, n, &table, &int8).unwrap();
            let exact = lm_head(&x, n, &table, rows, cols).unwrap();
            let approx = lm_head_int8(&x, n, &int8).unwrap();
            for ((got, exact), approx) in got
                .chunks_exact(rows)
                .zip(exact.chunks_exact(rows))
                .zip(approx.chunks_exact(rows))
            {
                let id = crate::cpu::argmax(exact).unwrap() as usize;
                assert_eq!(crate::cpu::argmax(got).unwrap() as usize, id);
                // Each logit is the exact one or the screen's, and the largest is exact.
                for ((g, e), a) in got.iter().zip(exact).zip(approx) {
                    assert!(g.to_bits() == e.to_bits() || g.to_bits() == a.to_bits());
                    assert!(*g <= got[id]);
                }
                assert_eq!(got[id].to_bits(), exact[id].to_bits());
            }
        }
    }

    #[test]
    fn the_screen_bound_holds_for_every_row() {
        // Activations with outliers in one block, the case the per-block bound is for.
        let (rows, cols) = (400, 257);
        let table = uniform(11, rows * cols, -1.0, 1.0);
        let int8 = int8_table(&table, rows, cols).unwrap();
        let mut x = uniform(12, cols, -1.0, 1.0);
        x[3] = 40.0;
        x[140] = -25.0;
        let bound = ScreenBound::new(&x).unwrap();
        let exact = lm_head(&x, 1, &table, rows, cols).unwrap();
        let approx = lm_head_int8(&x, 1, &int8).unwrap();
        let best = exact.iter().fold(f32::MIN, |m, &v| m.max(v));
        let mut admitted = 0;
        for (v, codes) in int8.codes.chunks_exact(cols).enumerate() {
            let sums = || {
                codes
                    .chunks(INT8_HEAD_BLOCK)
                    .map(|b| b.iter().map(|c| u16::from(c.unsigned_abs())).sum())
            };
            let total = codes.iter().map(|c| u32::from(c.unsigned_abs())).sum();
            // `admits(approx, best)` holds for every `best` up to the exact logit ...
            assert!(bound.admits(approx[v], int8.scales[v], total, sums(), exact[v]));
            admitted += usize::from(bound.admits(approx[v], int8.scales[v], total, sums(), best));
        }
        // ... and against the largest it leaves out most rows.
        assert!(admitted < rows / 10, "{admitted} of {rows}");
        assert!(ScreenBound::new(&[1.0, f32::NAN]).is_none());
    }

    #[test]
    fn the_screen_computes_a_row_that_is_not_finite_exactly() {
        let (rows, cols) = (20, 6);
        let table = uniform(13, rows * cols, -1.0, 1.0);
        let int8 = int8_table(&table, rows, cols).unwrap();
        let mut x = uniform(14, 2 * cols, -1.0, 1.0);
        x[cols + 2] = f32::INFINITY;
        let got = lm_head_screened(&x, 2, &table, &int8).unwrap();
        let exact = lm_head(&x[cols..], 1, &table, rows, cols).unwrap();
        assert_eq!(
            got[rows..].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            exact.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        assert!(lm_head_screened(&x, 2, &table[1..], &int8).is_err());
    }

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
