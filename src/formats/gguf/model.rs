//! BitNet checkpoints: GGUF metadata and tensors to [`ModelWeights`], and the embedded tokenizer.

use std::borrow::Cow;

use super::{
    GGML_TYPE_BF16, GGML_TYPE_F16, GGML_TYPE_F32, GGML_TYPE_I2_S, GgufFile, GgufTensorInfo,
};
use crate::cpu::TernaryWeights;
use crate::formats::check_layer_count;
use crate::model::{
    BlockLayer, LayerWeights, ModelConfig, ModelWeights, WeightSource, check_layer_index, collect,
};
use crate::packing::i2s;
use crate::table::{FloatType, Table};
use crate::{Error, Result};

/// `general.architecture` values of BitNet b1.58 checkpoints: `bitnet` (the 1bitLLM models
/// through bitnet.cpp's `convert-hf-to-gguf-bitnet.py`), `bitnet-25` (its
/// `convert-ms-to-gguf-bitnet.py`) and `bitnet-b1.58` (the released 2B-4T GGUF). All three use
/// the same tensor names and NeoX-style RoPE on unpermuted q/k weights.
pub(super) const ARCHITECTURES: [&str; 3] = ["bitnet", "bitnet-25", "bitnet-b1.58"];

/// The architecture [`super::write_model`] writes.
pub(super) const WRITE_ARCHITECTURE: &str = "bitnet-b1.58";

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

/// The per-layer linear tensors in the order of [`layer_linears`], with their shapes.
pub(super) const LINEARS: [(&str, LinearShape); 7] = [
    ("attn_q", LinearShape::QueryFromHidden),
    ("attn_k", LinearShape::KeyValueFromHidden),
    ("attn_v", LinearShape::KeyValueFromHidden),
    ("attn_output", LinearShape::HiddenFromQuery),
    ("ffn_gate", LinearShape::FfnFromHidden),
    ("ffn_up", LinearShape::FfnFromHidden),
    ("ffn_down", LinearShape::HiddenFromFfn),
];

/// The per-layer norm tensors in the order of [`layer_norms`], with their lengths.
pub(super) const NORMS: [(&str, NormShape); 4] = [
    ("attn_norm", NormShape::Hidden),
    ("attn_sub_norm", NormShape::Hidden),
    ("ffn_norm", NormShape::Hidden),
    ("ffn_sub_norm", NormShape::Ffn),
];

/// A layer's linears in [`LINEARS`] order.
pub(super) fn layer_linears(l: &LayerWeights) -> [&TernaryWeights; 7] {
    [
        &l.q_proj,
        &l.k_proj,
        &l.v_proj,
        &l.o_proj,
        &l.gate_proj,
        &l.up_proj,
        &l.down_proj,
    ]
}

/// A layer's norms in [`NORMS`] order.
pub(super) fn layer_norms(l: &LayerWeights) -> [&[f32]; 4] {
    [
        &l.input_layernorm,
        &l.attn_sub_norm,
        &l.post_attention_layernorm,
        &l.ffn_sub_norm,
    ]
}

/// The shape of a linear weight in terms of the config.
#[derive(Clone, Copy)]
pub(super) enum LinearShape {
    QueryFromHidden,
    KeyValueFromHidden,
    HiddenFromQuery,
    FfnFromHidden,
    HiddenFromFfn,
}

impl LinearShape {
    /// `(out, in)` for a config.
    pub(super) fn out_in(self, c: &ModelConfig) -> (usize, usize) {
        let q = c.num_attention_heads * c.head_dim;
        let kv = c.num_key_value_heads * c.head_dim;
        match self {
            LinearShape::QueryFromHidden => (q, c.hidden_size),
            LinearShape::KeyValueFromHidden => (kv, c.hidden_size),
            LinearShape::HiddenFromQuery => (c.hidden_size, q),
            LinearShape::FfnFromHidden => (c.intermediate_size, c.hidden_size),
            LinearShape::HiddenFromFfn => (c.hidden_size, c.intermediate_size),
        }
    }

    /// What the row length (`in`) is, in the config's words.
    pub(super) fn row_name(self) -> &'static str {
        match self {
            LinearShape::QueryFromHidden
            | LinearShape::KeyValueFromHidden
            | LinearShape::FfnFromHidden => "hidden_size",
            LinearShape::HiddenFromQuery => "num_attention_heads x head_dim",
            LinearShape::HiddenFromFfn => "intermediate_size",
        }
    }
}

/// The length of a norm vector in terms of the config.
#[derive(Clone, Copy)]
pub(super) enum NormShape {
    Hidden,
    Ffn,
}

impl NormShape {
    pub(super) fn len(self, c: &ModelConfig) -> usize {
        match self {
            NormShape::Hidden => c.hidden_size,
            NormShape::Ffn => c.intermediate_size,
        }
    }
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
    /// The model of `file`: its configuration, then every tensor it needs found, of the right
    /// shape and inside the file (so a truncated file fails here, before any weight is read).
    pub fn new(file: GgufFile<'f>) -> Result<Self> {
        let config = config(&file)?;
        check_layer_count(
            &config,
            LINEARS.len() + NORMS.len(),
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
            for (part, shape) in LINEARS {
                let (out, inp) = shape.out_in(&config);
                expected.push((names::block(layer, part), vec![inp, out]));
            }
            for (part, shape) in NORMS {
                expected.push((names::block(layer, part), vec![shape.len(&config)]));
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
        ] = LINEARS.map(|(part, shape)| linear(file, config, layer, part, shape));
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

    /// The layer's I2_S tensors as they lie in the file when every row is whole blocks, each
    /// checked as [`GgufModel::layer`] checks it.
    fn layer_blocks(&self, layer: usize) -> Result<Option<BlockLayer<'_>>> {
        let (file, config) = (&self.file, &self.config);
        check_layer_index(config, layer)?;
        if LINEARS
            .iter()
            .any(|(_, shape)| !shape.out_in(config).1.is_multiple_of(i2s::BLOCK))
        {
            return Ok(None);
        }
        let [q, k, v, o, gate, up, down] = LINEARS.map(|(part, shape)| {
            let info = require_tensor(file, &names::block(layer, part))?;
            let (out, inp) = shape.out_in(config);
            check_shape(info, &[inp, out])?;
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
/// widened as it is read.
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
    Table::stored(
        format!("tensor {name}"),
        dtype,
        file.tensor_bytes(info)?,
        rows,
        cols,
    )
}

/// The hyper-parameters, from `{arch}.*` keys and the embedding's shape.
fn config(file: &GgufFile) -> Result<ModelConfig> {
    let arch = file
        .get_str("general.architecture")?
        .ok_or_else(|| missing_key("general.architecture"))?;
    if !ARCHITECTURES.contains(&arch) {
        return Err(Error::invalid(
            "GGUF architecture",
            format!(
                "general.architecture {arch:?} is not a BitNet architecture (supported: {})",
                ARCHITECTURES.join(", ")
            ),
        ));
    }
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
    let head_dim = match u32_key("attention.key_length")? {
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
        family: Default::default(),
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

/// A layer's norms in [`NORMS`] order.
fn norms(file: &GgufFile, config: &ModelConfig, layer: usize) -> Result<[Vec<f32>; 4]> {
    let [a, b, c, d] = NORMS
        .map(|(part, shape)| float_tensor(file, &names::block(layer, part), &[shape.len(config)]));
    Ok([a?, b?, c?, d?])
}

/// One ternary linear of a layer, shape-checked.
fn linear(
    file: &GgufFile,
    config: &ModelConfig,
    layer: usize,
    part: &str,
    shape: LinearShape,
) -> Result<TernaryWeights> {
    let info = require_tensor(file, &names::block(layer, part))?;
    let (out, inp) = shape.out_in(config);
    check_shape(info, &[inp, out])?;
    file.tensor_ternary(info)
}
