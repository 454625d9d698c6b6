//! Host side of `shaders/nll.wgsl`: `cpu::nll` of many rows at once, so that scoring a text reads
//! back one number per token instead of a row of logits; and its training twin, the fused softmax
//! cross-entropy with its gradient (`shaders/cross_entropy.wgsl`).

use crate::gpu::{GpuContext, Kernel, check_distinct, check_f32s, groups_for};
use crate::{Error, Result};

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    vocab: u32,
    target_offset: u32,
    out_offset: u32,
}

crate::gpu::shaders::uniforms! {
    Nll.params = Params { rows, vocab, target_offset, out_offset };
    CrossEntropy.params = CrossEntropyParams {
        rows, vocab, target_offset, loss_offset, grad_scale, pad,
    };
}

/// Records `out[out_offset + r] = cpu::nll(logits row r, targets[target_offset + r])` for
/// `r < rows`, in f32 (`logits`: `[rows, vocab]`; `targets`: u32 ids below `vocab`, which the
/// caller checks).
#[allow(clippy::too_many_arguments)]
pub fn record(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    logits: &wgpu::Buffer,
    rows: usize,
    vocab: usize,
    targets: &wgpu::Buffer,
    target_offset: usize,
    out: &wgpu::Buffer,
    out_offset: usize,
) -> Result<()> {
    if vocab == 0 {
        return Err(Error::Empty("logits"));
    }
    check_f32s("nll logits", logits, rows.checked_mul(vocab))?;
    check_f32s("nll targets", targets, target_offset.checked_add(rows))?;
    check_f32s("nll output", out, out_offset.checked_add(rows))?;
    check_distinct("nll", logits, out)?;
    check_distinct("nll", targets, out)?;
    if rows == 0 {
        return Ok(());
    }
    let word = |what: &'static str, v: usize| {
        u32::try_from(v).map_err(|_| Error::invalid(what, format!("{v} overflows u32")))
    };
    let params = ctx.uniform(
        "nll params",
        &Params {
            rows: word("nll rows", rows)?,
            vocab: word("nll vocab", vocab)?,
            target_offset: word("nll target offset", target_offset)?,
            out_offset: word("nll output offset", out_offset)?,
        },
    );
    let pipeline = ctx.pipeline(Kernel::Nll, "nll", &[])?;
    ctx.dispatch(
        pass,
        &pipeline,
        &[
            params.as_entire_binding(),
            logits.as_entire_binding(),
            targets.as_entire_binding(),
            out.as_entire_binding(),
        ],
        groups_for(rows, 1)?,
    );
    Ok(())
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct CrossEntropyParams {
    rows: u32,
    vocab: u32,
    target_offset: u32,
    loss_offset: u32,
    grad_scale: f32,
    pad: [u32; 3],
}

/// Records `cpu::cross_entropy` in f32 (`shaders/cross_entropy.wgsl`), in place: for `r < rows`,
/// `losses[loss_offset + r]` receives the row's loss (as [`record`] computes it) and the row of
/// `logits` (`[rows, vocab]`) is overwritten by its gradient `(softmax - onehot) * grad_scale`
/// (`grad_scale = 1 / rows` for the gradient of the mean loss). Targets are u32 ids below `vocab`,
/// which the caller checks.
#[allow(clippy::too_many_arguments)]
pub fn record_cross_entropy(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    logits: &wgpu::Buffer,
    rows: usize,
    vocab: usize,
    targets: &wgpu::Buffer,
    target_offset: usize,
    losses: &wgpu::Buffer,
    loss_offset: usize,
    grad_scale: f32,
) -> Result<()> {
    if vocab == 0 {
        return Err(Error::Empty("logits"));
    }
    if !grad_scale.is_finite() {
        return Err(Error::invalid("cross_entropy gradient scale", grad_scale));
    }
    check_f32s("cross_entropy logits", logits, rows.checked_mul(vocab))?;
    check_f32s(
        "cross_entropy targets",
        targets,
        target_offset.checked_add(rows),
    )?;
    check_f32s(
        "cross_entropy losses",
        losses,
        loss_offset.checked_add(rows),
    )?;
    check_distinct("cross_entropy", logits, losses)?;
    check_distinct("cross_entropy", logits, targets)?;
    check_distinct("cross_entropy", targets, losses)?;
    if rows == 0 {
        return Ok(());
    }
    let word = |what: &'static str, v: usize| {
        u32::try_from(v).map_err(|_| Error::invalid(what, format!("{v} overflows u32")))
    };
    word("cross_entropy logits", rows * vocab)?;
    let params = ctx.uniform(
        "cross_entropy params",
        &CrossEntropyParams {
            rows: word("cross_entropy rows", rows)?,
            vocab: word("cross_entropy vocab", vocab)?,
            target_offset: word("cross_entropy target offset", target_offset)?,
            loss_offset: word("cross_entropy loss offset", loss_offset)?,
            grad_scale,
            pad: [0; 3],
        },
    );
    let pipeline = ctx.pipeline(Kernel::CrossEntropy, "cross_entropy", &[])?;
    ctx.dispatch(
        pass,
        &pipeline,
        &[
            params.as_entire_binding(),
            logits.as_entire_binding(),
            targets.as_entire_binding(),
            losses.as_entire_binding(),
        ],
        groups_for(rows, 1)?,
    );
    Ok(())
}
