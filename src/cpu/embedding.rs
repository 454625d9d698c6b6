//! Token embedding lookup.

use crate::{Error, Result};

/// Row `tokens[r]` of the `[vocab, hidden]` table `table`, for every token: `[tokens.len(), hidden]`.
/// A token at or past `vocab` is an error.
///
/// ```
/// let table = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]; // 3 tokens, hidden 2
/// assert_eq!(bitnet_wgpu::cpu::embedding(&table, 3, 2, &[2, 0])?, [4.0, 5.0, 0.0, 1.0]);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn embedding(table: &[f32], vocab: usize, hidden: usize, tokens: &[u32]) -> Result<Vec<f32>> {
    if table.len() != vocab * hidden {
        return Err(Error::shape(
            "embedding table",
            format!("{vocab} x {hidden}"),
            table.len(),
        ));
    }
    let mut out = Vec::with_capacity(tokens.len() * hidden);
    for &token in tokens {
        let t = token as usize;
        if t >= vocab {
            return Err(Error::invalid(
                "token",
                format!("{token} is not below the vocabulary size {vocab}"),
            ));
        }
        out.extend_from_slice(&table[t * hidden..][..hidden]);
    }
    Ok(out)
}

/// The gradient of [`embedding`] wrt its table: row `tokens[r]` of the `[vocab, hidden]` result
/// accumulates row `r` of `dy` (`[tokens.len(), hidden]`), in token order, so a token that occurs
/// twice gets the sum of both rows, added in the same order on every run. Errors: a `dy` shaped
/// unlike the lookup's output, a token at or past `vocab`.
///
/// ```
/// use bitnet_wgpu::cpu::embedding_backward;
/// let dtable = embedding_backward(&[2, 0, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3, 2)?;
/// assert_eq!(dtable, [3.0, 4.0, 0.0, 0.0, 6.0, 8.0]);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn embedding_backward(
    tokens: &[u32],
    dy: &[f32],
    vocab: usize,
    hidden: usize,
) -> Result<Vec<f32>> {
    if tokens.len().checked_mul(hidden) != Some(dy.len()) {
        return Err(Error::shape(
            "embedding_backward gradient",
            format!("{} x {hidden}", tokens.len()),
            dy.len(),
        ));
    }
    let mut dtable = vec![0.0f32; vocab * hidden];
    for (&token, dy_row) in tokens.iter().zip(dy.chunks_exact(hidden.max(1))) {
        let t = token as usize;
        if t >= vocab {
            return Err(Error::invalid(
                "token",
                format!("{token} is not below the vocabulary size {vocab}"),
            ));
        }
        for (d, &g) in dtable[t * hidden..][..hidden].iter_mut().zip(dy_row) {
            *d += g;
        }
    }
    Ok(dtable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::gradcheck::{assert_grad_close, numeric_grad, uniform, weighted_sum};

    #[test]
    fn backward_matches_finite_differences() {
        // Repeated tokens and a token never looked up (its gradient row stays zero).
        let (vocab, hidden, tokens) = (5, 3, [4u32, 1, 4, 0, 4]);
        let table = uniform(1, vocab * hidden, -1.0, 1.0);
        let r = uniform(2, tokens.len() * hidden, -1.0, 1.0);
        let dtable = embedding_backward(&tokens, &r, vocab, hidden).unwrap();
        let numeric = numeric_grad(&table, 1e-2, |t| {
            weighted_sum(&embedding(t, vocab, hidden, &tokens).unwrap(), &r)
        });
        assert_grad_close("embedding dtable", &dtable, &numeric, 1e-4, 1e-4);
        assert!(dtable[2 * hidden..3 * hidden].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(embedding_backward(&[0, 1], &[0.0; 5], 3, 2).is_err());
        assert!(embedding_backward(&[3], &[0.0; 2], 3, 2).is_err());
    }
}
