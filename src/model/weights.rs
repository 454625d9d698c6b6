use crate::cpu::TernaryWeights;
use crate::model::ModelConfig;

/// One decoder layer. Linear weights are ternary codes `[out, in]` with Hugging Face's
/// `weight_scale` convention (`W ≈ codes / scale`); norms are f32 vectors.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerWeights {
    pub input_layernorm: Vec<f32>,
    pub q_proj: TernaryWeights,
    pub k_proj: TernaryWeights,
    pub v_proj: TernaryWeights,
    pub o_proj: TernaryWeights,
    pub attn_sub_norm: Vec<f32>,
    pub post_attention_layernorm: Vec<f32>,
    pub gate_proj: TernaryWeights,
    pub up_proj: TernaryWeights,
    pub down_proj: TernaryWeights,
    pub ffn_sub_norm: Vec<f32>,
}

impl LayerWeights {
    /// The seven linears in the order q, k, v, o, gate, up, down (as checkpoints name them).
    pub fn linears(&self) -> [&TernaryWeights; 7] {
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

    /// The four norms in the order input, attention sub-norm, post-attention, MLP sub-norm.
    pub fn norms(&self) -> [&[f32]; 4] {
        [
            &self.input_layernorm,
            &self.attn_sub_norm,
            &self.post_attention_layernorm,
            &self.ffn_sub_norm,
        ]
    }
}

/// A whole model in memory, whatever file it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelWeights {
    pub config: ModelConfig,
    /// `[vocab_size, hidden_size]`, row-major.
    pub embed_tokens: Vec<f32>,
    pub layers: Vec<LayerWeights>,
    pub norm: Vec<f32>,
    /// `[vocab_size, hidden_size]`; `None` when tied to `embed_tokens`.
    pub lm_head: Option<Vec<f32>>,
}
