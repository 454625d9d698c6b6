//! Whole training steps on the GPU against the CPU's. Needs a GPU adapter (lavapipe will do) and
//! fails loudly without one: a skipped GPU test proves nothing.
#![cfg(not(target_arch = "wasm32"))]

// The cases live with the other shared GPU tests, which tests/web.rs runs in the browser.
#[path = "common/train_step.rs"]
mod train_step;

use bitnet_wgpu::gpu::GpuContext;

fn context() -> GpuContext {
    pollster::block_on(GpuContext::new()).expect("GPU adapter required")
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
