//! BitNet b1.58 on any GPU: ternary weights {-1, 0, +1} and 8-bit activations, computed by WGSL
//! compute shaders driven through wgpu (Vulkan, Metal, DX12, GL and WebGPU in the browser), with a
//! plain-Rust CPU reference of every operation.
//!
//! - [`cpu`]: the reference operations, the specification the shaders are tested against.
//! - [`packing`]: ternary code layouts (the private GPU layout, Hugging Face's offline layout,
//!   GGUF I2_S and 1.6-bit base-3 storage).
//! - [`gpu`]: the host layer: adapter selection, pipeline cache, buffers, kernels that record.
//! - [`model`]: the transformer, its CPU forward and engines; [`tokenizer`]: text <-> token ids.
//! - [`chat`]: chat templates and conversations that reuse the cache of earlier turns.
//! - [`train`]: training on the CPU (backward, optimizers, a training step), the reference.
//! - [`BitLinear`]: the drop-in layer, on the CPU or the GPU, saved and loaded with safetensors.

pub mod bitlinear;
pub mod chat;
pub mod convert;
pub mod cpu;
mod error;
pub mod formats;
#[cfg(feature = "gpu")]
pub mod gpu;
pub mod model;
pub mod packing;
pub mod rng;
#[cfg(all(feature = "serve", not(target_arch = "wasm32")))]
pub mod serve;
pub mod table;
pub mod tokenizer;
pub mod train;

pub use bitlinear::{BitLinear, MemoryFootprint, StorageFormat};
pub use error::{Error, Result};

/// README.md's example runs as a doc test, so the README cannot drift from the API.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
