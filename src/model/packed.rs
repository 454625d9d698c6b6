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
    Int8Rows, InterleavedRows, PackedMatrix, RopeTable, act_quant, attention_cached, rmsnorm,
    rope_table,
};
use crate::cpu::{AttentionShape, QuantizedActivations};
use crate::model::forward::{LayerView, extend_caches};
use crate::model::layer::{CpuDecoder, Segment, run_decoder_layers};
use crate::model::{BlockLayer, Checked, KvCache, LayerWeights, Logits, ModelConfig, WeightSource};

/// How the CPU engine keeps its lm_head (the output projection, or the tied embeddings).
///
/// ```
/// use bitnet_wgpu::model::{CpuEngine, LmHead, ModelConfig, synthetic};
/// let mut config = ModelConfig::bitnet_b158_2b4t();
/// (config.num_hidden_layers, config.vocab_size, config.hidden_size) = (1, 100, 128);
/// (config.intermediate_size, config.num_attention_heads, config.head_dim) = (256, 2, 64);
/// config.num_key_value_heads = 1;
/// let weights = synthetic(&config, 7);
/// let exact = CpuEngine::with_head(&weights, LmHead::Exact)?.forward(&[1, 2])?;
/// let int8 = CpuEngine::with_head(&weights, LmHead::Int8)?.forward(&[1, 2])?;
/// let largest = exact.iter().fold(0.0f32, |m, x| m.max(x.abs()));
/// assert!(exact.iter().zip(&int8).all(|(a, b)| (a - b).abs() < 0.05 * largest));
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(
    all(feature = "cli", not(target_arch = "wasm32")),
    derive(clap::ValueEnum)
)]
pub enum LmHead {
    /// The table's own values (f16 where each is one, else f32): logits equal the reference's
    /// bit for bit.
    #[default]
    Exact,
    /// Each row in 8 bits with its own scale, the final hidden state in 8 bits per block of
    /// 128 values ([`crate::cpu::lm_head_int8`]): half the bytes of an f16 table to read per
    /// token, a quarter of an f32 one, at the cost of logits that only approximate the
    /// reference's. The embeddings keep their values.
    Int8,
}

/// The lm_head as the engine holds it.
#[derive(Clone, Debug, PartialEq)]
enum Head {
    /// The embeddings' table.
    Tied,
    Exact(InterleavedRows),
    Int8(Int8Rows),
}

#[derive(Clone, Debug, PartialEq)]
pub(super) struct PackedModel {
    config: ModelConfig,
    embed: InterleavedRows,
    head: Head,
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
    pub(super) fn new(weights: &dyn WeightSource, head: LmHead) -> Result<Self> {
        crate::cpu::fast::keep_freed_memory();
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
        let head = match (source.lm_head()?, head) {
            (Some(table), LmHead::Exact) => {
                Head::Exact(InterleavedRows::from_table(&table, &release)?)
            }
            (Some(table), LmHead::Int8) => Head::Int8(Int8Rows::from_table(&table, &release)?),
            (None, LmHead::Exact) => Head::Tied,
            (None, LmHead::Int8) => {
                Head::Int8(Int8Rows::from_table(&source.embed_tokens()?, &release)?)
            }
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
        let head = match &self.head {
            Head::Tied => 0,
            Head::Exact(h) => h.bytes(),
            Head::Int8(h) => h.bytes(),
        };
        layers + self.embed.bytes() + head + floats(&self.norm)
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
        tokens
            .iter()
            .flat_map(|&id| self.embed.row(id as usize))
            .collect()
    }

    /// The logits of the rows of `x` (`[rows, hidden]`): the final norm, then the head.
    fn logits(&self, x: &[f32]) -> Result<Vec<f32>> {
        let c = &self.config;
        let rows = x.len() / c.hidden_size;
        let x = rmsnorm(x, rows, &self.norm, c.rms_norm_eps)?;
        match &self.head {
            Head::Tied => self.embed.products(&x, rows),
            Head::Exact(h) => h.products(&x, rows),
            Head::Int8(h) => h.products(&x, rows),
        }
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

    fn rmsnorm(&self, x: &[f32], rows: usize, weight: &[f32], eps: f32) -> Result<Vec<f32>> {
        rmsnorm(x, rows, weight, eps)
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
        cache: LayerView<'_>,
        shape: AttentionShape,
    ) -> Result<Vec<f32>> {
        let keys = cache.engine_keys;
        attention_cached(
            q,
            cache.keys,
            cache.values,
            &mut keys.values,
            &mut keys.positions,
            shape,
        )
    }
}
