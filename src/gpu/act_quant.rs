//! Host side of `shaders/act_quant.wgsl`.

use crate::cpu::QuantizedActivations;
use crate::gpu::{GpuContext, Kernel, groups_for};
use crate::packing::gpu_words;
use crate::{Error, Result};

/// Int8 activations on the GPU: codes packed four per u32, rows padded to whole weight words
/// (16 columns), one scale and one code sum per row.
pub struct GpuActivations {
    pub rows: usize,
    pub cols: usize,
    pub codes: wgpu::Buffer,
    pub scales: wgpu::Buffer,
    pub sums: wgpu::Buffer,
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    cols: u32,
    row_words: u32,
    pad: u32,
}

crate::gpu::shaders::uniforms! {
    ActQuant.params = Params { rows, cols, row_words, pad };
}

impl GpuActivations {
    /// Room for `rows x cols` quantized activations.
    pub fn new(ctx: &GpuContext, rows: usize, cols: usize) -> Result<Self> {
        if cols == 0 {
            return Err(Error::Empty("activation rows"));
        }
        let words = rows * Self::row_words(cols);
        Ok(GpuActivations {
            rows,
            cols,
            codes: ctx.storage("activation codes", words as u64 * 4)?,
            scales: ctx.storage("activation scales", rows as u64 * 4)?,
            sums: ctx.storage("activation sums", rows as u64 * 4)?,
        })
    }

    /// u32 words per row: four per 16-column weight word.
    pub fn row_words(cols: usize) -> usize {
        4 * gpu_words::words_per_row(cols)
    }

    /// Reads the activations back into the CPU reference's type.
    pub async fn read(&self, ctx: &GpuContext) -> Result<QuantizedActivations> {
        let row_words = Self::row_words(self.cols);
        let words: Vec<u32> = ctx.read(&self.codes, self.rows * row_words).await?;
        let scales: Vec<f32> = ctx.read(&self.scales, self.rows).await?;
        let sums: Vec<i32> = ctx.read(&self.sums, self.rows).await?;
        let mut codes = Vec::with_capacity(self.rows * self.cols);
        for row in words.chunks(row_words.max(1)).take(self.rows) {
            let bytes: &[u8] = bytemuck::cast_slice(row);
            codes.extend(bytes[..self.cols].iter().map(|&b| b as i8));
        }
        Ok(QuantizedActivations {
            rows: self.rows,
            cols: self.cols,
            codes,
            scales,
            sums,
        })
    }
}

/// Records the quantization of `x` (f32, `out.rows x out.cols`, row-major) into `out`.
pub fn record(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    x: &wgpu::Buffer,
    out: &GpuActivations,
) -> Result<()> {
    let needed = (out.rows * out.cols * 4) as u64;
    if x.size() < needed {
        return Err(Error::shape("act_quant input bytes", needed, x.size()));
    }
    if out.rows == 0 {
        return Ok(());
    }
    let params = ctx.uniform(
        "act_quant params",
        &Params {
            rows: out.rows as u32,
            cols: out.cols as u32,
            row_words: GpuActivations::row_words(out.cols) as u32,
            pad: 0,
        },
    );
    let pipeline = ctx.pipeline(Kernel::ActQuant, "act_quant", &[])?;
    ctx.dispatch(
        pass,
        &pipeline,
        &[
            params.as_entire_binding(),
            x.as_entire_binding(),
            out.codes.as_entire_binding(),
            out.scales.as_entire_binding(),
            out.sums.as_entire_binding(),
        ],
        groups_for(out.rows, 1)?,
    );
    Ok(())
}
