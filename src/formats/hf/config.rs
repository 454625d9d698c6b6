//! config.json: reading Hugging Face's `BitNetConfig` (and LLaMA-style configs) into
//! [`ModelConfig`], and writing one that transformers loads as an offline packed
//! `BitNetForCausalLM`.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::model::{Family, ModelConfig};
use crate::{Error, Result};

/// How a checkpoint stores its linear weights, as its `quantization_config` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightFormat {
    /// `quant_method: "bitnet"`, `quantization_mode: "offline"`: each `*_proj.weight` is uint8
    /// `[out/4, in]` in [`crate::packing::hf`]'s layout and `*_proj.weight_scale` holds one scale,
    /// whose meaning `linear_class` gives.
    OfflinePacked(LinearClass),
    /// No `quantization_config`, or `quantization_mode: "online"` (the `-bf16` master weights):
    /// plain bf16/f16/f32 linears that are quantized to ternary at load, per tensor absmean, as
    /// transformers' online `AutoBitLinear` does in every forward.
    FullPrecision,
}

/// The transformers layer an offline checkpoint was written for, which fixes what its
/// `weight_scale` means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearClass {
    /// `"autobitlinear"` (transformers' `AutoBitLinear`; the released
    /// `microsoft/bitnet-b1.58-2B-4T`, and what this crate writes): `y = (x̂ · codesᵀ) ·
    /// weight_scale`, so `weight_scale = mean|W|`, a multiplier.
    AutoBitLinear,
    /// `"bitlinear"` (transformers' `BitLinear`, older checkpoints): `y = (x_q · codesᵀ) /
    /// (weight_scale · x_scale)`, so `weight_scale = 1 / mean|W|`, a divisor, as
    /// [`crate::cpu::TernaryWeights::scales`] holds it.
    BitLinear,
}

/// Everything config.json says that loading needs: the architecture and how weights are stored.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointConfig {
    pub model: ModelConfig,
    pub weight_format: WeightFormat,
}

/// Reads a config.json into a [`ModelConfig`]; see [`parse_checkpoint_config`] for what is checked.
///
/// ```
/// let c = bitnet_wgpu::formats::hf::parse_config(r#"{"model_type": "bitnet", "hidden_size": 64,
///     "num_attention_heads": 4, "num_key_value_heads": 2}"#)?;
/// assert_eq!((c.head_dim, c.rope_theta, c.rms_norm_eps), (16, 500000.0, 1e-5));
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub fn parse_config(json: &str) -> Result<ModelConfig> {
    parse_checkpoint_config(json).map(|c| c.model)
}

/// Reads a config.json, filling absent fields with the defaults of transformers' `BitNetConfig`
/// (`model_type: "bitnet"`) or `LlamaConfig` (`"llama"`), so a file means here what it means there.
///
/// Rejected, with the field named: another `model_type`; a `hidden_act` other than `relu2` (a
/// LLaMA config must say so explicitly, its default being `silu`); attention or MLP biases; RoPE
/// scaling other than `default`; a `quantization_config` this runtime does not implement; zero sizes;
/// `hidden_size` not divisible by `num_attention_heads`, heads not divisible by KV heads, an odd
/// `head_dim`, or `head_dim * num_attention_heads != hidden_size` (BitNet's `attn_sub_norm` has
/// `hidden_size` weights and normalizes the attention output). A list of `eos_token_id`s keeps the
/// first.
pub fn parse_checkpoint_config(json: &str) -> Result<CheckpointConfig> {
    let map: Map<String, Value> = serde_json::from_str(json)
        .map_err(|e| Error::invalid("config.json", format!("not a JSON object: {e}")))?;
    let model_type: String = field(&map, "model_type")?.ok_or_else(|| {
        Error::invalid(
            "config.json",
            "`model_type` is missing (expected \"bitnet\")",
        )
    })?;
    let defaults = match model_type.as_str() {
        "bitnet" => &BITNET_DEFAULTS,
        "llama" => &LLAMA_DEFAULTS,
        other => {
            return Err(Error::invalid(
                "config.json",
                format!("model_type {other:?} is not supported (expected \"bitnet\" or \"llama\")"),
            ));
        }
    };
    let hidden_act = field::<String>(&map, "hidden_act")?.unwrap_or(defaults.hidden_act.into());
    let family = family(&map, &model_type, &hidden_act)?;
    let expected_act = family.activation().name();
    if hidden_act != expected_act {
        return Err(Error::invalid(
            "config.json",
            format!(
                "hidden_act {hidden_act:?} is not supported for {} (it uses {expected_act:?})",
                family.hf_architecture()
            ),
        ));
    }
    for bias in ["attention_bias", "mlp_bias"] {
        if field::<bool>(&map, bias)? == Some(true) {
            return Err(Error::invalid(
                "config.json",
                format!("`{bias}: true` is not supported (BitNet linears have no bias)"),
            ));
        }
    }

    let size =
        |name: &str, default: usize| -> Result<usize> { Ok(field(&map, name)?.unwrap_or(default)) };
    let num_attention_heads = size("num_attention_heads", defaults.num_attention_heads)?;
    let hidden_size = size("hidden_size", defaults.hidden_size)?;
    let num_key_value_heads = field(&map, "num_key_value_heads")?
        .or(defaults.num_key_value_heads)
        .unwrap_or(num_attention_heads);
    let head_dim = match field(&map, "head_dim")? {
        Some(d) => d,
        None => hidden_size.checked_div(num_attention_heads).unwrap_or(0),
    };
    let model = ModelConfig {
        family,
        vocab_size: size("vocab_size", defaults.vocab_size)?,
        hidden_size,
        intermediate_size: size("intermediate_size", defaults.intermediate_size)?,
        num_hidden_layers: size("num_hidden_layers", defaults.num_hidden_layers)?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        max_position_embeddings: size("max_position_embeddings", defaults.max_position_embeddings)?,
        rms_norm_eps: field::<f64>(&map, "rms_norm_eps")?.unwrap_or(defaults.rms_norm_eps) as f32,
        rope_theta: rope_theta(&map, defaults.rope_theta)? as f32,
        tie_word_embeddings: field(&map, "tie_word_embeddings")?
            .unwrap_or(defaults.tie_word_embeddings),
        bos_token_id: token_id(&map, "bos_token_id", defaults.bos_token_id)?,
        eos_token_id: token_id(&map, "eos_token_id", defaults.eos_token_id)?,
    };
    validate(&model)?;
    let weight_format = weight_format(map.get("quantization_config"))?;
    if family == Family::Llama
        && weight_format == WeightFormat::FullPrecision
        && map.get("quantization_config").is_none_or(Value::is_null)
    {
        return Err(Error::invalid(
            "config.json",
            "a LlamaForCausalLM without `quantization_config` (quant_method \"bitnet\") is a \
             full-precision Llama, not a BitNet model",
        ));
    }
    Ok(CheckpointConfig {
        model,
        weight_format,
    })
}

/// A config.json for `model` that transformers loads as an offline packed model of its family
/// (the files [`super::save_dir`] writes): for BitNet the released 2B-4T's layout
/// (`BitNetForCausalLM`, `linear_class: "autobitlinear"`, `quantization_mode: "offline"`; no
/// `head_dim`, which newer transformers' strict `BitNetConfig` refuses and which is always
/// `hidden_size / num_attention_heads` there), for the Llama family Falcon3-1.58bit's
/// (`LlamaForCausalLM`, transformers' `BitLinear` with `lm_head` unquantized, `head_dim`).
/// Errors for a family transformers has no offline layout for (1bitLLM's: remote code, full
/// precision).
pub fn config_json(model: &ModelConfig) -> Result<String> {
    let family = model.family;
    let quantization_config = match family {
        Family::BitNet => QuantOut {
            quant_method: "bitnet",
            linear_class: Some("autobitlinear"),
            quantization_mode: Some("offline"),
            modules_to_not_convert: None,
        },
        Family::Llama => QuantOut {
            quant_method: "bitnet",
            linear_class: None,
            quantization_mode: None,
            modules_to_not_convert: Some(["lm_head"]),
        },
        Family::OneBitLlm => {
            return Err(Error::invalid(
                "config.json",
                "1bitLLM's BitnetForCausalLM has no offline packed Hugging Face layout; write \
                 the model as GGUF instead",
            ));
        }
    };
    let out = ConfigOut {
        architectures: [family.hf_architecture()],
        model_type: match family {
            Family::BitNet => "bitnet",
            Family::Llama | Family::OneBitLlm => "llama",
        },
        vocab_size: model.vocab_size,
        hidden_size: model.hidden_size,
        intermediate_size: model.intermediate_size,
        num_hidden_layers: model.num_hidden_layers,
        num_attention_heads: model.num_attention_heads,
        num_key_value_heads: model.num_key_value_heads,
        head_dim: (family == Family::Llama).then_some(model.head_dim),
        hidden_act: family.activation().name(),
        max_position_embeddings: model.max_position_embeddings,
        rms_norm_eps: model.rms_norm_eps,
        rope_theta: model.rope_theta,
        tie_word_embeddings: model.tie_word_embeddings,
        bos_token_id: model.bos_token_id,
        eos_token_id: model.eos_token_id,
        attention_bias: false,
        attention_dropout: 0.0,
        initializer_range: 0.02,
        use_cache: true,
        torch_dtype: "bfloat16",
        quantization_config,
    };
    let mut json = serde_json::to_string_pretty(&out).expect("a plain struct serializes");
    json.push('\n');
    Ok(json)
}

/// The consistency checks of [`parse_checkpoint_config`], also applied before writing.
pub(super) fn validate(c: &ModelConfig) -> Result<()> {
    let bad = |why: String| Err(Error::invalid("config.json", why));
    for (name, value) in [
        ("vocab_size", c.vocab_size),
        ("hidden_size", c.hidden_size),
        ("intermediate_size", c.intermediate_size),
        ("num_hidden_layers", c.num_hidden_layers),
        ("num_attention_heads", c.num_attention_heads),
        ("num_key_value_heads", c.num_key_value_heads),
        ("head_dim", c.head_dim),
        ("max_position_embeddings", c.max_position_embeddings),
    ] {
        if value == 0 {
            return bad(format!("`{name}` is 0"));
        }
    }
    if c.family.has_sub_norms() && !c.hidden_size.is_multiple_of(c.num_attention_heads) {
        return bad(format!(
            "hidden_size {} is not divisible by num_attention_heads {}",
            c.hidden_size, c.num_attention_heads
        ));
    }
    if !c.num_attention_heads.is_multiple_of(c.num_key_value_heads) {
        return bad(format!(
            "num_attention_heads {} is not divisible by num_key_value_heads {}",
            c.num_attention_heads, c.num_key_value_heads
        ));
    }
    if c.family.has_sub_norms()
        && c.head_dim.checked_mul(c.num_attention_heads) != Some(c.hidden_size)
    {
        return bad(format!(
            "head_dim {} x num_attention_heads {} is not hidden_size {} (attn_sub_norm has \
             hidden_size weights)",
            c.head_dim, c.num_attention_heads, c.hidden_size
        ));
    }
    if !c.head_dim.is_multiple_of(2) {
        return bad(format!(
            "head_dim {} is odd (RoPE rotates pairs of halves)",
            c.head_dim
        ));
    }
    if !(c.rms_norm_eps.is_finite() && c.rms_norm_eps >= 0.0) {
        return bad(format!(
            "rms_norm_eps {} is not a finite value >= 0",
            c.rms_norm_eps
        ));
    }
    if !(c.rope_theta.is_finite() && c.rope_theta > 0.0) {
        return bad(format!(
            "rope_theta {} is not a finite value > 0",
            c.rope_theta
        ));
    }
    Ok(())
}

/// The defaults of one transformers config class.
struct Defaults {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    /// `None`: as many as attention heads.
    num_key_value_heads: Option<usize>,
    hidden_act: &'static str,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    rope_theta: f64,
    tie_word_embeddings: bool,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
}

/// transformers' `BitNetConfig` (the 2B4T shape, but `max_position_embeddings` 2048 where the
/// released config.json says 4096, and untied embeddings where it says tied).
const BITNET_DEFAULTS: Defaults = Defaults {
    vocab_size: 128256,
    hidden_size: 2560,
    intermediate_size: 6912,
    num_hidden_layers: 30,
    num_attention_heads: 20,
    num_key_value_heads: Some(5),
    hidden_act: "relu2",
    max_position_embeddings: 2048,
    rms_norm_eps: 1e-5,
    rope_theta: 500000.0,
    tie_word_embeddings: false,
    bos_token_id: Some(128000),
    eos_token_id: Some(128001),
};

/// transformers' `LlamaConfig` (LLaMA-2 7B).
const LLAMA_DEFAULTS: Defaults = Defaults {
    vocab_size: 32000,
    hidden_size: 4096,
    intermediate_size: 11008,
    num_hidden_layers: 32,
    num_attention_heads: 32,
    num_key_value_heads: None,
    hidden_act: "silu",
    max_position_embeddings: 2048,
    rms_norm_eps: 1e-6,
    rope_theta: 10000.0,
    tie_word_embeddings: false,
    bos_token_id: Some(1),
    eos_token_id: Some(2),
};

/// The family `architectures` names, or where it is absent the one `model_type` and
/// `hidden_act` imply (a `"llama"` config with `"relu2"` is BitNet's decoder).
fn family(map: &Map<String, Value>, model_type: &str, hidden_act: &str) -> Result<Family> {
    let architectures: Vec<String> = field(map, "architectures")?.unwrap_or_default();
    match architectures.first() {
        Some(arch) => Family::ALL
            .into_iter()
            .find(|f| f.hf_architecture() == arch)
            .ok_or_else(|| {
                Error::invalid(
                    "config.json",
                    format!(
                        "architecture {arch:?} is not supported (supported: {})",
                        Family::ALL.map(Family::hf_architecture).join(", ")
                    ),
                )
            }),
        None if model_type == "llama" && hidden_act != "relu2" => Ok(Family::Llama),
        None => Ok(Family::BitNet),
    }
}

/// A field of a JSON object as `T`; absent or `null` is `None`.
fn field<T: DeserializeOwned>(map: &Map<String, Value>, name: &str) -> Result<Option<T>> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|e| Error::invalid("config.json", format!("field `{name}` = {v}: {e}"))),
    }
}

/// `rope_parameters.rope_theta` (newer transformers) or `rope_theta`, refusing RoPE scaling.
fn rope_theta(map: &Map<String, Value>, default: f64) -> Result<f64> {
    let mut theta = field::<f64>(map, "rope_theta")?;
    for key in ["rope_scaling", "rope_parameters"] {
        let Some(params) = field::<Map<String, Value>>(map, key)? else {
            continue;
        };
        let kind = field::<String>(&params, "rope_type")?.or(field::<String>(&params, "type")?);
        if let Some(kind) = kind
            && kind != "default"
        {
            return Err(Error::invalid(
                "config.json",
                format!("`{key}` with rope_type {kind:?} is not supported (only \"default\")"),
            ));
        }
        if let Some(t) = field::<f64>(&params, "rope_theta")? {
            theta = Some(t);
        }
    }
    Ok(theta.unwrap_or(default))
}

/// A token id that may be absent (default), `null` (none) or a list (its first entry).
fn token_id(map: &Map<String, Value>, name: &str, default: Option<u32>) -> Result<Option<u32>> {
    match map.get(name) {
        None => Ok(default),
        Some(Value::Array(ids)) => match ids.first() {
            None => Ok(None),
            Some(first) => serde_json::from_value(first.clone())
                .map(Some)
                .map_err(|e| {
                    Error::invalid("config.json", format!("field `{name}` = {first}: {e}"))
                }),
        },
        Some(_) => field(map, name),
    }
}

/// Interprets `quantization_config` (transformers' `BitNetQuantConfig`; absent means full
/// precision).
fn weight_format(quant: Option<&Value>) -> Result<WeightFormat> {
    let q = match quant {
        None | Some(Value::Null) => return Ok(WeightFormat::FullPrecision),
        Some(Value::Object(q)) => q,
        Some(other) => {
            return Err(Error::invalid(
                "config.json",
                format!("`quantization_config` = {other} is not an object"),
            ));
        }
    };
    let unsupported = |why: String| Err(Error::invalid("config.json", why));
    let method: Option<String> = field(q, "quant_method")?;
    if method.as_deref() != Some("bitnet") {
        return unsupported(format!(
            "quantization_config.quant_method {method:?} is not supported (only \"bitnet\")"
        ));
    }
    if field::<bool>(q, "use_rms_norm")? == Some(true) {
        return unsupported(
            "quantization_config.use_rms_norm (an extra norm inside each linear) is not supported"
                .into(),
        );
    }
    let kept: Vec<String> = field(q, "modules_to_not_convert")?.unwrap_or_default();
    if let Some(module) = kept.iter().find(|m| m.as_str() != "lm_head") {
        return unsupported(format!(
            "quantization_config.modules_to_not_convert lists {module:?}; only \"lm_head\" may \
             stay unquantized"
        ));
    }
    // transformers' BitNetQuantConfig defaults: linear_class "bitlinear", mode "offline".
    let class = field::<String>(q, "linear_class")?.unwrap_or("bitlinear".into());
    let mode = field::<String>(q, "quantization_mode")?.unwrap_or("offline".into());
    match (class.as_str(), mode.as_str()) {
        ("autobitlinear", "offline") => Ok(WeightFormat::OfflinePacked(LinearClass::AutoBitLinear)),
        ("bitlinear", "offline") => Ok(WeightFormat::OfflinePacked(LinearClass::BitLinear)),
        ("bitlinear" | "autobitlinear", "online") => Ok(WeightFormat::FullPrecision),
        _ => unsupported(format!(
            "quantization_config linear_class {class:?} / quantization_mode {mode:?} is not \
             supported (linear_class \"autobitlinear\" or \"bitlinear\", quantization_mode \
             \"offline\" or \"online\")"
        )),
    }
}

#[derive(Serialize)]
struct ConfigOut {
    architectures: [&'static str; 1],
    model_type: &'static str,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    head_dim: Option<usize>,
    hidden_act: &'static str,
    max_position_embeddings: usize,
    rms_norm_eps: f32,
    rope_theta: f32,
    tie_word_embeddings: bool,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    attention_bias: bool,
    attention_dropout: f32,
    initializer_range: f32,
    use_cache: bool,
    torch_dtype: &'static str,
    quantization_config: QuantOut,
}

#[derive(Serialize)]
struct QuantOut {
    quant_method: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    linear_class: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    quantization_mode: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    modules_to_not_convert: Option<[&'static str; 1]>,
}
