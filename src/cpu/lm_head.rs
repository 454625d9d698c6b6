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
