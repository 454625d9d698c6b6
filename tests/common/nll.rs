//! nll.wgsl against cpu::nll on rows of awkward lengths: forbidden (-inf) tokens, a -inf target
//! and rows of -inf only (+inf), NaN logits (NaN), read at offsets into the targets and written at
//! offsets into the output. The GPU works in f32, the twin in f64: a tolerance.

use super::pick;
use bitnet_wgpu::cpu;
use bitnet_wgpu::gpu::{self, GpuContext};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const VOCABS: [usize; 9] = [1, 2, 3, 255, 256, 257, 1000, 5000, 32001];

pub async fn nll_matches_cpu(ctx: &mut GpuContext) {
    let mut rng = SmallRng::seed_from_u64(19);
    for case in 0..200 {
        let vocab = pick(&mut rng, &VOCABS);
        let rows = pick(&mut rng, &[1usize, 2, 3, 5]);
        let (target_offset, out_offset) = (rng.random_range(0..3), rng.random_range(0..3));
        let magnitude = pick(&mut rng, &[1.0f32, 10.0, 40.0]);
        let mut logits: Vec<f32> = (0..rows * vocab)
            .map(|_| rng.random_range(-1.0f32..1.0) * magnitude)
            .collect();
        for _ in 0..rng.random_range(0..4) {
            let i = rng.random_range(0..logits.len());
            logits[i] = f32::NEG_INFINITY;
        }
        match case % 12 {
            0 => logits[..vocab].fill(f32::NEG_INFINITY),
            1 => {
                let i = rng.random_range(0..logits.len());
                logits[i] = f32::NAN;
            }
            _ => {}
        }
        let targets: Vec<u32> = (0..target_offset + rows)
            .map(|_| rng.random_range(0..vocab as u32))
            .collect();
        let what = format!("case {case} ({rows} rows of {vocab})");

        let logits_buf = ctx.upload("logits", &logits).expect("upload");
        let targets_buf = ctx.upload("targets", &targets).expect("upload");
        let out = ctx
            .upload("nll", &vec![-7.25f32; out_offset + rows])
            .expect("upload");
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        let mut pass = encoder.begin_compute_pass(&Default::default());
        gpu::nll::record(
            ctx,
            &mut pass,
            &logits_buf,
            rows,
            vocab,
            &targets_buf,
            target_offset,
            &out,
            out_offset,
        )
        .expect("record");
        drop(pass);
        ctx.queue.submit([encoder.finish()]);
        let got: Vec<f32> = ctx.read(&out, out_offset + rows).await.expect("read back");
        assert!(
            got[..out_offset].iter().all(|&v| v == -7.25),
            "{what}: wrote before its offset"
        );
        for (r, &g) in got[out_offset..].iter().enumerate() {
            let row = &logits[r * vocab..(r + 1) * vocab];
            let want = cpu::nll(row, targets[target_offset + r]);
            let what = format!("{what}: row {r}: gpu {g}, cpu {want}");
            if want.is_nan() || want.is_infinite() {
                assert!(
                    (g.is_nan() && want.is_nan()) || f64::from(g) == want,
                    "{what}"
                );
                continue;
            }
            let scale = row
                .iter()
                .filter(|v| v.is_finite())
                .fold(1.0f32, |m, v| m.max(v.abs()));
            assert!(
                (f64::from(g) - want).abs() <= 1e-4 * f64::from(scale),
                "{what}"
            );
        }
    }
}
