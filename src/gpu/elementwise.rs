//! Host side of `shaders/elementwise.wgsl`: row copies (into a KV cache, or a token's row to the
//! front of a buffer), which a compute pass has no built-in command for.

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
