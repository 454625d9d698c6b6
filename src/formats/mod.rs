//! File formats: edges that turn files into the in-memory types ([`crate::model::ModelWeights`],
//! ternary codes and scales) and back. The GPU layout stays private to [`crate::gpu`].

pub mod gguf;
pub mod hf;
pub mod scale;

use crate::model::ModelConfig;
use crate::{Error, Result};

/// The file at `path`, mapped read-only into memory.
#[cfg(not(target_arch = "wasm32"))]
pub fn map(path: impl AsRef<std::path::Path>) -> Result<memmap2::Mmap> {
    let path = path.as_ref();
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    // SAFETY: the mapping is read-only and lives as long as the bytes borrowed from it. Another
    // program truncating or rewriting the file while it is mapped would change or remove bytes
    // under the reader (a SIGBUS, or values that change between reads), as for every reader that
    // maps its model (llama.cpp's among them); a model file is not expected to change in use.
    unsafe { memmap2::Mmap::map(&file) }.map_err(io)
}

/// Lets go of the pages of `map` (a [`map`]ped file) that this process has read: the page cache
/// keeps them, and a later read maps them again. A reader that has copied what it needs calls
/// this, so that its memory does not grow by the file's size.
#[cfg(not(target_arch = "wasm32"))]
pub(crate) fn release(map: &memmap2::Mmap) {
    // SAFETY: the mapping is a read-only shared mapping of a file: after MADV_DONTNEED a read
    // faults the page in again from the page cache, the same bytes (unlike a private or anonymous
    // mapping's, which would come back zeroed), so the slices borrowed from it stay valid. An
    // error (or a system without the advice) leaves the pages mapped, which is as correct.
    #[cfg(unix)]
    let _ = unsafe { map.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
    #[cfg(not(unix))]
    let _ = map;
}

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
