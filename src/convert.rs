//! Converting a full-precision checkpoint (Hugging Face safetensors: bf16, f16 or f32 linears) into
//! the offline packed format of `microsoft/bitnet-b1.58-2B-4T`, with compression statistics.
//!
//! What comes out of [`convert_dir`], in the output folder:
//!
//! - `config.json` and `model.safetensors`: the packed checkpoint that transformers loads as an
//!   offline `BitNetForCausalLM` (written by [`crate::formats::hf::save_dir`]); the safetensors
//!   header's metadata carries the statistics under `bitnet.*` keys ([`ConversionReport::metadata`]).
//! - `conversion_report.json`: the same statistics ([`ConversionReport`]) as JSON.
//! - the tokenizer files of the input ([`TOKENIZER_FILES`]), copied unchanged, so special tokens and
//!   the chat template survive.
//! - with [`ConvertOptions::dequantized_f16`], the folder `dequantized-f16/`: a complete checkpoint of
//!   its own (config.json without `quantization_config`, `torch_dtype: float16`, model.safetensors in
//!   F16, the tokenizer files) holding `codes / weight_scale` for every linear. A separate folder
//!   rather than a second file beside the packed one, because transformers picks the weights file by
//!   name and reads `quantization_config` from the folder's config.json: only a folder of its own
//!   loads as a plain full-precision `BitNetForCausalLM` (`from_pretrained("out/dequantized-f16")`),
//!   the starting point for full-precision (or quantization-aware) training downstream.
//!
//! What cannot be converted, refused with an error before anything is written:
//!
//! - per-channel scales ([`ScaleGranularity::PerChannel`]): transformers' `BitLinear` holds one
//!   `weight_scale` per linear, so such a file would load wrong or not at all.
//! - keeping a decoder linear (`q_proj` ... `down_proj`) full precision: [`ModelWeights`] holds every
//!   decoder linear as ternary, so in this runtime only the embeddings and `lm_head` stay full
//!   precision, and they always do (BitNet never quantizes them).
//! - an input that is already packed, or that [`crate::formats::hf::load_dir`] would refuse.
//!
//! Embeddings and norms are written as F32 by `save_dir` (exact whatever the input dtype), so the
//! whole-model ratio is smaller than the linears' ratio (16 bits to 2 for bf16 linears, about 8x).

use std::collections::{HashMap, HashSet};

use half::f16;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::Serialize;

use crate::cpu::{ScaleGranularity, TernaryWeights, WeightQuantOptions, weight_quant};
use crate::formats::hf::{
    WeightFormat, config_json, layer_linears, parse_checkpoint_config, to_safetensors_bytes, widen,
};
use crate::model::{LayerWeights, ModelConfig, ModelWeights};
use crate::{Error, Result};

/// The default [`ConvertOptions::exclude`]: what BitNet keeps full precision.
pub const DEFAULT_EXCLUDE: [&str; 2] = ["embed_tokens", "lm_head"];

/// The statistics report written beside the converted checkpoint.
pub const REPORT_FILE: &str = "conversion_report.json";

/// The folder of the dequantized f16 checkpoint, inside the output folder.
pub const DEQUANTIZED_DIR: &str = "dequantized-f16";

/// Files copied unchanged from the input folder when present (tokenizer and special tokens).
pub const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
];

/// What [`convert_dir`] and [`convert_bytes`] do.
#[derive(Clone, Debug, PartialEq)]
pub struct ConvertOptions {
    /// Modules to keep full precision. A pattern matches a module name (`model.embed_tokens`,
    /// `model.layers.3.mlp.down_proj`, `lm_head`) when it occurs in it, `*` standing for any run of
    /// characters (`layers.*.mlp`). Each pattern must match some module (a typo is an error), and
    /// may match only the embeddings or `lm_head` (see the module docs).
    pub exclude: Vec<String>,
    /// Only [`ScaleGranularity::PerTensor`] can be written (see the module docs).
    pub granularity: ScaleGranularity,
    /// [`WeightQuantOptions::threshold`]: 0.5 is the paper's round-to-nearest.
    pub threshold: f32,
    /// Also write the dequantized f16 checkpoint into [`DEQUANTIZED_DIR`].
    pub dequantized_f16: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        let quant = WeightQuantOptions::default();
        ConvertOptions {
            exclude: DEFAULT_EXCLUDE.map(String::from).to_vec(),
            granularity: quant.granularity,
            threshold: quant.threshold,
            dequantized_f16: false,
        }
    }
}

/// One step of a conversion, for a progress display.
#[derive(Clone, Debug, PartialEq)]
pub enum Progress {
    /// Part of an input file was read: `bytes` of `total` over all input files.
    Read {
        file: String,
        bytes: u64,
        total: u64,
    },
    /// Linear `index` (from 1) of `count` was quantized.
    Quantized {
        name: String,
        index: usize,
        count: usize,
    },
    /// An output file was written, `bytes` long (its path relative to the output folder).
    Wrote { file: String, bytes: u64 },
}

/// Compression statistics of a conversion. Sizes are bytes of tensor data (headers excluded).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ConversionReport {
    /// `"per-tensor"`: one absmean scale per linear.
    pub mode: String,
    /// The zero threshold of the ternary quantizer.
    pub threshold: f32,
    /// Linears converted to ternary (BitLinear).
    pub bitlinear_layers: usize,
    /// Modules kept full precision.
    pub excluded: Vec<String>,
    /// The patterns of [`ConvertOptions::exclude`].
    pub exclude_patterns: Vec<String>,
    /// Every tensor of the input.
    pub original_bytes: u64,
    /// Every tensor of the packed model.safetensors.
    pub packed_bytes: u64,
    /// `original_bytes / packed_bytes`.
    pub ratio: f64,
    /// The linears of the input.
    pub linear_original_bytes: u64,
    /// The packed linears and their scales.
    pub linear_packed_bytes: u64,
    /// `linear_original_bytes / linear_packed_bytes`.
    pub linear_ratio: f64,
    /// Fraction of the linears' codes that are 0.
    pub sparsity: f64,
    /// The dequantized checkpoint's folder, relative to the output folder, if one was written.
    pub dequantized_f16: Option<String>,
    /// Files copied from the input folder.
    pub copied_files: Vec<String>,
}

impl ConversionReport {
    /// The report as safetensors header metadata: each field under `bitnet.<field>`, strings as
    /// they are, everything else as JSON.
    pub fn metadata(&self) -> Vec<(String, String)> {
        let serde_json::Value::Object(fields) =
            serde_json::to_value(self).expect("a plain struct serializes")
        else {
            unreachable!("a struct serializes to a JSON object")
        };
        fields
            .into_iter()
            .map(|(key, value)| {
                let text = match value {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                };
                (format!("bitnet.{key}"), text)
            })
            .collect()
    }
}

/// A converted model in memory, with its statistics.
#[derive(Clone, Debug, PartialEq)]
pub struct Conversion {
    pub weights: ModelWeights,
    pub report: ConversionReport,
}

/// Converts a full-precision checkpoint held in memory (for the browser, where there are no
/// folders): the text of config.json and each safetensors shard with a label for messages.
///
/// The checks are those of [`crate::formats::hf::load_from_bytes`] (every tensor present once with
/// the shape config.json implies, BF16/F16/F32, finite, nothing unexpected), plus the option checks
/// of the module docs. The report's `copied_files` is empty and `dequantized_f16` is `None`:
/// files are [`convert_dir`]'s business. `progress` hears of each linear quantized.
pub fn convert_bytes(
    config_json_text: &str,
    shards: &[(&str, &[u8])],
    options: &ConvertOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<Conversion> {
    let (c, excluded) = preflight(config_json_text, options)?;
    let mut input = Input::new(shards)?;
    let original_bytes = input.total_bytes();
    let quant = WeightQuantOptions {
        granularity: options.granularity,
        threshold: options.threshold,
    };

    let (vocab, hidden) = (c.vocab_size, c.hidden_size);
    let embed_tokens = input.floats("model.embed_tokens.weight", &[vocab, hidden])?;
    let count = c.num_hidden_layers * 7;
    let (mut linear_original_bytes, mut zeros, mut codes_total) = (0u64, 0u64, 0u64);
    let mut layers = Vec::with_capacity(c.num_hidden_layers);
    for l in 0..c.num_hidden_layers {
        let mut linears = Vec::with_capacity(7);
        for (name, out, inp) in layer_linears(&c) {
            let module = format!("model.layers.{l}.{name}");
            let tensor = format!("{module}.weight");
            let (values, bytes) = input.linear(&tensor, out, inp)?;
            let t = weight_quant(&values, out, inp, quant).map_err(|e| input.error(&tensor, e))?;
            linear_original_bytes += bytes;
            zeros += t.codes.iter().filter(|&&q| q == 0).count() as u64;
            codes_total += t.codes.len() as u64;
            linears.push(t);
            progress(Progress::Quantized {
                name: module,
                index: linears.len() + 7 * l,
                count,
            });
        }
        let [
            input_layernorm,
            attn_sub_norm,
            post_attention_layernorm,
            ffn_sub_norm,
        ] = c.layer_norms().map(|n| match n.present() {
            true => input.floats(&format!("model.layers.{l}.{}.weight", n.hf), &[n.len]),
            false => Ok(Vec::new()),
        });
        let [
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            gate_proj,
            up_proj,
            down_proj,
        ]: [TernaryWeights; 7] = linears.try_into().expect("seven linears per layer");
        layers.push(LayerWeights {
            input_layernorm: input_layernorm?,
            q_proj,
            k_proj,
            v_proj,
            o_proj,
            attn_sub_norm: attn_sub_norm?,
            post_attention_layernorm: post_attention_layernorm?,
            gate_proj,
            up_proj,
            down_proj,
            ffn_sub_norm: ffn_sub_norm?,
        });
    }
    let norm = input.floats("model.norm.weight", &[hidden])?;
    let lm_head = if c.tie_word_embeddings {
        if input.contains(LM_HEAD) {
            let copy = input.floats(LM_HEAD, &[vocab, hidden])?;
            if copy != embed_tokens {
                return Err(input.error(
                    LM_HEAD,
                    "differs from model.embed_tokens.weight, but config.json says \
                     tie_word_embeddings: true",
                ));
            }
        }
        None
    } else {
        Some(input.floats(LM_HEAD, &[vocab, hidden])?)
    };
    input.finish()?;

    let weights = ModelWeights {
        config: c,
        embed_tokens,
        layers,
        norm,
        lm_head,
    };
    let (packed_bytes, linear_packed_bytes) = packed_sizes(&weights)?;
    let report = ConversionReport {
        mode: "per-tensor".into(),
        threshold: options.threshold,
        bitlinear_layers: count,
        excluded,
        exclude_patterns: options.exclude.clone(),
        original_bytes,
        packed_bytes,
        ratio: original_bytes as f64 / packed_bytes as f64,
        linear_original_bytes,
        linear_packed_bytes,
        linear_ratio: linear_original_bytes as f64 / linear_packed_bytes as f64,
        sparsity: zeros as f64 / codes_total as f64,
        dequantized_f16: None,
        copied_files: Vec::new(),
    };
    Ok(Conversion { weights, report })
}

/// A dequantized checkpoint: its config.json and model.safetensors.
#[derive(Clone, Debug, PartialEq)]
pub struct DequantizedF16 {
    /// [`config_json`] without `quantization_config` and with `torch_dtype: "float16"`, so
    /// transformers builds plain full-precision linears.
    pub config_json: String,
    /// Every tensor as F16: linears `[out, in]` = `codes / scale` (per tensor or per row),
    /// embeddings, norms and (untied) `lm_head` as they are.
    pub safetensors: Vec<u8>,
}

/// Dequantizes `weights` to f16 (see [`DequantizedF16`]). Errors where a value does not fit f16
/// (magnitude above 65504), naming the tensor, or where a linear's scales fit neither per tensor
/// nor per row.
pub fn dequantized_f16(weights: &ModelWeights) -> Result<DequantizedF16> {
    let c = &weights.config;
    let (vocab, hidden) = (c.vocab_size, c.hidden_size);
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut push = |name: String, shape: Vec<usize>, values: &mut dyn Iterator<Item = f32>| {
        let mut bytes = Vec::with_capacity(shape.iter().product::<usize>() * 2);
        for (i, v) in values.enumerate() {
            let h = f16::from_f32(v);
            if !h.is_finite() {
                return Err(Error::invalid(
                    "dequantized f16 model",
                    format!("tensor `{name}` holds {v} at element {i}, beyond f16's range"),
                ));
            }
            bytes.extend(h.to_le_bytes());
        }
        tensors.push((name, shape, bytes));
        Ok(())
    };
    push(
        "model.embed_tokens.weight".into(),
        vec![vocab, hidden],
        &mut weights.embed_tokens.iter().copied(),
    )?;
    for (l, layer) in weights.layers.iter().enumerate() {
        for ((name, _, _), w) in layer_linears(c).into_iter().zip(layer.linears()) {
            let per_row = match w.scales.len() {
                1 => false,
                n if n == w.rows => true,
                n => {
                    return Err(Error::shape(
                        "linear scales",
                        format!("1 or {} (rows)", w.rows),
                        n,
                    ));
                }
            };
            push(
                format!("model.layers.{l}.{name}.weight"),
                vec![w.rows, w.cols],
                &mut w.codes.iter().enumerate().map(|(i, &q)| {
                    let scale = w.scales[if per_row { i / w.cols } else { 0 }];
                    f32::from(q) / scale
                }),
            )?;
        }
        for (spec, values) in c.layer_norms().into_iter().zip(layer.norms()) {
            if spec.present() {
                push(
                    format!("model.layers.{l}.{}.weight", spec.hf),
                    vec![spec.len],
                    &mut values.iter().copied(),
                )?;
            }
        }
    }
    push(
        "model.norm.weight".into(),
        vec![hidden],
        &mut weights.norm.iter().copied(),
    )?;
    if let Some(head) = &weights.lm_head {
        push(
            LM_HEAD.into(),
            vec![vocab, hidden],
            &mut head.iter().copied(),
        )?;
    }
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F16, shape.clone(), bytes)
                .map(|v| (name.as_str(), v))
                .map_err(|e| Error::Safetensors(format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let safetensors = safetensors::serialize(views, Some(metadata))
        .map_err(|e| Error::Safetensors(format!("serializing the dequantized model: {e}")))?;

    let mut config: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&config_json(c)?).expect("config_json writes a JSON object");
    config.remove("quantization_config");
    config.insert("torch_dtype".into(), "float16".into());
    let mut config_json = serde_json::to_string_pretty(&config).expect("a JSON object serializes");
    config_json.push('\n');
    Ok(DequantizedF16 {
        config_json,
        safetensors,
    })
}

const LM_HEAD: &str = "lm_head.weight";

/// The checks that need no weights: the options, and a config.json of a full-precision model.
/// Returns the model's config and the modules kept full precision.
fn preflight(
    config_json_text: &str,
    options: &ConvertOptions,
) -> Result<(ModelConfig, Vec<String>)> {
    check_options(options)?;
    let config = parse_checkpoint_config(config_json_text)?;
    if matches!(config.weight_format, WeightFormat::OfflinePacked(_)) {
        return Err(Error::invalid(
            "input checkpoint",
            "it is already in the offline packed format (config.json's quantization_config says \
             so); convert needs full-precision linears",
        ));
    }
    let excluded = excluded_modules(&config.model, &options.exclude)?;
    Ok((config.model, excluded))
}

fn check_options(options: &ConvertOptions) -> Result<()> {
    if options.granularity == ScaleGranularity::PerChannel {
        return Err(Error::invalid(
            "convert options",
            "per-channel scales cannot be written in Hugging Face's offline packed format: \
             transformers' BitLinear holds one weight_scale per linear; convert per tensor",
        ));
    }
    if !(options.threshold.is_finite() && options.threshold >= 0.0) {
        return Err(Error::invalid(
            "threshold",
            format!("{} is not a finite value >= 0", options.threshold),
        ));
    }
    Ok(())
}

/// The modules the patterns keep full precision, erroring on a pattern that matches nothing or
/// matches a decoder linear.
fn excluded_modules(c: &ModelConfig, patterns: &[String]) -> Result<Vec<String>> {
    // A tied lm_head is the embedding matrix itself: full precision either way.
    let full_precision = ["model.embed_tokens", "lm_head"];
    let linears: Vec<String> = (0..c.num_hidden_layers)
        .flat_map(|l| layer_linears(c).map(|(name, _, _)| format!("model.layers.{l}.{name}")))
        .collect();
    for pattern in patterns {
        if let Some(linear) = linears.iter().find(|m| pattern_matches(pattern, m)) {
            return Err(Error::invalid(
                "exclude pattern",
                format!(
                    "{pattern:?} matches the decoder linear {linear}; in this runtime every \
                     decoder linear is ternary, only model.embed_tokens and lm_head stay full \
                     precision"
                ),
            ));
        }
        if !full_precision.iter().any(|m| pattern_matches(pattern, m)) {
            return Err(Error::invalid(
                "exclude pattern",
                format!(
                    "{pattern:?} matches no module (names look like model.embed_tokens, \
                     model.layers.0.self_attn.q_proj, lm_head)"
                ),
            ));
        }
    }
    Ok(full_precision.into_iter().map(String::from).collect())
}

/// Whether `pattern` occurs in `name`, each `*` standing for any run of characters.
fn pattern_matches(pattern: &str, name: &str) -> bool {
    let mut rest = name;
    let mut pieces = pattern.split('*');
    let first = pieces.next().unwrap_or("");
    let Some(at) = rest.find(first) else {
        return false;
    };
    rest = &rest[at + first.len()..];
    for piece in pieces {
        match rest.find(piece) {
            Some(at) => rest = &rest[at + piece.len()..],
            None => return false,
        }
    }
    true
}

/// Tensor data bytes of the packed model.safetensors, all and linears only, measured on the bytes
/// `save_dir` writes so that the report cannot drift from the file.
fn packed_sizes(weights: &ModelWeights) -> Result<(u64, u64)> {
    let bytes = to_safetensors_bytes(weights, &[])?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::Safetensors(format!("reading back the packed header: {e}")))?;
    let (mut all, mut linears) = (0u64, 0u64);
    for (name, info) in header.tensors() {
        let len = (info.data_offsets.1 - info.data_offsets.0) as u64;
        all += len;
        if name.ends_with("_proj.weight") || name.ends_with("_proj.weight_scale") {
            linears += len;
        }
    }
    Ok((all, linears))
}

/// The input's tensors by name, remembering which were used.
struct Input<'a> {
    found: HashMap<String, (&'a str, TensorView<'a>)>,
    used: HashSet<String>,
}

impl<'a> Input<'a> {
    fn new(shards: &[(&'a str, &'a [u8])]) -> Result<Self> {
        if shards.is_empty() {
            return Err(Error::Empty("safetensors shards"));
        }
        let mut found = HashMap::new();
        for &(file, bytes) in shards {
            let st = SafeTensors::deserialize(bytes).map_err(|e| {
                Error::Safetensors(format!(
                    "{file}: not a complete safetensors file (truncated or corrupt?): {e}"
                ))
            })?;
            for (name, view) in st.tensors() {
                if let Some((first, _)) = found.get(&name) {
                    return Err(Error::Safetensors(format!(
                        "tensor `{name}` is in both {first} and {file}"
                    )));
                }
                found.insert(name, (file, view));
            }
        }
        Ok(Input {
            found,
            used: HashSet::new(),
        })
    }

    fn total_bytes(&self) -> u64 {
        self.found
            .values()
            .map(|(_, v)| v.data().len() as u64)
            .sum()
    }

    fn contains(&self, name: &str) -> bool {
        self.found.contains_key(name)
    }

    fn error(&self, name: &str, why: impl std::fmt::Display) -> Error {
        match self.found.get(name) {
            Some((file, _)) => Error::Safetensors(format!("tensor `{name}` in {file}: {why}")),
            None => Error::Safetensors(format!("tensor `{name}`: {why}")),
        }
    }

    fn take(&mut self, name: &str) -> Result<TensorView<'a>> {
        let (_, view) = self
            .found
            .get(name)
            .ok_or_else(|| Error::Safetensors(format!("missing tensor `{name}`")))?;
        self.used.insert(name.to_string());
        Ok(view.clone())
    }

    /// A linear's values and its size in bytes, refusing packed codes.
    fn linear(&mut self, name: &str, out: usize, inp: usize) -> Result<(Vec<f32>, u64)> {
        let view = self.take(name)?;
        if view.dtype() == Dtype::U8 {
            return Err(self.error(
                name,
                "has dtype U8 (packed ternary?), expected BF16, F16 or F32",
            ));
        }
        let values = self.values(name, &view, &[out, inp])?;
        Ok((values, view.data().len() as u64))
    }

    /// A float tensor's values as f32, checking shape and finiteness.
    fn floats(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let view = self.take(name)?;
        let values = self.values(name, &view, shape)?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(self.error(name, format!("holds {} at element {i}", values[i])));
        }
        Ok(values)
    }

    fn values(&self, name: &str, view: &TensorView<'_>, shape: &[usize]) -> Result<Vec<f32>> {
        if view.shape() != shape {
            return Err(self.error(
                name,
                format!(
                    "has shape {:?}, but config.json implies {shape:?}",
                    view.shape()
                ),
            ));
        }
        widen(view.dtype(), view.data()).ok_or_else(|| {
            self.error(
                name,
                format!("has dtype {:?}, expected BF16, F16 or F32", view.dtype()),
            )
        })
    }

    /// Errors if a tensor was left unused, except RoPE's recomputable `inv_freq` buffers: a file
    /// with more layers than config.json, or biases, would otherwise convert into another model.
    fn finish(self) -> Result<()> {
        let mut extra: Vec<String> = self
            .found
            .iter()
            .filter(|(name, _)| !self.used.contains(*name) && !name.ends_with("inv_freq"))
            .map(|(name, (file, _))| format!("`{name}` in {file}"))
            .collect();
        if extra.is_empty() {
            return Ok(());
        }
        extra.sort();
        let more = if extra.len() > 5 { ", ..." } else { "" };
        Err(Error::Safetensors(format!(
            "{} unexpected tensor(s) that config.json does not describe: {}{more}",
            extra.len(),
            extra[..extra.len().min(5)].join(", ")
        )))
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod dir;
#[cfg(not(target_arch = "wasm32"))]
mod gguf;
#[cfg(not(target_arch = "wasm32"))]
pub use dir::convert_dir;
#[cfg(not(target_arch = "wasm32"))]
pub use gguf::{GgufConversion, RowLengths, convert_to_gguf};

#[cfg(test)]
mod tests {
    use super::pattern_matches;

    #[test]
    fn patterns_are_substrings_with_wildcards() {
        let name = "model.layers.10.self_attn.q_proj";
        for yes in [
            "q_proj",
            "layers.1",
            "layers.*.q",
            "*",
            "",
            "model*attn*proj",
            "j",
        ] {
            assert!(pattern_matches(yes, name), "{yes}");
        }
        for no in [
            "k_proj",
            "q_proj*layers",
            "layers.2*",
            "model.layers.10.self_attn.q_proj.",
        ] {
            assert!(!pattern_matches(no, name), "{no}");
        }
    }
}
