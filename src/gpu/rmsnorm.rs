//! Host side of `shaders/rmsnorm.wgsl`: `cpu::rmsnorm`, and `cpu::act_quant(cpu::rmsnorm(..))`
//! fused, bit for bit; and the gradients of the norm (`shaders/rmsnorm_backward.wgsl`).

use crate::gpu::{GpuActivations, GpuContext, Kernel, check_distinct, check_f32s, groups_for};
use crate::{Error, Result};

/// The shader folds a row's block sums in one more level, so rows may hold this many columns.
const MAX_COLS: usize = 1024 * 1024;
/// The smallest eps for which the shader's mean agrees with the CPU's: below it a subnormal mean
/// (which the shader's division does not produce) could still show in `mean + eps`.
const MIN_EPS: f32 = 1e-30;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    row_words: u32,
    no_fuse: u32,
    eps: f32,
    pad: [u32; 3],
}

crate::gpu::shaders::uniforms! {
    Rmsnorm.params = Params { rows, cols, row_words, no_fuse, eps, pad };
    RmsnormBackward.params = BackwardParams { rows, cols, no_fuse, pad0, eps, pad };
}

/// Rejects an eps for which the GPU's norm would not match `cpu::rmsnorm` (NaN included).
pub(crate) fn check_eps(eps: f32) -> Result<()> {
    if !(MIN_EPS..=f32::MAX).contains(&eps) {
        return Err(Error::invalid(
            "rmsnorm eps",
            format!("{eps:e}; the GPU matches cpu::rmsnorm for eps in [{MIN_EPS:e}, f32::MAX]"),
        ));
    }
    Ok(())
}

fn params(ctx: &GpuContext, rows: usize, cols: usize, eps: f32) -> Result<wgpu::Buffer> {
    if cols == 0 {
        return Err(Error::Empty("rmsnorm row"));
    }
    if cols > MAX_COLS {
        return Err(Error::invalid(
            "rmsnorm shape",
            format!("{cols} columns; the shader takes at most {MAX_COLS}"),
        ));
    }
    check_eps(eps)?;
    Ok(ctx.uniform(
        "rmsnorm params",
        &Params {
            rows: rows as u32,
            cols: cols as u32,
            row_words: GpuActivations::row_words(cols) as u32,
            no_fuse: 0,
            eps,
            pad: [0; 3],
        },
    ))
}

/// Records `y = cpu::rmsnorm(x, rows, weight, eps)`: `x` and `y` hold `rows x cols` f32
/// (row-major), `weight` holds `cols`; `x` and `y` must be different buffers, `cols <= 2^20`.
/// Bit-exact with the CPU for `eps >= 1e-30` where no square or output is subnormal (|x| between
/// 2.6e-23 and 1.1e-19 squares to one), as a GPU may flush subnormals to zero.
#[allow(clippy::too_many_arguments)]
pub fn record(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    x: &wgpu::Buffer,
    weight: &wgpu::Buffer,
    y: &wgpu::Buffer,
    rows: usize,
    cols: usize,
    eps: f32,
) -> Result<()> {
    let params = params(ctx, rows, cols, eps)?;
    check_f32s("rmsnorm input", x, rows.checked_mul(cols))?;
    check_f32s("rmsnorm weight", weight, Some(cols))?;
    check_f32s("rmsnorm output", y, rows.checked_mul(cols))?;
    check_distinct("rmsnorm", x, y)?;
    if rows == 0 {
        return Ok(());
    }
    let pipeline = ctx.pipeline(Kernel::Rmsnorm, "rmsnorm", &[])?;
    ctx.dispatch(
        pass,
        &pipeline,
        &[
            params.as_entire_binding(),
            x.as_entire_binding(),
            weight.as_entire_binding(),
            y.as_entire_binding(),
        ],
        groups_for(rows, 1)?,
    );
    Ok(())
}

/// Records `acts = cpu::act_quant(cpu::rmsnorm(x, acts.rows, weight, eps))` without writing the
/// normalized rows anywhere: `x` holds `acts.rows x acts.cols` f32, `weight` holds `acts.cols`.
/// Bit-exact under the conditions of [`record`].
pub fn record_quant(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    x: &wgpu::Buffer,
    weight: &wgpu::Buffer,
    acts: &GpuActivations,
    eps: f32,
) -> Result<()> {
    let (rows, cols) = (acts.rows, acts.cols);
    let params = params(ctx, rows, cols, eps)?;
    check_f32s("rmsnorm input", x, rows.checked_mul(cols))?;
    check_f32s("rmsnorm weight", weight, Some(cols))?;
    if rows == 0 {
        return Ok(());
    }
    let pipeline = ctx.pipeline(Kernel::Rmsnorm, "rmsnorm_quant", &[])?;
    ctx.dispatch(
        pass,
        &pipeline,
        &[
            params.as_entire_binding(),
            x.as_entire_binding(),
            weight.as_entire_binding(),
            acts.codes.as_entire_binding(),
            acts.scales.as_entire_binding(),
            acts.sums.as_entire_binding(),
        ],
        groups_for(rows, 1)?,
    );
    Ok(())
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct BackwardParams {
    rows: u32,
    cols: u32,
    no_fuse: u32,
    pad0: u32,
    eps: f32,
    pad: [u32; 3],
}

/// Columns per `rmsnorm_dweight` workgroup.
const DWEIGHT_WG: usize = 64;

/// Records the gradients of [`record`] (`cpu::rmsnorm_backward`) for the upstream gradient `dy`:
/// `dx` (`[rows, cols]`, like `x` and `dy`) and `dweight` (`cols`), the latter summed over the
/// rows in order. `1 / rms` of each row is formed bit for bit as the forward forms it; the dot
/// products and sums are f32 in an order of their own. Buffers as [`record`]; `dx` and `dweight`
/// must differ from the inputs.
#[allow(clippy::too_many_arguments)]
pub fn record_backward(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    x: &wgpu::Buffer,
    weight: &wgpu::Buffer,
    dy: &wgpu::Buffer,
    dx: &wgpu::Buffer,
    dweight: &wgpu::Buffer,
    rows: usize,
    cols: usize,
    eps: f32,
) -> Result<()> {
    params(ctx, rows, cols, eps)?;
    for (what, buffer) in [
        ("rmsnorm_backward input", x),
        ("rmsnorm_backward dy", dy),
        ("rmsnorm_backward dx", dx),
    ] {
        check_f32s(what, buffer, rows.checked_mul(cols))?;
    }
    check_f32s("rmsnorm weight", weight, Some(cols))?;
    check_f32s("rmsnorm_backward dweight", dweight, Some(cols))?;
    for input in [x, weight, dy] {
        check_distinct("rmsnorm_backward", input, dx)?;
        check_distinct("rmsnorm_backward", input, dweight)?;
    }
    check_distinct("rmsnorm_backward", dx, dweight)?;
    let params = ctx.uniform(
        "rmsnorm backward params",
        &BackwardParams {
            rows: rows as u32,
            cols: cols as u32,
            no_fuse: 0,
            pad0: 0,
            eps,
            pad: [0; 3],
        },
    );
    let inv_rms = ctx.scratch("rmsnorm inv_rms", rows.max(1) as u64 * 4)?;
    if rows > 0 {
        let pipeline = ctx.pipeline(Kernel::RmsnormBackward, "rmsnorm_dx", &[])?;
        ctx.dispatch(
            pass,
            &pipeline,
            &[
                params.as_entire_binding(),
                x.as_entire_binding(),
                dy.as_entire_binding(),
                inv_rms.as_entire_binding(),
                weight.as_entire_binding(),
                dx.as_entire_binding(),
            ],
            groups_for(rows, 1)?,
        );
    }
    let pipeline = ctx.pipeline(Kernel::RmsnormBackward, "rmsnorm_dweight", &[])?;
    ctx.dispatch(
        pass,
        &pipeline,
        &[
            params.as_entire_binding(),
            x.as_entire_binding(),
            dy.as_entire_binding(),
            inv_rms.as_entire_binding(),
            dweight.as_entire_binding(),
        ],
        groups_for(cols, DWEIGHT_WG)?,
    );
    Ok(())
}
