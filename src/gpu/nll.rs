//! Host side of `shaders/nll.wgsl`: `cpu::nll` of many rows at once, so that scoring a text reads
//! back one number per token instead of a row of logits.

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
