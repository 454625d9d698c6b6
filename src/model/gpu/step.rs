//! One forward step recorded into a compute pass: every layer, on the fused or the separate
//! path, then the logits asked for.

use super::*;

impl GpuModel {
    /// Records one forward step of the `n` tokens in `tokens` at the cached positions into
    /// `pass`, up to the final norm, then the logits `which` asks for (if any; the first
    /// [`NLL_BLOCK`] rows of all) into the scratch's logits buffer. The scratch must be sized
    /// for them; the cache length is the caller's to advance.
    pub(super) fn record_step(
        &self,
        ctx: &GpuContext,
        pass: &mut wgpu::ComputePass<'_>,
        tokens: &wgpu::Buffer,
        n: usize,
        which: Option<Logits>,
    ) -> Result<()> {
        let c = &self.config;
        let s = self.scratch.as_ref().expect("the caller sized the scratch");
        let (hidden, eps, start) = (c.hidden_size, c.rms_norm_eps, self.len);
        let shape = AttentionShape {
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        };
        // Prompts run the tiled GEMM on codes quantized once.
        let fused = n < GEMM_MIN_ROWS && self.decode_path == DecodePath::Fused;
        let cos_sin = rope::cos_sin(ctx, start, n, shape.head_dim, c.rope_theta)?;
        let step = LayerStep {
            s,
            n,
            start,
            eps,
            shape,
            inter: c.intermediate_size,
            activation: c.family.activation(),
            cos_sin: &cos_sin,
        };
        embedding::record(ctx, pass, &self.embed, tokens, &s.x, n)?;
        for l in &self.layers {
            if fused {
                fused_layer(ctx, pass, l, &step)?;
            } else {
                separate_layer(ctx, pass, l, &step)?;
            }
        }
        rmsnorm::record(ctx, pass, &s.x, &self.norm, &s.final_norm, n, hidden, eps)?;
        match which {
            None => Ok(()),
            Some(Logits::All) => self.record_logits(ctx, pass, 0, n.min(NLL_BLOCK)),
            Some(Logits::Last) => self.record_logits(ctx, pass, n - 1, 1),
        }
    }

    /// Records the logits of `rows` rows of the final norm, from row `first` on, into the front
    /// of the scratch's logits buffer. Rows past the first are copied to the front of the
    /// projection scratch first (the step is done with it), as lm_head reads from row 0.
    pub(super) fn record_logits(
        &self,
        ctx: &GpuContext,
        pass: &mut wgpu::ComputePass<'_>,
        first: usize,
        rows: usize,
    ) -> Result<()> {
        let s = self.scratch.as_ref().expect("the caller sized the scratch");
        let x = if first == 0 {
            &s.final_norm
        } else {
            let hidden = self.config.hidden_size;
            elementwise::copy_rows(ctx, pass, &s.final_norm, first, &s.proj, 0, rows, hidden)?;
            &s.proj
        };
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        lm_head::record(ctx, pass, x, head, &s.logits, rows)
    }
}

/// What every layer of one step reads and writes besides its weights.
struct LayerStep<'a> {
    s: &'a Scratch,
    /// Tokens in the step, and the cached positions before them.
    n: usize,
    start: usize,
    eps: f32,
    shape: AttentionShape,
    inter: usize,
    /// The MLP's gate.
    activation: Activation,
    /// RoPE's cos/sin of the step's positions.
    cos_sin: &'a wgpu::Buffer,
}

/// A decode step's layer: each norm folded into the matmul that reads it (norm_matmul), the
/// queries and keys rotated as they are made, the residual added by the matmuls themselves.
fn fused_layer(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    l: &GpuLayer,
    p: &LayerStep,
) -> Result<()> {
    let (s, n, eps) = (p.s, p.n, p.eps);
    norm_matmul::record_qkv(
        ctx,
        pass,
        &s.x,
        n,
        &l.input_layernorm,
        eps,
        &l.qkv,
        p.cos_sin,
        &s.q_rot,
        &l.keys,
        &l.values,
        p.start,
        p.shape,
    )?;
    attend(ctx, pass, l, p)?;
    let mut step =
        |x, norm, w, y, output| norm_matmul::record(ctx, pass, x, n, norm, eps, w, y, output);
    step(
        &s.attn,
        l.attn_sub_norm.as_ref(),
        &l.o_proj,
        &s.x,
        NormMatmulOutput::Add,
    )?;
    step(
        &s.x,
        Some(&l.post_attention_layernorm),
        &l.gate_up,
        &s.mlp,
        NormMatmulOutput::Gated(p.activation),
    )?;
    step(
        &s.mlp,
        l.ffn_sub_norm.as_ref(),
        &l.down_proj,
        &s.x,
        NormMatmulOutput::Add,
    )
}

/// A prompt's layer (or any step on adapters without the fused kernels' workgroup memory):
/// each norm quantizes its rows once for the matmuls that read them; without a sub-norm, the
/// attention output and the gate are quantized as they are.
fn separate_layer(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    l: &GpuLayer,
    p: &LayerStep,
) -> Result<()> {
    let (s, n, eps) = (p.s, p.n, p.eps);
    let matmul = MatmulOptions::default();
    // o_proj and down_proj add straight into the residual stream.
    let residual = MatmulOptions {
        output: MatmulOutput::AddScaled,
        ..matmul
    };
    let linear = gpu::ternary_matmul::record;
    rmsnorm::record_quant(ctx, pass, &s.x, &l.input_layernorm, &s.normed, eps)?;
    linear(ctx, pass, &s.normed, &l.qkv, None, &s.qkv, matmul)?;
    rope::record_qkv(
        ctx, pass, &s.qkv, p.cos_sin, &s.q_rot, &l.keys, &l.values, p.start, n, p.shape,
    )?;
    attend(ctx, pass, l, p)?;
    match &l.attn_sub_norm {
        Some(norm) => rmsnorm::record_quant(ctx, pass, &s.attn, norm, &s.attn_acts, eps)?,
        None => act_quant::record(ctx, pass, &s.attn, &s.attn_acts)?,
    }
    linear(ctx, pass, &s.attn_acts, &l.o_proj, None, &s.x, residual)?;
    rmsnorm::record_quant(ctx, pass, &s.x, &l.post_attention_layernorm, &s.normed, eps)?;
    linear(ctx, pass, &s.normed, &l.gate_up, None, &s.gate_up, matmul)?;
    match &l.ffn_sub_norm {
        Some(norm) => {
            gate::record(ctx, pass, p.activation, &s.gate_up, &s.mlp, n, p.inter)?;
            rmsnorm::record_quant(ctx, pass, &s.mlp, norm, &s.mlp_acts, eps)?;
        }
        None => gate::record_quant(ctx, pass, p.activation, &s.gate_up, &s.mlp_acts)?,
    }
    linear(ctx, pass, &s.mlp_acts, &l.down_proj, None, &s.x, residual)
}

/// Causal attention of the step's rotated queries over the layer's cache.
fn attend(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    l: &GpuLayer,
    p: &LayerStep,
) -> Result<()> {
    let s = p.s;
    attention::record(
        ctx,
        pass,
        &s.q_rot,
        &l.keys,
        &l.values,
        &s.attn,
        p.n,
        p.start + p.n,
        p.shape,
    )
}
