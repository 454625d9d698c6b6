//! Host side of `shaders/ternary_matmul.wgsl` and its straight-through backward,
//! `shaders/ternary_matmul_backward.wgsl`.

use crate::gpu::{
    GpuActivations, GpuContext, GpuTernary, Kernel, check_distinct, check_f32s, groups_for,
};
use crate::packing::gpu_words;
use crate::{Error, Result};

/// Which kernel computes the product.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MatmulPath {
    /// GEMV for fewer than [`GEMM_MIN_ROWS`] tokens, GEMM otherwise.
    #[default]
    Auto,
    Gemv,
    Gemm,
}

/// Tokens and output rows of one GEMM workgroup (TM and TN in the shader).
const GEMM_TILE: usize = 32;

/// From this many tokens on, `Auto` picks the tiled GEMM.
pub const GEMM_MIN_ROWS: usize = 8;

/// What the kernel writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MatmulOutput {
    /// `acc / (s_x * s_w) + bias`.
    #[default]
    Scaled,
    /// The int32 accumulator as f32, exact because `cols <= MAX_EXACT_ACC_COLS`.
    Accumulator,
    /// `y += acc / (s_x * s_w) + bias`: a residual connection without a separate add.
    AddScaled,
}

/// How [`record`] computes and what it writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MatmulOptions {
    pub path: MatmulPath,
    pub output: MatmulOutput,
}

/// Largest inner dimension for which every accumulator fits f32 exactly (128 * K < 2^24).
pub const MAX_EXACT_ACC_COLS: usize = 1 << 17;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k_words: u32,
    per_channel: u32,
    has_bias: u32,
    pad: [u32; 3],
}

crate::gpu::shaders::uniforms! {
    TernaryMatmul.params = Params { m, n, k_words, per_channel, has_bias, pad };
    TernaryMatmulBackward.params = BackwardParams {
        m, n, k, k_words, per_channel, x_row_words, pad,
    };
}

/// Records `y = x · wᵀ` (`[x.rows, w.rows]`, f32, row-major) into `y`.
pub fn record(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    x: &GpuActivations,
    w: &GpuTernary,
    bias: Option<&wgpu::Buffer>,
    y: &wgpu::Buffer,
    options: MatmulOptions,
) -> Result<()> {
    let MatmulOptions { path, output } = options;
    if x.cols != w.cols {
        return Err(Error::shape(
            "ternary_matmul inner dimension",
            w.cols,
            x.cols,
        ));
    }
    if output == MatmulOutput::Accumulator && x.cols > MAX_EXACT_ACC_COLS {
        return Err(Error::invalid(
            "accumulator output",
            format!("{} columns exceed {MAX_EXACT_ACC_COLS}", x.cols),
        ));
    }
    let out_bytes = (x.rows * w.rows * 4) as u64;
    if y.size() < out_bytes {
        return Err(Error::shape(
            "ternary_matmul output bytes",
            out_bytes,
            y.size(),
        ));
    }
    if let Some(b) = bias
        && b.size() < (w.rows * 4) as u64
    {
        return Err(Error::shape("bias bytes", w.rows * 4, b.size()));
    }
    if x.rows == 0 {
        return Ok(());
    }
    let params = ctx.uniform(
        "matmul params",
        &Params {
            m: x.rows as u32,
            n: w.rows as u32,
            k_words: gpu_words::words_per_row(w.cols) as u32,
            per_channel: w.per_channel as u32,
            has_bias: bias.is_some() as u32,
            pad: [0; 3],
        },
    );
    let gemm = match path {
        MatmulPath::Auto => x.rows >= GEMM_MIN_ROWS,
        MatmulPath::Gemv => false,
        MatmulPath::Gemm => true,
    };
    let (entry, groups) = if gemm {
        (
            "gemm",
            x.rows.div_ceil(GEMM_TILE) * w.rows.div_ceil(GEMM_TILE),
        )
    } else {
        ("gemv", x.rows * w.rows.div_ceil(4))
    };
    let constants = [
        ("ACC_ONLY", (output == MatmulOutput::Accumulator) as u64),
        ("ADD_TO_Y", (output == MatmulOutput::AddScaled) as u64),
    ];
    let pipeline = ctx.pipeline(Kernel::TernaryMatmul, entry, &constants)?;
    // The shader reads bias only when has_bias is set; any buffer fills the binding otherwise.
    let bias = bias.unwrap_or(&w.scales);
    ctx.dispatch(
        pass,
        &pipeline,
        &[
            params.as_entire_binding(),
            x.codes.as_entire_binding(),
            x.scales.as_entire_binding(),
            x.sums.as_entire_binding(),
            w.words.as_entire_binding(),
            w.scales.as_entire_binding(),
            bias.as_entire_binding(),
            y.as_entire_binding(),
        ],
        groups_for(groups, 1)?,
    );
    Ok(())
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct BackwardParams {
    m: u32,
    n: u32,
    k: u32,
    k_words: u32,
    per_channel: u32,
    x_row_words: u32,
    pad: [u32; 2],
}

/// Weight words (16 columns each) per `ternary_dx` workgroup, and its tokens.
const DX_WORDS: usize = 64;
const DX_TOKENS: usize = 4;
/// Output rows and columns of one `ternary_dw` workgroup.
const DW_TILE: usize = 32;

fn backward_params(
    ctx: &GpuContext,
    m: usize,
    w: &GpuTernary,
    dy: &wgpu::Buffer,
) -> Result<wgpu::Buffer> {
    check_f32s("ternary_matmul_backward dy", dy, m.checked_mul(w.rows))?;
    if w.cols == 0 {
        return Err(Error::Empty("ternary matmul inner dimension"));
    }
    Ok(ctx.uniform(
        "matmul backward params",
        &BackwardParams {
            m: m as u32,
            n: w.rows as u32,
            k: w.cols as u32,
            k_words: gpu_words::words_per_row(w.cols) as u32,
            per_channel: w.per_channel as u32,
            x_row_words: GpuActivations::row_words(w.cols) as u32,
            pad: [0; 2],
        },
    ))
}

/// Records the straight-through input gradient of [`record`] (`cpu::ternary_matmul_backward`'s
/// `dx`): `dx = dy · Ŵ` with `Ŵ = codes / sw` read from the packed words, adds and subtracts only.
/// `dy` holds `[rows, w.rows]` f32 and `dx` receives `[rows, w.cols]` (row-major).
pub fn record_dx(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    rows: usize,
    w: &GpuTernary,
    dy: &wgpu::Buffer,
    dx: &wgpu::Buffer,
) -> Result<()> {
    let params = backward_params(ctx, rows, w, dy)?;
    check_f32s("ternary_matmul_backward dx", dx, rows.checked_mul(w.cols))?;
    check_distinct("ternary_matmul_backward", dy, dx)?;
    if rows == 0 {
        return Ok(());
    }
    let words = gpu_words::words_per_row(w.cols);
    let groups = rows.div_ceil(DX_TOKENS) * words.div_ceil(DX_WORDS);
    let pipeline = ctx.pipeline(Kernel::TernaryMatmulBackward, "ternary_dx", &[])?;
    ctx.dispatch(
        pass,
        &pipeline,
        &[
            params.as_entire_binding(),
            dy.as_entire_binding(),
            w.words.as_entire_binding(),
            w.scales.as_entire_binding(),
            dx.as_entire_binding(),
        ],
        groups_for(groups, 1)?,
    );
    Ok(())
}

/// Records the straight-through weight gradient of [`record`] (`cpu::ternary_matmul_backward`'s
/// `dw`): `dw = dyᵀ · x̂` in f32 over the `x.rows` tokens, `x̂ = codes / sx` the dequantized
/// activations the forward multiplied. `dy` holds `[x.rows, n]` f32 and `dw` receives `[n, x.cols]`,
/// the latent weights' shape. A token whose scale is NaN (non-finite input) gives NaN gradients.
pub fn record_dw(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    x: &GpuActivations,
    n: usize,
    dy: &wgpu::Buffer,
    dw: &wgpu::Buffer,
) -> Result<()> {
    if x.cols == 0 {
        return Err(Error::Empty("ternary matmul inner dimension"));
    }
    check_f32s("ternary_matmul_backward dy", dy, x.rows.checked_mul(n))?;
    check_f32s("ternary_matmul_backward dw", dw, n.checked_mul(x.cols))?;
    check_distinct("ternary_matmul_backward", dy, dw)?;
    let params = ctx.uniform(
        "matmul backward params",
        &BackwardParams {
            m: x.rows as u32,
            n: n as u32,
            k: x.cols as u32,
            k_words: gpu_words::words_per_row(x.cols) as u32,
            per_channel: 0,
            x_row_words: GpuActivations::row_words(x.cols) as u32,
            pad: [0; 2],
        },
    );
    if n == 0 {
        return Ok(());
    }
    let groups = n.div_ceil(DW_TILE) * x.cols.div_ceil(DW_TILE);
    let pipeline = ctx.pipeline(Kernel::TernaryMatmulBackward, "ternary_dw", &[])?;
    ctx.dispatch(
        pass,
        &pipeline,
        &[
            params.as_entire_binding(),
            dy.as_entire_binding(),
            x.codes.as_entire_binding(),
            x.scales.as_entire_binding(),
            dw.as_entire_binding(),
        ],
        groups_for(groups, 1)?,
    );
    Ok(())
}
