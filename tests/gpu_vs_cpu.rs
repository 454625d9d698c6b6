//! Every shader against its CPU twin on the native adapter that `WGPU_BACKEND` /
//! `WGPU_ADAPTER_NAME` select. These tests fail, never skip, when no adapter is found.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use bitnet_wgpu::gpu::GpuContext;

fn context() -> GpuContext {
    let ctx = pollster::block_on(GpuContext::new())
        .unwrap_or_else(|e| panic!("GPU tests need an adapter (lavapipe in CI): {e}"));
    let info = ctx.adapter_info();
    eprintln!(
        "adapter: {} ({:?}, {:?})",
        info.name, info.backend, info.device_type
    );
    ctx
}

#[test]
fn act_quant_matches_cpu() {
    pollster::block_on(common::act_quant_matches_cpu(&mut context()));
}

#[test]
fn ternary_pack_matches_cpu() {
    pollster::block_on(common::ternary_pack_matches_cpu(&mut context()));
}

#[test]
fn ternary_pack_large_matches_cpu() {
    pollster::block_on(common::ternary_pack_large_matches_cpu(&mut context()));
}

#[test]
fn ternary_matmul_matches_cpu() {
    pollster::block_on(common::ternary_matmul_matches_cpu(&mut context()));
}

#[test]
fn gpu_pipeline_matches_cpu() {
    pollster::block_on(common::gpu_pipeline_matches_cpu(&mut context()));
}

#[test]
fn bad_shapes_are_errors() {
    pollster::block_on(common::bad_shapes_are_errors(&mut context()));
}
