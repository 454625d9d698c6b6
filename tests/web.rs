//! The GPU-vs-CPU cases of tests/common on WebGPU in a browser (headless Chromium in the test
//! command). They fail when the browser offers no WebGPU adapter.
#![cfg(target_arch = "wasm32")]

mod common;

use bitnet_wgpu::gpu::GpuContext;
use wasm_bindgen_test::{wasm_bindgen_test, wasm_bindgen_test_configure};

wasm_bindgen_test_configure!(run_in_browser);

async fn context() -> GpuContext {
    let ctx = GpuContext::new()
        .await
        .unwrap_or_else(|e| panic!("browser tests need WebGPU: {e}"));
    web_sys::console::log_1(&format!("adapter: {:?}", ctx.adapter_info()).into());
    ctx
}

#[wasm_bindgen_test]
async fn act_quant_matches_cpu() {
    common::act_quant_matches_cpu(&mut context().await).await;
}

#[wasm_bindgen_test]
async fn ternary_pack_matches_cpu() {
    common::ternary_pack_matches_cpu(&mut context().await).await;
}

#[wasm_bindgen_test]
async fn ternary_pack_large_matches_cpu() {
    common::ternary_pack_large_matches_cpu(&mut context().await).await;
}

#[wasm_bindgen_test]
async fn ternary_matmul_matches_cpu() {
    common::ternary_matmul_matches_cpu(&mut context().await).await;
}

#[wasm_bindgen_test]
async fn gpu_pipeline_matches_cpu() {
    common::gpu_pipeline_matches_cpu(&mut context().await).await;
}

#[wasm_bindgen_test]
async fn bad_shapes_are_errors() {
    common::bad_shapes_are_errors(&mut context().await).await;
}
