//! The CPU engine's packed ternary products at 2B4T's shapes, by token count: one step's 30
//! layers of q/k/v, o, gate/up and down products (0.52 GB of weights, far beyond the caches),
//! the best of 7 runs per count, and the rate at which the weights were read.
//!
//! `cargo bench --bench ternary_products -- [TOKEN COUNTS...]` (default: 1 2 3 4 5 8 16 128).
//! `RAYON_NUM_THREADS=1` measures one core.
#![cfg_attr(target_arch = "wasm32", no_main)]
#![cfg(not(target_arch = "wasm32"))]

use std::time::Instant;

use bitnet_wgpu::cpu::TernaryWeights;
use bitnet_wgpu::cpu::fast::{PackedMatrix, act_quant};
use rand::{Rng, SeedableRng, rngs::SmallRng};

/// `(rows, cols)` of one layer's stacked products: q/k/v, o, gate/up, down.
const SHAPES: [(usize, usize); 4] = [(3840, 2560), (2560, 2560), (13824, 2560), (2560, 6912)];
const LAYERS: usize = 30;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let counts: Vec<usize> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .map(|a| a.parse())
        .collect::<Result<_, _>>()?;
    let counts = if counts.is_empty() {
        vec![1, 2, 3, 4, 5, 8, 16, 128]
    } else {
        counts
    };
    let mut rng = SmallRng::seed_from_u64(1);
    let mut matrices = Vec::new();
    for _ in 0..LAYERS {
        for (rows, cols) in SHAPES {
            let codes = (0..rows * cols).map(|_| rng.random_range(-1..=1)).collect();
            let w = TernaryWeights {
                rows,
                cols,
                codes,
                scales: vec![0.5],
            };
            matrices.push(PackedMatrix::new(&[&w])?);
        }
    }
    let bytes: usize = matrices.iter().map(PackedMatrix::bytes).sum();
    println!("| tokens | ms per step | ms per token | weights read, GB/s |");
    println!("| --- | --- | --- | --- |");
    for m in counts {
        let inputs = SHAPES
            .iter()
            .map(|&(_, cols)| {
                let x: Vec<f32> = (0..m * cols).map(|_| rng.random_range(-1.0..1.0)).collect();
                act_quant(&x, m, cols)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut best = f64::MAX;
        for _ in 0..7 {
            let start = Instant::now();
            for (matrix, x) in matrices.iter().zip(inputs.iter().cycle()) {
                std::hint::black_box(matrix.matmul(x)?);
            }
            best = best.min(start.elapsed().as_secs_f64());
        }
        println!(
            "| {m} | {:.1} | {:.2} | {:.1} |",
            best * 1e3,
            best * 1e3 / m as f64,
            bytes as f64 / best / 1e9
        );
    }
    Ok(())
}
