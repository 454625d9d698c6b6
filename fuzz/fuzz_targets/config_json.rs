//! config.json: any text is a config or an error, and a config reads back from what
//! `config_json` writes for it.
#![no_main]

use bitnet_wgpu::formats::hf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = hf::parse_checkpoint_config(text);
    if let Ok(config) = hf::parse_config(text)
        && let Ok(written) = hf::config_json(&config)
    {
        assert_eq!(hf::parse_config(&written).ok(), Some(config), "{written}");
    }
});
