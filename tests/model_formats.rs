//! One model written in each checkpoint format and loaded back gives the same logits.
#![cfg(not(target_arch = "wasm32"))]

use bitnet_wgpu::formats::{gguf, hf};
use bitnet_wgpu::model::{KvCache, ModelConfig, ModelWeights, forward, load_model, synthetic};

/// Relative to the largest logit: GGUF stores bitnet.cpp's scale (the reciprocal of ours), which
/// can come back one ulp off; everything else round-trips bit for bit.
const TOL: f32 = 1e-5;

fn tiny() -> ModelWeights {
    let config = ModelConfig {
        vocab_size: 50,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        max_position_embeddings: 32,
        ..ModelConfig::bitnet_b158_2b4t()
    };
    synthetic(&config, 3)
}

fn logits(weights: &ModelWeights) -> Vec<f32> {
    let mut cache = KvCache::new(&weights.config);
    forward(weights, &[1, 7, 3, 49, 0, 12], &mut cache).expect("forward")
}

fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= TOL * scale,
            "{what}: logit {i}: {g} vs {w}"
        );
    }
}

#[test]
fn every_format_gives_the_same_logits() {
    let weights = tiny();
    let want = logits(&weights);
    let dir = std::env::temp_dir().join(format!("bitnet-formats-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);

    let hf_dir = dir.join("hf");
    hf::save_dir(&weights, &hf_dir, &[]).expect("save safetensors");
    let gguf_file = dir.join("model.gguf");
    std::fs::write(
        &gguf_file,
        gguf::write_model(&weights, None, gguf::TableType::F32).expect("write gguf"),
    )
    .unwrap();

    let (from_hf, _) = load_model(&hf_dir).expect("load safetensors");
    assert_eq!(from_hf, weights, "the safetensors round trip is exact");
    assert_close(&logits(&from_hf), &want, "safetensors");
    let (from_gguf, _) = load_model(&gguf_file).expect("load gguf");
    assert_close(&logits(&from_gguf), &want, "gguf");
    std::fs::remove_dir_all(&dir).unwrap();
}
