//! tokenizer.json: any bytes are a tokenizer or an error, and a tokenizer encodes and decodes.
#![no_main]

use bitnet_wgpu::tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(tokenizer) = Tokenizer::from_json(data) else {
        return;
    };
    for add_special_tokens in [false, true] {
        let Ok(ids) = tokenizer.encode("It was a dark night. Über 東京 🦀!", add_special_tokens)
        else {
            continue;
        };
        assert!(ids.iter().all(|&id| (id as usize) < tokenizer.vocab_size()));
        let _ = tokenizer.decode(&ids);
    }
    let _ = tokenizer.to_gguf().map(|t| Tokenizer::from_gguf(&t));
    let _ = tokenizer.to_json();
});
