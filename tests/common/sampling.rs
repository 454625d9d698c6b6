//! sampling.wgsl against cpu::sample on rows of awkward lengths: spread, tied and peaked logits,
//! forbidden (-inf) and bad (NaN, +inf) ones, with and without top-k and top-p cuts. The GPU
//! weighs candidates with f32 `exp` where the reference uses f64 (and in fixed point, where a
//! weight below 2^-40 of the best is 0), so a token may differ only when the draw or the nucleus
//! boundary lies within `NEAR` of a candidate's edge: then it must lie, in the order the kept
//! candidates are laid out, between the tokens the reference gives for draws and top_p that
//! close. Errors must be the same.

use super::argmax::both_chose;
use super::pick;
use bitnet_wgpu::Result;
use bitnet_wgpu::cpu::{self, SamplingParams};
use bitnet_wgpu::gpu::{self, GpuContext};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::cmp::Ordering;

const LENGTHS: [usize; 10] = [1, 2, 3, 17, 255, 256, 1000, 2049, 5000, 32001];
/// How far (relative) a draw or top_p may move and still count as the same.
const NEAR: f64 = 2e-5;

async fn gpu_sample(
    ctx: &GpuContext,
    logits: &[f32],
    count: usize,
    params: &SamplingParams,
    u: f64,
) -> Result<u32> {
    let input = ctx.upload("logits", logits).expect("upload");
    let draw = ctx
        .upload("draw", &[gpu::sampling::draw_word(u)])
        .expect("draw");
    let result = ctx
        .storage("sampling result", gpu::sampling::RESULT_BYTES)
        .expect("result");
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    let mut pass = encoder.begin_compute_pass(&Default::default());
    gpu::sampling::record(ctx, &mut pass, &input, count, params, &draw, &result).expect("record");
    drop(pass);
    ctx.queue.submit([encoder.finish()]);
    let words: Vec<u32> = ctx.read(&result, 4).await.expect("read back");
    gpu::argmax::interpret([words[0], words[1], words[2], words[3]])
}

/// The order the kept candidates are laid out in: by rank (logit, then id) when a cut ranked
/// them, else by id.
fn layout(logits: &[f32], ranked: bool, a: u32, b: u32) -> Ordering {
    let by_logit = if ranked {
        logits[b as usize].total_cmp(&logits[a as usize])
    } else {
        Ordering::Equal
    };
    by_logit.then(a.cmp(&b))
}

/// The tokens the reference gives for draws and top_p within `NEAR` of these.
fn near_tokens(logits: &[f32], params: &SamplingParams, u: f64) -> Vec<u32> {
    let mut tokens = Vec::new();
    for du in [-NEAR, 0.0, NEAR] {
        for dp in [-NEAR, 0.0, NEAR] {
            let top_p = (f64::from(params.top_p) * (1.0 + dp)).min(1.0) as f32;
            if params.top_p == 1.0 && top_p != 1.0 {
                continue;
            }
            let near = SamplingParams { top_p, ..*params };
            let draw = (u + du).clamp(0.0, 1.0 - f64::EPSILON);
            tokens.push(cpu::sample(logits, &near, draw).expect("sampled once already"));
        }
    }
    tokens
}

pub async fn sampling_matches_cpu(ctx: &mut GpuContext) {
    let mut rng = SmallRng::seed_from_u64(41);
    let (mut near_edge, mut not_greedy, mut cut_by_k, mut cut_by_p) = (0, 0, 0, 0);
    let cases = 200;
    for case in 0..cases {
        let len = if case == 7 {
            128_256
        } else {
            pick(&mut rng, &LENGTHS)
        };
        let mut logits: Vec<f32> = match case % 3 {
            // Spread.
            0 => (0..len).map(|_| rng.random_range(-8.0..8.0)).collect(),
            // Few levels: ties everywhere, at every cut.
            1 => {
                let levels = pick(&mut rng, &[1usize, 2, 5]);
                (0..len)
                    .map(|_| rng.random_range(0..levels) as f32 * 0.5)
                    .collect()
            }
            // A language model's: a bulk and a few well above it.
            _ => (0..len)
                .map(|_| {
                    let bulk: f32 = rng.random_range(-2.0..2.0);
                    if rng.random_ratio(1, 50) {
                        bulk + 9.0
                    } else {
                        bulk
                    }
                })
                .collect(),
        };
        for _ in 0..rng.random_range(0..4) {
            let i = rng.random_range(0..len);
            logits[i] = pick(&mut rng, &[f32::NEG_INFINITY, -0.0, 0.0, -1e30, 30.0]);
        }
        match case % 20 {
            0 => logits.fill(f32::NEG_INFINITY),
            1 => {
                let i = rng.random_range(0..len);
                logits[i] = pick(&mut rng, &[f32::NAN, f32::INFINITY]);
            }
            _ => {}
        }
        // Only a prefix counts, as when a padded embedding has ids past the vocabulary.
        let count = if case % 4 == 0 {
            rng.random_range(1..=len)
        } else {
            len
        };
        let params = SamplingParams {
            temperature: pick(&mut rng, &[0.3, 0.8, 1.0, 2.5]),
            top_k: pick(&mut rng, &[0, 0, 1, 2, 40, count, count + 5]),
            top_p: pick(&mut rng, &[1.0, 1.0, 0.95, 0.5, 1e-3]),
            seed: 0,
        };
        let u = match case % 11 {
            0 => 0.0,
            1 => 1.0 - f64::EPSILON,
            _ => rng.random(),
        };
        let row = &logits[..count];
        let what = format!("case {case} ({count} of {len} logits, {params:?}, u {u})");
        let want = cpu::sample(row, &params, u);
        let got = gpu_sample(ctx, &logits, count, &params, u).await;
        if let Some((g, w)) = both_chose(&got, &want, &what) {
            let alive = row.iter().filter(|&&l| l > f32::NEG_INFINITY).count();
            if g != w {
                let ranked = (params.top_k > 0 && params.top_k < alive) || params.top_p < 1.0;
                let order = |a: &u32, b: &u32| layout(row, ranked, *a, *b);
                let near = near_tokens(row, &params, u);
                let first = near.iter().min_by(|a, b| order(a, b)).expect("nine tokens");
                let last = near.iter().max_by(|a, b| order(a, b)).expect("nine tokens");
                assert!(
                    order(first, &g).is_le() && order(&g, last).is_le(),
                    "{what}: gpu {g}, cpu {w}, near {near:?}"
                );
                near_edge += 1;
            }
            not_greedy += usize::from(w != cpu::argmax(row).expect("a token was sampled"));
            cut_by_k += usize::from(params.top_k > 0 && params.top_k < alive);
            cut_by_p += usize::from(params.top_p < 1.0);
        }
    }
    println!(
        "sampling: {near_edge} of {cases} tokens differ at an edge; {not_greedy} not the argmax, \
         {cut_by_k} cut by top-k, {cut_by_p} by top-p"
    );
    assert!(
        near_edge <= cases / 20,
        "{near_edge} tokens differ at an edge"
    );
    assert!(not_greedy >= cases / 4 && cut_by_k >= cases / 5 && cut_by_p >= cases / 4);
}
