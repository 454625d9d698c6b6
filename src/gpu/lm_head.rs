//! Host side of `shaders/lm_head.wgsl`.

use crate::gpu::table::GpuTable;
use crate::gpu::{GpuContext, Kernel, check_distinct, groups_for};
use crate::{Error, Result};

/// Table rows per workgroup (`VROWS` in the shader).
const VROWS: usize = 8;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    vocab: u32,
    first: u32,
    count: u32,
    row_vecs: u32,
    pad: [u32; 2],
}

/// Records `logits[r, v] = x[r] · table[v]` (`cpu::lm_head`) for the `rows` rows of `x`
/// (`[rows, table.cols()]` f32) into `logits` (`[rows, table.rows()]` f32), one dispatch per
/// table chunk.
pub fn record(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    x: &wgpu::Buffer,
    table: &GpuTable,
    logits: &wgpu::Buffer,
    rows: usize,
) -> Result<()> {
    let (vocab, hidden) = (table.rows(), table.cols());
    if x.size() < (rows * hidden * 4) as u64 {
        return Err(Error::shape(
            "lm_head input bytes",
            rows * hidden * 4,
            x.size(),
        ));
    }
    let outputs = rows * vocab;
    if logits.size() < (outputs * 4) as u64 {
        return Err(Error::shape(
            "lm_head logits bytes",
            outputs * 4,
            logits.size(),
        ));
    }
    if u32::try_from(outputs).is_err() || u32::try_from(rows * hidden).is_err() {
        return Err(Error::invalid(
            "lm_head",
            format!("{rows} rows against a {vocab} x {hidden} table is too many"),
        ));
    }
    check_distinct("lm_head buffers", x, logits)?;
    if rows == 0 {
        return Ok(());
    }
    let pipeline = ctx.pipeline(Kernel::LmHead, "lm_head", &table.constants())?;
    for chunk in table.chunks() {
        let params = ctx.uniform(
            "lm_head params",
            &Params {
                rows: rows as u32,
                cols: hidden as u32,
                vocab: vocab as u32,
                first: chunk.first as u32,
                count: chunk.rows as u32,
                row_vecs: (table.row_words() / 4) as u32,
                pad: [0; 2],
            },
        );
        ctx.dispatch(
            pass,
            &pipeline,
            &[
                params.as_entire_binding(),
                x.as_entire_binding(),
                chunk.buffer.as_entire_binding(),
                logits.as_entire_binding(),
            ],
            groups_for(chunk.rows, VROWS)?,
        );
    }
    Ok(())
}
