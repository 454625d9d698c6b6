//! What the fuzz targets share: the framing of inputs that hold several files, the fixed inputs
//! some targets pair the fuzzed bytes with (taken from the seed corpus, which
//! `tests/fuzz_seeds.rs` writes with the project's own writers), and a scratch folder for the
//! readers that take a path.

use std::path::PathBuf;

/// config.json of the seeds' packed model (`fuzz/seeds/safetensors/packed.safetensors`).
pub const PACKED_CONFIG: &str = include_str!("../seeds/config_json/small.json");
/// config.json of the seeds' full-precision export (`fuzz/seeds/train_latent/`).
pub const MASTER_CONFIG: &str = include_str!("../seeds/config_json/master.json");
/// tokenizer.json of a byte-level BPE trained by `bitnet_wgpu::train::bpe`.
pub const BPE_TOKENIZER: &[u8] = include_bytes!("../seeds/tokenizer_json/bpe.json");

/// The parts of `data`: each is its length (u32, little-endian) followed by its bytes; a length
/// beyond the end takes what is left.
pub fn frames(mut data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    while let Some((len, rest)) = data.split_first_chunk::<4>() {
        let len = (u32::from_le_bytes(*len) as usize).min(rest.len());
        parts.push(&rest[..len]);
        data = &rest[len..];
    }
    parts
}

/// An empty folder of this process's own, for a target to write its input into.
pub fn scratch_dir(target: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bitnet-fuzz-{target}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating the fuzz scratch folder");
    dir
}
