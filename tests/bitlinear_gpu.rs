//! `GpuBitLinear` against `BitLinear::forward_cpu`. Needs a GPU adapter (lavapipe will do) and
//! fails loudly without one: a skipped GPU test proves nothing.
#![cfg(not(target_arch = "wasm32"))]

use bitnet_wgpu::cpu::{ScaleGranularity, WeightQuantOptions};
use bitnet_wgpu::gpu::{GpuActivations, GpuContext};
use bitnet_wgpu::{BitLinear, Error};
use rand::{Rng, SeedableRng, rngs::SmallRng};

/// Relative tolerance on outputs with |y| > 1e-3. The integer accumulators are exact on both
/// sides; the f32 epilogue (one division, one bias add) may differ by a few ulp on the GPU.
const REL_TOL: f32 = 1e-5;
/// Below this magnitude an output is compared absolutely, against `REL_TOL` times the largest
/// output, since a bias cancelling the product leaves only rounding.
const SMALL: f32 = 1e-3;

fn context() -> GpuContext {
    let ctx = pollster::block_on(GpuContext::new()).expect("GPU adapter required");
    let info = ctx.adapter_info();
    eprintln!(
        "adapter: {} ({:?}, {:?})",
        info.name, info.backend, info.device_type
    );
    ctx
}

fn layer(rng: &mut SmallRng, out: usize, inp: usize, granularity: ScaleGranularity) -> BitLinear {
    let w: Vec<f32> = (0..out * inp)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let bias = (0..out).map(|_| rng.random_range(-0.5..0.5)).collect();
    let opts = WeightQuantOptions {
        granularity,
        ..Default::default()
    };
    BitLinear::from_f32(&w, out, inp, Some(bias), opts).unwrap()
}

fn assert_close(gpu: &[f32], cpu: &[f32], what: &str) {
    assert_eq!(gpu.len(), cpu.len(), "{what}");
    let largest = cpu.iter().fold(0.0f32, |m, c| m.max(c.abs()));
    for (i, (&g, &c)) in gpu.iter().zip(cpu).enumerate() {
        let ok = if c.abs() > SMALL {
            (g - c).abs() <= REL_TOL * c.abs()
        } else {
            (g - c).abs() <= REL_TOL * largest.max(1.0)
        };
        assert!(ok, "{what}: output {i}: gpu {g} vs cpu {c}");
    }
}

#[test]
fn forward_matches_cpu_on_awkward_shapes() {
    let ctx = context();
    let mut rng = SmallRng::seed_from_u64(11);
    for rows in [1, 3, 9] {
        for inp in [17, 100, 129] {
            for out in [1, 5, 33] {
                for granularity in [ScaleGranularity::PerTensor, ScaleGranularity::PerChannel] {
                    let layer = layer(&mut rng, out, inp, granularity);
                    let x: Vec<f32> = (0..rows * inp)
                        .map(|_| rng.random_range(-4.0..4.0))
                        .collect();
                    let cpu = layer.forward_cpu(&x, rows).unwrap();
                    let gpu_layer = layer.to_gpu(&ctx).unwrap();
                    let gpu = pollster::block_on(gpu_layer.forward(&ctx, &x, rows)).unwrap();
                    assert_close(
                        &gpu,
                        &cpu,
                        &format!("{rows}x{inp} -> {out}, {granularity:?}"),
                    );
                }
            }
        }
    }
}

#[test]
fn forward_without_bias_and_with_many_tokens() {
    let ctx = context();
    let mut rng = SmallRng::seed_from_u64(12);
    let w: Vec<f32> = (0..40 * 70).map(|_| rng.random_range(-1.0..1.0)).collect();
    let layer = BitLinear::from_f32(&w, 40, 70, None, WeightQuantOptions::default()).unwrap();
    let gpu_layer = layer.to_gpu(&ctx).unwrap();
    for rows in [0, 8, 33] {
        let x: Vec<f32> = (0..rows * 70)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let gpu = pollster::block_on(gpu_layer.forward(&ctx, &x, rows)).unwrap();
        assert_close(
            &gpu,
            &layer.forward_cpu(&x, rows).unwrap(),
            &format!("{rows} rows"),
        );
    }
}

#[test]
fn non_finite_input_is_an_error_and_a_nan_row_when_recorded() {
    let ctx = context();
    let mut rng = SmallRng::seed_from_u64(13);
    let layer = layer(&mut rng, 5, 17, ScaleGranularity::PerTensor);
    let gpu_layer = layer.to_gpu(&ctx).unwrap();
    let mut x: Vec<f32> = (0..2 * 17).map(|_| rng.random_range(-1.0..1.0)).collect();
    x[20] = f32::NAN;
    let err = pollster::block_on(gpu_layer.forward(&ctx, &x, 2)).unwrap_err();
    assert!(
        matches!(err, Error::NonFinite { row: 1, col: 3, .. }),
        "{err}"
    );
    assert!(matches!(
        layer.forward_cpu(&x, 2),
        Err(Error::NonFinite { row: 1, col: 3, .. })
    ));

    // Recorded without a host check: the poisoned token's row is NaN, the other is unaffected.
    let input = ctx.upload("x", &x).unwrap();
    let acts = GpuActivations::new(&ctx, 2, 17).unwrap();
    let y = ctx.storage("y", 2 * 5 * 4).unwrap();
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    let mut pass = encoder.begin_compute_pass(&Default::default());
    gpu_layer
        .record(&ctx, &mut pass, &input, &acts, &y)
        .unwrap();
    drop(pass);
    ctx.queue.submit([encoder.finish()]);
    let out: Vec<f32> = pollster::block_on(ctx.read(&y, 10)).unwrap();
    assert!(out[5..].iter().all(|v| v.is_nan()), "{out:?}");
    assert_close(
        &out[..5],
        &layer.forward_cpu(&x[..17], 1).unwrap(),
        "clean row",
    );
}

#[test]
fn shape_mismatches_are_errors() {
    let ctx = context();
    let mut rng = SmallRng::seed_from_u64(14);
    let gpu_layer = layer(&mut rng, 5, 17, ScaleGranularity::PerChannel)
        .to_gpu(&ctx)
        .unwrap();
    let err = pollster::block_on(gpu_layer.forward(&ctx, &[0.0; 16], 1)).unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err}");
    let acts = GpuActivations::new(&ctx, 1, 16).unwrap();
    let x = ctx.upload("x", &[0.0f32; 16]).unwrap();
    let y = ctx.storage("y", 20).unwrap();
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    let mut pass = encoder.begin_compute_pass(&Default::default());
    let err = gpu_layer
        .record(&ctx, &mut pass, &x, &acts, &y)
        .unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err}");
}
