//! Decoding several sequences together on the CPU engine (`CpuEngine::forward_batch`, what
//! `bitnet serve` runs each step): aggregate tokens per second for each batch size, against one
//! sequence at a time. Prints one JSON object per batch size.
//!
//! `cargo bench --bench batched_decode -- MODEL [STEPS] [BATCH SIZES...]` (defaults: 16 steps;
//! 1, 4, 16 and 64 sequences). Each sequence first takes a prompt of 8 tokens of its own, all
//! in one batched step; then every step decodes one greedy token per sequence.
#![cfg_attr(target_arch = "wasm32", no_main)]
#![cfg(not(target_arch = "wasm32"))]

use std::time::Instant;

use bitnet_wgpu::cpu::argmax;
use bitnet_wgpu::model::{CpuEngine, KvCache, load_model};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let model = args.first().ok_or("give a model path")?;
    let steps: usize = args.get(1).map_or(Ok(16), |a| a.parse())?;
    let sizes: Vec<usize> = match args.get(2..) {
        Some(sizes) if !sizes.is_empty() => {
            sizes.iter().map(|a| a.parse()).collect::<Result<_, _>>()?
        }
        _ => vec![1, 4, 16, 64],
    };
    let (weights, _) = load_model(model)?;
    let vocab = weights.config.vocab_size;
    let mut engine = CpuEngine::new(&weights)?;
    let mut single = None;
    for &size in &sizes {
        let prompts: Vec<Vec<u32>> = (0..size as u32)
            .map(|s| {
                (0..8)
                    .map(|i| (s * 104_729 + i * 7919 + 1) % vocab as u32)
                    .collect()
            })
            .collect();
        let mut caches: Vec<KvCache> = (0..size).map(|_| engine.new_cache()).collect();
        let mut work: Vec<(&mut KvCache, &[u32])> = caches
            .iter_mut()
            .zip(&prompts)
            .map(|(c, p)| (c, p.as_slice()))
            .collect();
        let started = Instant::now();
        let mut logits = engine.forward_batch(&mut work)?;
        let prompt_time = started.elapsed().as_secs_f64();
        let started = Instant::now();
        for _ in 0..steps {
            let next: Vec<[u32; 1]> = logits
                .chunks_exact(vocab)
                .map(|row| argmax(row).map(|id| [id]))
                .collect::<Result<_, _>>()?;
            let mut work: Vec<(&mut KvCache, &[u32])> = caches
                .iter_mut()
                .zip(&next)
                .map(|(c, id)| (c, id.as_slice()))
                .collect();
            logits = engine.forward_batch(&mut work)?;
        }
        let time = started.elapsed().as_secs_f64();
        let tokens_per_s = (size * steps) as f64 / time;
        let base = *single.get_or_insert(tokens_per_s);
        println!(
            "{}",
            serde_json::json!({
                "sequences": size,
                "prompt_tokens_per_s": (size * 8) as f64 / prompt_time,
                "decode_tokens_per_s": tokens_per_s,
                "ms_per_step": 1e3 * time / steps as f64,
                "vs_first_size": tokens_per_s / base,
            })
        );
    }
    Ok(())
}
