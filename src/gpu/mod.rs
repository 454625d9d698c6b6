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
pub mod argmax;
pub mod attention;
mod context;
pub mod elementwise;
pub mod embedding;
pub mod gate;
pub mod lm_head;
pub mod nll;
pub mod norm_matmul;
pub mod optim;
mod profiler;
pub mod rmsnorm;
pub mod rope;
pub mod sampling;
pub mod shaders;
pub mod table;
pub mod ternary_matmul;
pub mod ternary_pack;

pub use act_quant::GpuActivations;
pub use context::{AdapterSummary, Capabilities, GpuContext};
pub use profiler::KernelTime;
pub use shaders::{Kernel, ShaderVariant};
pub use table::{GpuGradTable, GpuTable, TableStorage};
pub use ternary_matmul::{MatmulOptions, MatmulOutput, MatmulPath};
pub use ternary_pack::GpuTernary;

/// Checks that `buffer` holds at least `count` f32 values (`count` from a checked product).
pub(crate) fn check_f32s(
    what: &'static str,
    buffer: &wgpu::Buffer,
    count: Option<usize>,
) -> Result<(), crate::Error> {
    let needed = count
        .and_then(|n| u64::try_from(n).ok()?.checked_mul(4))
        .ok_or_else(|| crate::Error::invalid(what, "the shape overflows"))?;
    if buffer.size() < needed {
        return Err(crate::Error::shape(
            what,
            format!("{needed} bytes"),
            buffer.size(),
        ));
    }
    Ok(())
}

/// Checks that a kernel's input and output are different buffers: one dispatch cannot bind a
/// buffer both read-only and writable.
pub(crate) fn check_distinct(
    what: &'static str,
    input: &wgpu::Buffer,
    output: &wgpu::Buffer,
) -> Result<(), crate::Error> {
    if input == output {
        return Err(crate::Error::invalid(
            what,
            "input and output are the same buffer",
        ));
    }
    Ok(())
}

/// Workgroups needed for `items` invocations of `per_group` each.
pub(crate) fn groups_for(items: usize, per_group: usize) -> Result<u32, crate::Error> {
    u32::try_from(items.div_ceil(per_group))
        .map_err(|_| crate::Error::invalid("dispatch", format!("{items} items is too many")))
}
