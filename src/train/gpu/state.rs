//! A training model's tensors on the GPU: latent f32 weights with their gradients and optimizer
//! moments, the ternary codes the forward multiplies with, uploaded from and read back into the
//! host's [`Parameters`] and [`Optimizer`].

use crate::cpu::WeightQuantOptions;
use crate::gpu::{GpuContext, GpuGradTable, GpuTable, GpuTernary, TableStorage, ternary_pack};
use crate::model::ModelConfig;
use crate::train::params::{LayerParameters, Parameters, linear_shapes};
use crate::train::{Optimizer, TrainModel};
use crate::{Error, Result};

/// A run of f32 values the optimizer updates as one: a whole tensor, or one chunk of a table.
pub(super) struct Piece {
    pub len: usize,
    pub w: wgpu::Buffer,
    pub grad: wgpu::Buffer,
    /// AdamW's first moment or SGD's momentum buffer.
    pub m: wgpu::Buffer,
    /// AdamW's second moment.
    pub v: Option<wgpu::Buffer>,
}

/// An embedding or lm_head table: the kernels read [`GpuTable`] chunks, whose buffers are the
/// pieces' weights (f32 rows of a multiple of 4 values carry no padding).
pub(super) struct Table {
    pub table: GpuTable,
    pub grad: GpuGradTable,
    pub pieces: Vec<Piece>,
}

/// A linear: its latent matrix and the ternary codes derived from it after every update.
pub(super) struct Linear {
    pub piece: Piece,
    pub packed: GpuTernary,
}

pub(super) struct Layer {
    pub input_layernorm: Piece,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    /// `None` in a family without sub-norms (see [`crate::model::Family::has_sub_norms`]).
    pub attn_sub_norm: Option<Piece>,
    pub post_attention_layernorm: Piece,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
    pub ffn_sub_norm: Option<Piece>,
}

pub(super) struct GpuParams {
    pub embed: Table,
    pub layers: Vec<Layer>,
    pub norm: Piece,
    pub lm_head: Option<Table>,
}

/// The optimizer's moments of one tensor, as the host holds them (`None`: zeros).
type Moments<'a> = (Option<&'a [f32]>, Option<&'a [f32]>);

impl Piece {
    fn new(
        ctx: &GpuContext,
        w: wgpu::Buffer,
        grad: wgpu::Buffer,
        len: usize,
        adamw: bool,
        moments: Moments,
    ) -> Result<Self> {
        let state = |what: &str, values: Option<&[f32]>| match values {
            Some(values) => ctx.upload(what, values),
            // wgpu hands out buffers filled with zeros.
            None => ctx.storage(what, len as u64 * 4),
        };
        Ok(Piece {
            len,
            w,
            grad,
            m: state("optimizer moment", moments.0)?,
            v: if adamw {
                Some(state("optimizer second moment", moments.1)?)
            } else {
                None
            },
        })
    }

    fn vector(ctx: &GpuContext, values: &[f32], adamw: bool, moments: Moments) -> Result<Self> {
        let w = ctx.upload("latent weights", values)?;
        let grad = ctx.storage("gradient", values.len() as u64 * 4)?;
        Piece::new(ctx, w, grad, values.len(), adamw, moments)
    }
}

impl Table {
    fn new(
        ctx: &GpuContext,
        values: &[f32],
        c: &ModelConfig,
        adamw: bool,
        moments: Moments,
    ) -> Result<Self> {
        let (rows, cols) = (c.vocab_size, c.hidden_size);
        let table = GpuTable::upload_f32(ctx, values, rows, cols, TableStorage::F32)?;
        let grad = GpuGradTable::new(ctx, rows, cols)?;
        let layout = |chunks: &[crate::gpu::table::TableChunk]| -> Vec<(usize, usize)> {
            chunks.iter().map(|c| (c.first, c.rows)).collect()
        };
        if layout(table.chunks()) != layout(grad.chunks()) {
            return Err(Error::invalid(
                "training table",
                "the weights and the gradient are split into different chunks",
            ));
        }
        let pieces = table
            .chunks()
            .iter()
            .zip(grad.chunks())
            .map(|(w, g)| {
                let range = w.first * cols..(w.first + w.rows) * cols;
                let (first, second) = moments;
                let moments = (
                    first.map(|m| &m[range.clone()]),
                    second.map(|m| &m[range.clone()]),
                );
                Piece::new(
                    ctx,
                    w.buffer.clone(),
                    g.buffer.clone(),
                    range.len(),
                    adamw,
                    moments,
                )
            })
            .collect::<Result<_>>()?;
        Ok(Table {
            table,
            grad,
            pieces,
        })
    }
}

impl GpuParams {
    /// Uploads `model`'s latent weights and `optimizer`'s moments (zeros before its first
    /// step), and records the packing of every linear into `pass`.
    pub fn upload(
        ctx: &GpuContext,
        pass: &mut wgpu::ComputePass<'_>,
        model: &TrainModel,
        optimizer: &Optimizer,
    ) -> Result<Self> {
        let c = &model.config;
        if !c.hidden_size.is_multiple_of(4) {
            return Err(Error::invalid(
                "GPU training",
                format!(
                    "hidden_size {} is not a multiple of 4 (the embedding rows would be \
                     padded); train this model on the CPU",
                    c.hidden_size
                ),
            ));
        }
        let (adamw, first, second): (bool, Option<&Parameters>, Option<&Parameters>) =
            match optimizer {
                Optimizer::AdamW(a) => match a.state().0 {
                    Some((m, v)) => (true, Some(m), Some(v)),
                    None => (true, None, None),
                },
                Optimizer::Sgd(s) => (false, s.buffer(), None),
            };
        let p = &model.params;
        for state in [first, second].into_iter().flatten() {
            p.check_same_shape(state)?;
        }
        let moment =
            |pick: fn(&Parameters) -> &[f32]| -> Moments { (first.map(pick), second.map(pick)) };
        let shapes = linear_shapes(c);
        let embed = Table::new(ctx, &p.embed_tokens, c, adamw, moment(|q| &q.embed_tokens))?;
        let mut layers = Vec::with_capacity(p.layers.len());
        for (i, l) in p.layers.iter().enumerate() {
            let layer_moments = |pick: fn(&LayerParameters) -> &Vec<f32>| -> Moments {
                (
                    first.map(|q| &pick(&q.layers[i])[..]),
                    second.map(|q| &pick(&q.layers[i])[..]),
                )
            };
            let vector = |pick: fn(&LayerParameters) -> &Vec<f32>| {
                Piece::vector(ctx, pick(l), adamw, layer_moments(pick))
            };
            // `validate` made the sub-norms empty exactly where the family has none; wgpu has
            // no empty buffers.
            let sub_norm = |pick: fn(&LayerParameters) -> &Vec<f32>| {
                c.family.has_sub_norms().then(|| vector(pick)).transpose()
            };
            let mut linear = |index: usize, pick: fn(&LayerParameters) -> &Vec<f32>| {
                let (_, rows, cols) = shapes[index];
                let piece = Piece::vector(ctx, pick(l), adamw, layer_moments(pick))?;
                let packed = ternary_pack::record_from_buffer(
                    ctx,
                    pass,
                    &piece.w,
                    rows,
                    cols,
                    WeightQuantOptions::default(),
                )?;
                Ok::<_, Error>(Linear { piece, packed })
            };
            layers.push(Layer {
                q: linear(0, |l| &l.q_proj)?,
                k: linear(1, |l| &l.k_proj)?,
                v: linear(2, |l| &l.v_proj)?,
                o: linear(3, |l| &l.o_proj)?,
                gate: linear(4, |l| &l.gate_proj)?,
                up: linear(5, |l| &l.up_proj)?,
                down: linear(6, |l| &l.down_proj)?,
                input_layernorm: vector(|l| &l.input_layernorm)?,
                attn_sub_norm: sub_norm(|l| &l.attn_sub_norm)?,
                post_attention_layernorm: vector(|l| &l.post_attention_layernorm)?,
                ffn_sub_norm: sub_norm(|l| &l.ffn_sub_norm)?,
            });
        }
        let norm = Piece::vector(ctx, &p.norm, adamw, moment(|q| &q.norm))?;
        let lm_head = match &p.lm_head {
            Some(head) => Some(Table::new(
                ctx,
                head,
                c,
                adamw,
                (
                    first.and_then(|q| q.lm_head.as_deref()),
                    second.and_then(|q| q.lm_head.as_deref()),
                ),
            )?),
            None => None,
        };
        Ok(GpuParams {
            embed,
            layers,
            norm,
            lm_head,
        })
    }

    /// Every tensor's pieces, in the order of [`Parameters::tensors`] (which leaves out absent
    /// sub-norms too).
    pub fn tensors(&self) -> Vec<Vec<&Piece>> {
        let mut out = vec![self.embed.pieces.iter().collect()];
        for l in &self.layers {
            out.extend(
                [
                    Some(&l.input_layernorm),
                    Some(&l.q.piece),
                    Some(&l.k.piece),
                    Some(&l.v.piece),
                    Some(&l.o.piece),
                    l.attn_sub_norm.as_ref(),
                    Some(&l.post_attention_layernorm),
                    Some(&l.gate.piece),
                    Some(&l.up.piece),
                    Some(&l.down.piece),
                    l.ffn_sub_norm.as_ref(),
                ]
                .into_iter()
                .flatten()
                .map(|p| vec![p]),
            );
        }
        out.push(vec![&self.norm]);
        if let Some(head) = &self.lm_head {
            out.push(head.pieces.iter().collect());
        }
        out
    }

    pub fn pieces(&self) -> impl Iterator<Item = &Piece> {
        self.tensors().into_iter().flatten()
    }

    pub fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers
            .iter()
            .flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down])
    }

    /// Reads one buffer of every piece back into `into` (shaped as the model's parameters).
    pub async fn read(
        &self,
        ctx: &GpuContext,
        into: &mut Parameters,
        pick: fn(&Piece) -> Option<&wgpu::Buffer>,
    ) -> Result<()> {
        for (pieces, dst) in self.tensors().into_iter().zip(into.tensors_mut()) {
            let mut at = 0;
            for piece in pieces {
                let buffer = pick(piece).ok_or_else(|| {
                    Error::invalid("GPU training state", "a moment the optimizer does not keep")
                })?;
                let values: Vec<f32> = ctx.read(buffer, piece.len).await?;
                dst[at..at + piece.len].copy_from_slice(&values);
                at += piece.len;
            }
        }
        Ok(())
    }
}
