//! The BitNet b1.58 transformer (Hugging Face `BitNetForCausalLM`): configuration, weights in
//! memory, and the CPU reference forward with its KV cache.

mod config;
mod forward;
mod sampling;
mod weights;

pub use config::ModelConfig;
pub use forward::{KvCache, forward};
pub use sampling::{Sampler, SamplingParams};
pub use weights::{LayerWeights, ModelWeights};
