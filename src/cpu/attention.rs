//! Causal grouped-query scaled dot-product attention over a KV cache.

use crate::{Error, Result};

/// The head counts and size of an attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads; query head `h` reads kv head `h / (heads / kv_heads)` (grouped-query
    /// attention, transformers' `repeat_kv`).
    pub kv_heads: usize,
    /// Size of every head.
    pub head_dim: usize,
}

/// Attention of the `n` query rows `q` (`[n, heads * head_dim]`) over the `t >= n` cached rows of
/// `k` and `v` (`[t, kv_heads * head_dim]`), where the queries are the *last* `n` positions: query
/// row `r` sits at position `p = t - n + r` and sees keys `0..=p` (the causal mask).
///
/// Per query head `h` with kv head `g = h / (heads / kv_heads)`, in f32:
/// `s[j] = (q_h · k_g[j]) * (1 / sqrt(head_dim))`, `a = softmax(s)` computed as
/// `exp(s[j] - max s) / sum exp(s - max s)`, `out_h = sum_j a[j] * v_g[j]`.
/// Dot products and sums run left to right; the shader twin is compared with a tolerance. The
/// output is `[n, heads * head_dim]`, heads side by side, as `o_proj` expects.
///
/// ```
/// use bitnet_wgpu::cpu::{AttentionShape, attention};
/// // One position: the softmax weight is 1 and the output is that position's value.
/// let shape = AttentionShape { heads: 2, kv_heads: 1, head_dim: 2 };
/// let out = attention(&[1.0, 2.0, -3.0, 0.5], &[0.3, 0.7], &[5.0, -6.0], shape)?;
/// assert_eq!(out, [5.0, -6.0, 5.0, -6.0]);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn attention(q: &[f32], k: &[f32], v: &[f32], shape: AttentionShape) -> Result<Vec<f32>> {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim,
    } = shape;
    if heads == 0 || kv_heads == 0 || head_dim == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(Error::invalid(
            "attention shape",
            format!(
                "{heads} heads, {kv_heads} kv heads, head_dim {head_dim}: all must be positive \
                 and heads a multiple of kv heads"
            ),
        ));
    }
    let q_width = heads * head_dim;
    let kv_width = kv_heads * head_dim;
    if !q.len().is_multiple_of(q_width) {
        return Err(Error::shape(
            "attention queries",
            format!("n x {q_width}"),
            q.len(),
        ));
    }
    if !k.len().is_multiple_of(kv_width) || v.len() != k.len() {
        return Err(Error::shape(
            "attention keys and values",
            format!("t x {kv_width} each"),
            format!("{} and {}", k.len(), v.len()),
        ));
    }
    let (n, t) = (q.len() / q_width, k.len() / kv_width);
    if n > t {
        return Err(Error::shape(
            "attention cache rows",
            format!("at least the {n} query rows"),
            t,
        ));
    }
    let group = heads / kv_heads;
    let scaling = 1.0 / (head_dim as f32).sqrt();
    let head = |rows, width, row, h| head_slice(rows, width, head_dim, row, h);
    let mut out = Vec::with_capacity(q.len());
    for r in 0..n {
        let visible = t - n + r + 1;
        for h in 0..heads {
            let g = h / group;
            let q_h = head(q, q_width, r, h);
            let scores: Vec<f32> = (0..visible)
                .map(|j| dot(q_h, head(k, kv_width, j, g)) * scaling)
                .collect();
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exps: Vec<f32> = scores.iter().map(|&s| (s - max).exp()).collect();
            let total: f32 = exps.iter().sum();
            let mut acc = vec![0.0f32; head_dim];
            for (j, &e) in exps.iter().enumerate() {
                let weight = e / total;
                for (a, &val) in acc.iter_mut().zip(head(v, kv_width, j, g)) {
                    *a += weight * val;
                }
            }
            out.extend(acc);
        }
    }
    Ok(out)
}

/// Head `h` of row `row` in a row-major matrix of `width` columns.
fn head_slice(rows: &[f32], width: usize, head_dim: usize, row: usize, h: usize) -> &[f32] {
    &rows[row * width + h * head_dim..][..head_dim]
}

/// Left-to-right f32 dot product.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(&x, &y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: AttentionShape = AttentionShape {
        heads: 2,
        kv_heads: 1,
        head_dim: 2,
    };

    #[test]
    fn two_positions_by_hand() {
        // head_dim 2, scaling 1/sqrt(2); q·k = [0, sqrt(2) * ln 3] gives scores [0, ln 3]
        // and weights [1/4, 3/4].
        let s = std::f32::consts::SQRT_2 * 3f32.ln();
        let q = [1.0, 0.0, 0.0, 1.0];
        let k = [0.0, 0.0, s, s];
        let v = [4.0, 0.0, 0.0, 8.0];
        let out = attention(&q, &k, &v, SHAPE).unwrap();
        for (a, b) in out.iter().zip([1.0, 6.0, 1.0, 6.0]) {
            assert!((a - b).abs() < 1e-5, "{out:?}");
        }
    }

    #[test]
    fn grouped_query_heads_read_their_kv_head() {
        // 4 query heads, 2 kv heads, one position: heads 0, 1 get kv head 0's value; 2, 3 kv head 1's.
        let shape = AttentionShape {
            heads: 4,
            kv_heads: 2,
            head_dim: 1,
        };
        let out = attention(&[1.0, 2.0, 3.0, 4.0], &[0.5, 0.5], &[10.0, 20.0], shape).unwrap();
        assert_eq!(out, [10.0, 10.0, 20.0, 20.0]);
    }

    #[test]
    fn later_tokens_do_not_change_earlier_outputs() {
        let q: Vec<f32> = (0..12).map(|i| (i as f32 * 0.7).sin()).collect();
        let k: Vec<f32> = (0..6).map(|i| (i as f32 * 1.3).cos()).collect();
        let v: Vec<f32> = (0..6).map(|i| i as f32 - 2.5).collect();
        let all = attention(&q, &k, &v, SHAPE).unwrap();
        for n in 1..=3 {
            let prefix = attention(&q[..4 * n], &k[..2 * n], &v[..2 * n], SHAPE).unwrap();
            assert_eq!(prefix, all[..4 * n]);
        }
        // The first row sees only the first position.
        assert_eq!(all[..4], [v[0], v[1], v[0], v[1]]);
    }

    #[test]
    fn large_scores_stay_finite() {
        // Scores of ±1.4e8: exp would overflow without the max subtraction.
        let k = [1e4, 1e4, -1e4, -1e4];
        let out = attention(&[1e4; 4], &k, &[1.0, 2.0, 3.0, 4.0], SHAPE).unwrap();
        assert_eq!(out, [1.0, 2.0, 1.0, 2.0]);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let bad = AttentionShape {
            heads: 3,
            kv_heads: 2,
            head_dim: 2,
        };
        assert!(attention(&[0.0; 6], &[0.0; 4], &[0.0; 4], bad).is_err());
        assert!(attention(&[0.0; 5], &[0.0; 2], &[0.0; 2], SHAPE).is_err());
        assert!(attention(&[0.0; 4], &[0.0; 2], &[0.0; 4], SHAPE).is_err());
        // More queries than cached positions.
        assert!(attention(&[0.0; 8], &[0.0; 2], &[0.0; 2], SHAPE).is_err());
    }
}
