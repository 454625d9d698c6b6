//! A faster CPU path for the loss and gradients, separate from the reference and tested against
//! it. The rows of all windows go through each linear and the lm_head together as one f32 GEMM
//! (`matrixmultiply`) whose output rows are split over threads (`rayon`), and attention runs one
//! window per thread; every other operation is the cpu reference's, applied to all rows at once.
//!
//! Under BitNet the GEMM multiplies the int8 and ternary codes as f32. Every partial sum is then
//! an integer of magnitude at most `127 * K < 2^24`, exact in any order, so each layer's output
//! equals the reference's bit for bit; the lm_head, the float linears and all the backward's
//! products add in another order than the reference and agree with it within rounding.

use super::Quant;
use super::backward::add_into;
use super::forward::add;
use super::forward::attention_shape;
use super::model::TrainModel;
use super::params::{Parameters, linear_shapes};
use crate::cpu::{
    AttentionShape, WeightQuantOptions, act_quant, attention, attention_backward, cross_entropy,
    embedding, embedding_backward, rmsnorm, rmsnorm_backward, rope, rope_backward, weight_quant,
};
use crate::model::{sub_norm, sub_norm_backward};
use crate::{Error, Result};
use rayon::prelude::*;

/// The longest row whose int8 x ternary dot products stay exact in f32: `127 * K <= 2^24`.
const MAX_EXACT_COLS: usize = (1 << 24) / 127;

/// A linear's operand as the GEMM reads it: the codes as f32 with the scales that divide them
/// (one per row of activations, one per weight tensor), or float values with no scale.
struct Operand {
    values: Vec<f32>,
    rows: usize,
    cols: usize,
    scales: Option<Vec<f32>>,
}

impl Operand {
    /// A latent weight matrix as `quant` computes with it.
    fn weight(w: &[f32], rows: usize, cols: usize, quant: Quant) -> Result<Self> {
        let (values, scales) = match quant {
            Quant::BitNet => {
                let t = weight_quant(w, rows, cols, WeightQuantOptions::default())?;
                (
                    t.codes.iter().map(|&c| f32::from(c)).collect(),
                    Some(t.scales),
                )
            }
            Quant::None => (w.to_vec(), None),
        };
        Ok(Operand {
            values,
            rows,
            cols,
            scales,
        })
    }

    /// Activation rows as `quant` feeds them to a linear.
    fn input(x: Vec<f32>, rows: usize, cols: usize, quant: Quant) -> Result<Self> {
        match quant {
            Quant::BitNet => {
                if cols > MAX_EXACT_COLS {
                    return Err(Error::invalid(
                        "fast linear input",
                        format!(
                            "{cols} columns exceed {MAX_EXACT_COLS}, the most f32 sums exactly"
                        ),
                    ));
                }
                let q = act_quant(&x, rows, cols)?;
                let values = q.codes.iter().map(|&c| f32::from(c)).collect();
                Ok(Operand {
                    values,
                    rows,
                    cols,
                    scales: Some(q.scales),
                })
            }
            Quant::None => Ok(Operand {
                values: x,
                rows,
                cols,
                scales: None,
            }),
        }
    }
}

/// `y = x · Wᵀ`; under BitNet `acc / (sx * sw)` as [`crate::cpu::ternary_matmul`] computes it.
fn linear_fwd(x: &Operand, w: &Operand) -> Vec<f32> {
    let mut y = gemm_nt(&x.values, x.rows, x.cols, &w.values, w.rows);
    if let (Some(sx), Some(sw)) = (&x.scales, &w.scales) {
        for (row, &s) in y.chunks_exact_mut(w.rows).zip(sx) {
            row.iter_mut().for_each(|a| *a /= s * sw[0]);
        }
    }
    y
}

/// `(dx, dW) = (dy · Ŵ, dyᵀ · x̂)`, with `Ŵ = codes / sw` and `x̂ = codes / sx` under BitNet.
fn linear_bwd(x: &Operand, w: &Operand, dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let mut dx = gemm_nn(dy, x.rows, w.rows, &w.values, w.cols);
    let dw = match (&x.scales, &w.scales) {
        (Some(sx), Some(sw)) => {
            dx.iter_mut().for_each(|d| *d /= sw[0]);
            let scaled: Vec<f32> = dy
                .chunks_exact(w.rows)
                .zip(sx)
                .flat_map(|(row, &s)| row.iter().map(move |&d| d / s))
                .collect();
            gemm_tn(&scaled, x.rows, w.rows, &x.values, x.cols)
        }
        _ => gemm_tn(dy, x.rows, w.rows, &x.values, x.cols),
    };
    (dx, dw)
}

/// One layer's linears as GEMM operands.
struct LayerOperands {
    q: Operand,
    k: Operand,
    v: Operand,
    o: Operand,
    gate: Operand,
    up: Operand,
    down: Operand,
}

impl LayerOperands {
    fn new(model: &TrainModel, layer: usize) -> Result<Self> {
        let [q, k, v, o, gate, up, down] = linear_shapes(&model.config);
        let l = &model.params.layers[layer];
        let op =
            |w, (_, rows, cols): (&str, usize, usize)| Operand::weight(w, rows, cols, model.quant);
        Ok(LayerOperands {
            q: op(&l.q_proj, q)?,
            k: op(&l.k_proj, k)?,
            v: op(&l.v_proj, v)?,
            o: op(&l.o_proj, o)?,
            gate: op(&l.gate_proj, gate)?,
            up: op(&l.up_proj, up)?,
            down: op(&l.down_proj, down)?,
        })
    }
}

/// What one layer's backward needs, for all rows of the batch.
struct LayerTape {
    x: Vec<f32>,
    attn_in: Operand,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    o_in: Operand,
    x_mid: Vec<f32>,
    mlp_in: Operand,
    gate: Vec<f32>,
    up: Vec<f32>,
    gated: Vec<f32>,
    down_in: Operand,
}

impl TrainModel {
    /// [`TrainModel::loss_and_gradients`], computed with batched GEMMs on all cores. The loss and
    /// gradients agree with the reference's within float rounding (see the module's tests).
    pub fn loss_and_gradients_fast(&self, windows: &[&[u32]]) -> Result<(f64, Parameters)> {
        let count = self.check_windows(windows)?;
        let c = &self.config;
        let p = &self.params;
        let (hidden, vocab, eps, quant) = (c.hidden_size, c.vocab_size, c.rms_norm_eps, self.quant);
        let shape = attention_shape(c);
        let attn_width = shape.heads * shape.head_dim;
        let tokens = windows.concat();
        let n = tokens.len();
        let mut spans = Vec::with_capacity(windows.len());
        for w in windows {
            let start = spans.last().map_or(0, |&(s, len)| s + len);
            spans.push((start, w.len()));
        }
        let positions: Vec<usize> = windows.iter().flat_map(|w| 0..w.len()).collect();
        let weights = (0..p.layers.len())
            .map(|i| LayerOperands::new(self, i))
            .collect::<Result<Vec<_>>>()?;
        let rot = |x: &mut [f32], heads| rope(x, &positions, heads, shape.head_dim, c.rope_theta);

        let mut x = embedding(&p.embed_tokens, vocab, hidden, &tokens)?;
        let mut tapes = Vec::with_capacity(p.layers.len());
        for (lp, w) in p.layers.iter().zip(&weights) {
            let attn_in =
                Operand::input(rmsnorm(&x, n, &lp.input_layernorm, eps)?, n, hidden, quant)?;
            let mut q = linear_fwd(&attn_in, &w.q);
            let mut k = linear_fwd(&attn_in, &w.k);
            let v = linear_fwd(&attn_in, &w.v);
            rot(&mut q, shape.heads)?;
            rot(&mut k, shape.kv_heads)?;
            let attn = attention_per_window(&q, &k, &v, &spans, shape)?;
            let o_in = Operand::input(
                sub_norm(&attn, n, &lp.attn_sub_norm, eps, rmsnorm)?.into_owned(),
                n,
                attn_width,
                quant,
            )?;
            let x_mid = add(&x, &linear_fwd(&o_in, &w.o));
            let h = rmsnorm(&x_mid, n, &lp.post_attention_layernorm, eps)?;
            let mlp_in = Operand::input(h, n, hidden, quant)?;
            let gate = linear_fwd(&mlp_in, &w.gate);
            let up = linear_fwd(&mlp_in, &w.up);
            let gated = c.family.activation().gate(&gate, &up)?;
            let normed = sub_norm(&gated, n, &lp.ffn_sub_norm, eps, rmsnorm)?.into_owned();
            let down_in = Operand::input(normed, n, c.intermediate_size, quant)?;
            let x_out = add(&x_mid, &linear_fwd(&down_in, &w.down));
            tapes.push(LayerTape {
                x,
                attn_in,
                q,
                k,
                v,
                attn,
                o_in,
                x_mid,
                mlp_in,
                gate,
                up,
                gated,
                down_in,
            });
            x = x_out;
        }
        let normed = rmsnorm(&x, n, &p.norm, eps)?;
        let head = p.lm_head.as_deref().unwrap_or(&p.embed_tokens);
        let logits = gemm_nt(&normed, n, hidden, head, vocab);

        // The loss and its gradient, window by window as the reference sums them.
        let mut total = 0.0;
        let mut dlogits = vec![0.0f32; logits.len()];
        for &(start, len) in &spans {
            let rows = start..start + len - 1;
            let (losses, dl) = cross_entropy(
                &logits[rows.start * vocab..rows.end * vocab],
                vocab,
                &tokens[rows.start + 1..rows.end + 1],
            )?;
            total += losses.iter().sum::<f64>();
            for (d, g) in dlogits[rows.start * vocab..].iter_mut().zip(dl) {
                *d = g / count as f32;
            }
        }

        let mut grads = p.zeros_like();
        let dnormed = gemm_nn(&dlogits, n, vocab, head, hidden);
        let dhead = gemm_tn(&dlogits, n, vocab, &normed, hidden);
        add_into(
            grads.lm_head.as_mut().unwrap_or(&mut grads.embed_tokens),
            &dhead,
        );
        let (mut dx, dnorm) = rmsnorm_backward(&x, n, &p.norm, eps, &dnormed)?;
        add_into(&mut grads.norm, &dnorm);
        for i in (0..p.layers.len()).rev() {
            let (lp, t, g) = (&p.layers[i], &tapes[i], &mut grads.layers[i]);
            let w = &weights[i];
            let (dnormed, dw) = linear_bwd(&t.down_in, &w.down, &dx);
            add_into(&mut g.down_proj, &dw);
            let (dgated, dw) = sub_norm_backward(&t.gated, n, &lp.ffn_sub_norm, eps, &dnormed)?;
            add_into(&mut g.ffn_sub_norm, &dw);
            let (dgate, dup) = c
                .family
                .activation()
                .gate_backward(&t.gate, &t.up, &dgated)?;
            let (mut dh, dw) = linear_bwd(&t.mlp_in, &w.gate, &dgate);
            add_into(&mut g.gate_proj, &dw);
            let (dh_up, dw) = linear_bwd(&t.mlp_in, &w.up, &dup);
            add_into(&mut g.up_proj, &dw);
            add_into(&mut dh, &dh_up);
            let (dx_mid, dw) =
                rmsnorm_backward(&t.x_mid, n, &lp.post_attention_layernorm, eps, &dh)?;
            add_into(&mut g.post_attention_layernorm, &dw);
            add_into(&mut dx, &dx_mid);

            let (dattn_normed, dw) = linear_bwd(&t.o_in, &w.o, &dx);
            add_into(&mut g.o_proj, &dw);
            let (dattn, dw) = sub_norm_backward(&t.attn, n, &lp.attn_sub_norm, eps, &dattn_normed)?;
            add_into(&mut g.attn_sub_norm, &dw);
            let (mut dq, mut dk, dv) = attention_backward_per_window(t, &dattn, &spans, shape)?;
            rope_backward(
                &mut dq,
                &positions,
                shape.heads,
                shape.head_dim,
                c.rope_theta,
            )?;
            rope_backward(
                &mut dk,
                &positions,
                shape.kv_heads,
                shape.head_dim,
                c.rope_theta,
            )?;
            let (mut dh, dw) = linear_bwd(&t.attn_in, &w.q, &dq);
            add_into(&mut g.q_proj, &dw);
            let (dh_k, dw) = linear_bwd(&t.attn_in, &w.k, &dk);
            add_into(&mut g.k_proj, &dw);
            let (dh_v, dw) = linear_bwd(&t.attn_in, &w.v, &dv);
            add_into(&mut g.v_proj, &dw);
            add_into(&mut dh, &dh_k);
            add_into(&mut dh, &dh_v);
            let (dx_in, dw) = rmsnorm_backward(&t.x, n, &lp.input_layernorm, eps, &dh)?;
            add_into(&mut g.input_layernorm, &dw);
            add_into(&mut dx, &dx_in);
        }
        add_into(
            &mut grads.embed_tokens,
            &embedding_backward(&tokens, &dx, vocab, hidden)?,
        );
        Ok((total / count as f64, grads))
    }
}

/// Causal attention within each window (`spans` of rows), one window per thread.
fn attention_per_window(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    spans: &[(usize, usize)],
    shape: AttentionShape,
) -> Result<Vec<f32>> {
    let (qw, kw) = (
        shape.heads * shape.head_dim,
        shape.kv_heads * shape.head_dim,
    );
    let outs = spans
        .par_iter()
        .map(|&(s, len)| {
            let kv = s * kw..(s + len) * kw;
            attention(&q[s * qw..(s + len) * qw], &k[kv.clone()], &v[kv], shape)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(outs.concat())
}

/// [`attention_backward`] within each window, one window per thread: `(dq, dk, dv)`.
fn attention_backward_per_window(
    t: &LayerTape,
    dout: &[f32],
    spans: &[(usize, usize)],
    shape: AttentionShape,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let (qw, kw) = (
        shape.heads * shape.head_dim,
        shape.kv_heads * shape.head_dim,
    );
    let parts = spans
        .par_iter()
        .map(|&(s, len)| {
            let (qs, kv) = (s * qw..(s + len) * qw, s * kw..(s + len) * kw);
            attention_backward(
                &t.q[qs.clone()],
                &t.k[kv.clone()],
                &t.v[kv],
                &dout[qs],
                shape,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let (mut dq, mut dk, mut dv) = (Vec::new(), Vec::new(), Vec::new());
    for (a, b, c) in parts {
        dq.extend(a);
        dk.extend(b);
        dv.extend(c);
    }
    Ok((dq, dk, dv))
}

/// `a · bᵀ` for row-major `a` `[m, k]` and `b` `[n, k]`: `[m, n]`.
fn gemm_nt(a: &[f32], m: usize, k: usize, b: &[f32], n: usize) -> Vec<f32> {
    gemm(m, k, n, a, (k, 1), b, (1, k))
}

/// `a · b` for row-major `a` `[m, k]` and `b` `[k, n]`: `[m, n]`.
fn gemm_nn(a: &[f32], m: usize, k: usize, b: &[f32], n: usize) -> Vec<f32> {
    gemm(m, k, n, a, (k, 1), b, (n, 1))
}

/// `aᵀ · b` for row-major `a` `[k, m]` and `b` `[k, n]`: `[m, n]`.
fn gemm_tn(a: &[f32], k: usize, m: usize, b: &[f32], n: usize) -> Vec<f32> {
    gemm(m, k, n, a, (1, m), b, (n, 1))
}

/// Row-major `C [m, n] = A [m, k] · B [k, n]`, the operands given by (row, column) strides, the
/// rows of `C` split into one block per thread.
fn gemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
) -> Vec<f32> {
    let mut c = vec![0.0f32; m * n];
    if m == 0 || n == 0 {
        return c;
    }
    // The last element each operand's strides reach must lie inside it: sgemm reads raw pointers.
    assert!(
        k == 0
            || ((m - 1) * rsa + (k - 1) * csa < a.len() && (k - 1) * rsb + (n - 1) * csb < b.len())
    );
    let block = m.div_ceil(rayon::current_num_threads()).max(1);
    c.par_chunks_mut(block * n)
        .enumerate()
        .for_each(|(i, c_block)| {
            let rows = c_block.len() / n;
            // SAFETY: rows `i * block ..+ rows` of A and all of B lie inside `a` and `b` (asserted
            // above for all m rows), and `c_block` is exactly `rows x n`, row-major.
            unsafe {
                matrixmultiply::sgemm(
                    rows,
                    k,
                    n,
                    1.0,
                    a.as_ptr().add(i * block * rsa),
                    rsa as isize,
                    csa as isize,
                    b.as_ptr(),
                    rsb as isize,
                    csb as isize,
                    0.0,
                    c_block.as_mut_ptr(),
                    n as isize,
                    1,
                );
            }
        });
    c
}

#[cfg(test)]
mod tests {
    use super::super::testing::{WINDOWS, scrambled_model, scrambled_model_of, tiny_config};
    use super::*;
    use crate::model::Family;

    /// Every gradient within `tol` of the reference's, relative to the largest of its tensor.
    fn assert_matches_reference(model: &TrainModel, windows: &[&[u32]], tol: f32) {
        let (loss, grads) = model.loss_and_gradients(windows).unwrap();
        let (fast_loss, fast_grads) = model.loss_and_gradients_fast(windows).unwrap();
        assert!(
            (loss - fast_loss).abs() <= 1e-6 * loss,
            "{loss} vs {fast_loss}"
        );
        for ((name, a), (_, b)) in grads.tensors().into_iter().zip(fast_grads.tensors()) {
            let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= tol * scale,
                    "{name}: {x} vs {y} (largest {scale})"
                );
            }
        }
    }

    #[test]
    fn fast_path_matches_the_reference() {
        // Windows of different lengths, so spans and positions are uneven.
        let windows: [&[u32]; 3] = [WINDOWS[0], &WINDOWS[1][..2], &WINDOWS[1][1..]];
        for tied in [true, false] {
            for quant in [Quant::None, Quant::BitNet] {
                let model = scrambled_model(tied, quant, 13);
                assert_matches_reference(&model, &windows, 1e-4);
            }
        }
        for family in [Family::Llama, Family::OneBitLlm] {
            let model = scrambled_model_of(family, false, Quant::BitNet, 14);
            assert_matches_reference(&model, &windows, 1e-4);
        }
        // A freshly initialized model, with its small weights.
        let model = TrainModel::new(tiny_config(true), Quant::BitNet, 2).unwrap();
        assert_matches_reference(&model, &WINDOWS, 1e-4);
        assert!(model.loss_and_gradients_fast(&[]).is_err());
    }

    #[test]
    fn gemm_variants_by_hand() {
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // [2, 3]
        let b = [1.0, 0.0, -1.0, 2.0, 1.0, 0.5]; // [2, 3] as [n, k], or [3, 2] as [k, n]
        assert_eq!(gemm_nt(&a, 2, 3, &b, 2), [-2.0, 5.5, -2.0, 16.0]);
        assert_eq!(gemm_nn(&a, 2, 3, &b, 2), [2.0, 5.5, 5.0, 13.0]);
        // aᵀ as [3, 2] times b as [2, 3].
        assert_eq!(
            gemm_tn(&a, 2, 3, &b, 3),
            [9.0, 4.0, 1.0, 12.0, 5.0, 0.5, 15.0, 6.0, 0.0]
        );
    }
}
