//! Host side of `shaders/rope.wgsl`: `cpu::rope`, bit for bit, from a source buffer into rows of a
//! destination (a KV cache, or a query buffer).

use crate::cpu::rope_inv_freq;
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
    pad: [u32; 3],
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
    if head_dim == 0 || !head_dim.is_multiple_of(2) {
        return Err(Error::invalid(
            "rope head_dim",
            format!("{head_dim} is not a positive even number"),
        ));
    }
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
    let inv_freq = rope_inv_freq(head_dim, theta);
    let mut cos_sin = Vec::with_capacity(rows * head_dim);
    for pos in first_position..first_position + rows {
        for &f in &inv_freq {
            let angle = pos as f32 * f;
            cos_sin.extend([angle.cos(), angle.sin()]);
        }
    }
    let table = ctx.upload_shared("rope cos/sin", &cos_sin)?;
    let params = ctx.uniform(
        "rope params",
        &Params {
            rows: rows as u32,
            heads: heads as u32,
            half_dim: (head_dim / 2) as u32,
            dst_row: u32::try_from(dst_row)
                .map_err(|_| Error::invalid("rope dst_row", "overflows u32"))?,
            no_fuse: 0,
            pad: [0; 3],
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
