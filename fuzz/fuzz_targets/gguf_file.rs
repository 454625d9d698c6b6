//! A GGUF file's header, metadata and tensor infos, and every accessor on what they describe.
#![no_main]

use bitnet_wgpu::formats::gguf::{self, GgufFile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(file) = GgufFile::parse(data) else {
        return;
    };
    for (key, _) in &file.metadata {
        let _ = file.get_u32(key);
        let _ = file.get_f32(key);
        let _ = file.get_bool(key);
        let _ = file.get_str(key);
        let _ = file.get_string_array(key);
        let _ = file.get_i32_array(key);
    }
    for info in &file.tensors {
        let _ = info.element_count();
        let _ = file.tensor_bytes(info);
        let _ = file.tensor_f32(info);
        let _ = file.tensor_ternary(info);
    }
    let _ = gguf::tokenizer(&file);
});
