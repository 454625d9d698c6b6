//! A conversation with a chat model: its messages, rendered by the model's template each turn
//! and continued by a [`Generator`] that keeps the earlier turns in its cache.

use super::{ChatTemplate, Message};
use crate::model::{Generation, GenerationParams, Generator};
use crate::{Error, Result};

/// The messages so far (after an optional system message) and the template that writes them.
///
/// ```
/// use bitnet_wgpu::chat::{ChatTemplate, Conversation};
/// use bitnet_wgpu::model::{
///     Device, Engine, GenerationParams, Generator, ModelConfig, SamplingParams, synthetic,
/// };
/// use bitnet_wgpu::tokenizer::Tokenizer;
/// # pollster::block_on(async {
/// let config = ModelConfig {
///     vocab_size: 258, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 1,
///     num_attention_heads: 4, num_key_value_heads: 2, head_dim: 16,
///     max_position_embeddings: 128, ..ModelConfig::bitnet_b158_2b4t()
/// };
/// let (engine, _) = Engine::new(Device::Cpu, &synthetic(&config, 7)).await?;
/// let mut generator = Generator::new(engine, Tokenizer::bytes(258));
/// let template = ChatTemplate::new(
///     "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}\
///      {% if add_generation_prompt %}assistant: {% endif %}",
/// )?;
/// let mut chat = Conversation::new(template, Some("Be brief.".into()));
/// let params = GenerationParams {
///     max_new_tokens: 4,
///     sampling: SamplingParams { temperature: 0.0, ..SamplingParams::default() },
/// };
/// let first = chat.reply(&mut generator, "Hi", &params, |_| true).await?;
/// assert_eq!(first.prefilled, first.prompt_ids.len());
/// let second = chat.reply(&mut generator, "More", &params, |_| true).await?;
/// // The first turn's prompt came from the cache: only what follows it was processed.
/// assert!(second.prefilled <= second.prompt_ids.len() - first.prompt_ids.len());
/// assert_eq!(chat.messages().len(), 5);
/// # Ok::<(), bitnet_wgpu::Error>(()) })?;
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Conversation {
    template: ChatTemplate,
    system: Option<String>,
    messages: Vec<Message>,
}

impl Conversation {
    /// A new conversation, starting with a system message if `system` is given.
    pub fn new(template: ChatTemplate, system: Option<String>) -> Self {
        let mut chat = Conversation {
            template,
            system,
            messages: Vec::new(),
        };
        chat.reset();
        chat
    }

    /// Starts over, keeping the system message.
    pub fn reset(&mut self) {
        self.messages.clear();
        self.messages
            .extend(self.system.iter().map(|s| Message::system(s.clone())));
    }

    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// The ids of the messages with the start of an answer after them: the template's text,
    /// tokenized with its special tokens as such and nothing added (its own bos is the only one).
    pub fn prompt_ids(&self, generator: &Generator) -> Result<Vec<u32>> {
        let text = self.template.render(&self.messages, true)?;
        generator.tokenizer().encode(&text, false)
    }

    /// Adds the user's message, generates the answer (streamed to `on_text` as
    /// [`Generator::generate`] does, stopping at the template's end of turn) and adds it. The
    /// earlier turns stay in the generator's cache: only the new one is processed. An answer cut
    /// short (cancelled, out of tokens) is kept as it is.
    ///
    /// Errors, after which the conversation is as before: the template's (a role it refuses),
    /// a conversation longer than the model's context (reset it to go on), and the generator's.
    pub async fn reply(
        &mut self,
        generator: &mut Generator,
        user: &str,
        params: &GenerationParams,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation> {
        self.messages.push(Message::user(user));
        let result = self.answer(generator, params, on_text).await;
        match &result {
            Ok(generation) => self
                .messages
                .push(Message::assistant(generation.text.clone())),
            Err(_) => {
                self.messages.pop();
            }
        }
        result
    }

    async fn answer(
        &self,
        generator: &mut Generator,
        params: &GenerationParams,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation> {
        let ids = self.prompt_ids(generator)?;
        let context = generator.engine().config().max_position_embeddings;
        // A prompt that fills the context leaves no room for an answer.
        if ids.len() >= context {
            return Err(Error::invalid(
                "conversation",
                format!(
                    "it has {} tokens, and the model's context holds {context}: the context is \
                     full; start a new conversation",
                    ids.len()
                ),
            ));
        }
        generator
            .generate_ids(&ids, self.template.end_of_turn(), params, on_text)
            .await
    }
}
