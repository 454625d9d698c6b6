//! Training, on the CPU: the readable reference of the backward pass, the optimizers and a
//! training step, which faster paths are tested against.
//!
//! A [`TrainModel`] holds latent f32 weights for every linear, norm and embedding. Its forward is
//! the inference forward over whole windows (under [`Quant::BitNet`] the same int8 x ternary
//! products), keeping what the backward needs; the loss is transformers' causal-LM loss; the
//! backward runs the `cpu::*_backward` twins in reverse, passing gradients straight through both
//! quantizers (STE). [`Trainer::step`] adds gradient accumulation, torch's global norm clipping
//! and an [`Optimizer`] (torch's AdamW or SGD) at a [`Schedule`]d rate. [`TrainModel::to_weights`]
//! hands the result to the inference code.
//!
//! Natively, [`run::train`] is a whole run as `bitnet train` drives it: [`data`] (text files to
//! token windows in a resumable order), [`bpe`] (a tokenizer trained on the data),
//! [`checkpoint`] (the resumable state and the packed and full-precision exports, written
//! atomically) and the loss curve.
//!
//! ```
//! use bitnet_wgpu::model::ModelConfig;
//! use bitnet_wgpu::train::{AdamW, Optimizer, Quant, Schedule, TrainModel, Trainer};
//! let mut config = ModelConfig::bitnet_b158_2b4t();
//! (config.vocab_size, config.hidden_size, config.intermediate_size) = (16, 8, 12);
//! (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) = (1, 2, 1);
//! config.head_dim = 4;
//! let model = TrainModel::new(config, Quant::BitNet, 1)?;
//! let mut trainer = Trainer::new(model, Optimizer::AdamW(AdamW::default()), 1e-2,
//!                                Schedule::Constant { warmup: 0 });
//! let report = trainer.step(&[&[1, 2, 3, 4, 5], &[5, 4, 3, 2, 1]])?;
//! assert!(report.loss > 0.0 && report.grad_norm > 0.0);
//! # Ok::<(), bitnet_wgpu::Error>(())
//! ```

mod backward;
#[cfg(not(target_arch = "wasm32"))]
pub mod bpe;
#[cfg(not(target_arch = "wasm32"))]
pub mod checkpoint;
pub mod data;
#[cfg(not(target_arch = "wasm32"))]
mod fast;
mod forward;
#[cfg(feature = "gpu")]
mod gpu;
mod linear;
mod model;
mod optim;
mod params;
#[cfg(not(target_arch = "wasm32"))]
mod plot;
#[cfg(not(target_arch = "wasm32"))]
pub mod run;
mod schedule;
#[cfg(test)]
mod testing;
mod trainer;

#[cfg(feature = "gpu")]
pub use gpu::GpuTrainer;
pub use linear::Quant;
pub use model::TrainModel;
pub use optim::{AdamW, AdamWStep, Optimizer, Sgd, adamw_tensor, clip_grad_norm, sgd_tensor};
pub use params::{LayerParameters, Parameters};
pub use schedule::Schedule;
pub use trainer::{StepReport, Trainer};
