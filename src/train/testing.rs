//! Test support: the tiny configuration and awkward random models the training tests share.

use super::{Quant, TrainModel};
use crate::model::{Family, ModelConfig};
use crate::rng::SplitMix64;

/// vocab 37, hidden 16, 2 layers, 4 heads over 2 kv heads of 4, intermediate 24.
pub fn tiny_config(tied: bool) -> ModelConfig {
    ModelConfig {
        family: Default::default(),
        vocab_size: 37,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        max_position_embeddings: 32,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        tie_word_embeddings: tied,
        bos_token_id: None,
        eos_token_id: None,
    }
}

/// A tiny model whose every tensor is redrawn with magnitudes far from the initialization's
/// (norm weights in [0.5, 1.5), the rest in [-0.5, 0.5)), so that every path of the gradient
/// carries a signal well above float noise.
pub fn scrambled_model(tied: bool, quant: Quant, seed: u64) -> TrainModel {
    scrambled_model_of(Family::BitNet, tied, quant, seed)
}

/// [`scrambled_model`] of a model of `family`.
pub fn scrambled_model_of(family: Family, tied: bool, quant: Quant, seed: u64) -> TrainModel {
    let config = ModelConfig {
        family,
        ..tiny_config(tied)
    };
    let mut model = TrainModel::new(config, quant, seed).unwrap();
    let mut rng = SplitMix64(seed ^ 0x5eed);
    let names: Vec<String> = model.params.tensors().into_iter().map(|(n, _)| n).collect();
    for (name, t) in names.iter().zip(model.params.tensors_mut()) {
        let norm = name.contains("norm");
        for v in t.iter_mut() {
            let u = rng.uniform_f32();
            *v = if norm { 1.0 + 0.5 * u } else { 0.5 * u };
        }
    }
    model
}

/// Two windows of 7 tokens, with repeats, the first and the last id.
pub const WINDOWS: [&[u32]; 2] = [&[3, 36, 0, 17, 17, 5, 29], &[8, 8, 21, 0, 33, 12, 36]];
