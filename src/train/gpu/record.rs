//! One window's forward, loss and backward, recorded into a compute pass: the operations of
//! `TrainModel::forward` and `TrainModel::backward` in the same order, each by the kernel that
//! is its twin, with every weight gradient added into the step's sums.

use super::state::{GpuParams, Linear, Piece};
use super::tape::{Tape, first_rows};
use crate::Result;
use crate::gpu::elementwise::{Columns, add_rows, copy_block, copy_rows};
use crate::gpu::{
    GpuActivations, GpuContext, MatmulOptions, MatmulOutput, act_quant, attention, embedding, gate,
    lm_head, nll, rmsnorm, rope, ternary_matmul,
};
use crate::model::ModelConfig;
use crate::train::forward::attention_shape;

/// Where one window's inputs and losses live.
pub(super) struct Window<'a> {
    /// The window's tokens: the first `rows` are read, the next `rows` from the second on are
    /// the targets.
    pub tokens: &'a wgpu::Buffer,
    /// Predictions: the window's length less one (the last token predicts nothing, so it is not
    /// run at all; its gradients would be zero).
    pub rows: usize,
    pub losses: &'a wgpu::Buffer,
    pub loss_offset: usize,
    /// `1 / predictions of the whole batch`: the gradient of the batch's mean loss.
    pub grad_scale: f32,
}

fn matmul(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    x: &GpuActivations,
    w: &Linear,
    y: &wgpu::Buffer,
    output: MatmulOutput,
) -> Result<()> {
    let options = MatmulOptions {
        output,
        ..Default::default()
    };
    ternary_matmul::record(ctx, pass, x, &w.packed, None, y, options)
}

/// Adds the weight gradient of one window, in `from`, into the step's sum.
fn add_grad(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    from: &wgpu::Buffer,
    piece: &Piece,
) -> Result<()> {
    add_rows(ctx, pass, from, 0, &piece.grad, 0, 1, piece.len)
}

/// The straight-through gradients of `y = x̂ · Ŵᵀ` for `dy`: `dx` written, `dW` added to the
/// linear's gradient.
#[allow(clippy::too_many_arguments)]
fn linear_backward(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    x: &GpuActivations,
    w: &Linear,
    dy: &wgpu::Buffer,
    dx: &wgpu::Buffer,
    dw: &wgpu::Buffer,
) -> Result<()> {
    ternary_matmul::record_dx(ctx, pass, x.rows, &w.packed, dy, dx)?;
    ternary_matmul::record_dw(ctx, pass, x, w.packed.rows, dy, dw)?;
    add_grad(ctx, pass, dw, &w.piece)
}

/// The gradients of `rmsnorm(x) * weight` for `dy`: `dx` written, the weight's added in.
#[allow(clippy::too_many_arguments)]
fn norm_backward(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    x: &wgpu::Buffer,
    weight: &Piece,
    dy: &wgpu::Buffer,
    dx: &wgpu::Buffer,
    dweight: &wgpu::Buffer,
    rows: usize,
    eps: f32,
) -> Result<()> {
    rmsnorm::record_backward(
        ctx, pass, x, &weight.w, dy, dx, dweight, rows, weight.len, eps,
    )?;
    add_grad(ctx, pass, dweight, weight)
}

/// Records one window: forward, loss, and the backward adding its gradients to the pieces'.
pub(super) fn record_window(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    c: &ModelConfig,
    p: &GpuParams,
    t: &Tape,
    window: &Window,
) -> Result<()> {
    let n = window.rows;
    let (hidden, inter, vocab, eps, theta) = (
        c.hidden_size,
        c.intermediate_size,
        c.vocab_size,
        c.rms_norm_eps,
        c.rope_theta,
    );
    let activation = c.family.activation();
    let shape = attention_shape(c);
    let (heads, kv_heads, head_dim) = (shape.heads, shape.kv_heads, shape.head_dim);
    let gate_half = Columns {
        stride: 2 * inter,
        col: 0,
    };
    let up_half = Columns {
        stride: 2 * inter,
        col: inter,
    };
    let alone = Columns {
        stride: inter,
        col: 0,
    };
    let (scaled, add) = (MatmulOutput::Scaled, MatmulOutput::AddScaled);

    embedding::record(ctx, pass, &p.embed.table, window.tokens, &t.xs[0], n)?;
    for (i, (l, s)) in p.layers.iter().zip(&t.layers).enumerate() {
        let (x, x_out) = (&t.xs[i], &t.xs[i + 1]);
        let attn_in = first_rows(&s.attn_in, n);
        rmsnorm::record_quant(ctx, pass, x, &l.input_layernorm.w, &attn_in, eps)?;
        matmul(ctx, pass, &attn_in, &l.q, &t.q_lin, scaled)?;
        matmul(ctx, pass, &attn_in, &l.k, &t.k_lin, scaled)?;
        matmul(ctx, pass, &attn_in, &l.v, &s.v, scaled)?;
        rope::record(ctx, pass, &t.q_lin, &s.q, 0, n, heads, head_dim, theta, 0)?;
        rope::record(
            ctx, pass, &t.k_lin, &s.k, 0, n, kv_heads, head_dim, theta, 0,
        )?;
        attention::record(ctx, pass, &s.q, &s.k, &s.v, &s.attn, n, n, shape)?;
        let o_in = first_rows(&s.o_in, n);
        match &l.attn_sub_norm {
            Some(norm) => rmsnorm::record_quant(ctx, pass, &s.attn, &norm.w, &o_in, eps)?,
            None => act_quant::record(ctx, pass, &s.attn, &o_in)?,
        }
        copy_rows(ctx, pass, x, 0, &s.x_mid, 0, n, hidden)?;
        matmul(ctx, pass, &o_in, &l.o, &s.x_mid, add)?;

        let mlp_in = first_rows(&s.mlp_in, n);
        rmsnorm::record_quant(
            ctx,
            pass,
            &s.x_mid,
            &l.post_attention_layernorm.w,
            &mlp_in,
            eps,
        )?;
        matmul(ctx, pass, &mlp_in, &l.gate, &t.gate, scaled)?;
        matmul(ctx, pass, &mlp_in, &l.up, &t.up, scaled)?;
        copy_block(ctx, pass, &t.gate, alone, &s.gate_up, gate_half, n, inter)?;
        copy_block(ctx, pass, &t.up, alone, &s.gate_up, up_half, n, inter)?;
        let down_in = first_rows(&s.down_in, n);
        // The tape keeps the gated product exactly where the family has an ffn_sub_norm.
        match l.ffn_sub_norm.as_ref().zip(s.gated.as_ref()) {
            Some((norm, gated)) => {
                gate::record(ctx, pass, activation, &s.gate_up, gated, n, inter)?;
                rmsnorm::record_quant(ctx, pass, gated, &norm.w, &down_in, eps)?;
            }
            None => gate::record_quant(ctx, pass, activation, &s.gate_up, &down_in)?,
        }
        copy_rows(ctx, pass, &s.x_mid, 0, x_out, 0, n, hidden)?;
        matmul(ctx, pass, &down_in, &l.down, x_out, add)?;
    }
    let x_last = &t.xs[p.layers.len()];
    rmsnorm::record(ctx, pass, x_last, &p.norm.w, &t.normed, n, hidden, eps)?;
    let head = p.lm_head.as_ref().unwrap_or(&p.embed);
    lm_head::record(ctx, pass, &t.normed, &head.table, &t.logits, n)?;
    nll::record_cross_entropy(
        ctx,
        pass,
        &t.logits,
        n,
        vocab,
        window.tokens,
        1,
        window.losses,
        window.loss_offset,
        window.grad_scale,
    )?;

    // Backward. `t.logits` now holds the gradient of the batch's mean loss wrt the logits.
    lm_head::record_backward(
        ctx,
        pass,
        &t.normed,
        &head.table,
        &t.logits,
        &t.dnormed,
        &head.grad,
        n,
        true,
    )?;
    norm_backward(
        ctx, pass, x_last, &p.norm, &t.dnormed, &t.dx, &t.dnorm, n, eps,
    )?;
    // RoPE's cos/sin of the window's positions, built once for every layer.
    let table = rope::cos_sin(ctx, 0, n, head_dim, theta)?;
    for (i, (l, s)) in p.layers.iter().zip(&t.layers).enumerate().rev() {
        // `t.dx` is the gradient wrt the layer's output.
        // `t.d_gated` receives the gradient wrt the gated product: through ffn_sub_norm's
        // backward, or straight from down_proj's where there is no sub-norm.
        let down_in = first_rows(&s.down_in, n);
        let ffn_sub_norm = l.ffn_sub_norm.as_ref().zip(s.gated.as_ref());
        let d_down_in = if ffn_sub_norm.is_some() {
            &t.d_inter
        } else {
            &t.d_gated
        };
        linear_backward(ctx, pass, &down_in, &l.down, &t.dx, d_down_in, &t.dw)?;
        if let Some((norm, gated)) = ffn_sub_norm {
            norm_backward(
                ctx, pass, gated, norm, &t.d_inter, &t.d_gated, &t.dnorm, n, eps,
            )?;
        }
        gate::record_backward(
            ctx,
            pass,
            activation,
            &s.gate_up,
            &t.d_gated,
            &t.d_gate_up,
            n,
            inter,
        )?;
        let mlp_in = first_rows(&s.mlp_in, n);
        copy_block(
            ctx,
            pass,
            &t.d_gate_up,
            gate_half,
            &t.d_inter,
            alone,
            n,
            inter,
        )?;
        linear_backward(ctx, pass, &mlp_in, &l.gate, &t.d_inter, &t.dh, &t.dw)?;
        copy_block(
            ctx,
            pass,
            &t.d_gate_up,
            up_half,
            &t.d_gated,
            alone,
            n,
            inter,
        )?;
        linear_backward(ctx, pass, &mlp_in, &l.up, &t.d_gated, &t.dh2, &t.dw)?;
        add_rows(ctx, pass, &t.dh2, 0, &t.dh, 0, n, hidden)?;
        norm_backward(
            ctx,
            pass,
            &s.x_mid,
            &l.post_attention_layernorm,
            &t.dh,
            &t.dh2,
            &t.dnorm,
            n,
            eps,
        )?;
        add_rows(ctx, pass, &t.dh2, 0, &t.dx, 0, n, hidden)?;

        // `t.dx` is the gradient wrt the residual stream after the attention block.
        // `t.d_attn2` receives the gradient wrt the attention output, as `t.d_gated` above.
        let o_in = first_rows(&s.o_in, n);
        let d_o_in = if l.attn_sub_norm.is_some() {
            &t.d_attn
        } else {
            &t.d_attn2
        };
        linear_backward(ctx, pass, &o_in, &l.o, &t.dx, d_o_in, &t.dw)?;
        if let Some(norm) = &l.attn_sub_norm {
            norm_backward(
                ctx, pass, &s.attn, norm, &t.d_attn, &t.d_attn2, &t.dnorm, n, eps,
            )?;
        }
        attention::record_backward(
            ctx, pass, &s.q, &s.k, &s.v, &t.d_attn2, &t.dq, &t.dk, &t.dv, n, n, shape,
        )?;
        rope::record_backward(ctx, pass, &t.dq, &table, n, heads, head_dim)?;
        rope::record_backward(ctx, pass, &t.dk, &table, n, kv_heads, head_dim)?;
        let attn_in = first_rows(&s.attn_in, n);
        linear_backward(ctx, pass, &attn_in, &l.q, &t.dq, &t.dh, &t.dw)?;
        linear_backward(ctx, pass, &attn_in, &l.k, &t.dk, &t.dh2, &t.dw)?;
        add_rows(ctx, pass, &t.dh2, 0, &t.dh, 0, n, hidden)?;
        linear_backward(ctx, pass, &attn_in, &l.v, &t.dv, &t.dh2, &t.dw)?;
        add_rows(ctx, pass, &t.dh2, 0, &t.dh, 0, n, hidden)?;
        norm_backward(
            ctx,
            pass,
            &t.xs[i],
            &l.input_layernorm,
            &t.dh,
            &t.dh2,
            &t.dnorm,
            n,
            eps,
        )?;
        add_rows(ctx, pass, &t.dh2, 0, &t.dx, 0, n, hidden)?;
    }
    embedding::record_backward(ctx, pass, window.tokens, &t.dx, &t.dembed, n)?;
    for (from, to) in t.dembed.chunks().iter().zip(p.embed.grad.chunks()) {
        add_rows(
            ctx,
            pass,
            &from.buffer,
            0,
            &to.buffer,
            0,
            1,
            from.rows * hidden,
        )?;
    }
    Ok(())
}
