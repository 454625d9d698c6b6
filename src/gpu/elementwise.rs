//! Host side of `shaders/elementwise.wgsl`: row copies (into a KV cache, or a token's row to the
//! front of a buffer), row sums and column-block copies, which a compute pass has no built-in
//! command for.

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

crate::gpu::shaders::uniforms! {
    Elementwise.copy_params = Params { n, dst_offset, src_offset, pad };
    Elementwise.block_params = BlockParams {
        rows, cols, src_stride, src_col, dst_stride, dst_col, pad,
    };
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
    record_rows(
        ctx,
        pass,
        "copy_rows",
        src,
        src_row,
        dst,
        dst_row,
        rows,
        cols,
    )
}

/// Records `dst[dst_row + r] += src[src_row + r]` for `r < rows`, rows of `cols` f32, as
/// [`copy_rows`] addresses them: one f32 addition per element, so the sum of several gradients
/// added in a fixed order is the CPU's `a += b` bit for bit.
#[allow(clippy::too_many_arguments)]
pub fn add_rows(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    src: &wgpu::Buffer,
    src_row: usize,
    dst: &wgpu::Buffer,
    dst_row: usize,
    rows: usize,
    cols: usize,
) -> Result<()> {
    record_rows(
        ctx, pass, "add_rows", src, src_row, dst, dst_row, rows, cols,
    )
}

#[allow(clippy::too_many_arguments)]
fn record_rows(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    entry: &'static str,
    src: &wgpu::Buffer,
    src_row: usize,
    dst: &wgpu::Buffer,
    dst_row: usize,
    rows: usize,
    cols: usize,
) -> Result<()> {
    let n = rows.checked_mul(cols);
    let src_end = src_row.checked_add(rows).and_then(|r| r.checked_mul(cols));
    check_f32s("row source", src, src_end)?;
    let end = dst_row.checked_add(rows).and_then(|r| r.checked_mul(cols));
    check_f32s("row destination", dst, end)?;
    check_distinct(entry, src, dst)?;
    let n = n.unwrap_or(0);
    if n == 0 {
        return Ok(());
    }
    let offset = |what: &str, row: usize| {
        u32::try_from(row * cols)
            .map_err(|_| Error::invalid(entry, format!("the {what} offset overflows u32")))
    };
    let params = ctx.uniform(
        "row params",
        &Params {
            n: offset("element count", rows)?,
            dst_offset: offset("destination", dst_row)?,
            src_offset: offset("source", src_row)?,
            pad: 0,
        },
    );
    let pipeline = ctx.pipeline(Kernel::Elementwise, entry, &[])?;
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

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct BlockParams {
    rows: u32,
    cols: u32,
    src_stride: u32,
    src_col: u32,
    dst_stride: u32,
    dst_col: u32,
    pad: [u32; 2],
}

/// A block of columns in a row-major f32 matrix: columns `col..col + cols` of rows `stride`
/// wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Columns {
    pub stride: usize,
    pub col: usize,
}

/// Records the copy of columns `src.col..src.col + cols` of the first `rows` rows of `from`
/// (rows `src.stride` wide) into columns `dst.col..dst.col + cols` of the rows of `to` (rows
/// `dst.stride` wide): e.g. the gate and up halves of a `[rows, 2 * inter]` row, apart or
/// together. `from` and `to` must be different buffers.
#[allow(clippy::too_many_arguments)]
pub fn copy_block(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    from: &wgpu::Buffer,
    src: Columns,
    to: &wgpu::Buffer,
    dst: Columns,
    rows: usize,
    cols: usize,
) -> Result<()> {
    for (what, buffer, side) in [("block source", from, src), ("block destination", to, dst)] {
        if side.col + cols > side.stride {
            return Err(Error::invalid(
                what,
                format!(
                    "columns {}..{} of rows {} wide",
                    side.col,
                    side.col + cols,
                    side.stride
                ),
            ));
        }
        check_f32s(what, buffer, rows.checked_mul(side.stride))?;
    }
    check_distinct("copy_block", from, to)?;
    let n = rows * cols;
    if n == 0 {
        return Ok(());
    }
    let small = |v: usize| {
        u32::try_from(v).map_err(|_| Error::invalid("copy_block", "the block overflows u32"))
    };
    small(rows * src.stride.max(dst.stride))?;
    let params = ctx.uniform(
        "block params",
        &BlockParams {
            rows: rows as u32,
            cols: cols as u32,
            src_stride: src.stride as u32,
            src_col: src.col as u32,
            dst_stride: dst.stride as u32,
            dst_col: dst.col as u32,
            pad: [0; 2],
        },
    );
    let pipeline = ctx.pipeline(Kernel::Elementwise, "copy_block", &[])?;
    ctx.dispatch(
        pass,
        &pipeline,
        &[
            params.as_entire_binding(),
            from.as_entire_binding(),
            to.as_entire_binding(),
        ],
        groups_for(n, WG)?,
    );
    Ok(())
}
