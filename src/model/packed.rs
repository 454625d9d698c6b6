//! The CPU engine's model: the reference forward ([`super::forward`]) step for step, on the
//! kernels of [`crate::cpu::fast`], so that its logits equal the reference's bit for bit.
//!
//! Ternary weights stay packed (2 bits each; q, k and v stacked into one matrix, gate and up
//! into another, since each pair reads the same quantized input), the float tables interleaved
//! for SIMD (f16 where every value is one). The norms and the gate are the reference's own
//! functions: their cost is per activation, not per weight; the activation quantizer is the fast
//! kernels' twin of the reference's (the reference rounds each value with a call).

use crate::Result;
use crate::cpu::fast::{
    InterleavedRows, PackedMatrix, RopeTable, act_quant, attention, rope_table,
};
use crate::cpu::{AttentionShape, rmsnorm};
use crate::model::schema::sub_norm;
use crate::model::{BlockLayer, Checked, KvCache, LayerWeights, Logits, ModelConfig, WeightSource};

#[derive(Clone, Debug, PartialEq)]
pub(super) struct PackedModel {
    config: ModelConfig,
    /// The embeddings when the lm_head is a table of its own, else `None` (tied: `head`).
    embed: Option<InterleavedRows>,
    head: InterleavedRows,
    layers: Vec<PackedLayer>,
    norm: Vec<f32>,
    rope: RopeTable,
}

#[derive(Clone, Debug, PartialEq)]
struct PackedLayer {
    input_layernorm: Vec<f32>,
    /// q, k, v stacked: `[heads * head_dim + 2 * kv_heads * head_dim, hidden]`.
    qkv: PackedMatrix,
    o_proj: PackedMatrix,
    attn_sub_norm: Vec<f32>,
    post_attention_layernorm: Vec<f32>,
    /// gate and up stacked: `[2 * intermediate, hidden]`.
    gate_up: PackedMatrix,
    down_proj: PackedMatrix,
    ffn_sub_norm: Vec<f32>,
}

impl PackedLayer {
    fn new(l: &LayerWeights) -> Result<Self> {
        Ok(PackedLayer {
            qkv: PackedMatrix::new(&[&l.q_proj, &l.k_proj, &l.v_proj])?,
            o_proj: PackedMatrix::new(&[&l.o_proj])?,
            gate_up: PackedMatrix::new(&[&l.gate_proj, &l.up_proj])?,
            down_proj: PackedMatrix::new(&[&l.down_proj])?,
            input_layernorm: l.input_layernorm.clone(),
            attn_sub_norm: l.attn_sub_norm.clone(),
            post_attention_layernorm: l.post_attention_layernorm.clone(),
            ffn_sub_norm: l.ffn_sub_norm.clone(),
        })
    }

    /// The layer from a file's I2_S rows, copied as they lie.
    fn from_blocks(l: BlockLayer<'_>) -> Result<Self> {
        let [q, k, v, o, gate, up, down] = l.linears;
        let [
            input_layernorm,
            attn_sub_norm,
            post_attention_layernorm,
            ffn_sub_norm,
        ] = l.norms;
        Ok(PackedLayer {
            qkv: PackedMatrix::from_blocks(&[q, k, v])?,
            o_proj: PackedMatrix::from_blocks(&[o])?,
            gate_up: PackedMatrix::from_blocks(&[gate, up])?,
            down_proj: PackedMatrix::from_blocks(&[down])?,
            input_layernorm,
            attn_sub_norm,
            post_attention_layernorm,
            ffn_sub_norm,
        })
    }
}

impl PackedModel {
    /// Packs `weights` a part at a time, each checked ([`crate::model::ModelWeights::validate`]'s
    /// checks), telling the source to release what it read ([`WeightSource::release`]) after each
    /// block of table rows and each layer.
    pub(super) fn new(weights: &dyn WeightSource) -> Result<Self> {
        let source = Checked::new(weights)?;
        let c = weights.config().clone();
        let release = || weights.release();
        let embed = InterleavedRows::from_table(&source.embed_tokens()?, &release)?;
        let layers = (0..c.num_hidden_layers)
            .map(|index| {
                let layer = match source.layer_blocks(index)? {
                    Some(l) => PackedLayer::from_blocks(l),
                    None => PackedLayer::new(&*source.layer(index)?),
                };
                weights.release();
                layer
            })
            .collect::<Result<_>>()?;
        let norm = source.norm()?.into_owned();
        let (embed, head) = match source.lm_head()? {
            Some(head) => (Some(embed), InterleavedRows::from_table(&head, &release)?),
            None => (None, embed),
        };
        let rope = rope_table(c.head_dim, c.rope_theta)?;
        Ok(PackedModel {
            embed,
            head,
            layers,
            norm,
            rope,
            config: c,
        })
    }

    pub(super) fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Bytes of weights held (packed matrices, tables, norms).
    pub(super) fn bytes(&self) -> usize {
        let floats = |v: &[f32]| 4 * v.len();
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.qkv, &l.o_proj, &l.gate_up, &l.down_proj]
                    .map(PackedMatrix::bytes)
                    .iter()
                    .sum::<usize>()
                    + [
                        &l.input_layernorm,
                        &l.attn_sub_norm,
                        &l.post_attention_layernorm,
                        &l.ffn_sub_norm,
                    ]
                    .map(|v| floats(v))
                    .iter()
                    .sum::<usize>()
            })
            .sum();
        layers
            + self.head.bytes()
            + self.embed.as_ref().map_or(0, |e| e.bytes())
            + floats(&self.norm)
    }

    /// [`super::forward`] of `tokens` after the positions `cache` holds, with the same errors;
    /// with [`Logits::Last`] only the last token's logits (`[vocab]`) are formed.
    pub(super) fn forward(
        &mut self,
        tokens: &[u32],
        cache: &mut KvCache,
        which: Logits,
    ) -> Result<Vec<f32>> {
        self.rope.reserve(cache.len() + tokens.len());
        let model = &*self;
        cache.extend_with(&self.config, tokens, |cache| {
            model.run_layers(tokens, cache, which)
        })
    }

    fn run_layers(&self, tokens: &[u32], cache: &mut KvCache, which: Logits) -> Result<Vec<f32>> {
        let c = &self.config;
        let (n, hidden, inter, eps) = (
            tokens.len(),
            c.hidden_size,
            c.intermediate_size,
            c.rms_norm_eps,
        );
        let positions: Vec<usize> = (cache.len()..cache.len() + n).collect();
        let shape = AttentionShape {
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: c.head_dim,
        };
        let (attn, kv) = (
            shape.heads * shape.head_dim,
            shape.kv_heads * shape.head_dim,
        );
        let activation = c.family.activation();
        let embed = self.embed.as_ref().unwrap_or(&self.head);
        let mut x: Vec<f32> = tokens
            .iter()
            .flat_map(|&id| embed.row(id as usize))
            .collect();
        for (layer, (keys, values)) in self.layers.iter().zip(cache.layers_mut()) {
            let h = rmsnorm(&x, n, &layer.input_layernorm, eps)?;
            let qkv = layer.qkv.matmul(&act_quant(&h, n, hidden)?)?;
            let mut q = Vec::with_capacity(n * attn);
            let mut k = Vec::with_capacity(n * kv);
            for row in qkv.chunks_exact(attn + 2 * kv) {
                q.extend_from_slice(&row[..attn]);
                k.extend_from_slice(&row[attn..attn + kv]);
                values.extend_from_slice(&row[attn + kv..]);
            }
            self.rope.rotate(&mut q, &positions)?;
            self.rope.rotate(&mut k, &positions)?;
            keys.extend_from_slice(&k);
            let a = attention(&q, keys, values, shape)?;
            let a = sub_norm(&a, n, &layer.attn_sub_norm, eps)?;
            add_assign(&mut x, &layer.o_proj.matmul(&act_quant(&a, n, attn)?)?);

            let h = rmsnorm(&x, n, &layer.post_attention_layernorm, eps)?;
            let gate_up = layer.gate_up.matmul(&act_quant(&h, n, hidden)?)?;
            let mut m = Vec::with_capacity(n * inter);
            for row in gate_up.chunks_exact(2 * inter) {
                m.extend(activation.gate(&row[..inter], &row[inter..])?);
            }
            let m = sub_norm(&m, n, &layer.ffn_sub_norm, eps)?;
            add_assign(&mut x, &layer.down_proj.matmul(&act_quant(&m, n, inter)?)?);
        }
        let rows = match which {
            Logits::Last => &x[(n - 1) * hidden..],
            Logits::All => &x[..],
        };
        let count = rows.len() / hidden;
        self.head
            .products(&rmsnorm(rows, count, &self.norm, eps)?, count)
    }
}

/// The residual connection `x += delta`.
fn add_assign(x: &mut [f32], delta: &[f32]) {
    for (a, &d) in x.iter_mut().zip(delta) {
        *a += d;
    }
}
