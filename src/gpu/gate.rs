//! Host side of the MLP's gates, `act(gate) * up` on the fused gate/up matmul output:
//! `shaders/relu2_gate.wgsl` (`cpu::relu2_gate`) and `shaders/silu_gate.wgsl`
//! (`cpu::silu_gate`), each also fused with `cpu::act_quant`, and their gradients
//! (`shaders/relu2_gate_backward.wgsl`, `shaders/silu_gate_backward.wgsl`). Both kernels of a
//! kind bind alike; the [`Activation`] picks the file.

use crate::gpu::{GpuActivations, GpuContext, Kernel, check_distinct, check_f32s, groups_for};
use crate::model::Activation;
use crate::{Error, Result};

const WG: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    inter: u32,
    row_words: u32,
    pad: u32,
}

crate::gpu::shaders::uniforms! {
    Relu2Gate.params = Params { rows, inter, row_words, pad };
    Relu2GateBackward.params = Params { rows, inter, row_words, pad };
    SiluGate.params = Params { rows, inter, row_words, pad };
    SiluGateBackward.params = Params { rows, inter, row_words, pad };
}

/// The forward kernel of `activation` and its entry points: the gate, and the gate quantized.
fn forward(activation: Activation) -> (Kernel, &'static str, &'static str) {
    match activation {
        Activation::Relu2 => (Kernel::Relu2Gate, "relu2_gate", "relu2_gate_quant"),
        Activation::Silu => (Kernel::SiluGate, "silu_gate", "silu_gate_quant"),
    }
}

fn params(
    ctx: &GpuContext,
    gate_up: &wgpu::Buffer,
    rows: usize,
    inter: usize,
) -> Result<wgpu::Buffer> {
    if inter == 0 {
        return Err(Error::Empty("gate row"));
    }
    check_f32s(
        "gate gate_up",
        gate_up,
        rows.checked_mul(inter).and_then(|n| n.checked_mul(2)),
    )?;
    Ok(ctx.uniform(
        "gate params",
        &Params {
            rows: rows as u32,
            inter: inter as u32,
            row_words: GpuActivations::row_words(inter) as u32,
            pad: 0,
        },
    ))
}

/// Records `out[r, i] = act(gate_up[r, i]) * gate_up[r, inter + i]`, i.e. `activation.gate` of
/// the two halves of each row of `gate_up` (`[rows, 2 * inter]` f32, gate first, as the fused
/// gate/up matmul writes it) into a different buffer `out` (`[rows, inter]` f32). relu² is
/// bit-exact where no intermediate is subnormal (a GPU may flush those to zero); SiLU is within
/// a few ulp (WGSL's `exp` and division are not correctly rounded).
#[allow(clippy::too_many_arguments)]
pub fn record(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    activation: Activation,
    gate_up: &wgpu::Buffer,
    out: &wgpu::Buffer,
    rows: usize,
    inter: usize,
) -> Result<()> {
    let params = params(ctx, gate_up, rows, inter)?;
    check_f32s("gate output", out, rows.checked_mul(inter))?;
    check_distinct("gate", gate_up, out)?;
    if rows == 0 {
        return Ok(());
    }
    let (kernel, entry, _) = forward(activation);
    let pipeline = ctx.pipeline(kernel, entry, &[])?;
    ctx.dispatch(
        pass,
        &pipeline,
        &[
            params.as_entire_binding(),
            gate_up.as_entire_binding(),
            out.as_entire_binding(),
        ],
        groups_for(rows * inter, WG)?,
    );
    Ok(())
}

/// Records `acts = cpu::act_quant(activation.gate(..))` of `gate_up` (`[acts.rows, 2 *
/// acts.cols]` f32, laid out as for [`record`]) without writing the gated values anywhere: the
/// codes of what [`record`] writes, bit for bit.
pub fn record_quant(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    activation: Activation,
    gate_up: &wgpu::Buffer,
    acts: &GpuActivations,
) -> Result<()> {
    let params = params(ctx, gate_up, acts.rows, acts.cols)?;
    if acts.rows == 0 {
        return Ok(());
    }
    let (kernel, _, entry) = forward(activation);
    let pipeline = ctx.pipeline(kernel, entry, &[])?;
    ctx.dispatch(
        pass,
        &pipeline,
        &[
            params.as_entire_binding(),
            gate_up.as_entire_binding(),
            acts.codes.as_entire_binding(),
            acts.scales.as_entire_binding(),
            acts.sums.as_entire_binding(),
        ],
        groups_for(acts.rows, 1)?,
    );
    Ok(())
}

/// Records the gradients of [`record`] (`activation.gate_backward`) for the upstream gradient
/// `dy` (`[rows, inter]` f32) into `d_gate_up` (`[rows, 2 * inter]`, gate first, the layout of
/// `gate_up` and of the fused gate/up matmul's output); relu²'s bit for bit where no
/// intermediate is subnormal, SiLU's within a few ulp. `d_gate_up` must differ from both inputs.
#[allow(clippy::too_many_arguments)]
pub fn record_backward(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    activation: Activation,
    gate_up: &wgpu::Buffer,
    dy: &wgpu::Buffer,
    d_gate_up: &wgpu::Buffer,
    rows: usize,
    inter: usize,
) -> Result<()> {
    let params = params(ctx, gate_up, rows, inter)?;
    check_f32s("gate_backward dy", dy, rows.checked_mul(inter))?;
    check_f32s(
        "gate_backward d_gate_up",
        d_gate_up,
        rows.checked_mul(inter).and_then(|n| n.checked_mul(2)),
    )?;
    check_distinct("gate_backward", gate_up, d_gate_up)?;
    check_distinct("gate_backward", dy, d_gate_up)?;
    if rows == 0 {
        return Ok(());
    }
    let (kernel, entry) = match activation {
        Activation::Relu2 => (Kernel::Relu2GateBackward, "relu2_gate_backward"),
        Activation::Silu => (Kernel::SiluGateBackward, "silu_gate_backward"),
    };
    let pipeline = ctx.pipeline(kernel, entry, &[])?;
    ctx.dispatch(
        pass,
        &pipeline,
        &[
            params.as_entire_binding(),
            gate_up.as_entire_binding(),
            dy.as_entire_binding(),
            d_gate_up.as_entire_binding(),
        ],
        groups_for(rows * inter, WG)?,
    );
    Ok(())
}
