//! The CPU engine against the CPU reference it is bit-identical to, on one model file: a prompt
//! in one forward, then greedy decoding one token at a time, with the logits of both compared
//! at every step. Prints one JSON object per engine. `scripts/cpu-bench.sh` runs it beside
//! pytritium and lavapipe.
//!
//! `cargo bench --bench cpu_engine -- MODEL [PROMPT_TOKENS] [DECODE_TOKENS] [REFERENCE_TOKENS]`
//! (defaults 10, 16, 4: the reference is slow, so it decodes fewer tokens).
#![cfg_attr(target_arch = "wasm32", no_main)]
#![cfg(not(target_arch = "wasm32"))]

use std::time::Instant;

use bitnet_wgpu::cpu::argmax;
use bitnet_wgpu::model::{CpuEngine, KvCache, Logits, forward, load_model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let model = args.first().ok_or("give a model path")?;
    let number = |i: usize, default: usize| args.get(i).map_or(Ok(default), |a| a.parse());
    let (prompt_len, decode, reference_decode) = (number(1, 10)?, number(2, 16)?, number(3, 4)?);
    let (weights, _) = load_model(model)?;
    let vocab = weights.config.vocab_size;
    let prompt: Vec<u32> = (0..prompt_len as u32)
        .map(|i| (i * 7919 + 1) % vocab as u32)
        .collect();

    let mut cache = KvCache::new(&weights.config);
    let started = Instant::now();
    let logits = forward(&weights, &prompt, &mut cache)?;
    let reference_prompt = started.elapsed().as_secs_f64();
    let mut reference_rows = vec![logits[logits.len() - vocab..].to_vec()];
    let started = Instant::now();
    for _ in 0..reference_decode {
        let next = argmax(reference_rows.last().unwrap())?;
        reference_rows.push(forward(&weights, &[next], &mut cache)?);
    }
    let reference_time = started.elapsed().as_secs_f64();

    let mut engine = CpuEngine::new(&weights)?;
    let started = Instant::now();
    let mut row = engine.forward_logits(&prompt, Logits::Last)?;
    let engine_prompt = started.elapsed().as_secs_f64();
    let mut identical = row == reference_rows[0];
    let started = Instant::now();
    for step in 1..=decode {
        row = engine.forward_logits(&[argmax(&row)?], Logits::Last)?;
        if let Some(want) = reference_rows.get(step) {
            identical &= row
                .iter()
                .zip(want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
        }
    }
    let engine_time = started.elapsed().as_secs_f64();
    for (name, prompt_time, tokens, time) in [
        (
            "reference",
            reference_prompt,
            reference_decode,
            reference_time,
        ),
        ("cpu engine", engine_prompt, decode, engine_time),
    ] {
        println!(
            "{}",
            serde_json::json!({
                "engine": name,
                "prompt_tokens": prompt_len,
                "prompt_tokens_per_s": prompt_len as f64 / prompt_time,
                "decode_tokens": tokens,
                "decode_tokens_per_s": tokens as f64 / time,
                "weight_bytes": (name == "cpu engine").then(|| engine.weight_bytes()),
                "logits_identical": identical,
            })
        );
    }
    Ok(())
}
