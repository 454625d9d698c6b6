//! Host side of `shaders/attention.wgsl` and of its gradients, `shaders/attention_backward.wgsl`.

use crate::cpu::AttentionShape;
use crate::gpu::{GpuContext, Kernel, check_distinct, check_f32s, groups_for};
use crate::{Error, Result};

/// The largest head_dim (`MAX_HEAD_DIM` in the shader).
const MAX_HEAD_DIM: usize = 256;
/// Query rows up to which the decode path (`attention_split`) runs.
const SPLIT_ROWS: usize = 4;
/// Keys per `attention_split` workgroup (`SPLIT_KEYS` in the shader).
const SPLIT_KEYS: usize = 64;
/// `attention_tiles` workgroup memory, in floats (`Q_FLOATS`, `KV_FLOATS`, ... in the shader).
const Q_FLOATS: usize = 1056;
const KV_FLOATS: usize = 2112;
const MAX_BLOCK_ROWS: usize = 16;
const MAX_TILE_KEYS: usize = 32;
/// `attention_tiles` splits the keys until about this many workgroups run.
const TARGET_GROUPS: usize = 512;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    new_rows: u32,
    total_rows: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    scaling: f32,
    splits: u32,
    split_keys: u32,
    block_rows: u32,
    tile_keys: u32,
    stats_offset: u32,
    pad: u32,
}

crate::gpu::shaders::uniforms! {
    Attention.params = Params {
        new_rows, total_rows, heads, kv_heads, head_dim, scaling, splits, split_keys, block_rows,
        tile_keys, stats_offset, pad,
    };
    AttentionBackward.params = BackwardParams { n, t, heads, kv_heads, head_dim, scaling, pad };
}

/// How one call is cut into workgroups.
struct Plan {
    entry: &'static str,
    splits: usize,
    split_keys: usize,
    block_rows: usize,
    tile_keys: usize,
    groups: usize,
}

fn plan(new_rows: usize, total_rows: usize, heads: usize, head_dim: usize) -> Plan {
    if new_rows <= SPLIT_ROWS {
        let splits = total_rows.div_ceil(SPLIT_KEYS);
        return Plan {
            entry: "attention_split",
            splits,
            split_keys: SPLIT_KEYS,
            block_rows: 1,
            tile_keys: SPLIT_KEYS,
            groups: new_rows * heads * splits,
        };
    }
    let block_rows = (Q_FLOATS / (head_dim + 1)).min(MAX_BLOCK_ROWS);
    let tile_keys = (KV_FLOATS / (head_dim + 1)).min(MAX_TILE_KEYS);
    let base = new_rows.div_ceil(block_rows) * heads;
    let wanted = TARGET_GROUPS
        .div_ceil(base)
        .clamp(1, total_rows.div_ceil(tile_keys));
    let split_keys = total_rows.div_ceil(wanted).next_multiple_of(tile_keys);
    let splits = total_rows.div_ceil(split_keys);
    Plan {
        entry: "attention_tiles",
        splits,
        split_keys,
        block_rows,
        tile_keys,
        groups: base * splits,
    }
}

/// The checks attention and its backward share: a usable shape and no more query rows than
/// cached rows.
fn check_shape(shape: AttentionShape, query_rows: usize, cache_rows: usize) -> Result<()> {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim,
    } = shape;
    if heads == 0
        || kv_heads == 0
        || head_dim == 0
        || !heads.is_multiple_of(kv_heads)
        || head_dim > MAX_HEAD_DIM
    {
        return Err(Error::invalid(
            "attention shape",
            format!(
                "{heads} heads, {kv_heads} kv heads, head_dim {head_dim}: all must be positive, \
                 heads a multiple of kv heads and head_dim at most {MAX_HEAD_DIM}"
            ),
        ));
    }
    if query_rows > cache_rows {
        return Err(Error::shape(
            "attention cache rows",
            format!("at least the {query_rows} query rows"),
            cache_rows,
        ));
    }
    Ok(())
}

/// Records causal grouped-query attention (`cpu::attention`) of the `new_rows` query rows `q`
/// (`[new_rows, heads * head_dim]` f32, already rotated) over the first `total_rows` rows of the
/// caches (`[capacity, kv_heads * head_dim]` f32, keys already rotated) into `out`
/// (`[new_rows, heads * head_dim]`). Query row `r` sits at position `total_rows - new_rows + r`.
/// `head_dim` may be up to 256, `total_rows` anything. A few query rows (decode) split the keys
/// of each (row, head) over workgroups of 64 keys; more rows (prefill) share staged key and value
/// tiles between blocks of rows, splitting the keys too when there are few blocks. Split results
/// are merged by a second dispatch into the same pass.
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
    check_shape(shape, new_rows, total_rows)?;
    let AttentionShape {
        heads,
        kv_heads,
        head_dim,
    } = shape;
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
    let total = u32::try_from(total_rows)
        .map_err(|_| Error::invalid("attention cache rows", total_rows))?;
    let plan = plan(new_rows, total_rows, heads, head_dim);
    // The partials of a split call: outputs, then a (max, sum) pair each.
    let partials = new_rows * heads * plan.splits;
    let (scratch_bytes, stats_offset) = if plan.splits > 1 {
        (partials * (head_dim + 2) * 4, partials * head_dim)
    } else {
        (4, 0)
    };
    if u32::try_from(scratch_bytes / 4).is_err() {
        return Err(Error::invalid(
            "attention",
            format!("{new_rows} rows over {total_rows} keys need too many partials"),
        ));
    }
    let scratch = ctx.scratch("attention partials", scratch_bytes as u64)?;
    let params = ctx.uniform(
        "attention params",
        &Params {
            new_rows: new_rows as u32,
            total_rows: total,
            heads: heads as u32,
            kv_heads: kv_heads as u32,
            head_dim: head_dim as u32,
            scaling: 1.0 / (head_dim as f32).sqrt(),
            splits: plan.splits as u32,
            split_keys: plan.split_keys as u32,
            block_rows: plan.block_rows as u32,
            tile_keys: plan.tile_keys as u32,
            stats_offset: stats_offset as u32,
            pad: 0,
        },
    );
    let pipeline = ctx.pipeline(Kernel::Attention, plan.entry, &[])?;
    ctx.dispatch(
        pass,
        &pipeline,
        &[
            params.as_entire_binding(),
            scratch.as_entire_binding(),
            out.as_entire_binding(),
            q.as_entire_binding(),
            k_cache.as_entire_binding(),
            v_cache.as_entire_binding(),
        ],
        groups_for(plan.groups, 1)?,
    );
    if plan.splits > 1 {
        let merge = ctx.pipeline(Kernel::Attention, "attention_merge", &[])?;
        ctx.dispatch(
            pass,
            &merge,
            &[
                params.as_entire_binding(),
                scratch.as_entire_binding(),
                out.as_entire_binding(),
            ],
            groups_for(new_rows * heads, 1)?,
        );
    }
    Ok(())
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct BackwardParams {
    n: u32,
    t: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    scaling: f32,
    pad: [u32; 2],
}

/// Records the gradients of causal grouped-query attention (`cpu::attention_backward`) for the
/// upstream gradient `dout` (`[n, heads * head_dim]`, like `q`): `dq` (like `q`), `dk` and `dv`
/// (like `k` and `v`: `[t, kv_heads * head_dim]`, `t >= n`, the queries being the last `n`
/// positions). The softmax is recomputed from `q` and `k`; a kv head's gradients sum over the
/// query heads that share it in a fixed order, without atomics. `head_dim <= 256`.
#[allow(clippy::too_many_arguments)]
pub fn record_backward(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    q: &wgpu::Buffer,
    k: &wgpu::Buffer,
    v: &wgpu::Buffer,
    dout: &wgpu::Buffer,
    dq: &wgpu::Buffer,
    dk: &wgpu::Buffer,
    dv: &wgpu::Buffer,
    n: usize,
    t: usize,
    shape: AttentionShape,
) -> Result<()> {
    check_shape(shape, n, t)?;
    let AttentionShape {
        heads,
        kv_heads,
        head_dim,
    } = shape;
    let q_len = n.checked_mul(heads * head_dim);
    let kv_len = t.checked_mul(kv_heads * head_dim);
    for (what, buffer, len) in [
        ("attention_backward q", q, q_len),
        ("attention_backward dout", dout, q_len),
        ("attention_backward dq", dq, q_len),
        ("attention_backward k", k, kv_len),
        ("attention_backward v", v, kv_len),
        ("attention_backward dk", dk, kv_len),
        ("attention_backward dv", dv, kv_len),
    ] {
        check_f32s(what, buffer, len)?;
    }
    if q_len.and_then(|l| u32::try_from(l).ok()).is_none()
        || kv_len.and_then(|l| u32::try_from(l).ok()).is_none()
    {
        return Err(Error::invalid("attention_backward", "too many rows"));
    }
    for out in [dq, dk, dv] {
        for input in [q, k, v, dout] {
            check_distinct("attention_backward", input, out)?;
        }
    }
    check_distinct("attention_backward", dq, dk)?;
    check_distinct("attention_backward", dq, dv)?;
    check_distinct("attention_backward", dk, dv)?;
    if t == 0 {
        return Ok(());
    }
    let params = ctx.uniform(
        "attention backward params",
        &BackwardParams {
            n: n as u32,
            t: t as u32,
            heads: heads as u32,
            kv_heads: kv_heads as u32,
            head_dim: head_dim as u32,
            scaling: 1.0 / (head_dim as f32).sqrt(),
            pad: [0; 2],
        },
    );
    if n == 0 {
        // No query sees any key: zero gradients, through the key pass with no pairs.
        let stats = ctx.scratch("attention backward stats", 16)?;
        return record_dkv(
            ctx,
            pass,
            &params,
            [q, k, v, dout, &stats, dk, dv],
            t * kv_heads,
        );
    }
    let stats = ctx.scratch("attention backward stats", (n * heads * 16) as u64)?;
    let pipeline = ctx.pipeline(Kernel::AttentionBackward, "attention_dq", &[])?;
    ctx.dispatch(
        pass,
        &pipeline,
        &[
            params.as_entire_binding(),
            q.as_entire_binding(),
            k.as_entire_binding(),
            v.as_entire_binding(),
            dout.as_entire_binding(),
            stats.as_entire_binding(),
            dq.as_entire_binding(),
        ],
        groups_for(n * heads, 1)?,
    );
    record_dkv(
        ctx,
        pass,
        &params,
        [q, k, v, dout, &stats, dk, dv],
        t * kv_heads,
    )
}

fn record_dkv(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    params: &wgpu::Buffer,
    buffers: [&wgpu::Buffer; 7],
    groups: usize,
) -> Result<()> {
    let pipeline = ctx.pipeline(Kernel::AttentionBackward, "attention_dkv", &[])?;
    let mut entries = vec![params.as_entire_binding()];
    entries.extend(buffers.iter().map(|b| b.as_entire_binding()));
    ctx.dispatch(pass, &pipeline, &entries, groups_for(groups, 1)?);
    Ok(())
}
