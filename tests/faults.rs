//! Faults while a model runs: a GPU device lost in the middle of generation, scoring or training
//! gives an error to the caller (no hang, no panic), and the process goes on with a new context.
//! Needs a GPU adapter (lavapipe will do) and fails loudly without one.
#![cfg(not(target_arch = "wasm32"))]

use bitnet_wgpu::Error;
use bitnet_wgpu::gpu::{GpuContext, TableStorage};
use bitnet_wgpu::model::{GpuModel, Logits, ModelConfig, synthetic};
use bitnet_wgpu::train::{AdamW, GpuTrainer, Optimizer, Quant, Schedule, TrainModel, Trainer};

fn context() -> GpuContext {
    let ctx = pollster::block_on(GpuContext::new()).expect("GPU adapter required");
    let info = ctx.adapter_info();
    eprintln!(
        "adapter: {} ({:?}, {:?})",
        info.name, info.backend, info.device_type
    );
    ctx
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

/// The types a server shares between threads.
#[test]
fn shared_types_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<GpuContext>();
    send_sync::<GpuModel>();
    send_sync::<bitnet_wgpu::model::ModelWeights>();
    send_sync::<bitnet_wgpu::tokenizer::Tokenizer>();
    send_sync::<GpuTrainer>();
    send::<bitnet_wgpu::model::Engine>();
    send::<bitnet_wgpu::model::Generator>();
}

/// 40 greedy tokens of `model` after a fixed prompt.
fn greedy(ctx: &GpuContext, model: &mut GpuModel) -> Vec<u32> {
    model.reset();
    pollster::block_on(model.greedy(ctx, &[1, 2, 3, 4, 5], 40, 258, |_| true)).unwrap()
}

#[test]
fn two_models_on_one_context_and_two_threads_generate_as_each_alone() {
    let ctx = context();
    let (a, b) = (synthetic(&config(), 11), synthetic(&config(), 12));
    let mut model_a = GpuModel::new(&ctx, &a, 64, TableStorage::F32).unwrap();
    let mut model_b = GpuModel::new(&ctx, &b, 64, TableStorage::F32).unwrap();
    let alone_a = greedy(&ctx, &mut model_a);
    let alone_b = greedy(&ctx, &mut model_b);
    assert_ne!(alone_a, alone_b, "two models with different weights");

    // Interleaved on one thread: each keeps its own cache.
    model_a.reset();
    model_b.reset();
    let (mut ta, mut tb) = (vec![1u32, 2, 3, 4, 5], vec![1u32, 2, 3, 4, 5]);
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    for _ in 0..40 {
        let la = pollster::block_on(model_a.forward(&ctx, &ta, Logits::Last)).unwrap();
        let lb = pollster::block_on(model_b.forward(&ctx, &tb, Logits::Last)).unwrap();
        let pick = |l: &[f32]| bitnet_wgpu::cpu::argmax(&l[l.len() - 258..]).unwrap();
        let (na, nb) = (pick(&la), pick(&lb));
        got_a.push(na);
        got_b.push(nb);
        (ta, tb) = (vec![na], vec![nb]);
    }
    assert_eq!((&got_a, &got_b), (&alone_a, &alone_b));

    // Two threads at once, sharing the context.
    let (ctx_a, ctx_b) = (&ctx, &ctx);
    let (thread_a, thread_b) = std::thread::scope(|s| {
        let ha = s.spawn(move || greedy(ctx_a, &mut model_a));
        let hb = s.spawn(move || greedy(ctx_b, &mut model_b));
        (ha.join().unwrap(), hb.join().unwrap())
    });
    assert_eq!((thread_a, thread_b), (alone_a, alone_b));
}
