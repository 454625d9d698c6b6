//! Engines: a model together with the state a sequence needs (its KV cache), behind one
//! `forward(tokens) -> logits` call, plus the scoring helpers every engine's callers share.

use crate::cpu::nll;
#[cfg(feature = "gpu")]
use crate::gpu::GpuContext;
#[cfg(feature = "gpu")]
use crate::gpu::table::TableStorage;
#[cfg(feature = "gpu")]
use crate::model::GpuModel;
use crate::model::packed::{LmHead, PackedModel};
use crate::model::{KvCache, ModelConfig, WeightSource};
use crate::{Error, Result};

/// Embedding tables from this size (as f32) are kept as f16 on the GPU: 2B4T's 1.3 GB becomes
/// 0.66 GB, while small models keep f32 and give exactly the CPU reference's results.
#[cfg(feature = "gpu")]
const F16_TABLES_FROM_BYTES: usize = 256 << 20;

/// Which logits a forward step reads back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (`[vocab]`): what generation needs, and a prompt's lm_head costs
    /// one row instead of hundreds.
    Last,
    /// Every new token's (`[tokens, vocab]`), for perplexity. Made and read back 64
    /// rows at a time: a GPU buffer of them all would pass the storage binding limit (128 MiB on
    /// WebGPU by default) beyond 261 tokens at 2B4T's vocabulary of 128256.
    All,
}

/// Where a model runs ([`Engine::new`]) or trains ([`crate::train::run::TrainOptions`]), parsed
/// from `auto`, `gpu` or `cpu` (the CLI's `--device`, the page's choice).
///
/// ```
/// use bitnet_wgpu::model::Device;
/// assert_eq!("gpu".parse::<Device>()?, Device::Gpu);
/// assert!("tpu".parse::<Device>().unwrap_err().to_string().contains("auto, gpu or cpu"));
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(
    all(feature = "cli", not(target_arch = "wasm32")),
    derive(clap::ValueEnum)
)]
pub enum Device {
    /// The GPU when a hardware adapter opens and the model fits it, else the CPU. Natively a
    /// software adapter (lavapipe, SwiftShader: device type `Cpu`) counts as none, the CPU
    /// engine being faster; in the browser WebGPU is taken whatever runs it.
    #[default]
    Auto,
    /// The GPU (any adapter, software ones included) or an error.
    Gpu,
    /// The CPU engine.
    Cpu,
}

impl std::str::FromStr for Device {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Device::Auto),
            "gpu" => Ok(Device::Gpu),
            "cpu" => Ok(Device::Cpu),
            other => Err(Error::invalid(
                "device",
                format!("{other:?} is not a device (auto, gpu or cpu)"),
            )),
        }
    }
}

/// A model ready to run one sequence at a time, on the CPU engine or resident on a GPU.
pub enum Engine {
    Cpu(Box<CpuEngine>),
    #[cfg(feature = "gpu")]
    Gpu(Box<(GpuContext, GpuModel)>),
}

impl Engine {
    /// Starts `weights` on `device`. With [`Device::Auto`], a GPU that does not open, is a
    /// software adapter (natively) or cannot hold the model gives a CPU engine, and the second
    /// value says why; with [`Device::Gpu`] that is the error (a software adapter is used).
    pub async fn new(device: Device, weights: &dyn WeightSource) -> Result<(Self, Option<Error>)> {
        Self::with_head(device, weights, LmHead::Exact).await
    }

    /// As [`Engine::new`], a CPU engine (asked for, or fallen back to) keeping its lm_head as
    /// `head` ([`CpuEngine::with_head`]); a GPU engine computes the exact head whatever `head`.
    ///
    /// ```
    /// use bitnet_wgpu::model::{Device, Engine, LmHead, ModelConfig, synthetic};
    /// let config = ModelConfig {
    ///     vocab_size: 32, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 1,
    ///     num_attention_heads: 2, num_key_value_heads: 1, head_dim: 8, max_position_embeddings: 8,
    ///     ..ModelConfig::bitnet_b158_2b4t()
    /// };
    /// let weights = synthetic(&config, 1);
    /// let (engine, _) = pollster::block_on(Engine::with_head(Device::Cpu, &weights, LmHead::Int8))?;
    /// assert_eq!(engine.head(), Some(LmHead::Int8));
    /// # Ok::<(), bitnet_wgpu::Error>(())
    /// ```
    pub async fn with_head(
        device: Device,
        weights: &dyn WeightSource,
        head: LmHead,
    ) -> Result<(Self, Option<Error>)> {
        let cpu = || CpuEngine::with_head(weights, head).map(|e| Engine::Cpu(Box::new(e)));
        if device == Device::Cpu {
            return Ok((cpu()?, None));
        }
        match (Self::on_gpu(device, weights).await, device) {
            (Ok(engine), _) => Ok((engine, None)),
            (Err(e), Device::Gpu) => Err(e),
            (Err(e), _) => Ok((cpu()?, Some(e))),
        }
    }

    /// The GPU engine for `device` (`Auto` or `Gpu`), or why there is none.
    #[cfg(feature = "gpu")]
    async fn on_gpu(device: Device, weights: &dyn WeightSource) -> Result<Self> {
        let ctx = GpuContext::new().await?;
        let info = ctx.adapter_info();
        if device == Device::Auto
            && info.device_type == wgpu::DeviceType::Cpu
            && cfg!(not(target_arch = "wasm32"))
        {
            return Err(Error::NoAdapter(format!(
                "{} is a software adapter, slower than the CPU engine (--device gpu uses it)",
                info.name
            )));
        }
        let c = weights.config();
        // f16 tables round the embeddings; only big tables are worth that.
        let tables = if c.vocab_size * c.hidden_size * 4 >= F16_TABLES_FROM_BYTES {
            TableStorage::F16
        } else {
            TableStorage::F32
        };
        let model = GpuModel::new(&ctx, weights, c.max_position_embeddings, tables)?;
        Ok(Engine::Gpu(Box::new((ctx, model))))
    }

    #[cfg(not(feature = "gpu"))]
    async fn on_gpu(_: Device, _: &dyn WeightSource) -> Result<Self> {
        Err(Error::NoAdapter(
            "this build has no GPU support (bitnet-wgpu's `gpu` feature is off)".into(),
        ))
    }

    /// Logits of `tokens` after the positions already seen: `[tokens.len(), vocab]`, or, with
    /// `Logits::Last`, at least the last token's row (the GPU then computes only that one).
    pub async fn forward(&mut self, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        match self {
            Engine::Cpu(e) => e.forward_logits(tokens, which),
            #[cfg(feature = "gpu")]
            Engine::Gpu(gpu) => gpu.1.forward(&gpu.0, tokens, which).await,
        }
    }

    /// The negative log-likelihood of each token of `tokens` after the first, given those
    /// before it (after the positions already seen). The GPU computes them there and reads back
    /// only these numbers.
    pub async fn nll(&mut self, tokens: &[u32]) -> Result<Vec<f64>> {
        match self {
            Engine::Cpu(e) => {
                let vocab = e.config().vocab_size;
                let logits = e.forward(tokens)?;
                Ok(logits
                    .chunks_exact(vocab)
                    .zip(&tokens[1..])
                    .map(|(row, &next)| nll(row, next))
                    .collect())
            }
            #[cfg(feature = "gpu")]
            Engine::Gpu(gpu) => {
                let nll = gpu.1.nll(&gpu.0, tokens).await?;
                Ok(nll.into_iter().map(f64::from).collect())
            }
        }
    }

    /// Forgets the sequence.
    pub fn reset(&mut self) {
        match self {
            Engine::Cpu(e) => e.reset(),
            #[cfg(feature = "gpu")]
            Engine::Gpu(gpu) => gpu.1.reset(),
        }
    }

    /// Forgets the positions from `len` on (none when `len` is past the end), so that the
    /// sequence continues after its first `len` tokens: an edited conversation keeps the cache of
    /// the part that did not change.
    pub fn truncate(&mut self, len: usize) {
        match self {
            Engine::Cpu(e) => e.truncate(len),
            #[cfg(feature = "gpu")]
            Engine::Gpu(gpu) => gpu.1.truncate(len),
        }
    }

    /// Positions seen so far: the next token's position.
    pub fn position(&self) -> usize {
        match self {
            Engine::Cpu(e) => e.position(),
            #[cfg(feature = "gpu")]
            Engine::Gpu(gpu) => gpu.1.len(),
        }
    }

    pub fn config(&self) -> &ModelConfig {
        match self {
            Engine::Cpu(e) => e.config(),
            #[cfg(feature = "gpu")]
            Engine::Gpu(gpu) => gpu.1.config(),
        }
    }

    /// The CPU engine's lm_head ([`CpuEngine::head`]); `None` on a GPU, whose head is exact.
    pub fn head(&self) -> Option<LmHead> {
        match self {
            Engine::Cpu(e) => Some(e.head()),
            #[cfg(feature = "gpu")]
            Engine::Gpu(_) => None,
        }
    }

    /// What runs the model: "cpu" or the adapter's name.
    pub fn adapter(&self) -> String {
        match self {
            Engine::Cpu(_) => "cpu".into(),
            #[cfg(feature = "gpu")]
            Engine::Gpu(gpu) => gpu.0.adapter_name(),
        }
    }
}

/// The CPU engine with its own KV cache: each [`CpuEngine::forward`] continues the sequence
/// where the previous one stopped. Its logits equal the reference [`crate::model::forward`]'s bit
/// for bit; the weights stay packed (2 bits per ternary weight) and the products run on SIMD
/// integer dot products over all cores ([`crate::cpu::fast`]).
///
/// ```
/// # use bitnet_wgpu::model::{CpuEngine, ModelWeights};
/// # fn run(weights: ModelWeights) -> bitnet_wgpu::Result<()> {
/// let mut engine = CpuEngine::new(&weights)?;
/// let prompt = engine.forward(&[1, 2, 3])?; // [3, vocab]
/// let next = engine.forward(&[4])?; // [1, vocab], position 3
/// engine.reset(); // a new sequence
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct CpuEngine {
    model: PackedModel,
    cache: KvCache,
}

impl CpuEngine {
    /// An engine over `weights`, read a part at a time, each part checked
    /// ([`crate::model::ModelWeights::validate`]'s checks) and packed. On Linux with glibc the
    /// first engine of a process also asks malloc to keep freed memory for reuse
    /// (`M_MMAP_THRESHOLD` 32 MiB, `M_TRIM_THRESHOLD` 1 GiB): a prompt's activations are
    /// allocated and freed layer by layer, and returning them to the kernel each time cost 10%
    /// of a prompt's speed.
    pub fn new(weights: &dyn WeightSource) -> Result<Self> {
        Self::with_head(weights, LmHead::Exact)
    }

    /// As [`CpuEngine::new`], with the lm_head kept as `head` says ([`LmHead::Int8`]: faster
    /// decoding, the same greedy ids, the logits that could be the largest equal to the
    /// reference's and the others close).
    pub fn with_head(weights: &dyn WeightSource, head: LmHead) -> Result<Self> {
        let model = PackedModel::new(weights, head)?;
        let cache = KvCache::new(weights.config());
        Ok(CpuEngine { model, cache })
    }

    /// Logits `[tokens.len(), vocab_size]` of `tokens` placed after the positions seen so far; the
    /// cache advances by `tokens.len()`. Errors are those of [`forward`] (no tokens, an id outside
    /// the vocabulary, past `max_position_embeddings`); the cache is unchanged after one.
    pub fn forward(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.forward_logits(tokens, Logits::All)
    }

    /// As [`CpuEngine::forward`]; with [`Logits::Last`] only the last token's row (`[vocab]`)
    /// is computed, all that generation needs.
    pub fn forward_logits(&mut self, tokens: &[u32], which: Logits) -> Result<Vec<f32>> {
        self.model.forward(tokens, &mut self.cache, which)
    }

    /// An empty cache for a sequence of its own, decoded with others by
    /// [`CpuEngine::forward_batch`].
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.config())
    }

    /// Runs several sequences one step each, in one pass over the weights: each `(cache,
    /// tokens)` places `tokens` after the positions its cache holds (a prompt, a part of one, or
    /// one decoded token) and advances the cache. Returns the logits of each sequence's last
    /// token, `[work.len(), vocab]`, each row bit for bit what that sequence gets alone. A
    /// batch of sequences decoding a token each reads every weight once instead of once per
    /// sequence.
    ///
    /// Errors (every cache then unchanged): those of [`CpuEngine::forward`] for any sequence,
    /// naming its index.
    ///
    /// ```
    /// # use bitnet_wgpu::model::{CpuEngine, ModelWeights};
    /// # fn run(weights: ModelWeights) -> bitnet_wgpu::Result<()> {
    /// let mut engine = CpuEngine::new(&weights)?;
    /// let (mut a, mut b) = (engine.new_cache(), engine.new_cache());
    /// let logits = engine.forward_batch(&mut [(&mut a, &[1, 2, 3]), (&mut b, &[4])])?;
    /// assert_eq!(logits.len(), 2 * engine.config().vocab_size);
    /// assert_eq!((a.len(), b.len()), (3, 1));
    /// # Ok(()) }
    /// ```
    pub fn forward_batch(&mut self, work: &mut [(&mut KvCache, &[u32])]) -> Result<Vec<f32>> {
        self.model.forward_last(work)
    }

    /// Forgets the sequence, to start a new one.
    pub fn reset(&mut self) {
        self.cache.clear();
    }

    /// Forgets the positions from `len` on ([`KvCache::truncate`]).
    pub fn truncate(&mut self, len: usize) {
        self.cache.truncate(len);
    }

    /// Positions seen so far: the next token's position.
    pub fn position(&self) -> usize {
        self.cache.len()
    }

    pub fn config(&self) -> &ModelConfig {
        self.model.config()
    }

    /// Bytes the weights take in memory (ternary weights at 2 bits, tables, norms).
    pub fn weight_bytes(&self) -> usize {
        self.model.bytes()
    }

    /// How the engine keeps its lm_head ([`CpuEngine::with_head`]).
    pub fn head(&self) -> LmHead {
        self.model.head()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{WeightQuantOptions, weight_quant};
    use crate::model::Family;
    use crate::model::{LayerWeights, ModelWeights, forward};

    fn tiny_weights() -> ModelWeights {
        let config = ModelConfig {
            family: Default::default(),
            vocab_size: 11,
            hidden_size: 8,
            intermediate_size: 12,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 4,
            max_position_embeddings: 6,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_id: None,
        };
        // Deterministic, varied values without a generator: a scrambled sine.
        let values = |len: usize, salt: usize| -> Vec<f32> {
            (0..len)
                .map(|i| ((i * 7919 + salt * 104_729) as f32 * 0.618).sin())
                .collect()
        };
        let linear = |rows: usize, cols: usize, salt: usize| {
            weight_quant(
                &values(rows * cols, salt),
                rows,
                cols,
                WeightQuantOptions::default(),
            )
            .unwrap()
        };
        let layer = LayerWeights {
            input_layernorm: vec![1.0; 8],
            q_proj: linear(8, 8, 1),
            k_proj: linear(4, 8, 2),
            v_proj: linear(4, 8, 3),
            o_proj: linear(8, 8, 4),
            attn_sub_norm: vec![1.0; 8],
            post_attention_layernorm: vec![1.0; 8],
            gate_proj: linear(12, 8, 5),
            up_proj: linear(12, 8, 6),
            down_proj: linear(8, 12, 7),
            ffn_sub_norm: vec![1.0; 12],
        };
        ModelWeights {
            config,
            embed_tokens: values(11 * 8, 8),
            layers: vec![layer],
            norm: vec![1.0; 8],
            lm_head: None,
        }
    }

    #[test]
    fn engine_continues_the_sequence_and_resets() {
        let weights = tiny_weights();
        let mut engine = CpuEngine::new(&weights).unwrap();
        let all = engine.forward(&[1, 2, 3]).unwrap();
        assert_eq!((all.len(), engine.position()), (33, 3));
        engine.reset();
        engine.forward(&[1, 2]).unwrap();
        let last = engine.forward(&[3]).unwrap();
        assert_eq!(last, all[22..]);
        // Past the context limit: an error, and the cache stays where it was.
        assert!(engine.forward(&[1, 2, 3, 4]).is_err());
        assert_eq!(engine.position(), 3);
        assert!(engine.forward(&[11]).is_err());
        assert_eq!(engine.config().vocab_size, 11);
        // Linears at 2 bits per weight, rows padded to 128 (one scale per row), the f32 table
        // padded to 64 rows, the norms.
        let linears = 8 + 4 + 4 + 8 + 12 + 12 + 8;
        let (table, norms) = (4 * 64 * 8, 4 * (8 + 8 + 8 + 12 + 8));
        assert_eq!(
            engine.weight_bytes(),
            linears * 32 + 4 * linears + table + norms
        );
    }

    fn floats(rng: &mut rand::rngs::SmallRng, len: usize, lo: f32, hi: f32) -> Vec<f32> {
        use rand::Rng;
        (0..len).map(|_| rng.random_range(lo..hi)).collect()
    }

    /// A random model of `config`: latent weights quantized per tensor or per channel, norms
    /// near 1, the tables f16-exact for even seeds (as a GGUF's F16 table), tied or not.
    fn random_model(config: ModelConfig, seed: u64, per_channel: bool) -> ModelWeights {
        use crate::cpu::ScaleGranularity;
        use rand::SeedableRng;
        let rng = &mut rand::rngs::SmallRng::seed_from_u64(seed);
        let c = config.clone();
        let (hidden, inter) = (c.hidden_size, c.intermediate_size);
        let (attn, kv) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let granularity = if per_channel {
            ScaleGranularity::PerChannel
        } else {
            ScaleGranularity::PerTensor
        };
        let opts = WeightQuantOptions {
            granularity,
            threshold: 0.5,
        };
        let [_, attn_sub, _, ffn_sub] = c.layer_norms();
        let sub_norms = [attn_sub.len, ffn_sub.len];
        let linear = |rng: &mut _, rows: usize, cols: usize| {
            weight_quant(&floats(rng, rows * cols, -0.1, 0.1), rows, cols, opts).unwrap()
        };
        let layers = (0..c.num_hidden_layers)
            .map(|_| LayerWeights {
                input_layernorm: floats(rng, hidden, 0.8, 1.2),
                q_proj: linear(rng, attn, hidden),
                k_proj: linear(rng, kv, hidden),
                v_proj: linear(rng, kv, hidden),
                o_proj: linear(rng, hidden, attn),
                attn_sub_norm: floats(rng, sub_norms[0], 0.8, 1.2),
                post_attention_layernorm: floats(rng, hidden, 0.8, 1.2),
                gate_proj: linear(rng, inter, hidden),
                up_proj: linear(rng, inter, hidden),
                down_proj: linear(rng, hidden, inter),
                ffn_sub_norm: floats(rng, sub_norms[1], 0.8, 1.2),
            })
            .collect();
        let table_len = c.vocab_size * hidden;
        let table = |rng: &mut _| {
            let mut t = floats(rng, table_len, -1.0, 1.0);
            if seed.is_multiple_of(2) {
                t.iter_mut()
                    .for_each(|v| *v = half::f16::from_f32(*v).to_f32());
            }
            t
        };
        ModelWeights {
            embed_tokens: table(rng),
            layers,
            norm: floats(rng, hidden, 0.8, 1.2),
            lm_head: (!c.tie_word_embeddings).then(|| table(rng)),
            config,
        }
    }

    #[test]
    fn cpu_engine_equals_the_reference_bit_for_bit() {
        let same_bits = |a: &[f32], b: &[f32]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
        };
        // (hidden, intermediate, heads, kv heads, head_dim, vocab, tied): odd sizes, sizes just
        // past a 128-weight block, grouped-query and plain heads; the families in turn.
        let shapes = [
            (40, 56, 2, 1, 20, 37, true),
            (67, 45, 3, 1, 6, 50, false),
            (129, 257, 4, 2, 34, 33, true),
            (256, 384, 4, 4, 64, 300, false),
            (10, 7, 5, 5, 2, 17, true),
        ];
        for (seed, &(hidden, inter, heads, kv_heads, head_dim, vocab, tied)) in
            shapes.iter().enumerate()
        {
            let config = ModelConfig {
                family: Family::ALL[seed % Family::ALL.len()],
                vocab_size: vocab,
                hidden_size: hidden,
                intermediate_size: inter,
                num_hidden_layers: 2,
                num_attention_heads: heads,
                num_key_value_heads: kv_heads,
                head_dim,
                max_position_embeddings: 12,
                rms_norm_eps: 1e-5,
                rope_theta: 10_000.0,
                tie_word_embeddings: tied,
                bos_token_id: None,
                eos_token_id: None,
            };
            let weights = random_model(config, seed as u64, seed % 3 == 1);
            let mut engine = CpuEngine::new(&weights).unwrap();
            let mut cache = KvCache::new(&weights.config);
            let v = vocab as u32;
            // A prompt, single decoding steps, a chunk, then a last-row-only step.
            for (step, tokens) in [
                vec![1, v - 1, 0, 5 % v, 2],
                vec![3],
                vec![v / 2],
                vec![4, 4, 1],
            ]
            .iter()
            .enumerate()
            {
                let want = forward(&weights, tokens, &mut cache).unwrap();
                let got = engine.forward(tokens).unwrap();
                assert!(
                    same_bits(&got, &want),
                    "shape {seed} ({:?}), step {step}",
                    weights.config.family
                );
                assert!(want.iter().all(|x| x.is_finite()));
            }
            let want = forward(&weights, &[2], &mut cache.clone()).unwrap();
            let last = engine.forward_logits(&[2], Logits::Last).unwrap();
            assert!(same_bits(&last, &want), "shape {seed}, last row");
            assert_eq!(engine.position(), 11);
            let (keys, values) = cache.layer(1).unwrap();
            let (k2, v2) = engine.cache.layer(1).unwrap();
            assert!(same_bits(keys, &k2[..keys.len()]) && same_bits(values, &v2[..values.len()]));
        }
    }

    #[test]
    fn a_batch_gives_each_sequence_its_solo_logits() {
        let config = ModelConfig {
            family: Family::Llama,
            vocab_size: 45,
            hidden_size: 67,
            intermediate_size: 45,
            num_hidden_layers: 2,
            num_attention_heads: 3,
            num_key_value_heads: 1,
            head_dim: 6,
            max_position_embeddings: 16,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_word_embeddings: false,
            bos_token_id: None,
            eos_token_id: None,
        };
        let weights = random_model(config, 3, true);
        let vocab = weights.config.vocab_size;
        let mut engine = CpuEngine::new(&weights).unwrap();
        let prompts: [&[u32]; 4] = [&[1, 2, 3, 4, 5], &[7], &[44, 0], &[9, 9, 9]];
        let solo: Vec<Vec<f32>> = prompts
            .iter()
            .map(|p| {
                let mut cache = engine.new_cache();
                let mut logits = Vec::new();
                for step in [&p[..], &[3], &[p[0]]] {
                    let all = engine.forward_batch(&mut [(&mut cache, step)]).unwrap();
                    logits.extend(all);
                }
                logits
            })
            .collect();
        // Together: first every prompt, then a token each, then (sequence 1 having left) the
        // rest, sequence 3 joining late.
        let mut caches: [KvCache; 4] = std::array::from_fn(|_| engine.new_cache());
        let mut got = vec![Vec::new(); 4];
        let [c0, c1, c2, c3] = caches.each_mut();
        let out = engine
            .forward_batch(&mut [(c0, prompts[0]), (c1, prompts[1]), (c2, prompts[2])])
            .unwrap();
        for (i, row) in out.chunks_exact(vocab).enumerate() {
            got[i].extend_from_slice(row);
        }
        let out = engine
            .forward_batch(&mut [(c0, &[3]), (c1, &[3]), (c2, &[3]), (c3, prompts[3])])
            .unwrap();
        for (i, row) in out.chunks_exact(vocab).enumerate() {
            got[i].extend_from_slice(row);
        }
        let out = engine
            .forward_batch(&mut [(c0, &[1]), (c2, &[44]), (c1, &[7]), (c3, &[3])])
            .unwrap();
        for (i, row) in [0, 2, 1, 3].into_iter().zip(out.chunks_exact(vocab)) {
            got[i].extend_from_slice(row);
        }
        let out = engine.forward_batch(&mut [(c3, &[9])]).unwrap();
        got[3].extend_from_slice(&out);
        for (i, (got, want)) in got.iter().zip(&solo).enumerate() {
            assert_eq!(got.len(), want.len(), "sequence {i}");
            assert!(
                got.iter()
                    .zip(want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "sequence {i}"
            );
        }
        // One sequence past the context: an error naming it, and no cache moves.
        let lens: Vec<usize> = caches.iter().map(KvCache::len).collect();
        let [c0, c1, ..] = caches.each_mut();
        let e = engine
            .forward_batch(&mut [(c0, &[1]), (c1, &[1; 14])])
            .unwrap_err();
        assert!(e.to_string().contains("sequence 1"), "{e}");
        assert_eq!(caches.iter().map(KvCache::len).collect::<Vec<_>>(), lens);
        assert!(engine.forward_batch(&mut []).unwrap().is_empty());
    }

    #[test]
    fn an_int8_head_keeps_the_greedy_ids_and_their_logits() {
        // (hidden, vocab, tied): a row past one 128-column block, a vocabulary past 16 rows.
        for (seed, (hidden, vocab, tied)) in
            [(130, 37, true), (64, 50, false)].into_iter().enumerate()
        {
            let config = ModelConfig {
                vocab_size: vocab,
                hidden_size: hidden,
                intermediate_size: 96,
                num_attention_heads: 2,
                num_key_value_heads: 1,
                head_dim: 16,
                tie_word_embeddings: tied,
                max_position_embeddings: 8,
                ..tiny_weights().config
            };
            let weights = random_model(config, seed as u64, false);
            let mut exact = CpuEngine::new(&weights).unwrap();
            let mut int8 = CpuEngine::with_head(&weights, LmHead::Int8).unwrap();
            for tokens in [&[1, 2, 3][..], &[4]] {
                let (want, got) = (
                    exact.forward(tokens).unwrap(),
                    int8.forward(tokens).unwrap(),
                );
                assert_eq!(got.len(), want.len());
                for (w, g) in want.chunks_exact(vocab).zip(got.chunks_exact(vocab)) {
                    let id = crate::cpu::argmax(w).unwrap();
                    assert_eq!(crate::cpu::argmax(g).unwrap(), id);
                    assert_eq!(g[id as usize].to_bits(), w[id as usize].to_bits());
                    let largest = w.iter().fold(0.0f32, |m, x| m.max(x.abs()));
                    for (a, b) in w.iter().zip(g) {
                        assert!((a - b).abs() < 0.02 * largest, "{a} against {b}");
                    }
                }
            }
            // The screen (a byte per value, rows to 16, columns to 128, and per row a scale,
            // a sum per 128 columns and one in all) is held beside the float table.
            let blocks = hidden.div_ceil(128);
            let screen =
                vocab.next_multiple_of(16) * (hidden.next_multiple_of(128) + 8 + 2 * blocks);
            if tied {
                // The embeddings row-major instead of interleaved (rows to 64), f16 both ways
                // (seed 0's tables are f16-exact).
                let padding = (vocab.next_multiple_of(64) - vocab) * hidden * 2;
                assert_eq!(int8.weight_bytes(), exact.weight_bytes() + screen - padding);
            } else {
                assert!(int8.weight_bytes() > exact.weight_bytes());
            }
        }
    }

    /// A GGUF file's tables, mapped, are read where they lie: the engine holds neither the
    /// embeddings (its lookups and the screen's exact rows read the file) nor, with the exact
    /// head untied, a copy of them, and its logits are those of an engine over the same bytes
    /// in memory.
    #[test]
    #[cfg(not(target_arch = "wasm32"))]
    fn a_mapped_gguf_keeps_its_tables_in_the_file() {
        use crate::formats::gguf::{GgufFile, GgufModel, TableType, write_model};
        use crate::formats::map;
        for (seed, tied) in [(2u64, true), (4, false)] {
            let config = ModelConfig {
                vocab_size: 70,
                hidden_size: 128,
                intermediate_size: 96,
                num_attention_heads: 2,
                num_key_value_heads: 1,
                head_dim: 64,
                tie_word_embeddings: tied,
                max_position_embeddings: 8,
                ..tiny_weights().config
            };
            let weights = random_model(config, seed, false);
            let bytes = write_model(&weights, None, TableType::F16).unwrap();
            let path = std::env::temp_dir()
                .join(format!("bitnet-mapped-{}-{seed}.gguf", std::process::id()));
            std::fs::write(&path, &bytes).unwrap();
            let mapped = GgufModel::new(
                GgufFile::from_map(std::sync::Arc::new(map(&path).unwrap())).unwrap(),
            )
            .unwrap();
            let in_memory = GgufModel::new(GgufFile::parse(&bytes).unwrap()).unwrap();
            let table = 70 * 128 * 2;
            for head in [LmHead::Exact, LmHead::Int8] {
                let mut from_file = CpuEngine::with_head(&mapped, head).unwrap();
                let mut from_bytes = CpuEngine::with_head(&in_memory, head).unwrap();
                let held = from_bytes.weight_bytes() - from_file.weight_bytes();
                // Interleaved tables (rows to 64) stay copies; row-major ones do not.
                match (tied, head) {
                    (true, LmHead::Exact) => assert_eq!(held, 0),
                    (false, LmHead::Exact) | (true, LmHead::Int8) => assert_eq!(held, table),
                    (false, LmHead::Int8) => assert_eq!(held, 2 * table),
                }
                for tokens in [&[1, 2, 3][..], &[69]] {
                    let (a, b) = (
                        from_file.forward(tokens).unwrap(),
                        from_bytes.forward(tokens).unwrap(),
                    );
                    assert_eq!(
                        a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                    );
                }
            }
            drop(mapped);
            std::fs::remove_file(&path).unwrap();
        }
    }

    #[test]
    fn engine_refuses_inconsistent_weights() {
        let mut weights = tiny_weights();
        weights.norm.pop();
        assert!(CpuEngine::new(&weights).is_err());
    }
}
