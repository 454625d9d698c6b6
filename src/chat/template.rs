//! A model's chat template and the messages it renders.

use serde::Serialize;

use crate::{Error, Result};

/// One message of a conversation: who speaks (`system`, `user`, `assistant`; templates may know
/// others) and what they say.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Message::new("system", content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Message::new("user", content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Message::new("assistant", content)
    }
}

/// A chat template: its Jinja source, the `bos_token` and `eos_token` strings it may write, and
/// the ids that end a turn (where an answer stops).
///
/// ```
/// use bitnet_wgpu::chat::{ChatTemplate, Message};
/// let template = ChatTemplate::new(
///     "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content | trim }}\n{% endfor %}\
///      {% if add_generation_prompt %}<|assistant|>\n{% endif %}",
/// )?;
/// let text = template.render(&[Message::user(" Hi ")], true)?;
/// assert_eq!(text, "<|user|>\nHi\n<|assistant|>\n");
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
    end_of_turn: Vec<u32>,
}

impl ChatTemplate {
    /// The template of Jinja `source`, with empty bos/eos strings and no end-of-turn ids until
    /// set. Errors: a syntax error, with its line.
    pub fn new(source: impl Into<String>) -> Result<Self> {
        let source = source.into();
        super::jinja::environment()
            .template_from_str(&source)
            .map_err(template_error)?;
        Ok(ChatTemplate {
            source,
            bos_token: String::new(),
            eos_token: String::new(),
            end_of_turn: Vec::new(),
        })
    }

    /// Sets the strings the template sees as `bos_token` and `eos_token` (tokenizer_config.json's,
    /// as transformers passes them).
    pub fn with_special_tokens(
        mut self,
        bos_token: impl Into<String>,
        eos_token: impl Into<String>,
    ) -> Self {
        self.bos_token = bos_token.into();
        self.eos_token = eos_token.into();
        self
    }

    /// Sets the ids that end a turn: generation of an answer stops at any of them.
    pub fn with_end_of_turn(mut self, ids: impl IntoIterator<Item = u32>) -> Self {
        self.end_of_turn = ids.into_iter().collect();
        self.end_of_turn.sort_unstable();
        self.end_of_turn.dedup();
        self
    }

    /// The Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// The ids that end a turn, sorted.
    pub fn end_of_turn(&self) -> &[u32] {
        &self.end_of_turn
    }

    /// The text of `messages` as the model reads them, with the start of the assistant's answer
    /// after them if `add_generation_prompt`: transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`.
    ///
    /// Errors: the template's own (`raise_exception`: roles it does not accept) and rendering
    /// errors, with the template's message.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let env = super::jinja::environment();
        let template = env
            .template_from_str(&self.source)
            .map_err(template_error)?;
        template
            .render(minijinja::context! {
                messages => minijinja::Value::from(minijinja::value::Serde(messages)),
                add_generation_prompt => add_generation_prompt,
                bos_token => &self.bos_token,
                eos_token => &self.eos_token,
            })
            .map_err(template_error)
    }
}

/// A minijinja error with its detail and the place in the template.
fn template_error(e: minijinja::Error) -> Error {
    let mut why = e.to_string();
    if let Some(line) = e.line() {
        why += &format!(" (template line {line})");
    }
    Error::invalid("chat template", why)
}
