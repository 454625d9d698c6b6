//! Encoding any text and decoding any ids with a tokenizer.json, the GGUF vocabulary written
//! from it, and the byte-level fallback. The input is the text; read as little-endian u16 ids
//! (modulo a bound a little past the vocabulary, so most are valid), it is also the ids.
#![no_main]

use std::sync::LazyLock;

use bitnet_wgpu::tokenizer::Tokenizer;
use bitnet_wgpu_fuzz::BPE_TOKENIZER;
use libfuzzer_sys::fuzz_target;

static TOKENIZERS: LazyLock<[Tokenizer; 3]> = LazyLock::new(|| {
    let json = Tokenizer::from_json(BPE_TOKENIZER)
        .and_then(|t| t.with_special_ids(Some(0), Some(1)))
        .expect("the seed tokenizer.json");
    let gguf = json
        .to_gguf()
        .and_then(|t| Tokenizer::from_gguf(&t))
        .expect("the seed tokenizer as a GGUF vocabulary");
    let bytes = Tokenizer::bytes(json.vocab_size());
    [json, gguf, bytes]
});

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    for tokenizer in TOKENIZERS.iter() {
        let vocab = tokenizer.vocab_size();
        for add_special_tokens in [false, true] {
            if let Ok(ids) = tokenizer.encode(&text, add_special_tokens) {
                assert!(ids.iter().all(|&id| (id as usize) < vocab));
                tokenizer
                    .decode(&ids)
                    .expect("decoding ids the tokenizer made");
            }
        }
        let ids: Vec<u32> = data
            .chunks(2)
            .map(|b| {
                u32::from(u16::from_le_bytes([b[0], *b.get(1).unwrap_or(&0)])) % (vocab as u32 + 4)
            })
            .collect();
        let _ = tokenizer.decode(&ids);
        let mut stream = tokenizer.stream_decoder();
        for &id in &ids {
            let _ = stream.step(id);
        }
        let _ = stream.finish();
    }
});
