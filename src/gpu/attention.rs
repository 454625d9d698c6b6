//! Host side of `shaders/attention.wgsl`.

use crate::cpu::AttentionShape;
use crate::gpu::{GpuContext, Kernel, check_distinct, groups_for};
use crate::{Error, Result};

/// The invocations of one workgroup, which is also the largest head_dim: each dimension of the
/// output needs at least one invocation.
const WG: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    new_rows: u32,
    total_rows: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    scaling: f32,
    pad: [u32; 2],
}

/// Records causal grouped-query attention (`cpu::attention`) of the `new_rows` query rows `q`
/// (`[new_rows, heads * head_dim]` f32, already rotated) over the first `total_rows` rows of the
/// caches (`[capacity, kv_heads * head_dim]` f32, keys already rotated) into `out`
/// (`[new_rows, heads * head_dim]`). Query row `r` sits at position `total_rows - new_rows + r`.
/// One workgroup per (row, head); `head_dim` may be up to 256, `total_rows` anything.
#[allow(clippy::too_many_arguments)]
pub fn record(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    q: &wgpu::Buffer,
    k_cache: &wgpu::Buffer,
    v_cache: &wgpu::Buffer,
    out: &wgpu::Buffer,
    new_rows: usize,
    total_rows: usize,
    shape: AttentionShape,
) -> Result<()> {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim,
    } = shape;
    if heads == 0
        || kv_heads == 0
        || head_dim == 0
        || !heads.is_multiple_of(kv_heads)
        || head_dim > WG
    {
        return Err(Error::invalid(
            "attention shape",
            format!(
                "{heads} heads, {kv_heads} kv heads, head_dim {head_dim}: all must be positive, \
                 heads a multiple of kv heads and head_dim at most {WG}"
            ),
        ));
    }
    if new_rows > total_rows {
        return Err(Error::shape(
            "attention cache rows",
            format!("at least the {new_rows} query rows"),
            total_rows,
        ));
    }
    let q_bytes = (new_rows * heads * head_dim * 4) as u64;
    let kv_bytes = (total_rows * kv_heads * head_dim * 4) as u64;
    for (what, buffer, needed) in [
        ("attention query bytes", q, q_bytes),
        ("attention output bytes", out, q_bytes),
        ("attention key cache bytes", k_cache, kv_bytes),
        ("attention value cache bytes", v_cache, kv_bytes),
    ] {
        if buffer.size() < needed {
            return Err(Error::shape(what, needed, buffer.size()));
        }
    }
    for input in [q, k_cache, v_cache] {
        check_distinct("attention buffers", input, out)?;
    }
    if new_rows == 0 {
        return Ok(());
    }
    let params = ctx.uniform(
        "attention params",
        &Params {
            new_rows: new_rows as u32,
            total_rows: u32::try_from(total_rows)
                .map_err(|_| Error::invalid("attention cache rows", total_rows))?,
            heads: heads as u32,
            kv_heads: kv_heads as u32,
            head_dim: head_dim as u32,
            scaling: 1.0 / (head_dim as f32).sqrt(),
            pad: [0; 2],
        },
    );
    let pipeline = ctx.pipeline(Kernel::Attention, "attention", &[])?;
    ctx.dispatch(
        pass,
        &pipeline,
        &[
            params.as_entire_binding(),
            q.as_entire_binding(),
            k_cache.as_entire_binding(),
            v_cache.as_entire_binding(),
            out.as_entire_binding(),
        ],
        groups_for(new_rows * heads, 1)?,
    );
    Ok(())
}
