//! Host side of `shaders/norm_matmul.wgsl`: `cpu::norm_matmul` for decoding, one dispatch where
//! `rmsnorm::record_quant` and `ternary_matmul::record` take two (and, for the stacked q/k/v
//! projection, `rope::record_qkv` a third). Without a norm (the families without sub-norms) the
//! front is `act_quant::record` alone.

use crate::cpu::AttentionShape;
use crate::gpu::{
    GpuContext, GpuTernary, Kernel, check_distinct, check_f32s, groups_for, rmsnorm, rope,
};
use crate::model::Activation;
use crate::packing::gpu_words;
use crate::{Error, Result};

/// Matrix rows one workgroup computes (`ROWS` in the shader).
const ROWS: usize = 16;
/// The widest input row the shader holds in workgroup memory (`4 * MAX_CODE_WORDS`).
pub const MAX_COLS: usize = 8192;
/// Workgroup memory the shader may use (codes, lane sums, the rms fold and the workgroup-memory
/// reductions), rounded up: adapters that offer less take the two-dispatch path.
pub const WORKGROUP_BYTES: u32 = 20 * 1024;

/// What [`record`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormMatmulOutput {
    /// `y = x' · wᵀ`.
    Replace,
    /// `y += x' · wᵀ`: a residual connection.
    Add,
    /// `w` is gate_proj stacked on up_proj: `y = act(gate) * up` ([`Activation::gate`]), half
    /// as wide.
    Gated(Activation),
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    n: u32,
    k_words: u32,
    no_fuse: u32,
    eps: f32,
    per_channel: u32,
    heads: u32,
    kv_heads: u32,
    half_dim: u32,
    cache_row: u32,
    pad: u32,
}

crate::gpu::shaders::uniforms! {
    NormMatmul.params = Params {
        rows, cols, n, k_words, no_fuse, eps, per_channel, heads, kv_heads, half_dim, cache_row,
        pad,
    };
}

/// Whether this adapter runs the fused kernel for rows of `cols` inputs.
pub fn supported(ctx: &GpuContext, cols: usize) -> bool {
    cols <= MAX_COLS && ctx.capabilities().max_workgroup_memory >= WORKGROUP_BYTES
}

/// Checks the input side that both entry points share (`x`: `rows x w.cols` f32, `norm`:
/// `w.cols`) and fills in its parameters.
fn input_params(
    ctx: &GpuContext,
    x: &wgpu::Buffer,
    rows: usize,
    norm: Option<&wgpu::Buffer>,
    eps: f32,
    w: &GpuTernary,
) -> Result<Params> {
    let cols = w.cols;
    check_supported(ctx, cols)?;
    check_f32s("norm_matmul input", x, rows.checked_mul(cols))?;
    if let Some(norm) = norm {
        rmsnorm::check_eps(eps)?;
        check_f32s("norm_matmul norm weight", norm, Some(cols))?;
    }
    Ok(Params {
        rows: rows as u32,
        cols: cols as u32,
        n: 0,
        k_words: gpu_words::words_per_row(cols) as u32,
        no_fuse: 0,
        eps,
        per_channel: w.per_channel as u32,
        heads: 0,
        kv_heads: 0,
        half_dim: 0,
        cache_row: 0,
        pad: 0,
    })
}

fn check_supported(ctx: &GpuContext, cols: usize) -> Result<()> {
    if !supported(ctx, cols) {
        return Err(Error::invalid(
            "norm_matmul",
            format!(
                "{cols} columns on an adapter with {} bytes of workgroup memory (needs at most \
                 {MAX_COLS} columns and {WORKGROUP_BYTES} bytes)",
                ctx.capabilities().max_workgroup_memory
            ),
        ));
    }
    Ok(())
}

/// Records `cpu::norm_matmul(x, rows, norm, eps, w, ..)` into `y` (added to what `y` holds with
/// `Add`, gated with `Gated`); without a norm, `cpu::ternary_matmul(cpu::act_quant(x), w)`
/// likewise (`eps` unused). `x` holds `rows x w.cols` f32 and `norm` `w.cols`; needs
/// [`supported`]`(ctx, w.cols)`. Bit-exact with the two-dispatch path (`rmsnorm::record_quant`
/// or `act_quant::record`, the GEMV, then `gate::record` where gated); the float epilogue is
/// [`crate::gpu::ternary_matmul::record`]'s.
#[allow(clippy::too_many_arguments)]
pub fn record(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    x: &wgpu::Buffer,
    rows: usize,
    norm: Option<&wgpu::Buffer>,
    eps: f32,
    w: &GpuTernary,
    y: &wgpu::Buffer,
    output: NormMatmulOutput,
) -> Result<()> {
    let mut params = input_params(ctx, x, rows, norm, eps, w)?;
    let activation = match output {
        NormMatmulOutput::Gated(activation) => Some(activation),
        NormMatmulOutput::Replace | NormMatmulOutput::Add => None,
    };
    let gated = activation.is_some();
    if gated && !w.rows.is_multiple_of(2) {
        return Err(Error::invalid(
            "gated norm_matmul",
            format!("{} stacked gate and up rows is odd", w.rows),
        ));
    }
    let n = if gated { w.rows / 2 } else { w.rows };
    check_f32s("norm_matmul output", y, rows.checked_mul(n))?;
    check_distinct("norm_matmul", x, y)?;
    if rows == 0 || n == 0 {
        return Ok(());
    }
    params.n = n as u32;
    let params = ctx.uniform("norm_matmul params", &params);
    let per_group = if gated { ROWS / 2 } else { ROWS };
    let constants = [
        ("ADD_TO_Y", (output == NormMatmulOutput::Add) as u64),
        ("GATED", gated as u64),
        ("SILU", (activation == Some(Activation::Silu)) as u64),
        ("NORMED", norm.is_some() as u64),
    ];
    let pipeline = ctx.pipeline(Kernel::NormMatmul, "norm_gemv", &constants)?;
    ctx.dispatch(
        pass,
        &pipeline,
        &[
            params.as_entire_binding(),
            x.as_entire_binding(),
            // Without a norm the shader reads no weight, but the binding needs a buffer: x
            // again, read-only both times.
            norm.unwrap_or(x).as_entire_binding(),
            w.words.as_entire_binding(),
            w.scales.as_entire_binding(),
            y.as_entire_binding(),
        ],
        groups_for(rows * n.div_ceil(per_group), 1)?,
    );
    Ok(())
}

/// Records the stacked q/k/v projection of decoding with rope applied (`cpu::norm_matmul` of
/// `w` = q_proj, k_proj and v_proj stacked, then what `rope::record_qkv` does with that output):
/// row `m`'s queries rotated into row `m` of `q`, its keys rotated and its values copied into row
/// `cache_row + m` of `k_cache` and `v_cache`. `table` is `rope::cos_sin` of the `rows`
/// positions. Needs [`supported`]`(ctx, w.cols)`; the same bits as the three dispatches.
#[allow(clippy::too_many_arguments)]
pub fn record_qkv(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    x: &wgpu::Buffer,
    rows: usize,
    norm: &wgpu::Buffer,
    eps: f32,
    w: &GpuTernary,
    table: &wgpu::Buffer,
    q: &wgpu::Buffer,
    k_cache: &wgpu::Buffer,
    v_cache: &wgpu::Buffer,
    cache_row: usize,
    shape: AttentionShape,
) -> Result<()> {
    let mut params = input_params(ctx, x, rows, Some(norm), eps, w)?;
    rope::check_qkv_outputs(table, q, k_cache, v_cache, cache_row, rows, shape)?;
    let AttentionShape {
        heads,
        kv_heads,
        head_dim,
    } = shape;
    let (q_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
    if w.rows != q_width + 2 * kv_width {
        return Err(Error::shape(
            "stacked q/k/v rows",
            q_width + 2 * kv_width,
            w.rows,
        ));
    }
    for out in [q, k_cache, v_cache] {
        check_distinct("norm_matmul", x, out)?;
    }
    if rows == 0 {
        return Ok(());
    }
    params.n = w.rows as u32;
    params.heads = heads as u32;
    params.kv_heads = kv_heads as u32;
    params.half_dim = (head_dim / 2) as u32;
    params.cache_row = rope::cache_row(cache_row)?;
    let params = ctx.uniform("norm_matmul params", &params);
    let half = ROWS / 2;
    let blocks = (heads + kv_heads) * (head_dim / 2).div_ceil(half) + kv_width.div_ceil(ROWS);
    let pipeline = ctx.pipeline(Kernel::NormMatmul, "norm_gemv_rope", &[])?;
    ctx.dispatch(
        pass,
        &pipeline,
        &[
            params.as_entire_binding(),
            x.as_entire_binding(),
            norm.as_entire_binding(),
            w.words.as_entire_binding(),
            w.scales.as_entire_binding(),
            q.as_entire_binding(),
            table.as_entire_binding(),
            k_cache.as_entire_binding(),
            v_cache.as_entire_binding(),
        ],
        groups_for(rows * blocks, 1)?,
    );
    Ok(())
}
