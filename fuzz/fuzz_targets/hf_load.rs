//! A Hugging Face checkpoint from bytes: the input's frames are config.json, tokenizer.json
//! (none when empty) and the safetensors shards.
#![no_main]

use bitnet_wgpu::formats::hf;
use bitnet_wgpu::model::load_model_from_bytes;
use bitnet_wgpu_fuzz::frames;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let parts = frames(data);
    let Some((config, rest)) = parts.split_first() else {
        return;
    };
    let (tokenizer, shards): (&[u8], &[&[u8]]) = match rest.split_first() {
        Some((tokenizer, shards)) => (tokenizer, shards),
        None => (&[], &[]),
    };
    let names: Vec<String> = (0..shards.len())
        .map(|i| format!("model-{i:05}.safetensors"))
        .collect();
    let mut files = vec![("config.json", *config)];
    if !tokenizer.is_empty() {
        files.push(("tokenizer.json", tokenizer));
    }
    files.extend(names.iter().map(String::as_str).zip(shards.iter().copied()));
    if let Ok((weights, tokenizer)) = load_model_from_bytes(&files) {
        assert!(tokenizer.vocab_size() <= weights.config.vocab_size);
    }
    if let Ok(text) = std::str::from_utf8(config) {
        let _ = hf::load_from_bytes(text, shards);
    }
});
