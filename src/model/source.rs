//! Where a model's weights come from: read one part at a time, so that an engine can be built
//! from a checkpoint's bytes a layer at a time, never holding the whole model unpacked (one i8
//! per ternary weight) in host memory.

use std::borrow::Cow;

use crate::model::forward::{check_layer, check_len};
use crate::model::schema::linear_shapes;
use crate::model::{LayerWeights, ModelConfig, ModelWeights};
use crate::packing::i2s::BlockRows;
use crate::table::Table;
use crate::{Error, Result};

/// A model's weights, part by part. [`ModelWeights`] lends its parts; a checkpoint
/// ([`crate::formats::hf::Checkpoint`], [`crate::formats::gguf::GgufModel`]) decodes each part
/// from its file's bytes when asked, so only that part is ever unpacked. Engines
/// ([`crate::model::Engine::new`], [`crate::model::GpuModel::new`]) read every part once, in
/// the order of the methods below, and check each against [`WeightSource::config`].
///
/// ```
/// use bitnet_wgpu::model::{synthetic, ModelConfig, WeightSource};
/// let config = ModelConfig {
///     vocab_size: 32, hidden_size: 16, intermediate_size: 32, num_hidden_layers: 2,
///     num_attention_heads: 2, num_key_value_heads: 1, head_dim: 8, max_position_embeddings: 8,
///     ..ModelConfig::bitnet_b158_2b4t()
/// };
/// let weights = synthetic(&config, 1);
/// let source: &dyn WeightSource = &weights;
/// assert_eq!(source.layer(1)?.q_proj.rows, 16);
/// assert_eq!(bitnet_wgpu::model::collect(source)?, weights);
/// # Ok::<(), bitnet_wgpu::Error>(())
/// ```
pub trait WeightSource {
    fn config(&self) -> &ModelConfig;
    /// `[vocab_size, hidden_size]`, row-major.
    fn embed_tokens(&self) -> Result<Table<'_>>;
    /// Decoder layer `index` (below `num_hidden_layers`).
    fn layer(&self, index: usize) -> Result<Cow<'_, LayerWeights>>;
    /// Decoder layer `index` with its linears as an I2_S file holds them, for an engine whose
    /// layout that is (the CPU engine's: it copies them rather than unpack and pack each
    /// weight); `None`, the default, where the source holds them otherwise or a row is not
    /// whole I2_S blocks. Read instead of [`WeightSource::layer`] when it is `Some`.
    fn layer_blocks(&self, index: usize) -> Result<Option<BlockLayer<'_>>> {
        check_layer_index(self.config(), index)?;
        Ok(None)
    }
    /// The final norm, `[hidden_size]`.
    fn norm(&self) -> Result<Cow<'_, [f32]>>;
    /// `[vocab_size, hidden_size]`; `None` when tied to the embeddings.
    fn lm_head(&self) -> Result<Option<Table<'_>>>;
    /// Says that the engine has copied what it keeps of every part read so far: a source over
    /// a mapped file lets go of the pages read ([`crate::formats::gguf::GgufFile::release`]),
    /// so that an engine being built does not hold the file and its copy in memory at once.
    /// Parts read again after this are still read right, only more slowly. Nothing by default.
    fn release(&self) {}
}

/// A decoder layer with its ternary linears as an I2_S file holds them
/// ([`WeightSource::layer_blocks`]).
#[derive(Clone, Debug)]
pub struct BlockLayer<'a> {
    /// As [`LayerWeights::norms`]: input, attention sub-norm, post-attention, MLP sub-norm.
    pub norms: [Vec<f32>; 4],
    /// As [`LayerWeights::linears`]: q, k, v, o, gate, up, down, each with its scale in the
    /// in-memory convention (`W ≈ code / scale`, [`crate::cpu::TernaryWeights::scales`]).
    pub linears: [(BlockRows<'a>, f32); 7],
}

impl WeightSource for ModelWeights {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn embed_tokens(&self) -> Result<Table<'_>> {
        Ok(Table::values(
            &self.embed_tokens[..],
            self.config.hidden_size,
        ))
    }

    fn layer(&self, index: usize) -> Result<Cow<'_, LayerWeights>> {
        self.layers
            .get(index)
            .map(Cow::Borrowed)
            .ok_or_else(|| Error::shape("decoder layers", index + 1, self.layers.len()))
    }

    fn norm(&self) -> Result<Cow<'_, [f32]>> {
        Ok(Cow::Borrowed(&self.norm))
    }

    fn lm_head(&self) -> Result<Option<Table<'_>>> {
        let hidden = self.config.hidden_size;
        Ok(self.lm_head.as_deref().map(|v| Table::values(v, hidden)))
    }
}

/// Errors unless `index` names one of `c`'s decoder layers.
pub(crate) fn check_layer_index(c: &ModelConfig, index: usize) -> Result<()> {
    if index < c.num_hidden_layers {
        Ok(())
    } else {
        Err(Error::shape(
            "decoder layers",
            index + 1,
            c.num_hidden_layers,
        ))
    }
}

/// The whole model of `source` in memory, checked ([`ModelWeights::validate`]).
pub fn collect(source: &dyn WeightSource) -> Result<ModelWeights> {
    let checked = Checked::new(source)?;
    Ok(ModelWeights {
        config: source.config().clone(),
        embed_tokens: checked.embed_tokens()?.to_vec()?,
        layers: (0..source.config().num_hidden_layers)
            .map(|l| Ok(checked.layer(l)?.into_owned()))
            .collect::<Result<_>>()?,
        norm: checked.norm()?.into_owned(),
        lm_head: checked.lm_head()?.map(|t| t.to_vec()).transpose()?,
    })
}

/// A source whose configuration has been validated, handing out parts checked against it: what
/// [`ModelWeights::validate`] checks, one part at a time.
pub(crate) struct Checked<'s> {
    source: &'s dyn WeightSource,
}

impl<'s> Checked<'s> {
    pub(crate) fn new(source: &'s dyn WeightSource) -> Result<Self> {
        source.config().validate()?;
        Ok(Checked { source })
    }

    /// `table` if it is `[vocab_size, hidden_size]`.
    fn table<'t>(&self, what: &'static str, table: Table<'t>) -> Result<Table<'t>> {
        let c = self.source.config();
        check_len(what, c.hidden_size, table.cols())?;
        check_len(what, c.vocab_size * c.hidden_size, table.len())?;
        Ok(table)
    }

    pub(crate) fn embed_tokens(&self) -> Result<Table<'s>> {
        self.table("model.embed_tokens", self.source.embed_tokens()?)
    }

    pub(crate) fn layer(&self, index: usize) -> Result<Cow<'s, LayerWeights>> {
        let layer = self.source.layer(index)?;
        check_layer(self.source.config(), &layer)?;
        Ok(layer)
    }

    pub(crate) fn layer_blocks(&self, index: usize) -> Result<Option<BlockLayer<'s>>> {
        let Some(layer) = self.source.layer_blocks(index)? else {
            return Ok(None);
        };
        let c = self.source.config();
        for (spec, norm) in c.layer_norms().into_iter().zip(&layer.norms) {
            check_len(spec.hf, spec.len, norm.len())?;
        }
        for ((name, rows, cols), (w, _)) in linear_shapes(c).into_iter().zip(&layer.linears) {
            if (w.rows(), w.cols()) != (rows, cols) {
                return Err(Error::shape(
                    name,
                    format!("{rows} x {cols}"),
                    format!("{} x {}", w.rows(), w.cols()),
                ));
            }
        }
        Ok(Some(layer))
    }

    pub(crate) fn norm(&self) -> Result<Cow<'s, [f32]>> {
        let values = self.source.norm()?;
        check_len("model.norm", self.source.config().hidden_size, values.len())?;
        Ok(values)
    }

    pub(crate) fn lm_head(&self) -> Result<Option<Table<'s>>> {
        self.source
            .lm_head()?
            .map(|table| self.table("lm_head", table))
            .transpose()
    }
}
