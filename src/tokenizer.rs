//! Text to token ids and back: a Hugging Face `tokenizer.json`, the byte-level BPE vocabulary
//! embedded in a GGUF file, or plain bytes for tiny test models that have no vocabulary.
//!
//! Every kind answers the same three questions: [`Tokenizer::encode`], [`Tokenizer::decode`] and,
//! for streaming, [`StreamDecoder`], which holds back a token's text until it is complete UTF-8
//! (one character can span several byte-level tokens).
//!
//! Special tokens around a text are the model's own tokenizer's business, so that a prompt gives
//! the ids the model was trained on: a `tokenizer.json`'s post-processor adds what it adds (as
//! transformers' `encode(text, add_special_tokens=True)` does), a GGUF vocabulary follows
//! llama.cpp's `tokenizer.ggml.add_bos_token` rule ([`GgufTokenizer::adds_bos`]), and the
//! byte-level fallback starts every text with its bos. config.json's `bos_token_id` only names an
//! id; it never decides that one is added.

use std::collections::HashMap;

use tokenizers::AddedToken;
use tokenizers::SplitDelimiterBehavior;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};

use crate::chat::ChatTemplate;
use crate::formats::gguf::GgufTokenizer;
use crate::{Error, Result};

/// GGUF `tokenizer.ggml.token_type` of an ordinary token.
const TOKEN_TYPE_NORMAL: i32 = 1;
/// GGUF `tokenizer.ggml.token_type` of a control token (`<|begin_of_text|>` and the like).
const TOKEN_TYPE_CONTROL: i32 = 3;
/// GGUF `tokenizer.ggml.token_type` of a user-defined token, matched whole in the input.
const TOKEN_TYPE_USER_DEFINED: i32 = 4;
/// GGUF `tokenizer.ggml.token_type` of a token no text produces (the `[PAD{id}]` tokens that fill
/// a token list up to the embedding's rows).
const TOKEN_TYPE_UNUSED: i32 = 5;

/// Llama 3's pre-tokenizer split (its tokenizer.json, and bitnet-b1.58-2B-4T's): contractions
/// in any case, letters with one leading non-letter, digits in groups of up to three.
pub(crate) const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Byte-level fallback: ids 0..=255 are the bytes, 256 marks the beginning of a sequence, 257 its
/// end; any further ids up to the model's vocabulary are specials that decode to nothing.
const BYTE_BOS: u32 = 256;
const BYTE_EOS: u32 = 257;

/// A tokenizer with its beginning- and end-of-sequence ids.
///
/// ```
/// use bitnet_wgpu::tokenizer::Tokenizer;
/// let t = Tokenizer::bytes(258);
/// let ids = t.encode("hé", true)?;
/// assert_eq!(ids, [256, 104, 0xc3, 0xa9]);
/// assert_eq!(t.encode("hé", false)?, [104, 0xc3, 0xa9]);
/// assert_eq!(t.decode(&ids)?, "hé");
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Tokenizer {
    kind: Kind,
    bos: Option<u32>,
    eos: Option<u32>,
    /// Whether the bos goes before a text, beyond what the `tokenizers` post-processor adds.
    add_bos: bool,
    /// Whether the eos goes after a text, likewise.
    add_eos: bool,
    /// How the model's conversations are written, when it is a chat model.
    chat: Option<ChatTemplate>,
}

#[derive(Clone, Debug)]
enum Kind {
    /// A `tokenizers` tokenizer and one past its largest id (not its token count: a vocabulary
    /// may leave ids unused). Boxed: the tokenizers type is large and the byte kind is two words.
    Hf(Box<tokenizers::Tokenizer>, usize),
    Bytes {
        vocab_size: usize,
    },
}

impl Kind {
    fn hf(inner: tokenizers::Tokenizer) -> Self {
        let ids = inner
            .get_vocab(true)
            .into_values()
            .max()
            .map_or(0, |id| id as usize + 1);
        Kind::Hf(Box::new(inner), ids)
    }
}

/// The checks tokenizers' `TemplateProcessing` builder makes and its deserializer does not:
/// encoding panics on a template naming a special token the processor does not define and on
/// the second sequence in the single template; a special token's ids and tokens must pair up,
/// as its constructor requires.
fn check_post_processor(processor: &serde_json::Value) -> Result<()> {
    let bad = |why: String| Error::invalid("tokenizer.json", format!("post_processor: {why}"));
    match processor["type"].as_str() {
        Some("Sequence") => processor["processors"]
            .as_array()
            .into_iter()
            .flatten()
            .try_for_each(check_post_processor),
        Some("TemplateProcessing") => {
            let specials = &processor["special_tokens"];
            for (name, special) in specials.as_object().into_iter().flatten() {
                let len = |key: &str| special[key].as_array().map(Vec::len);
                if len("ids") != len("tokens") {
                    return Err(bad(format!(
                        "special token {name:?} has not as many ids as tokens"
                    )));
                }
            }
            for template in ["single", "pair"] {
                for piece in processor[template].as_array().into_iter().flatten() {
                    if let Some(id) = piece["SpecialToken"]["id"].as_str()
                        && specials.get(id).is_none()
                    {
                        return Err(bad(format!(
                            "the {template} template names the undefined special token {id:?}"
                        )));
                    }
                    if template == "single" && piece["Sequence"]["id"] == "B" {
                        return Err(bad("the single template names sequence B".into()));
                    }
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

impl Tokenizer {
    /// A Hugging Face `tokenizer.json`, given as its bytes. Its post-processor alone decides
    /// which special tokens surround a text. It names no bos/eos ids (those live in config.json):
    /// set them with [`Tokenizer::with_special_ids`].
    pub fn from_json(json: &[u8]) -> Result<Self> {
        // tokenizers panics (an `expect` in its decoder's deserializer) when the decoder is not
        // well-formed JSON, instead of returning its error, so the file's syntax and the
        // decoder's strings (which skipping would not decode) are checked first.
        #[derive(serde::Deserialize)]
        struct Checked {
            #[serde(rename = "decoder")]
            _decoder: Option<serde_json::Value>,
        }
        let _: Checked =
            serde_json::from_slice(json).map_err(|e| Error::invalid("tokenizer.json", e))?;
        let inner = tokenizers::Tokenizer::from_bytes(json)
            .map_err(|e| Error::invalid("tokenizer.json", e))?;
        // The post-processor is checked as tokenizers writes it back: tokenizers reads a
        // processor by its fields, whatever its "type" says.
        if let Some(processor) = inner.get_post_processor() {
            let written =
                serde_json::to_value(processor).map_err(|e| Error::invalid("tokenizer.json", e))?;
            check_post_processor(&written)?;
        }
        Ok(Tokenizer {
            kind: Kind::hf(inner),
            bos: None,
            eos: None,
            add_bos: false,
            add_eos: false,
            chat: None,
        })
    }

    /// The byte-level BPE vocabulary of a GGUF file (`tokenizer.ggml.model = "gpt2"`, the
    /// 2B-4T model's): tokens and merges in GPT-2's byte-to-character alphabet, split as
    /// llama.cpp splits for the file's `tokenizer.ggml.pre`: Llama 3's regex for its family
    /// ([`GgufTokenizer::splits_like_llama3`]), GPT-2's otherwise. Control and user-defined
    /// tokens are matched whole in the input,
    /// and control tokens are left out of decoded text. The bos and eos are added as llama.cpp
    /// adds them ([`GgufTokenizer::adds_bos`], [`GgufTokenizer::adds_eos`]).
    ///
    /// Errors: another tokenizer model (SentencePiece `llama` vocabularies carry scores, not
    /// merges, and are not supported), a merge that is not two tokens separated by a space, or a
    /// merge whose parts or result are not in the vocabulary.
    pub fn from_gguf(t: &GgufTokenizer) -> Result<Self> {
        if t.model != "gpt2" {
            return Err(Error::invalid(
                "GGUF tokenizer",
                format!(
                    "tokenizer.ggml.model {:?} is not supported (only \"gpt2\", byte-level BPE)",
                    t.model
                ),
            ));
        }
        // The padding after the last real token is not the tokenizer's: its ids stay outside
        // the vocabulary, so that generation never picks them (as with the folder's tokenizer).
        let padding = t
            .tokens
            .iter()
            .enumerate()
            .zip(&t.token_types)
            .rev()
            .take_while(|&((id, token), &kind)| {
                kind == TOKEN_TYPE_UNUSED && *token == format!("[PAD{id}]")
            })
            .count();
        let tokens = &t.tokens[..t.tokens.len() - padding];
        let mut vocab = HashMap::with_capacity(tokens.len());
        for (id, token) in tokens.iter().enumerate() {
            // The first of duplicated tokens keeps its id, as llama.cpp's lookup does.
            vocab.entry(token.clone()).or_insert(id as u32);
        }
        let merges = t
            .merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        Error::invalid(
                            "GGUF tokenizer",
                            format!("merge {m:?} is not two tokens separated by a space"),
                        )
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let llama3 = t.splits_like_llama3();
        let bpe = BPE::builder()
            .vocab_and_merges(
                vocab
                    .into_iter()
                    .collect::<tokenizers::models::bpe::Vocab>(),
                merges,
            )
            .ignore_merges(llama3)
            .build()
            .map_err(|e| Error::invalid("GGUF tokenizer", e))?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        if llama3 {
            let split = Split::new(
                SplitPattern::Regex(LLAMA3_SPLIT.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| Error::invalid("GGUF tokenizer", e))?;
            inner.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])));
        } else {
            inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        }
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&t.token_types)
            .filter(|&(_, &kind)| kind == TOKEN_TYPE_CONTROL || kind == TOKEN_TYPE_USER_DEFINED)
            .map(|(token, &kind)| AddedToken::from(token.clone(), kind == TOKEN_TYPE_CONTROL))
            .collect();
        inner.add_special_tokens(&added);
        Tokenizer {
            kind: Kind::hf(inner),
            bos: None,
            eos: None,
            add_bos: t.adds_bos(),
            add_eos: t.adds_eos(),
            chat: None,
        }
        .with_special_ids(t.bos, t.eos)
    }

    /// The byte-level fallback for a model of `vocab_size` tokens: bytes are ids 0..=255, bos is
    /// 256 and eos 257 when the vocabulary reaches that far. Every text starts with the bos when
    /// there is one.
    pub fn bytes(vocab_size: usize) -> Self {
        let special = |id: u32| (vocab_size > id as usize).then_some(id);
        Tokenizer {
            kind: Kind::Bytes { vocab_size },
            bos: special(BYTE_BOS),
            eos: special(BYTE_EOS),
            add_bos: true,
            add_eos: false,
            chat: None,
        }
    }

    /// Sets the bos and eos ids (`None` for none), refusing ids outside the vocabulary. The ids
    /// name the tokens; whether a text gets them stays the tokenizer's rule.
    pub fn with_special_ids(mut self, bos: Option<u32>, eos: Option<u32>) -> Result<Self> {
        for (name, id) in [("bos", bos), ("eos", eos)] {
            if let Some(id) = id.filter(|&id| id as usize >= self.vocab_size()) {
                return Err(Error::invalid(
                    "tokenizer",
                    format!(
                        "{name} id {id} is outside the vocabulary of {} tokens",
                        self.vocab_size()
                    ),
                ));
            }
        }
        self.bos = bos;
        self.eos = eos;
        Ok(self)
    }

    /// Sets the chat template that comes with the model ([`crate::chat`]); `None` for a model
    /// without one.
    pub fn with_chat_template(mut self, template: Option<ChatTemplate>) -> Self {
        self.chat = template;
        self
    }

    /// The model's chat template, if it has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat.as_ref()
    }

    /// The id of the vocabulary entry `token` (a special token's text, such as `<|eot_id|>`, or
    /// a BPE token in its own alphabet); `None` when there is none, and always for the byte-level
    /// fallback, whose specials have no text.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        match &self.kind {
            Kind::Hf(t, _) => t.token_to_id(token),
            Kind::Bytes { .. } => None,
        }
    }

    /// The vocabulary entry of `id`, the inverse of [`Tokenizer::token_id`].
    pub fn token(&self, id: u32) -> Option<String> {
        match &self.kind {
            Kind::Hf(t, _) => t.id_to_token(id),
            Kind::Bytes { .. } => None,
        }
    }

    /// The id that starts a sequence, if the vocabulary has one.
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// The id that ends a sequence (generation stops there), if the vocabulary has one.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }

    /// How many ids the tokenizer can produce (added tokens included); every id is below it.
    pub fn vocab_size(&self) -> usize {
        match &self.kind {
            Kind::Hf(_, ids) => *ids,
            Kind::Bytes { vocab_size } => *vocab_size,
        }
    }

    /// The ids of `text`. With `add_special_tokens`, surrounded by the special tokens the
    /// model's own tokenizer adds (see the module documentation): these are the ids a prompt or
    /// a text to score must be given as. Without, the text's ids alone.
    ///
    /// Errors: a byte the byte-level fallback's vocabulary lacks, or a failure inside the
    /// tokenizer.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let special = |add: bool, id: Option<u32>| id.filter(|_| add && add_special_tokens);
        let mut ids: Vec<u32> = special(self.add_bos, self.bos).into_iter().collect();
        match &self.kind {
            Kind::Hf(t, _) => {
                let encoding = t
                    .encode(text, add_special_tokens)
                    .map_err(|e| Error::invalid("tokenizer", e))?;
                ids.extend_from_slice(encoding.get_ids());
            }
            Kind::Bytes { vocab_size } => {
                if let Some(b) = text.bytes().find(|&b| usize::from(b) >= *vocab_size) {
                    return Err(Error::invalid(
                        "tokenizer",
                        format!(
                            "byte 0x{b:02x} has no token in the byte-level vocabulary of \
                             {vocab_size} tokens"
                        ),
                    ));
                }
                ids.extend(text.bytes().map(u32::from));
            }
        }
        ids.extend(special(self.add_eos, self.eos));
        Ok(ids)
    }

    /// This tokenizer as the text of a `tokenizer.json` that tokenizes as [`Tokenizer::encode`]
    /// does (a GGUF vocabulary's bos/eos rule becomes a post-processor), for saving beside a
    /// model; `None` for the byte-level fallback, which needs no file. Errors: a failure to
    /// build the post-processor or to serialize.
    pub fn to_json(&self) -> Result<Option<String>> {
        let Kind::Hf(inner, _) = &self.kind else {
            return Ok(None);
        };
        let mut inner = (**inner).clone();
        let token = |id: Option<u32>| id.and_then(|id| inner.id_to_token(id).map(|t| (t, id)));
        let bos = token(self.bos).filter(|_| self.add_bos);
        let eos = token(self.eos).filter(|_| self.add_eos);
        if bos.is_some() || eos.is_some() {
            use tokenizers::processors::template::TemplateProcessing;
            let specials: Vec<(String, u32)> = bos.iter().chain(&eos).cloned().collect();
            let name = |t: &Option<(String, u32)>| t.as_ref().map(|(s, _)| s.clone());
            let around = |middle: &str| {
                [name(&bos), Some(middle.to_string()), name(&eos)]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let fail = |e: String| Error::invalid("tokenizer post-processor", e);
            let template = TemplateProcessing::builder()
                .try_single(around("$A"))
                .map_err(fail)?
                .try_pair(format!("{} {}", around("$A"), around("$B:1")))
                .map_err(fail)?
                .special_tokens(specials)
                .build()
                .map_err(|e| fail(e.to_string()))?;
            inner.with_post_processor(Some(template));
        }
        inner
            .to_string(true)
            .map(Some)
            .map_err(|e| Error::invalid("tokenizer", e))
    }

    /// The text of `ids`, special tokens left out. Bytes that do not form valid UTF-8 become
    /// U+FFFD. Errors: an id outside the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab_size()) {
            return Err(Error::invalid(
                "token id",
                format!(
                    "{id} is outside the tokenizer's vocabulary of {} tokens",
                    self.vocab_size()
                ),
            ));
        }
        match &self.kind {
            Kind::Hf(t, _) => t
                .decode(ids, true)
                .map_err(|e| Error::invalid("tokenizer", e)),
            Kind::Bytes { .. } => {
                let bytes: Vec<u8> = ids.iter().filter_map(|&id| u8::try_from(id).ok()).collect();
                Ok(String::from_utf8_lossy(&bytes).into_owned())
            }
        }
    }

    /// This tokenizer as a GGUF file's `tokenizer.ggml.*` keys, so that llama.cpp and bitnet.cpp
    /// tokenize as it does: the vocabulary by id, the merges, special added tokens as control tokens and other
    /// added tokens as user-defined ones, `pre` named by the pre-tokenizer (`llama-bpe` for Llama
    /// 3's split, `gpt-2` for plain byte-level), and `add_bos_token`/`add_eos_token` set to what
    /// [`Tokenizer::encode`] adds, so no reader has to guess.
    ///
    /// Errors: the byte-level fallback (nothing to write), a vocabulary that leaves an id unused,
    /// a model other than byte-level BPE, a pre-tokenizer llama.cpp has
    /// no name for, and a post-processor that adds tokens other than the bos and eos.
    pub fn to_gguf(&self) -> Result<GgufTokenizer> {
        let bad = |why: String| Error::invalid("tokenizer for GGUF", why);
        let Kind::Hf(inner, _) = &self.kind else {
            return Err(bad(
                "the byte-level fallback has no vocabulary to write".into()
            ));
        };
        // GGUF numbers tokens by their position, so every id up to the largest must be used;
        // checked before serializing, which walks every id up to the largest.
        let mut ids: Vec<u32> = inner.get_vocab(true).into_values().collect();
        ids.sort_unstable();
        ids.dedup();
        if let Some(gap) = (0..).zip(&ids).find(|&(i, &id)| id != i).map(|(i, _)| i) {
            return Err(bad(format!(
                "no token has id {gap}, and GGUF numbers tokens by their position"
            )));
        }
        let json: serde_json::Value = inner
            .to_string(false)
            .map_err(|e| bad(e.to_string()))
            .and_then(|s| serde_json::from_str(&s).map_err(|e| bad(e.to_string())))?;
        let model = &json["model"];
        let vocab = model["vocab"].as_object().into_iter().flatten();
        let added = json["added_tokens"].as_array().into_iter().flatten();
        let entries: Vec<(Option<u64>, &str, i32)> = vocab
            .map(|(token, id)| (id.as_u64(), token.as_str(), TOKEN_TYPE_NORMAL))
            .chain(added.map(|added| {
                let kind = if added["special"] == true {
                    TOKEN_TYPE_CONTROL
                } else {
                    TOKEN_TYPE_USER_DEFINED
                };
                let content = added["content"].as_str().unwrap_or_default();
                (added["id"].as_u64(), content, kind)
            }))
            .collect();
        // No id can lie beyond the entry count without leaving a gap: such a one is refused
        // before the table is sized by it.
        let count = entries.len();
        let mut by_id: Vec<Option<(String, i32)>> = Vec::new();
        for (id, token, kind) in entries {
            let id = id
                .and_then(|id| usize::try_from(id).ok())
                .filter(|&id| id < count)
                .ok_or_else(|| {
                    bad(format!(
                        "token {token:?} has id {id:?}, not below the {count} entries of the \
                         vocabulary, and GGUF numbers tokens by their position"
                    ))
                })?;
            if by_id.len() <= id {
                by_id.resize(id + 1, None);
            }
            by_id[id] = Some((token.to_string(), kind));
        }
        if let Some(id) = by_id.iter().position(Option::is_none) {
            return Err(bad(format!(
                "no token has id {id}, and GGUF numbers tokens by their position"
            )));
        }
        let (tokens, token_types): (Vec<String>, Vec<i32>) = by_id.into_iter().flatten().unzip();
        if model["type"] != "BPE" || !has_type(&json["decoder"], "ByteLevel") {
            return Err(bad(
                "only byte-level BPE vocabularies (GPT-2, Llama 3) can be written to GGUF".into(),
            ));
        }
        let pre = &json["pre_tokenizer"];
        let llama3_split =
            |p: &serde_json::Value| p["type"] == "Split" && p["pattern"]["Regex"] == LLAMA3_SPLIT;
        let pre_name = if pre["type"] == "Sequence"
            && pre["pretokenizers"].as_array().is_some_and(|parts| {
                parts.len() == 2 && llama3_split(&parts[0]) && parts[1]["type"] == "ByteLevel"
            }) {
            "llama-bpe"
        } else if pre["type"] == "ByteLevel" && pre["use_regex"] == true {
            "gpt-2"
        } else {
            return Err(bad(format!(
                "the pre-tokenizer {pre} has no llama.cpp name (only Llama 3's split or GPT-2's \
                 byte-level regex)"
            )));
        };

        // tokenizers writes merges as "a b" strings or, since 0.20, as [a, b] pairs.
        let merges = model["merges"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| match m {
                serde_json::Value::String(s) => Ok(s.clone()),
                serde_json::Value::Array(pair) => match &pair[..] {
                    [serde_json::Value::String(a), serde_json::Value::String(b)] => {
                        Ok(format!("{a} {b}"))
                    }
                    _ => Err(bad(format!("merge {m} is not two tokens"))),
                },
                _ => Err(bad(format!("merge {m} is not two tokens"))),
            })
            .collect::<Result<Vec<_>>>()?;

        let around = self.encode("", true)?;
        let add_bos = self.bos.is_some() && around.first() == self.bos.as_ref();
        let add_eos = self.eos.is_some()
            && around.last() == self.eos.as_ref()
            && around.len() > add_bos as usize;
        if around.len() != add_bos as usize + add_eos as usize {
            return Err(bad(format!(
                "its post-processor adds {around:?} to an empty text; GGUF can only say that a \
                 bos ({:?}) or an eos ({:?}) is added",
                self.bos, self.eos
            )));
        }
        Ok(GgufTokenizer {
            model: "gpt2".into(),
            tokens,
            merges,
            token_types,
            bos: self.bos,
            eos: self.eos,
            pre: Some(pre_name.into()),
            add_bos: Some(add_bos),
            add_eos: Some(add_eos),
            chat_template: self.chat.as_ref().map(|t| t.source().to_string()),
        })
    }

    /// A decoder for ids that arrive one at a time.
    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder {
            tokenizer: self,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }
}

/// Whether a tokenizer.json component is of `kind`, or a sequence holding one.
fn has_type(component: &serde_json::Value, kind: &str) -> bool {
    component["type"] == kind
        || ["decoders", "pretokenizers", "processors"]
            .iter()
            .any(|key| {
                component[key]
                    .as_array()
                    .is_some_and(|parts| parts.iter().any(|p| has_type(p, kind)))
            })
}

/// Turns ids into text as they arrive, emitting only complete characters.
///
/// Decoding one token at a time goes wrong twice: a multi-byte character split across tokens
/// would come out as U+FFFD, and decoders that strip a leading space (SentencePiece's) would eat
/// the space between words. So each step decodes the previous emitted token together with the
/// pending ones and emits the part past that token's text, once it no longer ends in U+FFFD.
///
/// ```
/// use bitnet_wgpu::tokenizer::Tokenizer;
/// let t = Tokenizer::bytes(258);
/// let mut stream = t.stream_decoder();
/// assert_eq!(stream.step(b'a'.into())?, "a");
/// assert_eq!(stream.step(0xc3)?, ""); // the first half of "é"
/// assert_eq!(stream.step(0xa9)?, "é");
/// assert_eq!(stream.finish()?, "");
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct StreamDecoder<'t> {
    tokenizer: &'t Tokenizer,
    ids: Vec<u32>,
    /// Start of the context: the last token whose text was already emitted.
    prefix: usize,
    /// Ids before this one have been emitted.
    read: usize,
}

impl StreamDecoder<'_> {
    /// Adds one id; returns the text it completes (often empty). Errors: an id outside the
    /// vocabulary.
    pub fn step(&mut self, id: u32) -> Result<String> {
        // Checked before it joins the pending ids, so one bad id does not poison the stream.
        self.tokenizer.decode(&[id])?;
        self.ids.push(id);
        let (emitted, text) = self.pending()?;
        if text.ends_with('\u{fffd}') || text.len() <= emitted {
            return Ok(String::new());
        }
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(text[emitted..].to_string())
    }

    /// The text still held back (an incomplete character, as U+FFFD), at the end of a stream.
    pub fn finish(&mut self) -> Result<String> {
        let (emitted, text) = self.pending()?;
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(text.get(emitted..).unwrap_or_default().to_string())
    }

    /// The byte length of the already emitted context and the text of context plus pending ids.
    fn pending(&self) -> Result<(usize, String)> {
        let context = self.tokenizer.decode(&self.ids[self.prefix..self.read])?;
        let text = self.tokenizer.decode(&self.ids[self.prefix..])?;
        // Should a decoder rewrite the context once more tokens follow, emit from the first
        // character boundary past it rather than split a character.
        let mut emitted = context.len().min(text.len());
        while !text.is_char_boundary(emitted) {
            emitted += 1;
        }
        Ok((emitted, text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A character-level BPE with a few merges, written the way `tokenizers` saves one.
    const BPE_JSON: &str = r#"{
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [
            {"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false,
             "normalized": false, "special": true},
            {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false,
             "normalized": false, "special": true},
            {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false,
             "normalized": false, "special": true}
        ],
        "normalizer": null,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Fuse"},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": "<unk>",
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, " ": 3, "a": 4, "b": 5, "c": 6,
                      "h": 7, "t": 8, "e": 9, "th": 10, "the": 11, "ab": 12},
            "merges": ["t h", "th e", "a b"]
        }
    }"#;

    /// A synthetic GPT-2 style vocabulary: the 256 byte characters, two merges, two controls.
    fn gguf_tokenizer() -> GgufTokenizer {
        let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        alphabet.sort_unstable();
        let mut tokens: Vec<String> = alphabet.iter().map(char::to_string).collect();
        tokens.extend(["he", "Ġt", "<|begin|>", "<|end|>"].map(String::from));
        let mut token_types = vec![1; tokens.len()];
        let n = tokens.len();
        token_types[n - 2] = TOKEN_TYPE_CONTROL;
        token_types[n - 1] = TOKEN_TYPE_CONTROL;
        GgufTokenizer {
            model: "gpt2".into(),
            tokens,
            merges: vec!["h e".into(), "Ġ t".into()],
            token_types,
            bos: Some(n as u32 - 2),
            eos: Some(n as u32 - 1),
            pre: Some("gpt-2".into()),
            add_bos: None,
            add_eos: None,
            chat_template: None,
        }
    }

    /// [`BPE_JSON`] with the post-processor Llama 3's tokenizer.json has (byte-level offsets,
    /// then a template that puts `<s>` first), as bitnet-b1.58-2B-4T ships it.
    fn json_with_bos_template() -> String {
        let template = r#""post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false,
             "use_regex": true},
            {"type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}}],
             "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                      {"Sequence": {"id": "A", "type_id": 0}},
                      {"SpecialToken": {"id": "<s>", "type_id": 1}},
                      {"Sequence": {"id": "B", "type_id": 1}}],
             "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}]}"#;
        BPE_JSON.replace(r#""post_processor": null"#, template)
    }

    fn round_trip(t: &Tokenizer, text: &str) -> Vec<u32> {
        let ids = t.encode(text, false).unwrap();
        assert_eq!(t.decode(&ids).unwrap(), text);
        let mut stream = t.stream_decoder();
        let mut streamed = String::new();
        for &id in &ids {
            let piece = stream.step(id).unwrap();
            assert!(!piece.contains('\u{fffd}'), "{piece:?}");
            streamed += &piece;
        }
        streamed += &stream.finish().unwrap();
        assert_eq!(streamed, text);
        ids
    }

    /// Found by fuzzing (fuzz/fuzz_targets/tokenizer_json.rs): tokenizers read these templates,
    /// then panicked when encoding.
    #[test]
    fn inconsistent_templates_are_an_error() {
        let good = json_with_bos_template();
        Tokenizer::from_json(good.as_bytes()).unwrap();
        for (from, to) in [
            (r#""special_tokens": {"<s>""#, r#""special_tokens": {"<t>""#),
            (r#""id": "A""#, r#""id": "B""#),
            (r#""ids": [1]"#, r#""ids": [1, 2]"#),
            (
                r#""type": "TemplateProcessing",
             "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},"#,
                r#""type": "TemplateProcessinf",
             "single": [{"SpecialToken": {"id": "<t>", "type_id": 0}},"#,
            ),
        ] {
            let json = good.replacen(from, to, 1);
            assert_ne!(json, good, "{to}");
            let e = Tokenizer::from_json(json.as_bytes()).unwrap_err();
            assert!(e.to_string().contains("post_processor"), "{to}: {e}");
        }
    }

    #[test]
    fn json_bpe_round_trips_and_merges() {
        let t = Tokenizer::from_json(BPE_JSON.as_bytes())
            .unwrap()
            .with_special_ids(Some(1), Some(2))
            .unwrap();
        assert_eq!(t.vocab_size(), 13);
        let ids = round_trip(&t, "the cab that");
        assert_eq!(ids, [11, 3, 6, 12, 3, 10, 4, 8]);
        // No post-processor: transformers adds nothing, whatever bos config.json names.
        assert_eq!(t.encode("ab", true).unwrap(), [12]);
        assert_eq!(t.encode("", true).unwrap(), [] as [u32; 0]);
        // Specials are left out of decoded text.
        assert_eq!(t.decode(&[1, 11, 2]).unwrap(), "the");
        assert!(t.decode(&[13]).is_err());
        assert!(t.clone().with_special_ids(Some(99), None).is_err());
    }

    #[test]
    fn a_template_post_processor_adds_its_bos() {
        let t = Tokenizer::from_json(json_with_bos_template().as_bytes())
            .unwrap()
            .with_special_ids(Some(1), Some(2))
            .unwrap();
        // transformers: tokenizer("the cab").input_ids == [1, 11, 3, 6, 12]
        assert_eq!(t.encode("the cab", true).unwrap(), [1, 11, 3, 6, 12]);
        assert_eq!(t.encode("", true).unwrap(), [1]);
        assert_eq!(t.encode("the cab", false).unwrap(), [11, 3, 6, 12]);
        // The template's id, not config.json's, is what gets added.
        let other_bos = t.clone().with_special_ids(Some(2), None).unwrap();
        assert_eq!(other_bos.encode("ab", true).unwrap(), [1, 12]);
    }

    #[test]
    fn bad_json_is_an_error() {
        let e = Tokenizer::from_json(b"{\"model\": 3}").unwrap_err();
        assert!(e.to_string().contains("tokenizer.json"), "{e}");
    }

    /// Found by fuzzing (fuzz/fuzz_targets/tokenizer_json.rs): a syntax error or a lone
    /// surrogate inside the decoder made tokenizers panic.
    #[test]
    fn malformed_json_in_the_decoder_is_an_error() {
        for json in [
            r#"{"decoder": {"type": "ByteLevel", "trim_offsets" 1}}"#,
            r#"{"decoder": {"type": "Replace", "content": "\udc00"}}"#,
        ] {
            let e = Tokenizer::from_json(json.as_bytes()).unwrap_err();
            assert!(e.to_string().contains("tokenizer.json"), "{e}");
        }
    }

    #[test]
    fn gguf_byte_level_bpe_round_trips() {
        let g = gguf_tokenizer();
        let t = Tokenizer::from_gguf(&g).unwrap();
        assert_eq!(t.vocab_size(), 260);
        assert_eq!((t.bos(), t.eos()), (Some(258), Some(259)));
        let ids = round_trip(&t, "he met them, 日本語 ✓ ok\n");
        let he = g.tokens.iter().position(|s| s == "he").unwrap() as u32;
        let space_t = g.tokens.iter().position(|s| s == "Ġt").unwrap() as u32;
        assert_eq!(ids[0], he);
        assert!(ids.contains(&space_t), "{ids:?}");
        // Control tokens are matched whole in text and left out when decoding.
        let ids = t.encode("<|begin|>he", true).unwrap();
        assert_eq!(ids, [258, he]);
        assert_eq!(t.decode(&ids).unwrap(), "he");
        // Padded to a larger embedding as GGUF writers pad it: the same tokenizer.
        let mut padded = g.clone();
        padded.token_types.resize(g.tokens.len(), TOKEN_TYPE_NORMAL);
        padded
            .tokens
            .extend((260..264).map(|id| format!("[PAD{id}]")));
        padded.token_types.resize(264, TOKEN_TYPE_UNUSED);
        let p = Tokenizer::from_gguf(&padded).unwrap();
        assert_eq!(p.vocab_size(), 260);
        assert_eq!(
            p.encode("he met them", true).unwrap(),
            t.encode("he met them", true).unwrap()
        );
        assert!(p.decode(&[261]).is_err());
    }

    #[test]
    fn gguf_bos_follows_llama_cpp() {
        let he = |g: &GgufTokenizer| g.tokens.iter().position(|s| s == "he").unwrap() as u32;
        let ids = |g: &GgufTokenizer| Tokenizer::from_gguf(g).unwrap().encode("he", true).unwrap();
        let mut g = gguf_tokenizer();
        // llama.cpp: pre "gpt-2" without add_bos_token adds nothing; "llama-bpe" adds the bos.
        assert_eq!(ids(&g), [he(&g)]);
        g.pre = Some("llama-bpe".into());
        assert_eq!(ids(&g), [258, he(&g)]);
        g.add_bos = Some(false);
        assert_eq!(ids(&g), [he(&g)]);
        g.pre = None;
        g.add_bos = Some(true);
        g.add_eos = Some(true);
        assert_eq!(ids(&g), [258, he(&g), 259]);
        let t = Tokenizer::from_gguf(&g).unwrap();
        assert_eq!(t.encode("he", false).unwrap(), [he(&g)]);
    }

    #[test]
    fn gguf_tokenizer_errors_name_the_problem() {
        let mut g = gguf_tokenizer();
        g.model = "llama".into();
        let e = Tokenizer::from_gguf(&g).unwrap_err().to_string();
        assert!(e.contains("llama"), "{e}");
        let mut g = gguf_tokenizer();
        g.merges.push("nospace".into());
        let e = Tokenizer::from_gguf(&g).unwrap_err().to_string();
        assert!(e.contains("nospace"), "{e}");
        let mut g = gguf_tokenizer();
        g.merges.push("x y".into());
        assert!(Tokenizer::from_gguf(&g).is_err());
    }

    /// A byte-level BPE tokenizer.json: the 256 byte characters, a few merges (one, "3 4",
    /// crossing the boundary Llama 3 puts after three digits), and two special added tokens;
    /// Llama 3's pre-tokenizer and bos template, or GPT-2's plain byte-level one.
    fn byte_level_json(llama3: bool) -> String {
        let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        alphabet.sort_unstable();
        let mut vocab: Vec<String> = alphabet.iter().map(char::to_string).collect();
        let merges = [["Ġ", "t"], ["h", "e"], ["Ġt", "he"], ["1", "2"], ["3", "4"]];
        vocab.extend(merges.iter().map(|[a, b]| format!("{a}{b}")));
        let vocab: serde_json::Map<String, serde_json::Value> = vocab
            .into_iter()
            .enumerate()
            .map(|(id, token)| (token, id.into()))
            .collect();
        let special = |id: usize, content: &str| {
            serde_json::json!({"id": id, "content": content, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        };
        let (pre_tokenizer, post_processor) = if llama3 {
            let bos =
                serde_json::json!({"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}});
            (
                serde_json::json!({"type": "Sequence", "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated",
                     "invert": false},
                    {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
                     "use_regex": false}]}),
                serde_json::json!({"type": "TemplateProcessing",
                    "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                             {"Sequence": {"id": "B", "type_id": 1}}],
                    "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>",
                        "ids": [261], "tokens": ["<|begin_of_text|>"]}}}),
            )
        } else {
            (
                serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
                    "trim_offsets": true, "use_regex": true}),
                serde_json::Value::Null,
            )
        };
        serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [special(261, "<|begin_of_text|>"), special(262, "<|end_of_text|>")],
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
                        "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
                "byte_fallback": false, "ignore_merges": llama3, "vocab": vocab,
                "merges": merges}
        })
        .to_string()
    }

    #[test]
    fn byte_level_tokenizers_survive_gguf() {
        for (llama3, pre) in [(true, "llama-bpe"), (false, "gpt-2")] {
            let t = Tokenizer::from_json(byte_level_json(llama3).as_bytes())
                .unwrap()
                .with_special_ids(Some(261), Some(262))
                .unwrap();
            let g = t.to_gguf().unwrap();
            assert_eq!(g.pre.as_deref(), Some(pre));
            assert_eq!((g.add_bos, g.add_eos), (Some(llama3), Some(false)));
            assert_eq!(g.tokens.len(), 263);
            assert_eq!(g.token_types[261], TOKEN_TYPE_CONTROL);
            assert_eq!(g.merges[4], "3 4");
            let back = Tokenizer::from_gguf(&g).unwrap();
            for text in [
                "the theme 1234 I'M here",
                "  the\n\nthe ",
                "<|begin_of_text|>the",
            ] {
                let ids = t.encode(text, true).unwrap();
                assert_eq!(back.encode(text, true).unwrap(), ids, "{pre}: {text:?}");
                assert_eq!(back.decode(&ids).unwrap(), t.decode(&ids).unwrap());
            }
        }
        // Llama 3 splits digits in threes, so "3 4" cannot merge across "123|4"; GPT-2 can.
        let digits = |llama3: bool| {
            let t = Tokenizer::from_json(byte_level_json(llama3).as_bytes()).unwrap();
            t.encode("1234", false).unwrap()
        };
        assert_eq!(digits(true), [259, 18, 19]);
        assert_eq!(digits(false), [259, 260]);
    }

    #[test]
    fn tokenizers_gguf_cannot_express_are_refused() {
        let e = Tokenizer::bytes(300).to_gguf().unwrap_err().to_string();
        assert!(e.contains("byte-level fallback"), "{e}");
        let fused = Tokenizer::from_json(BPE_JSON.as_bytes()).unwrap();
        let e = fused.to_gguf().unwrap_err().to_string();
        assert!(e.contains("byte-level BPE"), "{e}");
        let holed = BPE_JSON.replace(r#""ab": 12"#, r#""ab": 14"#);
        let e = Tokenizer::from_json(holed.as_bytes())
            .unwrap()
            .to_gguf()
            .unwrap_err()
            .to_string();
        assert!(e.contains("no token has id 12"), "{e}");
        // An id far beyond the vocabulary is refused before anything is sized by it.
        let far = BPE_JSON.replace(r#""ab": 12"#, r#""ab": 4000000000"#);
        let e = Tokenizer::from_json(far.as_bytes())
            .unwrap()
            .to_gguf()
            .unwrap_err()
            .to_string();
        assert!(e.contains("no token has id 12"), "{e}");
        let t = Tokenizer::from_json(byte_level_json(true).as_bytes())
            .unwrap()
            .with_special_ids(Some(262), None)
            .unwrap();
        let e = t.to_gguf().unwrap_err().to_string();
        assert!(e.contains("post-processor"), "{e}");
    }

    #[test]
    fn bytes_round_trip_and_specials() {
        let t = Tokenizer::bytes(260);
        assert_eq!((t.bos(), t.eos()), (Some(256), Some(257)));
        round_trip(&t, "héllo, 世界\0\u{1F600}");
        assert_eq!(t.encode("", true).unwrap(), [256]);
        assert_eq!(t.decode(&[256, 72, 105, 257, 259]).unwrap(), "Hi");
        assert!(t.decode(&[260]).is_err());
        let small = Tokenizer::bytes(100);
        assert_eq!((small.bos(), small.eos()), (None, None));
        assert_eq!(small.encode("a", true).unwrap(), [97]);
        let e = small.encode("z", false).unwrap_err().to_string();
        assert!(e.contains("0x7a"), "{e}");
    }

    #[test]
    fn stream_holds_back_incomplete_characters() {
        let t = Tokenizer::bytes(258);
        let mut stream = t.stream_decoder();
        let bytes = "✓".as_bytes();
        assert_eq!(stream.step(bytes[0].into()).unwrap(), "");
        assert_eq!(stream.step(bytes[1].into()).unwrap(), "");
        // A stream cut inside a character ends with the replacement character.
        assert_eq!(stream.finish().unwrap(), "\u{fffd}");
        assert_eq!(stream.step(b'x'.into()).unwrap(), "x");
        assert!(stream.step(300).is_err());
    }
}
