//! Writing a [`ModelWeights`] as a GGUF v3 file with I2_S linears.

use super::model::{GgufTokenizer, names, permute_rows, permuted_heads};
use super::reader::{MAGIC, align_up};
use half::f16;

use super::{DEFAULT_ALIGNMENT, GGML_TYPE_F16, GGML_TYPE_F32, GGML_TYPE_I2_S, GgufValue};
use crate::cpu::TernaryWeights;
use crate::formats::scale::multiplier_of;
use crate::model::{ModelConfig, ModelWeights, NormSpec};
use crate::packing::i2s;
use crate::{Error, Result};

/// One tensor to write: name, `ne`, ggml type and the encoded bytes.
#[derive(Debug)]
pub(super) struct Tensor {
    pub(super) name: String,
    pub(super) dims: Vec<u64>,
    pub(super) ggml_type: u32,
    pub(super) data: Vec<u8>,
}

/// How [`write_model`] stores the embedding tables (`token_embd`, and `output` when untied).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableType {
    /// Exact: [`super::to_model`] gives back the very same floats.
    F32,
    /// What bitnet.cpp's converter writes: half the bytes (2B-4T's table is 0.66 GB instead of
    /// 1.3 GB); each value rounded to the nearest f16.
    F16,
}

/// The row length (weights per output feature) that bitnet.cpp's I2_S kernels compute whole:
/// they walk a row in 128-weight blocks, and read a shorter tail as if it were a whole block.
pub const BITNET_CPP_ROW_MULTIPLE: usize = 128;

/// bitnet.cpp computes I2_S output rows four at a time and writes a remainder's results past
/// the end of the output.
const BITNET_CPP_ROWS_AT_ONCE: usize = 4;

/// Errors unless every linear of `config` has a shape bitnet.cpp's x86 I2_S kernels compute
/// correctly: rows of a multiple of [`BITNET_CPP_ROW_MULTIPLE`] weights, and a multiple of 4
/// rows; the error names the first tensor that has not. [`write_model`] writes such files,
/// which this project reads, but bitnet.cpp would run them without a word and produce nonsense,
/// so [`crate::convert::convert_to_gguf`] checks this first.
///
/// ```
/// use bitnet_wgpu::formats::gguf::check_bitnet_cpp_rows;
/// use bitnet_wgpu::model::ModelConfig;
/// assert!(check_bitnet_cpp_rows(&ModelConfig::bitnet_b158_2b4t()).is_ok());
/// let small = ModelConfig { hidden_size: 192, head_dim: 32, num_attention_heads: 6,
///     ..ModelConfig::bitnet_b158_2b4t() };
/// let err = check_bitnet_cpp_rows(&small).unwrap_err().to_string();
/// assert!(err.contains("blk.0.attn_q.weight") && err.contains("192"), "{err}");
/// ```
pub fn check_bitnet_cpp_rows(config: &ModelConfig) -> Result<()> {
    let refuse = |why: String| Err(Error::invalid("GGUF for bitnet.cpp", why));
    for spec in config.layer_linears() {
        let (out, row) = (spec.rows, spec.cols);
        let name = names::block(0, spec.gguf);
        if !row.is_multiple_of(BITNET_CPP_ROW_MULTIPLE) {
            return refuse(format!(
                "{name}: its rows hold {row} weights ({}), and bitnet.cpp's I2_S kernels compute \
                 rows of whole {BITNET_CPP_ROW_MULTIPLE}-weight blocks only (they misread the \
                 rest silently); hidden_size, intermediate_size and num_attention_heads x \
                 head_dim must all be multiples of {BITNET_CPP_ROW_MULTIPLE}",
                spec.cols_name,
            ));
        }
        if !out.is_multiple_of(BITNET_CPP_ROWS_AT_ONCE) {
            return refuse(format!(
                "{name}: it has {out} rows, and bitnet.cpp computes I2_S rows \
                 {BITNET_CPP_ROWS_AT_ONCE} at a time, writing a remainder's results past its \
                 output; num_key_value_heads x head_dim must be a multiple of \
                 {BITNET_CPP_ROWS_AT_ONCE}"
            ));
        }
    }
    Ok(())
}

/// Encodes a model as a GGUF v3 file (its family's architecture, [`crate::model::Family::gguf_architecture`],
/// with a `llama` file's q/k rows permuted as llama.cpp's converter does): linears as I2_S, norms as
/// F32, the embedding tables as `tables` says, plus the tokenizer when given. With
/// [`TableType::F32`], [`super::to_model`] reads it back to an equal [`ModelWeights`].
///
/// Errors: a linear with per-channel scales (I2_S holds one scale per tensor), a linear whose
/// `rows * cols` is not a multiple of 128, a tensor whose size disagrees with the config, a
/// non-positive or non-finite scale, a config value above `u32::MAX`, a table value beyond f16's
/// range with [`TableType::F16`], and a tokenizer whose bos/eos ids disagree with the config's.
///
/// The I2_S scale is stored in bitnet.cpp's convention (`W ≈ code * s`, `s = mean|W|`), chosen
/// as an f32 whose reciprocal is exactly the in-memory scale whenever one exists (it does for
/// every scale [`crate::cpu::weight_quant`] computes, `1 / gamma`), so the round trip is
/// bit-exact.
pub fn write_model(
    weights: &ModelWeights,
    tokenizer: Option<&GgufTokenizer>,
    tables: TableType,
) -> Result<Vec<u8>> {
    let c = &weights.config;
    let mut tensors = Vec::new();
    let embedding_ne = [c.hidden_size, c.vocab_size];
    tensors.push(table_tensor(
        names::TOKEN_EMBD,
        &embedding_ne,
        &weights.embed_tokens,
        tables,
    )?);
    if weights.layers.len() != c.num_hidden_layers {
        return Err(Error::shape(
            "model layers",
            c.num_hidden_layers,
            weights.layers.len(),
        ));
    }
    for (layer, l) in weights.layers.iter().enumerate() {
        // Absent sub-norms (a family without them) are not written.
        let norm = |spec: NormSpec, data: &[f32]| {
            spec.present()
                .then(|| float_tensor(&names::block(layer, spec.gguf), &[spec.len], data))
                .transpose()
        };
        let [input, attn_sub, post, ffn_sub] = c.layer_norms();
        let [attn_norm, attn_sub_norm, ffn_norm, ffn_sub_norm] = l.norms();
        let linears: Vec<_> = c
            .layer_linears()
            .into_iter()
            .zip(l.linears())
            .zip(permuted_heads(c))
            .map(|((spec, w), heads)| {
                let name = names::block(layer, spec.gguf);
                match heads {
                    Some(heads) => {
                        ternary_tensor(&name, (spec.rows, spec.cols), &permute_rows(w, heads, true))
                    }
                    None => ternary_tensor(&name, (spec.rows, spec.cols), w),
                }
            })
            .collect::<Result<_>>()?;
        let [q, k, v, o, gate, up, down] = linears.try_into().expect("seven linears");
        tensors.extend(
            [
                norm(input, attn_norm)?,
                Some(q),
                Some(k),
                Some(v),
                Some(o),
                norm(attn_sub, attn_sub_norm)?,
                norm(post, ffn_norm)?,
                Some(gate),
                Some(up),
                Some(down),
                norm(ffn_sub, ffn_sub_norm)?,
            ]
            .into_iter()
            .flatten(),
        );
    }
    tensors.push(float_tensor(
        names::OUTPUT_NORM,
        &[c.hidden_size],
        &weights.norm,
    )?);
    if let Some(head) = &weights.lm_head {
        tensors.push(table_tensor(names::OUTPUT, &embedding_ne, head, tables)?);
    }
    let metadata = metadata(c, tokenizer)?;
    Ok(encode(&metadata, &tensors))
}

/// GGUF `tokenizer.ggml.token_type` of an ordinary token.
const TOKEN_TYPE_NORMAL: i32 = 1;
/// GGUF `tokenizer.ggml.token_type` of a token no text produces.
const TOKEN_TYPE_UNUSED: i32 = 5;

/// The token list and types of `t` as long as the vocabulary: llama.cpp and bitnet.cpp refuse a
/// list shorter than the embedding table, so the ids no text produces get `[PAD{id}]` tokens of
/// the unused type, as llama.cpp's own converter writes them.
fn padded_vocabulary(t: &GgufTokenizer, vocab: usize) -> Result<(Vec<String>, Vec<i32>)> {
    if t.tokens.len() > vocab {
        return Err(Error::invalid(
            "GGUF tokenizer",
            format!(
                "{} tokens, more than the model's vocabulary of {vocab}",
                t.tokens.len()
            ),
        ));
    }
    if !t.token_types.is_empty() && t.token_types.len() != t.tokens.len() {
        return Err(Error::shape(
            "GGUF tokenizer token types",
            t.tokens.len(),
            t.token_types.len(),
        ));
    }
    let pads = t.tokens.len()..vocab;
    let mut tokens = t.tokens.clone();
    tokens.extend(pads.clone().map(|id| format!("[PAD{id}]")));
    let mut types = t.token_types.clone();
    if !pads.is_empty() {
        types.resize(t.tokens.len(), TOKEN_TYPE_NORMAL);
        types.resize(vocab, TOKEN_TYPE_UNUSED);
    }
    Ok((tokens, types))
}

/// The metadata keys bitnet.cpp's loader reads, in its naming.
fn metadata(
    c: &ModelConfig,
    tokenizer: Option<&GgufTokenizer>,
) -> Result<Vec<(String, GgufValue)>> {
    let arch = c.family.gguf_architecture();
    let u32_of = |what: &'static str, v: usize| {
        u32::try_from(v)
            .map(GgufValue::U32)
            .map_err(|_| Error::invalid(what, format!("{v} does not fit GGUF's u32")))
    };
    let mut kv = vec![
        (
            "general.architecture".to_string(),
            GgufValue::String(arch.to_string()),
        ),
        (
            format!("{arch}.vocab_size"),
            u32_of("vocab_size", c.vocab_size)?,
        ),
        (
            format!("{arch}.context_length"),
            u32_of("max_position_embeddings", c.max_position_embeddings)?,
        ),
        (
            format!("{arch}.embedding_length"),
            u32_of("hidden_size", c.hidden_size)?,
        ),
        (
            format!("{arch}.block_count"),
            u32_of("num_hidden_layers", c.num_hidden_layers)?,
        ),
        (
            format!("{arch}.feed_forward_length"),
            u32_of("intermediate_size", c.intermediate_size)?,
        ),
        (
            format!("{arch}.attention.head_count"),
            u32_of("num_attention_heads", c.num_attention_heads)?,
        ),
        (
            format!("{arch}.attention.head_count_kv"),
            u32_of("num_key_value_heads", c.num_key_value_heads)?,
        ),
        (
            format!("{arch}.attention.key_length"),
            u32_of("head_dim", c.head_dim)?,
        ),
        (
            format!("{arch}.attention.value_length"),
            u32_of("head_dim", c.head_dim)?,
        ),
        (
            format!("{arch}.rope.dimension_count"),
            u32_of("head_dim", c.head_dim)?,
        ),
        (
            format!("{arch}.attention.layer_norm_rms_epsilon"),
            GgufValue::F32(c.rms_norm_eps),
        ),
        (
            format!("{arch}.rope.freq_base"),
            GgufValue::F32(c.rope_theta),
        ),
    ];
    if let Some(t) = tokenizer {
        if (t.bos, t.eos) != (c.bos_token_id, c.eos_token_id) {
            return Err(Error::invalid(
                "GGUF tokenizer",
                format!(
                    "bos/eos {:?}/{:?} disagree with the config's {:?}/{:?}",
                    t.bos, t.eos, c.bos_token_id, c.eos_token_id
                ),
            ));
        }
        let strings = |v: &[String]| GgufValue::Array {
            element_type: 8,
            values: v.iter().cloned().map(GgufValue::String).collect(),
        };
        kv.push((
            "tokenizer.ggml.model".to_string(),
            GgufValue::String(t.model.clone()),
        ));
        let (tokens, token_types) = padded_vocabulary(t, c.vocab_size)?;
        kv.push(("tokenizer.ggml.tokens".to_string(), strings(&tokens)));
        if !t.merges.is_empty() {
            kv.push(("tokenizer.ggml.merges".to_string(), strings(&t.merges)));
        }
        if let Some(pre) = &t.pre {
            kv.push((
                "tokenizer.ggml.pre".to_string(),
                GgufValue::String(pre.clone()),
            ));
        }
        for (key, flag) in [
            ("tokenizer.ggml.add_bos_token", t.add_bos),
            ("tokenizer.ggml.add_eos_token", t.add_eos),
        ] {
            if let Some(flag) = flag {
                kv.push((key.to_string(), GgufValue::Bool(flag)));
            }
        }
        if let Some(template) = &t.chat_template {
            kv.push((
                "tokenizer.chat_template".to_string(),
                GgufValue::String(template.clone()),
            ));
        }
        if !token_types.is_empty() {
            kv.push((
                "tokenizer.ggml.token_type".to_string(),
                GgufValue::Array {
                    element_type: 5,
                    values: token_types.iter().map(|&v| GgufValue::I32(v)).collect(),
                },
            ));
        }
    }
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", c.bos_token_id),
        ("tokenizer.ggml.eos_token_id", c.eos_token_id),
    ] {
        if let Some(id) = id {
            kv.push((key.to_string(), GgufValue::U32(id)));
        }
    }
    Ok(kv)
}

/// An embedding table as `tables` says.
fn table_tensor(name: &str, ne: &[usize], data: &[f32], tables: TableType) -> Result<Tensor> {
    let mut tensor = float_tensor(name, ne, data)?;
    if tables == TableType::F16 {
        if let Some(v) = data.iter().find(|v| f16::from_f32(**v).is_infinite()) {
            return Err(Error::invalid(
                "GGUF tensor",
                format!("{name}: the value {v} is beyond f16's range; write the tables as F32"),
            ));
        }
        tensor.ggml_type = GGML_TYPE_F16;
        tensor.data = data
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect();
    }
    Ok(tensor)
}

/// An F32 tensor, after checking its length against `ne`.
fn float_tensor(name: &str, ne: &[usize], data: &[f32]) -> Result<Tensor> {
    let n = ne
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| Error::invalid("GGUF tensor", format!("{name}: ne {ne:?} overflows")))?;
    if data.len() != n {
        return Err(Error::shape(
            "GGUF tensor",
            format!("{name} with ne = {ne:?} ({n} values)"),
            format!("{} values", data.len()),
        ));
    }
    Ok(Tensor {
        name: name.to_string(),
        dims: ne.iter().map(|&d| d as u64).collect(),
        ggml_type: GGML_TYPE_F32,
        data: data.iter().flat_map(|v| v.to_le_bytes()).collect(),
    })
}

/// An I2_S tensor of shape `(out, in)`, with its scale converted to bitnet.cpp's convention.
pub(super) fn ternary_tensor(
    name: &str,
    (out, inp): (usize, usize),
    w: &TernaryWeights,
) -> Result<Tensor> {
    if (w.rows, w.cols) != (out, inp) {
        return Err(Error::shape(
            "GGUF tensor",
            format!("{name} with [out, in] = [{out}, {inp}]"),
            format!("[{}, {}]", w.rows, w.cols),
        ));
    }
    let n = out
        .checked_mul(inp)
        .filter(|&n| n == w.codes.len())
        .ok_or_else(|| {
            Error::shape(
                "GGUF tensor",
                format!("{name} with {out} x {inp} codes"),
                w.codes.len(),
            )
        })?;
    if n % 128 != 0 {
        return Err(Error::invalid(
            "GGUF tensor",
            format!("{name}: I2_S needs out * in = {out} * {inp} = {n} to be a multiple of 128"),
        ));
    }
    let scale = match w.scales[..] {
        [s] if s.is_finite() && s > 0.0 => multiplier_of(s),
        [s] => {
            return Err(Error::invalid(
                "GGUF tensor",
                format!("{name}: scale {s} is not a positive finite number"),
            ));
        }
        _ => {
            return Err(Error::invalid(
                "GGUF tensor",
                format!(
                    "{name}: I2_S holds one scale per tensor, the weights have {}",
                    w.scales.len()
                ),
            ));
        }
    };
    Ok(Tensor {
        name: name.to_string(),
        dims: vec![inp as u64, out as u64],
        ggml_type: GGML_TYPE_I2_S,
        data: i2s::pack(&w.codes, scale)?,
    })
}

/// Serializes header, metadata, tensor directory and tensor data, each tensor padded to the
/// default alignment (as ggml's writers do).
pub(super) fn encode(metadata: &[(String, GgufValue)], tensors: &[Tensor]) -> Vec<u8> {
    let pad = |n: usize| align_up(n, DEFAULT_ALIGNMENT).unwrap_or(n);
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        write_string(&mut out, key);
        out.extend_from_slice(&value.type_code().to_le_bytes());
        write_payload(&mut out, value);
    }
    let mut offset = 0usize;
    for t in tensors {
        write_string(&mut out, &t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.ggml_type.to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offset = pad(offset + t.data.len());
    }
    out.resize(pad(out.len()), 0);
    for t in tensors {
        out.extend_from_slice(&t.data);
        out.resize(pad(out.len()), 0);
    }
    out
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A value without its type code (arrays carry their element type instead).
fn write_payload(out: &mut Vec<u8>, value: &GgufValue) {
    match value {
        GgufValue::U8(v) => out.push(*v),
        GgufValue::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::Bool(v) => out.push(u8::from(*v)),
        GgufValue::String(s) => write_string(out, s),
        GgufValue::Array {
            element_type,
            values,
        } => {
            out.extend_from_slice(&element_type.to_le_bytes());
            out.extend_from_slice(&(values.len() as u64).to_le_bytes());
            for v in values {
                write_payload(out, v);
            }
        }
        GgufValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
    }
}
