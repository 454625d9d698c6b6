//! Host side of `shaders/sampling.wgsl`: `cpu::sample` on the GPU, so that decoding at a
//! temperature reads back one token, as greedy decoding does, instead of a row of logits.

use crate::cpu::SamplingParams;
use crate::gpu::{GpuContext, Kernel, argmax, check_distinct, check_f32s};
use crate::{Error, Result};

/// Bytes of the result: argmax.wgsl's layout ([`argmax::interpret`] reads it).
pub const RESULT_BYTES: u64 = argmax::RESULT_BYTES;
/// Bytes of a draw buffer ([`draw_word`]).
pub const DRAW_BYTES: u64 = 4;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    count: u32,
    top_k: u32,
    temperature: f32,
    top_p: f32,
}

crate::gpu::shaders::uniforms! {
    Sampling.params = Params { count, top_k, temperature, top_p };
}

/// The word the kernel reads as the draw `u` in `[0, 1)`: `floor(u * 2^32)`.
pub fn draw_word(u: f64) -> u32 {
    (u.clamp(0.0, 1.0) * 4294967296.0).min(u32::MAX as f64) as u32
}

/// Records the token `cpu::sample(&logits[..count], params, u)` chooses into `result`
/// ([`RESULT_BYTES`]; the token first, so `result` can feed the embedding of the next step), for
/// the draw `u` whose [`draw_word`] is in `draw`. [`argmax::interpret`] turns the four words read
/// back into what `cpu::sample` returns.
///
/// The weights are computed in f32 with the GPU's `exp`, and summed exactly in fixed point (40
/// fractional bits, so a candidate weighing less than 2^-40 of the best is never drawn), where
/// the reference uses f64: the token is the reference's unless the draw or the nucleus boundary
/// falls within about 1e-5 of a candidate's edge. Temperature 0 is refused: greedy choices are
/// `argmax::record`'s.
pub fn record(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    logits: &wgpu::Buffer,
    count: usize,
    params: &SamplingParams,
    draw: &wgpu::Buffer,
    result: &wgpu::Buffer,
) -> Result<()> {
    params.check()?;
    if params.temperature == 0.0 {
        return Err(Error::invalid(
            "sampling temperature",
            "0 is greedy: record argmax instead",
        ));
    }
    if count == 0 {
        return Err(Error::Empty("logits"));
    }
    check_f32s("sampling logits", logits, Some(count))?;
    for (what, buffer, bytes) in [
        ("sampling draw bytes", draw, DRAW_BYTES),
        ("sampling result bytes", result, RESULT_BYTES),
    ] {
        if buffer.size() < bytes {
            return Err(Error::shape(what, bytes, buffer.size()));
        }
    }
    check_distinct("sampling", logits, result)?;
    let too_many = |_| Error::invalid("sampling", format!("{count} logits is too many"));
    let params = ctx.uniform(
        "sampling params",
        &Params {
            count: u32::try_from(count).map_err(too_many)?,
            // A cut at or past the vocabulary keeps everyone, as no cut does.
            top_k: u32::try_from(params.top_k).unwrap_or(u32::MAX),
            temperature: params.temperature,
            top_p: params.top_p,
        },
    );
    let weights = ctx.scratch("sampling weights", count as u64 * 8)?;
    let pipeline = ctx.pipeline(Kernel::Sampling, "sample", &[])?;
    ctx.dispatch(
        pass,
        &pipeline,
        &[
            params.as_entire_binding(),
            draw.as_entire_binding(),
            logits.as_entire_binding(),
            weights.as_entire_binding(),
            result.as_entire_binding(),
        ],
        1,
    );
    Ok(())
}
