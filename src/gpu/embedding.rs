//! Host side of `shaders/embedding.wgsl` and of its gradient, `shaders/embedding_backward.wgsl`.

use crate::gpu::table::{GpuGradTable, GpuTable};
use crate::gpu::{GpuContext, Kernel, check_distinct, check_f32s, groups_for};
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

crate::gpu::shaders::uniforms! {
    Embedding.params = Params { rows, cols, first, count, row_words, pad };
    EmbeddingBackward.params = BackwardParams { tokens, cols, first, count, vocab, pad };
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

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct BackwardParams {
    tokens: u32,
    cols: u32,
    first: u32,
    count: u32,
    vocab: u32,
    pad: [u32; 3],
}

/// Records the gradient of [`record`] wrt the table (`cpu::embedding_backward`) into `dtable`
/// (`[vocab, cols]`): row `t` receives the sum of the rows of `dy` (`[rows, cols]` f32) whose token
/// (`tokens`, `rows` u32) is `t`, added in token order, the CPU's sum bit for bit; every other row
/// is zero. No atomics: the same bits on every run. Tokens at or past `dtable.rows()` are skipped
/// (the caller checks them, as for [`record`]).
pub fn record_backward(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    tokens: &wgpu::Buffer,
    dy: &wgpu::Buffer,
    dtable: &GpuGradTable,
    rows: usize,
) -> Result<()> {
    let cols = dtable.cols();
    check_f32s("embedding_backward tokens", tokens, Some(rows))?;
    check_f32s("embedding_backward dy", dy, rows.checked_mul(cols))?;
    if rows
        .checked_mul(cols)
        .and_then(|n| u32::try_from(n).ok())
        .is_none()
    {
        return Err(Error::invalid(
            "embedding_backward",
            format!("{rows} x {cols} is too many"),
        ));
    }
    for chunk in dtable.chunks() {
        check_distinct("embedding_backward", tokens, &chunk.buffer)?;
        check_distinct("embedding_backward", dy, &chunk.buffer)?;
    }
    let params = |first: usize, count: usize| {
        ctx.uniform(
            "embedding backward params",
            &BackwardParams {
                tokens: rows as u32,
                cols: cols as u32,
                first: first as u32,
                count: count as u32,
                vocab: dtable.rows() as u32,
                pad: [0; 3],
            },
        )
    };
    let zero = ctx.pipeline(Kernel::EmbeddingBackward, "embedding_zero", &[])?;
    for chunk in dtable.chunks() {
        let p = params(chunk.first, chunk.rows);
        ctx.dispatch(
            pass,
            &zero,
            &[p.as_entire_binding(), chunk.buffer.as_entire_binding()],
            groups_for(chunk.rows * cols, WG)?,
        );
    }
    if rows == 0 {
        return Ok(());
    }
    let links = ctx.scratch("embedding links", rows as u64 * 8)?;
    let p = params(0, 0);
    let pipeline = ctx.pipeline(Kernel::EmbeddingBackward, "embedding_links", &[])?;
    ctx.dispatch(
        pass,
        &pipeline,
        &[
            p.as_entire_binding(),
            tokens.as_entire_binding(),
            links.as_entire_binding(),
        ],
        groups_for(rows, WG)?,
    );
    let pipeline = ctx.pipeline(Kernel::EmbeddingBackward, "embedding_dtable", &[])?;
    for chunk in dtable.chunks() {
        let p = params(chunk.first, chunk.rows);
        ctx.dispatch(
            pass,
            &pipeline,
            &[
                p.as_entire_binding(),
                tokens.as_entire_binding(),
                links.as_entire_binding(),
                dy.as_entire_binding(),
                chunk.buffer.as_entire_binding(),
            ],
            groups_for(rows * cols, WG)?,
        );
    }
    Ok(())
}
