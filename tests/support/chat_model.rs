//! A tiny chat model folder for the CLI and server tests: a random model over the chat
//! fixtures' byte-level tokenizer (265 tokens), with Llama 3's template or none.

use std::path::PathBuf;

use bitnet_wgpu::formats::hf::save_dir;
use bitnet_wgpu::model::{ModelConfig, synthetic};

const TOKENIZER: &str = include_str!("../fixtures/chat/tokenizer.json");
const LLAMA3: &str = include_str!("../fixtures/chat/llama3.jinja");

/// The folder; removed when dropped.
pub struct ChatModel(pub PathBuf);

impl ChatModel {
    pub fn new(with_template: bool) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "bitnet-chat-model-{}-{with_template}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        let config = ModelConfig {
            vocab_size: 272,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            max_position_embeddings: 160,
            bos_token_id: Some(256),
            eos_token_id: Some(257),
            ..ModelConfig::bitnet_b158_2b4t()
        };
        save_dir(&synthetic(&config, 5), &dir, &[]).unwrap();
        std::fs::write(dir.join("tokenizer.json"), TOKENIZER).unwrap();
        if with_template {
            let tokenizer_config = serde_json::json!({
                "chat_template": LLAMA3, "bos_token": "<|begin_of_text|>",
                "eos_token": "<|eot_id|>"});
            std::fs::write(
                dir.join("tokenizer_config.json"),
                tokenizer_config.to_string(),
            )
            .unwrap();
        }
        ChatModel(dir)
    }

    pub fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for ChatModel {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
