//! A 10,000-token generation on one GPU model: host and GPU memory after every 1,000 tokens,
//! which must stay flat once the KV cache is allocated, and the decode speed as the context grows.
//!
//! `cargo bench --bench long_generation` (any adapter; `WGPU_BACKEND=vulkan` for lavapipe).
//! Prints one table. Host memory is the process's resident set (Linux `/proc/self/statm`); GPU
//! memory is wgpu's allocator report where the backend gives one (Vulkan, DX12).

use std::time::Instant;

use bitnet_wgpu::gpu::{GpuContext, TableStorage};
use bitnet_wgpu::model::{GpuModel, ModelConfig, synthetic};

const TOKENS: usize = 10_000;
const EVERY: usize = 1_000;

fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or("n/a".into(), |b| {
        format!("{:.1}", b as f64 / (1 << 20) as f64)
    })
}

fn main() {
    let ctx = pollster::block_on(GpuContext::new()).expect("a GPU adapter");
    let config = ModelConfig {
        vocab_size: 258,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        max_position_embeddings: TOKENS + 1,
        ..ModelConfig::bitnet_b158_2b4t()
    };
    let weights = synthetic(&config, 5);
    let mut model = GpuModel::new(&ctx, &weights, TOKENS + 1, TableStorage::F32).unwrap();
    let gpu_bytes = |ctx: &GpuContext| {
        ctx.device
            .poll(wgpu::PollType::Wait {
                submission_index: None,
                timeout: None,
            })
            .unwrap();
        ctx.device
            .generate_allocator_report()
            .map(|r| r.total_allocated_bytes)
    };
    println!(
        "adapter: {} ({:?}); model: 2 layers, hidden 64, KV cache for {} positions",
        ctx.adapter_info().name,
        ctx.adapter_info().backend,
        TOKENS + 1
    );
    println!("| tokens | host RSS MiB | GPU allocated MiB | tokens/s over the last {EVERY} |");
    println!("| --- | --- | --- | --- |");
    let mut next = vec![1u32];
    let mut generated = 0;
    while generated < TOKENS {
        let started = Instant::now();
        let chosen = pollster::block_on(model.greedy(&ctx, &next, EVERY, 258, |_| true)).unwrap();
        let speed = chosen.len() as f64 / started.elapsed().as_secs_f64();
        generated += chosen.len();
        next = vec![*chosen.last().expect("greedy chose tokens")];
        println!(
            "| {generated} | {} | {} | {speed:.0} |",
            mib(resident_bytes()),
            mib(gpu_bytes(&ctx))
        );
    }
    assert_eq!(model.len(), TOKENS, "the cache holds every position fed");
}
