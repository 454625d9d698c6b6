//! Faults while a model runs: a GPU device lost in the middle of generation, scoring or training
//! gives an error to the caller (no hang, no panic), and the process goes on with a new context.
//! Needs a GPU adapter (lavapipe will do) and fails loudly without one.
#![cfg(not(target_arch = "wasm32"))]

use bitnet_wgpu::Error;
use bitnet_wgpu::gpu::{GpuContext, TableStorage};
use bitnet_wgpu::model::{GpuModel, Logits, ModelConfig, synthetic};
use bitnet_wgpu::train::{AdamW, GpuTrainer, Optimizer, Quant, Schedule, TrainModel, Trainer};

fn context() -> GpuContext {
    pollster::block_on(GpuContext::new()).expect("GPU adapter required")
}

fn config() -> ModelConfig {
    bitnet_wgpu::train::run::tiny_config(258)
}

#[test]
fn a_lost_device_is_an_error_and_a_new_context_works() {
    let ctx = context();
    let weights = synthetic(&config(), 1);
    let mut model = GpuModel::new(&ctx, &weights, 64, TableStorage::F32).unwrap();
    let tokens = [1u32, 2, 3, 4];
    let before = pollster::block_on(model.forward(&ctx, &tokens, Logits::Last)).unwrap();
    model.reset();

    let model_config = config();
    let train = TrainModel::new(model_config, Quant::BitNet, 1).unwrap();
    let mut trainer = Trainer::new(
        train,
        Optimizer::AdamW(AdamW::default()),
        1e-3,
        Schedule::Constant { warmup: 0 },
    );
    let mut gpu = GpuTrainer::new(&ctx, &trainer, 8).unwrap();

    ctx.device.destroy();
    let lost = |what: &str, result: Result<(), Error>| match result {
        Err(Error::DeviceLost(reason)) => assert_eq!(reason, "destroyed", "{what}"),
        other => panic!("{what} after the device was lost: {other:?}"),
    };
    lost(
        "forward",
        pollster::block_on(model.forward(&ctx, &tokens, Logits::Last)).map(drop),
    );
    lost(
        "nll",
        pollster::block_on(model.nll(&ctx, &tokens)).map(drop),
    );
    lost(
        "a training step",
        pollster::block_on(gpu.step(&ctx, &mut trainer, &[&tokens])).map(drop),
    );
    assert_eq!(trainer.steps(), 0);
    assert_eq!(ctx.lost().as_deref(), Some("destroyed"));

    let fresh = context();
    let mut model = GpuModel::new(&fresh, &weights, 64, TableStorage::F32).unwrap();
    let after = pollster::block_on(model.forward(&fresh, &tokens, Logits::Last)).unwrap();
    assert_eq!(before, after);
}
