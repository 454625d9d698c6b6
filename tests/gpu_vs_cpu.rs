//! Every shader against its CPU twin on the native adapter that `WGPU_BACKEND` /
//! `WGPU_ADAPTER_NAME` select. These tests fail, never skip, when no adapter is found.
#![cfg(not(target_arch = "wasm32"))]

mod common;

use bitnet_wgpu::gpu::{GpuContext, norm_matmul};

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

/// The shader variants that every per-variant case runs on this adapter: those its backend is
/// expected to offer (all four on Vulkan, no subgroups on GL), and no other accepted.
#[test]
fn shader_variants_tested() {
    let mut ctx = context();
    let tested = common::variants_tested(&mut ctx);
    eprintln!("shader variants tested: {tested:?}");
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

#[test]
fn attention_matches_cpu() {
    pollster::block_on(common::attention_head::attention_matches_cpu(&mut context()));
}

#[test]
fn attention_long_context_matches_cpu() {
    pollster::block_on(common::attention_head::attention_long_context_matches_cpu(
        &mut context(),
    ));
}

#[test]
fn embedding_matches_cpu() {
    pollster::block_on(common::attention_head::embedding_matches_cpu(&mut context()));
}

#[test]
fn lm_head_matches_cpu() {
    pollster::block_on(common::attention_head::lm_head_matches_cpu(&mut context()));
}

#[test]
fn attention_head_bad_shapes_are_errors() {
    pollster::block_on(
        common::attention_head::attention_head_bad_shapes_are_errors(&mut context()),
    );
}

#[test]
fn rmsnorm_matches_cpu() {
    pollster::block_on(common::model_ops::rmsnorm_matches_cpu(&mut context()));
}

#[test]
fn rope_matches_cpu() {
    pollster::block_on(common::model_ops::rope_matches_cpu(&mut context()));
}

#[test]
fn elementwise_matches_cpu() {
    pollster::block_on(common::model_ops::elementwise_matches_cpu(&mut context()));
}

#[test]
fn gate_matches_cpu() {
    pollster::block_on(common::model_ops::gate_matches_cpu(&mut context()));
}

#[test]
fn model_ops_bad_shapes_are_errors() {
    pollster::block_on(common::model_ops::model_ops_bad_shapes_are_errors(
        &mut context(),
    ));
}

#[test]
fn gpu_model_matches_cpu() {
    pollster::block_on(common::model::gpu_model_matches_cpu(&context()));
}

#[test]
fn norm_matmul_matches_cpu() {
    pollster::block_on(common::fused_ops::norm_matmul_matches_cpu(&mut context()));
}

/// On an adapter with WebGPU's default limits (16 KiB of workgroup memory, too little for the
/// fused decode kernels) the fused cases and the model test the path a model takes there.
#[test]
fn fused_paths_at_webgpu_default_limits() {
    let mut ctx = pollster::block_on(GpuContext::with_limits(wgpu::Limits::default()))
        .unwrap_or_else(|e| panic!("GPU tests need an adapter (lavapipe in CI): {e}"));
    assert!(ctx.capabilities().max_workgroup_memory < norm_matmul::WORKGROUP_BYTES);
    pollster::block_on(async {
        common::fused_ops::norm_matmul_matches_cpu(&mut ctx).await;
        common::fused_ops::norm_matmul_rope_matches_cpu(&mut ctx).await;
        common::model::gpu_model_matches_cpu(&ctx).await;
    });
}

#[test]
fn rope_qkv_matches_cpu() {
    pollster::block_on(common::fused_ops::rope_qkv_matches_cpu(&mut context()));
}

#[test]
fn too_big_model_is_refused() {
    pollster::block_on(common::model::too_big_model_is_refused(&context()));
}

#[test]
fn norm_matmul_rope_matches_cpu() {
    pollster::block_on(common::fused_ops::norm_matmul_rope_matches_cpu(
        &mut context(),
    ));
}

#[test]
fn argmax_matches_cpu() {
    pollster::block_on(common::argmax::argmax_matches_cpu(&mut context()));
}

#[test]
fn sampling_matches_cpu() {
    pollster::block_on(common::sampling::sampling_matches_cpu(&mut context()));
}

#[test]
fn gpu_sampled_decoding_matches_host() {
    pollster::block_on(common::model::gpu_sampled_decoding_matches_host(&context()));
}

#[test]
fn gpu_nll_matches_cpu() {
    pollster::block_on(common::model::gpu_nll_matches_cpu(&context()));
}

#[test]
fn gpu_logits_all_past_the_binding_limit() {
    let limits = wgpu::Limits {
        max_storage_buffer_binding_size: common::model::LOGITS_BINDING_LIMIT,
        ..wgpu::Limits::default()
    };
    let ctx = pollster::block_on(GpuContext::with_limits(limits))
        .unwrap_or_else(|e| panic!("GPU tests need an adapter (lavapipe in CI): {e}"));
    pollster::block_on(common::model::gpu_logits_all_past_the_binding_limit(&ctx));
}

#[test]
fn nll_matches_cpu() {
    pollster::block_on(common::nll::nll_matches_cpu(&mut context()));
}

#[test]
fn ternary_matmul_backward_matches_cpu() {
    pollster::block_on(common::backward::ternary_matmul_backward_matches_cpu(
        &mut context(),
    ));
}

#[test]
fn rmsnorm_backward_matches_cpu() {
    pollster::block_on(common::backward::rmsnorm_backward_matches_cpu(
        &mut context(),
    ));
}

#[test]
fn cross_entropy_matches_cpu() {
    pollster::block_on(common::backward::cross_entropy_matches_cpu(&mut context()));
}

#[test]
fn optimizers_match_cpu() {
    pollster::block_on(common::backward::optimizers_match_cpu(&mut context()));
}

#[test]
fn grad_norm_matches_cpu() {
    pollster::block_on(common::backward::grad_norm_matches_cpu(&mut context()));
}

#[test]
fn embedding_backward_matches_cpu() {
    pollster::block_on(common::backward::embedding_backward_matches_cpu(
        &mut context(),
    ));
}

#[test]
fn lm_head_backward_matches_cpu() {
    pollster::block_on(common::backward::lm_head_backward_matches_cpu(
        &mut context(),
    ));
}

#[test]
fn gate_backward_matches_cpu() {
    pollster::block_on(common::backward::gate_backward_matches_cpu(&mut context()));
}

#[test]
fn rope_backward_matches_cpu() {
    pollster::block_on(common::backward::rope_backward_matches_cpu(&mut context()));
}

#[test]
fn attention_backward_matches_cpu() {
    pollster::block_on(common::backward::attention_backward_matches_cpu(
        &mut context(),
    ));
}

#[test]
fn backward_bad_shapes_are_errors() {
    pollster::block_on(common::backward::backward_bad_shapes_are_errors(
        &mut context(),
    ));
}
