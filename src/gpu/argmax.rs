//! Host side of `shaders/argmax.wgsl`: `cpu::argmax` on the GPU, so that a decoding step reads
//! back one token instead of a row of logits, and the next step can take its token straight
//! from GPU memory.

use crate::gpu::{GpuContext, Kernel, check_distinct, check_f32s, groups_for};
use crate::{Error, Result};

/// Logits one `argmax_partial` workgroup takes (`CHUNK` in the shader).
const CHUNK: usize = 256 * 8;
/// Bytes of the result: token, first bad id, its bits, whether any token was allowed.
pub const RESULT_BYTES: u64 = 16;
const NONE: u32 = u32::MAX;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    count: u32,
    partials: u32,
    pad: [u32; 2],
}

crate::gpu::shaders::uniforms! {
    Argmax.params = Params { count, partials, pad };
}

/// Records `cpu::argmax(&logits[..count])` into `result` ([`RESULT_BYTES`]; its first word is
/// the token, so `result` can feed the embedding of the next step). [`interpret`] turns the four
/// words read back into what `cpu::argmax` returns.
pub fn record(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    logits: &wgpu::Buffer,
    count: usize,
    result: &wgpu::Buffer,
) -> Result<()> {
    if count == 0 {
        return Err(Error::Empty("logits"));
    }
    check_f32s("argmax logits", logits, Some(count))?;
    if result.size() < RESULT_BYTES {
        return Err(Error::shape(
            "argmax result bytes",
            RESULT_BYTES,
            result.size(),
        ));
    }
    check_distinct("argmax", logits, result)?;
    let partials = count.div_ceil(CHUNK);
    let params = ctx.uniform(
        "argmax params",
        &Params {
            count: u32::try_from(count)
                .map_err(|_| Error::invalid("argmax", format!("{count} logits is too many")))?,
            partials: partials as u32,
            pad: [0; 2],
        },
    );
    let scratch = ctx.scratch("argmax partials", (partials * 16) as u64)?;
    let partial = ctx.pipeline(Kernel::Argmax, "argmax_partial", &[])?;
    ctx.dispatch(
        pass,
        &partial,
        &[
            params.as_entire_binding(),
            scratch.as_entire_binding(),
            logits.as_entire_binding(),
        ],
        groups_for(partials, 1)?,
    );
    let last = ctx.pipeline(Kernel::Argmax, "argmax_final", &[])?;
    ctx.dispatch(
        pass,
        &last,
        &[
            params.as_entire_binding(),
            scratch.as_entire_binding(),
            result.as_entire_binding(),
        ],
        1,
    );
    Ok(())
}

/// What `cpu::argmax` returns, from the four words [`record`] wrote.
pub fn interpret(words: [u32; 4]) -> Result<u32> {
    let [token, bad, bad_bits, allowed] = words;
    if bad != NONE {
        return Err(Error::NonFinite {
            what: "logits",
            row: 0,
            col: bad as usize,
            value: f32::from_bits(bad_bits),
        });
    }
    if allowed == 0 {
        return Err(Error::invalid("logits", "every token is -inf"));
    }
    Ok(token)
}
