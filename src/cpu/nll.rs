//! How surprised a model is by the token that came next, and the gradient that training draws
//! from it.

use crate::{Error, Result};

/// The negative log-likelihood `-log softmax(logits_row)[target]`, in f64 so that a long sum of
/// them (perplexity) does not drift. A target whose logit is `-inf` gives `+inf` (a row of `-inf`
/// only included); a NaN logit gives NaN.
///
/// Panics when `target` is not an index of `logits_row`.
///
/// ```
/// use bitnet_wgpu::cpu::nll;
/// // Two equal logits: probability 1/2.
/// assert!((nll(&[3.0, 3.0], 1) - 2f64.ln()).abs() < 1e-12);
/// ```
pub fn nll(logits_row: &[f32], target: u32) -> f64 {
    if logits_row.iter().any(|v| v.is_nan()) {
        return f64::NAN;
    }
    let max = logits_row
        .iter()
        .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
    if max == f64::NEG_INFINITY {
        return f64::INFINITY;
    }
    let sum: f64 = logits_row.iter().map(|&v| (f64::from(v) - max).exp()).sum();
    max + sum.ln() - f64::from(logits_row[target as usize])
}

/// The softmax cross-entropy of each row of `logits` (`[targets.len(), vocab]`) against its
/// target, fused with its gradient: `(losses, dlogits)` where `losses[r] = nll(row r, targets[r])`
/// (see [`nll`]) and `dlogits[r] = softmax(row r) - onehot(targets[r])`, the gradient of
/// `losses[r]` wrt row `r`. The softmax is taken in f64 from the shifted logits, as [`nll`] takes
/// it. A mean loss over rows scales `dlogits` by the same `1 / count`; that is the caller's.
/// Errors: `vocab` 0, `logits` shaped unlike `targets.len() x vocab`, a target not below `vocab`.
///
/// ```
/// use bitnet_wgpu::cpu::cross_entropy;
/// let (losses, dlogits) = cross_entropy(&[3.0, 3.0], 2, &[1])?;
/// assert!((losses[0] - 2f64.ln()).abs() < 1e-12);
/// assert_eq!(dlogits, [0.5, -0.5]);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn cross_entropy(
    logits: &[f32],
    vocab: usize,
    targets: &[u32],
) -> Result<(Vec<f64>, Vec<f32>)> {
    if vocab == 0 {
        return Err(Error::Empty("cross_entropy vocabulary"));
    }
    if targets.len().checked_mul(vocab) != Some(logits.len()) {
        return Err(Error::shape(
            "cross_entropy logits",
            format!("{} x {vocab}", targets.len()),
            logits.len(),
        ));
    }
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        return Err(Error::invalid(
            "target",
            format!("{bad} is not below the vocabulary size {vocab}"),
        ));
    }
    let mut losses = Vec::with_capacity(targets.len());
    let mut dlogits = Vec::with_capacity(logits.len());
    for (row, &target) in logits.chunks_exact(vocab).zip(targets) {
        losses.push(nll(row, target));
        let max = row
            .iter()
            .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
        let exps: Vec<f64> = row.iter().map(|&v| (f64::from(v) - max).exp()).collect();
        let total: f64 = exps.iter().sum();
        for (i, e) in exps.iter().enumerate() {
            let onehot = if i == target as usize { 1.0 } else { 0.0 };
            dlogits.push((e / total - onehot) as f32);
        }
    }
    Ok((losses, dlogits))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gradcheck::{assert_grad_close, numeric_grad, uniform};

    #[test]
    fn cross_entropy_gradient_matches_finite_differences() {
        for (seed, rows, vocab) in [(1, 1, 1), (2, 3, 7), (3, 2, 37)] {
            let logits = uniform(seed, rows * vocab, -4.0, 4.0);
            let targets: Vec<u32> = (0..rows).map(|r| ((r * 5 + 3) % vocab) as u32).collect();
            let (losses, dlogits) = cross_entropy(&logits, vocab, &targets).unwrap();
            for (r, row) in logits.chunks(vocab).enumerate() {
                assert_eq!(losses[r], nll(row, targets[r]));
            }
            let numeric = numeric_grad(&logits, 1e-2, |l| {
                cross_entropy(l, vocab, &targets).unwrap().0.iter().sum()
            });
            assert_grad_close("cross_entropy dlogits", &dlogits, &numeric, 1e-4, 1e-3);
        }
    }

    #[test]
    fn cross_entropy_refuses_bad_shapes_and_targets() {
        assert!(cross_entropy(&[0.0; 5], 2, &[0, 1]).is_err());
        assert!(cross_entropy(&[0.0; 4], 2, &[0, 2]).is_err());
        assert!(matches!(cross_entropy(&[], 0, &[]), Err(Error::Empty(_))));
    }

    #[test]
    fn nll_is_the_negative_log_softmax() {
        let logits = [1.0f32, 2.0, 3.0];
        let z: f64 = logits.iter().map(|&v| f64::from(v).exp()).sum();
        for (i, &v) in logits.iter().enumerate() {
            let expect = -(f64::from(v).exp() / z).ln();
            assert!((nll(&logits, i as u32) - expect).abs() < 1e-12);
        }
        // Large logits would overflow a naive exp; the shift by the maximum keeps it finite.
        assert!((nll(&[1000.0, 1000.0], 0) - 2f64.ln()).abs() < 1e-12);
        assert_eq!(nll(&[0.0, f32::NEG_INFINITY], 1), f64::INFINITY);
        assert_eq!(nll(&[f32::NEG_INFINITY; 2], 1), f64::INFINITY);
        assert!(nll(&[f32::NAN, f32::NEG_INFINITY], 1).is_nan());
        assert_eq!(nll(&[5.0], 0), 0.0);
    }
}
