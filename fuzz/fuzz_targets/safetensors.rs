//! A safetensors file's header and tensor table (and the tensors they describe), read as the
//! weights of the seeds' small model, both as the packed checkpoint and as a full-precision one.
#![no_main]

use bitnet_wgpu::formats::hf;
use bitnet_wgpu_fuzz::{MASTER_CONFIG, PACKED_CONFIG};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for config in [PACKED_CONFIG, MASTER_CONFIG] {
        let _ = hf::load_from_bytes(config, &[data]);
    }
});
