//! Whole training steps on the GPU against the CPU's. Needs a GPU adapter (lavapipe will do) and
//! fails loudly without one: a skipped GPU test proves nothing.
#![cfg(not(target_arch = "wasm32"))]

// The cases live with the other shared GPU tests, which tests/web.rs runs in the browser.
#[path = "common/train_step.rs"]
mod train_step;

use bitnet_wgpu::gpu::GpuContext;

fn context() -> GpuContext {
    let ctx = pollster::block_on(GpuContext::new()).expect("GPU adapter required");
    let info = ctx.adapter_info();
    eprintln!(
        "adapter: {} ({:?}, {:?})",
        info.name, info.backend, info.device_type
    );
    ctx
}

#[test]
fn train_step_gradients_match_cpu() {
    pollster::block_on(train_step::train_step_gradients_match_cpu(&context()));
}

#[test]
fn train_steps_match_cpu() {
    pollster::block_on(train_step::train_steps_match_cpu(&context()));
}

#[test]
fn train_step_errors_keep_the_state() {
    pollster::block_on(train_step::train_step_errors_keep_the_state(&context()));
}

/// After the first step, a run allocates nothing that outlives a step: the GPU memory held
/// between steps is the same after 2 steps and after 12 (measured where the backend reports its
/// allocations: Vulkan; the test requires the report there).
#[test]
fn gpu_memory_stays_flat_over_a_run() {
    use bitnet_wgpu::train::{AdamW, GpuTrainer, Optimizer, Quant, Schedule, TrainModel, Trainer};
    let ctx = context();
    let config = bitnet_wgpu::train::run::tiny_config(258);
    let model = TrainModel::new(config, Quant::BitNet, 3).unwrap();
    let adam = Optimizer::AdamW(AdamW::default());
    let mut trainer = Trainer::new(model, adam, 1e-3, Schedule::Constant { warmup: 0 });
    trainer.max_grad_norm = Some(1.0);
    let mut gpu = GpuTrainer::new(&ctx, &trainer, 32).unwrap();
    let text: Vec<u32> = (0..2 * 32).map(|i| (i * 37 % 258) as u32).collect();
    let batch: Vec<&[u32]> = text.chunks(32).collect();
    let held = |ctx: &GpuContext| {
        ctx.device
            .poll(wgpu::PollType::Wait {
                submission_index: None,
                timeout: None,
            })
            .unwrap();
        ctx.device.generate_allocator_report()
    };
    let mut after_two = None;
    for step in 1..=12 {
        pollster::block_on(gpu.step(&ctx, &mut trainer, &batch)).unwrap();
        if step == 2 {
            after_two = held(&ctx);
        }
    }
    let after_twelve = held(&ctx);
    let backend = ctx.adapter_info().backend;
    match (after_two, after_twelve) {
        (Some(a), Some(b)) => {
            println!(
                "{backend:?}: {} bytes allocated after 2 steps, {} after 12",
                a.total_allocated_bytes, b.total_allocated_bytes
            );
            assert_eq!(a.total_allocated_bytes, b.total_allocated_bytes);
        }
        _ => {
            assert_ne!(
                backend,
                wgpu::Backend::Vulkan,
                "Vulkan reports its allocations"
            );
            println!("{backend:?} reports no allocations: GPU memory not measured here");
        }
    }
}
