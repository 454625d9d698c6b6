//! File formats: edges that turn files into the in-memory types ([`crate::model::ModelWeights`],
//! ternary codes and scales) and back. The GPU layout stays private to [`crate::gpu`].

pub mod gguf;
pub mod hf;
pub mod scale;

use crate::model::ModelConfig;
use crate::{Error, Result};

/// Errors unless a file holding `tensors` tensors can hold every layer `config` claims, each of
/// `per_layer` tensors: a header's layer count is checked against what the file holds before
/// anything is sized by it.
pub(crate) fn check_layer_count(
    config: &ModelConfig,
    per_layer: usize,
    tensors: usize,
    file: &'static str,
) -> Result<()> {
    let layers = config.num_hidden_layers;
    if layers > tensors / per_layer.max(1) {
        return Err(Error::invalid(
            file,
            format!(
                "the configuration claims {layers} layers of {per_layer} tensors each, but the \
                 model's files hold {tensors} tensors in all"
            ),
        ));
    }
    Ok(())
}
