//! Host side of `shaders/lm_head.wgsl` and of its gradients, `shaders/lm_head_backward.wgsl`.

use crate::gpu::table::{GpuGradTable, GpuTable};
use crate::gpu::{GpuContext, Kernel, check_distinct, check_f32s, groups_for};
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

crate::gpu::shaders::uniforms! {
    LmHead.params = Params { rows, cols, vocab, first, count, row_vecs, pad };
    LmHeadBackward.params = BackwardParams {
        m, hidden, k, vocab, first, shift, row0, row_words, accumulate, pad,
    };
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

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct BackwardParams {
    m: u32,
    hidden: u32,
    k: u32,
    vocab: u32,
    first: u32,
    shift: u32,
    row0: u32,
    row_words: u32,
    accumulate: u32,
    pad: [u32; 3],
}

/// Output rows and columns of one backward workgroup (TM and TN in the shader).
const BACKWARD_TILE: usize = 32;

/// Records the gradients of [`record`] (`cpu::lm_head_backward`) for `dlogits`
/// (`[rows, table.rows()]` f32): `dx = dlogits · table` into `dx` (`[rows, table.cols()]`) and
/// `dtable = dlogitsᵀ · x` into `dtable` (`x` as for [`record`]). With `accumulate_dtable`,
/// `dtable` is added to (tied embeddings: the embedding's own gradient, written first) instead
/// of overwritten. f32 GEMMs; the sums split at the table's chunks and at groups of rows of
/// `dlogits` that fit one storage binding, in a fixed order.
#[allow(clippy::too_many_arguments)]
pub fn record_backward(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    x: &wgpu::Buffer,
    table: &GpuTable,
    dlogits: &wgpu::Buffer,
    dx: &wgpu::Buffer,
    dtable: &GpuGradTable,
    rows: usize,
    accumulate_dtable: bool,
) -> Result<()> {
    let caps = ctx.capabilities();
    let limit = caps.max_storage_binding.min(caps.max_buffer);
    let align = u64::from(ctx.device.limits().min_storage_buffer_offset_alignment);
    let row_bytes = (table.rows() * 4) as u64;
    let group_rows = (limit.saturating_sub(align) / row_bytes.max(1)) as usize;
    record_backward_grouped(
        ctx,
        pass,
        x,
        table,
        dlogits,
        dx,
        dtable,
        rows,
        accumulate_dtable,
        group_rows,
    )
}

/// [`record_backward`] with at most `group_rows` rows of `dlogits` per binding, so that tests can
/// exercise the split on small shapes.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn record_backward_grouped(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    x: &wgpu::Buffer,
    table: &GpuTable,
    dlogits: &wgpu::Buffer,
    dx: &wgpu::Buffer,
    dtable: &GpuGradTable,
    rows: usize,
    accumulate_dtable: bool,
    group_rows: usize,
) -> Result<()> {
    let (vocab, hidden) = (table.rows(), table.cols());
    if (dtable.rows(), dtable.cols()) != (vocab, hidden) {
        return Err(Error::shape(
            "lm_head_backward dtable",
            format!("{vocab} x {hidden}"),
            format!("{} x {}", dtable.rows(), dtable.cols()),
        ));
    }
    if group_rows == 0 {
        return Err(Error::Limit {
            what: format!("one row of {vocab} logit gradients"),
            limit: "max_storage_buffer_binding_size",
            needed: (vocab * 4) as u64,
            available: ctx.capabilities().max_storage_binding,
        });
    }
    check_f32s("lm_head_backward input", x, rows.checked_mul(hidden))?;
    check_f32s("lm_head_backward dx", dx, rows.checked_mul(hidden))?;
    check_f32s("lm_head_backward dlogits", dlogits, rows.checked_mul(vocab))?;
    if u32::try_from(rows * vocab).is_err() || u32::try_from(rows * hidden).is_err() {
        return Err(Error::invalid(
            "lm_head_backward",
            format!("{rows} rows against a {vocab} x {hidden} table is too many"),
        ));
    }
    for out in [dx, dlogits] {
        check_distinct("lm_head_backward", x, out)?;
    }
    check_distinct("lm_head_backward", dlogits, dx)?;
    for chunk in dtable.chunks() {
        for input in [x, dlogits, dx] {
            check_distinct("lm_head_backward", input, &chunk.buffer)?;
        }
    }
    let align = u64::from(ctx.device.limits().min_storage_buffer_offset_alignment).max(4);
    let dx_pipeline = ctx.pipeline(Kernel::LmHeadBackward, "lm_head_dx", &table.constants())?;
    let dtable_pipeline = ctx.pipeline(Kernel::LmHeadBackward, "lm_head_dtable", &[])?;
    let tiles_n = hidden.div_ceil(BACKWARD_TILE);
    let params = |m: usize, k: usize, first: usize, shift: u64, row0: usize, acc: bool| {
        ctx.uniform(
            "lm_head backward params",
            &BackwardParams {
                m: m as u32,
                hidden: hidden as u32,
                k: k as u32,
                vocab: vocab as u32,
                first: first as u32,
                shift: shift as u32,
                row0: row0 as u32,
                row_words: table.row_words() as u32,
                accumulate: acc as u32,
                pad: [0; 3],
            },
        )
    };
    let mut row0 = 0;
    let mut group = 0;
    // With no rows at all, dx is empty and dtable gets (or keeps) zero sums: one empty group.
    while row0 < rows || (rows == 0 && group == 0) {
        let n = group_rows.min(rows - row0);
        let start = (row0 * vocab * 4) as u64;
        let offset = start / align * align;
        let size = ((n * vocab * 4) as u64 + start - offset).max(4);
        let binding = wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: dlogits,
            offset,
            size: wgpu::BufferSize::new(size),
        });
        let shift = (start - offset) / 4;
        for (index, chunk) in table.chunks().iter().enumerate() {
            if n > 0 {
                let p = params(n, chunk.rows, chunk.first, shift, row0, index > 0);
                ctx.dispatch(
                    pass,
                    &dx_pipeline,
                    &[
                        p.as_entire_binding(),
                        binding.clone(),
                        chunk.buffer.as_entire_binding(),
                        dx.as_entire_binding(),
                    ],
                    groups_for(n.div_ceil(BACKWARD_TILE) * tiles_n, 1)?,
                );
            }
        }
        for grad in dtable.chunks() {
            let p = params(
                grad.rows,
                n,
                grad.first,
                shift,
                row0,
                accumulate_dtable || group > 0,
            );
            ctx.dispatch(
                pass,
                &dtable_pipeline,
                &[
                    p.as_entire_binding(),
                    binding.clone(),
                    x.as_entire_binding(),
                    grad.buffer.as_entire_binding(),
                ],
                groups_for(grad.rows.div_ceil(BACKWARD_TILE) * tiles_n, 1)?,
            );
        }
        row0 += n;
        group += 1;
    }
    Ok(())
}
