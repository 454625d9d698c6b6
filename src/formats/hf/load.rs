//! Reading a checkpoint: config.json plus one safetensors file or an index and its shards.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::Deserialize;

use super::config::{CheckpointConfig, LinearClass, WeightFormat, parse_checkpoint_config};
use super::{
    CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE, layer_linears, layer_norms, layer_prefix, widen,
};
use crate::cpu::{TernaryWeights, WeightQuantOptions, weight_quant};
use crate::formats::scale::divisor_of;
use crate::model::{LayerWeights, ModelConfig, ModelWeights};
use crate::packing::hf;
use crate::{Error, Result};

/// Loads a checkpoint folder: config.json and either model.safetensors or
/// model.safetensors.index.json with the shards it lists (which must sit in the same folder).
///
/// Files are read whole into memory (the 2B4T packed checkpoint is about 1.2 GB); config.json is
/// checked before any weights are read. Errors name the file and tensor at fault: a missing file
/// ([`Error::Io`]), a bad config.json ([`Error::Invalid`]), a truncated or corrupt safetensors file,
/// a missing, unexpected or duplicated tensor, a wrong dtype, a shape that disagrees with
/// config.json, a non-finite value or an invalid packed code ([`Error::Safetensors`]).
pub fn load_dir(path: impl AsRef<Path>) -> Result<ModelWeights> {
    let dir = path.as_ref();
    let config_path = dir.join(CONFIG_FILE);
    let config_json = std::fs::read_to_string(&config_path).map_err(io_error(&config_path))?;
    let config = parse_checkpoint_config(&config_json)?;

    let (names, weight_map) = if dir.join(WEIGHTS_FILE).exists() {
        (vec![WEIGHTS_FILE.to_string()], None)
    } else if dir.join(INDEX_FILE).exists() {
        let index_path = dir.join(INDEX_FILE);
        let text = std::fs::read_to_string(&index_path).map_err(io_error(&index_path))?;
        let map = parse_index(&text)?;
        let names: BTreeSet<String> = map.values().cloned().collect();
        (names.into_iter().collect(), Some(map))
    } else {
        return Err(Error::Io {
            path: dir.display().to_string(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("neither {WEIGHTS_FILE} nor {INDEX_FILE} is in this folder"),
            ),
        });
    };
    let contents = names
        .iter()
        .map(|name| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(io_error(&path))
        })
        .collect::<Result<Vec<_>>>()?;
    let shards: Vec<(&str, &[u8])> = names
        .iter()
        .map(String::as_str)
        .zip(contents.iter().map(Vec::as_slice))
        .collect();
    let tensors = Tensors::new(&shards)?;
    if let Some(map) = weight_map {
        tensors.check_index(&map)?;
    }
    build(config, tensors)
}

/// Loads a checkpoint from memory (for the browser, where there is no folder): the text of
/// config.json and the bytes of every safetensors shard, in any order; a tensor may appear in one
/// shard only. Checks and errors are those of [`load_dir`]; a single shard is called
/// `model.safetensors` in messages, several are `shard 0`, `shard 1`, ...
pub fn load_from_bytes(config_json: &str, shards: &[&[u8]]) -> Result<ModelWeights> {
    let config = parse_checkpoint_config(config_json)?;
    if shards.is_empty() {
        return Err(Error::Empty("safetensors shards"));
    }
    let labels: Vec<String> = match shards.len() {
        1 => vec![WEIGHTS_FILE.to_string()],
        n => (0..n).map(|i| format!("shard {i}")).collect(),
    };
    let shards: Vec<(&str, &[u8])> = labels
        .iter()
        .map(String::as_str)
        .zip(shards.iter().copied())
        .collect();
    build(config, Tensors::new(&shards)?)
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

#[derive(Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

/// The `weight_map` of an index (tensor name -> shard file), refusing shard names that are not
/// plain file names, so an index cannot point outside its folder.
fn parse_index(text: &str) -> Result<BTreeMap<String, String>> {
    let index: Index = serde_json::from_str(text)
        .map_err(|e| Error::invalid("model.safetensors.index.json", e))?;
    for file in index.weight_map.values() {
        let plain = Path::new(file).file_name().and_then(|n| n.to_str()) == Some(file.as_str());
        if !plain {
            return Err(Error::invalid(
                "model.safetensors.index.json",
                format!("shard {file:?} is not a file name in the checkpoint's folder"),
            ));
        }
    }
    Ok(index.weight_map)
}

/// Assembles the model from the tensors, in the order of config.json.
fn build(config: CheckpointConfig, mut t: Tensors<'_>) -> Result<ModelWeights> {
    let CheckpointConfig {
        model: c,
        weight_format,
    } = config;
    let (vocab, hidden) = (c.vocab_size, c.hidden_size);
    let embed_tokens = t
        .take("model.embed_tokens.weight")?
        .floats(&[vocab, hidden])?;
    let layers = (0..c.num_hidden_layers)
        .map(|l| layer(&mut t, &c, l, weight_format))
        .collect::<Result<Vec<_>>>()?;
    let norm = t.take("model.norm.weight")?.floats(&[hidden])?;
    let lm_head = if c.tie_word_embeddings {
        if t.contains(LM_HEAD) {
            let copy = t.take(LM_HEAD)?;
            let values = copy.floats(&[vocab, hidden])?;
            if !same_bits(&values, &embed_tokens) {
                return Err(copy.error(
                    "differs from model.embed_tokens.weight, but config.json says \
                     tie_word_embeddings: true",
                ));
            }
        }
        None
    } else {
        Some(t.take(LM_HEAD)?.floats(&[vocab, hidden])?)
    };
    t.finish()?;
    Ok(ModelWeights {
        config: c,
        embed_tokens,
        layers,
        norm,
        lm_head,
    })
}

const LM_HEAD: &str = "lm_head.weight";

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn layer(
    t: &mut Tensors<'_>,
    c: &ModelConfig,
    l: usize,
    format: WeightFormat,
) -> Result<LayerWeights> {
    let prefix = layer_prefix(l);
    let [q, k, v, o, gate, up, down] = layer_linears(c)
        .map(|(name, out, inp)| linear(t, &format!("{prefix}.{name}"), out, inp, format));
    let [
        input_layernorm,
        attn_sub_norm,
        post_attention_layernorm,
        ffn_sub_norm,
    ] = layer_norms(c)
        .map(|(name, len)| t.take(&format!("{prefix}.{name}.weight"))?.floats(&[len]));
    Ok(LayerWeights {
        input_layernorm: input_layernorm?,
        q_proj: q?,
        k_proj: k?,
        v_proj: v?,
        o_proj: o?,
        attn_sub_norm: attn_sub_norm?,
        post_attention_layernorm: post_attention_layernorm?,
        gate_proj: gate?,
        up_proj: up?,
        down_proj: down?,
        ffn_sub_norm: ffn_sub_norm?,
    })
}

/// One linear, unpacked (offline packed) or quantized here (full precision).
fn linear(
    t: &mut Tensors<'_>,
    name: &str,
    out: usize,
    inp: usize,
    format: WeightFormat,
) -> Result<TernaryWeights> {
    let w = t.take(&format!("{name}.weight"))?;
    match format {
        WeightFormat::OfflinePacked(class) => {
            if w.view.dtype() != Dtype::U8 {
                return Err(w.error(format!(
                    "has dtype {:?}, expected U8 (packed ternary codes, as config.json's offline \
                     quantization_config says)",
                    w.view.dtype()
                )));
            }
            if !out.is_multiple_of(4) {
                return Err(w.error(format!(
                    "cannot be packed: config.json gives it {out} output features, not a multiple \
                     of 4"
                )));
            }
            w.check_shape(&[out / 4, inp])?;
            let codes = hf::unpack(w.view.data(), out, inp).map_err(|e| w.error(e))?;
            let s = t.take(&format!("{name}.weight_scale"))?;
            if !matches!(s.view.shape(), [] | [1]) {
                return Err(s.error(format!(
                    "has shape {:?}, expected [1] or [] (one scale per tensor)",
                    s.view.shape()
                )));
            }
            let stored = s.floats(s.view.shape())?[0];
            if !(stored.is_finite() && stored > 0.0) {
                return Err(s.error(format!("is {stored}, not a finite scale > 0")));
            }
            let scale = match class {
                LinearClass::AutoBitLinear => divisor_of(stored),
                LinearClass::BitLinear => stored,
            };
            Ok(TernaryWeights {
                rows: out,
                cols: inp,
                codes,
                scales: vec![scale],
            })
        }
        WeightFormat::FullPrecision => {
            if w.view.dtype() == Dtype::U8 {
                return Err(w.error(
                    "has dtype U8 (packed ternary?), expected BF16, F16 or F32: config.json has \
                     no offline BitNet quantization_config",
                ));
            }
            let values = w.floats(&[out, inp])?;
            weight_quant(&values, out, inp, WeightQuantOptions::default()).map_err(|e| w.error(e))
        }
    }
}

/// The tensors of all shards by name, remembering which were used.
struct Tensors<'a> {
    found: HashMap<String, Tensor<'a>>,
    used: HashSet<String>,
    /// The shards, for messages about tensors that are in none of them.
    files: String,
}

impl<'a> Tensors<'a> {
    fn new(shards: &[(&'a str, &'a [u8])]) -> Result<Self> {
        let mut found: HashMap<String, Tensor<'a>> = HashMap::new();
        for &(file, bytes) in shards {
            let st = SafeTensors::deserialize(bytes).map_err(|e| {
                Error::Safetensors(format!(
                    "{file}: not a complete safetensors file (truncated or corrupt?): {e}"
                ))
            })?;
            for (name, view) in st.tensors() {
                if let Some(first) = found.get(&name) {
                    return Err(Error::Safetensors(format!(
                        "tensor `{name}` is in both {} and {file}",
                        first.file
                    )));
                }
                found.insert(name.clone(), Tensor { name, file, view });
            }
        }
        let files = shards
            .iter()
            .map(|(file, _)| *file)
            .collect::<Vec<_>>()
            .join(", ");
        Ok(Tensors {
            found,
            used: HashSet::new(),
            files,
        })
    }

    fn contains(&self, name: &str) -> bool {
        self.found.contains_key(name)
    }

    fn take(&mut self, name: &str) -> Result<Tensor<'a>> {
        let tensor = self.found.get(name).cloned().ok_or_else(|| {
            Error::Safetensors(format!("missing tensor `{name}` (not in {})", self.files))
        })?;
        self.used.insert(name.to_string());
        Ok(tensor)
    }

    /// Errors unless every tensor the index lists is in the shard it names.
    fn check_index(&self, weight_map: &BTreeMap<String, String>) -> Result<()> {
        for (name, file) in weight_map {
            match self.found.get(name) {
                Some(t) if t.file == file => {}
                Some(t) => {
                    return Err(Error::Safetensors(format!(
                        "{INDEX_FILE} puts tensor `{name}` in {file}, but it is in {}",
                        t.file
                    )));
                }
                None => {
                    return Err(Error::Safetensors(format!(
                        "{INDEX_FILE} puts tensor `{name}` in {file}, but it is not there"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Errors if a tensor was left unused (other than RoPE's recomputable `inv_freq` buffers).
    fn finish(self) -> Result<()> {
        let mut extra: Vec<&Tensor<'_>> = self
            .found
            .values()
            .filter(|t| !self.used.contains(&t.name) && !t.name.ends_with("inv_freq"))
            .collect();
        if extra.is_empty() {
            return Ok(());
        }
        extra.sort_by(|a, b| a.name.cmp(&b.name));
        let listed: Vec<String> = extra
            .iter()
            .take(5)
            .map(|t| format!("`{}` in {}", t.name, t.file))
            .collect();
        Err(Error::Safetensors(format!(
            "{} unexpected tensor(s) that config.json does not describe: {}{}",
            extra.len(),
            listed.join(", "),
            if extra.len() > listed.len() {
                ", ..."
            } else {
                ""
            }
        )))
    }
}

/// One tensor with its name and file, for checks whose errors name both.
#[derive(Clone)]
struct Tensor<'a> {
    name: String,
    file: &'a str,
    view: TensorView<'a>,
}

impl Tensor<'_> {
    fn error(&self, why: impl std::fmt::Display) -> Error {
        Error::Safetensors(format!("tensor `{}` in {} {why}", self.name, self.file))
    }

    fn check_shape(&self, shape: &[usize]) -> Result<()> {
        if self.view.shape() == shape {
            Ok(())
        } else {
            Err(self.error(format!(
                "has shape {:?}, but config.json implies {shape:?}",
                self.view.shape()
            )))
        }
    }

    /// The values as f32 (BF16 and F16 widen exactly), checking the shape and finiteness.
    fn floats(&self, shape: &[usize]) -> Result<Vec<f32>> {
        let data = self.view.data();
        let dtype = self.view.dtype();
        let Some(values) = widen(dtype, data) else {
            return Err(self.error(format!("has dtype {dtype:?}, expected BF16, F16 or F32")));
        };
        self.check_shape(shape)?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(self.error(format!("holds {} at element {i}", values[i])));
        }
        Ok(values)
    }
}
