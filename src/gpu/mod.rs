//! The host layer: an opened adapter ([`GpuContext`]), GPU-resident tensors, and one module per
//! shader file that knows its bindings and dispatch sizes and records into a compute pass:
//! a whole chain of kernels goes into one pass and one submission.
//!
//! ```
//! use bitnet_wgpu::{cpu, gpu};
//! # pollster::block_on(async {
//! let ctx = gpu::GpuContext::new().await.expect("a GPU adapter");
//! let x = [0.5f32, -1.0, 2.0, 0.0, 3.0, -0.25];
//! let input = ctx.upload("x", &x).unwrap();
//! let acts = gpu::GpuActivations::new(&ctx, 2, 3).unwrap();
//! let mut encoder = ctx.device.create_command_encoder(&Default::default());
//! let mut pass = encoder.begin_compute_pass(&Default::default());
//! gpu::act_quant::record(&ctx, &mut pass, &input, &acts).unwrap();
//! drop(pass);
//! ctx.queue.submit([encoder.finish()]);
//! assert_eq!(acts.read(&ctx).await.unwrap(), cpu::act_quant(&x, 2, 3).unwrap());
//! # });
//! ```

pub mod act_quant;
mod context;
pub mod shaders;
pub mod ternary_matmul;
pub mod ternary_pack;

pub use act_quant::GpuActivations;
pub use context::{AdapterSummary, Capabilities, GpuContext};
pub use shaders::{Kernel, ShaderVariant};
pub use ternary_matmul::{MatmulOptions, MatmulOutput, MatmulPath};
pub use ternary_pack::GpuTernary;

/// Workgroups needed for `items` invocations of `per_group` each.
pub(crate) fn groups_for(items: usize, per_group: usize) -> Result<u32, crate::Error> {
    u32::try_from(items.div_ceil(per_group))
        .map_err(|_| crate::Error::invalid("dispatch", format!("{items} items is too many")))
}
