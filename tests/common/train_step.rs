//! Whole training steps on the GPU (`train::GpuTrainer`) against the CPU's (`TrainModel::
//! loss_and_gradients`, `Trainer::step`): the forward is bit-exact, so losses agree to the f32
//! rounding of the per-prediction losses; gradients and updates agree within the f32 rounding
//! of sums taken in another order. Every model family: BitNet's squared ReLU and sub-norms,
//! Llama's SiLU without them, 1bitLLM's SiLU with them.

use bitnet_wgpu::gpu::GpuContext;
use bitnet_wgpu::model::{Family, ModelConfig};
use bitnet_wgpu::train::{
    AdamW, GpuTrainer, Optimizer, Parameters, Quant, Schedule, Sgd, TrainModel, Trainer,
};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// vocab 37, hidden 12, 2 layers of 3 heads over 1 kv head of 4, intermediate 20: sizes that
/// divide by none of the kernels' tiles.
fn config(family: Family, tied: bool) -> ModelConfig {
    ModelConfig {
        family,
        vocab_size: 37,
        hidden_size: 12,
        intermediate_size: 20,
        num_hidden_layers: 2,
        num_attention_heads: 3,
        num_key_value_heads: 1,
        head_dim: 4,
        max_position_embeddings: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        tie_word_embeddings: tied,
        bos_token_id: None,
        eos_token_id: None,
    }
}

/// Every tensor redrawn far from the initialization (norms in [0.5, 1.5), the rest in
/// [-0.5, 0.5)), so that every gradient carries a signal well above float noise.
fn scrambled(family: Family, tied: bool, seed: u64) -> TrainModel {
    let mut model = TrainModel::new(config(family, tied), Quant::BitNet, seed).unwrap();
    let mut rng = SmallRng::seed_from_u64(seed);
    let names: Vec<String> = model.params.tensors().into_iter().map(|(n, _)| n).collect();
    for (name, t) in names.iter().zip(model.params.tensors_mut()) {
        let centre = if name.contains("norm") { 1.0 } else { 0.0 };
        t.iter_mut()
            .for_each(|v| *v = centre + rng.random_range(-0.5..0.5));
    }
    model
}

/// Windows of 9, 2 and 16 tokens (the longest the model has), with the first and last ids.
fn windows(rng: &mut SmallRng) -> Vec<Vec<u32>> {
    [9, 2, 16]
        .map(|n| {
            let mut w: Vec<u32> = (0..n).map(|_| rng.random_range(0..37)).collect();
            w[0] = 0;
            w[n - 1] = 36;
            w
        })
        .to_vec()
}

fn largest(values: &[f32]) -> f32 {
    values.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// Per tensor, every element within `rel` of the tensor's largest magnitude (plus `abs`).
fn assert_tensors_close(gpu: &Parameters, cpu: &Parameters, rel: f32, abs: f32, what: &str) {
    for ((name, g), (_, c)) in gpu.tensors().into_iter().zip(cpu.tensors()) {
        let tol = rel * largest(c) + abs;
        for (i, (a, b)) in g.iter().zip(c).enumerate() {
            assert!(
                (a - b).abs() <= tol,
                "{what} {name}[{i}]: gpu {a} cpu {b} (tol {tol})"
            );
        }
    }
}

fn assert_rel(gpu: f64, cpu: f64, rel: f64, what: &str) {
    assert!(
        (gpu - cpu).abs() <= rel * cpu.abs(),
        "{what}: gpu {gpu} cpu {cpu}"
    );
}

/// One SGD step at rate 1 with no momentum, decay or clipping moves each weight by exactly its
/// gradient: the GPU's gradients, read back through the weights, against the CPU reference.
pub async fn train_step_gradients_match_cpu(ctx: &GpuContext) {
    let mut rng = SmallRng::seed_from_u64(7);
    for (family, tied) in Family::ALL
        .into_iter()
        .flat_map(|f| [(f, true), (f, false)])
    {
        let what = format!("{family:?} tied {tied}");
        let model = scrambled(family, tied, 11 + tied as u64);
        let owned = windows(&mut rng);
        let batch: Vec<&[u32]> = owned.iter().map(|w| &w[..]).collect();
        let (cpu_loss, cpu_grads) = model.loss_and_gradients(&batch).unwrap();

        let sgd = Optimizer::Sgd(Sgd::new(0.0, 0.0));
        let mut trainer = Trainer::new(model.clone(), sgd, 1.0, Schedule::Constant { warmup: 0 });
        let mut gpu = GpuTrainer::new(ctx, &trainer, 16).unwrap();
        let report = gpu.step(ctx, &mut trainer, &batch).await.unwrap();
        gpu.read_into(ctx, &mut trainer).await.unwrap();
        let mut gpu_grads = model.params.clone();
        gpu_grads.add_scaled(&trainer.model.params, -1.0).unwrap();

        assert_rel(report.loss, cpu_loss, 1e-5, &format!("{what} loss"));
        assert_rel(
            f64::from(report.grad_norm),
            f64::from(cpu_grads.global_norm()),
            1e-4,
            &format!("{what} gradient norm"),
        );
        // w - (w - g) recovers g to within an ulp of w (|w| < 1.5).
        assert_tensors_close(&gpu_grads, &cpu_grads, 1e-3, 3e-7, &what);
        assert!(cpu_grads.tensors().iter().all(|(_, g)| largest(g) > 1e-4));
        assert_eq!(trainer.steps(), 1);
    }
}

/// A few steps of AdamW with clipping and a schedule, or SGD with momentum and decay: the
/// losses of each step, the updated weights and the optimizer's moments against the CPU's;
/// then the next step's loss against the CPU forward of the read-back weights, which proves the
/// ternary codes were re-derived from them exactly.
pub async fn train_steps_match_cpu(ctx: &GpuContext) {
    let mut rng = SmallRng::seed_from_u64(8);
    let schedule = Schedule::Cosine {
        warmup: 1,
        total: 5,
        min_ratio: 0.1,
    };
    let cases = Family::ALL.into_iter().flat_map(|family| {
        [
            (false, Optimizer::AdamW(AdamW::new(0.9, 0.95, 1e-8, 0.1))),
            (true, Optimizer::Sgd(Sgd::new(0.9, 0.01))),
        ]
        .map(|(tied, optimizer)| (family, tied, optimizer))
    });
    for (family, tied, optimizer) in cases {
        let what = |w: &str| format!("{family:?} tied {tied}: {w}");
        let lr = 1e-2;
        let mut cpu = Trainer::new(scrambled(family, tied, 5), optimizer, lr, schedule);
        cpu.max_grad_norm = Some(0.5);
        let mut on_gpu = cpu.clone();
        let mut gpu = GpuTrainer::new(ctx, &on_gpu, 16).unwrap();
        let owned = windows(&mut rng);
        let batch: Vec<&[u32]> = owned.iter().map(|w| &w[..]).collect();
        for step in 0..3 {
            let a = gpu.step(ctx, &mut on_gpu, &batch).await.unwrap();
            let b = cpu.step(&batch).unwrap();
            assert_rel(a.loss, b.loss, 1e-4, &what(&format!("step {step} loss")));
            let norms = (f64::from(a.grad_norm), f64::from(b.grad_norm));
            assert_rel(norms.0, norms.1, 1e-3, &what(&format!("step {step} norm")));
            assert_eq!(a.lr, b.lr);
        }
        gpu.read_into(ctx, &mut on_gpu).await.unwrap();
        assert_eq!(on_gpu.steps(), cpu.steps());
        // Each update moves a weight by about lr at most; the two agree to a small part of it.
        assert_tensors_close(
            &on_gpu.model.params,
            &cpu.model.params,
            0.0,
            1e-2 * lr,
            &what("weights"),
        );
        match (&on_gpu.optimizer, &cpu.optimizer) {
            (Optimizer::AdamW(a), Optimizer::AdamW(b)) => {
                let (Some((am, av)), at) = a.state() else {
                    panic!("the GPU's AdamW has no moments")
                };
                let (Some((bm, bv)), bt) = b.state() else {
                    panic!("the CPU's AdamW has no moments")
                };
                assert_eq!(at, bt);
                assert_tensors_close(am, bm, 1e-3, 1e-9, &what("first moment"));
                assert_tensors_close(av, bv, 1e-3, 1e-12, &what("second moment"));
            }
            (Optimizer::Sgd(a), Optimizer::Sgd(b)) => {
                let (a, b) = (a.buffer().unwrap(), b.buffer().unwrap());
                assert_tensors_close(a, b, 1e-3, 1e-7, &what("momentum"));
            }
            _ => unreachable!("both trainers keep their optimizer's kind"),
        }
        let host_loss = on_gpu.model.loss(&batch).unwrap();
        let next = gpu.step(ctx, &mut on_gpu, &batch).await.unwrap();
        let read_back = what("loss of the read-back weights");
        assert_rel(next.loss, host_loss, 1e-6, &read_back);
    }
}

/// A NaN loss is an error that leaves the weights and the step count as they were; so are
/// windows the trainer has no room for and models it cannot train.
pub async fn train_step_errors_keep_the_state(ctx: &GpuContext) {
    let mut model = scrambled(Family::BitNet, true, 3);
    model.params.layers[1].input_layernorm[2] = f32::NAN;
    let sgd = Optimizer::Sgd(Sgd::new(0.9, 0.0));
    let mut trainer = Trainer::new(model.clone(), sgd, 0.1, Schedule::Constant { warmup: 0 });
    let mut gpu = GpuTrainer::new(ctx, &trainer, 8).unwrap();
    let err = gpu
        .step(ctx, &mut trainer, &[&[1, 2, 3]])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("loss"), "{err}");
    let long = [1u32; 9];
    let err = gpu.step(ctx, &mut trainer, &[&long]).await.unwrap_err();
    assert!(err.to_string().contains("at most 8"), "{err}");
    gpu.read_into(ctx, &mut trainer).await.unwrap();
    let (a, b) = (&trainer.model.params, &model.params);
    for ((name, x), (_, y)) in a.tensors().into_iter().zip(b.tensors()) {
        let same = x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(same, "{name} changed");
    }
    assert_eq!(trainer.steps(), 0);
    assert!(matches!(&trainer.optimizer, Optimizer::Sgd(s) if s.buffer().is_none()));

    let float = Trainer::new(
        TrainModel::new(config(Family::BitNet, true), Quant::None, 1).unwrap(),
        Optimizer::AdamW(AdamW::default()),
        0.1,
        Schedule::Constant { warmup: 0 },
    );
    let err = GpuTrainer::new(ctx, &float, 8).err().expect("an error");
    assert!(err.to_string().contains("CPU"), "{err}");
    let mut odd = config(Family::BitNet, true);
    (odd.hidden_size, odd.num_attention_heads) = (10, 2);
    odd.head_dim = 4;
    let odd = Trainer::new(
        TrainModel::new(odd, Quant::BitNet, 1).unwrap(),
        Optimizer::AdamW(AdamW::default()),
        0.1,
        Schedule::Constant { warmup: 0 },
    );
    let err = GpuTrainer::new(ctx, &odd, 8).err().expect("an error");
    assert!(err.to_string().contains("multiple of 4"), "{err}");
    assert!(GpuTrainer::new(ctx, &trainer, 17).is_err());
}
