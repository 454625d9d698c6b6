//! Host side of `shaders/ternary_pack.wgsl`: f32 weights on the GPU to packed ternary words and
//! absmean scales, without leaving the GPU (the trainer re-derives its codes after every step).

use crate::cpu::{PackedTernary, ScaleGranularity, WeightQuantOptions};
use crate::gpu::{GpuContext, Kernel, check_f32s, groups_for};
use crate::packing::gpu_words;
use crate::{Error, Result};

/// Ternary weights on the GPU in the private layout, with their scale(s).
pub struct GpuTernary {
    pub rows: usize,
    pub cols: usize,
    pub per_channel: bool,
    pub words: wgpu::Buffer,
    pub scales: wgpu::Buffer,
}

impl GpuTernary {
    /// Uploads weights packed on the CPU.
    pub fn upload(ctx: &GpuContext, packed: &PackedTernary) -> Result<Self> {
        let per_channel = packed.scales.len() != 1;
        let expected = packed.rows * gpu_words::words_per_row(packed.cols);
        if packed.words.len() != expected {
            return Err(Error::shape(
                "packed ternary words",
                expected,
                packed.words.len(),
            ));
        }
        if packed.scales.len() != 1 && packed.scales.len() != packed.rows {
            return Err(Error::shape(
                "ternary scales",
                format!("1 or {}", packed.rows),
                packed.scales.len(),
            ));
        }
        Ok(GpuTernary {
            rows: packed.rows,
            cols: packed.cols,
            per_channel,
            words: ctx.upload("ternary words", &packed.words)?,
            scales: ctx.upload("ternary scales", &packed.scales)?,
        })
    }

    /// Number of scales stored: one per tensor or one per row.
    pub fn scale_count(&self) -> usize {
        if self.per_channel { self.rows } else { 1 }
    }

    /// Reads the packed weights back.
    pub async fn read(&self, ctx: &GpuContext) -> Result<PackedTernary> {
        let words = ctx
            .read(&self.words, self.rows * gpu_words::words_per_row(self.cols))
            .await?;
        let scales = ctx.read(&self.scales, self.scale_count()).await?;
        Ok(PackedTernary {
            rows: self.rows,
            cols: self.cols,
            words,
            scales,
        })
    }
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ReduceParams {
    seg_len: u32,
    segments: u32,
    blocks: u32,
    take_abs: u32,
}

crate::gpu::shaders::uniforms! {
    TernaryPack.reduce_params = ReduceParams { seg_len, segments, blocks, take_abs };
    TernaryPack.scale_params = ScaleParams { segments, count, pad };
    TernaryPack.pack_params = PackParams { rows, cols, k_words, per_channel, threshold, pad };
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ScaleParams {
    segments: u32,
    count: f32,
    pad: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct PackParams {
    rows: u32,
    cols: u32,
    k_words: u32,
    per_channel: u32,
    threshold: f32,
    pad: [u32; 3],
}

const BLOCK: usize = 1024;
const WG: usize = 256;

fn check_input(rows: usize, cols: usize, len: usize, opts: &WeightQuantOptions) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Err(Error::Empty("weight matrix"));
    }
    if len != rows * cols {
        return Err(Error::shape("weights", format!("{rows} x {cols}"), len));
    }
    if !opts.threshold.is_finite() || opts.threshold < 0.0 {
        return Err(Error::invalid("threshold", opts.threshold));
    }
    Ok(())
}

/// Records quantization and packing of finite f32 weights already on the GPU.
pub fn record_from_buffer(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    weights: &wgpu::Buffer,
    rows: usize,
    cols: usize,
    opts: WeightQuantOptions,
) -> Result<GpuTernary> {
    check_input(rows, cols, rows * cols, &opts)?;
    let per_channel = opts.granularity == ScaleGranularity::PerChannel;
    let segments = if per_channel { rows } else { 1 };
    let k_words = gpu_words::words_per_row(cols);
    let out = GpuTernary {
        rows,
        cols,
        per_channel,
        words: ctx.storage("ternary words", (rows * k_words) as u64 * 4)?,
        scales: ctx.storage("ternary scales", segments as u64 * 4)?,
    };
    record_into(ctx, pass, weights, &out, opts)?;
    Ok(out)
}

/// Records quantization and packing of finite f32 weights already on the GPU (`[out.rows,
/// out.cols]`) into the buffers of `out`, whose granularity must be `opts`': re-deriving the
/// ternary codes of weights that an optimizer changed, with no allocation but the reduction's
/// reused scratch.
pub fn record_into(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    weights: &wgpu::Buffer,
    out: &GpuTernary,
    opts: WeightQuantOptions,
) -> Result<()> {
    let (rows, cols) = (out.rows, out.cols);
    check_input(rows, cols, rows * cols, &opts)?;
    if weights.size() < (rows * cols * 4) as u64 {
        return Err(Error::shape(
            "weight buffer bytes",
            rows * cols * 4,
            weights.size(),
        ));
    }
    let per_channel = opts.granularity == ScaleGranularity::PerChannel;
    if per_channel != out.per_channel {
        return Err(Error::invalid(
            "ternary_pack",
            "the scale granularity differs from the target's",
        ));
    }
    let (segments, seg_len) = if per_channel {
        (rows, cols)
    } else {
        (1, rows * cols)
    };
    let k_words = gpu_words::words_per_row(cols);
    check_f32s("ternary scales", &out.scales, Some(segments))?;
    check_f32s("ternary words", &out.words, rows.checked_mul(k_words))?;

    // Sum |w| per segment, level by level, exactly as cpu::tree_sum orders it. Each level's
    // sums are smaller than the last's, so the scratch buffers of one reduction never coincide.
    let reduce = ctx.pipeline(Kernel::TernaryPack, "reduce_sum", &[])?;
    let mut src: Option<wgpu::Buffer> = None;
    let mut len = seg_len;
    let mut take_abs = 1;
    loop {
        let blocks = len.div_ceil(BLOCK);
        let dst = ctx.scratch("weight sums", (segments * blocks) as u64 * 4)?;
        let params = ctx.uniform(
            "reduce params",
            &ReduceParams {
                seg_len: len as u32,
                segments: segments as u32,
                blocks: blocks as u32,
                take_abs,
            },
        );
        let input = src.as_ref().unwrap_or(weights);
        ctx.dispatch(
            pass,
            &reduce,
            &[
                params.as_entire_binding(),
                input.as_entire_binding(),
                dst.as_entire_binding(),
            ],
            groups_for(segments * blocks, 1)?,
        );
        src = Some(dst);
        take_abs = 0;
        if blocks == 1 {
            break;
        }
        len = blocks;
    }
    let sums = src.expect("the loop runs at least once");

    let params = ctx.uniform(
        "scale params",
        &ScaleParams {
            segments: segments as u32,
            count: seg_len as f32,
            pad: [0; 2],
        },
    );
    let pipeline = ctx.pipeline(Kernel::TernaryPack, "finish_scales", &[])?;
    ctx.dispatch(
        pass,
        &pipeline,
        &[
            params.as_entire_binding(),
            sums.as_entire_binding(),
            out.scales.as_entire_binding(),
        ],
        groups_for(segments, WG)?,
    );

    let params = ctx.uniform(
        "pack params",
        &PackParams {
            rows: rows as u32,
            cols: cols as u32,
            k_words: k_words as u32,
            per_channel: per_channel as u32,
            threshold: opts.threshold,
            pad: [0; 3],
        },
    );
    let pipeline = ctx.pipeline(Kernel::TernaryPack, "pack_words", &[])?;
    ctx.dispatch(
        pass,
        &pipeline,
        &[
            params.as_entire_binding(),
            weights.as_entire_binding(),
            out.scales.as_entire_binding(),
            out.words.as_entire_binding(),
        ],
        groups_for(rows * k_words, WG)?,
    );
    Ok(())
}
