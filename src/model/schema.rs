//! What a decoder layer holds, named once: each tensor's Hugging Face name, its GGUF name and
//! its shape from the [`ModelConfig`], and the parts in which the model families differ. Loaders,
//! writers, validation and the trainer read these tables rather than spelling tensors out.

use std::borrow::Cow;

use crate::Result;
use crate::cpu::{
    relu2_gate, relu2_gate_backward, rmsnorm_backward, silu_gate, silu_gate_backward,
};
use crate::model::ModelConfig;

/// The BitNet b1.58 model families: the same decoder with a different MLP activation and
/// with or without the sub-norms before `o_proj` and `down_proj`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Family {
    /// `microsoft/bitnet-b1.58-2B-4T` (`BitNetForCausalLM`): squared-ReLU gated MLP, sub-norms
    /// `attn_sub_norm` and `ffn_sub_norm`.
    #[default]
    BitNet,
    /// Llama models with ternary linears (`LlamaForCausalLM` with `quant_method: "bitnet"`):
    /// tiiuae's Falcon3-*-1.58bit and Falcon-E, HF1BitLLM's Llama3-8B-1.58. SiLU-gated MLP, no
    /// sub-norms.
    Llama,
    /// 1bitLLM's `bitnet_b1_58` reproductions (`BitnetForCausalLM`): SiLU-gated MLP, sub-norms
    /// `inner_attn_ln` and `ffn_layernorm`.
    OneBitLlm,
}

/// The gate's nonlinearity in the MLP, `act(gate) * up`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Activation {
    /// `relu(x)²` (config.json's `"relu2"`).
    Relu2,
    /// `x * sigmoid(x)` (`"silu"`).
    Silu,
}

impl Activation {
    /// config.json's `hidden_act` name.
    pub fn name(self) -> &'static str {
        match self {
            Activation::Relu2 => "relu2",
            Activation::Silu => "silu",
        }
    }

    /// `act(gate) * up`, element by element ([`crate::cpu::relu2_gate`],
    /// [`crate::cpu::silu_gate`]).
    pub fn gate(self, gate: &[f32], up: &[f32]) -> Result<Vec<f32>> {
        match self {
            Activation::Relu2 => relu2_gate(gate, up),
            Activation::Silu => silu_gate(gate, up),
        }
    }

    /// The gradients `(dgate, dup)` of [`Activation::gate`] for the upstream gradient `dy`.
    pub fn gate_backward(
        self,
        gate: &[f32],
        up: &[f32],
        dy: &[f32],
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        match self {
            Activation::Relu2 => relu2_gate_backward(gate, up, dy),
            Activation::Silu => silu_gate_backward(gate, up, dy),
        }
    }
}

impl Family {
    pub const ALL: [Family; 3] = [Family::BitNet, Family::Llama, Family::OneBitLlm];

    /// The MLP's activation.
    pub fn activation(self) -> Activation {
        match self {
            Family::BitNet => Activation::Relu2,
            Family::Llama | Family::OneBitLlm => Activation::Silu,
        }
    }

    /// Whether the attention output and the MLP's gated product are normalized before the
    /// linear that reads them.
    pub fn has_sub_norms(self) -> bool {
        !matches!(self, Family::Llama)
    }

    /// config.json's `architectures` entry.
    pub fn hf_architecture(self) -> &'static str {
        match self {
            Family::BitNet => "BitNetForCausalLM",
            Family::Llama => "LlamaForCausalLM",
            Family::OneBitLlm => "BitnetForCausalLM",
        }
    }

    /// GGUF's `general.architecture`, as bitnet.cpp's converters write it.
    pub fn gguf_architecture(self) -> &'static str {
        match self {
            Family::BitNet => "bitnet-b1.58",
            Family::Llama => "llama",
            Family::OneBitLlm => "bitnet",
        }
    }

    /// A short name for messages and `--json` output.
    pub fn name(self) -> &'static str {
        match self {
            Family::BitNet => "bitnet-b1.58",
            Family::Llama => "llama-bitnet",
            Family::OneBitLlm => "1bitllm-bitnet",
        }
    }

    /// The Hugging Face names of the two sub-norms below `model.layers.N.`, if the family has
    /// them.
    fn sub_norm_names(self) -> Option<[&'static str; 2]> {
        match self {
            Family::BitNet => Some(["self_attn.attn_sub_norm", "mlp.ffn_sub_norm"]),
            Family::Llama => None,
            Family::OneBitLlm => Some(["self_attn.inner_attn_ln", "mlp.ffn_layernorm"]),
        }
    }
}

/// One ternary linear of a decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearSpec {
    /// Name below `model.layers.N.` (without `.weight`).
    pub hf: &'static str,
    /// Name below `blk.N.` (without `.weight`).
    pub gguf: &'static str,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// What `cols` is, in the config's words.
    pub cols_name: &'static str,
}

/// One norm of a decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NormSpec {
    /// Name below `model.layers.N.` (without `.weight`).
    pub hf: &'static str,
    /// Name below `blk.N.` (without `.weight`).
    pub gguf: &'static str,
    /// Its length; 0 for a sub-norm of a family that has none (the tensor is absent and the
    /// layer's vector empty).
    pub len: usize,
}

impl NormSpec {
    /// Whether the family has this norm.
    pub fn present(&self) -> bool {
        self.len > 0
    }
}

impl ModelConfig {
    /// Query width, `num_attention_heads * head_dim`.
    pub fn attention_width(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Key (and value) width, `num_key_value_heads * head_dim`.
    pub fn kv_width(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// The seven linears, in the order q, k, v, o, gate, up, down
    /// ([`crate::model::LayerWeights::linears`]).
    pub fn layer_linears(&self) -> [LinearSpec; 7] {
        let (attn, kv) = (self.attention_width(), self.kv_width());
        let (hidden, inter) = (self.hidden_size, self.intermediate_size);
        let linear = |hf, gguf, rows, cols, cols_name| LinearSpec {
            hf,
            gguf,
            rows,
            cols,
            cols_name,
        };
        [
            linear("self_attn.q_proj", "attn_q", attn, hidden, "hidden_size"),
            linear("self_attn.k_proj", "attn_k", kv, hidden, "hidden_size"),
            linear("self_attn.v_proj", "attn_v", kv, hidden, "hidden_size"),
            linear(
                "self_attn.o_proj",
                "attn_output",
                hidden,
                attn,
                "num_attention_heads x head_dim",
            ),
            linear("mlp.gate_proj", "ffn_gate", inter, hidden, "hidden_size"),
            linear("mlp.up_proj", "ffn_up", inter, hidden, "hidden_size"),
            linear(
                "mlp.down_proj",
                "ffn_down",
                hidden,
                inter,
                "intermediate_size",
            ),
        ]
    }

    /// The four norms, in the order input, attention sub-norm, post-attention, MLP sub-norm
    /// ([`crate::model::LayerWeights::norms`]); the sub-norms have length 0 in a family without
    /// them.
    pub fn layer_norms(&self) -> [NormSpec; 4] {
        let norm = |hf, gguf, len| NormSpec { hf, gguf, len };
        let [attn_sub, ffn_sub] = self.family.sub_norm_names().map_or(
            [("self_attn.attn_sub_norm", 0), ("mlp.ffn_sub_norm", 0)],
            |[a, f]| [(a, self.attention_width()), (f, self.intermediate_size)],
        );
        [
            norm("input_layernorm", "attn_norm", self.hidden_size),
            norm(attn_sub.0, "attn_sub_norm", attn_sub.1),
            norm("post_attention_layernorm", "ffn_norm", self.hidden_size),
            norm(ffn_sub.0, "ffn_sub_norm", ffn_sub.1),
        ]
    }

    /// Weights in the model: embeddings, every layer's linears and norms, the final norm and an
    /// untied lm_head; `None` past `usize` (a config that lies about its sizes).
    pub fn parameter_count(&self) -> Option<usize> {
        let (hidden, inter) = (self.hidden_size, self.intermediate_size);
        let attn = self.num_attention_heads.checked_mul(self.head_dim)?;
        let kv = self.num_key_value_heads.checked_mul(self.head_dim)?;
        // q and o are attn x hidden, k and v kv x hidden, gate, up and down inter x hidden.
        let per_row = attn
            .checked_mul(2)?
            .checked_add(kv.checked_mul(2)?)?
            .checked_add(inter.checked_mul(3)?)?;
        let sub_norms = if self.family.has_sub_norms() {
            attn.checked_add(inter)?
        } else {
            0
        };
        let norms = hidden.checked_mul(2)?.checked_add(sub_norms)?;
        let tables = self
            .vocab_size
            .checked_mul(hidden)?
            .checked_mul(if self.tie_word_embeddings { 1 } else { 2 })?;
        per_row
            .checked_mul(hidden)?
            .checked_add(norms)?
            .checked_mul(self.num_hidden_layers)?
            .checked_add(tables)?
            .checked_add(hidden)
    }
}

/// A sub-norm where the family has one: `norm(x, rows, weight, eps)` (an engine's
/// [`crate::cpu::rmsnorm`] or its twin), or `x` as it is where `weight` is empty (the family has
/// none, [`NormSpec::present`]).
pub(crate) fn sub_norm<'a>(
    x: &'a [f32],
    rows: usize,
    weight: &[f32],
    eps: f32,
    norm: impl FnOnce(&[f32], usize, &[f32], f32) -> Result<Vec<f32>>,
) -> Result<Cow<'a, [f32]>> {
    if weight.is_empty() {
        Ok(Cow::Borrowed(x))
    } else {
        norm(x, rows, weight, eps).map(Cow::Owned)
    }
}

/// The gradients `(dx, dweight)` of [`sub_norm`] for the upstream gradient `dy`: `dy` itself
/// and no weight gradient where the family has no sub-norm.
pub(crate) fn sub_norm_backward(
    x: &[f32],
    rows: usize,
    weight: &[f32],
    eps: f32,
    dy: &[f32],
) -> Result<(Vec<f32>, Vec<f32>)> {
    if weight.is_empty() {
        Ok((dy.to_vec(), Vec::new()))
    } else {
        rmsnorm_backward(x, rows, weight, eps, dy)
    }
}

/// The linears of [`ModelConfig::layer_linears`] as `(Hugging Face name, rows, cols)`.
pub(crate) fn linear_shapes(c: &ModelConfig) -> [(&'static str, usize, usize); 7] {
    c.layer_linears().map(|l| (l.hf, l.rows, l.cols))
}
