//! The per-step buffers of a forward, sized for the tokens and logit rows of a step and kept
//! while those repeat.

use super::*;

/// Per-step buffers, sized for a number of tokens and of logit rows, and kept while those repeat
/// (decoding asks for one token at a time).
pub(super) struct Scratch {
    pub rows: usize,
    pub logit_rows: usize,
    pub tokens: wgpu::Buffer,
    pub x: wgpu::Buffer,
    pub normed: GpuActivations,
    pub qkv: wgpu::Buffer,
    pub q_rot: wgpu::Buffer,
    pub attn: wgpu::Buffer,
    pub attn_acts: GpuActivations,
    pub proj: wgpu::Buffer,
    pub gate_up: wgpu::Buffer,
    pub mlp: wgpu::Buffer,
    pub mlp_acts: GpuActivations,
    pub final_norm: wgpu::Buffer,
    pub logits: wgpu::Buffer,
    pub nll: wgpu::Buffer,
}

impl GpuModel {
    pub(super) fn scratch(
        &mut self,
        ctx: &GpuContext,
        rows: usize,
        logit_rows: usize,
    ) -> Result<()> {
        if self
            .scratch
            .as_ref()
            .is_some_and(|s| (s.rows, s.logit_rows) == (rows, logit_rows))
        {
            return Ok(());
        }
        let c = &self.config;
        let f32s = |label: &str, n: usize| ctx.storage(label, (n * 4) as u64);
        let q_dim = c.num_attention_heads * c.head_dim;
        let kv_dim = c.num_key_value_heads * c.head_dim;
        self.scratch = Some(Scratch {
            rows,
            logit_rows,
            tokens: f32s("tokens", rows)?,
            x: f32s("residual", rows * c.hidden_size)?,
            normed: GpuActivations::new(ctx, rows, c.hidden_size)?,
            qkv: f32s("qkv", rows * (q_dim + 2 * kv_dim))?,
            q_rot: f32s("q rotated", rows * q_dim)?,
            attn: f32s("attention", rows * q_dim)?,
            attn_acts: GpuActivations::new(ctx, rows, q_dim)?,
            proj: f32s("projection", rows * c.hidden_size)?,
            gate_up: f32s("gate_up", rows * 2 * c.intermediate_size)?,
            mlp: f32s("mlp", rows * c.intermediate_size)?,
            mlp_acts: GpuActivations::new(ctx, rows, c.intermediate_size)?,
            final_norm: f32s("final norm", rows * c.hidden_size)?,
            logits: f32s("logits", logit_rows * c.vocab_size)?,
            nll: f32s("nll", rows)?,
        });
        Ok(())
    }
}
