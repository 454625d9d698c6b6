//! The CPU reference forward pass of every model family, with a KV cache.
//!
//! This is the specification the other engines are tested against: every step is one of the
//! [`crate::cpu`] operations, in the order of transformers' `BitNetForCausalLM` and
//! `LlamaForCausalLM` with BitLinear layers.

use crate::cpu::{
    AttentionShape, QuantizedActivations, act_quant, attention, rmsnorm, rope, ternary_matmul,
};
use crate::model::layer::{CpuDecoder, Segment, run_decoder_layers};
use crate::model::schema::linear_shapes;
use crate::model::{LayerWeights, ModelConfig, ModelWeights};
use crate::{Error, Result};

/// The keys and values of every position seen so far, per layer, so that a new token costs one
/// row of work instead of re-running the whole prefix.
///
/// Keys are stored after RoPE, as transformers caches them. Each layer holds two row-major
/// matrices `[len, kv_heads * head_dim]`, growing one row per position up to
/// `max_position_embeddings` (the positions the model was trained on; further ones are refused).
/// Two caches are equal when those are (an engine's copy of the keys is derived from them).
#[derive(Clone, Debug)]
pub struct KvCache {
    /// Per layer, `[len, kv_width]` keys after RoPE.
    keys: Vec<Vec<f32>>,
    /// Per layer, `[len, kv_width]` values.
    values: Vec<Vec<f32>>,
    /// Per layer, the keys again in an engine's own layout (the CPU engine's attention reads
    /// them transposed), brought up to date by that engine.
    engine_keys: Vec<EngineKeys>,
    kv_width: usize,
    len: usize,
    max_len: usize,
}

impl PartialEq for KvCache {
    fn eq(&self, other: &Self) -> bool {
        (
            &self.keys,
            &self.values,
            self.kv_width,
            self.len,
            self.max_len,
        ) == (
            &other.keys,
            &other.values,
            other.kv_width,
            other.len,
            other.max_len,
        )
    }
}

impl KvCache {
    /// An empty cache shaped for `config`; it allocates as positions arrive.
    pub fn new(config: &ModelConfig) -> Self {
        KvCache {
            keys: vec![Vec::new(); config.num_hidden_layers],
            values: vec![Vec::new(); config.num_hidden_layers],
            engine_keys: vec![EngineKeys::default(); config.num_hidden_layers],
            kv_width: config.num_key_value_heads * config.head_dim,
            len: 0,
            max_len: config.max_position_embeddings,
        }
    }

    /// The bytes a position takes in the CPU engine's cache: every layer's key and value rows
    /// in f32, and the keys' transposed copy its attention reads.
    pub fn cpu_bytes_per_position(config: &ModelConfig) -> usize {
        3 * 4 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    }

    /// Positions cached so far; the next token gets this position.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is cached (the next token starts a sequence).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The most positions the cache accepts (`max_position_embeddings`).
    pub fn capacity(&self) -> usize {
        self.max_len
    }

    /// Forgets every position, keeping the allocations, to start a new sequence.
    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Layer `layer`'s keys (after RoPE) and values, each `[len, kv_heads * head_dim]`, so that a
    /// GPU cache can be compared with this one.
    pub fn layer(&self, layer: usize) -> Option<(&[f32], &[f32])> {
        Some((self.keys.get(layer)?, self.values.get(layer)?))
    }

    /// Drops every position from `len` on (none when `len` is past the end).
    pub fn truncate(&mut self, len: usize) {
        let len = len.min(self.len);
        for rows in self.keys.iter_mut().chain(&mut self.values) {
            rows.truncate(len * self.kv_width);
        }
        for keys in &mut self.engine_keys {
            keys.positions = keys.positions.min(len);
        }
        self.len = len;
    }

    /// Refuses a cache made for another model shape.
    fn check_fits(&self, config: &ModelConfig) -> Result<()> {
        let expected = KvCache::new(config);
        if (self.keys.len(), self.kv_width, self.max_len)
            != (expected.keys.len(), expected.kv_width, expected.max_len)
        {
            return Err(Error::invalid(
                "kv cache",
                format!(
                    "made for {} layers x {} kv columns x {} positions, the model has {} x {} x {}",
                    self.keys.len(),
                    self.kv_width,
                    self.max_len,
                    expected.keys.len(),
                    expected.kv_width,
                    expected.max_len
                ),
            ));
        }
        Ok(())
    }
}

impl ModelWeights {
    /// Checks that the configuration is usable and every tensor has the shape it implies, so that
    /// a bad file fails here with the tensor's name rather than deep inside a matmul.
    ///
    /// `lm_head: None` means tied to `embed_tokens`, whatever `tie_word_embeddings` says. The
    /// sub-norms are checked against the attention width `heads * head_dim` and the intermediate
    /// size (transformers sizes `attn_sub_norm` by `hidden_size`, equal to the attention width in
    /// every released config).
    pub fn validate(&self) -> Result<()> {
        let c = &self.config;
        c.validate()?;
        if self.layers.len() != c.num_hidden_layers {
            return Err(Error::shape(
                "decoder layers",
                c.num_hidden_layers,
                self.layers.len(),
            ));
        }
        let table = c.vocab_size * c.hidden_size;
        check_len("model.embed_tokens", table, self.embed_tokens.len())?;
        check_len("model.norm", c.hidden_size, self.norm.len())?;
        if let Some(head) = &self.lm_head {
            check_len("lm_head", table, head.len())?;
        }
        self.layers
            .iter()
            .try_for_each(|layer| check_layer(c, layer))
    }
}

/// Checks one decoder layer's tensors against the configuration.
pub(super) fn check_layer(c: &ModelConfig, layer: &LayerWeights) -> Result<()> {
    for (spec, norm) in c.layer_norms().into_iter().zip(layer.norms()) {
        check_len(spec.hf, spec.len, norm.len())?;
    }
    for ((name, rows, cols), w) in linear_shapes(c).into_iter().zip(layer.linears()) {
        let consistent =
            w.codes.len() == w.rows * w.cols && (w.scales.len() == 1 || w.scales.len() == w.rows);
        if (w.rows, w.cols) != (rows, cols) || !consistent {
            return Err(Error::shape(
                name,
                format!("{rows} x {cols} codes with 1 or {rows} scales"),
                format!(
                    "{} x {} ({} codes, {} scales)",
                    w.rows,
                    w.cols,
                    w.codes.len(),
                    w.scales.len()
                ),
            ));
        }
    }
    Ok(())
}

/// A named length check.
pub(super) fn check_len(what: &'static str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(Error::shape(what, expected, got))
    }
}

/// Runs `tokens` through the model after the positions `cache` holds, appends their keys and
/// values to it, and returns their logits `[tokens.len(), vocab_size]`, row-major.
///
/// A prompt can go in at once or token by token: every step works on rows independently (causal
/// attention aside), so both give the same logits bit for bit. The embeddings go through the
/// decoder layers of the model's family (the steps are in [`crate::model::layer`]'s
/// `run_decoder_layers`: input norm, q/k/v, RoPE, attention, o_proj, post-attention norm, gated
/// MLP, each linear an exact ternary product of its own int8-quantized input), then `logits = norm(x) · lm_headᵀ` in plain f32 (`lm_head` or the tied `embed_tokens`; it is
/// not a BitLinear). Errors, raised before the cache is touched: weights that fail
/// [`ModelWeights::validate`], a cache made for another shape, no tokens, a token id not below
/// `vocab_size`, and more positions than `max_position_embeddings`.
pub fn forward(weights: &ModelWeights, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
    weights.validate()?;
    cache.extend_with(&weights.config, tokens, |cache| {
        run_layers(weights, tokens, cache)
    })
}

impl KvCache {
    /// Checks `tokens` against `config` and the positions left, then runs `layers`, which
    /// appends one row per token to every layer's keys and values ([`KvCache::append`]):
    /// the cache advances when it succeeds and is left as it was when it fails.
    pub(super) fn extend_with<T>(
        &mut self,
        config: &ModelConfig,
        tokens: &[u32],
        layers: impl FnOnce(&mut Self) -> Result<T>,
    ) -> Result<T> {
        extend_caches(config, &mut [(self, tokens)], |segments| {
            layers(&mut *segments[0].cache)
        })
    }

    /// Appends rows of keys (`[rows, kv_width]`, after RoPE) and values to layer `layer`.
    pub(super) fn append(&mut self, layer: usize, keys: &[f32], values: &[f32]) {
        self.keys[layer].extend_from_slice(keys);
        self.values[layer].extend_from_slice(values);
    }

    /// Layer `layer`'s keys and values so far, for attention.
    pub(super) fn layer_view(&mut self, layer: usize) -> LayerView<'_> {
        LayerView {
            keys: &self.keys[layer],
            values: &self.values[layer],
            engine_keys: &mut self.engine_keys[layer],
        }
    }
}

/// One layer's cached keys and values (`[positions, kv_width]` each), and the engine's own
/// copy of the keys to bring up to date.
pub(super) struct LayerView<'a> {
    pub keys: &'a [f32],
    pub values: &'a [f32],
    pub engine_keys: &'a mut EngineKeys,
}

/// An engine's copy of a layer's keys in its own layout: `values`, holding the first
/// `positions` positions (a truncated cache lowers `positions`; what lies past it is stale).
#[derive(Clone, Debug, Default)]
pub struct EngineKeys {
    pub(crate) values: Vec<f32>,
    pub(crate) positions: usize,
}

/// [`KvCache::extend_with`] for several sequences at once: checks every cache and its tokens
/// (an error names the sequence's index when there are several), then runs `layers` on their
/// segments; every cache advances when it succeeds and is left as it was when it fails.
pub(super) fn extend_caches<T>(
    config: &ModelConfig,
    work: &mut [(&mut KvCache, &[u32])],
    layers: impl FnOnce(&mut [Segment<'_>]) -> Result<T>,
) -> Result<T> {
    let several = work.len() > 1;
    let mut starts = Vec::with_capacity(work.len());
    for (index, (cache, tokens)) in work.iter().enumerate() {
        let checked = cache.check_fits(config).and_then(|()| {
            config.check_tokens(tokens)?;
            let start = cache.len;
            if tokens.len() > cache.max_len - start {
                return Err(Error::invalid(
                    "kv cache",
                    format!(
                        "{start} cached + {} new positions exceed max_position_embeddings {}",
                        tokens.len(),
                        cache.max_len
                    ),
                ));
            }
            Ok(start)
        });
        match checked {
            Ok(start) => starts.push(start),
            Err(e) if several => {
                return Err(Error::invalid("batch", format!("sequence {index}: {e}")));
            }
            Err(e) => return Err(e),
        }
    }
    let mut segments: Vec<Segment<'_>> = work
        .iter_mut()
        .map(|(cache, tokens)| Segment {
            cache,
            tokens: tokens.len(),
        })
        .collect();
    let result = layers(&mut segments);
    for (segment, start) in segments.iter_mut().zip(starts) {
        match &result {
            Ok(_) => segment.cache.len = start + segment.tokens,
            Err(_) => segment.cache.truncate(start),
        }
    }
    result
}

/// The forward proper, on checked inputs; it appends to the cache's rows but leaves its length
/// to the caller, which rolls back on error.
fn run_layers(weights: &ModelWeights, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
    let c = &weights.config;
    let (n, hidden, eps) = (tokens.len(), c.hidden_size, c.rms_norm_eps);
    let mut x: Vec<f32> = tokens
        .iter()
        .flat_map(|&id| embedding_row(&weights.embed_tokens, hidden, id as usize))
        .copied()
        .collect();
    run_decoder_layers(
        &Reference(weights),
        &mut x,
        &mut [Segment { cache, tokens: n }],
    )?;
    let x = rmsnorm(&x, n, &weights.norm, eps)?;
    let head = weights.lm_head.as_deref().unwrap_or(&weights.embed_tokens);
    Ok(x.chunks_exact(hidden)
        .flat_map(|row| head.chunks_exact(hidden).map(move |w| dot(row, w)))
        .collect())
}

/// The reference's layer operations: each linear its own exact ternary product, RoPE and
/// attention as [`crate::cpu`] defines them.
struct Reference<'a>(&'a ModelWeights);

impl CpuDecoder for Reference<'_> {
    fn config(&self) -> &ModelConfig {
        &self.0.config
    }

    fn norms(&self, layer: usize) -> [&[f32]; 4] {
        self.0.layers[layer].norms()
    }

    fn qkv(&self, layer: usize, h: &QuantizedActivations) -> Result<[Vec<f32>; 3]> {
        let l = &self.0.layers[layer];
        Ok([
            ternary_matmul(h, &l.q_proj, None)?,
            ternary_matmul(h, &l.k_proj, None)?,
            ternary_matmul(h, &l.v_proj, None)?,
        ])
    }

    fn o_proj(&self, layer: usize, a: &QuantizedActivations) -> Result<Vec<f32>> {
        ternary_matmul(a, &self.0.layers[layer].o_proj, None)
    }

    fn gate_up(&self, layer: usize, h: &QuantizedActivations) -> Result<[Vec<f32>; 2]> {
        let l = &self.0.layers[layer];
        Ok([
            ternary_matmul(h, &l.gate_proj, None)?,
            ternary_matmul(h, &l.up_proj, None)?,
        ])
    }

    fn down_proj(&self, layer: usize, m: &QuantizedActivations) -> Result<Vec<f32>> {
        ternary_matmul(m, &self.0.layers[layer].down_proj, None)
    }

    fn rmsnorm(&self, x: &[f32], rows: usize, weight: &[f32], eps: f32) -> Result<Vec<f32>> {
        rmsnorm(x, rows, weight, eps)
    }

    fn act_quant(&self, x: &[f32], rows: usize, cols: usize) -> Result<QuantizedActivations> {
        act_quant(x, rows, cols)
    }

    fn rope(&self, x: &mut [f32], positions: &[usize], heads: usize) -> Result<()> {
        let c = &self.0.config;
        rope(x, positions, heads, c.head_dim, c.rope_theta)
    }

    fn attention(
        &self,
        q: &[f32],
        cache: LayerView<'_>,
        shape: AttentionShape,
    ) -> Result<Vec<f32>> {
        attention(q, cache.keys, cache.values, shape)
    }
}

/// Row `id` of a `[vocab, hidden]` table.
fn embedding_row(table: &[f32], hidden: usize, id: usize) -> &[f32] {
    &table[id * hidden..][..hidden]
}

/// Left-to-right f32 dot product (the float `lm_head`).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(&x, &y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{TernaryWeights, WeightQuantOptions, weight_quant};
    use rand::{Rng, SeedableRng, rngs::SmallRng};

    fn tiny_config(tied: bool) -> ModelConfig {
        ModelConfig {
            family: Default::default(),
            vocab_size: 37,
            hidden_size: 40,
            intermediate_size: 56,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 20,
            max_position_embeddings: 16,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_word_embeddings: tied,
            bos_token_id: Some(0),
            eos_token_id: Some(1),
        }
    }

    fn floats(rng: &mut SmallRng, len: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(lo..hi)).collect()
    }

    fn linear(rng: &mut SmallRng, rows: usize, cols: usize) -> TernaryWeights {
        let w = floats(rng, rows * cols, -0.1, 0.1);
        weight_quant(&w, rows, cols, WeightQuantOptions::default()).unwrap()
    }

    /// A random model: latent weights quantized with `weight_quant`, norms near 1.
    fn tiny_model(tied: bool, seed: u64) -> ModelWeights {
        let config = tiny_config(tied);
        let rng = &mut SmallRng::seed_from_u64(seed);
        let (hidden, inter, vocab, attn, kv) = (40, 56, 37, 40, 20);
        let layers = (0..config.num_hidden_layers)
            .map(|_| LayerWeights {
                input_layernorm: floats(rng, hidden, 0.8, 1.2),
                q_proj: linear(rng, attn, hidden),
                k_proj: linear(rng, kv, hidden),
                v_proj: linear(rng, kv, hidden),
                o_proj: linear(rng, hidden, attn),
                attn_sub_norm: floats(rng, attn, 0.8, 1.2),
                post_attention_layernorm: floats(rng, hidden, 0.8, 1.2),
                gate_proj: linear(rng, inter, hidden),
                up_proj: linear(rng, inter, hidden),
                down_proj: linear(rng, hidden, inter),
                ffn_sub_norm: floats(rng, inter, 0.8, 1.2),
            })
            .collect();
        ModelWeights {
            config,
            embed_tokens: floats(rng, vocab * hidden, -1.0, 1.0),
            layers,
            norm: floats(rng, hidden, 0.8, 1.2),
            lm_head: (!tied).then(|| floats(rng, vocab * hidden, -1.0, 1.0)),
        }
    }

    const TOKENS: [u32; 7] = [3, 36, 0, 17, 17, 5, 29];

    #[test]
    fn token_by_token_equals_whole_sequence() {
        // Every op is row-wise (attention reads only earlier rows, in the same order), so the
        // tolerance is zero: the logits must be bit for bit equal.
        for tied in [true, false] {
            let model = tiny_model(tied, 11);
            let mut cache = KvCache::new(&model.config);
            let whole = forward(&model, &TOKENS, &mut cache).unwrap();
            assert_eq!(whole.len(), TOKENS.len() * 37);
            assert!(whole.iter().all(|v| v.is_finite()));
            assert_eq!(cache.len(), TOKENS.len());

            let mut stepped_cache = KvCache::new(&model.config);
            let mut stepped = Vec::new();
            for &t in &TOKENS {
                stepped.extend(forward(&model, &[t], &mut stepped_cache).unwrap());
            }
            assert_eq!(stepped, whole, "tied = {tied}");
            assert_eq!(stepped_cache, cache);

            // A prompt chunk, then single tokens.
            let mut chunked_cache = KvCache::new(&model.config);
            let mut chunked = forward(&model, &TOKENS[..4], &mut chunked_cache).unwrap();
            chunked.extend(forward(&model, &TOKENS[4..6], &mut chunked_cache).unwrap());
            chunked.extend(forward(&model, &TOKENS[6..], &mut chunked_cache).unwrap());
            assert_eq!(chunked, whole);
        }
    }

    #[test]
    fn tied_and_untied_heads_differ_and_cache_has_rows() {
        let tied = tiny_model(true, 4);
        let untied = tiny_model(false, 4);
        let mut c1 = KvCache::new(&tied.config);
        let mut c2 = KvCache::new(&untied.config);
        let a = forward(&tied, &TOKENS, &mut c1).unwrap();
        let b = forward(&untied, &TOKENS, &mut c2).unwrap();
        assert_ne!(a, b);
        let (k, v) = c1.layer(1).unwrap();
        assert_eq!((k.len(), v.len()), (7 * 20, 7 * 20));
        assert!(c1.layer(2).is_none());
        c1.clear();
        assert!(c1.is_empty());
        assert_eq!(forward(&tied, &TOKENS, &mut c1).unwrap(), a);
    }

    #[test]
    fn first_position_ignores_rope_theta() {
        // At position 0 RoPE is the identity, so a different theta changes nothing there.
        let model = tiny_model(true, 2);
        let mut other = model.clone();
        other.config.rope_theta = 123.0;
        let a = forward(&model, &[9], &mut KvCache::new(&model.config)).unwrap();
        let b = forward(&other, &[9], &mut KvCache::new(&other.config)).unwrap();
        assert_eq!(a, b);
        let a = forward(&model, &[9, 4], &mut KvCache::new(&model.config)).unwrap();
        let b = forward(&other, &[9, 4], &mut KvCache::new(&other.config)).unwrap();
        assert_eq!(a[..37], b[..37]);
        assert_ne!(a[37..], b[37..]);
    }

    #[test]
    fn errors_leave_the_cache_untouched() {
        let model = tiny_model(true, 5);
        let mut cache = KvCache::new(&model.config);
        forward(&model, &[1, 2, 3], &mut cache).unwrap();
        let before = cache.clone();

        let err = forward(&model, &[4, 37], &mut cache).unwrap_err();
        assert!(err.to_string().contains("token 37 at index 1"), "{err}");
        assert!(matches!(
            forward(&model, &[], &mut cache),
            Err(Error::Empty(_))
        ));
        let err = forward(&model, &[1; 14], &mut cache).unwrap_err();
        assert!(
            err.to_string().contains("max_position_embeddings 16"),
            "{err}"
        );
        assert_eq!(cache, before);

        // Filling exactly to capacity works; one more position does not.
        forward(&model, &[1; 13], &mut cache).unwrap();
        assert_eq!(cache.len(), cache.capacity());
        assert!(forward(&model, &[1], &mut cache).is_err());

        let mut other = tiny_config(true);
        other.num_hidden_layers = 3;
        let err = forward(&model, &[1], &mut KvCache::new(&other)).unwrap_err();
        assert!(err.to_string().contains("kv cache"), "{err}");
    }

    #[test]
    fn bad_weights_are_named() {
        let model = tiny_model(false, 6);
        let mut cache = KvCache::new(&model.config);
        type Corruption = fn(&mut ModelWeights);
        let cases: [(&str, Corruption); 6] = [
            ("self_attn.k_proj", |m| m.layers[1].k_proj.rows = 40),
            ("ffn_sub_norm", |m| m.layers[0].ffn_sub_norm.truncate(3)),
            ("lm_head", |m| m.lm_head = Some(vec![0.0; 3])),
            ("decoder layers", |m| m.layers.truncate(1)),
            ("num_key_value_heads", |m| m.config.num_key_value_heads = 3),
            ("head_dim", |m| m.config.head_dim = 0),
        ];
        for (name, corrupt) in cases {
            let mut bad = model.clone();
            corrupt(&mut bad);
            let err = forward(&bad, &[1], &mut cache).unwrap_err();
            assert!(err.to_string().contains(name), "{name}: {err}");
        }
        assert!(cache.is_empty());
    }
}
