//! The CPU reference: every operation the shaders perform, in plain Rust. This is the
//! specification; each function here has a shader twin of the same name in `shaders/`. The
//! `*_backward` functions are the gradients training needs, each beside its forward. [`fast`]
//! holds the CPU engine's kernels, each equal to its reference twin bit for bit.

mod act_quant;
mod argmax;
mod attention;
mod embedding;
pub mod fast;
#[cfg(test)]
pub(crate) mod gradcheck;
mod lm_head;
mod nll;
mod norm_matmul;
mod relu2_gate;
pub(crate) mod rmsnorm;
mod rope;
mod sampling;
mod silu_gate;
mod ternary_matmul;
mod ternary_pack;
mod tree_sum;
mod weight_quant;

pub use act_quant::{QuantizedActivations, act_quant, quant_scale};
pub use argmax::argmax;
pub use attention::{AttentionShape, attention, attention_backward};
pub use embedding::{embedding, embedding_backward};
pub(crate) use lm_head::first_largest;
pub use lm_head::{
    INT8_HEAD_BLOCK, Int8Table, ScreenBound, int8_table, lm_head, lm_head_backward, lm_head_int8,
    lm_head_screened, quantize_int8,
};
pub use nll::{cross_entropy, nll};
pub use norm_matmul::norm_matmul;
pub use relu2_gate::{relu2_gate, relu2_gate_backward};
pub use rmsnorm::{rmsnorm, rmsnorm_backward};
pub use rope::{rope, rope_backward, rope_inv_freq};
pub use sampling::{SamplingParams, sample};
pub use silu_gate::{silu_gate, silu_gate_backward};
pub use ternary_matmul::{ternary_matmul, ternary_matmul_acc, ternary_matmul_backward};
pub use ternary_pack::{PackedTernary, ternary_pack};
pub use tree_sum::tree_sum;
pub use weight_quant::{ScaleGranularity, TernaryWeights, WeightQuantOptions, weight_quant};
