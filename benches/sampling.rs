//! Host cost of choosing a token from one row of 2B4T-sized logits (128256), for the sampling
//! settings people use. Prints a Markdown table for BENCHMARKS.md. `cargo bench --bench sampling`.
//!
//! Two kinds of rows: uniformly spread logits (the worst case for top-p: the nucleus holds
//! thousands of tokens) and a language model's shape (a normal bulk, a few tokens well above it).
#![cfg_attr(target_arch = "wasm32", no_main)]
#![cfg(not(target_arch = "wasm32"))]

use std::time::Instant;

use bitnet_wgpu::model::{Sampler, SamplingParams};
use bitnet_wgpu::rng::SplitMix64;

const VOCAB: usize = 128_256;
const DRAWS: usize = 50;

fn uniform(rng: &mut SplitMix64) -> f32 {
    rng.next_f64() as f32
}

fn rows() -> [(&'static str, Vec<f32>); 2] {
    let mut rng = SplitMix64(1);
    let spread = (0..VOCAB)
        .map(|_| (uniform(&mut rng) - 0.5) * 20.0)
        .collect();
    let mut peaked: Vec<f32> = (0..VOCAB)
        .map(|_| ((0..6).map(|_| uniform(&mut rng)).sum::<f32>() - 3.0) * 2.5)
        .collect();
    for i in 0..20 {
        peaked[i * 997] = 12.0 + i as f32 * 0.3;
    }
    [("uniform", spread), ("LM-like", peaked)]
}

fn main() {
    println!("| logits | temperature | top-k | top-p | ms per token |");
    println!("| --- | --- | --- | --- | --- |");
    for (name, logits) in rows() {
        for (temperature, top_k, top_p) in [
            (0.0, 0, 1.0),
            (0.8, 0, 0.95),
            (0.8, 40, 0.95),
            (1.0, 0, 1.0),
        ] {
            let mut sampler = Sampler::new(SamplingParams {
                temperature,
                top_k,
                top_p,
                seed: 1,
            })
            .expect("valid parameters");
            let started = Instant::now();
            for _ in 0..DRAWS {
                sampler.sample(&logits).expect("finite logits");
            }
            let ms = started.elapsed().as_secs_f64() * 1e3 / DRAWS as f64;
            println!("| {name} | {temperature} | {top_k} | {top_p} | {ms:.3} |");
        }
    }
}
