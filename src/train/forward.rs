//! The training forward: the inference forward's operations in the same order, over whole windows,
//! keeping every activation the backward needs.

use super::linear::{LinearInput, StepWeight, linear};
use super::model::TrainModel;
use super::params::linear_shapes;
use crate::cpu::{AttentionShape, attention, cross_entropy, embedding, lm_head, rmsnorm, rope};
use crate::model::ModelConfig;
use crate::model::sub_norm;
use crate::{Error, Result};

/// One layer's linears as a training step computes with them.
pub(crate) struct LayerStepWeights<'a> {
    pub q: StepWeight<'a>,
    pub k: StepWeight<'a>,
    pub v: StepWeight<'a>,
    pub o: StepWeight<'a>,
    pub gate: StepWeight<'a>,
    pub up: StepWeight<'a>,
    pub down: StepWeight<'a>,
}

/// What one decoder layer's backward needs from its forward.
pub(crate) struct LayerTape {
    /// The residual stream entering the layer.
    pub x: Vec<f32>,
    /// `input_layernorm(x)` as q, k and v read it.
    pub attn_in: LinearInput,
    /// Queries and keys after RoPE, and values.
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// The attention output, before `attn_sub_norm`.
    pub attn: Vec<f32>,
    /// `attn_sub_norm(attn)` as o_proj reads it.
    pub o_in: LinearInput,
    /// The residual stream after the attention block.
    pub x_mid: Vec<f32>,
    /// `post_attention_layernorm(x_mid)` as gate and up read it.
    pub mlp_in: LinearInput,
    pub gate: Vec<f32>,
    pub up: Vec<f32>,
    /// `relu2_gate(gate, up)`, before `ffn_sub_norm`.
    pub gated: Vec<f32>,
    /// `ffn_sub_norm(gated)` as down_proj reads it.
    pub down_in: LinearInput,
}

/// Everything one window's forward keeps.
pub(crate) struct Tape {
    pub tokens: Vec<u32>,
    pub layers: Vec<LayerTape>,
    /// The residual stream leaving the last layer, before the final norm.
    pub x_last: Vec<f32>,
    /// `norm(x_last)`, the lm_head's input.
    pub normed: Vec<f32>,
    /// `[tokens.len(), vocab_size]`.
    pub logits: Vec<f32>,
}

impl TrainModel {
    /// The logits `[tokens.len(), vocab_size]` of one window, positions from 0: the training
    /// forward, which under [`Quant::BitNet`](super::Quant::BitNet) is the inference forward (`crate::model::forward`)
    /// of [`TrainModel::to_weights`].
    pub fn logits(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.validate()?;
        self.config.check_tokens(tokens)?;
        check_length(&self.config, tokens.len())?;
        let weights = self.step_weights()?;
        Ok(self.forward(&weights, tokens)?.logits)
    }

    /// The causal-LM loss of a batch of token windows, as transformers computes it with
    /// `labels = input_ids`: every position but the last predicts the next token, and the loss is
    /// the mean cross-entropy over all those predictions of all windows. Errors: no windows, a
    /// window shorter than 2 tokens or longer than `max_position_embeddings`, a token not below
    /// `vocab_size`, tensors that fail [`TrainModel::validate`].
    pub fn loss(&self, windows: &[&[u32]]) -> Result<f64> {
        let count = self.check_windows(windows)?;
        let weights = self.step_weights()?;
        let mut total = 0.0;
        for window in windows {
            let tape = self.forward(&weights, window)?;
            total += window_losses(&self.config, &tape)?.0.iter().sum::<f64>();
        }
        Ok(total / count as f64)
    }

    /// Checks a batch and returns its number of predictions.
    pub(crate) fn check_windows(&self, windows: &[&[u32]]) -> Result<usize> {
        self.validate()?;
        if windows.is_empty() {
            return Err(Error::Empty("batch of windows"));
        }
        let mut count = 0;
        for window in windows {
            if window.len() < 2 {
                return Err(Error::invalid(
                    "training window",
                    format!(
                        "{} tokens: at least 2 are needed to predict one",
                        window.len()
                    ),
                ));
            }
            self.config.check_tokens(window)?;
            check_length(&self.config, window.len())?;
            count += window.len() - 1;
        }
        Ok(count)
    }

    /// Every linear as this step computes with it (quantized once per step under BitNet).
    pub(crate) fn step_weights(&self) -> Result<Vec<LayerStepWeights<'_>>> {
        let [q, k, v, o, gate, up, down] = linear_shapes(&self.config);
        let quant = self.quant;
        let make = |w, (_, rows, cols): (&str, usize, usize)| StepWeight::new(w, rows, cols, quant);
        self.params
            .layers
            .iter()
            .map(|l| {
                Ok(LayerStepWeights {
                    q: make(&l.q_proj, q)?,
                    k: make(&l.k_proj, k)?,
                    v: make(&l.v_proj, v)?,
                    o: make(&l.o_proj, o)?,
                    gate: make(&l.gate_proj, gate)?,
                    up: make(&l.up_proj, up)?,
                    down: make(&l.down_proj, down)?,
                })
            })
            .collect()
    }

    /// One window through the model at positions `0..tokens.len()`, on checked inputs.
    pub(crate) fn forward(&self, weights: &[LayerStepWeights], tokens: &[u32]) -> Result<Tape> {
        let c = &self.config;
        let p = &self.params;
        let (n, hidden, eps, quant) = (tokens.len(), c.hidden_size, c.rms_norm_eps, self.quant);
        let shape = attention_shape(c);
        let attn_width = shape.heads * shape.head_dim;
        let positions: Vec<usize> = (0..n).collect();
        let mut x = embedding(&p.embed_tokens, c.vocab_size, hidden, tokens)?;
        let mut layers = Vec::with_capacity(p.layers.len());
        for (lp, w) in p.layers.iter().zip(weights) {
            let h = rmsnorm(&x, n, &lp.input_layernorm, eps)?;
            let attn_in = LinearInput::new(h, n, hidden, quant)?;
            let mut q = linear(&attn_in, &w.q)?;
            let mut k = linear(&attn_in, &w.k)?;
            let v = linear(&attn_in, &w.v)?;
            rope(
                &mut q,
                &positions,
                shape.heads,
                shape.head_dim,
                c.rope_theta,
            )?;
            rope(
                &mut k,
                &positions,
                shape.kv_heads,
                shape.head_dim,
                c.rope_theta,
            )?;
            let attn = attention(&q, &k, &v, shape)?;
            let o_in = LinearInput::new(
                sub_norm(&attn, n, &lp.attn_sub_norm, eps, rmsnorm)?.into_owned(),
                n,
                attn_width,
                quant,
            )?;
            let x_mid = add(&x, &linear(&o_in, &w.o)?);

            let h = rmsnorm(&x_mid, n, &lp.post_attention_layernorm, eps)?;
            let mlp_in = LinearInput::new(h, n, hidden, quant)?;
            let gate = linear(&mlp_in, &w.gate)?;
            let up = linear(&mlp_in, &w.up)?;
            let gated = c.family.activation().gate(&gate, &up)?;
            let down_in = LinearInput::new(
                sub_norm(&gated, n, &lp.ffn_sub_norm, eps, rmsnorm)?.into_owned(),
                n,
                c.intermediate_size,
                quant,
            )?;
            let x_out = add(&x_mid, &linear(&down_in, &w.down)?);
            layers.push(LayerTape {
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
        let logits = lm_head(&normed, n, head, c.vocab_size, hidden)?;
        Ok(Tape {
            tokens: tokens.to_vec(),
            layers,
            x_last: x,
            normed,
            logits,
        })
    }
}

/// The next-token losses of one window (its first `len - 1` positions) and their gradient wrt
/// those positions' logits.
pub(crate) fn window_losses(c: &ModelConfig, tape: &Tape) -> Result<(Vec<f64>, Vec<f32>)> {
    let predictions = tape.tokens.len() - 1;
    cross_entropy(
        &tape.logits[..predictions * c.vocab_size],
        c.vocab_size,
        &tape.tokens[1..],
    )
}

/// The attention shape of `c`.
pub(crate) fn attention_shape(c: &ModelConfig) -> AttentionShape {
    AttentionShape {
        heads: c.num_attention_heads,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
    }
}

/// Errors when a window is longer than the positions the model has.
fn check_length(c: &ModelConfig, len: usize) -> Result<()> {
    if len > c.max_position_embeddings {
        return Err(Error::invalid(
            "training window",
            format!(
                "{len} tokens exceed max_position_embeddings {}",
                c.max_position_embeddings
            ),
        ));
    }
    Ok(())
}

/// `a + b` elementwise (the residual connection).
pub(crate) fn add(a: &[f32], b: &[f32]) -> Vec<f32> {
    a.iter().zip(b).map(|(&x, &y)| x + y).collect()
}
