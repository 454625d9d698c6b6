//! Writing a checkpoint in the offline packed format of `microsoft/bitnet-b1.58-2B-4T`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use half::bf16;
use safetensors::tensor::{Dtype, TensorView};

use super::config::{config_json, validate};
use super::{CONFIG_FILE, INDEX_FILE, LinearClass, WEIGHTS_FILE, layer_prefix};
use crate::cpu::TernaryWeights;
use crate::formats::scale::multiplier_of;
use crate::model::{Family, LinearSpec, ModelWeights};
use crate::packing::hf;
use crate::{Error, Result};

/// Writes `weights` into the folder `dir` (created if missing) as config.json (see
/// [`config_json`]) and model.safetensors (see [`to_safetensors_bytes`]), a checkpoint that
/// transformers and [`super::load_dir`] read back.
///
/// Never overwrites: if config.json, model.safetensors or model.safetensors.index.json already
/// exists in `dir`, nothing is written and the error is [`Error::Io`] with `AlreadyExists`. Each
/// file is written under a temporary name in `dir`, synced, then renamed into place (weights first,
/// then config.json), so a failure leaves no partial file and no config.json without its weights.
pub fn save_dir(
    weights: &ModelWeights,
    dir: impl AsRef<Path>,
    extra_metadata: &[(String, String)],
) -> Result<()> {
    let dir = dir.as_ref();
    let bytes = to_safetensors_bytes(weights, extra_metadata)?;
    let config = config_json(&weights.config)?;
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    for name in [CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE] {
        let path = dir.join(name);
        if path.exists() {
            return Err(Error::Io {
                path: path.display().to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "refusing to overwrite an existing checkpoint file",
                ),
            });
        }
    }
    let weights_tmp = write_temporary(dir, WEIGHTS_FILE, &bytes)?;
    let config_tmp = match write_temporary(dir, CONFIG_FILE, config.as_bytes()) {
        Ok(path) => path,
        Err(e) => {
            let _ = std::fs::remove_file(&weights_tmp);
            return Err(e);
        }
    };
    let weights_path = dir.join(WEIGHTS_FILE);
    let config_path = dir.join(CONFIG_FILE);
    let renamed = std::fs::rename(&weights_tmp, &weights_path)
        .map_err(io_error(&weights_path))
        .and_then(|()| {
            std::fs::rename(&config_tmp, &config_path).map_err(|e| {
                let _ = std::fs::remove_file(&weights_path);
                io_error(&config_path)(e)
            })
        });
    if renamed.is_err() {
        let _ = std::fs::remove_file(&weights_tmp);
        let _ = std::fs::remove_file(&config_tmp);
    }
    renamed
}

/// `model.safetensors` for `weights` in the offline packed format, as bytes (for the browser).
///
/// Linears are U8 `[out/4, in]` ([`crate::packing::hf`]) with `weight_scale` of shape `[1]`, in
/// the released 2B-4T's `autobitlinear` convention: the multiplier `mean|W|`
/// ([`crate::formats::scale::multiplier_of`] the in-memory divisor, chosen so that loading gives
/// back the very same divisor). The released checkpoint stores that scale as BF16; here it is
/// BF16 only where bf16 holds it exactly and F32 otherwise (transformers casts either to the
/// model's dtype). Embeddings and norms are F32, likewise exact. The header's metadata is
/// `format: pt` (transformers refuses other values) plus `extra_metadata`, which may not set
/// `format` itself.
///
/// Errors: a config that [`super::parse_config`] would refuse, any tensor whose size disagrees
/// with the config, `lm_head` present although tied (or absent although untied), a linear with
/// per-channel scales (the format has one scale per linear) or a scale that is not finite and
/// > 0, and non-finite norms or embeddings.
pub fn to_safetensors_bytes(
    weights: &ModelWeights,
    extra_metadata: &[(String, String)],
) -> Result<Vec<u8>> {
    let c = &weights.config;
    validate(c)?;
    if weights.layers.len() != c.num_hidden_layers {
        return Err(Error::shape(
            "layers",
            format!("num_hidden_layers = {}", c.num_hidden_layers),
            weights.layers.len(),
        ));
    }
    let class = match c.family {
        Family::BitNet => LinearClass::AutoBitLinear,
        _ => LinearClass::BitLinear,
    };
    let (vocab, hidden) = (c.vocab_size, c.hidden_size);
    let mut tensors: Vec<Stored> = Vec::new();
    tensors.push(floats(
        "model.embed_tokens.weight",
        &weights.embed_tokens,
        vec![vocab, hidden],
    )?);
    for (l, layer) in weights.layers.iter().enumerate() {
        let prefix = layer_prefix(l);
        for (spec, w) in c.layer_linears().into_iter().zip(layer.linears()) {
            tensors.extend(linear(&format!("{prefix}.{}", spec.hf), w, spec, class)?);
        }
        for (spec, values) in c.layer_norms().into_iter().zip(layer.norms()) {
            if spec.present() {
                tensors.push(floats(
                    &format!("{prefix}.{}.weight", spec.hf),
                    values,
                    vec![spec.len],
                )?);
            }
        }
    }
    tensors.push(floats("model.norm.weight", &weights.norm, vec![hidden])?);
    match (&weights.lm_head, c.tie_word_embeddings) {
        (Some(head), false) => tensors.push(floats("lm_head.weight", head, vec![vocab, hidden])?),
        (None, true) => {}
        (Some(_), true) => {
            return Err(Error::invalid(
                "lm_head",
                "present although tie_word_embeddings is true",
            ));
        }
        (None, false) => {
            return Err(Error::invalid(
                "lm_head",
                "absent although tie_word_embeddings is false",
            ));
        }
    }

    let mut metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    for (key, value) in extra_metadata {
        if key == "format" {
            return Err(Error::invalid(
                "extra metadata",
                "the key `format` is reserved (it must be \"pt\" for transformers)",
            ));
        }
        metadata.insert(key.clone(), value.clone());
    }
    let views = tensors
        .iter()
        .map(|t| {
            TensorView::new(t.dtype, t.shape.clone(), &t.bytes)
                .map(|v| (t.name.as_str(), v))
                .map_err(|e| Error::Safetensors(format!("tensor `{}`: {e}", t.name)))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, Some(metadata))
        .map_err(|e| Error::Safetensors(format!("serializing {WEIGHTS_FILE}: {e}")))
}

/// A tensor ready to serialize.
struct Stored {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// A linear's packed codes and its `weight_scale` in `class`'s meaning.
fn linear(
    name: &str,
    w: &TernaryWeights,
    spec: LinearSpec,
    class: LinearClass,
) -> Result<[Stored; 2]> {
    let (out, inp) = (spec.rows, spec.cols);
    let bad = |why: String| Err(Error::Safetensors(format!("linear `{name}`: {why}")));
    if (w.rows, w.cols) != (out, inp) {
        return bad(format!(
            "is {} x {}, but the config implies {out} x {inp}",
            w.rows, w.cols
        ));
    }
    let &[scale] = w.scales.as_slice() else {
        return bad(format!(
            "has {} scales; Hugging Face's format holds one weight_scale per linear",
            w.scales.len()
        ));
    };
    if !(scale.is_finite() && scale > 0.0) {
        return bad(format!("scale {scale} is not a finite value > 0"));
    }
    let packed = hf::pack(&w.codes, out, inp)
        .map_err(|e| Error::Safetensors(format!("linear `{name}`: {e}")))?;
    let stored = match class {
        LinearClass::AutoBitLinear => multiplier_of(scale),
        LinearClass::BitLinear => scale,
    };
    let as_bf16 = bf16::from_f32(stored);
    let (dtype, scale_bytes) = if as_bf16.to_f32().to_bits() == stored.to_bits() {
        (Dtype::BF16, as_bf16.to_le_bytes().to_vec())
    } else {
        (Dtype::F32, stored.to_le_bytes().to_vec())
    };
    Ok([
        Stored {
            name: format!("{name}.weight"),
            dtype: Dtype::U8,
            shape: vec![out / 4, inp],
            bytes: packed,
        },
        Stored {
            name: format!("{name}.weight_scale"),
            dtype,
            shape: vec![1],
            bytes: scale_bytes,
        },
    ])
}

fn floats(name: &str, values: &[f32], shape: Vec<usize>) -> Result<Stored> {
    let len: usize = shape.iter().product();
    if values.len() != len {
        return Err(Error::Safetensors(format!(
            "tensor `{name}` has {} values, but the config implies {shape:?}",
            values.len()
        )));
    }
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(Error::Safetensors(format!(
            "tensor `{name}` holds {} at element {i}",
            values[i]
        )));
    }
    Ok(Stored {
        name: name.to_string(),
        dtype: Dtype::F32,
        shape,
        bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    })
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Writes `bytes` to a new hidden file beside `name` in `dir` and syncs it, returning its path.
fn write_temporary(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf> {
    let path = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            file.sync_all()
        });
    match written {
        Ok(()) => Ok(path),
        Err(e) => {
            if e.kind() != std::io::ErrorKind::AlreadyExists {
                let _ = std::fs::remove_file(&path);
            }
            Err(io_error(&path)(e))
        }
    }
}
