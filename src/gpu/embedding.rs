//! Host side of `shaders/embedding.wgsl`.

use crate::gpu::table::GpuTable;
use crate::gpu::{GpuContext, Kernel, check_distinct, groups_for};
use crate::{Error, Result};

const WG: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    first: u32,
    count: u32,
    row_words: u32,
    pad: [u32; 3],
}

/// Records `out[r] = table[tokens[r]]` (`cpu::embedding`) for `rows` u32 tokens into `out`
/// (`[rows, table.cols()]` f32; f16 tables widened exactly). Tokens must be below
/// `table.rows()`, which the caller checks before uploading them: the rows of a larger token
/// are left unwritten (never read out of bounds).
pub fn record(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    table: &GpuTable,
    tokens: &wgpu::Buffer,
    out: &wgpu::Buffer,
    rows: usize,
) -> Result<()> {
    let cols = table.cols();
    if tokens.size() < (rows * 4) as u64 {
        return Err(Error::shape(
            "embedding token bytes",
            rows * 4,
            tokens.size(),
        ));
    }
    let values = rows * cols;
    if out.size() < (values * 4) as u64 {
        return Err(Error::shape(
            "embedding output bytes",
            values * 4,
            out.size(),
        ));
    }
    let values = u32::try_from(values)
        .map_err(|_| Error::invalid("embedding", format!("{rows} rows of {cols} is too many")))?;
    check_distinct("embedding buffers", tokens, out)?;
    if rows == 0 {
        return Ok(());
    }
    let pipeline = ctx.pipeline(Kernel::Embedding, "embedding", &table.constants())?;
    for chunk in table.chunks() {
        let params = ctx.uniform(
            "embedding params",
            &Params {
                rows: rows as u32,
                cols: cols as u32,
                first: chunk.first as u32,
                count: chunk.rows as u32,
                row_words: table.row_words() as u32,
                pad: [0; 3],
            },
        );
        ctx.dispatch(
            pass,
            &pipeline,
            &[
                params.as_entire_binding(),
                chunk.buffer.as_entire_binding(),
                tokens.as_entire_binding(),
                out.as_entire_binding(),
            ],
            groups_for(values as usize, WG)?,
        );
    }
    Ok(())
}
