//! Where a model keeps its chat template: a Hugging Face folder's tokenizer_config.json or
//! chat_template.jinja (with the end-of-sequence ids of config.json and
//! generation_config.json), or a GGUF file's metadata.

use serde_json::Value;

use super::ChatTemplate;
use crate::formats::gguf::GgufFile;
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// Tokens that end a turn in the common chat formats (Llama 3's, ChatML's, Phi's, Gemma's). One
/// that the template writes and the vocabulary holds ends an answer, whether or not the
/// model's config lists it: 2B-4T's config.json names only `<|end_of_text|>`, while its answers
/// end at `<|eot_id|>`.
pub const END_OF_TURN_TOKENS: [&str; 5] = [
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
];

/// The files of a Hugging Face folder that say how the model chats, as their bytes; any may be
/// missing.
#[derive(Clone, Copy, Debug, Default)]
pub struct ChatFiles<'a> {
    /// tokenizer_config.json: `chat_template`, `bos_token`, `eos_token`.
    pub tokenizer_config: Option<&'a [u8]>,
    /// chat_template.jinja, which newer transformers writes instead of the config's entry (and
    /// prefers when both exist).
    pub chat_template: Option<&'a [u8]>,
    /// config.json: `eos_token_id`, a number or a list.
    pub config: Option<&'a [u8]>,
    /// generation_config.json: `eos_token_id`, a number or a list.
    pub generation_config: Option<&'a [u8]>,
}

impl ChatFiles<'_> {
    /// The names of the files, as in a model folder.
    pub const TOKENIZER_CONFIG: &'static str = "tokenizer_config.json";
    pub const CHAT_TEMPLATE: &'static str = "chat_template.jinja";
    pub const CONFIG: &'static str = "config.json";
    pub const GENERATION_CONFIG: &'static str = "generation_config.json";

    /// The template these files define for `tokenizer`'s vocabulary, or `None` when they define
    /// none. `bos_token`/`eos_token` are tokenizer_config.json's strings (or `{"content": ...}`
    /// objects), else the tokens of the tokenizer's ids. A turn ends at the tokenizer's eos, at
    /// every `eos_token_id` of config.json and generation_config.json, at the `eos_token`, and at
    /// the [`END_OF_TURN_TOKENS`] the template writes.
    ///
    /// Errors: a file that is not JSON (or UTF-8), a `chat_template` that is neither a string nor
    /// a list of named templates, and template syntax errors.
    ///
    /// ```
    /// use bitnet_wgpu::chat::ChatFiles;
    /// use bitnet_wgpu::tokenizer::Tokenizer;
    /// let config = br#"{"chat_template": "{{ bos_token }}{{ messages[0].content }}",
    ///                   "bos_token": {"content": "<s>"}, "eos_token": "</s>"}"#;
    /// let files = ChatFiles { tokenizer_config: Some(config), ..ChatFiles::default() };
    /// let template = files.template(&Tokenizer::bytes(258))?.expect("a template");
    /// assert_eq!(template.bos_token(), "<s>");
    /// assert_eq!(template.end_of_turn(), [257]); // the byte tokenizer's eos
    /// # Ok::<(), bitnet_wgpu::Error>(())
    /// ```
    pub fn template(&self, tokenizer: &Tokenizer) -> Result<Option<ChatTemplate>> {
        let json = |bytes: Option<&[u8]>, name: &str| -> Result<Value> {
            bytes.map_or(Ok(Value::Null), |b| {
                serde_json::from_slice(b)
                    .map_err(|e| Error::invalid("model file", format!("{name}: {e}")))
            })
        };
        let tokenizer_config = json(self.tokenizer_config, Self::TOKENIZER_CONFIG)?;
        let source = match self.chat_template {
            Some(bytes) => Some(String::from_utf8(bytes.to_vec()).map_err(|e| {
                Error::invalid("model file", format!("{}: {e}", Self::CHAT_TEMPLATE))
            })?),
            None => config_template(&tokenizer_config["chat_template"])?,
        };
        let Some(source) = source else {
            return Ok(None);
        };
        let special = |key: &str, id: Option<u32>| -> String {
            let value = &tokenizer_config[key];
            value
                .as_str()
                .or_else(|| value["content"].as_str())
                .map(str::to_string)
                .or_else(|| id.and_then(|id| tokenizer.token(id)))
                .unwrap_or_default()
        };
        let bos_token = special("bos_token", tokenizer.bos());
        let eos_token = special("eos_token", tokenizer.eos());
        let mut ends: Vec<u32> = tokenizer.eos().into_iter().collect();
        for (bytes, name) in [
            (self.config, Self::CONFIG),
            (self.generation_config, Self::GENERATION_CONFIG),
        ] {
            ends.extend(ids(&json(bytes, name)?["eos_token_id"]));
        }
        ends.extend(tokenizer.token_id(&eos_token));
        ends.extend(named_ends(&source, tokenizer));
        let vocab = tokenizer.vocab_size();
        Ok(Some(
            ChatTemplate::new(source)?
                .with_special_tokens(bos_token, eos_token)
                .with_end_of_turn(ends.into_iter().filter(|&id| (id as usize) < vocab)),
        ))
    }
}

/// tokenizer_config.json's `chat_template`: a string, or a list of `{"name", "template"}` of
/// which transformers takes the one named `default`.
fn config_template(value: &Value) -> Result<Option<String>> {
    let bad = || {
        Error::invalid(
            "model file",
            "tokenizer_config.json: chat_template is neither a string nor a list of \
             {\"name\", \"template\"} with one named \"default\"",
        )
    };
    match value {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Array(named) => named
            .iter()
            .find(|t| t["name"] == "default")
            .and_then(|t| t["template"].as_str())
            .map(|s| Some(s.to_string()))
            .ok_or_else(bad),
        _ => Err(bad()),
    }
}

/// The ids of an `eos_token_id` entry: a number, a list of numbers, or nothing.
fn ids(value: &Value) -> Vec<u32> {
    let id = |v: &Value| v.as_u64().and_then(|id| u32::try_from(id).ok());
    match value {
        Value::Array(list) => list.iter().filter_map(id).collect(),
        other => id(other).into_iter().collect(),
    }
}

/// The ids of the [`END_OF_TURN_TOKENS`] that `source` writes.
fn named_ends<'a>(source: &'a str, tokenizer: &'a Tokenizer) -> impl Iterator<Item = u32> + 'a {
    END_OF_TURN_TOKENS
        .iter()
        .filter(|token| source.contains(*token))
        .filter_map(|token| tokenizer.token_id(token))
}

/// The chat template of a GGUF file (`tokenizer.chat_template`), with its bos/eos tokens, ending
/// a turn at the eos, `tokenizer.ggml.eot_token_id`, `tokenizer.ggml.eom_token_id` and the
/// [`END_OF_TURN_TOKENS`] it writes; `None` when the file has no template.
pub(crate) fn gguf_template(
    file: &GgufFile,
    tokenizer: &Tokenizer,
) -> Result<Option<ChatTemplate>> {
    let Some(source) = file.get_str("tokenizer.chat_template")? else {
        return Ok(None);
    };
    let token = |id: Option<u32>| id.and_then(|id| tokenizer.token(id)).unwrap_or_default();
    let mut ends: Vec<u32> = tokenizer.eos().into_iter().collect();
    for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
        ends.extend(file.get_u32(key)?);
    }
    ends.extend(named_ends(source, tokenizer));
    let vocab = tokenizer.vocab_size();
    Ok(Some(
        ChatTemplate::new(source)?
            .with_special_tokens(token(tokenizer.bos()), token(tokenizer.eos()))
            .with_end_of_turn(ends.into_iter().filter(|&id| (id as usize) < vocab)),
    ))
}
