//! Models with real shapes and random weights, for benchmarks: speed and memory depend on the
//! shapes alone.

use crate::cpu::TernaryWeights;
use crate::model::{Family, LayerWeights, ModelConfig, ModelWeights};
use crate::rng::SplitMix64;

impl ModelConfig {
    /// The shapes of microsoft/bitnet-b1.58-2B-4T (REFERENCES.md).
    pub fn bitnet_b158_2b4t() -> Self {
        ModelConfig {
            family: Family::BitNet,
            vocab_size: 128_256,
            hidden_size: 2560,
            intermediate_size: 6912,
            num_hidden_layers: 30,
            num_attention_heads: 20,
            num_key_value_heads: 5,
            head_dim: 128,
            max_position_embeddings: 4096,
            rms_norm_eps: 1e-5,
            rope_theta: 500_000.0,
            tie_word_embeddings: true,
            bos_token_id: Some(128_000),
            eos_token_id: Some(128_001),
        }
    }
}

fn ternary(rng: &mut SplitMix64, rows: usize, cols: usize) -> TernaryWeights {
    // Each u64 gives 21 trits; a real checkpoint has roughly this one-third of zeros.
    let mut codes = Vec::with_capacity(rows * cols);
    while codes.len() < rows * cols {
        let mut bits = rng.next_u64();
        for _ in 0..21.min(rows * cols - codes.len()) {
            codes.push((bits % 3) as i8 - 1);
            bits /= 3;
        }
    }
    TernaryWeights {
        rows,
        cols,
        codes,
        scales: vec![40.0 + rng.uniform_f32()],
    }
}

fn norm(rng: &mut SplitMix64, n: usize) -> Vec<f32> {
    (0..n).map(|_| 1.0 + 0.1 * rng.uniform_f32()).collect()
}

/// A model with `config`'s shapes, random ternary linears, tied embeddings and norms near 1.
///
/// ```
/// let mut config = bitnet_wgpu::model::ModelConfig::bitnet_b158_2b4t();
/// config.num_hidden_layers = 1;
/// config.vocab_size = 100;
/// let weights = bitnet_wgpu::model::synthetic(&config, 7);
/// weights.validate().unwrap();
/// ```
pub fn synthetic(config: &ModelConfig, seed: u64) -> ModelWeights {
    let mut rng = SplitMix64(seed);
    let c = config;
    let h = c.hidden_size;
    // A family without sub-norms has length 0 for them: they come out empty.
    let [input, attn_sub, post, ffn_sub] = c.layer_norms().map(|n| n.len);
    let [q, k, v, o, gate, up, down] = c.layer_linears().map(|l| (l.rows, l.cols));
    let layers = (0..c.num_hidden_layers)
        .map(|_| LayerWeights {
            input_layernorm: norm(&mut rng, input),
            q_proj: ternary(&mut rng, q.0, q.1),
            k_proj: ternary(&mut rng, k.0, k.1),
            v_proj: ternary(&mut rng, v.0, v.1),
            o_proj: ternary(&mut rng, o.0, o.1),
            attn_sub_norm: norm(&mut rng, attn_sub),
            post_attention_layernorm: norm(&mut rng, post),
            gate_proj: ternary(&mut rng, gate.0, gate.1),
            up_proj: ternary(&mut rng, up.0, up.1),
            down_proj: ternary(&mut rng, down.0, down.1),
            ffn_sub_norm: norm(&mut rng, ffn_sub),
        })
        .collect();
    ModelWeights {
        config: c.clone(),
        embed_tokens: (0..c.vocab_size * h)
            .map(|_| 0.02 * rng.uniform_f32())
            .collect(),
        layers,
        norm: norm(&mut rng, h),
        lm_head: None,
    }
}
