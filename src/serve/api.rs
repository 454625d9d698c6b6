//! OpenAI's request shapes and their checks: what a request may ask, turned into the ids and
//! parameters of a batch job, or a 400 that says what is wrong.

use serde::Deserialize;

use crate::chat::{ChatTemplate, Message};
use crate::model::SamplingParams;
use crate::tokenizer::Tokenizer;

/// OpenAI's limit on stop texts.
const MAX_STOP_TEXTS: usize = 4;

/// A refused request: the message, and the field it concerns.
#[derive(Debug, PartialEq)]
pub(crate) struct BadRequest {
    pub message: String,
    pub param: Option<&'static str>,
}

impl BadRequest {
    pub(crate) fn new(param: Option<&'static str>, message: impl Into<String>) -> Self {
        BadRequest {
            message: message.into(),
            param,
        }
    }
}

type Checked<T> = std::result::Result<T, BadRequest>;

/// `POST /v1/chat/completions`'s body (the fields used; others are accepted and ignored).
#[derive(Deserialize)]
pub(crate) struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub options: Options,
}

#[derive(Deserialize)]
pub(crate) struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

/// A message's content: a text, or parts of which only text ones are understood.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

/// `POST /v1/completions`'s body.
#[derive(Deserialize)]
pub(crate) struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    #[serde(flatten)]
    pub options: Options,
}

/// A completion's prompt: a text, a list of one text, or token ids.
#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
}

/// The fields both endpoints share.
#[derive(Deserialize, Default)]
pub(crate) struct Options {
    max_tokens: Option<i64>,
    max_completion_tokens: Option<i64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    /// Not OpenAI's; llama.cpp's server and vLLM take it too.
    top_k: Option<i64>,
    seed: Option<i64>,
    stop: Option<Stop>,
    n: Option<i64>,
    logprobs: Option<serde_json::Value>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// What a checked request asks of the batch.
#[derive(Debug, PartialEq)]
pub(crate) struct Ask {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_texts: Vec<String>,
}

impl Options {
    /// Checks the fields against OpenAI's ranges and the server's `context`; a request
    /// without a seed gets `fresh_seed`.
    pub(crate) fn check(&self, context: usize, fresh_seed: u64) -> Checked<Ask> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(BadRequest::new(
                Some("n"),
                "only n = 1 is supported: send one request per answer",
            ));
        }
        if self
            .logprobs
            .as_ref()
            .is_some_and(|v| !matches!(v, serde_json::Value::Null | serde_json::Value::Bool(false)))
        {
            return Err(BadRequest::new(
                Some("logprobs"),
                "log-probabilities are not supported",
            ));
        }
        let (param, max_tokens) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(n), _) => ("max_completion_tokens", Some(n)),
            (None, n) => ("max_tokens", n),
        };
        let max_tokens = match max_tokens {
            None => context,
            Some(n) if n >= 1 && n as u64 <= context as u64 => n as usize,
            Some(n) => {
                return Err(BadRequest::new(
                    Some(param),
                    format!("{n} is not between 1 and the context of {context} tokens"),
                ));
            }
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(BadRequest::new(
                Some("temperature"),
                format!("{temperature} is not between 0 and 2"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(BadRequest::new(
                Some("top_p"),
                format!("{top_p} is not in (0, 1]"),
            ));
        }
        let top_k = match self.top_k {
            None => 0,
            Some(k) if k >= 0 => k as usize,
            Some(k) => {
                return Err(BadRequest::new(
                    Some("top_k"),
                    format!("{k} is negative (0 keeps every token)"),
                ));
            }
        };
        let stop_texts = match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        };
        if stop_texts.len() > MAX_STOP_TEXTS || stop_texts.iter().any(String::is_empty) {
            return Err(BadRequest::new(
                Some("stop"),
                format!("give at most {MAX_STOP_TEXTS} stop texts, none empty"),
            ));
        }
        Ok(Ask {
            max_tokens,
            sampling: SamplingParams {
                temperature: temperature as f32,
                top_k,
                top_p: top_p as f32,
                seed: self.seed.map_or(fresh_seed, |s| s as u64),
            },
            stop_texts,
        })
    }

    pub(crate) fn include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

impl ChatRequest {
    /// The conversation's prompt ids in the model's `template`.
    pub(crate) fn prompt_ids(
        &self,
        template: Option<&ChatTemplate>,
        tokenizer: &Tokenizer,
    ) -> Checked<Vec<u32>> {
        let Some(template) = template else {
            return Err(BadRequest::new(
                None,
                "this model has no chat template: use /v1/completions",
            ));
        };
        if self.messages.is_empty() {
            return Err(BadRequest::new(Some("messages"), "there are no messages"));
        }
        let messages = self
            .messages
            .iter()
            .map(ChatMessage::message)
            .collect::<Checked<Vec<_>>>()?;
        let text = template
            .render(&messages, true)
            .map_err(|e| BadRequest::new(Some("messages"), e.to_string()))?;
        tokenizer
            .encode(&text, false)
            .map_err(|e| BadRequest::new(Some("messages"), e.to_string()))
    }
}

impl ChatMessage {
    fn message(&self) -> Checked<Message> {
        let content = match &self.content {
            None => String::new(),
            Some(Content::Text(text)) => text.clone(),
            Some(Content::Parts(parts)) => {
                let mut text = String::new();
                for part in parts {
                    match (part.kind.as_str(), &part.text) {
                        ("text", Some(t)) => text += t,
                        (kind, _) => {
                            return Err(BadRequest::new(
                                Some("messages"),
                                format!("a content part of type {kind:?}: only text is supported"),
                            ));
                        }
                    }
                }
                text
            }
        };
        Ok(Message::new(self.role.clone(), content))
    }
}

impl CompletionRequest {
    /// The prompt's ids, with the special tokens the tokenizer adds (as `bitnet generate`).
    pub(crate) fn prompt_ids(&self, tokenizer: &Tokenizer, vocab: usize) -> Checked<Vec<u32>> {
        let bad = |message: String| BadRequest::new(Some("prompt"), message);
        let ids = match &self.prompt {
            Prompt::Text(text) => tokenizer.encode(text, true),
            Prompt::Texts(texts) => match texts.as_slice() {
                [text] => tokenizer.encode(text, true),
                _ => return Err(bad("give one prompt per request".into())),
            },
            Prompt::Ids(ids) => {
                if let Some(id) = ids.iter().find(|&&id| id as usize >= vocab) {
                    return Err(bad(format!(
                        "token {id} is not below the vocabulary size {vocab}"
                    )));
                }
                Ok(ids.clone())
            }
        }
        .map_err(|e| bad(e.to_string()))?;
        if ids.is_empty() {
            return Err(bad(
                "it is empty and the model's tokenizer adds no bos token to start from".into(),
            ));
        }
        Ok(ids)
    }
}

/// Refuses a prompt that leaves no room for an answer in `context`.
pub(crate) fn check_context(
    prompt_tokens: usize,
    context: usize,
    param: &'static str,
) -> Checked<()> {
    if prompt_tokens >= context {
        return Err(BadRequest::new(
            Some(param),
            format!(
                "the prompt has {prompt_tokens} tokens and the context holds {context}: \
                 nothing is left for the answer"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(json: &str) -> Options {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn options_take_openai_defaults_and_refuse_out_of_range_values() {
        let ask = options("{}").check(100, 7).unwrap();
        assert_eq!(
            ask,
            Ask {
                max_tokens: 100,
                sampling: SamplingParams {
                    temperature: 1.0,
                    top_k: 0,
                    top_p: 1.0,
                    seed: 7
                },
                stop_texts: vec![]
            }
        );
        let ask = options(
            r#"{"max_tokens": 5, "max_completion_tokens": 9, "temperature": 0, "top_k": 3,
                "seed": 11, "stop": "\n", "n": 1, "logprobs": false, "user": "x"}"#,
        )
        .check(100, 7)
        .unwrap();
        assert_eq!((ask.max_tokens, ask.sampling.seed), (9, 11));
        assert_eq!((ask.sampling.temperature, ask.sampling.top_k), (0.0, 3));
        assert_eq!(ask.stop_texts, ["\n"]);
        for (json, param) in [
            (r#"{"max_tokens": 0}"#, "max_tokens"),
            (r#"{"max_tokens": 101}"#, "max_tokens"),
            (r#"{"max_completion_tokens": -1}"#, "max_completion_tokens"),
            (r#"{"temperature": 2.5}"#, "temperature"),
            (r#"{"top_p": 0}"#, "top_p"),
            (r#"{"top_k": -2}"#, "top_k"),
            (r#"{"stop": ["a", "b", "c", "d", "e"]}"#, "stop"),
            (r#"{"stop": [""]}"#, "stop"),
            (r#"{"n": 2}"#, "n"),
            (r#"{"logprobs": true}"#, "logprobs"),
        ] {
            let e = options(json).check(100, 7).unwrap_err();
            assert_eq!(e.param, Some(param), "{json}: {}", e.message);
        }
    }

    #[test]
    fn prompts_are_texts_one_text_or_ids() {
        let tokenizer = Tokenizer::bytes(258);
        let request = |prompt: &str| -> CompletionRequest {
            serde_json::from_str(&format!(r#"{{"model": "m", "prompt": {prompt}}}"#)).unwrap()
        };
        let hi = request(r#""Hi""#).prompt_ids(&tokenizer, 258).unwrap();
        assert_eq!(hi, [256, 72, 105]);
        assert_eq!(
            request(r#"["Hi"]"#).prompt_ids(&tokenizer, 258).unwrap(),
            hi
        );
        assert_eq!(
            request("[5, 6]").prompt_ids(&tokenizer, 258).unwrap(),
            [5, 6]
        );
        for bad in [r#"["a", "b"]"#, "[258]", "[]"] {
            assert!(request(bad).prompt_ids(&tokenizer, 258).is_err(), "{bad}");
        }
        assert!(check_context(9, 10, "prompt").is_ok());
        let e = check_context(10, 10, "prompt").unwrap_err();
        assert!(e.message.contains("10 tokens"), "{}", e.message);
    }

    #[test]
    fn chat_messages_render_in_the_template() {
        let template = ChatTemplate::new(
            "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}\
             {% if add_generation_prompt %}<assistant>{% endif %}",
        )
        .unwrap();
        let tokenizer = Tokenizer::bytes(258);
        let request: ChatRequest = serde_json::from_str(
            r#"{"model": "m", "messages": [{"role": "system", "content": "S"},
                {"role": "user", "content": [{"type": "text", "text": "A"},
                {"type": "text", "text": "B"}]}, {"role": "assistant", "content": null}]}"#,
        )
        .unwrap();
        let ids = request.prompt_ids(Some(&template), &tokenizer).unwrap();
        assert_eq!(
            tokenizer.decode(&ids).unwrap(),
            "<system>S<user>AB<assistant><assistant>"
        );
        assert!(request.prompt_ids(None, &tokenizer).is_err());
        let image: ChatRequest = serde_json::from_str(
            r#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
        )
        .unwrap();
        let e = image.prompt_ids(Some(&template), &tokenizer).unwrap_err();
        assert!(e.message.contains("image_url"), "{}", e.message);
    }
}
