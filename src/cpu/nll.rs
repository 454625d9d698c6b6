//! How surprised a model is by the token that came next.

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

#[cfg(test)]
mod tests {
    use super::*;

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
