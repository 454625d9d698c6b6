//! The trainable tensors of a model, in one shape shared by the weights, their gradients and the
//! optimizer's moments.

use crate::{Error, Result};

/// One decoder layer's tensors, all f32 and row-major. Linears are latent `[out, in]` matrices
/// (`q_proj` is `[heads * head_dim, hidden]`, as in Hugging Face checkpoints); norms are vectors.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerParameters {
    pub input_layernorm: Vec<f32>,
    pub q_proj: Vec<f32>,
    pub k_proj: Vec<f32>,
    pub v_proj: Vec<f32>,
    pub o_proj: Vec<f32>,
    pub attn_sub_norm: Vec<f32>,
    pub post_attention_layernorm: Vec<f32>,
    pub gate_proj: Vec<f32>,
    pub up_proj: Vec<f32>,
    pub down_proj: Vec<f32>,
    pub ffn_sub_norm: Vec<f32>,
}

/// Every trainable tensor of a model. The same type holds the weights, their gradients and each
/// optimizer moment, so that updates walk the three in step.
#[derive(Clone, Debug, PartialEq)]
pub struct Parameters {
    /// `[vocab_size, hidden_size]`.
    pub embed_tokens: Vec<f32>,
    pub layers: Vec<LayerParameters>,
    /// The final norm, `[hidden_size]`.
    pub norm: Vec<f32>,
    /// `[vocab_size, hidden_size]`; `None` when tied to `embed_tokens`.
    pub lm_head: Option<Vec<f32>>,
}

pub(crate) use crate::model::linear_shapes;

impl LayerParameters {
    /// The seven linears in the order q, k, v, o, gate, up, down (checkpoint order).
    pub fn linears(&self) -> [&Vec<f32>; 7] {
        [
            &self.q_proj,
            &self.k_proj,
            &self.v_proj,
            &self.o_proj,
            &self.gate_proj,
            &self.up_proj,
            &self.down_proj,
        ]
    }

    /// Every tensor with its checkpoint name within the layer.
    fn named(&self) -> [(&'static str, &Vec<f32>); 11] {
        [
            ("input_layernorm", &self.input_layernorm),
            ("self_attn.q_proj", &self.q_proj),
            ("self_attn.k_proj", &self.k_proj),
            ("self_attn.v_proj", &self.v_proj),
            ("self_attn.o_proj", &self.o_proj),
            ("self_attn.attn_sub_norm", &self.attn_sub_norm),
            ("post_attention_layernorm", &self.post_attention_layernorm),
            ("mlp.gate_proj", &self.gate_proj),
            ("mlp.up_proj", &self.up_proj),
            ("mlp.down_proj", &self.down_proj),
            ("mlp.ffn_sub_norm", &self.ffn_sub_norm),
        ]
    }

    /// The tensors of [`Self::named`], mutable, in the same order.
    fn all_mut(&mut self) -> [&mut Vec<f32>; 11] {
        [
            &mut self.input_layernorm,
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.o_proj,
            &mut self.attn_sub_norm,
            &mut self.post_attention_layernorm,
            &mut self.gate_proj,
            &mut self.up_proj,
            &mut self.down_proj,
            &mut self.ffn_sub_norm,
        ]
    }
}

impl Parameters {
    /// Every tensor with its Hugging Face name (`model.layers.0.self_attn.q_proj.weight`, ...), in
    /// a fixed order: embedding, layers, final norm, lm_head. The sub-norms of a family without
    /// them (empty) are left out.
    pub fn tensors(&self) -> Vec<(String, &[f32])> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            &self.embed_tokens[..],
        )];
        for (i, layer) in self.layers.iter().enumerate() {
            for (name, t) in layer.named().into_iter().filter(|(_, t)| !t.is_empty()) {
                out.push((format!("model.layers.{i}.{name}.weight"), &t[..]));
            }
        }
        out.push(("model.norm.weight".to_string(), &self.norm[..]));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), &head[..]));
        }
        out
    }

    /// The tensors of [`Self::tensors`], mutable, in the same order.
    pub fn tensors_mut(&mut self) -> Vec<&mut [f32]> {
        let mut out: Vec<&mut [f32]> = vec![&mut self.embed_tokens];
        for layer in &mut self.layers {
            out.extend(
                layer
                    .all_mut()
                    .into_iter()
                    .filter(|t| !t.is_empty())
                    .map(|t| &mut t[..]),
            );
        }
        out.push(&mut self.norm);
        if let Some(head) = &mut self.lm_head {
            out.push(head);
        }
        out
    }

    /// The same shapes, every value zero (a gradient or a moment before the first step).
    pub fn zeros_like(&self) -> Self {
        let mut zeros = self.clone();
        for t in zeros.tensors_mut() {
            t.fill(0.0);
        }
        zeros
    }

    /// The number of scalars.
    pub fn len(&self) -> usize {
        self.tensors().iter().map(|(_, t)| t.len()).sum()
    }

    /// Whether there are no scalars at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `self += scale * other`, tensor by tensor (gradient accumulation). Errors when the two
    /// are shaped differently (parameters of different models).
    pub fn add_scaled(&mut self, other: &Parameters, scale: f32) -> Result<()> {
        self.check_same_shape(other)?;
        for (a, (_, b)) in self.tensors_mut().into_iter().zip(other.tensors()) {
            for (x, &y) in a.iter_mut().zip(b) {
                *x += scale * y;
            }
        }
        Ok(())
    }

    /// Errors unless `other` has the same tensors with the same lengths.
    pub fn check_same_shape(&self, other: &Parameters) -> Result<()> {
        let lengths =
            |p: &Parameters| -> Vec<usize> { p.tensors().iter().map(|(_, t)| t.len()).collect() };
        let (mine, theirs) = (lengths(self), lengths(other));
        if mine != theirs {
            return Err(Error::shape(
                "parameter tensors",
                format!("{} tensors of lengths {mine:?}", mine.len()),
                format!("{} tensors of lengths {theirs:?}", theirs.len()),
            ));
        }
        Ok(())
    }

    /// The L2 norm over every scalar of every tensor (the global gradient norm), summed in f64.
    pub fn global_norm(&self) -> f32 {
        let squares: f64 = self
            .tensors()
            .iter()
            .flat_map(|(_, t)| t.iter())
            .map(|&v| f64::from(v) * f64::from(v))
            .sum();
        squares.sqrt() as f32
    }
}
