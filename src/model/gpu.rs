//! The BitNet transformer on the GPU: weights uploaded once into the private layout, a KV cache
//! in GPU memory, and a whole forward step recorded into one compute pass and one submission.
//! The only readback is what the caller asked for: logits, a greedily chosen token, or the
//! likelihoods of the tokens that followed.

use crate::cpu::{AttentionShape, PackedTernary, TernaryWeights};
use crate::gpu::norm_matmul::NormMatmulOutput;
use crate::gpu::table::{GpuTable, TableStorage, row_words};
use crate::gpu::ternary_matmul::GEMM_MIN_ROWS;
use crate::gpu::{
    self, GpuActivations, GpuContext, GpuTernary, MatmulOptions, MatmulOutput, argmax, attention,
    elementwise, embedding, lm_head, norm_matmul, relu2_gate, rmsnorm, rope,
};
use crate::model::{ModelConfig, ModelWeights};
use crate::packing::gpu_words;
use crate::{Error, Result};

/// Rows of logits [`GpuModel::nll`] and [`Logits::All`] make at a time.
pub const NLL_BLOCK: usize = 64;

/// Which logits a forward step reads back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (`[vocab]`): what generation needs, and a prompt's lm_head costs
    /// one row instead of hundreds.
    Last,
    /// Every new token's (`[tokens, vocab]`), for perplexity. Made and read back [`NLL_BLOCK`]
    /// rows at a time: a GPU buffer of them all would pass the storage binding limit (128 MiB on
    /// WebGPU by default) beyond 261 tokens at 2B4T's vocabulary of 128256.
    All,
}

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
    attn_sub_norm: wgpu::Buffer,
    post_attention_layernorm: wgpu::Buffer,
    /// gate_proj and up_proj stacked likewise: relu2_gate's (and the gated norm_matmul's)
    /// input layout.
    gate_up: GpuTernary,
    down_proj: GpuTernary,
    ffn_sub_norm: wgpu::Buffer,
    keys: wgpu::Buffer,
    values: wgpu::Buffer,
}

/// Per-step buffers, sized for a number of tokens and of logit rows, and kept while those repeat
/// (decoding asks for one token at a time).
struct Scratch {
    rows: usize,
    logit_rows: usize,
    tokens: wgpu::Buffer,
    x: wgpu::Buffer,
    normed: GpuActivations,
    qkv: wgpu::Buffer,
    q_rot: wgpu::Buffer,
    attn: wgpu::Buffer,
    attn_acts: GpuActivations,
    proj: wgpu::Buffer,
    gate_up: wgpu::Buffer,
    mlp: wgpu::Buffer,
    mlp_acts: GpuActivations,
    final_norm: wgpu::Buffer,
    logits: wgpu::Buffer,
    nll: wgpu::Buffer,
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

/// Where greedy steps leave their token: `result` (argmax.wgsl's four words, the token first,
/// which the next step embeds) and two staging buffers the host reads them from, one per step in
/// flight.
struct Choice {
    result: wgpu::Buffer,
    staging: [wgpu::Buffer; 2],
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
    /// Uploads `weights` and allocates a KV cache for `context` positions (at most the model's
    /// `max_position_embeddings`). The embedding table and an untied lm_head are stored as
    /// `tables` says: f16 halves their memory (0.66 GB instead of 1.3 GB for 2B4T) and rounds
    /// them, so f32 is the choice for results identical to the CPU reference.
    pub fn new(
        ctx: &GpuContext,
        weights: &ModelWeights,
        context: usize,
        tables: TableStorage,
    ) -> Result<Self> {
        weights.validate()?;
        let c = &weights.config;
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
        let kv_row = c.num_key_value_heads * c.head_dim;
        let mut layers = Vec::with_capacity(weights.layers.len());
        for l in &weights.layers {
            layers.push(GpuLayer {
                input_layernorm: ctx.upload("input_layernorm", &l.input_layernorm)?,
                qkv: GpuTernary::upload(ctx, &stacked(&[&l.q_proj, &l.k_proj, &l.v_proj])?)?,
                o_proj: GpuTernary::upload(ctx, &packed(&l.o_proj)?)?,
                attn_sub_norm: ctx.upload("attn_sub_norm", &l.attn_sub_norm)?,
                post_attention_layernorm: ctx
                    .upload("post_attention_layernorm", &l.post_attention_layernorm)?,
                gate_up: GpuTernary::upload(ctx, &stacked(&[&l.gate_proj, &l.up_proj])?)?,
                down_proj: GpuTernary::upload(ctx, &packed(&l.down_proj)?)?,
                ffn_sub_norm: ctx.upload("ffn_sub_norm", &l.ffn_sub_norm)?,
                keys: ctx.storage("keys", (context * kv_row * 4) as u64)?,
                values: ctx.storage("values", (context * kv_row * 4) as u64)?,
            });
        }
        let embed = GpuTable::upload_f32(
            ctx,
            &weights.embed_tokens,
            c.vocab_size,
            c.hidden_size,
            tables,
        )?;
        let lm_head = match &weights.lm_head {
            Some(head) => Some(GpuTable::upload_f32(
                ctx,
                head,
                c.vocab_size,
                c.hidden_size,
                tables,
            )?),
            None => None,
        };
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
            norm: ctx.upload("norm", &weights.norm)?,
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
            ctx.adapter_info().name
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
        let layer = words(q + 2 * kv, h)
            + words(h, q)
            + words(2 * i, h)
            + words(h, i)
            + 2 * floats(1)
            + floats(q + 2 * kv)
            + floats(2 * i)
            + 2 * floats(h)
            + floats(q)
            + floats(i)
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
                        &l.input_layernorm,
                        &l.attn_sub_norm,
                        &l.post_attention_layernorm,
                        &l.ffn_sub_norm,
                        &l.keys,
                        &l.values,
                    ]
                    .into_iter()
                    .map(|b| b.size())
                    .sum::<u64>()
            })
            .sum();
        layers
            + self.embed.bytes()
            + self.lm_head.as_ref().map_or(0, |t| t.bytes())
            + self.norm.size()
    }

    fn scratch(&mut self, ctx: &GpuContext, rows: usize, logit_rows: usize) -> Result<()> {
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

    /// Runs `tokens` after the cached positions and returns their logits (see [`Logits`]).
    /// Errors leave the cache as it was.
    pub async fn forward(
        &mut self,
        ctx: &GpuContext,
        tokens: &[u32],
        which: Logits,
    ) -> Result<Vec<f32>> {
        self.check_tokens(tokens)?;
        let n = tokens.len();
        let logit_rows = match which {
            Logits::All => n.min(NLL_BLOCK),
            Logits::Last => 1,
        };
        self.scratch(ctx, n, logit_rows)?;
        let s = self.scratch.as_ref().expect("scratch was just made");
        ctx.queue
            .write_buffer(&s.tokens, 0, bytemuck::cast_slice(tokens));
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        {
            let pass = &mut encoder.begin_compute_pass(&Default::default());
            ctx.profile_start(pass);
            self.record_step(ctx, pass, &s.tokens, n, Some(which))?;
        }
        ctx.queue.submit([encoder.finish()]);
        let vocab = self.config.vocab_size;
        let mut logits = ctx.read(&s.logits, logit_rows * vocab).await?;
        if which == Logits::All {
            for first in (NLL_BLOCK..n).step_by(NLL_BLOCK) {
                let rows = (n - first).min(NLL_BLOCK);
                let mut encoder = ctx.device.create_command_encoder(&Default::default());
                self.record_logits(
                    ctx,
                    &mut encoder.begin_compute_pass(&Default::default()),
                    first,
                    rows,
                )?;
                ctx.queue.submit([encoder.finish()]);
                logits.extend(ctx.read::<f32>(&s.logits, rows * vocab).await?);
            }
        }
        self.len += n;
        Ok(logits)
    }

    /// Runs `tokens` after the cached positions and returns, for each of them but the last,
    /// the negative log-likelihood of the token that follows it (`cpu::nll` of its logits, in
    /// f32): what perplexity sums. Only those numbers are read back, and the logits are made
    /// [`NLL_BLOCK`] rows at a time, so a long window needs no `[tokens, vocab]` buffer.
    pub async fn nll(&mut self, ctx: &GpuContext, tokens: &[u32]) -> Result<Vec<f32>> {
        self.check_tokens(tokens)?;
        let n = tokens.len();
        let scored = n - 1;
        self.scratch(ctx, n, scored.clamp(1, NLL_BLOCK))?;
        let s = self.scratch.as_ref().expect("scratch was just made");
        ctx.queue
            .write_buffer(&s.tokens, 0, bytemuck::cast_slice(tokens));
        let vocab = self.config.vocab_size;
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        {
            let pass = &mut encoder.begin_compute_pass(&Default::default());
            ctx.profile_start(pass);
            self.record_step(ctx, pass, &s.tokens, n, None)?;
            for first in (0..scored).step_by(NLL_BLOCK) {
                let rows = (scored - first).min(NLL_BLOCK);
                self.record_logits(ctx, pass, first, rows)?;
                gpu::nll::record(
                    ctx,
                    pass,
                    &s.logits,
                    rows,
                    vocab,
                    &s.tokens,
                    first + 1,
                    &s.nll,
                    first,
                )?;
            }
        }
        ctx.queue.submit([encoder.finish()]);
        let nll = ctx.read(&s.nll, scored).await?;
        self.len += n;
        Ok(nll)
    }

    /// Greedy generation with each choice made on the GPU (`cpu::argmax` over the ids below
    /// `allowed`): runs `tokens` after the cached positions, then feeds each chosen token back,
    /// until `max_new` tokens are chosen, `on_token` returns false or the cache is full. Only
    /// the token is read back, and each step is submitted before the previous one's token is
    /// read, so the host's recording and readback overlap the GPU's work. As with
    /// [`GpuModel::forward`] and sampling, the last token chosen is not fed: the cache then holds
    /// `tokens` and every chosen token but the last. Returns the chosen tokens. The same tokens
    /// as [`GpuModel::forward`] with `cpu::argmax` on the host. After an error (logits with a NaN
    /// or `+inf`, say) the cache holds the positions fed before it.
    pub async fn greedy(
        &mut self,
        ctx: &GpuContext,
        tokens: &[u32],
        max_new: usize,
        allowed: usize,
        mut on_token: impl FnMut(u32) -> bool,
    ) -> Result<Vec<u32>> {
        self.check_tokens(tokens)?;
        if !(1..=self.config.vocab_size).contains(&allowed) {
            return Err(Error::invalid(
                "allowed tokens",
                format!("{allowed}; the vocabulary has {}", self.config.vocab_size),
            ));
        }
        let mut chosen = Vec::new();
        if max_new == 0 {
            return Ok(chosen);
        }
        if self.choice.is_none() {
            self.choice = Some(Choice {
                result: ctx.storage("greedy choice", argmax::RESULT_BYTES)?,
                staging: [
                    ctx.staging("greedy choice readback", argmax::RESULT_BYTES),
                    ctx.staging("greedy choice readback", argmax::RESULT_BYTES),
                ],
            });
        }
        self.scratch(ctx, tokens.len(), 1)?;
        let s = self.scratch.as_ref().expect("scratch was just made");
        ctx.queue
            .write_buffer(&s.tokens, 0, bytemuck::cast_slice(tokens));
        let prompt_tokens = s.tokens.clone();
        let mut in_flight = self.submit_choice(ctx, &prompt_tokens, tokens.len(), allowed, 0)?;
        self.len += tokens.len();
        loop {
            let step = chosen.len();
            // The next step embeds this step's token straight from `result`.
            let next = if step + 1 < max_new && self.len < self.capacity {
                self.scratch(ctx, 1, 1)?;
                let result = self.choice.as_ref().expect("made above").result.clone();
                Some(self.submit_choice(ctx, &result, 1, allowed, (step + 1) % 2)?)
            } else {
                None
            };
            let staging = &self.choice.as_ref().expect("made above").staging[step % 2];
            let words: Vec<u32> = ctx.read_staging(staging, in_flight, 4).await?;
            let token = argmax::interpret([words[0], words[1], words[2], words[3]])?;
            chosen.push(token);
            let go_on = on_token(token);
            match next {
                // That step fed this token: it is in the cache now.
                Some(index) if go_on => {
                    self.len += 1;
                    in_flight = index;
                }
                _ => return Ok(chosen),
            }
        }
    }

    /// Submits one step of the `n` tokens in `tokens` at the cached positions, its argmax into
    /// the choice buffer and a copy of that into staging buffer `slot`.
    fn submit_choice(
        &self,
        ctx: &GpuContext,
        tokens: &wgpu::Buffer,
        n: usize,
        allowed: usize,
        slot: usize,
    ) -> Result<wgpu::SubmissionIndex> {
        let choice = self.choice.as_ref().expect("the caller made it");
        let s = self.scratch.as_ref().expect("the caller sized the scratch");
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        {
            let pass = &mut encoder.begin_compute_pass(&Default::default());
            ctx.profile_start(pass);
            self.record_step(ctx, pass, tokens, n, Some(Logits::Last))?;
            argmax::record(ctx, pass, &s.logits, allowed, &choice.result)?;
        }
        encoder.copy_buffer_to_buffer(
            &choice.result,
            0,
            &choice.staging[slot],
            0,
            argmax::RESULT_BYTES,
        );
        Ok(ctx.queue.submit([encoder.finish()]))
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        self.config.check_tokens(tokens)?;
        if tokens.len() > self.capacity - self.len {
            return Err(Error::invalid(
                "kv cache",
                format!(
                    "{} cached + {} new positions exceed the context of {}",
                    self.len,
                    tokens.len(),
                    self.capacity
                ),
            ));
        }
        Ok(())
    }

    /// Records one forward step of the `n` tokens in `tokens` at the cached positions into
    /// `pass`, up to the final norm, then the logits `which` asks for (if any; the first
    /// [`NLL_BLOCK`] rows of all) into the scratch's logits buffer. The scratch must be sized
    /// for them; the cache length is the caller's to advance.
    fn record_step(
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
        let matmul = MatmulOptions::default();
        // o_proj and down_proj add straight into the residual stream.
        let residual = MatmulOptions {
            output: MatmulOutput::AddScaled,
            ..matmul
        };
        embedding::record(ctx, pass, &self.embed, tokens, &s.x, n)?;
        for l in &self.layers {
            if fused {
                norm_matmul::record_qkv(
                    ctx,
                    pass,
                    &s.x,
                    n,
                    &l.input_layernorm,
                    eps,
                    &l.qkv,
                    &cos_sin,
                    &s.q_rot,
                    &l.keys,
                    &l.values,
                    start,
                    shape,
                )?;
            } else {
                rmsnorm::record_quant(ctx, pass, &s.x, &l.input_layernorm, &s.normed, eps)?;
                gpu::ternary_matmul::record(ctx, pass, &s.normed, &l.qkv, None, &s.qkv, matmul)?;
                rope::record_qkv(
                    ctx, pass, &s.qkv, &cos_sin, &s.q_rot, &l.keys, &l.values, start, n, shape,
                )?;
            }
            attention::record(
                ctx,
                pass,
                &s.q_rot,
                &l.keys,
                &l.values,
                &s.attn,
                n,
                start + n,
                shape,
            )?;
            if fused {
                let mut step = |x, norm, w, y, output| {
                    norm_matmul::record(ctx, pass, x, n, norm, eps, w, y, output)
                };
                step(
                    &s.attn,
                    &l.attn_sub_norm,
                    &l.o_proj,
                    &s.x,
                    NormMatmulOutput::Add,
                )?;
                step(
                    &s.x,
                    &l.post_attention_layernorm,
                    &l.gate_up,
                    &s.mlp,
                    NormMatmulOutput::Gated,
                )?;
                step(
                    &s.mlp,
                    &l.ffn_sub_norm,
                    &l.down_proj,
                    &s.x,
                    NormMatmulOutput::Add,
                )?;
                continue;
            }
            rmsnorm::record_quant(ctx, pass, &s.attn, &l.attn_sub_norm, &s.attn_acts, eps)?;
            gpu::ternary_matmul::record(ctx, pass, &s.attn_acts, &l.o_proj, None, &s.x, residual)?;
            rmsnorm::record_quant(ctx, pass, &s.x, &l.post_attention_layernorm, &s.normed, eps)?;
            gpu::ternary_matmul::record(
                ctx, pass, &s.normed, &l.gate_up, None, &s.gate_up, matmul,
            )?;
            relu2_gate::record(ctx, pass, &s.gate_up, &s.mlp, n, c.intermediate_size)?;
            rmsnorm::record_quant(ctx, pass, &s.mlp, &l.ffn_sub_norm, &s.mlp_acts, eps)?;
            gpu::ternary_matmul::record(
                ctx,
                pass,
                &s.mlp_acts,
                &l.down_proj,
                None,
                &s.x,
                residual,
            )?;
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
    fn record_logits(
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
