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
    FloatRows, Int8Rows, InterleavedRows, PackedMatrix, RopeTable, act_quant, attention_cached,
    rmsnorm, rope_table,
};
use crate::cpu::{AttentionShape, QuantizedActivations};
use crate::model::forward::{LayerView, extend_caches};
use crate::model::layer::{CpuDecoder, Segment, run_decoder_layers};
use crate::model::{BlockLayer, Checked, KvCache, LayerWeights, Logits, ModelConfig, WeightSource};

/// How the CPU engine keeps its lm_head (the output projection, or the tied embeddings).
///
/// ```
/// use bitnet_wgpu::cpu::argmax;
/// use bitnet_wgpu::model::{CpuEngine, LmHead, ModelConfig, synthetic};
/// let mut config = ModelConfig::bitnet_b158_2b4t();
/// (config.num_hidden_layers, config.vocab_size, config.hidden_size) = (1, 100, 128);
/// (config.intermediate_size, config.num_attention_heads, config.head_dim) = (256, 2, 64);
/// config.num_key_value_heads = 1;
/// let weights = synthetic(&config, 7);
/// let exact = CpuEngine::with_head(&weights, LmHead::Exact)?.forward(&[1, 2])?;
/// let int8 = CpuEngine::with_head(&weights, LmHead::Int8)?.forward(&[1, 2])?;
/// for (e, i) in exact.chunks(100).zip(int8.chunks(100)) {
///     let id = argmax(e)?;
///     assert_eq!(argmax(i)?, id);
///     assert_eq!(i[id as usize], e[id as usize]);
/// }
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
    /// An int8 screen of the table (each row in 8 bits with its own scale, the final hidden
    /// state in 8 bits per block of 128 values: half the bytes of an f16 table to read per
    /// token), then the table's own products for every row whose screen logit, raised by a
    /// bound on its error, reaches the largest exact one ([`crate::cpu::lm_head_screened`]).
    /// Greedy ids are [`LmHead::Exact`]'s, and so are the logits of the rows that could be the
    /// largest; the others are the screen's approximations. The table's rows are read where a
    /// mapped GGUF file holds them (the screen is then all the engine adds: half the bytes of
    /// an f16 table); a table in memory is kept row-major beside the screen.
    Int8,
}

/// The float tables as the engine holds them.
#[derive(Clone, Debug, PartialEq)]
enum Tables {
    /// The embeddings are the lm_head, interleaved for its products.
    Tied(InterleavedRows),
    Untied {
        embed: FloatRows,
        head: InterleavedRows,
    },
    /// [`LmHead::Int8`]: the exact rows the screen picks come from `head`, or from the
    /// embeddings when tied.
    Screened {
        embed: FloatRows,
        head: Option<FloatRows>,
        screen: Int8Rows,
    },
}

impl Tables {
    /// The tables of `source` for `head`; `release` as [`InterleavedRows::from_table`] takes it.
    fn new(source: &Checked<'_>, head: LmHead, release: &dyn Fn()) -> Result<Self> {
        let embed = source.embed_tokens()?;
        Ok(match (source.lm_head()?, head) {
            (None, LmHead::Exact) => Tables::Tied(InterleavedRows::from_table(&embed, release)?),
            (Some(head), LmHead::Exact) => Tables::Untied {
                embed: FloatRows::from_table(&embed, release)?,
                head: InterleavedRows::from_table(&head, release)?,
            },
            (head, LmHead::Int8) => Tables::Screened {
                screen: Int8Rows::from_table(head.as_ref().unwrap_or(&embed), release)?,
                embed: FloatRows::from_table(&embed, release)?,
                head: head
                    .map(|h| FloatRows::from_table(&h, release))
                    .transpose()?,
            },
        })
    }

    fn bytes(&self) -> usize {
        match self {
            Tables::Tied(t) => t.bytes(),
            Tables::Untied { embed, head } => embed.bytes() + head.bytes(),
            Tables::Screened {
                embed,
                head,
                screen,
            } => embed.bytes() + head.as_ref().map_or(0, FloatRows::bytes) + screen.bytes(),
        }
    }

    fn embedding(&self, id: usize) -> Vec<f32> {
        match self {
            Tables::Tied(t) => t.row(id),
            Tables::Untied { embed, .. } | Tables::Screened { embed, .. } => embed.row(id),
        }
    }

    /// The head's products with the `rows` rows of `x`.
    fn logits(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        match self {
            Tables::Tied(head) | Tables::Untied { head, .. } => head.products(x, rows),
            Tables::Screened {
                embed,
                head,
                screen,
            } => screen.screened_products(head.as_ref().unwrap_or(embed), x, rows),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub(super) struct PackedModel {
    config: ModelConfig,
    tables: Tables,
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
        let tables = Tables::new(&source, head, &release)?;
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
        let rope = rope_table(c.head_dim, c.rope_theta)?;
        Ok(PackedModel {
            tables,
            layers,
            norm,
            rope,
            config: c,
        })
    }

    pub(super) fn config(&self) -> &ModelConfig {
        &self.config
    }

    pub(super) fn head(&self) -> LmHead {
        match self.tables {
            Tables::Screened { .. } => LmHead::Int8,
            Tables::Tied(_) | Tables::Untied { .. } => LmHead::Exact,
        }
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
        layers + self.tables.bytes() + floats(&self.norm)
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
            .flat_map(|&id| self.tables.embedding(id as usize))
            .collect()
    }

    /// The logits of the rows of `x` (`[rows, hidden]`): the final norm, then the head.
    fn logits(&self, x: &[f32]) -> Result<Vec<f32>> {
        let c = &self.config;
        let rows = x.len() / c.hidden_size;
        let x = rmsnorm(x, rows, &self.norm, c.rms_norm_eps)?;
        self.tables.logits(&x, rows)
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
        self.layers[layer].qkv.matmul_split(h, [attn, kv, kv])
    }

    fn o_proj(&self, layer: usize, a: &QuantizedActivations) -> Result<Vec<f32>> {
        self.layers[layer].o_proj.matmul(a)
    }

    fn gate_up(&self, layer: usize, h: &QuantizedActivations) -> Result<[Vec<f32>; 2]> {
        let inter = self.config.intermediate_size;
        self.layers[layer].gate_up.matmul_split(h, [inter, inter])
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
