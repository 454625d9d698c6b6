//! The CPU reference: every operation the shaders perform, in plain Rust. This is the
//! specification; each function here has a shader twin of the same name in `shaders/`.

mod act_quant;
mod argmax;
mod attention;
mod embedding;
mod lm_head;
mod nll;
mod norm_matmul;
mod relu2_gate;
mod rmsnorm;
mod rope;
mod ternary_matmul;
mod ternary_pack;
mod tree_sum;
mod weight_quant;

pub use act_quant::{QuantizedActivations, act_quant, quant_scale};
pub use argmax::argmax;
pub use attention::{AttentionShape, attention};
pub use embedding::embedding;
pub use lm_head::lm_head;
pub use nll::nll;
pub use norm_matmul::norm_matmul;
pub use relu2_gate::relu2_gate;
pub use rmsnorm::rmsnorm;
pub use rope::{rope, rope_inv_freq};
pub use ternary_matmul::{ternary_matmul, ternary_matmul_acc};
pub use ternary_pack::{PackedTernary, ternary_pack};
pub use tree_sum::tree_sum;
pub use weight_quant::{ScaleGranularity, TernaryWeights, WeightQuantOptions, weight_quant};
