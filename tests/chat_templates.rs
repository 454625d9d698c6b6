//! Chat templates rendered and tokenized as transformers' `apply_chat_template` does, against
//! what it produced (tests/fixtures/chat/expected.json, written by scripts/chat-fixtures.py),
//! and a conversation that stops at the template's end of turn.
#![cfg(not(target_arch = "wasm32"))]

use bitnet_wgpu::chat::{ChatFiles, ChatTemplate, Conversation, Message};
use bitnet_wgpu::model::{
    Device, Engine, GenerationParams, Generator, ModelConfig, SamplingParams, Stop, synthetic,
};
use bitnet_wgpu::tokenizer::Tokenizer;
use serde_json::Value;

const TOKENIZER: &str = include_str!("fixtures/chat/tokenizer.json");
const EXPECTED: &str = include_str!("fixtures/chat/expected.json");

fn template_source(name: &str) -> &'static str {
    match name {
        "llama3" => include_str!("fixtures/chat/llama3.jinja"),
        "falcon3" => include_str!("fixtures/chat/falcon3.jinja"),
        "strict" => include_str!("fixtures/chat/strict.jinja"),
        other => panic!("no template {other}"),
    }
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_json(TOKENIZER.as_bytes()).unwrap()
}

#[test]
fn templates_render_and_tokenize_as_transformers_does() {
    let cases: Vec<Value> = serde_json::from_str(EXPECTED).unwrap();
    assert_eq!(cases.len(), 18);
    let tokenizer = tokenizer();
    for case in &cases {
        let name = case["template"].as_str().unwrap();
        let template = ChatTemplate::new(template_source(name))
            .unwrap()
            .with_special_tokens(
                case["bos_token"].as_str().unwrap(),
                case["eos_token"].as_str().unwrap(),
            );
        let messages: Vec<Message> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let add = case["add_generation_prompt"].as_bool().unwrap();
        let rendered = template.render(&messages, add);
        let what = format!("{name}, {}, {add}", case["conversation"]);
        if let Some(error) = case["error"].as_str() {
            let e = rendered.unwrap_err().to_string();
            assert!(e.contains(error), "{what}: {e}");
            continue;
        }
        let text = rendered.unwrap();
        assert_eq!(text, case["text"].as_str().unwrap(), "{what}");
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        // The template wrote the bos: nothing is added around the text.
        assert_eq!(tokenizer.encode(&text, false).unwrap(), ids, "{what}");
    }
}

#[test]
fn model_files_give_the_template_and_its_end_of_turn() {
    let tokenizer = tokenizer();
    let eot = tokenizer.token_id("<|eot_id|>").unwrap();
    let end_of_text = tokenizer.token_id("<|end_of_text|>").unwrap();
    let tokenizer = tokenizer.with_special_ids(None, Some(end_of_text)).unwrap();
    let config = serde_json::json!({
        "chat_template": template_source("llama3"),
        "bos_token": {"content": "<|begin_of_text|>", "special": true},
        "eos_token": "<|end_of_text|>",
    })
    .to_string();
    let files = ChatFiles {
        tokenizer_config: Some(config.as_bytes()),
        generation_config: Some(br#"{"eos_token_id": [7, 8]}"#),
        ..ChatFiles::default()
    };
    let template = files.template(&tokenizer).unwrap().unwrap();
    assert_eq!(template.bos_token(), "<|begin_of_text|>");
    // The eos, generation_config's list, and the <|eot_id|> the template writes.
    let mut ends = vec![7, 8, eot, end_of_text];
    ends.sort_unstable();
    assert_eq!(template.end_of_turn(), ends);

    // chat_template.jinja wins over the config's entry; no template at all is none.
    let files = ChatFiles {
        chat_template: Some(template_source("falcon3").as_bytes()),
        ..files
    };
    let template = files.template(&tokenizer).unwrap().unwrap();
    assert_eq!(template.source(), template_source("falcon3"));
    assert!(ChatFiles::default().template(&tokenizer).unwrap().is_none());
    let bad = ChatFiles {
        tokenizer_config: Some(br#"{"chat_template": "{% for %}"}"#),
        ..ChatFiles::default()
    };
    let e = bad.template(&tokenizer).unwrap_err().to_string();
    assert!(e.contains("chat template"), "{e}");
}

/// A greedy answer stops at the first end-of-turn id, and the next turn is prefilled from the
/// cache of the first.
#[test]
fn answers_stop_at_the_end_of_turn() {
    pollster::block_on(async {
        let config = ModelConfig {
            vocab_size: 258,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 1,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            max_position_embeddings: 128,
            ..ModelConfig::bitnet_b158_2b4t()
        };
        let (engine, _) = Engine::new(Device::Cpu, &synthetic(&config, 3))
            .await
            .unwrap();
        let mut generator = Generator::new(engine, Tokenizer::bytes(258));
        let params = GenerationParams {
            max_new_tokens: 6,
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
        };
        let source = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}";
        let free = Conversation::new(ChatTemplate::new(source).unwrap(), None)
            .reply(&mut generator, "Hi", &params, |_| true)
            .await
            .unwrap();
        assert_eq!(free.generated_ids.len(), 6);
        let end = free.generated_ids[2];
        let template = ChatTemplate::new(source).unwrap().with_end_of_turn([end]);
        let mut chat = Conversation::new(template, None);
        let first = chat
            .reply(&mut generator, "Hi", &params, |_| true)
            .await
            .unwrap();
        let stop_at = free.generated_ids.iter().position(|&id| id == end).unwrap();
        assert_eq!(first.generated_ids, free.generated_ids[..=stop_at]);
        assert_eq!(first.stop, Stop::EndOfSequence);
        let second = chat
            .reply(&mut generator, "Again", &params, |_| true)
            .await
            .unwrap();
        assert!(second.prefilled < second.prompt_ids.len() - first.prompt_ids.len() + 1);
        // The same turn from nothing: the same tokens.
        generator.engine_mut().reset();
        let direct = generator
            .generate_ids(&second.prompt_ids, &[end], &params, |_| true)
            .await
            .unwrap();
        assert_eq!(direct.prefilled, direct.prompt_ids.len());
        assert_eq!(direct.generated_ids, second.generated_ids);
    });
}
