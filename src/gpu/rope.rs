//! Host side of `shaders/rope.wgsl`: `cpu::rope`, bit for bit, from a source buffer into rows of a
//! destination (a KV cache, or a query buffer), or from a fused q/k/v projection into the query
//! buffer and the KV cache at once; and its gradient in place (`shaders/rope_backward.wgsl`).

use crate::cpu::{AttentionShape, rope_inv_freq};
use crate::gpu::{GpuContext, Kernel, check_distinct, check_f32s, groups_for};
use crate::{Error, Result};

const WG: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    heads: u32,
    half_dim: u32,
    dst_row: u32,
    no_fuse: u32,
    kv_heads: u32,
    pad: [u32; 2],
}

crate::gpu::shaders::uniforms! {
    Rope.params = Params { rows, heads, half_dim, dst_row, no_fuse, kv_heads, pad };
    RopeBackward.params = BackwardParams { rows, heads, half_dim, no_fuse };
}

/// The (cos, sin) of every angle of `rows` positions from `first_position`, computed with the
/// CPU's own expressions (WGSL's cos and sin are far from correctly rounded at large angles):
/// what the rope kernels read. Positions share a table across calls with the same content.
pub fn cos_sin(
    ctx: &GpuContext,
    first_position: usize,
    rows: usize,
    head_dim: usize,
    theta: f32,
) -> Result<wgpu::Buffer> {
    check_head_dim(head_dim)?;
    let inv_freq = rope_inv_freq(head_dim, theta);
    let mut table = Vec::with_capacity(rows.max(1) * head_dim);
    for pos in first_position..first_position + rows {
        for &f in &inv_freq {
            let angle = pos as f32 * f;
            table.extend([angle.cos(), angle.sin()]);
        }
    }
    if table.is_empty() {
        table.extend([1.0, 0.0]);
    }
    ctx.upload_shared("rope cos/sin", &table)
}

fn check_head_dim(head_dim: usize) -> Result<()> {
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(Error::invalid(
            "rope head_dim",
            format!("{head_dim} is not a positive even number"),
        ));
    }
    Ok(())
}

/// Checks what rope_qkv (or a kernel that does its work) writes for `rows` tokens: `table` holds
/// their cos/sin, `q` their rotated queries, and the caches rows up to `cache_row + rows`; the
/// three destinations are different buffers.
pub(crate) fn check_qkv_outputs(
    table: &wgpu::Buffer,
    q: &wgpu::Buffer,
    k_cache: &wgpu::Buffer,
    v_cache: &wgpu::Buffer,
    cache_row: usize,
    rows: usize,
    shape: AttentionShape,
) -> Result<()> {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim,
    } = shape;
    check_head_dim(head_dim)?;
    let width = |h: usize| h.checked_mul(head_dim);
    check_f32s("rope cos/sin table", table, rows.checked_mul(head_dim))?;
    check_f32s(
        "rope query destination",
        q,
        width(heads).and_then(|w| w.checked_mul(rows)),
    )?;
    let end = cache_row.checked_add(rows);
    for (what, cache) in [("rope key cache", k_cache), ("rope value cache", v_cache)] {
        check_f32s(
            what,
            cache,
            width(kv_heads).and_then(|w| w.checked_mul(end?)),
        )?;
    }
    if q == k_cache || q == v_cache || k_cache == v_cache {
        return Err(Error::invalid(
            "rope",
            "the query, key and value destinations must be different buffers",
        ));
    }
    Ok(())
}

pub(crate) fn cache_row(dst_row: usize) -> Result<u32> {
    u32::try_from(dst_row).map_err(|_| Error::invalid("rope dst_row", "overflows u32"))
}

/// Records the rotation of row `r < rows` of `src` (`[rows, heads * head_dim]` f32) by position
/// `first_position + r`, written to row `dst_row + r` of `dst` (same row width). `src` and `dst`
/// must be different buffers. Bit-exact with `cpu::rope`: the host computes cos and sin of every
/// angle with the CPU's own expressions and uploads them (rows x head_dim / 2 pairs).
#[allow(clippy::too_many_arguments)]
pub fn record(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    src: &wgpu::Buffer,
    dst: &wgpu::Buffer,
    dst_row: usize,
    rows: usize,
    heads: usize,
    head_dim: usize,
    theta: f32,
    first_position: usize,
) -> Result<()> {
    check_head_dim(head_dim)?;
    let row_len = heads.checked_mul(head_dim);
    check_f32s(
        "rope source",
        src,
        row_len.and_then(|w| w.checked_mul(rows)),
    )?;
    let end = dst_row.checked_add(rows);
    check_f32s(
        "rope destination",
        dst,
        row_len.and_then(|w| w.checked_mul(end?)),
    )?;
    check_distinct("rope", src, dst)?;
    if rows == 0 || heads == 0 {
        return Ok(());
    }
    let table = cos_sin(ctx, first_position, rows, head_dim, theta)?;
    let params = ctx.uniform(
        "rope params",
        &Params {
            rows: rows as u32,
            heads: heads as u32,
            half_dim: (head_dim / 2) as u32,
            dst_row: cache_row(dst_row)?,
            no_fuse: 0,
            kv_heads: 0,
            pad: [0; 2],
        },
    );
    let pipeline = ctx.pipeline(Kernel::Rope, "rope", &[])?;
    ctx.dispatch(
        pass,
        &pipeline,
        &[
            params.as_entire_binding(),
            src.as_entire_binding(),
            table.as_entire_binding(),
            dst.as_entire_binding(),
        ],
        groups_for(rows * heads * head_dim / 2, WG)?,
    );
    Ok(())
}

/// Records the fused form: `qkv` holds `rows` rows of `[q | k | v]`
/// (`(heads + 2 * kv_heads) * head_dim` f32 each, q_proj, k_proj and v_proj stacked). Row `r`'s
/// queries are rotated into row `r` of `q` (`[rows, heads * head_dim]`), its keys rotated into row
/// `cache_row + r` of `k_cache` and its values copied into the same row of `v_cache`
/// (`kv_heads * head_dim` wide), all in one dispatch. `table` is [`cos_sin`] of the `rows`
/// positions. The same bits as `record` on each part.
#[allow(clippy::too_many_arguments)]
pub fn record_qkv(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    qkv: &wgpu::Buffer,
    table: &wgpu::Buffer,
    q: &wgpu::Buffer,
    k_cache: &wgpu::Buffer,
    v_cache: &wgpu::Buffer,
    cache_row: usize,
    rows: usize,
    shape: AttentionShape,
) -> Result<()> {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim,
    } = shape;
    let all_heads = heads.saturating_add(kv_heads.saturating_mul(2));
    check_f32s(
        "rope q/k/v source",
        qkv,
        all_heads
            .checked_mul(head_dim)
            .and_then(|w| w.checked_mul(rows)),
    )?;
    check_qkv_outputs(table, q, k_cache, v_cache, cache_row, rows, shape)?;
    for dst in [q, k_cache, v_cache] {
        check_distinct("rope", qkv, dst)?;
    }
    if rows == 0 || all_heads == 0 {
        return Ok(());
    }
    let params = ctx.uniform(
        "rope params",
        &Params {
            rows: rows as u32,
            heads: heads as u32,
            half_dim: (head_dim / 2) as u32,
            dst_row: self::cache_row(cache_row)?,
            no_fuse: 0,
            kv_heads: kv_heads as u32,
            pad: [0; 2],
        },
    );
    let pipeline = ctx.pipeline(Kernel::Rope, "rope_qkv", &[])?;
    ctx.dispatch(
        pass,
        &pipeline,
        &[
            params.as_entire_binding(),
            qkv.as_entire_binding(),
            table.as_entire_binding(),
            q.as_entire_binding(),
            k_cache.as_entire_binding(),
            v_cache.as_entire_binding(),
        ],
        groups_for(rows * all_heads * head_dim / 2, WG)?,
    );
    Ok(())
}

/// [`cos_sin`] for any list of positions, one row each (training windows: `0..T` for every
/// window of a batch).
pub fn cos_sin_at(
    ctx: &GpuContext,
    positions: &[usize],
    head_dim: usize,
    theta: f32,
) -> Result<wgpu::Buffer> {
    check_head_dim(head_dim)?;
    let inv_freq = rope_inv_freq(head_dim, theta);
    let mut table = Vec::with_capacity(positions.len().max(1) * head_dim);
    for &pos in positions {
        for &f in &inv_freq {
            let angle = pos as f32 * f;
            table.extend([angle.cos(), angle.sin()]);
        }
    }
    if table.is_empty() {
        table.extend([1.0, 0.0]);
    }
    ctx.upload_shared("rope cos/sin", &table)
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct BackwardParams {
    rows: u32,
    heads: u32,
    half_dim: u32,
    no_fuse: u32,
}

/// Records the gradient of rope (`cpu::rope_backward`) in place: `dx` (`[rows, heads *
/// head_dim]` f32) holds the gradient wrt the rotated rows and receives the gradient wrt the
/// rows before rotation, bit for bit; `table` holds each row's cos/sin ([`cos_sin`],
/// [`cos_sin_at`]).
pub fn record_backward(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    dx: &wgpu::Buffer,
    table: &wgpu::Buffer,
    rows: usize,
    heads: usize,
    head_dim: usize,
) -> Result<()> {
    check_head_dim(head_dim)?;
    let width = heads.checked_mul(head_dim);
    check_f32s(
        "rope_backward gradient",
        dx,
        width.and_then(|w| w.checked_mul(rows)),
    )?;
    check_f32s("rope cos/sin table", table, rows.checked_mul(head_dim))?;
    check_distinct("rope_backward", table, dx)?;
    let pairs = rows * heads * (head_dim / 2);
    if u32::try_from(pairs * 2).is_err() {
        return Err(Error::invalid(
            "rope_backward",
            format!("{rows} rows of {heads} heads is too many"),
        ));
    }
    if pairs == 0 {
        return Ok(());
    }
    let params = ctx.uniform(
        "rope backward params",
        &BackwardParams {
            rows: rows as u32,
            heads: heads as u32,
            half_dim: (head_dim / 2) as u32,
            no_fuse: 0,
        },
    );
    let pipeline = ctx.pipeline(Kernel::RopeBackward, "rope_backward", &[])?;
    ctx.dispatch(
        pass,
        &pipeline,
        &[
            params.as_entire_binding(),
            table.as_entire_binding(),
            dx.as_entire_binding(),
        ],
        groups_for(pairs, WG)?,
    );
    Ok(())
}
