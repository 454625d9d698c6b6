//! Files of a training run: the resumable checkpoint (latent weights, optimizer state, step,
//! data position) and the two exports, packed for inference and full precision for further
//! training. Every file is written under a temporary name, synced and renamed into place; a
//! folder is built beside its final name and swapped in, so a crash leaves the old or the new
//! version, never half of one.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use super::linear::Quant;
use super::model::TrainModel;
use super::optim::Optimizer;
use super::params::{Parameters, linear_shapes};
use crate::formats::hf::{self, CONFIG_FILE, WEIGHTS_FILE, WeightFormat};
use crate::model::ModelConfig;
use crate::{Error, Result};

/// The checkpoint's single file, inside the run's `checkpoint/` folder.
pub const STATE_FILE: &str = "state.safetensors";
/// A tokenizer's file name, in the checkpoint and in both exports.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// The safetensors metadata key that holds [`CheckpointMeta`] as JSON.
const META_KEY: &str = "bitnet_train";
/// The layout version of [`STATE_FILE`].
const VERSION: u32 = 1;

/// What a checkpoint records besides tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    pub version: u32,
    /// Optimizer steps taken.
    pub step: usize,
    /// The model's config.json (as [`hf::config_json`] writes it).
    pub config_json: String,
    /// `"bitnet"` or `"none"`.
    pub quant: String,
    /// The options that fix the run's arithmetic (batch, context, rates, seed, data...): a
    /// resumed run must give the same.
    pub run: serde_json::Value,
    /// The data position: pass and window within the pass.
    pub epoch: u64,
    pub cursor: usize,
    /// AdamW's own step count (bias correction).
    pub optimizer_steps: u32,
}

/// The state a checkpoint restores.
#[derive(Clone, Debug)]
pub struct Checkpoint {
    pub meta: CheckpointMeta,
    pub model: TrainModel,
    pub optimizer: Optimizer,
}

/// `"bitnet"` or `"none"`.
pub fn quant_name(quant: Quant) -> &'static str {
    match quant {
        Quant::BitNet => "bitnet",
        Quant::None => "none",
    }
}

/// Writes the checkpoint file `dir/state.safetensors` (the folder is created if missing): the
/// latent weights as `weights.<name>`, AdamW's moments as `adam_m.<name>` and `adam_v.<name>` or
/// SGD's momentum as `sgd_momentum.<name>`, all F32, and `meta` in the header.
pub fn save_checkpoint(
    dir: &Path,
    meta: &CheckpointMeta,
    model: &TrainModel,
    optimizer: &Optimizer,
) -> Result<()> {
    let mut groups: Vec<(&str, &Parameters)> = vec![("weights", &model.params)];
    match optimizer {
        Optimizer::AdamW(o) => {
            if let (Some((m, v)), _) = o.state() {
                groups.push(("adam_m", m));
                groups.push(("adam_v", v));
            }
        }
        Optimizer::Sgd(o) => groups.extend(o.buffer().map(|b| ("sgd_momentum", b))),
    }
    let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (prefix, params) in groups {
        for ((name, values), shape) in params.tensors().into_iter().zip(shapes(&model.config)) {
            let bytes = bytemuck::cast_slice::<f32, u8>(values).to_vec();
            named.push((format!("{prefix}.{name}"), shape, bytes));
        }
    }
    let meta_json = serde_json::to_string(meta).map_err(|e| Error::invalid("checkpoint", e))?;
    let bytes = serialize(&named, HashMap::from([(META_KEY.to_string(), meta_json)]))?;
    create_dir(dir)?;
    write_atomic(&dir.join(STATE_FILE), &bytes)
}

/// Reads [`save_checkpoint`]'s file back into a model and `optimizer` (whose kind and
/// hyper-parameters the caller chose; its state comes from the file). Errors: a missing or
/// corrupt file, another layout version, tensors that do not fit the recorded config, or
/// optimizer state of another kind than `optimizer`.
pub fn load_checkpoint(dir: &Path, mut optimizer: Optimizer) -> Result<Checkpoint> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(io_error(&path))?;
    let bad = |why: String| Error::invalid("checkpoint", format!("{}: {why}", path.display()));
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let meta_json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .ok_or_else(|| {
            bad(format!(
                "no `{META_KEY}` metadata: not a training checkpoint"
            ))
        })?;
    let meta: CheckpointMeta = serde_json::from_str(meta_json).map_err(|e| bad(e.to_string()))?;
    if meta.version != VERSION {
        return Err(bad(format!(
            "layout version {} (this program reads {VERSION})",
            meta.version
        )));
    }
    let config = hf::parse_config(&meta.config_json)?;
    let quant = match meta.quant.as_str() {
        "bitnet" => Quant::BitNet,
        "none" => Quant::None,
        other => return Err(bad(format!("unknown quant {other:?}"))),
    };
    // Every parameter is stored as f32: a configuration that needs more bytes than the file
    // has is refused before the model it describes is allocated.
    let needed = config.parameter_count().and_then(|n| n.checked_mul(4));
    if needed.is_none_or(|needed| needed > bytes.len()) {
        return Err(bad(format!(
            "its configuration ({} layers, hidden size {}, vocabulary {}) needs more weights \
             than the file's {} bytes hold",
            config.num_hidden_layers,
            config.hidden_size,
            config.vocab_size,
            bytes.len()
        )));
    }
    let tensors = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut model = TrainModel::new(config, quant, 0)?;
    let read = |prefix: &str, template: &Parameters| -> Result<Option<Parameters>> {
        let mut params = template.clone();
        let names: Vec<String> = template.tensors().into_iter().map(|(n, _)| n).collect();
        for (i, (name, target)) in names.iter().zip(params.tensors_mut()).enumerate() {
            let key = format!("{prefix}.{name}");
            let view = match tensors.tensor(&key) {
                Ok(view) => view,
                Err(_) if i == 0 => return Ok(None),
                Err(e) => return Err(bad(format!("tensor {key}: {e}"))),
            };
            if view.dtype() != Dtype::F32 || view.data().len() != 4 * target.len() {
                return Err(bad(format!(
                    "tensor {key} is {:?} {:?}, expected F32 of {} values",
                    view.dtype(),
                    view.shape(),
                    target.len()
                )));
            }
            for (t, b) in target.iter_mut().zip(view.data().chunks_exact(4)) {
                *t = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Ok(Some(params))
    };
    let template = model.params.clone();
    model.params = read("weights", &template)?.ok_or_else(|| bad("no weights".into()))?;
    let (adam_m, adam_v) = (read("adam_m", &template)?, read("adam_v", &template)?);
    let momentum = read("sgd_momentum", &template)?;
    match &mut optimizer {
        Optimizer::AdamW(o) => {
            if momentum.is_some() {
                return Err(bad("it holds SGD state, but the optimizer is AdamW".into()));
            }
            o.restore(adam_m.zip(adam_v), meta.optimizer_steps);
        }
        Optimizer::Sgd(o) => {
            if adam_m.is_some() {
                return Err(bad("it holds AdamW state, but the optimizer is SGD".into()));
            }
            o.restore(momentum);
        }
    }
    Ok(Checkpoint {
        meta,
        model,
        optimizer,
    })
}

/// Writes `model` quantized for inference into the folder `dir` in the offline packed Hugging
/// Face format ([`hf::save_dir`]), with `tokenizer_json` as tokenizer.json, replacing any
/// previous export as a whole.
pub fn export_packed(model: &TrainModel, tokenizer_json: Option<&str>, dir: &Path) -> Result<()> {
    let weights = model.to_weights()?;
    replace_dir(dir, |tmp| {
        hf::save_dir(&weights, tmp, &[])?;
        write_tokenizer(tmp, tokenizer_json)
    })
}

/// Writes the latent f32 weights into the folder `dir` as a full-precision Hugging Face
/// checkpoint (model.safetensors with `[out, in]` F32 linears, config.json, tokenizer.json),
/// replacing any previous export as a whole. Under [`Quant::BitNet`] config.json carries
/// `quantization_config {quant_method: bitnet, linear_class: autobitlinear,
/// quantization_mode: online}`: transformers (and [`crate::model::load_model`]) quantize the
/// linears at load, per tensor absmean, which is the trained model. Under [`Quant::None`] it
/// has no `quantization_config`: transformers runs it in full precision, while this crate's
/// loader (ternary only) quantizes it after training.
pub fn export_master(model: &TrainModel, tokenizer_json: Option<&str>, dir: &Path) -> Result<()> {
    let mut config: serde_json::Value = serde_json::from_str(&hf::config_json(&model.config)?)
        .map_err(|e| Error::invalid("config.json", e))?;
    let object = config
        .as_object_mut()
        .ok_or_else(|| Error::invalid("config.json", "not an object"))?;
    object.insert("torch_dtype".into(), "float32".into());
    match model.quant {
        Quant::BitNet => {
            object.insert(
                "quantization_config".into(),
                serde_json::json!({
                    "quant_method": "bitnet",
                    "linear_class": "autobitlinear",
                    "quantization_mode": "online",
                }),
            );
        }
        Quant::None => {
            object.remove("quantization_config");
        }
    }
    let mut config_text =
        serde_json::to_string_pretty(&config).map_err(|e| Error::invalid("config.json", e))?;
    config_text.push('\n');
    let named: Vec<(String, Vec<usize>, Vec<u8>)> = model
        .params
        .tensors()
        .into_iter()
        .zip(shapes(&model.config))
        .map(|((name, values), shape)| {
            if let Some(v) = values.iter().find(|v| !v.is_finite()) {
                return Err(Error::invalid(
                    "weights",
                    format!("{name} holds {v}; refusing to export"),
                ));
            }
            Ok((name, shape, bytemuck::cast_slice(values).to_vec()))
        })
        .collect::<Result<_>>()?;
    let bytes = serialize(&named, HashMap::from([("format".into(), "pt".into())]))?;
    replace_dir(dir, |tmp| {
        write_atomic(&tmp.join(WEIGHTS_FILE), &bytes)?;
        write_tokenizer(tmp, tokenizer_json)?;
        write_atomic(&tmp.join(CONFIG_FILE), config_text.as_bytes())
    })
}

/// The latent weights of a full-precision checkpoint folder (one model.safetensors and a
/// config.json without offline quantization, such as [`export_master`] writes), as they are,
/// for fine-tuning without losing their precision; `None` for any other checkpoint (packed,
/// sharded, GGUF). Errors: a tensor that is missing or not shaped as `template` (the model
/// [`crate::model::load_model`] read from the same folder).
pub fn load_latent(path: &Path, template: &TrainModel) -> Result<Option<Parameters>> {
    let (config_path, weights_path) = (path.join(CONFIG_FILE), path.join(WEIGHTS_FILE));
    if !path.is_dir() || !weights_path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&config_path).map_err(io_error(&config_path))?;
    if hf::parse_checkpoint_config(&text)?.weight_format != WeightFormat::FullPrecision {
        return Ok(None);
    }
    let bytes = std::fs::read(&weights_path).map_err(io_error(&weights_path))?;
    let tensors = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::Safetensors(format!("{}: {e}", weights_path.display())))?;
    let mut params = template.params.clone();
    let names: Vec<String> = params.tensors().into_iter().map(|(n, _)| n).collect();
    for (name, target) in names.iter().zip(params.tensors_mut()) {
        let view = tensors
            .tensor(name)
            .map_err(|e| Error::Safetensors(format!("{}: {name}: {e}", weights_path.display())))?;
        let values = hf::widen(view.dtype(), view.data())
            .filter(|v| v.len() == target.len())
            .ok_or_else(|| {
                Error::Safetensors(format!(
                    "{}: {name} is {:?} {:?}, expected {} floats",
                    weights_path.display(),
                    view.dtype(),
                    view.shape(),
                    target.len()
                ))
            })?;
        target.copy_from_slice(&values);
    }
    Ok(Some(params))
}

/// Shapes of [`Parameters::tensors`], in its order.
fn shapes(c: &ModelConfig) -> Vec<Vec<usize>> {
    let (vocab, hidden) = (c.vocab_size, c.hidden_size);
    let [q, k, v, o, gate, up, down] = linear_shapes(c).map(|(_, r, c)| Some(vec![r, c]));
    let [input, attn_sub, post, ffn_sub] =
        c.layer_norms().map(|n| n.present().then(|| vec![n.len]));
    let mut out = vec![vec![vocab, hidden]];
    for _ in 0..c.num_hidden_layers {
        out.extend(
            [
                &input, &q, &k, &v, &o, &attn_sub, &post, &gate, &up, &down, &ffn_sub,
            ]
            .into_iter()
            .flatten()
            .cloned(),
        );
    }
    out.push(vec![hidden]);
    if !c.tie_word_embeddings {
        out.push(vec![vocab, hidden]);
    }
    out
}

fn serialize(
    named: &[(String, Vec<usize>, Vec<u8>)],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let views = named
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (name.as_str(), v))
                .map_err(|e| Error::Safetensors(format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, Some(metadata)).map_err(|e| Error::Safetensors(e.to_string()))
}

fn write_tokenizer(dir: &Path, json: Option<&str>) -> Result<()> {
    match json {
        Some(json) => write_atomic(&dir.join(TOKENIZER_FILE), json.as_bytes()),
        None => Ok(()),
    }
}

pub(crate) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

pub(crate) fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))
}

/// A hidden name beside `path` for a temporary copy: `.NAME.PID.tmp`.
fn temporary(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or("file".into(), |n| n.to_string_lossy().into_owned());
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Writes `bytes` to `path` through a synced temporary file renamed into place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temporary(path);
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_error(path)(e)
    })
}

/// Builds a folder with `fill` beside `dir`, then puts it in `dir`'s place (the old one, if
/// any, is moved aside first and removed after).
fn replace_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temporary(dir);
    let _ = std::fs::remove_dir_all(&tmp);
    let built = create_dir(&tmp).and_then(|()| fill(&tmp));
    if let Err(e) = built {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let old = dir.with_file_name(format!(
        ".{}.{}.old",
        dir.file_name()
            .map_or("dir".into(), |n| n.to_string_lossy()),
        std::process::id()
    ));
    if dir.exists() {
        std::fs::rename(dir, &old).map_err(io_error(dir))?;
    }
    std::fs::rename(&tmp, dir).map_err(io_error(dir))?;
    let _ = std::fs::remove_dir_all(&old);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::AdamW;

    #[test]
    fn parameter_count_is_what_the_model_holds() {
        for tied in [true, false] {
            let config = ModelConfig {
                tie_word_embeddings: tied,
                num_key_value_heads: 1,
                ..crate::train::run::tiny_config(300)
            };
            let model = TrainModel::new(config.clone(), Quant::BitNet, 1).unwrap();
            let held: usize = model.params.tensors().iter().map(|(_, v)| v.len()).sum();
            assert_eq!(config.parameter_count(), Some(held), "tied {tied}");
        }
    }

    #[test]
    fn a_checkpoint_claiming_a_huge_model_is_refused_before_allocating_it() {
        let dir =
            std::env::temp_dir().join(format!("bitnet-huge-checkpoint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = ModelConfig {
            num_hidden_layers: 1 << 20,
            ..crate::train::run::tiny_config(300)
        };
        let meta = CheckpointMeta {
            version: VERSION,
            step: 1,
            config_json: hf::config_json(&config).unwrap(),
            quant: "bitnet".into(),
            run: serde_json::Value::Null,
            epoch: 0,
            cursor: 0,
            optimizer_steps: 1,
        };
        let metadata =
            HashMap::from([(META_KEY.to_string(), serde_json::to_string(&meta).unwrap())]);
        let empty: Vec<(&str, TensorView<'_>)> = Vec::new();
        let bytes = safetensors::serialize(empty, Some(metadata)).unwrap();
        std::fs::write(dir.join(STATE_FILE), bytes).unwrap();
        let e = load_checkpoint(&dir, Optimizer::AdamW(AdamW::default()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs more weights than the file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
