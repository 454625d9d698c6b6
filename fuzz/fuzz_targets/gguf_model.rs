//! A GGUF model loaded from bytes: weights, config and the vocabulary's tokenizer.
#![no_main]

use bitnet_wgpu::model::load_model_from_bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((weights, tokenizer)) = load_model_from_bytes(&[("model.gguf", data)]) {
        assert!(tokenizer.vocab_size() <= weights.config.vocab_size);
        let ids = tokenizer
            .encode("Hello, world! 🦀", true)
            .unwrap_or_default();
        assert!(ids.iter().all(|&id| (id as usize) < tokenizer.vocab_size()));
        let _ = tokenizer.decode(&ids);
    }
});
