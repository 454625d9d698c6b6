//! The CPU engine's model: the decoder layer of [`super::layer`], as the reference runs it, on the
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
use crate::cpu::{AttentionShape, QuantizedActivations, rmsnorm};
use crate::model::forward::extend_caches;
use crate::model::layer::{CpuDecoder, Segment, run_decoder_layers};
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
            let mut x = model.embeddings(tokens);
            let n = tokens.len();
            run_decoder_layers(model, &mut x, &mut [Segment { cache, tokens: n }])?;
            let hidden = model.config.hidden_size;
            match which {
                Logits::Last => model.logits(&x[(n - 1) * hidden..]),
                Logits::All => model.logits(&x),
            }
        })
    }

    /// Each sequence's `tokens` after the positions its cache holds, all in one pass over the
    /// weights: the logits of each sequence's last token, `[work.len(), vocab]`, each row equal
    /// bit for bit to what [`PackedModel::forward`] gives that sequence alone.
    pub(super) fn forward_last(&mut self, work: &mut [(&mut KvCache, &[u32])]) -> Result<Vec<f32>> {
        let Some(furthest) = work.iter().map(|(c, t)| c.len() + t.len()).max() else {
            return Ok(Vec::new());
        };
        self.rope.reserve(furthest);
        let tokens: Vec<u32> = work.iter().flat_map(|(_, t)| t.iter().copied()).collect();
        let model = &*self;
        extend_caches(&self.config, work, |segments| {
            let mut x = model.embeddings(&tokens);
            run_decoder_layers(model, &mut x, segments)?;
            let hidden = model.config.hidden_size;
            let mut last = Vec::with_capacity(segments.len() * hidden);
            let mut end = 0;
            for s in segments.iter() {
                end += s.tokens;
                last.extend_from_slice(&x[(end - 1) * hidden..end * hidden]);
            }
            model.logits(&last)
        })
    }

    fn embeddings(&self, tokens: &[u32]) -> Vec<f32> {
        let embed = self.embed.as_ref().unwrap_or(&self.head);
        tokens
            .iter()
            .flat_map(|&id| embed.row(id as usize))
            .collect()
    }

    /// The logits of the rows of `x` (`[rows, hidden]`): the final norm, then the head.
    fn logits(&self, x: &[f32]) -> Result<Vec<f32>> {
        let c = &self.config;
        let rows = x.len() / c.hidden_size;
        self.head
            .products(&rmsnorm(x, rows, &self.norm, c.rms_norm_eps)?, rows)
    }
}

/// The CPU engine's layer operations: stacked packed products split into their parts, RoPE from
/// a table, attention on [`crate::cpu::fast`]'s kernels.
impl CpuDecoder for PackedModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn norms(&self, layer: usize) -> [&[f32]; 4] {
        let l = &self.layers[layer];
        [
            &l.input_layernorm,
            &l.attn_sub_norm,
            &l.post_attention_layernorm,
            &l.ffn_sub_norm,
        ]
    }

    fn qkv(&self, layer: usize, h: &QuantizedActivations) -> Result<[Vec<f32>; 3]> {
        let (attn, kv) = (self.config.attention_width(), self.config.kv_width());
        let qkv = self.layers[layer].qkv.matmul(h)?;
        let rows = qkv.len() / (attn + 2 * kv);
        let [mut q, mut k, mut v] = [attn, kv, kv].map(|w| Vec::with_capacity(rows * w));
        for row in qkv.chunks_exact(attn + 2 * kv) {
            q.extend_from_slice(&row[..attn]);
            k.extend_from_slice(&row[attn..attn + kv]);
            v.extend_from_slice(&row[attn + kv..]);
        }
        Ok([q, k, v])
    }

    fn o_proj(&self, layer: usize, a: &QuantizedActivations) -> Result<Vec<f32>> {
        self.layers[layer].o_proj.matmul(a)
    }

    fn gate_up(&self, layer: usize, h: &QuantizedActivations) -> Result<[Vec<f32>; 2]> {
        let inter = self.config.intermediate_size;
        let gate_up = self.layers[layer].gate_up.matmul(h)?;
        let rows = gate_up.len() / (2 * inter);
        let [mut gate, mut up] = [(); 2].map(|()| Vec::with_capacity(rows * inter));
        for row in gate_up.chunks_exact(2 * inter) {
            gate.extend_from_slice(&row[..inter]);
            up.extend_from_slice(&row[inter..]);
        }
        Ok([gate, up])
    }

    fn down_proj(&self, layer: usize, m: &QuantizedActivations) -> Result<Vec<f32>> {
        self.layers[layer].down_proj.matmul(m)
    }

    fn act_quant(&self, x: &[f32], rows: usize, cols: usize) -> Result<QuantizedActivations> {
        act_quant(x, rows, cols)
    }

    fn rope(&self, x: &mut [f32], positions: &[usize], _heads: usize) -> Result<()> {
        self.rope.rotate(x, positions)
    }

    fn attention(
        &self,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        shape: AttentionShape,
    ) -> Result<Vec<f32>> {
        attention(q, keys, values, shape)
    }
}
