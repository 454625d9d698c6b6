//! The BitNet transformer on the GPU: weights uploaded once into the private layout, a KV cache
//! in GPU memory, and a whole forward step recorded into one compute pass and one submission.
//! The only readback is what the caller asked for: logits, a greedily chosen token, or the
//! likelihoods of the tokens that followed.

use crate::cpu::{AttentionShape, PackedTernary, TernaryWeights};
use crate::gpu::norm_matmul::NormMatmulOutput;
use crate::gpu::table::{GpuTable, TableStorage, row_words};
use crate::gpu::ternary_matmul::GEMM_MIN_ROWS;
use crate::gpu::{
    self, GpuActivations, GpuContext, GpuTernary, MatmulOptions, MatmulOutput, act_quant, argmax,
    attention, elementwise, embedding, gate, lm_head, norm_matmul, rmsnorm, rope, sampling,
};
use crate::model::{Activation, Checked, Logits, ModelConfig, Sampler, WeightSource};
use crate::packing::gpu_words;
use crate::{Error, Result};

mod run;
mod scratch;
mod step;

use scratch::Scratch;

/// Rows of logits [`GpuModel::nll`] and [`Logits::All`] make at a time.
pub const NLL_BLOCK: usize = 64;

/// How a GPU model runs the linear layers of a decoding step (prompts always take the GEMM).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodePath {
    /// Each linear with its input's norm and quantization in one dispatch (norm_matmul, rope
    /// included for q/k/v): 6 dispatches per layer instead of 12. On GPUs, where each dependent dispatch costs more
    /// than the work it does, the fewer the faster.
    Fused,
    /// A norm-and-quantize dispatch, then the GEMV: less work in all (the fused kernel repeats
    /// the norm in every workgroup). On CPU adapters (lavapipe, SwiftShader, WARP) work dominates.
    Separate,
}

impl DecodePath {
    /// Whether `ctx` can run a model of `config` on this path.
    pub fn supported(self, ctx: &GpuContext, config: &ModelConfig) -> bool {
        let c = config;
        self == DecodePath::Separate
            || [
                c.hidden_size,
                c.num_attention_heads * c.head_dim,
                c.intermediate_size,
            ]
            .into_iter()
            .all(|cols| norm_matmul::supported(ctx, cols))
    }

    /// The faster path on `ctx`'s kind of adapter, among those it supports.
    pub fn for_adapter(ctx: &GpuContext, config: &ModelConfig) -> Self {
        let cpu = ctx.adapter_info().device_type == wgpu::DeviceType::Cpu;
        if !cpu && DecodePath::Fused.supported(ctx, config) {
            DecodePath::Fused
        } else {
            DecodePath::Separate
        }
    }
}

struct GpuLayer {
    input_layernorm: wgpu::Buffer,
    /// q_proj, k_proj and v_proj stacked, each row with its own tensor's scale: one matmul, and
    /// rope_qkv's input layout.
    qkv: GpuTernary,
    o_proj: GpuTernary,
    /// `None` in a family without sub-norms (wgpu has no empty buffers).
    attn_sub_norm: Option<wgpu::Buffer>,
    post_attention_layernorm: wgpu::Buffer,
    /// gate_proj and up_proj stacked likewise: the gate kernels' (and the gated norm_matmul's)
    /// input layout.
    gate_up: GpuTernary,
    down_proj: GpuTernary,
    ffn_sub_norm: Option<wgpu::Buffer>,
    keys: wgpu::Buffer,
    values: wgpu::Buffer,
}

/// A model resident on one GPU, with its KV cache.
///
/// ```
/// use bitnet_wgpu::gpu::{GpuContext, TableStorage};
/// use bitnet_wgpu::model::{GpuModel, Logits, ModelConfig, synthetic};
/// # pollster::block_on(async {
/// let ctx = GpuContext::new().await.expect("a GPU adapter");
/// let config = ModelConfig {
///     vocab_size: 50,
///     hidden_size: 32,
///     intermediate_size: 48,
///     num_hidden_layers: 1,
///     num_attention_heads: 2,
///     num_key_value_heads: 1,
///     head_dim: 16,
///     max_position_embeddings: 32,
///     ..ModelConfig::bitnet_b158_2b4t()
/// };
/// let weights = synthetic(&config, 7);
/// let mut model = GpuModel::new(&ctx, &weights, 32, TableStorage::F32).unwrap();
/// // The logits of the last token, for a sampler on the host.
/// let logits = model.forward(&ctx, &[1, 2, 3], Logits::Last).await.unwrap();
/// assert_eq!(logits.len(), 50);
/// // Five more tokens chosen greedily on the GPU.
/// let chosen = model.greedy(&ctx, &[4], 5, 50, |_| true).await.unwrap();
/// assert_eq!((chosen.len(), model.len()), (5, 8));
/// // How likely each token of a text was, given those before it.
/// model.reset();
/// assert_eq!(model.nll(&ctx, &[1, 2, 3, 4]).await.unwrap().len(), 3);
/// # });
/// ```
pub struct GpuModel {
    config: ModelConfig,
    capacity: usize,
    len: usize,
    decode_path: DecodePath,
    embed: GpuTable,
    lm_head: Option<GpuTable>,
    norm: wgpu::Buffer,
    layers: Vec<GpuLayer>,
    scratch: Option<Scratch>,
    choice: Option<Choice>,
}

/// Where decoding steps leave their token: `result` (argmax.wgsl's four words, the token first,
/// which the next step embeds), two staging buffers the host reads them from and two buffers
/// for sampling's draws, one of each per step in flight.
struct Choice {
    result: wgpu::Buffer,
    staging: [wgpu::Buffer; 2],
    draws: [wgpu::Buffer; 2],
}

fn packed(t: &TernaryWeights) -> Result<PackedTernary> {
    Ok(PackedTernary {
        rows: t.rows,
        cols: t.cols,
        words: gpu_words::pack(&t.codes, t.rows, t.cols)?,
        scales: t.scales.clone(),
    })
}

/// `parts` stacked into one matrix, each row keeping its own tensor's scale.
fn stacked(parts: &[&TernaryWeights]) -> Result<PackedTernary> {
    let row_scales = |t: &TernaryWeights| -> Vec<f32> {
        if t.scales.len() == 1 {
            vec![t.scales[0]; t.rows]
        } else {
            t.scales.clone()
        }
    };
    let codes: Vec<i8> = parts.iter().flat_map(|t| t.codes.iter().copied()).collect();
    let rows = parts.iter().map(|t| t.rows).sum();
    let cols = parts[0].cols;
    Ok(PackedTernary {
        rows,
        cols,
        words: gpu_words::pack(&codes, rows, cols)?,
        scales: parts.iter().flat_map(|t| row_scales(t)).collect(),
    })
}

impl GpuModel {
    /// Uploads `weights` a part at a time (from a checkpoint, only one layer is ever unpacked in
    /// host memory) and allocates a KV cache for `context` positions (at most the model's
    /// `max_position_embeddings`). The embedding table and an untied lm_head are stored as
    /// `tables` says: f16 halves their memory (0.66 GB instead of 1.3 GB for 2B4T) and rounds
    /// them, so f32 is the choice for results identical to the CPU reference.
    pub fn new(
        ctx: &GpuContext,
        weights: &dyn WeightSource,
        context: usize,
        tables: TableStorage,
    ) -> Result<Self> {
        let source = Checked::new(weights)?;
        let c = weights.config();
        if context == 0 || context > c.max_position_embeddings {
            return Err(Error::invalid(
                "context",
                format!(
                    "{context} positions (the model allows 1 to {})",
                    c.max_position_embeddings
                ),
            ));
        }
        Self::check_fits(ctx, c, context, tables)?;
        let embed = GpuTable::upload(ctx, &source.embed_tokens()?, tables)?;
        // Each upload is a copy: the source's bytes of what was uploaded can go.
        weights.release();
        let kv_row = c.num_key_value_heads * c.head_dim;
        let sub_norm = |label, values: &[f32]| -> Result<Option<wgpu::Buffer>> {
            if c.family.has_sub_norms() {
                Ok(Some(ctx.upload(label, values)?))
            } else {
                Ok(None)
            }
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for index in 0..c.num_hidden_layers {
            let l = source.layer(index)?;
            layers.push(GpuLayer {
                input_layernorm: ctx.upload("input_layernorm", &l.input_layernorm)?,
                qkv: GpuTernary::upload(ctx, &stacked(&[&l.q_proj, &l.k_proj, &l.v_proj])?)?,
                o_proj: GpuTernary::upload(ctx, &packed(&l.o_proj)?)?,
                attn_sub_norm: sub_norm("attn_sub_norm", &l.attn_sub_norm)?,
                post_attention_layernorm: ctx
                    .upload("post_attention_layernorm", &l.post_attention_layernorm)?,
                gate_up: GpuTernary::upload(ctx, &stacked(&[&l.gate_proj, &l.up_proj])?)?,
                down_proj: GpuTernary::upload(ctx, &packed(&l.down_proj)?)?,
                ffn_sub_norm: sub_norm("ffn_sub_norm", &l.ffn_sub_norm)?,
                keys: ctx.storage("keys", (context * kv_row * 4) as u64)?,
                values: ctx.storage("values", (context * kv_row * 4) as u64)?,
            });
            weights.release();
        }
        let norm = ctx.upload("norm", &source.norm()?)?;
        let lm_head = match source.lm_head()? {
            Some(head) => Some(GpuTable::upload(ctx, &head, tables)?),
            None => None,
        };
        weights.release();
        // Out of memory surfaces as a device error: say how much the model asked for.
        ctx.check().map_err(|e| {
            Error::Gpu(format!(
                "{}: {e}",
                Self::memory_summary(ctx, c, context, tables)
            ))
        })?;
        Ok(GpuModel {
            config: c.clone(),
            capacity: context,
            len: 0,
            decode_path: DecodePath::for_adapter(ctx, c),
            embed,
            lm_head,
            norm,
            layers,
            scratch: None,
            choice: None,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Positions held in the KV cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the KV cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// How decoding steps run: [`DecodePath::for_adapter`] unless set.
    pub fn decode_path(&self) -> DecodePath {
        self.decode_path
    }

    /// Runs decoding steps on `path` from now on; both give the same bits.
    pub fn set_decode_path(&mut self, ctx: &GpuContext, path: DecodePath) -> Result<()> {
        if !path.supported(ctx, &self.config) {
            return Err(Error::invalid(
                "decode path",
                format!(
                    "{path:?} needs rows of at most {} columns and {} bytes of workgroup memory",
                    norm_matmul::MAX_COLS,
                    norm_matmul::WORKGROUP_BYTES
                ),
            ));
        }
        self.decode_path = path;
        Ok(())
    }

    /// Forgets the cached positions (the next forward starts at position 0).
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Forgets the cached positions from `len` on (none when `len` is past the end): the next
    /// forward continues the sequence's first `len` tokens, overwriting the rest.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Fails, before anything is uploaded, when a model of `config` with a KV cache of `context`
    /// positions needs more memory than `ctx`'s adapter has (where the backend reports it:
    /// [`crate::gpu::Capabilities::device_memory`]); the error gives both figures.
    ///
    /// ```
    /// use bitnet_wgpu::gpu::{GpuContext, TableStorage};
    /// use bitnet_wgpu::model::{GpuModel, ModelConfig};
    /// # pollster::block_on(async {
    /// let ctx = GpuContext::new().await.expect("a GPU adapter");
    /// let mut config = ModelConfig::bitnet_b158_2b4t();
    /// config.num_hidden_layers = 1_000_000;
    /// let fits = GpuModel::check_fits(&ctx, &config, 4096, TableStorage::F16);
    /// // 13 TB: no adapter that reports its memory has that much.
    /// assert_eq!(fits.is_err(), ctx.capabilities().device_memory.is_some());
    /// # });
    /// ```
    pub fn check_fits(
        ctx: &GpuContext,
        config: &ModelConfig,
        context: usize,
        tables: TableStorage,
    ) -> Result<()> {
        let needed = Self::required_bytes(config, context, tables);
        match ctx.capabilities().device_memory {
            Some(offered) if needed > offered => Err(Error::Gpu(Self::memory_summary(
                ctx, config, context, tables,
            ))),
            _ => Ok(()),
        }
    }

    fn memory_summary(
        ctx: &GpuContext,
        config: &ModelConfig,
        context: usize,
        tables: TableStorage,
    ) -> String {
        let needed = Self::required_bytes(config, context, tables);
        let offered = match ctx.capabilities().device_memory {
            Some(bytes) => format!("{:.2} GB", bytes as f64 / 1e9),
            None => "an unreported amount".to_string(),
        };
        format!(
            "the model needs {:.2} GB of GPU memory (weights, embedding tables and a KV cache of \
             {context} positions); {} has {offered}",
            needed as f64 / 1e9,
            ctx.adapter_name()
        )
    }

    /// GPU memory a model of `config` takes for its weights, tables and a KV cache of `context`
    /// positions, from the shapes alone (one scale per linear, as checkpoints have; stacked
    /// matrices keep one per row): what
    /// [`GpuModel::weight_and_cache_bytes`] reports once it is loaded.
    pub fn required_bytes(config: &ModelConfig, context: usize, tables: TableStorage) -> u64 {
        let c = config;
        let words = |rows: usize, cols: usize| (rows * gpu_words::words_per_row(cols) * 4) as u64;
        let floats = |n: usize| (n.max(1) * 4) as u64;
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let q = c.num_attention_heads * c.head_dim;
        let kv = c.num_key_value_heads * c.head_dim;
        let sub_norms = if c.family.has_sub_norms() {
            floats(q) + floats(i)
        } else {
            0
        };
        let layer = words(q + 2 * kv, h)
            + words(h, q)
            + words(2 * i, h)
            + words(h, i)
            + 2 * floats(1)
            + floats(q + 2 * kv)
            + floats(2 * i)
            + 2 * floats(h)
            + sub_norms
            + 2 * floats(context * kv);
        let table = (c.vocab_size * row_words(h, tables) * 4) as u64;
        let tables = if c.tie_word_embeddings { 1 } else { 2 };
        c.num_hidden_layers as u64 * layer + tables * table + floats(h)
    }

    /// GPU memory held by weights and the KV cache, in bytes (per-step scratch excluded).
    pub fn weight_and_cache_bytes(&self) -> u64 {
        let ternary = |t: &GpuTernary| t.words.size() + t.scales.size();
        let layers: u64 = self
            .layers
            .iter()
            .map(|l| {
                [&l.qkv, &l.o_proj, &l.gate_up, &l.down_proj]
                    .into_iter()
                    .map(ternary)
                    .sum::<u64>()
                    + [
                        Some(&l.input_layernorm),
                        l.attn_sub_norm.as_ref(),
                        Some(&l.post_attention_layernorm),
                        l.ffn_sub_norm.as_ref(),
                        Some(&l.keys),
                        Some(&l.values),
                    ]
                    .into_iter()
                    .flatten()
                    .map(|b| b.size())
                    .sum::<u64>()
            })
            .sum();
        layers
            + self.embed.bytes()
            + self.lm_head.as_ref().map_or(0, |t| t.bytes())
            + self.norm.size()
    }
}
