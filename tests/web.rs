//! The GPU-vs-CPU cases of tests/common on WebGPU in a browser (headless Chromium in the test
//! command). They fail when the browser offers no WebGPU adapter.
#![cfg(target_arch = "wasm32")]

mod common;
#[path = "common/train_step.rs"]
mod train_step;

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

use bitnet_wgpu::gpu::GpuContext;
use wasm_bindgen_test::{wasm_bindgen_test, wasm_bindgen_test_configure};

wasm_bindgen_test_configure!(run_in_browser);

thread_local! {
    static SHARED: RefCell<Option<GpuContext>> = const { RefCell::new(None) };
}

/// The page's one GPU context, lent to a test and put back when it ends well. One device for the
/// whole page: a device per test makes the browser compile every pipeline again (minutes on a
/// software adapter), and WebGPU frees a device's memory only when the page collects its garbage.
/// A test that fails never puts it back, so the next one starts on a fresh device.
struct Lent(Option<GpuContext>);

impl Deref for Lent {
    type Target = GpuContext;
    fn deref(&self) -> &GpuContext {
        self.0.as_ref().expect("lent")
    }
}

impl DerefMut for Lent {
    fn deref_mut(&mut self) -> &mut GpuContext {
        self.0.as_mut().expect("lent")
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let ctx = self.0.take();
        SHARED.with(|shared| *shared.borrow_mut() = ctx);
    }
}

async fn context() -> Lent {
    if let Some(ctx) = SHARED.with(|shared| shared.borrow_mut().take()) {
        return Lent(Some(ctx));
    }
    let ctx = GpuContext::new()
        .await
        .unwrap_or_else(|e| panic!("browser tests need WebGPU: {e}"));
    web_sys::console::log_1(&format!("adapter: {:?}", ctx.adapter_info()).into());
    Lent(Some(ctx))
}

/// The shader variants that every per-variant case runs on this browser's adapter: those
/// WebGPU is expected to offer, and no other accepted.
#[wasm_bindgen_test]
async fn shader_variants_tested() {
    let tested = common::variants_tested(&mut *context().await);
    web_sys::console::log_1(&format!("shader variants tested: {tested:?}").into());
}

#[wasm_bindgen_test]
async fn act_quant_matches_cpu() {
    common::act_quant_matches_cpu(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn ternary_pack_matches_cpu() {
    common::ternary_pack_matches_cpu(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn ternary_pack_large_matches_cpu() {
    common::ternary_pack_large_matches_cpu(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn ternary_matmul_matches_cpu() {
    common::ternary_matmul_matches_cpu(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn gpu_pipeline_matches_cpu() {
    common::gpu_pipeline_matches_cpu(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn bad_shapes_are_errors() {
    common::bad_shapes_are_errors(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn attention_matches_cpu() {
    common::attention_head::attention_matches_cpu(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn attention_long_context_matches_cpu() {
    common::attention_head::attention_long_context_matches_cpu(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn embedding_matches_cpu() {
    common::attention_head::embedding_matches_cpu(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn lm_head_matches_cpu() {
    common::attention_head::lm_head_matches_cpu(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn attention_head_bad_shapes_are_errors() {
    common::attention_head::attention_head_bad_shapes_are_errors(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn rmsnorm_matches_cpu() {
    common::model_ops::rmsnorm_matches_cpu(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn rope_matches_cpu() {
    common::model_ops::rope_matches_cpu(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn elementwise_matches_cpu() {
    common::model_ops::elementwise_matches_cpu(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn gate_matches_cpu() {
    common::model_ops::gate_matches_cpu(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn model_ops_bad_shapes_are_errors() {
    common::model_ops::model_ops_bad_shapes_are_errors(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn gpu_model_matches_cpu() {
    common::model::gpu_model_matches_cpu(&*context().await).await;
}

#[wasm_bindgen_test]
async fn norm_matmul_matches_cpu() {
    common::fused_ops::norm_matmul_matches_cpu(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn gpu_logits_all_past_the_binding_limit() {
    let limits = wgpu::Limits {
        max_storage_buffer_binding_size: common::model::LOGITS_BINDING_LIMIT,
        ..wgpu::Limits::default()
    };
    let ctx = GpuContext::with_limits(limits)
        .await
        .unwrap_or_else(|e| panic!("browser tests need WebGPU: {e}"));
    common::model::gpu_logits_all_past_the_binding_limit(&ctx).await;
}

#[wasm_bindgen_test]
async fn rope_qkv_matches_cpu() {
    common::fused_ops::rope_qkv_matches_cpu(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn too_big_model_is_refused() {
    common::model::too_big_model_is_refused(&*context().await).await;
}

#[wasm_bindgen_test]
async fn norm_matmul_rope_matches_cpu() {
    common::fused_ops::norm_matmul_rope_matches_cpu(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn argmax_matches_cpu() {
    common::argmax::argmax_matches_cpu(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn sampling_matches_cpu() {
    common::sampling::sampling_matches_cpu(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn gpu_sampled_decoding_matches_host() {
    common::model::gpu_sampled_decoding_matches_host(&*context().await).await;
}

#[wasm_bindgen_test]
async fn gpu_nll_matches_cpu() {
    common::model::gpu_nll_matches_cpu(&*context().await).await;
}

#[wasm_bindgen_test]
async fn nll_matches_cpu() {
    common::nll::nll_matches_cpu(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn ternary_matmul_backward_matches_cpu() {
    common::backward::ternary_matmul_backward_matches_cpu(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn rmsnorm_backward_matches_cpu() {
    common::backward::rmsnorm_backward_matches_cpu(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn cross_entropy_matches_cpu() {
    common::backward::cross_entropy_matches_cpu(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn optimizers_match_cpu() {
    common::backward::optimizers_match_cpu(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn grad_norm_matches_cpu() {
    common::backward::grad_norm_matches_cpu(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn embedding_backward_matches_cpu() {
    common::backward::embedding_backward_matches_cpu(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn lm_head_backward_matches_cpu() {
    common::backward::lm_head_backward_matches_cpu(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn gate_backward_matches_cpu() {
    common::backward::gate_backward_matches_cpu(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn rope_backward_matches_cpu() {
    common::backward::rope_backward_matches_cpu(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn attention_backward_matches_cpu() {
    common::backward::attention_backward_matches_cpu(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn backward_bad_shapes_are_errors() {
    common::backward::backward_bad_shapes_are_errors(&mut *context().await).await;
}

#[wasm_bindgen_test]
async fn train_step_gradients_match_cpu() {
    train_step::train_step_gradients_match_cpu(&*context().await).await;
}

#[wasm_bindgen_test]
async fn train_steps_match_cpu() {
    train_step::train_steps_match_cpu(&*context().await).await;
}

#[wasm_bindgen_test]
async fn train_step_errors_keep_the_state() {
    train_step::train_step_errors_keep_the_state(&*context().await).await;
}
