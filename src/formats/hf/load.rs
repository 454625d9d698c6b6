//! Reading a checkpoint: config.json plus one safetensors file or an index and its shards.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::Deserialize;

use super::config::{CheckpointConfig, LinearClass, WeightFormat, parse_checkpoint_config};
use super::{
    CONFIG_FILE, INDEX_FILE, WEIGHTS_FILE, layer_linears, layer_prefix, present_norms, widen,
};
use crate::cpu::{TernaryWeights, WeightQuantOptions, weight_quant};
use crate::formats::check_layer_count;
use crate::formats::scale::divisor_of;
use crate::model::{
    BlockLayer, LayerWeights, ModelConfig, ModelWeights, WeightSource, check_layer_index, collect,
};
use crate::packing::{hf, i2s};
use crate::table::{FloatType, Table};
use crate::{Error, Result};

/// Loads a checkpoint folder: config.json and either model.safetensors or
/// model.safetensors.index.json with the shards it lists (which must sit in the same folder).
///
/// Natively the safetensors files are mapped into memory and read as they are used (the 2B4T
/// packed checkpoint is about 1.2 GB); config.json is checked before any weights are read.
/// Errors name the file and tensor at fault: a missing file ([`Error::Io`]), a bad config.json
/// ([`Error::Invalid`]), a truncated or corrupt safetensors file, a missing, unexpected or
/// duplicated tensor, a wrong dtype, a shape that disagrees with config.json, a non-finite value
/// or an invalid packed code ([`Error::Safetensors`]).
/// [`CheckpointFiles`] reads the same files without unpacking them all at once.
pub fn load_dir(path: impl AsRef<Path>) -> Result<ModelWeights> {
    collect(&CheckpointFiles::read(path)?.open()?)
}

/// Loads a checkpoint from memory (for the browser, where there is no folder): the text of
/// config.json and the bytes of every safetensors shard, in any order; a tensor may appear in one
/// shard only. Checks and errors are those of [`load_dir`]; a single shard is called
/// `model.safetensors` in messages, several are `shard 0`, `shard 1`, ...
pub fn load_from_bytes(config_json: &str, shards: &[&[u8]]) -> Result<ModelWeights> {
    collect(&Checkpoint::from_bytes(config_json, shards)?)
}

/// A checkpoint folder's files, read but not decoded: [`CheckpointFiles::open`] gives the
/// [`Checkpoint`] over them.
pub struct CheckpointFiles {
    config_json: String,
    /// Shard file names and bytes.
    shards: Vec<(String, ShardBytes)>,
    weight_map: Option<BTreeMap<String, String>>,
}

/// A shard's bytes: natively the file mapped ([`crate::formats::map`]), read whole in the
/// browser's build.
#[cfg(not(target_arch = "wasm32"))]
type ShardBytes = crate::table::Mapping;
#[cfg(target_arch = "wasm32")]
type ShardBytes = Vec<u8>;

#[cfg(not(target_arch = "wasm32"))]
fn read_shard(path: &Path) -> Result<ShardBytes> {
    crate::formats::map(path).map(std::sync::Arc::new)
}

#[cfg(target_arch = "wasm32")]
fn read_shard(path: &Path) -> Result<ShardBytes> {
    std::fs::read(path).map_err(io_error(path))
}

impl CheckpointFiles {
    /// Reads config.json (checked before any weights are read) and model.safetensors, or
    /// model.safetensors.index.json and the shards it lists; errors as [`load_dir`]'s.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let dir = path.as_ref();
        let config_path = dir.join(CONFIG_FILE);
        let config_json = std::fs::read_to_string(&config_path).map_err(io_error(&config_path))?;
        parse_checkpoint_config(&config_json)?;
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
        let shards = names
            .into_iter()
            .map(|name| {
                let bytes = read_shard(&dir.join(&name))?;
                Ok((name, bytes))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(CheckpointFiles {
            config_json,
            shards,
            weight_map,
        })
    }

    /// The checkpoint these files hold, checked as a whole (every tensor there, none too many,
    /// the index right) but not decoded.
    pub fn open(&self) -> Result<Checkpoint<'_>> {
        let shards: Vec<(&str, &[u8])> = self
            .shards
            .iter()
            .map(|(name, bytes)| (name.as_str(), &bytes[..]))
            .collect();
        let checkpoint = Checkpoint::new(&self.config_json, &shards, self.weight_map.as_ref())?;
        #[cfg(not(target_arch = "wasm32"))]
        let checkpoint = Checkpoint {
            mapped: self
                .shards
                .iter()
                .map(|(name, map)| (name.as_str(), map))
                .collect(),
            ..checkpoint
        };
        Ok(checkpoint)
    }
}

/// A Hugging Face checkpoint over its files' bytes: config.json parsed and every shard's tensor
/// directory checked against it up front; the weights are decoded only when a [`WeightSource`]
/// method asks for them, so an engine built from it unpacks one layer at a time.
///
/// ```
/// use bitnet_wgpu::formats::hf::{Checkpoint, config_json, to_safetensors_bytes};
/// use bitnet_wgpu::model::{synthetic, ModelConfig, WeightSource};
/// let config = ModelConfig {
///     vocab_size: 32, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 2,
///     num_attention_heads: 2, num_key_value_heads: 1, head_dim: 8, max_position_embeddings: 8,
///     ..ModelConfig::bitnet_b158_2b4t()
/// };
/// let weights = synthetic(&config, 1);
/// let bytes = to_safetensors_bytes(&weights, &[])?;
/// let checkpoint = Checkpoint::from_bytes(&config_json(&weights.config)?, &[&bytes])?;
/// assert_eq!(*checkpoint.layer(1)?, weights.layers[1]);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub struct Checkpoint<'a> {
    config: ModelConfig,
    format: WeightFormat,
    tensors: Tensors<'a>,
    /// The mapped files the tensors lie in, by name ([`CheckpointFiles`]), for
    /// [`WeightSource::release`] and tables an engine may read where they lie
    /// ([`Table::in_mapping`]).
    #[cfg(not(target_arch = "wasm32"))]
    mapped: Vec<(&'a str, &'a crate::table::Mapping)>,
}

impl<'a> Checkpoint<'a> {
    /// config.json's text and the shards' bytes, as [`load_from_bytes`] takes them.
    pub fn from_bytes(config_json: &str, shards: &[&'a [u8]]) -> Result<Self> {
        if shards.is_empty() {
            return Err(Error::Empty("safetensors shards"));
        }
        let labels: Vec<String> = match shards.len() {
            1 => vec![WEIGHTS_FILE.to_string()],
            n => (0..n).map(|i| format!("shard {i}")).collect(),
        };
        let shards: Vec<(&str, &'a [u8])> = labels
            .iter()
            .map(String::as_str)
            .zip(shards.iter().copied())
            .collect();
        Self::new(config_json, &shards, None)
    }

    fn new(
        config_json: &str,
        shards: &[(&str, &'a [u8])],
        weight_map: Option<&BTreeMap<String, String>>,
    ) -> Result<Self> {
        let CheckpointConfig {
            model: config,
            weight_format: format,
        } = parse_checkpoint_config(config_json)?;
        let tensors = Tensors::new(shards)?;
        if let Some(map) = weight_map {
            tensors.check_index(map)?;
        }
        // An offline packed linear is two tensors: its codes and its weight_scale.
        let tensors_per_linear = 1 + usize::from(matches!(format, WeightFormat::OfflinePacked(_)));
        let per_layer =
            layer_linears(&config).len() * tensors_per_linear + present_norms(&config).count();
        check_layer_count(&config, per_layer, tensors.found.len(), CONFIG_FILE)?;
        let expected = expected_names(&config, format);
        tensors.check_present(&expected)?;
        // A wrong storage format explains the unexpected tensors it brings (weight_scale).
        for l in 0..config.num_hidden_layers {
            for (name, _, _) in layer_linears(&config) {
                let weight = tensors.get(&format!("{}.{name}.weight", layer_prefix(l)))?;
                check_linear_dtype(weight, format)?;
            }
        }
        tensors.check_unexpected(&expected)?;
        Ok(Checkpoint {
            config,
            format,
            tensors,
            #[cfg(not(target_arch = "wasm32"))]
            mapped: Vec::new(),
        })
    }

    /// `tensor` as a table ([`Tensor::table`]), said to lie in its mapped file where it does.
    fn table(&self, tensor: &Tensor<'a>, rows: usize, cols: usize) -> Result<Table<'a>> {
        let table = tensor.table(rows, cols)?;
        #[cfg(not(target_arch = "wasm32"))]
        if let Some((_, map)) = self.mapped.iter().find(|(name, _)| *name == tensor.file) {
            return table.in_mapping((*map).clone());
        }
        Ok(table)
    }
}

impl WeightSource for Checkpoint<'_> {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn embed_tokens(&self) -> Result<Table<'_>> {
        let c = &self.config;
        self.table(self.tensors.get(EMBED_TOKENS)?, c.vocab_size, c.hidden_size)
    }

    fn layer(&self, index: usize) -> Result<Cow<'_, LayerWeights>> {
        check_layer_index(&self.config, index)?;
        layer(&self.tensors, &self.config, index, self.format).map(Cow::Owned)
    }

    /// An offline packed layer whose rows are whole I2_S blocks, each linear turned into that
    /// layout a block at a time ([`hf::to_block_rows`]) rather than unpacked, checked as
    /// [`WeightSource::layer`] checks it.
    fn layer_blocks(&self, index: usize) -> Result<Option<BlockLayer<'_>>> {
        check_layer_index(&self.config, index)?;
        let WeightFormat::OfflinePacked(class) = self.format else {
            return Ok(None);
        };
        let c = &self.config;
        if layer_linears(c)
            .iter()
            .any(|&(_, _, inp)| !inp.is_multiple_of(i2s::BLOCK))
        {
            return Ok(None);
        }
        let prefix = layer_prefix(index);
        let [q, k, v, o, gate, up, down] = layer_linears(c).map(|(name, out, inp)| {
            let (w, scale) =
                packed_linear(&self.tensors, &format!("{prefix}.{name}"), out, inp, class)?;
            let rows = hf::to_block_rows(w.view.data(), out, inp).map_err(|e| w.error(e))?;
            Ok::<_, Error>((rows, scale))
        });
        Ok(Some(BlockLayer {
            norms: layer_norms(&self.tensors, c, index)?,
            linears: [q?, k?, v?, o?, gate?, up?, down?],
        }))
    }

    fn norm(&self) -> Result<Cow<'_, [f32]>> {
        let values = self.tensors.get(NORM)?.floats(&[self.config.hidden_size])?;
        Ok(Cow::Owned(values))
    }

    /// Lets go of the mapped files' pages read so far ([`crate::formats::map`]).
    fn release(&self) {
        #[cfg(not(target_arch = "wasm32"))]
        self.mapped
            .iter()
            .for_each(|(_, map)| crate::formats::release(map));
    }

    fn lm_head(&self) -> Result<Option<Table<'_>>> {
        let (rows, cols) = (self.config.vocab_size, self.config.hidden_size);
        if !self.config.tie_word_embeddings {
            return Ok(Some(self.table(self.tensors.get(LM_HEAD)?, rows, cols)?));
        }
        if self.tensors.contains(LM_HEAD) {
            let copy = self.tensors.get(LM_HEAD)?;
            let values = copy.table(rows, cols)?.to_vec()?;
            if !same_bits(&values, &self.embed_tokens()?.to_vec()?) {
                return Err(copy.error(
                    "differs from model.embed_tokens.weight, but config.json says \
                     tie_word_embeddings: true",
                ));
            }
        }
        Ok(None)
    }
}

const EMBED_TOKENS: &str = "model.embed_tokens.weight";
const NORM: &str = "model.norm.weight";
const LM_HEAD: &str = "lm_head.weight";

/// Every tensor a checkpoint of `c` must hold, in the order the model reads them (lm_head only
/// when untied: a tied checkpoint may carry a copy).
fn expected_names(c: &ModelConfig, format: WeightFormat) -> Vec<String> {
    let mut names = vec![EMBED_TOKENS.to_string()];
    for l in 0..c.num_hidden_layers {
        let prefix = layer_prefix(l);
        for (name, _, _) in layer_linears(c) {
            names.push(format!("{prefix}.{name}.weight"));
            if matches!(format, WeightFormat::OfflinePacked(_)) {
                names.push(format!("{prefix}.{name}.weight_scale"));
            }
        }
        for (name, _) in present_norms(c) {
            names.push(format!("{prefix}.{name}.weight"));
        }
    }
    names.push(NORM.to_string());
    if !c.tie_word_embeddings {
        names.push(LM_HEAD.to_string());
    }
    names
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

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

fn layer(t: &Tensors<'_>, c: &ModelConfig, l: usize, format: WeightFormat) -> Result<LayerWeights> {
    let prefix = layer_prefix(l);
    let [q, k, v, o, gate, up, down] = layer_linears(c)
        .map(|(name, out, inp)| linear(t, &format!("{prefix}.{name}"), out, inp, format));
    let [
        input_layernorm,
        attn_sub_norm,
        post_attention_layernorm,
        ffn_sub_norm,
    ] = layer_norms(t, c, l)?;
    Ok(LayerWeights {
        input_layernorm,
        q_proj: q?,
        k_proj: k?,
        v_proj: v?,
        o_proj: o?,
        attn_sub_norm,
        post_attention_layernorm,
        gate_proj: gate?,
        up_proj: up?,
        down_proj: down?,
        ffn_sub_norm,
    })
}

/// Layer `l`'s norms in [`ModelConfig::layer_norms`]' order, empty where the model has none.
fn layer_norms(t: &Tensors<'_>, c: &ModelConfig, l: usize) -> Result<[Vec<f32>; 4]> {
    let prefix = layer_prefix(l);
    let [a, b, c, d] = c.layer_norms().map(|n| match n.present() {
        true => t
            .get(&format!("{prefix}.{}.weight", n.hf))?
            .floats(&[n.len]),
        false => Ok(Vec::new()),
    });
    Ok([a?, b?, c?, d?])
}

/// An offline packed linear's codes tensor (dtype and shape checked) and its scale in the
/// in-memory convention (`W ≈ code / scale`).
fn packed_linear<'t, 'a>(
    t: &'t Tensors<'a>,
    name: &str,
    out: usize,
    inp: usize,
    class: LinearClass,
) -> Result<(&'t Tensor<'a>, f32)> {
    let w = t.get(&format!("{name}.weight"))?;
    check_linear_dtype(w, WeightFormat::OfflinePacked(class))?;
    if !out.is_multiple_of(4) {
        return Err(w.error(format!(
            "cannot be packed: config.json gives it {out} output features, not a multiple of 4"
        )));
    }
    w.check_shape(&[out / 4, inp])?;
    let s = t.get(&format!("{name}.weight_scale"))?;
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
    Ok((w, scale))
}

/// One linear, unpacked (offline packed) or quantized here (full precision).
fn linear(
    t: &Tensors<'_>,
    name: &str,
    out: usize,
    inp: usize,
    format: WeightFormat,
) -> Result<TernaryWeights> {
    match format {
        WeightFormat::OfflinePacked(class) => {
            let (w, scale) = packed_linear(t, name, out, inp, class)?;
            let codes = hf::unpack(w.view.data(), out, inp).map_err(|e| w.error(e))?;
            Ok(TernaryWeights {
                rows: out,
                cols: inp,
                codes,
                scales: vec![scale],
            })
        }
        WeightFormat::FullPrecision => {
            let w = t.get(&format!("{name}.weight"))?;
            check_linear_dtype(w, format)?;
            let values = w.floats(&[out, inp])?;
            weight_quant(&values, out, inp, WeightQuantOptions::default()).map_err(|e| w.error(e))
        }
    }
}

/// Errors unless a linear's weight has the dtype its storage format implies: U8 when packed,
/// a float type otherwise.
fn check_linear_dtype(w: &Tensor<'_>, format: WeightFormat) -> Result<()> {
    let packed = w.view.dtype() == Dtype::U8;
    match format {
        WeightFormat::OfflinePacked(_) if !packed => Err(w.error(format!(
            "has dtype {:?}, expected U8 (packed ternary codes, as config.json's offline \
             quantization_config says)",
            w.view.dtype()
        ))),
        WeightFormat::FullPrecision if packed => Err(w.error(
            "has dtype U8 (packed ternary?), expected BF16, F16 or F32: config.json has no \
             offline BitNet quantization_config",
        )),
        _ => Ok(()),
    }
}

/// The tensors of all shards by name.
struct Tensors<'a> {
    found: HashMap<String, Tensor<'a>>,
    /// The shards, for messages about tensors that are in none of them.
    files: String,
}

impl<'a> Tensors<'a> {
    fn new(shards: &[(&str, &'a [u8])]) -> Result<Self> {
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
                let file = file.to_string();
                found.insert(name.clone(), Tensor { name, file, view });
            }
        }
        let files = shards
            .iter()
            .map(|(file, _)| *file)
            .collect::<Vec<_>>()
            .join(", ");
        Ok(Tensors { found, files })
    }

    fn contains(&self, name: &str) -> bool {
        self.found.contains_key(name)
    }

    fn get(&self, name: &str) -> Result<&Tensor<'a>> {
        self.found.get(name).ok_or_else(|| {
            Error::Safetensors(format!("missing tensor `{name}` (not in {})", self.files))
        })
    }

    /// Errors unless every tensor the index lists is in the shard it names.
    fn check_index(&self, weight_map: &BTreeMap<String, String>) -> Result<()> {
        for (name, file) in weight_map {
            match self.found.get(name) {
                Some(t) if &t.file == file => {}
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

    /// Errors unless every name of `expected` is here.
    fn check_present(&self, expected: &[String]) -> Result<()> {
        expected
            .iter()
            .try_for_each(|name| self.get(name).map(|_| ()))
    }

    /// Errors if anything is here but `expected`, an lm_head copy and RoPE's recomputable
    /// `inv_freq` buffers.
    fn check_unexpected(&self, expected: &[String]) -> Result<()> {
        let expected: HashSet<&str> = expected.iter().map(String::as_str).collect();
        let mut extra: Vec<&Tensor<'_>> = self
            .found
            .values()
            .filter(|t| {
                !expected.contains(t.name.as_str())
                    && t.name != LM_HEAD
                    && !t.name.ends_with("inv_freq")
            })
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
struct Tensor<'a> {
    name: String,
    file: String,
    view: TensorView<'a>,
}

impl<'a> Tensor<'a> {
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

    /// A `[rows, cols]` float table, checked for dtype and shape here and for finiteness as
    /// its rows are read.
    fn table(&self, rows: usize, cols: usize) -> Result<Table<'a>> {
        let dtype = match self.view.dtype() {
            Dtype::BF16 => FloatType::Bf16,
            Dtype::F16 => FloatType::F16,
            Dtype::F32 => FloatType::F32,
            other => {
                return Err(self.error(format!("has dtype {other:?}, expected BF16, F16 or F32")));
            }
        };
        self.check_shape(&[rows, cols])?;
        let name = format!("tensor `{}` in {}", self.name, self.file);
        Table::stored(name, dtype, self.view.data(), rows, cols)
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
