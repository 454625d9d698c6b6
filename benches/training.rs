//! One forward+backward of a small BitNet model on the CPU: the readable reference against the
//! multi-threaded fast path (`src/train/fast.rs`), with their losses, which must agree. Prints
//! one line for BENCHMARKS.md. `cargo bench --bench training` (RAYON_NUM_THREADS sets the threads).
#![cfg_attr(target_arch = "wasm32", no_main)]
#![cfg(not(target_arch = "wasm32"))]

use std::time::Instant;

use bitnet_wgpu::model::ModelConfig;
use bitnet_wgpu::train::{Quant, TrainModel};

fn main() {
    let config = ModelConfig {
        family: Default::default(),
        vocab_size: 512,
        hidden_size: 256,
        intermediate_size: 688,
        num_hidden_layers: 4,
        num_attention_heads: 8,
        num_key_value_heads: 4,
        head_dim: 32,
        max_position_embeddings: 128,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: None,
    };
    let model = TrainModel::new(config, Quant::BitNet, 1).expect("a valid config");
    let text: Vec<u32> = (0..8 * 128).map(|i| (i * 7 % 512) as u32).collect();
    let windows: Vec<&[u32]> = text.chunks(128).collect();
    let time = |f: &dyn Fn() -> f64| {
        let start = Instant::now();
        let loss = f();
        (start.elapsed().as_secs_f64(), loss)
    };
    let (slow, a) = time(&|| model.loss_and_gradients(&windows).expect("runs").0);
    let (fast, b) = time(&|| model.loss_and_gradients_fast(&windows).expect("runs").0);
    let tokens = text.len() as f64;
    println!(
        "hidden 256, 4 layers, 8 windows of 128, {} threads: reference {slow:.3} s ({:.0} tokens/s), \
         fast {fast:.3} s ({:.0} tokens/s), {:.1}x; losses {a} and {b}",
        rayon::current_num_threads(),
        tokens / slow,
        tokens / fast,
        slow / fast
    );
    assert!(
        (a - b).abs() < 1e-5 * a,
        "the two paths disagree: {a} vs {b}"
    );
}
