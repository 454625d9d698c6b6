//! The latent weights of a full-precision checkpoint: the input is its model.safetensors, beside
//! the seeds' config.json, read against a model of that config.
#![no_main]

use std::path::PathBuf;
use std::sync::LazyLock;

use bitnet_wgpu::formats::hf;
use bitnet_wgpu::train::checkpoint::load_latent;
use bitnet_wgpu::train::{Quant, TrainModel};
use bitnet_wgpu_fuzz::{MASTER_CONFIG, scratch_dir};
use libfuzzer_sys::fuzz_target;

static SETUP: LazyLock<(PathBuf, TrainModel)> = LazyLock::new(|| {
    let dir = scratch_dir("train_latent");
    std::fs::write(dir.join(hf::CONFIG_FILE), MASTER_CONFIG).expect("writing config.json");
    let config = hf::parse_config(MASTER_CONFIG).expect("the seed config.json");
    let template = TrainModel::new(config, Quant::BitNet, 0).expect("the seed model");
    (dir, template)
});

fuzz_target!(|data: &[u8]| {
    let (dir, template) = &*SETUP;
    std::fs::write(dir.join(hf::WEIGHTS_FILE), data).expect("writing model.safetensors");
    let _ = load_latent(dir, template);
});
