//! Kernel timings on the adapter `GpuContext::new()` picks, for the linear shapes of BitNet b1.58
//! 2B4T. Prints a Markdown table for BENCHMARKS.md. `cargo bench --bench kernels`.
//!
//! Each figure records ITERS dispatches into one command buffer, submits once and waits, so the
//! per-call time includes the dispatch cost a real forward step pays, not a submit per call.
#![cfg_attr(target_arch = "wasm32", no_main)]
#![cfg(not(target_arch = "wasm32"))]

use std::time::Instant;

use bitnet_wgpu::cpu::{self, WeightQuantOptions};
use bitnet_wgpu::gpu::{self, GpuActivations, GpuContext, MatmulOptions};
use bitnet_wgpu::rng::SplitMix64;

const ITERS: usize = 200;

struct Shape {
    name: &'static str,
    m: usize,
    k: usize,
    n: usize,
}

const SHAPES: [Shape; 7] = [
    Shape {
        name: "smallest (the cost of a dependent dispatch)",
        m: 1,
        k: 16,
        n: 4,
    },
    Shape {
        name: "q/o proj",
        m: 1,
        k: 2560,
        n: 2560,
    },
    Shape {
        name: "k/v proj",
        m: 1,
        k: 2560,
        n: 640,
    },
    Shape {
        name: "gate/up proj",
        m: 1,
        k: 2560,
        n: 6912,
    },
    Shape {
        name: "down proj",
        m: 1,
        k: 6912,
        n: 2560,
    },
    Shape {
        name: "gate/up proj, 512-token prompt",
        m: 512,
        k: 2560,
        n: 6912,
    },
    Shape {
        name: "down proj, 512-token prompt",
        m: 512,
        k: 6912,
        n: 2560,
    },
];

/// Deterministic values in [-1, 1): benchmarks need no statistics.
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64(seed);
    (0..len).map(|_| rng.uniform_f32()).collect()
}

fn wait(ctx: &GpuContext) {
    ctx.device
        .poll(wgpu::PollType::wait_indefinitely())
        .expect("device poll");
}

/// How a benchmark lays out its ITERS calls.
#[derive(Clone, Copy, PartialEq)]
enum Passes {
    /// All calls in one compute pass, as a recorded forward step does.
    One,
    /// A compute pass per call.
    PerCall,
}

/// Per-call seconds of `record` recorded ITERS times into one command buffer: on the CPU
/// (recording and `finish`, where wgpu encodes the commands), and on the GPU (submit to idle).
fn time(
    ctx: &GpuContext,
    passes: Passes,
    mut record: impl FnMut(&mut wgpu::ComputePass<'_>),
) -> (f64, f64) {
    let mut run = |iters: usize| {
        let start = Instant::now();
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        if passes == Passes::One {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            for _ in 0..iters {
                record(&mut pass);
            }
        } else {
            for _ in 0..iters {
                record(&mut encoder.begin_compute_pass(&Default::default()));
            }
        }
        let commands = encoder.finish();
        let recorded = start.elapsed().as_secs_f64();
        let start = Instant::now();
        ctx.queue.submit([commands]);
        wait(ctx);
        (recorded, start.elapsed().as_secs_f64())
    };
    run(3);
    let (cpu, gpu) = run(ITERS);
    ctx.check().expect("no device error");
    (cpu / ITERS as f64, gpu / ITERS as f64)
}

fn main() {
    let ctx = pollster::block_on(GpuContext::new()).expect("a GPU adapter");
    let info = ctx.adapter_info();
    println!(
        "adapter: {} ({:?}, {:?}), variant {:?}",
        info.name,
        info.backend,
        info.device_type,
        ctx.variant()
    );
    println!();
    println!(
        "| shape (M x K -> N) | act_quant + matmul | matmul | matmul, a pass per call | weight bytes/s | int8 ops/s | CPU recording per act_quant + matmul |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for shape in &SHAPES {
        let w = values(shape.n * shape.k, 1);
        let x = values(shape.m * shape.k, 2);
        let packed =
            cpu::ternary_pack(&w, shape.n, shape.k, WeightQuantOptions::default()).expect("pack");
        let weights = gpu::GpuTernary::upload(&ctx, &packed).expect("upload weights");
        let input = ctx.upload("x", &x).expect("upload x");
        let acts = GpuActivations::new(&ctx, shape.m, shape.k).expect("activations");
        let y = ctx.storage("y", (shape.m * shape.n * 4) as u64).expect("y");
        let matmul = |pass: &mut wgpu::ComputePass<'_>| {
            gpu::ternary_matmul::record(
                &ctx,
                pass,
                &acts,
                &weights,
                None,
                &y,
                MatmulOptions::default(),
            )
            .expect("matmul");
        };
        let (record_cpu, both) = time(&ctx, Passes::One, |pass| {
            gpu::act_quant::record(&ctx, pass, &input, &acts).expect("act_quant");
            matmul(pass);
        });
        let (_, only) = time(&ctx, Passes::One, matmul);
        let (_, per_pass) = time(&ctx, Passes::PerCall, matmul);
        let bytes = (packed.words.len() * 4) as f64;
        let ops = 2.0 * (shape.m * shape.k * shape.n) as f64;
        println!(
            "| {} ({} x {} -> {}) | {:.1} us | {:.1} us | {:.1} us | {:.0} GB/s | {:.2} TOPS | {:.1} us |",
            shape.name,
            shape.m,
            shape.k,
            shape.n,
            both * 1e6,
            only * 1e6,
            per_pass * 1e6,
            bytes / only / 1e9,
            ops / only / 1e12,
            record_cpu * 1e6
        );
    }
    let (rows, cols) = (6912, 2560);
    let w = values(rows * cols, 3);
    let start = Instant::now();
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    let mut pass = encoder.begin_compute_pass(&Default::default());
    let packed = gpu::ternary_pack::record(
        &ctx,
        &mut pass,
        &w,
        rows,
        cols,
        WeightQuantOptions::default(),
    )
    .expect("pack");
    drop(pass);
    ctx.queue.submit([encoder.finish()]);
    wait(&ctx);
    let elapsed = start.elapsed().as_secs_f64();
    drop(packed);
    println!();
    println!(
        "ternary_pack of {rows} x {cols} f32 weights on the GPU, upload included: {:.1} ms",
        elapsed * 1e3
    );
}
