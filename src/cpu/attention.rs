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
    let (n, t) = check_shape(q, k, v, shape)?;
    let AttentionShape {
        heads,
        kv_heads,
        head_dim,
    } = shape;
    let (q_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
    let group = heads / kv_heads;
    let head = |rows, width, row, h| head_slice(rows, width, head_dim, row, h);
    let mut out = Vec::with_capacity(q.len());
    for r in 0..n {
        let visible = t - n + r + 1;
        for h in 0..heads {
            let g = h / group;
            let weights =
                softmax_weights(head(q, q_width, r, h), k, kv_width, head_dim, g, visible);
            let mut acc = vec![0.0f32; head_dim];
            for (j, &weight) in weights.iter().enumerate() {
                for (a, &val) in acc.iter_mut().zip(head(v, kv_width, j, g)) {
                    *a += weight * val;
                }
            }
            out.extend(acc);
        }
    }
    Ok(out)
}

/// The gradients of [`attention`] wrt `q`, `k` and `v` for the upstream gradient `dout`
/// (`[n, heads * head_dim]`, like the output): `(dq, dk, dv)`, shaped like `q`, `k`, `v`.
///
/// The softmax weights `a` are recomputed exactly as the forward computes them. Per query row and
/// head, with `da[j] = dout_h · v_g[j]`: `dv_g[j] += a[j] * dout_h`, the softmax's own backward
/// `ds[j] = a[j] * (da[j] - sum_i a[i] * da[i])`, then `dq_h += ds[j] * scaling * k_g[j]` and
/// `dk_g[j] += ds[j] * scaling * q_h`. A kv head's gradient sums over every query head of its
/// group (transformers' `repeat_kv` copies, whose backward is that sum), and cached rows no query
/// sees get zero. Errors as [`attention`], and a `dout` shaped unlike `q`.
///
/// ```
/// use bitnet_wgpu::cpu::{AttentionShape, attention_backward};
/// // One position: the output is v whatever q and k are, so only dv is non-zero, summed over
/// // the two query heads that share the kv head.
/// let shape = AttentionShape { heads: 2, kv_heads: 1, head_dim: 2 };
/// let (dq, dk, dv) = attention_backward(&[1.0, 2.0, -3.0, 0.5], &[0.3, 0.7], &[5.0, -6.0],
///                                       &[1.0, 0.0, 0.5, 2.0], shape)?;
/// assert_eq!((dq, dk, dv), (vec![0.0; 4], vec![0.0; 2], vec![1.5, 2.0]));
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dout: &[f32],
    shape: AttentionShape,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let (n, t) = check_shape(q, k, v, shape)?;
    if dout.len() != q.len() {
        return Err(Error::shape(
            "attention output gradient",
            q.len(),
            dout.len(),
        ));
    }
    let AttentionShape {
        heads,
        kv_heads,
        head_dim,
    } = shape;
    let (q_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
    let group = heads / kv_heads;
    let scaling = 1.0 / (head_dim as f32).sqrt();
    let head = |rows, width, row, h| head_slice(rows, width, head_dim, row, h);
    let mut dq = vec![0.0f32; q.len()];
    let mut dk = vec![0.0f32; k.len()];
    let mut dv = vec![0.0f32; v.len()];
    for r in 0..n {
        let visible = t - n + r + 1;
        for h in 0..heads {
            let g = h / group;
            let q_h = head(q, q_width, r, h);
            let dout_h = head(dout, q_width, r, h);
            let a = softmax_weights(q_h, k, kv_width, head_dim, g, visible);
            let da: Vec<f32> = (0..visible)
                .map(|j| dot(dout_h, head(v, kv_width, j, g)))
                .collect();
            let a_dot_da: f32 = a.iter().zip(&da).map(|(&x, &y)| x * y).sum();
            for j in 0..visible {
                let at = j * kv_width + g * head_dim;
                for (d, &o) in dv[at..at + head_dim].iter_mut().zip(dout_h) {
                    *d += a[j] * o;
                }
                let ds = a[j] * (da[j] - a_dot_da) * scaling;
                let q_at = r * q_width + h * head_dim;
                for (d, &kv) in dq[q_at..q_at + head_dim]
                    .iter_mut()
                    .zip(head(k, kv_width, j, g))
                {
                    *d += ds * kv;
                }
                for (d, &qv) in dk[at..at + head_dim].iter_mut().zip(q_h) {
                    *d += ds * qv;
                }
            }
        }
    }
    Ok((dq, dk, dv))
}

/// The softmax weights of one query head over the first `visible` rows of kv head `g`:
/// `exp(s[j] - max s) / sum exp(s - max s)` with `s[j] = (q_h · k_g[j]) * (1 / sqrt(head_dim))`.
fn softmax_weights(
    q_h: &[f32],
    k: &[f32],
    kv_width: usize,
    head_dim: usize,
    g: usize,
    visible: usize,
) -> Vec<f32> {
    let scaling = 1.0 / (head_dim as f32).sqrt();
    let scores: Vec<f32> = (0..visible)
        .map(|j| dot(q_h, head_slice(k, kv_width, head_dim, j, g)) * scaling)
        .collect();
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = scores.iter().map(|&s| (s - max).exp()).collect();
    let total: f32 = exps.iter().sum();
    exps.iter().map(|&e| e / total).collect()
}

/// The number of query rows `n` and cached rows `t`, after checking the shapes.
fn check_shape(q: &[f32], k: &[f32], v: &[f32], shape: AttentionShape) -> Result<(usize, usize)> {
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
    Ok((n, t))
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
    fn backward_matches_finite_differences() {
        use crate::cpu::gradcheck::{assert_grad_close, numeric_grad, uniform, weighted_sum};
        // (heads, kv_heads, head_dim, query rows n, cached rows t): grouped kv heads, a single
        // row, more cached rows than queries (the first t - n rows then only feed later ones).
        for (seed, heads, kv_heads, head_dim, n, t) in [
            (1, 1, 1, 2, 1, 1),
            (2, 4, 2, 2, 3, 3),
            (3, 3, 1, 4, 2, 5),
            (4, 2, 2, 6, 4, 4),
        ] {
            let shape = AttentionShape {
                heads,
                kv_heads,
                head_dim,
            };
            let q = uniform(seed, n * heads * head_dim, -1.5, 1.5);
            let k = uniform(seed + 10, t * kv_heads * head_dim, -1.5, 1.5);
            let v = uniform(seed + 20, t * kv_heads * head_dim, -1.5, 1.5);
            let r = uniform(seed + 30, q.len(), -1.0, 1.0);
            let (dq, dk, dv) = attention_backward(&q, &k, &v, &r, shape).unwrap();
            let loss = |q: &[f32], k: &[f32], v: &[f32]| {
                weighted_sum(&attention(q, k, v, shape).unwrap(), &r)
            };
            let nq = numeric_grad(&q, 1e-2, |q| loss(q, &k, &v));
            let nk = numeric_grad(&k, 1e-2, |k| loss(&q, k, &v));
            let nv = numeric_grad(&v, 1e-2, |v| loss(&q, &k, v));
            assert_grad_close("attention dq", &dq, &nq, 2e-3, 1e-2);
            assert_grad_close("attention dk", &dk, &nk, 2e-3, 1e-2);
            assert_grad_close("attention dv", &dv, &nv, 2e-3, 1e-2);
        }
        assert!(attention_backward(&[0.0; 4], &[0.0; 2], &[0.0; 2], &[0.0; 2], SHAPE).is_err());
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
