//! The generator the CLI and the browser share: a prompt in, tokens and text out as they are
//! made, with the stop conditions, streaming and cancelling a user expects.

use web_time::{Duration, Instant};

use crate::model::{Engine, Logits, Sampler, SamplingParams};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// What [`Generator::generate`] is asked for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GenerationParams {
    /// Stop after this many new tokens (or earlier: end of sequence, context limit, cancel).
    pub max_new_tokens: usize,
    /// How each token is chosen; temperature 0 is greedy.
    pub sampling: SamplingParams,
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The model produced an end token (the last generated id): its end-of-sequence token, or
    /// one of the stop ids [`Generator::generate_ids`] was given (a chat's end of turn).
    EndOfSequence,
    /// `max_new_tokens` were generated.
    MaxNewTokens,
    /// Every position of the model's context holds a token.
    ContextFull,
    /// The token callback asked to stop.
    Cancelled,
}

/// One finished generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// The ids the model saw: the prompt with the special tokens its tokenizer adds.
    pub prompt_ids: Vec<u32>,
    /// How many of `prompt_ids`, at their end, were processed; the others were in the cache of
    /// the previous generation ([`Generator::generate_ids`]).
    pub prefilled: usize,
    pub generated_ids: Vec<u32>,
    /// The text of `generated_ids` (special tokens left out).
    pub text: String,
    /// From the start to the first new token (the prompt's processing).
    pub prompt_time: Duration,
    /// From the first new token to the last.
    pub decode_time: Duration,
    pub stop: Stop,
}

impl Generation {
    /// Prompt tokens per second (0 when nothing was timed).
    pub fn prompt_tokens_per_s(&self) -> f64 {
        rate(self.prefilled, self.prompt_time)
    }

    /// Generated tokens per second after the first (0 when nothing was timed).
    pub fn tokens_per_s(&self) -> f64 {
        rate(self.generated_ids.len().saturating_sub(1), self.decode_time)
    }
}

/// Tokens per second; 0 for no tokens (a rate over no work means nothing).
fn rate(tokens: usize, time: Duration) -> f64 {
    let seconds = time.as_secs_f64();
    if tokens == 0 || seconds == 0.0 {
        0.0
    } else {
        tokens as f64 / seconds
    }
}

/// An engine and the tokenizer that goes with its model.
///
/// ```
/// use bitnet_wgpu::model::{
///     Device, Engine, GenerationParams, Generator, ModelConfig, SamplingParams, synthetic,
/// };
/// use bitnet_wgpu::tokenizer::Tokenizer;
/// # pollster::block_on(async {
/// let config = ModelConfig {
///     vocab_size: 258,
///     hidden_size: 64,
///     intermediate_size: 128,
///     num_hidden_layers: 1,
///     num_attention_heads: 4,
///     num_key_value_heads: 2,
///     head_dim: 16,
///     max_position_embeddings: 32,
///     ..ModelConfig::bitnet_b158_2b4t()
/// };
/// let (engine, _) = Engine::new(Device::Cpu, &synthetic(&config, 7)).await?;
/// let mut generator = Generator::new(engine, Tokenizer::bytes(258));
/// let params = GenerationParams {
///     max_new_tokens: 5,
///     sampling: SamplingParams { temperature: 0.0, ..SamplingParams::default() },
/// };
/// let mut streamed = String::new();
/// let out = generator.generate("Hi", &params, |piece| { streamed += piece; true }).await?;
/// assert_eq!(out.prompt_ids, [256, 72, 105]);
/// assert!(out.generated_ids.len() <= 5);
/// assert_eq!(streamed, out.text);
/// # Ok::<(), bitnet_wgpu::Error>(()) })?;
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub struct Generator {
    engine: Engine,
    tokenizer: Tokenizer,
    /// The ids whose keys and values the engine's cache holds, from position 0.
    cached: Vec<u32>,
}

impl Generator {
    pub fn new(engine: Engine, tokenizer: Tokenizer) -> Self {
        Generator {
            engine,
            tokenizer,
            cached: Vec::new(),
        }
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The engine, e.g. to score texts between generations. What it is used for may change
    /// its cache, so the next generation starts a new sequence.
    pub fn engine_mut(&mut self) -> &mut Engine {
        self.cached.clear();
        &mut self.engine
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Continues `prompt` (tokenized as the model's tokenizer does, [`Tokenizer::encode`]) in a
    /// new sequence. `on_text` gets each piece of text as soon as it is complete UTF-8 (a final
    /// piece may follow the last token) and returns whether to go on; `false` cancels.
    ///
    /// On a GPU each token is chosen there (greedily, or sampled by `gpu::sampling` with
    /// [`Sampler`]'s draws) and only the token is read back; on the CPU engine [`Sampler`]
    /// chooses from each step's logits. Ids past the tokenizer's
    /// vocabulary (an embedding padded for speed) are never chosen.
    ///
    /// Errors: bad sampling parameters, an empty prompt whose tokenizer adds no bos, a prompt
    /// longer than the model's context, and the engine's errors.
    pub async fn generate(
        &mut self,
        prompt: &str,
        params: &GenerationParams,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation> {
        let prompt_ids = self.tokenizer.encode(prompt, true)?;
        if prompt_ids.is_empty() {
            return Err(Error::invalid(
                "prompt",
                "it is empty and the model's tokenizer adds no bos token to start from",
            ));
        }
        self.cached.clear();
        let eos: Vec<u32> = self.tokenizer.eos().into_iter().collect();
        self.generate_ids(&prompt_ids, &eos, params, on_text).await
    }

    /// Continues the ids `prompt_ids` as [`Generator::generate`] continues a text, stopping also
    /// at any of `stop_ids` (a chat template's end of turn). The start that `prompt_ids` shares
    /// with the previous generation's prompt and tokens is not processed again: its keys and
    /// values are still in the engine's cache, so a conversation prefills only its new turn
    /// (and, where the text of the earlier turns tokenizes differently now, from the first id
    /// that differs). [`Generation::prefilled`] says how many ids were processed.
    ///
    /// Errors: no ids, an id outside the model's vocabulary, and those of [`Generator::generate`].
    pub async fn generate_ids(
        &mut self,
        prompt_ids: &[u32],
        stop_ids: &[u32],
        params: &GenerationParams,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation> {
        let mut sampler = Sampler::new(params.sampling)?;
        if prompt_ids.is_empty() {
            return Err(Error::invalid("prompt", "it has no ids"));
        }
        let limit = self.engine.config().max_position_embeddings;
        if prompt_ids.len() > limit {
            return Err(Error::invalid(
                "prompt",
                format!(
                    "it has {} tokens, more than the model's context of {limit}",
                    prompt_ids.len()
                ),
            ));
        }
        let vocab = self.engine.config().vocab_size;
        let allowed = self.tokenizer.vocab_size().min(vocab);
        let max_new = params.max_new_tokens;
        let mut stream = self.tokenizer.stream_decoder();
        let mut generated = Vec::new();
        let mut text = String::new();
        let mut failure = None;
        let mut cancelled = false;
        let started = Instant::now();
        let mut first_token = None;
        // Takes one new token: streams its text and says whether to go on.
        let mut accept = |id: u32, generated: &mut Vec<u32>| -> bool {
            first_token.get_or_insert_with(Instant::now);
            generated.push(id);
            match stream.step(id) {
                Ok(piece) => {
                    text += &piece;
                    if !piece.is_empty() && !on_text(&piece) {
                        cancelled = true;
                        return false;
                    }
                }
                Err(e) => {
                    failure = Some(e);
                    return false;
                }
            }
            !stop_ids.contains(&id) && generated.len() < max_new
        };

        // At least the last id is processed: its logits choose the first new token.
        let kept = self
            .cached
            .iter()
            .zip(prompt_ids)
            .take_while(|(a, b)| a == b)
            .count()
            .min(prompt_ids.len() - 1);
        self.engine.truncate(kept);
        // Until the engine reports where it stopped, what its cache holds is unknown.
        self.cached.clear();
        let new_ids = &prompt_ids[kept..];
        match &mut self.engine {
            #[cfg(feature = "gpu")]
            Engine::Gpu(gpu) => {
                let (ctx, model) = &mut **gpu;
                model
                    .sample(ctx, new_ids, max_new, allowed, &mut sampler, |id| {
                        accept(id, &mut generated)
                    })
                    .await?;
            }
            engine => {
                let mut logits = engine.forward(new_ids, Logits::Last).await?;
                while generated.len() < max_new {
                    let last = logits.len() - vocab;
                    logits[last + allowed..].fill(f32::NEG_INFINITY);
                    let id = sampler.sample(&logits[last..])?;
                    if !accept(id, &mut generated) || engine.position() >= limit {
                        break;
                    }
                    logits = engine.forward(&[id], Logits::Last).await?;
                }
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        let piece = stream.finish()?;
        if !piece.is_empty() {
            text += &piece;
            on_text(&piece);
        }
        // The engine took the prompt and every new token but (at least) the last.
        let position = self.engine.position();
        self.cached = prompt_ids
            .iter()
            .chain(&generated)
            .copied()
            .take(position)
            .collect();
        let stop = if generated.last().is_some_and(|id| stop_ids.contains(id)) {
            Stop::EndOfSequence
        } else if cancelled {
            Stop::Cancelled
        } else if generated.len() == max_new {
            Stop::MaxNewTokens
        } else {
            Stop::ContextFull
        };
        let first_token = first_token.unwrap_or_else(Instant::now);
        Ok(Generation {
            prompt_ids: prompt_ids.to_vec(),
            prefilled: new_ids.len(),
            generated_ids: generated,
            text,
            prompt_time: first_token - started,
            decode_time: first_token.elapsed(),
            stop,
        })
    }
}
