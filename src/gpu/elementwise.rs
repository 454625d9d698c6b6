//! Host side of `shaders/elementwise.wgsl`: the residual addition and row copies into a KV cache,
//! the two steps of a forward pass a compute pass has no built-in command for.

use crate::gpu::{GpuContext, Kernel, check_distinct, check_f32s, groups_for};
use crate::{Error, Result};

const WG: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    n: u32,
    dst_offset: u32,
    src_offset: u32,
    pad: u32,
}

/// Records `acc[i] += b[i]` for `i < n` (f32, one rounding per element, as the CPU adds).
/// `acc` and `b` must be different buffers.
pub fn add(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    acc: &wgpu::Buffer,
    b: &wgpu::Buffer,
    n: usize,
) -> Result<()> {
    check_f32s("add accumulator", acc, Some(n))?;
    check_f32s("add operand", b, Some(n))?;
    check_distinct("add", b, acc)?;
    if n == 0 {
        return Ok(());
    }
    let params = ctx.uniform(
        "add params",
        &Params {
            n: n as u32,
            dst_offset: 0,
            src_offset: 0,
            pad: 0,
        },
    );
    let pipeline = ctx.pipeline(Kernel::Elementwise, "add", &[])?;
    ctx.dispatch(
        pass,
        &pipeline,
        &[
            params.as_entire_binding(),
            acc.as_entire_binding(),
            b.as_entire_binding(),
        ],
        groups_for(n, WG)?,
    );
    Ok(())
}

/// Records the copy of `rows` rows of `cols` f32 from row `src_row` of `src` into `dst` from row
/// `dst_row` on (e.g. new V rows into a cache of capacity `dst.size() / (4 * cols)` rows, or the
/// last token's row to the front of a buffer). `src` and `dst` must be different buffers.
#[allow(clippy::too_many_arguments)]
pub fn copy_rows(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    src: &wgpu::Buffer,
    src_row: usize,
    dst: &wgpu::Buffer,
    dst_row: usize,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let n = rows.checked_mul(cols);
    let src_end = src_row.checked_add(rows).and_then(|r| r.checked_mul(cols));
    check_f32s("copy_rows source", src, src_end)?;
    let end = dst_row.checked_add(rows).and_then(|r| r.checked_mul(cols));
    check_f32s("copy_rows destination", dst, end)?;
    check_distinct("copy_rows", src, dst)?;
    let n = n.unwrap_or(0);
    if n == 0 {
        return Ok(());
    }
    let dst_offset = u32::try_from(dst_row * cols)
        .map_err(|_| Error::invalid("copy_rows", "the destination offset overflows u32"))?;
    let src_offset = u32::try_from(src_row * cols)
        .map_err(|_| Error::invalid("copy_rows", "the source offset overflows u32"))?;
    let params = ctx.uniform(
        "copy_rows params",
        &Params {
            n: n as u32,
            dst_offset,
            src_offset,
            pad: 0,
        },
    );
    let pipeline = ctx.pipeline(Kernel::Elementwise, "copy_rows", &[])?;
    ctx.dispatch(
        pass,
        &pipeline,
        &[
            params.as_entire_binding(),
            src.as_entire_binding(),
            dst.as_entire_binding(),
        ],
        groups_for(n, WG)?,
    );
    Ok(())
}
