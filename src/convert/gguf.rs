//! [`convert_to_gguf`]: a checkpoint folder to one GGUF file by bitnet.cpp's rules, so that a model
//! made or tuned here runs in bitnet.cpp, 0xBitNet and tritium.

use std::path::Path;

use super::Progress;
use super::dir::{Written, refusal, resolve};
use crate::formats::gguf::{GgufTokenizer, TableType, check_bitnet_cpp_rows, write_model};
use crate::model::load_model;
use crate::{Error, Result};

/// What [`convert_to_gguf`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufConversion {
    /// Bytes of the GGUF file.
    pub bytes: u64,
    /// The tokenizer written into it (`None` for a tiny model without a tokenizer.json).
    pub tokenizer: Option<GgufTokenizer>,
}

/// Which I2_S row lengths [`convert_to_gguf`] writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RowLengths {
    /// Only rows bitnet.cpp computes correctly ([`check_bitnet_cpp_rows`]); others are refused.
    BitnetCpp,
    /// Any length: files this project (and its page) read, but bitnet.cpp misreads.
    Any,
}

/// Converts the checkpoint folder `input` (anything `bitnet generate` loads from a folder: offline
/// packed in either layout, or full precision, quantized per tensor at load as transformers'
/// online `AutoBitLinear` does) into the GGUF file `output`: architecture `bitnet-b1.58`, linears
/// as I2_S with the scale as a multiplier, F16 embedding tables, F32 norms, and the tokenizer
/// with an explicit `add_bos_token` ([`crate::tokenizer::Tokenizer::to_gguf`]).
///
/// The token list is padded to the vocabulary with `[PAD{id}]` tokens of the unused type, as
/// llama.cpp's converter does (bitnet.cpp refuses a list shorter than the embedding table).
///
/// Refused before anything is written: `output` inside `input`, an existing `output`, a model
/// whose rows bitnet.cpp would misread ([`check_bitnet_cpp_rows`]: hidden_size,
/// intermediate_size and the attention width must be multiples of 128) unless `rows` is
/// [`RowLengths::Any`], a tokenizer GGUF cannot
/// express or with more tokens than the vocabulary, and every error of loading. The file is written under a temporary name, synced and renamed.
pub fn convert_to_gguf(
    input: &Path,
    output: &Path,
    rows: RowLengths,
    progress: &mut dyn FnMut(Progress),
) -> Result<GgufConversion> {
    if resolve(output)?.starts_with(resolve(input)?) {
        return Err(Error::invalid(
            "output file",
            "it is inside the input folder; convert never writes into its input",
        ));
    }
    if output.exists() {
        return Err(refusal(output, "already exists; convert never overwrites"));
    }
    if !input.is_dir() {
        return Err(Error::invalid(
            "input",
            format!("{} is not a checkpoint folder", input.display()),
        ));
    }
    let (weights, tokenizer) = load_model(input)?;
    if rows == RowLengths::BitnetCpp {
        check_bitnet_cpp_rows(&weights.config).map_err(|e| {
            Error::invalid(
                "convert --format gguf",
                format!("{e} (--any-row-length writes it anyway, for this project's engines)"),
            )
        })?;
    }
    let has_vocabulary = input.join("tokenizer.json").is_file();
    let tokenizer = has_vocabulary.then(|| tokenizer.to_gguf()).transpose()?;
    let bytes = write_model(&weights, tokenizer.as_ref(), TableType::F16)?;
    drop(weights);
    let (folder, name) = match (output.parent(), output.file_name().and_then(|n| n.to_str())) {
        // A bare file name has an empty parent: the current folder.
        (Some(folder), Some(name)) if folder.as_os_str().is_empty() => (Path::new("."), name),
        (Some(folder), Some(name)) => (folder, name),
        _ => {
            return Err(Error::invalid(
                "output file",
                format!("{} does not name a file", output.display()),
            ));
        }
    };
    let mut written = Written::default();
    let result = written
        .create_dir(folder)
        .and_then(|()| written.write(folder, name, &bytes, progress));
    if let Err(e) = result {
        written.roll_back();
        return Err(e);
    }
    Ok(GgufConversion {
        bytes: bytes.len() as u64,
        tokenizer,
    })
}
