//! The buffers one window's forward and backward pass through: what the forward keeps for the
//! backward, per layer, and the gradients in flight. Allocated once for the longest window; a
//! shorter window uses their first rows.

use crate::Result;
use crate::gpu::{GpuActivations, GpuContext, GpuGradTable};
use crate::model::ModelConfig;
use crate::train::params::linear_shapes;

/// What the backward of one decoder layer reads from its forward.
pub(super) struct LayerTape {
    /// `input_layernorm(x)` quantized, as q, k and v read it.
    pub attn_in: GpuActivations,
    /// Queries and keys after RoPE, and values.
    pub q: wgpu::Buffer,
    pub k: wgpu::Buffer,
    pub v: wgpu::Buffer,
    /// The attention output, before `attn_sub_norm` where the family has it.
    pub attn: wgpu::Buffer,
    pub o_in: GpuActivations,
    /// The residual stream after the attention block.
    pub x_mid: wgpu::Buffer,
    pub mlp_in: GpuActivations,
    /// `[rows, 2 * intermediate]`: each row's gate outputs, then its up outputs.
    pub gate_up: wgpu::Buffer,
    /// `activation.gate(gate, up)`, before `ffn_sub_norm`; kept only for that norm's backward
    /// (a family without sub-norms quantizes the gate's output straight from `gate_up`).
    pub gated: Option<wgpu::Buffer>,
    pub down_in: GpuActivations,
}

pub(super) struct Tape {
    /// Rows of the longest window the buffers hold.
    pub rows: usize,
    /// The residual stream entering each layer, then leaving the last.
    pub xs: Vec<wgpu::Buffer>,
    pub layers: Vec<LayerTape>,
    /// The forward's q and k before rotation, gate and up before joining.
    pub q_lin: wgpu::Buffer,
    pub k_lin: wgpu::Buffer,
    pub gate: wgpu::Buffer,
    pub up: wgpu::Buffer,
    /// The final norm's output, the lm_head's input.
    pub normed: wgpu::Buffer,
    /// `[rows, vocab]` logits, overwritten by their gradient.
    pub logits: wgpu::Buffer,
    pub dnormed: wgpu::Buffer,
    /// The gradient wrt the residual stream, and two more of its width.
    pub dx: wgpu::Buffer,
    pub dh: wgpu::Buffer,
    pub dh2: wgpu::Buffer,
    pub d_inter: wgpu::Buffer,
    pub d_gated: wgpu::Buffer,
    pub d_gate_up: wgpu::Buffer,
    pub d_attn: wgpu::Buffer,
    pub d_attn2: wgpu::Buffer,
    pub dq: wgpu::Buffer,
    pub dk: wgpu::Buffer,
    pub dv: wgpu::Buffer,
    /// One linear's or one norm's weight gradient of one window, before it is added in.
    pub dw: wgpu::Buffer,
    pub dnorm: wgpu::Buffer,
    /// The embedding lookup's gradient of one window.
    pub dembed: GpuGradTable,
}

impl Tape {
    pub fn new(ctx: &GpuContext, c: &ModelConfig, rows: usize) -> Result<Self> {
        let (hidden, inter, vocab) = (c.hidden_size, c.intermediate_size, c.vocab_size);
        let attn = c.num_attention_heads * c.head_dim;
        let kv = c.num_key_value_heads * c.head_dim;
        let f32s = |what: &str, width: usize| ctx.storage(what, (rows * width) as u64 * 4);
        let layers = (0..c.num_hidden_layers)
            .map(|_| {
                Ok(LayerTape {
                    attn_in: GpuActivations::new(ctx, rows, hidden)?,
                    q: f32s("rotated queries", attn)?,
                    k: f32s("rotated keys", kv)?,
                    v: f32s("values", kv)?,
                    attn: f32s("attention output", attn)?,
                    o_in: GpuActivations::new(ctx, rows, attn)?,
                    x_mid: f32s("residual stream", hidden)?,
                    mlp_in: GpuActivations::new(ctx, rows, hidden)?,
                    gate_up: f32s("gate and up", 2 * inter)?,
                    gated: c
                        .family
                        .has_sub_norms()
                        .then(|| f32s("gated", inter))
                        .transpose()?,
                    down_in: GpuActivations::new(ctx, rows, inter)?,
                })
            })
            .collect::<Result<_>>()?;
        let largest_linear = linear_shapes(c)
            .iter()
            .map(|&(_, r, k)| r * k)
            .max()
            .unwrap_or(0);
        Ok(Tape {
            rows,
            xs: (0..=c.num_hidden_layers)
                .map(|_| f32s("residual stream", hidden))
                .collect::<Result<_>>()?,
            layers,
            q_lin: f32s("queries", attn)?,
            k_lin: f32s("keys", kv)?,
            gate: f32s("gate", inter)?,
            up: f32s("up", inter)?,
            normed: f32s("final norm", hidden)?,
            logits: f32s("training logits", vocab)?,
            dnormed: f32s("final norm gradient", hidden)?,
            dx: f32s("residual gradient", hidden)?,
            dh: f32s("hidden gradient", hidden)?,
            dh2: f32s("hidden gradient", hidden)?,
            d_inter: f32s("intermediate gradient", inter)?,
            d_gated: f32s("intermediate gradient", inter)?,
            d_gate_up: f32s("gate and up gradient", 2 * inter)?,
            d_attn: f32s("attention gradient", attn)?,
            d_attn2: f32s("attention gradient", attn)?,
            dq: f32s("query gradient", attn)?,
            dk: f32s("key gradient", kv)?,
            dv: f32s("value gradient", kv)?,
            dw: ctx.storage("linear weight gradient", largest_linear as u64 * 4)?,
            dnorm: ctx.storage(
                "norm weight gradient",
                hidden.max(inter).max(attn) as u64 * 4,
            )?,
            dembed: GpuGradTable::new(ctx, vocab, hidden)?,
        })
    }
}

/// The first `rows` rows of `acts`: kernels quantize and multiply as many rows as the value says.
pub(super) fn first_rows(acts: &GpuActivations, rows: usize) -> GpuActivations {
    GpuActivations {
        rows,
        cols: acts.cols,
        codes: acts.codes.clone(),
        scales: acts.scales.clone(),
        sums: acts.sums.clone(),
    }
}
