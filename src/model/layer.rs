//! The decoder layer of every family, written once for the CPU inference engines (the
//! reference [`super::forward`] and the CPU engine): the order of the steps and where the family
//! differs (its activation, its sub-norms) are here; how the weights are held and multiplied, how
//! RoPE and attention are computed, is each engine's ([`CpuDecoder`]). Both engines run the same
//! steps on the same values, so their logits are equal bit for bit.

use crate::Result;
use crate::cpu::{AttentionShape, QuantizedActivations};
use crate::model::forward::LayerView;
use crate::model::{KvCache, ModelConfig, sub_norm};

/// What an engine supplies for [`run_decoder_layers`]: layer `layer`'s norms and linears, and
/// the attention's two position-wise operations.
pub(super) trait CpuDecoder {
    fn config(&self) -> &ModelConfig;
    /// Layer `layer`'s norms in [`crate::model::LayerWeights::norms`] order (the sub-norms empty
    /// where the family has none).
    fn norms(&self, layer: usize) -> [&[f32]; 4];
    /// Queries, keys and values `[n, width]` of the quantized normed input.
    fn qkv(&self, layer: usize, h: &QuantizedActivations) -> Result<[Vec<f32>; 3]>;
    fn o_proj(&self, layer: usize, a: &QuantizedActivations) -> Result<Vec<f32>>;
    /// The gate and up projections `[n, intermediate]` of the quantized normed input.
    fn gate_up(&self, layer: usize, h: &QuantizedActivations) -> Result<[Vec<f32>; 2]>;
    fn down_proj(&self, layer: usize, m: &QuantizedActivations) -> Result<Vec<f32>>;
    /// [`crate::cpu::rmsnorm`] of `x` (`[rows, weight.len()]`), or a twin equal to it bit for bit.
    fn rmsnorm(&self, x: &[f32], rows: usize, weight: &[f32], eps: f32) -> Result<Vec<f32>>;
    /// [`crate::cpu::act_quant`] of `x` (`[rows, cols]`), or a twin equal to it bit for bit.
    fn act_quant(&self, x: &[f32], rows: usize, cols: usize) -> Result<QuantizedActivations>;
    /// Rotates `x` (`[positions.len(), heads * head_dim]`) at `positions`.
    fn rope(&self, x: &mut [f32], positions: &[usize], heads: usize) -> Result<()>;
    /// Causal attention of `q` over every key and value of a layer's cache.
    fn attention(&self, q: &[f32], cache: LayerView<'_>, shape: AttentionShape)
    -> Result<Vec<f32>>;
}

/// One sequence's part of a step: `tokens` new positions after those its `cache` holds.
pub(super) struct Segment<'a> {
    pub cache: &'a mut KvCache,
    pub tokens: usize,
}

/// Runs the residual stream `x` (`[n, hidden]`: each segment's new tokens in turn, `n` their
/// sum) through every decoder layer, appending each layer's keys and values to its segment's
/// cache rows (the caches' lengths are the caller's to advance). Every step but attention works
/// row by row, so the segments share one pass over each weight matrix (a batch of sequences,
/// each decoding one token, is one small-M product) and each row's values are those it gets
/// alone. Each layer is
///
/// ```text
/// h = input_layernorm(x)
/// q, k, v = BitLinear(h)            (h quantized once, shared: transformers' three BitLinears
///                                    quantize the same h to the same codes; no bias)
/// q, k = rope(q, k) at each segment's positions cache.len() ..
/// a = attention(q, the segment's cached k, cached v)
/// x = x + o_proj(attn_sub_norm(a))  (every BitLinear quantizes its own input; no sub-norm in
///                                    the Llama family)
/// h = post_attention_layernorm(x)
/// x = x + down_proj(ffn_sub_norm(act(gate_proj(h)) * up_proj(h)))
/// ```
///
/// with `act` the family's: relu² for BitNet, SiLU for the Llama family and 1bitLLM's.
pub(super) fn run_decoder_layers(
    model: &impl CpuDecoder,
    x: &mut [f32],
    segments: &mut [Segment<'_>],
) -> Result<()> {
    let c = model.config();
    let (hidden, eps, activation) = (c.hidden_size, c.rms_norm_eps, c.family.activation());
    let (attn, kv) = (c.attention_width(), c.kv_width());
    let shape = AttentionShape {
        heads: c.num_attention_heads,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
    };
    let n: usize = segments.iter().map(|s| s.tokens).sum();
    let positions: Vec<usize> = segments
        .iter()
        .flat_map(|s| s.cache.len()..s.cache.len() + s.tokens)
        .collect();
    for layer in 0..c.num_hidden_layers {
        let [input_norm, attn_sub_norm, post_norm, ffn_sub_norm] = model.norms(layer);
        let h = model.act_quant(&model.rmsnorm(x, n, input_norm, eps)?, n, hidden)?;
        let [mut q, mut k, v] = model.qkv(layer, &h)?;
        model.rope(&mut q, &positions, shape.heads)?;
        model.rope(&mut k, &positions, shape.kv_heads)?;
        let mut a = Vec::with_capacity(n * attn);
        let mut first = 0;
        for s in segments.iter_mut() {
            let rows = first..first + s.tokens;
            let kv_rows = rows.start * kv..rows.end * kv;
            s.cache.append(layer, &k[kv_rows.clone()], &v[kv_rows]);
            a.extend(model.attention(
                &q[rows.start * attn..rows.end * attn],
                s.cache.layer_view(layer),
                shape,
            )?);
            first = rows.end;
        }
        let a = sub_norm(&a, n, attn_sub_norm, eps, |x, r, w, e| {
            model.rmsnorm(x, r, w, e)
        })?;
        add_assign(x, &model.o_proj(layer, &model.act_quant(&a, n, attn)?)?);

        let h = model.act_quant(&model.rmsnorm(x, n, post_norm, eps)?, n, hidden)?;
        let [gate, up] = model.gate_up(layer, &h)?;
        let m = activation.gate(&gate, &up)?;
        let m = sub_norm(&m, n, ffn_sub_norm, eps, |x, r, w, e| {
            model.rmsnorm(x, r, w, e)
        })?;
        let m = model.act_quant(&m, n, c.intermediate_size)?;
        add_assign(x, &model.down_proj(layer, &m)?);
    }
    Ok(())
}

/// The residual connection `x += delta`.
fn add_assign(x: &mut [f32], delta: &[f32]) {
    for (a, &d) in x.iter_mut().zip(delta) {
        *a += d;
    }
}
