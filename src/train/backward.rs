//! The backward pass: the gradient of the causal-LM loss wrt every parameter, through the
//! training forward's operations in reverse.

use super::forward::{LayerStepWeights, Tape, attention_shape, window_losses};
use super::linear::linear_backward;
use super::model::TrainModel;
use super::params::Parameters;
use crate::Result;
use crate::cpu::{
    attention_backward, embedding_backward, lm_head_backward, rmsnorm_backward, rope_backward,
};
use crate::model::sub_norm_backward;

impl TrainModel {
    /// The loss of [`TrainModel::loss`] and its gradient wrt every parameter (the same shapes
    /// as `self.params`). Under [`Quant::BitNet`](super::Quant::BitNet) the quantizers pass
    /// gradients straight through (STE): a linear's input gets `dy · Ŵ` and its latent weight
    /// `dyᵀ · x̂`. With tied embeddings the embedding's gradient is the lookup's plus the lm_head's.
    /// Errors as [`TrainModel::loss`].
    pub fn loss_and_gradients(&self, windows: &[&[u32]]) -> Result<(f64, Parameters)> {
        let count = self.check_windows(windows)?;
        let weights = self.step_weights()?;
        let mut grads = self.params.zeros_like();
        let mut total = 0.0;
        for window in windows {
            let tape = self.forward(&weights, window)?;
            let (losses, mut dlogits) = window_losses(&self.config, &tape)?;
            total += losses.iter().sum::<f64>();
            // The mean over all predictions of the batch; the last position predicts nothing.
            let scale = 1.0 / count as f32;
            dlogits.iter_mut().for_each(|d| *d *= scale);
            dlogits.resize(tape.logits.len(), 0.0);
            self.backward(&weights, &tape, &dlogits, &mut grads)?;
        }
        Ok((total / count as f64, grads))
    }

    /// Adds one window's gradients, from those of its logits, to `grads`.
    fn backward(
        &self,
        weights: &[LayerStepWeights],
        tape: &Tape,
        dlogits: &[f32],
        grads: &mut Parameters,
    ) -> Result<()> {
        let c = &self.config;
        let p = &self.params;
        let (n, hidden, vocab, eps) = (
            tape.tokens.len(),
            c.hidden_size,
            c.vocab_size,
            c.rms_norm_eps,
        );
        let shape = attention_shape(c);
        let positions: Vec<usize> = (0..n).collect();

        let head = p.lm_head.as_deref().unwrap_or(&p.embed_tokens);
        let (dnormed, dhead) = lm_head_backward(&tape.normed, n, head, vocab, hidden, dlogits)?;
        add_into(
            grads.lm_head.as_mut().unwrap_or(&mut grads.embed_tokens),
            &dhead,
        );
        let (mut dx, dnorm) = rmsnorm_backward(&tape.x_last, n, &p.norm, eps, &dnormed)?;
        add_into(&mut grads.norm, &dnorm);

        for i in (0..p.layers.len()).rev() {
            let (lp, w, t, g) = (
                &p.layers[i],
                &weights[i],
                &tape.layers[i],
                &mut grads.layers[i],
            );
            // Here dx is the gradient wrt the layer's output x_mid + down(ffn_sub_norm(gated)),
            // gated = relu2_gate(gate(h), up(h)), h = post_attention_layernorm(x_mid).
            let (dgated_normed, dw) = linear_backward(&t.down_in, &w.down, &dx)?;
            add_into(&mut g.down_proj, &dw);
            let (dgated, dw) =
                sub_norm_backward(&t.gated, n, &lp.ffn_sub_norm, eps, &dgated_normed)?;
            add_into(&mut g.ffn_sub_norm, &dw);
            let (dgate, dup) = c
                .family
                .activation()
                .gate_backward(&t.gate, &t.up, &dgated)?;
            let (mut dh, dw) = linear_backward(&t.mlp_in, &w.gate, &dgate)?;
            add_into(&mut g.gate_proj, &dw);
            let (dh_up, dw) = linear_backward(&t.mlp_in, &w.up, &dup)?;
            add_into(&mut g.up_proj, &dw);
            add_into(&mut dh, &dh_up);
            let (dx_mid, dw) =
                rmsnorm_backward(&t.x_mid, n, &lp.post_attention_layernorm, eps, &dh)?;
            add_into(&mut g.post_attention_layernorm, &dw);
            add_into(&mut dx, &dx_mid);

            // Now dx is the gradient wrt x_mid = x + o(attn_sub_norm(attention(q, k, v))), with
            // q, k, v from h = input_layernorm(x) and q, k rotated.
            let (dattn_normed, dw) = linear_backward(&t.o_in, &w.o, &dx)?;
            add_into(&mut g.o_proj, &dw);
            let (dattn, dw) = sub_norm_backward(&t.attn, n, &lp.attn_sub_norm, eps, &dattn_normed)?;
            add_into(&mut g.attn_sub_norm, &dw);
            let (mut dq, mut dk, dv) = attention_backward(&t.q, &t.k, &t.v, &dattn, shape)?;
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
            let (mut dh, dw) = linear_backward(&t.attn_in, &w.q, &dq)?;
            add_into(&mut g.q_proj, &dw);
            let (dh_k, dw) = linear_backward(&t.attn_in, &w.k, &dk)?;
            add_into(&mut g.k_proj, &dw);
            let (dh_v, dw) = linear_backward(&t.attn_in, &w.v, &dv)?;
            add_into(&mut g.v_proj, &dw);
            add_into(&mut dh, &dh_k);
            add_into(&mut dh, &dh_v);
            let (dx_in, dw) = rmsnorm_backward(&t.x, n, &lp.input_layernorm, eps, &dh)?;
            add_into(&mut g.input_layernorm, &dw);
            add_into(&mut dx, &dx_in);
        }
        let demb = embedding_backward(&tape.tokens, &dx, vocab, hidden)?;
        add_into(&mut grads.embed_tokens, &demb);
        Ok(())
    }
}

/// `acc += delta` elementwise.
pub(crate) fn add_into(acc: &mut [f32], delta: &[f32]) {
    for (a, &d) in acc.iter_mut().zip(delta) {
        *a += d;
    }
}

#[cfg(test)]
mod tests {
    use super::super::Quant;
    use super::super::testing::{WINDOWS, scrambled_model, scrambled_model_of};
    use crate::model::Family;
    use crate::rng::SplitMix64;

    /// For each tensor, the directional derivative of the loss along a random direction by
    /// central differences, against the analytic gradient's dot product with that direction.
    /// `only` limits the check to tensors whose name contains one of its strings.
    fn check_directional(family: Family, tied: bool, quant: Quant, only: &[&str]) -> usize {
        let model = scrambled_model_of(family, tied, quant, 21);
        let (_, grads) = model.loss_and_gradients(&WINDOWS).unwrap();
        let h = 1e-3f32;
        let mut rng = SplitMix64(99);
        let mut checked = 0;
        for (i, (name, g)) in grads.tensors().into_iter().enumerate() {
            if !only.is_empty() && !only.iter().any(|s| name.contains(s)) {
                continue;
            }
            let direction: Vec<f32> = g.iter().map(|_| rng.uniform_f32()).collect();
            let loss_at = |step: f32| {
                let mut probe = model.clone();
                for (w, d) in probe.params.tensors_mut()[i].iter_mut().zip(&direction) {
                    *w += step * d;
                }
                probe.loss(&WINDOWS).unwrap()
            };
            let numeric = (loss_at(h) - loss_at(-h)) / (2.0 * f64::from(h));
            let analytic: f64 = g
                .iter()
                .zip(&direction)
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum();
            let err = (analytic - numeric).abs();
            assert!(
                err <= 2e-3 + 2e-2 * numeric.abs(),
                "{name}: analytic {analytic} vs numeric {numeric}"
            );
            assert!(numeric.abs() > 1e-3, "{name}: no signal ({numeric})");
            checked += 1;
        }
        checked
    }

    #[test]
    fn float_model_gradient_matches_finite_differences() {
        // Quantizers off, the loss is smooth: every tensor of both layers, tied and untied, and
        // the SiLU families with and without sub-norms.
        let bitnet = Family::BitNet;
        assert_eq!(
            check_directional(bitnet, true, Quant::None, &[]),
            1 + 2 * 11 + 1
        );
        assert_eq!(
            check_directional(bitnet, false, Quant::None, &[]),
            1 + 2 * 11 + 2
        );
        let llama = Family::Llama;
        assert_eq!(
            check_directional(llama, false, Quant::None, &[]),
            1 + 2 * 9 + 2
        );
        let onebit = Family::OneBitLlm;
        assert_eq!(
            check_directional(onebit, true, Quant::None, &[]),
            1 + 2 * 11 + 1
        );
    }

    #[test]
    fn bitnet_gradient_is_exact_above_the_last_quantizer() {
        // With quantizers on, the final norm and an untied lm_head reach the loss through no
        // quantizer, so their straight-through gradients are true gradients.
        assert_eq!(
            check_directional(
                Family::BitNet,
                false,
                Quant::BitNet,
                &["model.norm", "lm_head"]
            ),
            2
        );
    }

    #[test]
    fn bitnet_gradient_flows_to_every_tensor() {
        let float = scrambled_model(true, Quant::None, 21);
        let bitnet = scrambled_model(true, Quant::BitNet, 21);
        let (_, g_float) = float.loss_and_gradients(&WINDOWS).unwrap();
        let (loss, g_bitnet) = bitnet.loss_and_gradients(&WINDOWS).unwrap();
        assert!(loss.is_finite());
        for ((name, a), (_, b)) in g_bitnet.tensors().into_iter().zip(g_float.tensors()) {
            assert!(a.iter().all(|v| v.is_finite()), "{name}");
            assert!(a.iter().any(|&v| v != 0.0), "{name} has no gradient");
            assert_ne!(a, b, "{name}: the quantizers changed nothing");
        }
    }

    #[test]
    fn untied_embedding_gradient_is_the_lookup_only() {
        // Rows of tokens absent from the batch get nothing; with a tied table they get the
        // lm_head's share.
        let absent = 1usize;
        assert!(WINDOWS.iter().all(|w| !w.contains(&(absent as u32))));
        for tied in [false, true] {
            let model = scrambled_model(tied, Quant::None, 5);
            let (_, g) = model.loss_and_gradients(&WINDOWS).unwrap();
            let row = &g.embed_tokens[absent * 16..][..16];
            assert_eq!(row.iter().all(|&v| v == 0.0), !tied, "tied = {tied}");
        }
    }

    #[test]
    fn bad_batches_are_errors() {
        let model = scrambled_model(true, Quant::None, 1);
        assert!(model.loss_and_gradients(&[]).is_err());
        assert!(model.loss_and_gradients(&[&[3]]).is_err());
        assert!(model.loss_and_gradients(&[&[3, 37]]).is_err());
        assert!(model.loss_and_gradients(&[&[0; 33]]).is_err());
        let mut broken = model.clone();
        broken.params.layers[1].k_proj.pop();
        let err = broken.loss_and_gradients(&WINDOWS).unwrap_err();
        assert!(err.to_string().contains("k_proj"), "{err}");
    }
}
