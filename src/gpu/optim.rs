//! Host side of `shaders/optim.wgsl`: AdamW and SGD updates of f32 tensors on the GPU
//! (`train::adamw_tensor`, `train::sgd_tensor`) and the global gradient norm with torch's
//! clipping coefficient (`train::clip_grad_norm`), summed in a fixed order.

use crate::gpu::{GpuContext, Kernel, check_distinct, check_f32s, groups_for};
use crate::train::{AdamWStep, Sgd};
use crate::{Error, Result};

const WG: usize = 256;
/// Values one `grad_sum_squares` / `grad_sum` workgroup adds.
const BLOCK: usize = 1024;

#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    count: u32,
    first: u32,
    first_step: u32,
    pad0: u32,
    f: [f32; 7],
    pad1: u32,
}

crate::gpu::shaders::uniforms! {
    Optim.params = Params { count, first, first_step, pad0, f, pad1 };
}

fn count_u32(count: usize) -> Result<u32> {
    u32::try_from(count)
        .map_err(|_| Error::invalid("optimizer tensor", format!("{count} elements is too many")))
}

/// The clipping state `[norm, coefficient]` for updates that do not clip: coefficient 1.
fn no_clip(ctx: &GpuContext) -> Result<wgpu::Buffer> {
    ctx.upload_shared("no clipping", &[0.0f32, 1.0])
}

/// A uniform buffer for one optimizer update that its owner rewrites every step. Uniforms
/// cached by content ([`record_adamw`]) suit a few distinct updates; a run's rate and bias
/// corrections change every step, so each step would add one. Each dispatch of a submission
/// needs its own.
pub struct UpdateUniform(wgpu::Buffer);

impl UpdateUniform {
    pub fn new(ctx: &GpuContext) -> Self {
        UpdateUniform(ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("optimizer update"),
            size: size_of::<Params>() as u64,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        }))
    }

    /// `params` in `uniform` (written before the next submission), or in a cached uniform.
    fn holding(ctx: &GpuContext, uniform: Option<&UpdateUniform>, params: &Params) -> wgpu::Buffer {
        match uniform {
            Some(u) => {
                ctx.queue.write_buffer(&u.0, 0, bytemuck::bytes_of(params));
                u.0.clone()
            }
            None => ctx.uniform("optimizer params", params),
        }
    }
}

fn check_clip(clip: Option<&wgpu::Buffer>) -> Result<()> {
    match clip {
        Some(c) => check_f32s("clipping state", c, Some(2)),
        None => Ok(()),
    }
}

/// Records one AdamW update (`train::adamw_tensor`) of the `count` f32 values of `w` from `grad`,
/// with the moments `m` and `v` (zero before the first step) and the factors of this step;
/// `clip` is the `[norm, coefficient]` buffer [`record_grad_norm`] fills (the gradient is
/// multiplied by the coefficient), `None` for no clipping. The factors go into `uniform` when
/// given (a training run's, rewritten every step), else into a uniform cached by content.
#[allow(clippy::too_many_arguments)]
pub fn record_adamw(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    uniform: Option<&UpdateUniform>,
    w: &wgpu::Buffer,
    grad: &wgpu::Buffer,
    m: &wgpu::Buffer,
    v: &wgpu::Buffer,
    count: usize,
    step: &AdamWStep,
    clip: Option<&wgpu::Buffer>,
) -> Result<()> {
    for (what, b) in [
        ("weights", w),
        ("gradient", grad),
        ("first moment", m),
        ("second moment", v),
    ] {
        check_f32s(what, b, Some(count))?;
    }
    check_clip(clip)?;
    for (i, a) in [w, m, v].iter().enumerate() {
        check_distinct("adamw", grad, a)?;
        for b in [w, m, v].iter().skip(i + 1) {
            check_distinct("adamw", a, b)?;
        }
    }
    let params = UpdateUniform::holding(
        ctx,
        uniform,
        &Params {
            count: count_u32(count)?,
            f: [
                step.beta2,
                step.eps,
                step.decay,
                step.one_minus_beta1,
                step.one_minus_beta2,
                step.step_size,
                step.bias2_sqrt,
            ],
            ..Default::default()
        },
    );
    if count == 0 {
        return Ok(());
    }
    let default_clip;
    let clip = match clip {
        Some(c) => c,
        None => {
            default_clip = no_clip(ctx)?;
            &default_clip
        }
    };
    let pipeline = ctx.pipeline(Kernel::Optim, "adamw", &[])?;
    ctx.dispatch(
        pass,
        &pipeline,
        &[
            params.as_entire_binding(),
            clip.as_entire_binding(),
            grad.as_entire_binding(),
            w.as_entire_binding(),
            m.as_entire_binding(),
            v.as_entire_binding(),
        ],
        groups_for(count, WG)?,
    );
    Ok(())
}

/// Records one SGD update (`train::sgd_tensor`) of the `count` f32 values of `w` from `grad` at
/// learning rate `lr`, with the momentum buffer `momentum` (read only after the `first` step, and
/// untouched when `opt.momentum` is 0); `uniform` and `clip` as [`record_adamw`].
#[allow(clippy::too_many_arguments)]
pub fn record_sgd(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    uniform: Option<&UpdateUniform>,
    w: &wgpu::Buffer,
    grad: &wgpu::Buffer,
    momentum: &wgpu::Buffer,
    count: usize,
    opt: &Sgd,
    lr: f32,
    first: bool,
    clip: Option<&wgpu::Buffer>,
) -> Result<()> {
    for (what, b) in [("weights", w), ("gradient", grad), ("momentum", momentum)] {
        check_f32s(what, b, Some(count))?;
    }
    check_clip(clip)?;
    check_distinct("sgd", grad, w)?;
    check_distinct("sgd", grad, momentum)?;
    check_distinct("sgd", w, momentum)?;
    let params = UpdateUniform::holding(
        ctx,
        uniform,
        &Params {
            count: count_u32(count)?,
            first_step: first as u32,
            f: [opt.momentum, opt.weight_decay, lr, 0.0, 0.0, 0.0, 0.0],
            ..Default::default()
        },
    );
    if count == 0 {
        return Ok(());
    }
    let default_clip;
    let clip = match clip {
        Some(c) => c,
        None => {
            default_clip = no_clip(ctx)?;
            &default_clip
        }
    };
    let pipeline = ctx.pipeline(Kernel::Optim, "sgd", &[])?;
    ctx.dispatch(
        pass,
        &pipeline,
        &[
            params.as_entire_binding(),
            clip.as_entire_binding(),
            grad.as_entire_binding(),
            w.as_entire_binding(),
            momentum.as_entire_binding(),
        ],
        groups_for(count, WG)?,
    );
    Ok(())
}

/// Records the global L2 norm of the gradients `grads` (each a buffer and its f32 count) and
/// torch's clipping coefficient `min(1, max_norm / (norm + 1e-6))` into `out` as `[norm,
/// coefficient]`, for [`record_adamw`] and [`record_sgd`]. The squares are summed in f32 in a
/// fixed order (blocks of 1024 per tensor in cpu::tree_sum's order, then the block sums of all
/// tensors level by level), the same on every run; no atomics.
pub fn record_grad_norm(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    grads: &[(&wgpu::Buffer, usize)],
    max_norm: f32,
    out: &wgpu::Buffer,
) -> Result<()> {
    if max_norm.is_nan() || max_norm < 0.0 {
        return Err(Error::invalid(
            "max_norm",
            format!("{max_norm} is not a non-negative number"),
        ));
    }
    check_f32s("clipping state", out, Some(2))?;
    let mut total_blocks = 0usize;
    for &(buffer, count) in grads {
        check_f32s("gradient", buffer, Some(count))?;
        check_distinct("grad_norm", buffer, out)?;
        count_u32(count)?;
        total_blocks += count.div_ceil(BLOCK).max(1);
    }
    let total_blocks = total_blocks.max(1);
    let sums = ctx.scratch("grad norm blocks", total_blocks as u64 * 4)?;
    let squares = ctx.pipeline(Kernel::Optim, "grad_sum_squares", &[])?;
    // No gradient at all: one zero block, through the same path.
    let zero;
    let grads = if grads.is_empty() {
        zero = ctx.upload_shared("zero gradient", &[0.0f32])?;
        vec![(&zero, 0)]
    } else {
        grads.to_vec()
    };
    let mut first = 0usize;
    for &(buffer, count) in &grads {
        let params = ctx.uniform(
            "grad norm params",
            &Params {
                count: count as u32,
                first: first as u32,
                ..Default::default()
            },
        );
        let blocks = count.div_ceil(BLOCK).max(1);
        ctx.dispatch(
            pass,
            &squares,
            &[
                params.as_entire_binding(),
                buffer.as_entire_binding(),
                sums.as_entire_binding(),
            ],
            groups_for(blocks, 1)?,
        );
        first += blocks;
    }
    finish_norm(ctx, pass, sums, total_blocks, max_norm, out)
}

/// Sums the `len` block sums in `level` down to one, level by level, then writes the norm and
/// the coefficient.
fn finish_norm(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    mut level: wgpu::Buffer,
    mut len: usize,
    max_norm: f32,
    out: &wgpu::Buffer,
) -> Result<()> {
    let sum = ctx.pipeline(Kernel::Optim, "grad_sum", &[])?;
    while len > 1 {
        let blocks = len.div_ceil(BLOCK);
        let next = ctx.scratch("grad norm level", blocks as u64 * 4)?;
        let params = ctx.uniform(
            "grad norm params",
            &Params {
                count: len as u32,
                ..Default::default()
            },
        );
        ctx.dispatch(
            pass,
            &sum,
            &[
                params.as_entire_binding(),
                level.as_entire_binding(),
                next.as_entire_binding(),
            ],
            groups_for(blocks, 1)?,
        );
        level = next;
        len = blocks;
    }
    let params = ctx.uniform(
        "grad clip params",
        &Params {
            f: [max_norm, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            ..Default::default()
        },
    );
    let clip = ctx.pipeline(Kernel::Optim, "grad_clip", &[])?;
    ctx.dispatch(
        pass,
        &clip,
        &[
            params.as_entire_binding(),
            level.as_entire_binding(),
            out.as_entire_binding(),
        ],
        1,
    );
    Ok(())
}
