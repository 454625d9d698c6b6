//! BitNet checkpoints: GGUF metadata and tensors to [`ModelWeights`], and the embedded tokenizer.

use std::borrow::Cow;

use super::{
    GGML_TYPE_BF16, GGML_TYPE_F16, GGML_TYPE_F32, GGML_TYPE_I2_S, GgufFile, GgufTensorInfo,
};
use crate::cpu::TernaryWeights;
use crate::formats::check_layer_count;
use crate::model::{
    BlockLayer, Family, LayerWeights, LinearSpec, ModelConfig, ModelWeights, WeightSource,
    check_layer_index, collect,
};
use crate::packing::i2s;
use crate::table::{FloatType, Table};
use crate::{Error, Result};

/// `general.architecture` values this crate reads, with their family: `bitnet-b1.58` (the
/// released 2B-4T GGUF) and `bitnet-25` (bitnet.cpp's `convert-ms-to-gguf-bitnet.py`) for BitNet,
/// `bitnet` (1bitLLM's models through bitnet.cpp's `convert-hf-to-gguf-bitnet.py`) and `llama`
/// (Falcon3-1.58bit, Falcon-E, Llama3-8B-1.58 through the same converter). The BitNet
/// architectures keep Hugging Face's q/k rows and use NeoX RoPE; `llama` permutes the q/k rows
/// for llama.cpp's interleaved RoPE ([`permute_rows`]).
pub(super) const ARCHITECTURES: [(&str, Family); 4] = [
    ("bitnet-b1.58", Family::BitNet),
    ("bitnet-25", Family::BitNet),
    ("bitnet", Family::OneBitLlm),
    ("llama", Family::Llama),
];

/// Tensor names, as bitnet.cpp's converters and llama.cpp's loader spell them.
pub(super) mod names {
    pub const TOKEN_EMBD: &str = "token_embd.weight";
    pub const OUTPUT_NORM: &str = "output_norm.weight";
    pub const OUTPUT: &str = "output.weight";

    /// A per-layer tensor name, `blk.{layer}.{part}.weight`.
    pub fn block(layer: usize, part: &str) -> String {
        format!("blk.{layer}.{part}.weight")
    }
}

/// The row order llama.cpp's converter gives a Llama q or k weight (`heads` heads of
/// `rows / heads` rows): within each head, row `2i + s` of the file is Hugging Face's row
/// `s * half + i` (`half` = half the head), so that llama.cpp's RoPE, which rotates adjacent
/// pairs, computes what Hugging Face's rotate-half does on the original order. `to_file` true
/// gives the file's order from Hugging Face's, false the reverse.
pub(super) fn permute_rows(w: &TernaryWeights, heads: usize, to_file: bool) -> TernaryWeights {
    let half = w.rows / heads / 2;
    let hf_row = |file_row: usize| {
        let (head, j) = (file_row / (2 * half), file_row % (2 * half));
        head * 2 * half + (j % 2) * half + j / 2
    };
    let source = |row: usize| {
        if to_file {
            hf_row(row)
        } else {
            let (head, j) = (row / (2 * half), row % (2 * half));
            head * 2 * half + 2 * (j % half) + j / half
        }
    };
    let codes = (0..w.rows)
        .flat_map(|r| &w.codes[source(r) * w.cols..][..w.cols])
        .copied()
        .collect();
    let scales = match w.scales.len() {
        1 => w.scales.clone(),
        _ => (0..w.rows).map(|r| w.scales[source(r)]).collect(),
    };
    TernaryWeights {
        rows: w.rows,
        cols: w.cols,
        codes,
        scales,
    }
}

/// The heads whose rows [`permute_rows`] reorders in a `family` file, for each linear in
/// [`ModelConfig::layer_linears`] order (q by the query heads, k by the key/value heads).
pub(super) fn permuted_heads(c: &ModelConfig) -> [Option<usize>; 7] {
    let mut heads = [None; 7];
    if c.family == Family::Llama {
        heads[0] = Some(c.num_attention_heads);
        heads[1] = Some(c.num_key_value_heads);
    }
    heads
}

/// The tokenizer stored under `tokenizer.ggml.*`: enough to rebuild llama.cpp's BPE or
/// SentencePiece vocabulary without the original tokenizer files.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTokenizer {
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE, the 2B-4T model) or `llama`
    /// (SentencePiece, the 1bitLLM models).
    pub model: String,
    /// `tokenizer.ggml.tokens`, indexed by token id.
    pub tokens: Vec<String>,
    /// `tokenizer.ggml.merges` (`"a b"` pairs, BPE only; empty when absent).
    pub merges: Vec<String>,
    /// `tokenizer.ggml.token_type` (1 normal, 2 unknown, 3 control, 4 user defined, 5 unused,
    /// 6 byte; empty when absent).
    pub token_types: Vec<i32>,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// `tokenizer.ggml.pre`: the pre-tokenizer's name (`llama-bpe` for the 2B-4T model), which
    /// also sets llama.cpp's default for adding a bos.
    pub pre: Option<String>,
    /// `tokenizer.ggml.add_bos_token`, when present.
    pub add_bos: Option<bool>,
    /// `tokenizer.ggml.add_eos_token`, when present.
    pub add_eos: Option<bool>,
    /// `tokenizer.chat_template`, the model's chat template (Jinja), when it has one.
    pub chat_template: Option<String>,
}

/// `tokenizer.ggml.pre` names llama.cpp maps to its Llama 3 pre-tokenizer.
const LLAMA3_PRE_TOKENIZERS: [&str; 9] = [
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "jina-v5-nano",
];

/// Pre-tokenizers outside the Llama-3 family for which llama.cpp also adds a bos when
/// `tokenizer.ggml.add_bos_token` is absent.
const OTHER_PRE_TOKENIZERS_ADDING_BOS: [&str; 2] = ["tekken", "chameleon"];

impl GgufTokenizer {
    /// Whether llama.cpp puts the bos before a text: `tokenizer.ggml.add_bos_token` when the
    /// file has it, else its default for the vocabulary: SentencePiece (`llama`) adds one,
    /// byte-level BPE (`gpt2`) only for the pre-tokenizers of the Llama-3 family and a few others.
    ///
    /// ```
    /// use bitnet_wgpu::formats::gguf::GgufTokenizer;
    /// let mut t = GgufTokenizer {
    ///     model: "gpt2".into(),
    ///     tokens: vec![],
    ///     merges: vec![],
    ///     token_types: vec![],
    ///     bos: Some(0),
    ///     eos: None,
    ///     pre: Some("llama-bpe".into()),
    ///     add_bos: None,
    ///     add_eos: None,
    ///     chat_template: None,
    /// };
    /// assert!(t.adds_bos());
    /// t.pre = Some("gpt-2".into());
    /// assert!(!t.adds_bos());
    /// t.add_bos = Some(true);
    /// assert!(t.adds_bos());
    /// ```
    pub fn adds_bos(&self) -> bool {
        self.add_bos.unwrap_or_else(|| match self.model.as_str() {
            "llama" => true,
            "gpt2" => {
                self.splits_like_llama3()
                    || self
                        .pre
                        .as_deref()
                        .is_some_and(|pre| OTHER_PRE_TOKENIZERS_ADDING_BOS.contains(&pre))
            }
            _ => false,
        })
    }

    /// Whether llama.cpp splits text with Llama 3's pre-tokenizer regex (and takes a word that is
    /// itself a token whole, ignoring merges) rather than GPT-2's: its Llama-3 family of `pre`
    /// names, `llama-bpe` among them.
    pub fn splits_like_llama3(&self) -> bool {
        self.pre
            .as_deref()
            .is_some_and(|pre| LLAMA3_PRE_TOKENIZERS.contains(&pre))
    }

    /// Whether llama.cpp puts the eos after a text: only when `tokenizer.ggml.add_eos_token` says
    /// so (no vocabulary this crate reads adds one by default).
    pub fn adds_eos(&self) -> bool {
        self.add_eos.unwrap_or(false)
    }
}

/// The embedded tokenizer, or `None` when the file carries no `tokenizer.ggml.tokens`.
pub fn tokenizer(file: &GgufFile) -> Result<Option<GgufTokenizer>> {
    let Some(tokens) = file.get_string_array("tokenizer.ggml.tokens")? else {
        return Ok(None);
    };
    let model = file
        .get_str("tokenizer.ggml.model")?
        .ok_or_else(|| missing_key("tokenizer.ggml.model"))?;
    let token_types = file
        .get_i32_array("tokenizer.ggml.token_type")?
        .unwrap_or_default();
    if !token_types.is_empty() && token_types.len() != tokens.len() {
        return Err(Error::shape(
            "GGUF tokenizer.ggml.token_type",
            format!("{} entries (one per token)", tokens.len()),
            token_types.len(),
        ));
    }
    Ok(Some(GgufTokenizer {
        model: model.to_string(),
        tokens: tokens.into_iter().map(str::to_string).collect(),
        merges: file
            .get_string_array("tokenizer.ggml.merges")?
            .unwrap_or_default()
            .into_iter()
            .map(str::to_string)
            .collect(),
        token_types,
        bos: file.get_u32("tokenizer.ggml.bos_token_id")?,
        eos: file.get_u32("tokenizer.ggml.eos_token_id")?,
        pre: file.get_str("tokenizer.ggml.pre")?.map(str::to_string),
        add_bos: file.get_bool("tokenizer.ggml.add_bos_token")?,
        add_eos: file.get_bool("tokenizer.ggml.add_eos_token")?,
        chat_template: file.get_str("tokenizer.chat_template")?.map(String::from),
    }))
}

/// Builds the model a BitNet GGUF describes, checking every tensor's type and shape against the
/// configuration in its metadata ([`GgufModel`] reads it a part at a time).
///
/// Linear weights must be I2_S; norms and embeddings F32, F16 or BF16. bitnet.cpp's converters
/// keep Hugging Face's q/k row order (its BitNet architectures use NeoX RoPE), so no permutation
/// is undone. Tensors the model does not use (e.g. `rope_freqs.weight`) are ignored.
pub fn to_model(file: &GgufFile) -> Result<ModelWeights> {
    collect(&GgufModel::new(file.clone())?)
}

/// The model of a parsed BitNet GGUF file, its configuration read from the metadata and every
/// tensor the model needs found up front; each part is decoded when a [`WeightSource`] method
/// asks for it, with the checks of [`to_model`].
pub struct GgufModel<'f> {
    file: GgufFile<'f>,
    config: ModelConfig,
}

impl<'f> GgufModel<'f> {
    /// The file the model is read from, for its other metadata (the chat template).
    pub fn file(&self) -> &GgufFile<'f> {
        &self.file
    }

    /// The model of `file`: its configuration, then every tensor it needs found, of the right
    /// shape and inside the file (so a truncated file fails here, before any weight is read).
    pub fn new(file: GgufFile<'f>) -> Result<Self> {
        let config = config(&file)?;
        let norms = config.layer_norms().iter().filter(|n| n.present()).count();
        check_layer_count(
            &config,
            config.layer_linears().len() + norms,
            file.tensors.len(),
            "GGUF metadata",
        )?;
        let (hidden, vocab) = (config.hidden_size, config.vocab_size);
        let mut expected = vec![
            (names::TOKEN_EMBD.to_string(), vec![hidden, vocab]),
            (names::OUTPUT_NORM.to_string(), vec![hidden]),
        ];
        if !config.tie_word_embeddings {
            expected.push((names::OUTPUT.to_string(), vec![hidden, vocab]));
        }
        for layer in 0..config.num_hidden_layers {
            for l in config.layer_linears() {
                expected.push((names::block(layer, l.gguf), vec![l.cols, l.rows]));
            }
            for n in config.layer_norms().iter().filter(|n| n.present()) {
                expected.push((names::block(layer, n.gguf), vec![n.len]));
            }
        }
        for (name, ne) in &expected {
            let info = require_tensor(&file, name)?;
            check_shape(info, ne)?;
            file.tensor_bytes(info)?;
        }
        Ok(GgufModel { file, config })
    }
}

impl WeightSource for GgufModel<'_> {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn embed_tokens(&self) -> Result<Table<'_>> {
        let c = &self.config;
        table(&self.file, names::TOKEN_EMBD, c.vocab_size, c.hidden_size)
    }

    fn layer(&self, layer: usize) -> Result<Cow<'_, LayerWeights>> {
        let (file, config) = (&self.file, &self.config);
        check_layer_index(config, layer)?;
        let [
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            gate_proj,
            up_proj,
            down_proj,
        ] = config
            .layer_linears()
            .map(|spec| linear(file, layer, spec))
            .into_iter()
            .zip(permuted_heads(config))
            .map(|(w, heads)| match heads {
                Some(heads) => w.map(|w| permute_rows(&w, heads, false)),
                None => w,
            })
            .collect::<Vec<_>>()
            .try_into()
            .expect("seven linears");
        let [
            input_layernorm,
            attn_sub_norm,
            post_attention_layernorm,
            ffn_sub_norm,
        ] = norms(file, config, layer)?;
        Ok(Cow::Owned(LayerWeights {
            input_layernorm,
            q_proj: q_proj?,
            k_proj: k_proj?,
            v_proj: v_proj?,
            o_proj: o_proj?,
            attn_sub_norm,
            post_attention_layernorm,
            gate_proj: gate_proj?,
            up_proj: up_proj?,
            down_proj: down_proj?,
            ffn_sub_norm,
        }))
    }

    /// The layer's I2_S tensors as they lie in the file when every row is whole blocks and in
    /// Hugging Face's order (not a `llama` file's permuted q/k), each checked as
    /// [`GgufModel::layer`] checks it.
    fn layer_blocks(&self, layer: usize) -> Result<Option<BlockLayer<'_>>> {
        let (file, config) = (&self.file, &self.config);
        check_layer_index(config, layer)?;
        let linears = config.layer_linears();
        if linears.iter().any(|l| !l.cols.is_multiple_of(i2s::BLOCK))
            || permuted_heads(config).iter().any(Option::is_some)
        {
            return Ok(None);
        }
        let [q, k, v, o, gate, up, down] = linears.map(|l| {
            let info = require_tensor(file, &names::block(layer, l.gguf))?;
            check_shape(info, &[l.cols, l.rows])?;
            file.tensor_blocks(info)
        });
        Ok(Some(BlockLayer {
            linears: [q?, k?, v?, o?, gate?, up?, down?],
            norms: norms(file, config, layer)?,
        }))
    }

    fn norm(&self) -> Result<Cow<'_, [f32]>> {
        float_tensor(&self.file, names::OUTPUT_NORM, &[self.config.hidden_size]).map(Cow::Owned)
    }

    fn lm_head(&self) -> Result<Option<Table<'_>>> {
        if self.config.tie_word_embeddings {
            return Ok(None);
        }
        let c = &self.config;
        table(&self.file, names::OUTPUT, c.vocab_size, c.hidden_size).map(Some)
    }

    fn release(&self) {
        self.file.release();
    }
}

/// A float `[rows, cols]` table (`ne = [cols, rows]`, shape checked by [`GgufModel::new`]),
/// widened as it is read; where the file is mapped, the table says so ([`Table::mapped`]).
fn table<'s>(file: &'s GgufFile<'_>, name: &str, rows: usize, cols: usize) -> Result<Table<'s>> {
    let info = require_tensor(file, name)?;
    let dtype = match info.ggml_type {
        GGML_TYPE_F32 => FloatType::F32,
        GGML_TYPE_F16 => FloatType::F16,
        GGML_TYPE_BF16 => FloatType::Bf16,
        GGML_TYPE_I2_S => {
            return Err(Error::invalid(
                "GGUF tensor type",
                format!("tensor {name} is I2_S (ternary) where a float tensor is expected"),
            ));
        }
        _ => return Err(info.unsupported()),
    };
    let table = Table::stored(
        format!("tensor {name}"),
        dtype,
        file.tensor_bytes(info)?,
        rows,
        cols,
    )?;
    #[cfg(not(target_arch = "wasm32"))]
    if let Some(mapping) = file.mapping() {
        return table.in_mapping(mapping.clone());
    }
    Ok(table)
}

/// The hyper-parameters, from `{arch}.*` keys and the embedding's shape.
fn config(file: &GgufFile) -> Result<ModelConfig> {
    let arch = file
        .get_str("general.architecture")?
        .ok_or_else(|| missing_key("general.architecture"))?;
    let Some(&(_, family)) = ARCHITECTURES.iter().find(|(name, _)| *name == arch) else {
        return Err(Error::invalid(
            "GGUF architecture",
            format!(
                "general.architecture {arch:?} is not a BitNet architecture (supported: {})",
                ARCHITECTURES.map(|(name, _)| name).join(", ")
            ),
        ));
    };
    let u32_key = |suffix: &str| -> Result<Option<usize>> {
        Ok(file
            .get_u32(&format!("{arch}.{suffix}"))?
            .map(|v| v as usize))
    };
    let required = |suffix: &str| -> Result<usize> {
        u32_key(suffix)?.ok_or_else(|| missing_key(&format!("{arch}.{suffix}")))
    };
    let hidden_size = required("embedding_length")?;
    let num_attention_heads = required("attention.head_count")?;
    if num_attention_heads == 0 {
        return Err(Error::invalid(
            "GGUF metadata",
            format!("{arch}.attention.head_count is 0"),
        ));
    }
    let head_dim = match u32_key("attention.key_length")?.or(u32_key("rope.dimension_count")?) {
        Some(d) => d,
        None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
        None => {
            return Err(Error::invalid(
                "GGUF metadata",
                format!(
                    "{arch}.embedding_length {hidden_size} is not a multiple of \
                     {arch}.attention.head_count {num_attention_heads}"
                ),
            ));
        }
    };
    let rms_norm_eps = file
        .get_f32(&format!("{arch}.attention.layer_norm_rms_epsilon"))?
        .ok_or_else(|| missing_key(&format!("{arch}.attention.layer_norm_rms_epsilon")))?;
    let embedding = require_tensor(file, names::TOKEN_EMBD)?;
    let vocab_size = match embedding.dims[..] {
        [h, v] if h == hidden_size as u64 => usize::try_from(v).ok(),
        _ => None,
    }
    .ok_or_else(|| {
        Error::shape(
            "GGUF tensor",
            format!("{} ne = [{hidden_size}, vocab]", names::TOKEN_EMBD),
            format!("{:?}", embedding.dims),
        )
    })?;
    if let Some(declared) = u32_key("vocab_size")?
        && declared != vocab_size
    {
        return Err(Error::invalid(
            "GGUF metadata",
            format!(
                "{arch}.vocab_size {declared} disagrees with {} ({vocab_size} rows)",
                names::TOKEN_EMBD
            ),
        ));
    }
    Ok(ModelConfig {
        family,
        vocab_size,
        hidden_size,
        intermediate_size: required("feed_forward_length")?,
        num_hidden_layers: required("block_count")?,
        num_attention_heads,
        num_key_value_heads: u32_key("attention.head_count_kv")?.unwrap_or(num_attention_heads),
        head_dim,
        max_position_embeddings: required("context_length")?,
        rms_norm_eps,
        rope_theta: file
            .get_f32(&format!("{arch}.rope.freq_base"))?
            .unwrap_or(10000.0),
        tie_word_embeddings: file.tensor(names::OUTPUT).is_none(),
        bos_token_id: file.get_u32("tokenizer.ggml.bos_token_id")?,
        eos_token_id: file.get_u32("tokenizer.ggml.eos_token_id")?,
    })
}

/// The error for an absent required key.
fn missing_key(key: &str) -> Error {
    Error::invalid("GGUF metadata", format!("required key {key} is missing"))
}

/// A tensor's directory entry, or an error naming it.
fn require_tensor<'f>(file: &'f GgufFile, name: &str) -> Result<&'f GgufTensorInfo> {
    file.tensor(name)
        .ok_or_else(|| Error::invalid("GGUF tensor", format!("required tensor {name} is missing")))
}

/// Checks a tensor's `ne` against the expected one; trailing 1s are insignificant.
fn check_shape(info: &GgufTensorInfo, expected: &[usize]) -> Result<()> {
    let padded = |dims: Vec<u64>| {
        let mut d = dims;
        while d.last() == Some(&1) {
            d.pop();
        }
        d
    };
    let want = padded(expected.iter().map(|&d| d as u64).collect());
    if padded(info.dims.clone()) == want {
        Ok(())
    } else {
        Err(Error::shape(
            "GGUF tensor",
            format!("{} ne = {expected:?}", info.name),
            format!("ne = {:?}", info.dims),
        ))
    }
}

/// A float tensor of the given `ne`, as f32.
fn float_tensor(file: &GgufFile, name: &str, ne: &[usize]) -> Result<Vec<f32>> {
    let info = require_tensor(file, name)?;
    check_shape(info, ne)?;
    file.tensor_f32(info)
}

/// A layer's norms in [`ModelConfig::layer_norms`] order, empty where the family has none.
fn norms(file: &GgufFile, config: &ModelConfig, layer: usize) -> Result<[Vec<f32>; 4]> {
    let [a, b, c, d] = config.layer_norms().map(|n| match n.present() {
        true => float_tensor(file, &names::block(layer, n.gguf), &[n.len]),
        false => Ok(Vec::new()),
    });
    Ok([a?, b?, c?, d?])
}

/// One ternary linear of a layer, shape-checked, in the file's row order.
fn linear(file: &GgufFile, layer: usize, spec: LinearSpec) -> Result<TernaryWeights> {
    let info = require_tensor(file, &names::block(layer, spec.gguf))?;
    check_shape(info, &[spec.cols, spec.rows])?;
    file.tensor_ternary(info)
}
