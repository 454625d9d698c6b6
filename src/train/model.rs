//! The training model: latent f32 weights, built from a seed or a checkpoint, exported back to
//! ternary [`ModelWeights`].

use super::linear::Quant;
use super::params::{LayerParameters, Parameters, linear_shapes};
use crate::cpu::{TernaryWeights, WeightQuantOptions, weight_quant};
use crate::model::{LayerWeights, ModelConfig, ModelWeights};
use crate::rng::SplitMix64;
use crate::{Error, Result};

/// Standard deviation of the initial linear and embedding weights (transformers'
/// `initializer_range` default).
const INIT_STD: f32 = 0.02;

/// A BitNet model in training: its configuration, how its linears compute, and its latent weights.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainModel {
    pub config: ModelConfig,
    pub quant: Quant,
    pub params: Parameters,
}

impl TrainModel {
    /// A fresh model: linears and embeddings uniform with standard deviation 0.02 drawn from
    /// [`SplitMix64`] seeded with `seed` (the same model on every machine), norms 1, an
    /// `lm_head` of its own unless `config.tie_word_embeddings`. Errors on a configuration that
    /// fails [`ModelConfig::validate`].
    ///
    /// ```
    /// use bitnet_wgpu::model::ModelConfig;
    /// use bitnet_wgpu::train::{Quant, TrainModel};
    /// let mut config = ModelConfig::bitnet_b158_2b4t();
    /// (config.vocab_size, config.hidden_size, config.intermediate_size) = (50, 8, 12);
    /// (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) = (1, 2, 1);
    /// config.head_dim = 4;
    /// let model = TrainModel::new(config, Quant::BitNet, 7)?;
    /// assert_eq!(model.params.layers[0].q_proj.len(), 8 * 8);
    /// model.to_weights()?.validate()?;
    /// # Ok::<(), bitnet_wgpu::Error>(())
    /// ```
    pub fn new(config: ModelConfig, quant: Quant, seed: u64) -> Result<Self> {
        config.validate()?;
        let mut rng = SplitMix64(seed);
        // Uniform on [-a, a) has standard deviation a / sqrt(3).
        let mut random = |n: usize| -> Vec<f32> {
            let a = INIT_STD * 3f32.sqrt();
            (0..n).map(|_| a * rng.uniform_f32()).collect()
        };
        let c = &config;
        let hidden = c.hidden_size;
        // Sub-norms start at 1 where the family has them and are empty where it has none.
        let [_, attn_sub, _, ffn_sub] = c.layer_norms().map(|n| n.len);
        let table = c.vocab_size * hidden;
        let embed_tokens = random(table);
        let layers = (0..c.num_hidden_layers)
            .map(|_| {
                let [q, k, v, o, gate, up, down] =
                    linear_shapes(c).map(|(_, rows, cols)| random(rows * cols));
                LayerParameters {
                    input_layernorm: vec![1.0; hidden],
                    q_proj: q,
                    k_proj: k,
                    v_proj: v,
                    o_proj: o,
                    attn_sub_norm: vec![1.0; attn_sub],
                    post_attention_layernorm: vec![1.0; hidden],
                    gate_proj: gate,
                    up_proj: up,
                    down_proj: down,
                    ffn_sub_norm: vec![1.0; ffn_sub],
                }
            })
            .collect();
        let lm_head = (!c.tie_word_embeddings).then(|| random(table));
        let params = Parameters {
            embed_tokens,
            layers,
            norm: vec![1.0; hidden],
            lm_head,
        };
        Ok(TrainModel {
            config,
            quant,
            params,
        })
    }

    /// A model to fine-tune from a checkpoint whose forward is the checkpoint's.
    ///
    /// Under [`Quant::None`] each latent matrix is the dequantized `codes / scale`. Under
    /// [`Quant::BitNet`] that would not do: the absmean of `codes / scale` is `f / scale` with `f`
    /// the fraction of non-zero codes, so the first step would re-quantize to another scale.
    /// The latent matrix is `codes / (scale * f)` instead, whose absmean is `1 / scale` and whose
    /// codes are the checkpoint's, so re-quantizing gives the checkpoint back (the scale up to
    /// f32 rounding). Errors: weights that fail [`ModelWeights::validate`], and per-channel scales
    /// (training quantizes per tensor, the paper's and the released checkpoints' choice).
    pub fn from_weights(weights: &ModelWeights, quant: Quant) -> Result<Self> {
        weights.validate()?;
        let latent = |w: &TernaryWeights| -> Result<Vec<f32>> {
            let &[scale] = &w.scales[..] else {
                return Err(Error::invalid(
                    "checkpoint weights",
                    "per-channel scales: training quantizes per tensor",
                ));
            };
            let nonzero = w.codes.iter().filter(|&&c| c != 0).count();
            let divisor = match quant {
                Quant::None => scale,
                Quant::BitNet => scale * (nonzero as f32 / w.codes.len() as f32),
            };
            Ok(w.codes
                .iter()
                .map(|&c| if c == 0 { 0.0 } else { f32::from(c) / divisor })
                .collect())
        };
        let layers = weights
            .layers
            .iter()
            .map(|l| {
                Ok(LayerParameters {
                    input_layernorm: l.input_layernorm.clone(),
                    q_proj: latent(&l.q_proj)?,
                    k_proj: latent(&l.k_proj)?,
                    v_proj: latent(&l.v_proj)?,
                    o_proj: latent(&l.o_proj)?,
                    attn_sub_norm: l.attn_sub_norm.clone(),
                    post_attention_layernorm: l.post_attention_layernorm.clone(),
                    gate_proj: latent(&l.gate_proj)?,
                    up_proj: latent(&l.up_proj)?,
                    down_proj: latent(&l.down_proj)?,
                    ffn_sub_norm: l.ffn_sub_norm.clone(),
                })
            })
            .collect::<Result<_>>()?;
        let mut config = weights.config.clone();
        config.tie_word_embeddings = weights.lm_head.is_none();
        Ok(TrainModel {
            config,
            quant,
            params: Parameters {
                embed_tokens: weights.embed_tokens.clone(),
                layers,
                norm: weights.norm.clone(),
                lm_head: weights.lm_head.clone(),
            },
        })
    }

    /// The model for inference: every latent linear quantized with [`weight_quant`] (per tensor,
    /// threshold 0.5: what the BitNet forward computes with), norms and embeddings as they are.
    /// Under [`Quant::BitNet`] the crate's inference forward then computes what the training
    /// forward computes; under [`Quant::None`] this is post-training quantization. Errors when a
    /// latent matrix holds a NaN or infinity.
    pub fn to_weights(&self) -> Result<ModelWeights> {
        let c = &self.config;
        let shapes = linear_shapes(c);
        let quantize = |i: usize, w: &[f32]| -> Result<TernaryWeights> {
            let (_, rows, cols) = shapes[i];
            weight_quant(w, rows, cols, WeightQuantOptions::default())
        };
        let layers = self
            .params
            .layers
            .iter()
            .map(|l| {
                Ok(LayerWeights {
                    input_layernorm: l.input_layernorm.clone(),
                    q_proj: quantize(0, &l.q_proj)?,
                    k_proj: quantize(1, &l.k_proj)?,
                    v_proj: quantize(2, &l.v_proj)?,
                    o_proj: quantize(3, &l.o_proj)?,
                    attn_sub_norm: l.attn_sub_norm.clone(),
                    post_attention_layernorm: l.post_attention_layernorm.clone(),
                    gate_proj: quantize(4, &l.gate_proj)?,
                    up_proj: quantize(5, &l.up_proj)?,
                    down_proj: quantize(6, &l.down_proj)?,
                    ffn_sub_norm: l.ffn_sub_norm.clone(),
                })
            })
            .collect::<Result<_>>()?;
        let mut config = c.clone();
        config.tie_word_embeddings = self.params.lm_head.is_none();
        Ok(ModelWeights {
            config,
            embed_tokens: self.params.embed_tokens.clone(),
            layers,
            norm: self.params.norm.clone(),
            lm_head: self.params.lm_head.clone(),
        })
    }

    /// Errors unless every tensor has the length the configuration implies.
    pub fn validate(&self) -> Result<()> {
        self.config.validate()?;
        let c = &self.config;
        let p = &self.params;
        let expect = |what: &'static str, want: usize, got: usize| {
            if want == got {
                Ok(())
            } else {
                Err(Error::shape(what, want, got))
            }
        };
        if p.layers.len() != c.num_hidden_layers {
            return Err(Error::shape(
                "decoder layers",
                c.num_hidden_layers,
                p.layers.len(),
            ));
        }
        let table = c.vocab_size * c.hidden_size;
        expect("model.embed_tokens", table, p.embed_tokens.len())?;
        expect("model.norm", c.hidden_size, p.norm.len())?;
        if let Some(head) = &p.lm_head {
            expect("lm_head", table, head.len())?;
        }
        for layer in &p.layers {
            let norms = [
                &layer.input_layernorm,
                &layer.attn_sub_norm,
                &layer.post_attention_layernorm,
                &layer.ffn_sub_norm,
            ];
            for (spec, norm) in c.layer_norms().into_iter().zip(norms) {
                expect(spec.hf, spec.len, norm.len())?;
            }
            for ((name, rows, cols), w) in linear_shapes(c).into_iter().zip(layer.linears()) {
                expect(name, rows * cols, w.len())?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{WINDOWS, scrambled_model, tiny_config};
    use super::*;
    use crate::model::{KvCache, forward};

    fn inference_logits(weights: &ModelWeights, tokens: &[u32]) -> Vec<f32> {
        forward(weights, tokens, &mut KvCache::new(&weights.config)).unwrap()
    }

    #[test]
    fn exported_model_runs_the_same_in_inference() {
        // Same operations in the same order on the same codes and scales (the training forward
        // calls act_quant and ternary_matmul as the inference forward does): bit for bit equal.
        for tied in [true, false] {
            let model = scrambled_model(tied, Quant::BitNet, 3);
            let weights = model.to_weights().unwrap();
            weights.validate().unwrap();
            assert_eq!(weights.lm_head.is_none(), tied);
            for window in WINDOWS {
                let trained = model.logits(window).unwrap();
                assert_eq!(inference_logits(&weights, window), trained, "tied = {tied}");
            }
        }
    }

    #[test]
    fn checkpoint_round_trips_through_latent_weights() {
        let original = scrambled_model(false, Quant::BitNet, 8)
            .to_weights()
            .unwrap();
        let model = TrainModel::from_weights(&original, Quant::BitNet).unwrap();
        let back = model.to_weights().unwrap();
        for (a, b) in back.layers.iter().zip(&original.layers) {
            for (x, y) in a.linears().into_iter().zip(b.linears()) {
                assert_eq!(x.codes, y.codes);
                assert!((x.scales[0] / y.scales[0] - 1.0).abs() < 1e-6);
            }
        }
        // Scales equal up to rounding: logits within a relative 1e-5 of the logit range.
        let want = inference_logits(&original, WINDOWS[0]);
        let got = model.logits(WINDOWS[0]).unwrap();
        let range = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5 * range, "{g} vs {w}");
        }
        // Quantizers off: the dequantized codes / scale themselves.
        let float = TrainModel::from_weights(&original, Quant::None).unwrap();
        let q = &original.layers[0].q_proj;
        assert_eq!(
            float.params.layers[0].q_proj[5],
            f32::from(q.codes[5]) / q.scales[0]
        );
    }

    #[test]
    fn seeded_initialization_is_reproducible() {
        let a = TrainModel::new(tiny_config(true), Quant::BitNet, 4).unwrap();
        let b = TrainModel::new(tiny_config(true), Quant::BitNet, 4).unwrap();
        let c = TrainModel::new(tiny_config(true), Quant::BitNet, 5).unwrap();
        assert_eq!(a, b);
        assert_ne!(a.params, c.params);
        let q = &a.params.layers[0].q_proj;
        let std = (q.iter().map(|v| v * v).sum::<f32>() / q.len() as f32).sqrt();
        assert!((std - INIT_STD).abs() < 0.2 * INIT_STD, "{std}");
        assert!(a.params.lm_head.is_none());
        assert!(
            TrainModel::new(tiny_config(false), Quant::None, 4)
                .unwrap()
                .params
                .lm_head
                .is_some()
        );
    }

    #[test]
    fn bad_configs_and_checkpoints_are_errors() {
        let mut config = tiny_config(true);
        config.num_key_value_heads = 3;
        assert!(TrainModel::new(config, Quant::BitNet, 1).is_err());
        let mut weights = scrambled_model(true, Quant::BitNet, 1)
            .to_weights()
            .unwrap();
        weights.layers[0].up_proj.scales = vec![1.0; 24];
        let err = TrainModel::from_weights(&weights, Quant::BitNet).unwrap_err();
        assert!(err.to_string().contains("per-channel"), "{err}");
    }
}
