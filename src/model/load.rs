//! Opening a model, whatever its format, with the tokenizer that goes with it: from files on
//! disk, or from their bytes (the browser, which has no paths).

#[cfg(not(target_arch = "wasm32"))]
use std::path::Path;

use crate::chat::ChatFiles;
use crate::formats::{gguf, hf};
use crate::model::{ModelWeights, WeightSource, collect};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// Name of the tokenizer file in a Hugging Face checkpoint folder.
const TOKENIZER_FILE: &str = "tokenizer.json";

/// The files of a Hugging Face folder that say how the model chats ([`ChatFiles`]), read when
/// present.
#[cfg(not(target_arch = "wasm32"))]
const CHAT_FILES: [&str; 4] = [
    ChatFiles::TOKENIZER_CONFIG,
    ChatFiles::CHAT_TEMPLATE,
    ChatFiles::CONFIG,
    ChatFiles::GENERATION_CONFIG,
];

/// Vocabularies up to this size are taken for the byte-level fallback ([`Tokenizer::bytes`]:
/// 256 bytes and a few specials) when no tokenizer comes with the model; any larger one needs
/// its real tokenizer.
const BYTE_VOCAB_LIMIT: usize = 260;

/// The GGUF magic, to recognize a GGUF file whatever its name.
const GGUF_MAGIC: &[u8; 4] = b"GGUF";

/// A model and its tokenizer, read part by part from the files it came from.
pub type OpenModel<'a> = (Box<dyn WeightSource + 'a>, Tokenizer);

/// Loads a model and its tokenizer from `path`:
///
/// - a Hugging Face checkpoint folder (config.json, safetensors, see [`hf::load_dir`]) with its
///   tokenizer.json; the bos/eos ids come from config.json; its chat template, if any, from
///   tokenizer_config.json or chat_template.jinja ([`ChatFiles::template`]);
/// - a GGUF file (see [`gguf::to_model`]) with its embedded byte-level BPE vocabulary and chat
///   template (`tokenizer.chat_template`).
///
/// A model without a tokenizer gets [`Tokenizer::bytes`] if its vocabulary has at most 260
/// tokens. Errors name the path: it does not exist, a folder without
/// config.json, a file that is not GGUF, a missing tokenizer for a larger vocabulary, a
/// tokenizer with more tokens than the model, and every error of the format readers.
/// [`ModelFiles`] reads the same files for an engine to unpack a layer at a time.
#[cfg(not(target_arch = "wasm32"))]
pub fn load_model(path: impl AsRef<Path>) -> Result<(ModelWeights, Tokenizer)> {
    let files = ModelFiles::read(path)?;
    let (source, tokenizer) = files.open()?;
    Ok((collect(&*source)?, tokenizer))
}

/// The files of a model at a path, in memory as they are on disk (packed):
/// [`ModelFiles::open`] reads the model from them a part at a time, so an engine built from it
/// ([`crate::model::Engine::new`]) never holds the whole model unpacked.
///
/// ```
/// use bitnet_wgpu::formats::hf;
/// use bitnet_wgpu::model::{Device, Engine, ModelConfig, ModelFiles, synthetic};
/// let config = ModelConfig {
///     vocab_size: 258, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2,
///     num_attention_heads: 4, num_key_value_heads: 2, head_dim: 16, max_position_embeddings: 32,
///     ..ModelConfig::bitnet_b158_2b4t()
/// };
/// let dir = std::env::temp_dir().join(format!("model-files-doc-{}", std::process::id()));
/// hf::save_dir(&synthetic(&config, 1), &dir, &[])?;
///
/// let files = ModelFiles::read(&dir)?;
/// let (source, tokenizer) = files.open()?;
/// let (mut engine, _) = pollster::block_on(Engine::new(Device::Cpu, &*source))?;
/// let ids = tokenizer.encode("Hi", true)?;
/// assert_eq!(pollster::block_on(engine.forward(&ids, bitnet_wgpu::model::Logits::Last))?.len(), 258);
/// # std::fs::remove_dir_all(&dir).unwrap();
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
#[cfg(not(target_arch = "wasm32"))]
pub enum ModelFiles {
    Checkpoint {
        files: hf::CheckpointFiles,
        tokenizer: Option<Vec<u8>>,
        /// The [`CHAT_FILES`] in the folder, by name.
        chat: Vec<(&'static str, Vec<u8>)>,
        path: String,
    },
    Gguf {
        /// The file mapped into memory ([`crate::formats::map`]): read as it is used, never copied whole.
        bytes: std::sync::Arc<memmap2::Mmap>,
        path: String,
    },
}

#[cfg(not(target_arch = "wasm32"))]
impl ModelFiles {
    /// Reads the files of the model at `path`, with the path errors of [`load_model`].
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let metadata = std::fs::metadata(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source: if source.kind() == std::io::ErrorKind::NotFound {
                std::io::Error::new(
                    source.kind(),
                    "no such file or folder (expected a checkpoint folder with config.json, or \
                     a .gguf file)",
                )
            } else {
                source
            },
        })?;
        let where_ = path.display().to_string();
        if !metadata.is_dir() {
            let bytes = std::sync::Arc::new(crate::formats::map(path)?);
            return Ok(ModelFiles::Gguf {
                bytes,
                path: where_,
            });
        }
        if !path.join(hf::CONFIG_FILE).is_file() {
            return Err(not_a_model(
                &where_,
                format!(
                    "this folder has no {} (not a Hugging Face checkpoint)",
                    hf::CONFIG_FILE
                ),
            ));
        }
        let files = hf::CheckpointFiles::read(path)?;
        let read_if_present = |name: &str| {
            let file = path.join(name);
            match std::fs::read(&file) {
                Ok(bytes) => Ok(Some(bytes)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(Error::Io {
                    path: file.display().to_string(),
                    source,
                }),
            }
        };
        let tokenizer = read_if_present(TOKENIZER_FILE)?;
        let mut chat = Vec::new();
        for name in CHAT_FILES {
            if let Some(bytes) = read_if_present(name)? {
                chat.push((name, bytes));
            }
        }
        Ok(ModelFiles::Checkpoint {
            files,
            tokenizer,
            chat,
            path: where_,
        })
    }

    /// The model in these files, its tokenizer, checked as [`load_model`] checks them; the
    /// weights are decoded when read.
    pub fn open(&self) -> Result<OpenModel<'_>> {
        match self {
            ModelFiles::Checkpoint {
                files,
                tokenizer,
                chat,
                path,
            } => {
                let named = |wanted: &str| {
                    chat.iter()
                        .find(|(name, _)| *name == wanted)
                        .map(|(_, bytes)| bytes.as_slice())
                };
                let chat = chat_files(named);
                with_hf_tokenizer(Box::new(files.open()?), tokenizer.as_deref(), chat, path)
            }
            ModelFiles::Gguf { bytes, path } => {
                from_gguf(bytes, path, || gguf::GgufFile::from_map(bytes.clone()))
            }
        }
    }
}

/// Loads a model and its tokenizer from the bytes of its files, named as on disk (a path's last
/// part is what counts): one GGUF file, or a Hugging Face checkpoint's config.json, its
/// safetensors file or shards (any names ending in `.safetensors`; an index file is not needed)
/// and, optionally, tokenizer.json and the files of its chat template ([`ChatFiles`]). The same rules and errors as [`load_model`].
/// [`open_model_from_bytes`] reads them for an engine to unpack a layer at a time.
///
/// ```
/// use bitnet_wgpu::model::{load_model_from_bytes, synthetic, ModelConfig};
/// let config = ModelConfig {
///     vocab_size: 258, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 1,
///     num_attention_heads: 4, num_key_value_heads: 2, head_dim: 16, max_position_embeddings: 32,
///     ..ModelConfig::bitnet_b158_2b4t()
/// };
/// let weights = synthetic(&config, 3);
/// let gguf = bitnet_wgpu::formats::gguf::write_model(
///     &weights, None, bitnet_wgpu::formats::gguf::TableType::F32)?;
/// let (loaded, tokenizer) = load_model_from_bytes(&[("tiny.gguf", &gguf)])?;
/// assert_eq!(loaded, weights);
/// assert_eq!(tokenizer.vocab_size(), 258);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn load_model_from_bytes(files: &[(&str, &[u8])]) -> Result<(ModelWeights, Tokenizer)> {
    let (source, tokenizer) = open_model_from_bytes(files)?;
    Ok((collect(&*source)?, tokenizer))
}

/// The model in the bytes of its files (as [`load_model_from_bytes`] takes them) and its
/// tokenizer, checked as a whole; the weights are decoded a part at a time when an engine reads
/// them ([`WeightSource`]).
pub fn open_model_from_bytes<'a>(files: &[(&str, &'a [u8])]) -> Result<OpenModel<'a>> {
    let base = |name: &str| name.rsplit(['/', '\\']).next().unwrap_or(name).to_string();
    if let [(name, bytes)] = files
        && bytes.starts_with(GGUF_MAGIC)
    {
        return from_gguf(bytes, name, || gguf::GgufFile::parse(bytes));
    }
    let named = |wanted: &str| {
        files
            .iter()
            .find(|(name, _)| base(name) == wanted)
            .map(|&(_, bytes)| bytes)
    };
    let Some(config) = named(hf::CONFIG_FILE) else {
        return Err(not_a_model(
            "model files",
            format!(
                "neither one GGUF file nor a Hugging Face checkpoint ({} is missing)",
                hf::CONFIG_FILE
            ),
        ));
    };
    let config = std::str::from_utf8(config)
        .map_err(|e| Error::invalid("config.json", format!("not UTF-8: {e}")))?;
    let shards: Vec<&'a [u8]> = files
        .iter()
        .filter(|(name, _)| name.ends_with(".safetensors"))
        .map(|&(_, bytes)| bytes)
        .collect();
    let checkpoint = hf::Checkpoint::from_bytes(config, &shards)?;
    let chat = chat_files(named);
    with_hf_tokenizer(
        Box::new(checkpoint),
        named(TOKENIZER_FILE),
        chat,
        "model files",
    )
}

/// The chat files among a model's files, found by name.
fn chat_files<'a>(named: impl Fn(&str) -> Option<&'a [u8]>) -> ChatFiles<'a> {
    ChatFiles {
        tokenizer_config: named(ChatFiles::TOKENIZER_CONFIG),
        chat_template: named(ChatFiles::CHAT_TEMPLATE),
        config: named(ChatFiles::CONFIG),
        generation_config: named(ChatFiles::GENERATION_CONFIG),
    }
}

/// A Hugging Face model with its tokenizer.json (bos/eos ids from config.json), or the byte
/// fallback when there is none, and the chat template of `chat`.
fn with_hf_tokenizer<'a>(
    source: Box<dyn WeightSource + 'a>,
    json: Option<&[u8]>,
    chat: ChatFiles,
    where_: &str,
) -> Result<OpenModel<'a>> {
    let config = source.config();
    let tokenizer = match json {
        Some(json) => Tokenizer::from_json(json)
            .map_err(|e| Error::invalid("tokenizer", format!("{where_}/{TOKENIZER_FILE}: {e}")))?
            .with_special_ids(config.bos_token_id, config.eos_token_id)?,
        None => byte_fallback(where_, config.vocab_size, format!("no {TOKENIZER_FILE}"))?,
    };
    let template = chat
        .template(&tokenizer)
        .map_err(|e| Error::invalid("chat template", format!("{where_}: {e}")))?;
    checked(source, tokenizer.with_chat_template(template), where_)
}

/// The model of a GGUF file's `bytes`, as `parse` reads them (borrowing them, or sharing their
/// mapping).
fn from_gguf<'a>(
    bytes: &[u8],
    where_: &str,
    parse: impl FnOnce() -> Result<gguf::GgufFile<'a>>,
) -> Result<OpenModel<'a>> {
    if !bytes.starts_with(GGUF_MAGIC) {
        return Err(not_a_model(
            where_,
            "this file is not GGUF (no GGUF magic) and not a checkpoint folder".to_string(),
        ));
    }
    let in_file = |e: Error| Error::invalid("GGUF file", format!("{where_}: {e}"));
    let file = parse().map_err(in_file)?;
    let tokenizer = gguf::tokenizer(&file).map_err(in_file)?;
    let model = gguf::GgufModel::new(file).map_err(in_file)?;
    let tokenizer = match tokenizer {
        Some(t) => Tokenizer::from_gguf(&t).map_err(in_file)?,
        None => byte_fallback(
            where_,
            model.config().vocab_size,
            "no tokenizer.ggml.tokens".to_string(),
        )?,
    };
    let template = crate::chat::gguf_template(model.file(), &tokenizer).map_err(in_file)?;
    let tokenizer = tokenizer.with_chat_template(template);
    checked(Box::new(model), tokenizer, where_)
}

/// Refuses a tokenizer that can produce ids the model has no embedding for.
fn checked<'a>(
    source: Box<dyn WeightSource + 'a>,
    tokenizer: Tokenizer,
    where_: &str,
) -> Result<OpenModel<'a>> {
    let vocab_size = source.config().vocab_size;
    if tokenizer.vocab_size() > vocab_size {
        return Err(Error::invalid(
            "tokenizer",
            format!(
                "{where_}: the tokenizer has {} tokens but the model's vocabulary only \
                 {vocab_size}",
                tokenizer.vocab_size(),
            ),
        ));
    }
    Ok((source, tokenizer))
}

/// The byte-level tokenizer for a tiny vocabulary, or the error that `where_` lacks its
/// tokenizer.
fn byte_fallback(where_: &str, vocab_size: usize, missing: String) -> Result<Tokenizer> {
    if vocab_size <= BYTE_VOCAB_LIMIT {
        Ok(Tokenizer::bytes(vocab_size))
    } else {
        Err(Error::invalid(
            "tokenizer",
            format!(
                "{where_}: {missing}, and a vocabulary of {vocab_size} tokens needs its tokenizer \
                 (only up to {BYTE_VOCAB_LIMIT} tokens fall back to bytes)"
            ),
        ))
    }
}

fn not_a_model(where_: &str, why: String) -> Error {
    Error::invalid("model path", format!("{where_}: {why}"))
}

// The tests write checkpoints to files and load them by path, which the browser has not.
#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;
    use crate::cpu::{WeightQuantOptions, weight_quant};
    use crate::model::{LayerWeights, ModelConfig};

    /// A model with every linear a multiple of 128 weights, as GGUF's I2_S needs.
    fn weights(vocab_size: usize) -> ModelWeights {
        let config = ModelConfig {
            family: Default::default(),
            vocab_size,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 16,
            max_position_embeddings: 16,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            tie_word_embeddings: true,
            bos_token_id: None,
            eos_token_id: None,
        };
        let values = |len: usize| -> Vec<f32> { (0..len).map(|i| (i as f32).sin()).collect() };
        let linear = |rows: usize, cols: usize| {
            weight_quant(
                &values(rows * cols),
                rows,
                cols,
                WeightQuantOptions::default(),
            )
            .unwrap()
        };
        ModelWeights {
            embed_tokens: values(vocab_size * 32),
            layers: vec![LayerWeights {
                input_layernorm: vec![1.0; 32],
                q_proj: linear(32, 32),
                k_proj: linear(16, 32),
                v_proj: linear(16, 32),
                o_proj: linear(32, 32),
                attn_sub_norm: vec![1.0; 32],
                post_attention_layernorm: vec![1.0; 32],
                gate_proj: linear(64, 32),
                up_proj: linear(64, 32),
                down_proj: linear(32, 64),
                ffn_sub_norm: vec![1.0; 64],
            }],
            norm: vec![1.0; 32],
            lm_head: None,
            config,
        }
    }

    /// A fresh, empty folder under the system's temporary folder.
    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "bitnet-load-{name}-{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn tiny_models_fall_back_to_bytes() {
        let dir = temp_dir("hf-bytes");
        let model = weights(260);
        hf::save_dir(&model, dir.join("ckpt"), &[]).unwrap();
        let (loaded, tokenizer) = load_model(dir.join("ckpt")).unwrap();
        assert_eq!(loaded, model);
        assert_eq!(tokenizer.encode("A", true).unwrap(), [256, 65]);

        let gguf_path = dir.join("tiny.gguf");
        std::fs::write(
            &gguf_path,
            gguf::write_model(&model, None, gguf::TableType::F32).unwrap(),
        )
        .unwrap();
        let (loaded, tokenizer) = load_model(&gguf_path).unwrap();
        assert_eq!(loaded, model);
        assert_eq!(tokenizer.vocab_size(), 260);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_large_vocabulary_needs_its_tokenizer() {
        let dir = temp_dir("hf-missing");
        hf::save_dir(&weights(300), &dir, &[]).unwrap();
        let e = load_model(&dir).unwrap_err().to_string();
        assert!(e.contains(&dir.display().to_string()), "{e}");
        assert!(e.contains("tokenizer.json"), "{e}");

        let gguf_path = dir.join("big.gguf");
        std::fs::write(
            &gguf_path,
            gguf::write_model(&weights(300), None, gguf::TableType::F32).unwrap(),
        )
        .unwrap();
        let e = load_model(&gguf_path).unwrap_err().to_string();
        assert!(e.contains("tokenizer.ggml.tokens"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_paths_say_what_was_expected() {
        let dir = temp_dir("bad");
        let e = load_model(dir.join("absent")).unwrap_err().to_string();
        assert!(e.contains("absent") && e.contains("no such file"), "{e}");
        let e = load_model(&dir).unwrap_err().to_string();
        assert!(e.contains("config.json"), "{e}");
        let text = dir.join("notes.txt");
        std::fs::write(&text, "hello").unwrap();
        let e = load_model(&text).unwrap_err().to_string();
        assert!(e.contains("notes.txt") && e.contains("not GGUF"), "{e}");
        let truncated = dir.join("cut.gguf");
        let bytes = gguf::write_model(&weights(260), None, gguf::TableType::F32).unwrap();
        std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
        let e = load_model(&truncated).unwrap_err().to_string();
        assert!(e.contains("cut.gguf"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bytes_load_like_files() {
        let dir = temp_dir("bytes");
        let model = weights(260);
        hf::save_dir(&model, dir.join("ckpt"), &[]).unwrap();
        let read = |name: &str| std::fs::read(dir.join("ckpt").join(name)).unwrap();
        let (config, safetensors) = (read("config.json"), read("model.safetensors"));
        let files: [(&str, &[u8]); 2] = [
            ("some/folder/config.json", &config),
            ("model.safetensors", &safetensors),
        ];
        let (from_bytes, tokenizer) = load_model_from_bytes(&files).unwrap();
        assert_eq!(from_bytes, load_model(dir.join("ckpt")).unwrap().0);
        assert_eq!(tokenizer.encode("A", true).unwrap(), [256, 65]);

        let e = load_model_from_bytes(&files[1..]).unwrap_err().to_string();
        assert!(e.contains("config.json"), "{e}");
        let e = load_model_from_bytes(&files[..1]).unwrap_err().to_string();
        assert!(e.contains("safetensors"), "{e}");
        let bad_tokenizer: [(&str, &[u8]); 3] =
            [files[0], files[1], ("tokenizer.json", b"{\"model\": 1}")];
        let e = load_model_from_bytes(&bad_tokenizer)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
        let gguf = gguf::write_model(&model, None, gguf::TableType::F32).unwrap();
        let truncated: [(&str, &[u8]); 1] = [("cut.gguf", &gguf[..gguf.len() / 2])];
        let e = load_model_from_bytes(&truncated).unwrap_err().to_string();
        assert!(e.contains("cut.gguf"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
