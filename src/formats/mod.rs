//! File formats: edges that turn files into the in-memory types ([`crate::model::ModelWeights`],
//! ternary codes and scales) and back. The GPU layout stays private to [`crate::gpu`].

pub mod gguf;
pub mod hf;
pub mod scale;
