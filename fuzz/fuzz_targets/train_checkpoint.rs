//! The training checkpoint reader: the input is the checkpoint's state file, read back with
//! either optimizer.
#![no_main]

use std::path::PathBuf;
use std::sync::LazyLock;

use bitnet_wgpu::train::checkpoint::{STATE_FILE, load_checkpoint};
use bitnet_wgpu::train::{AdamW, Optimizer, Sgd};
use bitnet_wgpu_fuzz::scratch_dir;
use libfuzzer_sys::fuzz_target;

static DIR: LazyLock<PathBuf> = LazyLock::new(|| scratch_dir("train_checkpoint"));

fuzz_target!(|data: &[u8]| {
    std::fs::write(DIR.join(STATE_FILE), data).expect("writing the state file");
    let _ = load_checkpoint(&DIR, Optimizer::AdamW(AdamW::default()));
    let _ = load_checkpoint(&DIR, Optimizer::Sgd(Sgd::new(0.9, 0.0)));
});
