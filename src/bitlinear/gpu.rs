//! A [`BitLinear`] resident on the GPU.

use super::{BitLinear, check_input};
use crate::gpu::{self, GpuActivations, GpuContext, GpuTernary, MatmulOptions};
use crate::{Error, Result};

/// A [`BitLinear`] whose packed weights, scales and bias live on one GPU (uploaded once by
/// [`BitLinear::to_gpu`]); only activations travel per call.
pub struct GpuBitLinear {
    weights: GpuTernary,
    bias: Option<wgpu::Buffer>,
}

impl GpuBitLinear {
    pub(super) fn upload(ctx: &GpuContext, layer: &BitLinear) -> Result<Self> {
        let weights = GpuTernary::upload(ctx, layer.packed())?;
        let bias = layer
            .bias()
            .map(|b| ctx.upload("bitlinear bias", b))
            .transpose()?;
        Ok(GpuBitLinear { weights, bias })
    }

    pub fn in_features(&self) -> usize {
        self.weights.cols
    }

    pub fn out_features(&self) -> usize {
        self.weights.rows
    }

    /// The packed weights and scales, for kernels that take them directly.
    pub fn weights(&self) -> &GpuTernary {
        &self.weights
    }

    /// `y = BitLinear(x)` for `rows` tokens: one upload, one submit, one readback.
    ///
    /// Checks `x` on the host first, so a NaN or infinity is an [`Error::NonFinite`] exactly as in
    /// [`BitLinear::forward_cpu`]. Awaits without blocking, so it runs in the browser too.
    pub async fn forward(&self, ctx: &GpuContext, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        check_input(x, rows, self.in_features())?;
        if rows == 0 {
            return Ok(Vec::new());
        }
        let input = ctx.upload("bitlinear input", x)?;
        let acts = GpuActivations::new(ctx, rows, self.in_features())?;
        let out_len = rows * self.out_features();
        let y = ctx.storage("bitlinear output", out_len as u64 * 4)?;
        let mut encoder = ctx
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                label: Some("bitlinear forward"),
            });
        let mut pass = encoder.begin_compute_pass(&Default::default());
        self.record(ctx, &mut pass, &input, &acts, &y)?;
        drop(pass);
        ctx.queue.submit([encoder.finish()]);
        ctx.read(&y, out_len).await
    }

    /// Records the quantization of `x` (`[acts.rows, in_features]` f32) into `acts` and the
    /// product into `y` (`[acts.rows, out_features]` f32), for callers that chain layers and read
    /// back only at the end.
    ///
    /// Nothing is checked on the values here (that would need a readback): a token whose row of
    /// `x` holds a NaN or infinity gets an activation scale of NaN, so its row of `y` is all NaN,
    /// and the other tokens are unaffected.
    pub fn record(
        &self,
        ctx: &GpuContext,
        pass: &mut wgpu::ComputePass<'_>,
        x: &wgpu::Buffer,
        acts: &GpuActivations,
        y: &wgpu::Buffer,
    ) -> Result<()> {
        if acts.cols != self.in_features() {
            return Err(Error::shape(
                "BitLinear activation columns",
                self.in_features(),
                acts.cols,
            ));
        }
        gpu::act_quant::record(ctx, pass, x, acts)?;
        gpu::ternary_matmul::record(
            ctx,
            pass,
            acts,
            &self.weights,
            self.bias.as_ref(),
            y,
            MatmulOptions::default(),
        )
    }
}
