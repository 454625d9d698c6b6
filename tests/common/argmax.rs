//! argmax.wgsl against cpu::argmax: the same token, or the same error, on rows of awkward
//! lengths with ties, signed zeros, forbidden (-inf) tokens and bad (NaN, +inf) logits.

use super::pick;
use bitnet_wgpu::gpu::{self, GpuContext};
use bitnet_wgpu::{Error, Result, cpu};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const LENGTHS: [usize; 10] = [1, 2, 3, 255, 256, 2047, 2049, 5000, 32001, 128256];

async fn gpu_argmax(ctx: &GpuContext, logits: &[f32], count: usize) -> Result<u32> {
    let input = ctx.upload("logits", logits).expect("upload");
    let result = ctx
        .storage("argmax result", gpu::argmax::RESULT_BYTES)
        .expect("result");
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    let mut pass = encoder.begin_compute_pass(&Default::default());
    gpu::argmax::record(ctx, &mut pass, &input, count, &result).expect("record");
    drop(pass);
    ctx.queue.submit([encoder.finish()]);
    let words: Vec<u32> = ctx.read(&result, 4).await.expect("read back");
    gpu::argmax::interpret([words[0], words[1], words[2], words[3]])
}

pub async fn argmax_matches_cpu(ctx: &mut GpuContext) {
    let mut rng = SmallRng::seed_from_u64(18);
    for case in 0..200 {
        let len = pick(&mut rng, &LENGTHS);
        // Values from a small set, so that ties are common.
        let levels = pick(&mut rng, &[2usize, 5, 1000]);
        let mut logits: Vec<f32> = (0..len)
            .map(|_| rng.random_range(0..levels) as f32 * 0.25 - 3.0)
            .collect();
        for _ in 0..rng.random_range(0..4) {
            let i = rng.random_range(0..len);
            logits[i] = pick(&mut rng, &[f32::NEG_INFINITY, -0.0, 0.0, 1e30, -1e30]);
        }
        match case % 10 {
            0 => logits.fill(f32::NEG_INFINITY),
            1 => {
                let i = rng.random_range(0..len);
                logits[i] = pick(&mut rng, &[f32::NAN, f32::INFINITY]);
            }
            2 => logits.fill(pick(&mut rng, &[0.0, -0.0])),
            _ => {}
        }
        // Only a prefix counts, as when a padded embedding has ids past the vocabulary.
        let count = if case % 3 == 0 {
            rng.random_range(1..=len)
        } else {
            len
        };
        let what = format!("case {case} ({count} of {len} logits)");
        let want = cpu::argmax(&logits[..count]);
        let got = gpu_argmax(ctx, &logits, count).await;
        if let Some((g, w)) = both_chose(&got, &want, &what) {
            assert_eq!(g, w, "{what}");
        }
    }
}

/// The tokens the GPU and the CPU chose, when both chose one; otherwise both must fail alike (the
/// same first bad logit, bit for bit, or both "no token allowed").
pub fn both_chose(got: &Result<u32>, want: &Result<u32>, what: &str) -> Option<(u32, u32)> {
    match (got, want) {
        (Ok(g), Ok(w)) => return Some((*g, *w)),
        (
            Err(Error::NonFinite {
                col: g, value: gv, ..
            }),
            Err(Error::NonFinite {
                col: w, value: wv, ..
            }),
        ) => {
            assert_eq!(g, w, "{what}: first bad logit");
            assert_eq!(gv.to_bits(), wv.to_bits(), "{what}: its value");
        }
        (Err(Error::Invalid { .. }), Err(Error::Invalid { .. })) => {}
        _ => panic!("{what}: gpu {got:?}, cpu {want:?}"),
    }
    None
}
