//! Chat models: the template a model's tokenizer defines for turning a conversation into its
//! prompt, and the conversation that renders it turn after turn.
//!
//! Instruction-tuned models (bitnet-b1.58-2B-4T, Falcon3-*-Instruct) answer well only inside
//! the text their template makes. The template comes with the model: `chat_template` in a Hugging
//! Face folder's tokenizer_config.json (or its chat_template.jinja), `tokenizer.chat_template` in
//! a GGUF file; [`crate::model::ModelFiles`] finds it and [`crate::tokenizer::Tokenizer`] carries
//! it. It is rendered as transformers' `apply_chat_template` renders it (Jinja with
//! `trim_blocks` and `lstrip_blocks`, `raise_exception`, `strftime_now`, Python's `tojson` and
//! string methods), and the text is tokenized as transformers does there: special tokens written
//! in the text are special tokens, and nothing is added around it, so the template's own bos is
//! the only one.

mod conversation;
mod jinja;
mod sources;
mod template;

pub use conversation::Conversation;
pub(crate) use sources::gguf_template;
pub use sources::{ChatFiles, END_OF_TURN_TOKENS};
pub use template::{ChatTemplate, Message};
