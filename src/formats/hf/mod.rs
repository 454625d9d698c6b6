//! Hugging Face checkpoints: a folder with config.json and safetensors, offline packed
//! (`microsoft/bitnet-b1.58-2B-4T`) or full precision (the `-bf16` master weights), read into
//! [`ModelWeights`](crate::model::ModelWeights) and written back in the offline packed format.
//!
//! Tensors (`N` = layer):
//!
//! | name | offline packed | full precision |
//! | --- | --- | --- |
//! | `model.layers.N.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}.weight` | U8 `[out/4, in]` | BF16/F16/F32 `[out, in]` |
//! | `…_proj.weight_scale` | BF16/F16/F32 `[1]` or `[]` | absent |
//! | `model.embed_tokens.weight`, `lm_head.weight` | BF16/F16/F32 `[vocab, hidden]` | same |
//! | `model.layers.N.{input_layernorm, post_attention_layernorm, self_attn.attn_sub_norm}.weight`, `model.norm.weight` | BF16/F16/F32 `[hidden]` | same |
//! | `model.layers.N.mlp.ffn_sub_norm.weight` | BF16/F16/F32 `[intermediate]` | same |
//!
//! The Llama family (`LlamaForCausalLM`: Falcon3-1.58bit, Falcon-E) has no sub-norms and stores
//! `weight_scale` as transformers' `BitLinear` reads it, a divisor; 1bitLLM's
//! `BitnetForCausalLM` names its sub-norms `self_attn.inner_attn_ln` and `mlp.ffn_layernorm`
//! ([`crate::model::ModelConfig::layer_norms`]).
//!
//! `lm_head.weight` is absent when `tie_word_embeddings` is true (a copy equal to the embedding is
//! tolerated). Loading is strict: every tensor's presence, dtype, shape and values are checked
//! against config.json, and a tensor nobody asked for is an error naming it (a file with more
//! layers than the config, or biases, would otherwise load as a different model), except the
//! recomputable RoPE buffers `*.inv_freq` that older exports saved.

mod config;
mod load;
mod save;
#[cfg(test)]
mod tests;

pub use config::{
    CheckpointConfig, LinearClass, WeightFormat, config_json, parse_checkpoint_config, parse_config,
};
pub use load::{Checkpoint, CheckpointFiles, load_dir, load_from_bytes};
pub use save::{save_dir, to_safetensors_bytes};

use crate::model::ModelConfig;

/// Name of the config file in a checkpoint folder.
pub const CONFIG_FILE: &str = "config.json";
/// Name of the single weights file.
pub const WEIGHTS_FILE: &str = "model.safetensors";
/// Name of the index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The seven linears of a layer: name below `model.layers.N.`, `out` and `in` features.
pub(crate) use crate::model::linear_shapes as layer_linears;

/// The norms a layer of `c`'s family holds: name below `model.layers.N.` and length.
pub(crate) fn present_norms(c: &ModelConfig) -> impl Iterator<Item = (&'static str, usize)> {
    c.layer_norms()
        .into_iter()
        .filter(|n| n.present())
        .map(|n| (n.hf, n.len))
}

fn layer_prefix(layer: usize) -> String {
    format!("model.layers.{layer}")
}

/// The values of a BF16, F16 or F32 tensor as f32 (the 16-bit types widen exactly); `None` for
/// any other dtype.
pub(crate) fn widen(dtype: safetensors::Dtype, data: &[u8]) -> Option<Vec<f32>> {
    use half::{bf16, f16};
    use safetensors::Dtype;
    Some(match dtype {
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        _ => return None,
    })
}
