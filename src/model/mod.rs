//! The BitNet b1.58 transformer (Hugging Face `BitNetForCausalLM`): configuration, weights in
//! memory, the CPU reference forward with its KV cache, and the engines that run it.

mod config;
mod engine;
mod forward;
mod generator;
#[cfg(feature = "gpu")]
mod gpu;
mod layer;
mod load;
mod packed;
mod perplexity;
mod sampling;
mod schema;
mod source;
mod synthetic;
mod weights;

pub use crate::cpu::SamplingParams;
pub use config::ModelConfig;
pub use engine::{CpuEngine, Device, Engine, Logits};
pub use forward::{KvCache, forward};
pub use generator::{Generation, GenerationParams, Generator, Stop};
#[cfg(feature = "gpu")]
pub use gpu::{DecodePath, GpuModel};
#[cfg(not(target_arch = "wasm32"))]
pub use load::{ModelFiles, load_model};
pub use load::{OpenModel, load_model_from_bytes, open_model_from_bytes};
pub use packed::LmHead;
pub use perplexity::{Perplexity, perplexity_windows};
pub use sampling::Sampler;
pub use schema::{Activation, Family, LinearSpec, NormSpec};
pub(crate) use schema::{linear_shapes, sub_norm, sub_norm_backward};
pub use source::{BlockLayer, WeightSource, collect};
pub(crate) use source::{Checked, check_layer_index};
pub use synthetic::synthetic;
pub use weights::{LayerWeights, ModelWeights};
