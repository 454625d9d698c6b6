//! Training on the GPU: the step of [`Trainer::step`] with every operation in a shader, the
//! model's latent weights, gradients and optimizer state resident on the device.
//!
//! A step records, for each window of the batch, the forward (the inference kernels over the
//! window, keeping what the backward needs), the fused softmax cross-entropy, and the backward
//! (the `*_backward` kernels) adding each window's weight gradients into the step's; then the
//! global gradient norm. The losses and the norm come back (one read); when both are finite the
//! optimizer updates every tensor on the GPU and `ternary_pack` re-derives the ternary codes
//! into the buffers they already have. Nothing is allocated per step once the first step of the
//! longest window has run.
//!
//! ```
//! use bitnet_wgpu::gpu::GpuContext;
//! use bitnet_wgpu::model::ModelConfig;
//! use bitnet_wgpu::train::{AdamW, GpuTrainer, Optimizer, Quant, Schedule, TrainModel, Trainer};
//! # pollster::block_on(async {
//! let ctx = GpuContext::new().await.expect("a GPU adapter");
//! let mut config = ModelConfig::bitnet_b158_2b4t();
//! (config.vocab_size, config.hidden_size, config.intermediate_size) = (16, 8, 12);
//! (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) = (1, 2, 1);
//! config.head_dim = 4;
//! let model = TrainModel::new(config, Quant::BitNet, 1)?;
//! let mut trainer = Trainer::new(model, Optimizer::AdamW(AdamW::default()), 1e-2,
//!                                Schedule::Constant { warmup: 0 });
//! let mut gpu = GpuTrainer::new(&ctx, &trainer, 5)?;
//! let report = gpu.step(&ctx, &mut trainer, &[&[1, 2, 3, 4, 5], &[5, 4, 3, 2, 1]]).await?;
//! assert!(report.loss > 0.0 && report.grad_norm > 0.0);
//! gpu.read_into(&ctx, &mut trainer).await?; // the trained weights, back on the host
//! assert_eq!(trainer.steps(), 1);
//! # Ok::<(), bitnet_wgpu::Error>(())
//! # }).unwrap();
//! ```

mod record;
mod state;
mod tape;

use record::{Window, record_window};
use state::GpuParams;
use tape::Tape;

use super::{AdamWStep, Optimizer, Quant, StepReport, Trainer};
use crate::cpu::WeightQuantOptions;
use crate::gpu::{GpuContext, optim, ternary_pack};
use crate::{Error, Result};

/// A [`Trainer`]'s model and optimizer state on the GPU, stepping as [`Trainer::step`] does.
///
/// The trainer keeps the hyper-parameters (rate, schedule, clipping, the optimizer's betas) and
/// the step count; its weights and moments are stale between [`GpuTrainer::new`] and
/// [`GpuTrainer::read_into`].
pub struct GpuTrainer {
    params: GpuParams,
    tape: Tape,
    /// One token buffer per window of the largest batch so far.
    tokens: Vec<wgpu::Buffer>,
    losses: wgpu::Buffer,
    /// `[norm, clipping coefficient]`.
    norm: wgpu::Buffer,
    /// Each piece's update factors, rewritten every step.
    uniforms: Vec<optim::UpdateUniform>,
    /// Updates applied: AdamW's step count, and whether SGD's momentum has a history.
    updates: u32,
}

impl GpuTrainer {
    /// Uploads `trainer`'s latent weights and optimizer state, with room for windows of up to
    /// `max_window` tokens. Errors: a model not quantized with [`Quant::BitNet`] (full-precision
    /// training runs on the CPU), a `hidden_size` that is not a multiple of 4, a window longer
    /// than the model's positions, tensors beyond the adapter's limits.
    pub fn new(ctx: &GpuContext, trainer: &Trainer, max_window: usize) -> Result<Self> {
        let model = &trainer.model;
        model.validate()?;
        if model.quant != Quant::BitNet {
            return Err(Error::invalid(
                "GPU training",
                "full-precision linears (--quant none) train on the CPU",
            ));
        }
        let c = &model.config;
        if max_window < 2 || max_window > c.max_position_embeddings {
            return Err(Error::invalid(
                "training window",
                format!(
                    "{max_window} tokens: between 2 and max_position_embeddings {}",
                    c.max_position_embeddings
                ),
            ));
        }
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        let mut pass = encoder.begin_compute_pass(&Default::default());
        let params = GpuParams::upload(ctx, &mut pass, model, &trainer.optimizer)?;
        drop(pass);
        ctx.queue.submit([encoder.finish()]);
        let updates = match &trainer.optimizer {
            Optimizer::AdamW(a) => a.state().1,
            Optimizer::Sgd(s) => u32::from(s.buffer().is_some()),
        };
        let uniforms = params
            .pieces()
            .map(|_| optim::UpdateUniform::new(ctx))
            .collect();
        let trainer = GpuTrainer {
            uniforms,
            params,
            tape: Tape::new(ctx, c, max_window - 1)?,
            tokens: Vec::new(),
            losses: ctx.storage("training losses", 4)?,
            norm: ctx.storage("gradient norm", 8)?,
            updates,
        };
        ctx.check()?;
        Ok(trainer)
    }

    /// One optimizer step on a batch of token windows, as [`Trainer::step`] computes it: the
    /// batch's mean loss before the update, the global gradient norm before clipping, the rate
    /// of `trainer`'s schedule; `trainer`'s step count advances.
    ///
    /// Errors as [`Trainer::step`] (a loss or gradient norm that is NaN or infinite leaves the
    /// weights and the optimizer as they were), and a window longer than the `max_window` of
    /// [`GpuTrainer::new`].
    pub async fn step(
        &mut self,
        ctx: &GpuContext,
        trainer: &mut Trainer,
        windows: &[&[u32]],
    ) -> Result<StepReport> {
        let count = trainer.model.check_windows(windows)?;
        if let Some(w) = windows.iter().find(|w| w.len() - 1 > self.tape.rows) {
            return Err(Error::invalid(
                "training window",
                format!(
                    "{} tokens, and the GPU trainer was made for at most {}",
                    w.len(),
                    self.tape.rows + 1
                ),
            ));
        }
        self.reserve(ctx, windows, count)?;
        let c = &trainer.model.config;
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        for piece in self.params.pieces() {
            encoder.clear_buffer(&piece.grad, 0, None);
        }
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            let mut loss_offset = 0;
            for (window, tokens) in windows.iter().zip(&self.tokens) {
                ctx.queue
                    .write_buffer(tokens, 0, bytemuck::cast_slice(window));
                let window = Window {
                    tokens,
                    rows: window.len() - 1,
                    losses: &self.losses,
                    loss_offset,
                    grad_scale: 1.0 / count as f32,
                };
                record_window(ctx, &mut pass, c, &self.params, &self.tape, &window)?;
                loss_offset += window.rows;
            }
            let grads: Vec<_> = self.params.pieces().map(|p| (&p.grad, p.len)).collect();
            let max_norm = trainer.max_grad_norm.unwrap_or(f32::INFINITY);
            optim::record_grad_norm(ctx, &mut pass, &grads, max_norm, &self.norm)?;
        }
        ctx.queue.submit([encoder.finish()]);
        let losses: Vec<f32> = ctx.read(&self.losses, count).await?;
        let norm: Vec<f32> = ctx.read(&self.norm, 2).await?;
        let loss = losses.iter().map(|&l| f64::from(l)).sum::<f64>() / count as f64;
        if !loss.is_finite() {
            return Err(Error::invalid(
                "training loss",
                format!("{loss} (not a finite number)"),
            ));
        }
        let grad_norm = norm[0];
        if !grad_norm.is_finite() {
            return Err(Error::invalid(
                "gradient norm",
                format!("{grad_norm} (not a finite number; the loss was {loss})"),
            ));
        }

        let lr = trainer.lr * trainer.schedule.factor(trainer.steps());
        let clip = trainer.max_grad_norm.map(|_| &self.norm);
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            for (piece, uniform) in self.params.pieces().zip(&self.uniforms) {
                match &trainer.optimizer {
                    Optimizer::AdamW(a) => {
                        let step = AdamWStep::new(a, lr, self.updates + 1);
                        let v = piece.v.as_ref().ok_or_else(|| {
                            Error::invalid("GPU trainer", "made for SGD, stepped with AdamW")
                        })?;
                        optim::record_adamw(
                            ctx,
                            &mut pass,
                            Some(uniform),
                            &piece.w,
                            &piece.grad,
                            &piece.m,
                            v,
                            piece.len,
                            &step,
                            clip,
                        )?;
                    }
                    Optimizer::Sgd(s) => optim::record_sgd(
                        ctx,
                        &mut pass,
                        Some(uniform),
                        &piece.w,
                        &piece.grad,
                        &piece.m,
                        piece.len,
                        s,
                        lr,
                        self.updates == 0,
                        clip,
                    )?,
                }
            }
            for linear in self.params.linears() {
                ternary_pack::record_into(
                    ctx,
                    &mut pass,
                    &linear.piece.w,
                    &linear.packed,
                    WeightQuantOptions::default(),
                )?;
            }
        }
        ctx.queue.submit([encoder.finish()]);
        ctx.check()?;
        self.updates += 1;
        trainer.set_steps(trainer.steps() + 1);
        Ok(StepReport {
            loss,
            grad_norm,
            lr,
        })
    }

    /// Reads the latent weights and the optimizer's moments back into `trainer` (for
    /// evaluation, export and checkpoints).
    pub async fn read_into(&self, ctx: &GpuContext, trainer: &mut Trainer) -> Result<()> {
        let mut params = trainer.model.params.clone();
        self.params.read(ctx, &mut params, |p| Some(&p.w)).await?;
        let mut first = params.zeros_like();
        self.params.read(ctx, &mut first, |p| Some(&p.m)).await?;
        match &mut trainer.optimizer {
            Optimizer::AdamW(a) => {
                let mut second = params.zeros_like();
                self.params.read(ctx, &mut second, |p| p.v.as_ref()).await?;
                let moments = (self.updates > 0).then_some((first, second));
                a.restore(moments, self.updates);
            }
            Optimizer::Sgd(s) => s.restore((self.updates > 0).then_some(first)),
        }
        trainer.model.params = params;
        Ok(())
    }

    /// Token buffers for every window and room for every loss of the batch.
    fn reserve(&mut self, ctx: &GpuContext, windows: &[&[u32]], count: usize) -> Result<()> {
        while self.tokens.len() < windows.len() {
            let bytes = (self.tape.rows + 1) as u64 * 4;
            self.tokens.push(ctx.storage("training tokens", bytes)?);
        }
        if self.losses.size() < count as u64 * 4 {
            self.losses = ctx.storage("training losses", count as u64 * 4)?;
        }
        Ok(())
    }
}
