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
