//! The backward shaders against their CPU twins (`cpu::*_backward`, `cpu::cross_entropy`, the
//! optimizers of `train::optim`). Gradients are float sums whose order differs between GPU and
//! CPU, so each value is compared within a relative tolerance of the sum of the absolute values
//! of its terms (stated per kernel); integers (token ids, codes) are exact.

use super::pick;
use bitnet_wgpu::cpu;
use bitnet_wgpu::gpu::{self, GpuActivations, GpuContext};
use bitnet_wgpu::model::Activation;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Relative tolerance of the ternary matmul gradients: sums of at most 130 terms in f32, each side
/// rounding at most (n - 1) * 2^-24 of the sum of |terms|.
pub const MATMUL_GRAD_REL_TOL: f64 = 2e-5;

/// `|gpu - cpu| <= tol * scale` (plus the smallest normal, for zero sums) for every element.
fn assert_grad_close(gpu: &[f32], cpu: &[f32], scale: &[f64], tol: f64, what: &str) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: lengths");
    for (i, ((&g, &c), &s)) in gpu.iter().zip(cpu).zip(scale).enumerate() {
        let err = (f64::from(g) - f64::from(c)).abs();
        assert!(
            err <= tol * s + f64::from(f32::MIN_POSITIVE),
            "{what}: element {i}: gpu {g:e} cpu {c:e} (scale {s:e})"
        );
    }
}

/// Records what `record` puts into one pass, and submits it.
fn run(ctx: &GpuContext, record: impl FnOnce(&mut wgpu::ComputePass<'_>)) {
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    let mut pass = encoder.begin_compute_pass(&Default::default());
    record(&mut pass);
    drop(pass);
    ctx.queue.submit([encoder.finish()]);
}

fn gradients(rng: &mut SmallRng, n: usize) -> Vec<f32> {
    let magnitude = pick(rng, &[1.0f32, 1e-3, 30.0]);
    (0..n)
        .map(|_| rng.random_range(-1.0f32..1.0) * magnitude)
        .collect()
}

/// ternary_matmul_backward.wgsl == cpu::ternary_matmul_backward: dx from the packed codes and dw
/// over the dequantized activations, within MATMUL_GRAD_REL_TOL of the sum of |terms|, for both
/// scale granularities, one token, and inner sizes that are no multiple of 4, 16 or 128.
pub async fn ternary_matmul_backward_matches_cpu(ctx: &mut GpuContext) {
    let ms = [1usize, 1, 2, 3, 5, 7, 8, 9, 33, 40];
    let ks = [1usize, 3, 4, 15, 16, 17, 100, 129, 300, 1030];
    let ns = [1usize, 2, 3, 5, 31, 33, 64, 65, 130];
    let mut rng = SmallRng::seed_from_u64(31);
    for case in 0..200 {
        let (m, k, n) = (
            pick(&mut rng, &ms),
            pick(&mut rng, &ks),
            pick(&mut rng, &ns),
        );
        let opts = super::weight_options(&mut rng);
        let w = super::weights(&mut rng, n * k);
        let packed = cpu::ternary_pack(&w, n, k, opts).expect("pack");
        let ternary = cpu::TernaryWeights {
            rows: n,
            cols: k,
            codes: bitnet_wgpu::packing::gpu_words::unpack(&packed.words, n, k).expect("unpack"),
            scales: packed.scales.clone(),
        };
        let x = super::activations(&mut rng, m, k);
        let qx = cpu::act_quant(&x, m, k).expect("cpu act_quant");
        let dy = gradients(&mut rng, m * n);
        let (want_dx, want_dw) =
            cpu::ternary_matmul_backward(&qx, &ternary, &dy).expect("cpu backward");

        let x_buf = ctx.upload("x", &x).expect("upload");
        let acts = GpuActivations::new(ctx, m, k).expect("activations");
        let wt = gpu::GpuTernary::upload(ctx, &packed).expect("weights");
        let dy_buf = ctx.upload("dy", &dy).expect("upload");
        let dx_buf = ctx.upload("dx", &vec![f32::NAN; m * k]).expect("dx");
        let dw_buf = ctx.upload("dw", &vec![f32::NAN; n * k]).expect("dw");
        run(ctx, |pass| {
            gpu::act_quant::record(ctx, pass, &x_buf, &acts).expect("act_quant");
            gpu::ternary_matmul::record_dx(ctx, pass, m, &wt, &dy_buf, &dx_buf).expect("dx");
            gpu::ternary_matmul::record_dw(ctx, pass, &acts, n, &dy_buf, &dw_buf).expect("dw");
        });
        let got_dx: Vec<f32> = ctx.read(&dx_buf, m * k).await.expect("read dx");
        let got_dw: Vec<f32> = ctx.read(&dw_buf, n * k).await.expect("read dw");

        let sw =
            |r: usize| f64::from(ternary.scales[if ternary.scales.len() == 1 { 0 } else { r }]);
        let x_hat = |r: usize, c: usize| f64::from(qx.codes[r * k + c]) / f64::from(qx.scales[r]);
        let dx_scale: Vec<f64> = (0..m * k)
            .map(|i| {
                let (r, c) = (i / k, i % k);
                (0..n)
                    .map(|j| {
                        (f64::from(dy[r * n + j]) * f64::from(ternary.codes[j * k + c]) / sw(j))
                            .abs()
                    })
                    .sum()
            })
            .collect();
        let dw_scale: Vec<f64> = (0..n * k)
            .map(|i| {
                let (j, c) = (i / k, i % k);
                (0..m)
                    .map(|r| (f64::from(dy[r * n + j]) * x_hat(r, c)).abs())
                    .sum()
            })
            .collect();
        let what = format!("case {case} (m {m}, k {k}, n {n}, {opts:?})");
        assert_grad_close(
            &got_dx,
            &want_dx,
            &dx_scale,
            MATMUL_GRAD_REL_TOL,
            &format!("{what}: dx"),
        );
        assert_grad_close(
            &got_dw,
            &want_dw,
            &dw_scale,
            MATMUL_GRAD_REL_TOL,
            &format!("{what}: dw"),
        );
    }
    ctx.check().expect("no device error");
}

/// Relative tolerance of rmsnorm's dx, of the sum of |terms| of both of its parts: the dot
/// product g · x runs left to right over up to 1000 columns on the CPU.
pub const RMSNORM_DX_REL_TOL: f64 = 1e-4;
/// Relative tolerance of sums over at most 40 rows (dweight, and the like), of the sum of |terms|.
pub const ROW_SUM_REL_TOL: f64 = 1e-5;

/// rmsnorm_backward.wgsl == cpu::rmsnorm_backward: dx within RMSNORM_DX_REL_TOL, dweight within
/// ROW_SUM_REL_TOL, on rows of awkward widths, one row included.
pub async fn rmsnorm_backward_matches_cpu(ctx: &mut GpuContext) {
    let mut rng = SmallRng::seed_from_u64(32);
    for case in 0..200 {
        let rows = pick(&mut rng, &[1usize, 1, 2, 3, 5, 9, 17, 40]);
        let cols = pick(&mut rng, &super::ODD_COLS);
        let eps = pick(&mut rng, &[1e-5f32, 1e-6, 0.5]);
        let magnitude = pick(&mut rng, &[1.0f32, 1e-3, 50.0]);
        let x: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-1.0f32..1.0) * magnitude)
            .collect();
        let weight: Vec<f32> = (0..cols).map(|_| rng.random_range(-1.5f32..1.5)).collect();
        let dy = gradients(&mut rng, rows * cols);
        let (want_dx, want_dw) =
            cpu::rmsnorm_backward(&x, rows, &weight, eps, &dy).expect("cpu backward");

        let x_buf = ctx.upload("x", &x).expect("upload");
        let w_buf = ctx.upload("weight", &weight).expect("upload");
        let dy_buf = ctx.upload("dy", &dy).expect("upload");
        let dx_buf = ctx.upload("dx", &vec![f32::NAN; rows * cols]).expect("dx");
        let dw_buf = ctx.upload("dweight", &vec![f32::NAN; cols]).expect("dw");
        run(ctx, |pass| {
            gpu::rmsnorm::record_backward(
                ctx, pass, &x_buf, &w_buf, &dy_buf, &dx_buf, &dw_buf, rows, cols, eps,
            )
            .expect("record");
        });
        let got_dx: Vec<f32> = ctx.read(&dx_buf, rows * cols).await.expect("read dx");
        let got_dw: Vec<f32> = ctx.read(&dw_buf, cols).await.expect("read dweight");

        let inv: Vec<f64> = x
            .chunks(cols)
            .map(|row| {
                let mean = row
                    .iter()
                    .map(|&v| f64::from(v) * f64::from(v))
                    .sum::<f64>()
                    / cols as f64;
                1.0 / (mean + f64::from(eps)).sqrt()
            })
            .collect();
        let mut dx_scale = Vec::with_capacity(rows * cols);
        for r in 0..rows {
            let g = |i: usize| f64::from(dy[r * cols + i]) * f64::from(weight[i]);
            let abs_dot: f64 = (0..cols)
                .map(|i| (g(i) * f64::from(x[r * cols + i])).abs())
                .sum();
            for i in 0..cols {
                let through = inv[r].powi(3) * abs_dot / cols as f64;
                dx_scale.push((inv[r] * g(i)).abs() + through * f64::from(x[r * cols + i]).abs());
            }
        }
        let dw_scale: Vec<f64> = (0..cols)
            .map(|i| {
                (0..rows)
                    .map(|r| {
                        (f64::from(dy[r * cols + i]) * f64::from(x[r * cols + i]) * inv[r]).abs()
                    })
                    .sum()
            })
            .collect();
        let what = format!("case {case} ({rows}x{cols}, eps {eps:e})");
        assert_grad_close(
            &got_dx,
            &want_dx,
            &dx_scale,
            RMSNORM_DX_REL_TOL,
            &format!("{what}: dx"),
        );
        assert_grad_close(
            &got_dw,
            &want_dw,
            &dw_scale,
            ROW_SUM_REL_TOL,
            &format!("{what}: dweight"),
        );
    }
    ctx.check().expect("no device error");
}

/// Relative tolerance of the softmax gradient, of each probability (f32 exp and a vocabulary-wide
/// f32 sum against the twin's f64).
pub const DLOGITS_REL_TOL: f64 = 1e-4;

/// cross_entropy.wgsl == cpu::cross_entropy: losses within 1e-4 of the row's largest |logit| (as
/// nll.wgsl), dlogits in place within DLOGITS_REL_TOL of each probability times the gradient
/// scale; -inf logits, rows of -inf only (loss +inf) and NaN logits (loss NaN; their gradients are
/// not compared), targets and losses at offsets.
pub async fn cross_entropy_matches_cpu(ctx: &mut GpuContext) {
    let mut rng = SmallRng::seed_from_u64(33);
    for case in 0..200 {
        let vocab = pick(
            &mut rng,
            &[1usize, 2, 3, 17, 255, 256, 257, 1000, 5000, 32001],
        );
        let rows = pick(&mut rng, &[1usize, 1, 2, 3, 5]);
        let (target_offset, loss_offset) = (rng.random_range(0..3), rng.random_range(0..3));
        let magnitude = pick(&mut rng, &[1.0f32, 10.0, 40.0]);
        let grad_scale = pick(&mut rng, &[1.0f32, 1.0 / rows as f32, 0.125]);
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
        let (want_loss, want_d) =
            cpu::cross_entropy(&logits, vocab, &targets[target_offset..]).expect("cpu");

        let logits_buf = ctx.upload("logits", &logits).expect("upload");
        let targets_buf = ctx.upload("targets", &targets).expect("upload");
        let losses = ctx
            .upload("losses", &vec![-7.25f32; loss_offset + rows])
            .expect("upload");
        run(ctx, |pass| {
            gpu::nll::record_cross_entropy(
                ctx,
                pass,
                &logits_buf,
                rows,
                vocab,
                &targets_buf,
                target_offset,
                &losses,
                loss_offset,
                grad_scale,
            )
            .expect("record");
        });
        let got_loss: Vec<f32> = ctx.read(&losses, loss_offset + rows).await.expect("read");
        let got_d: Vec<f32> = ctx.read(&logits_buf, rows * vocab).await.expect("read");
        let what = format!("case {case} ({rows} rows of {vocab}, scale {grad_scale})");
        assert!(
            got_loss[..loss_offset].iter().all(|&v| v == -7.25),
            "{what}: wrote before its offset"
        );
        for r in 0..rows {
            let row = &logits[r * vocab..(r + 1) * vocab];
            let (g, want) = (got_loss[loss_offset + r], want_loss[r]);
            let what = format!("{what}: row {r}: loss gpu {g}, cpu {want}");
            if want.is_nan() || want.is_infinite() {
                assert!(
                    (g.is_nan() && want.is_nan()) || f64::from(g) == want,
                    "{what}"
                );
            } else {
                let scale = row
                    .iter()
                    .filter(|v| v.is_finite())
                    .fold(1.0f32, |m, v| m.max(v.abs()));
                assert!(
                    (f64::from(g) - want).abs() <= 1e-4 * f64::from(scale),
                    "{what}"
                );
            }
            if row.iter().any(|v| v.is_nan()) || row.iter().all(|&v| v == f32::NEG_INFINITY) {
                continue;
            }
            let target = targets[target_offset + r] as usize;
            let want_scaled: Vec<f32> = want_d[r * vocab..(r + 1) * vocab]
                .iter()
                .map(|&d| (f64::from(d) * f64::from(grad_scale)) as f32)
                .collect();
            // The probability of each entry, the size of the error both sides may make.
            let scale: Vec<f64> = want_d[r * vocab..(r + 1) * vocab]
                .iter()
                .enumerate()
                .map(|(i, &d)| {
                    let p = f64::from(d) + if i == target { 1.0 } else { 0.0 };
                    p.abs() * f64::from(grad_scale) + 1e-7 * f64::from(grad_scale)
                })
                .collect();
            assert_grad_close(
                &got_d[r * vocab..(r + 1) * vocab],
                &want_scaled,
                &scale,
                DLOGITS_REL_TOL,
                &format!("{what}: dlogits"),
            );
        }
    }
    ctx.check().expect("no device error");
}

/// Relative tolerance of the optimizer updates and of the gradient norm, of the sum of |terms|
/// (WGSL's sqrt and division may be off by a few ulp; the norm's f32 sum against the twin's f64).
pub const OPTIM_REL_TOL: f64 = 1e-5;

async fn read_f32s(ctx: &GpuContext, buffers: &[&wgpu::Buffer], count: usize) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    for b in buffers {
        out.push(ctx.read(b, count).await.expect("read back"));
    }
    out
}

/// optim.wgsl's adamw and sgd == train::adamw_tensor and train::sgd_tensor (the optimizers'
/// arithmetic per tensor) within OPTIM_REL_TOL, from moments of earlier steps, with and without a
/// clipping coefficient, on tensors of awkward lengths: 200 cases of each.
pub async fn optimizers_match_cpu(ctx: &mut GpuContext) {
    use bitnet_wgpu::train::{AdamW, AdamWStep, Sgd, adamw_tensor, sgd_tensor};
    let mut rng = SmallRng::seed_from_u64(34);
    // 200 cases of each optimizer.
    for case in 0..400 {
        let n = pick(&mut rng, &[1usize, 3, 255, 256, 257, 1000, 4097]);
        let w: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let g = gradients(&mut rng, n);
        let coef = pick(&mut rng, &[None, Some(1.0f32), Some(0.37)]);
        let clip = coef.map(|c| ctx.upload("clip", &[3.5f32, c]).expect("upload"));
        let lr = pick(&mut rng, &[1e-3f32, 0.1, 3e-4]);
        let what = format!("case {case} (n {n}, clip {coef:?}, lr {lr})");
        let w_buf = ctx.upload("w", &w).expect("upload");
        let g_buf = ctx.upload("g", &g).expect("upload");
        if case % 2 == 0 {
            let opt = AdamW::new(
                pick(&mut rng, &[0.9f32, 0.8]),
                pick(&mut rng, &[0.999f32, 0.95]),
                pick(&mut rng, &[1e-8f32, 1e-6]),
                pick(&mut rng, &[0.0f32, 0.01, 0.1]),
            );
            let t = rng.random_range(1..6);
            let step = AdamWStep::new(&opt, lr, t);
            let (m, v): (Vec<f32>, Vec<f32>) = if t == 1 {
                (vec![0.0; n], vec![0.0; n])
            } else {
                let m = gradients(&mut rng, n);
                let v = m
                    .iter()
                    .map(|x| x * x * rng.random_range(0.5f32..2.0))
                    .collect();
                (m, v)
            };
            let (mut cw, mut cm, mut cv) = (w.clone(), m.clone(), v.clone());
            adamw_tensor(&mut cw, &g, &mut cm, &mut cv, coef.unwrap_or(1.0), &step);
            let m_buf = ctx.upload("m", &m).expect("upload");
            let v_buf = ctx.upload("v", &v).expect("upload");
            run(ctx, |pass| {
                gpu::optim::record_adamw(
                    ctx,
                    pass,
                    None,
                    &w_buf,
                    &g_buf,
                    &m_buf,
                    &v_buf,
                    n,
                    &step,
                    clip.as_ref(),
                )
                .expect("record");
            });
            let got = read_f32s(ctx, &[&w_buf, &m_buf, &v_buf], n).await;
            let gs: Vec<f64> = g
                .iter()
                .map(|&x| f64::from(x * coef.unwrap_or(1.0)))
                .collect();
            let m_scale: Vec<f64> = (0..n)
                .map(|i| f64::from(m[i]).abs() + gs[i].abs())
                .collect();
            let v_scale: Vec<f64> = (0..n)
                .map(|i| f64::from(v[i]).abs() + gs[i] * gs[i])
                .collect();
            let w_scale: Vec<f64> = (0..n)
                .map(|i| {
                    let denom =
                        f64::from(cv[i]).sqrt() / f64::from(step.bias2_sqrt) + f64::from(step.eps);
                    f64::from(w[i]).abs()
                        + (f64::from(step.step_size) * f64::from(cm[i]) / denom).abs()
                })
                .collect();
            assert_grad_close(
                &got[0],
                &cw,
                &w_scale,
                OPTIM_REL_TOL,
                &format!("{what}: adamw w"),
            );
            assert_grad_close(
                &got[1],
                &cm,
                &m_scale,
                OPTIM_REL_TOL,
                &format!("{what}: adamw m"),
            );
            assert_grad_close(
                &got[2],
                &cv,
                &v_scale,
                OPTIM_REL_TOL,
                &format!("{what}: adamw v"),
            );
        } else {
            let opt = Sgd::new(
                pick(&mut rng, &[0.0f32, 0.9]),
                pick(&mut rng, &[0.0f32, 0.01]),
            );
            let first = rng.random_bool(0.5);
            let b = gradients(&mut rng, n);
            let (mut cw, mut cb) = (w.clone(), b.clone());
            sgd_tensor(&mut cw, &g, &mut cb, coef.unwrap_or(1.0), &opt, lr, first);
            let b_buf = ctx.upload("momentum", &b).expect("upload");
            run(ctx, |pass| {
                gpu::optim::record_sgd(
                    ctx,
                    pass,
                    None,
                    &w_buf,
                    &g_buf,
                    &b_buf,
                    n,
                    &opt,
                    lr,
                    first,
                    clip.as_ref(),
                )
                .expect("record");
            });
            let got = read_f32s(ctx, &[&w_buf, &b_buf], n).await;
            let d_scale: Vec<f64> = (0..n)
                .map(|i| {
                    f64::from(g[i]).abs()
                        + f64::from(opt.weight_decay * w[i]).abs()
                        + f64::from(opt.momentum * b[i]).abs()
                })
                .collect();
            let w_scale: Vec<f64> = (0..n)
                .map(|i| f64::from(w[i]).abs() + f64::from(lr) * d_scale[i])
                .collect();
            assert_grad_close(
                &got[0],
                &cw,
                &w_scale,
                OPTIM_REL_TOL,
                &format!("{what}: sgd w"),
            );
            assert_grad_close(
                &got[1],
                &cb,
                &d_scale,
                OPTIM_REL_TOL,
                &format!("{what}: sgd b"),
            );
        }
    }
    ctx.check().expect("no device error");
}

/// optim.wgsl's global gradient norm == train::clip_grad_norm's norm within OPTIM_REL_TOL, and
/// its coefficient torch's, over one to four tensors of awkward lengths (empty ones, and more than
/// 1024 blocks for a second level now and then); the same bits on a second run.
pub async fn grad_norm_matches_cpu(ctx: &mut GpuContext) {
    use bitnet_wgpu::train::{Parameters, clip_grad_norm};
    let mut rng = SmallRng::seed_from_u64(35);
    for case in 0..200 {
        let tensors = rng.random_range(1..5);
        let lens: Vec<usize> = (0..tensors)
            .map(|_| {
                if case % 50 == 7 {
                    1_100_003
                } else {
                    pick(&mut rng, &[0usize, 1, 3, 1023, 1024, 1025, 5000, 70_001])
                }
            })
            .collect();
        let values: Vec<Vec<f32>> = lens.iter().map(|&n| gradients(&mut rng, n)).collect();
        let max_norm = pick(&mut rng, &[1.0f32, 0.1, 1e6, 0.0]);
        let mut all = Parameters {
            embed_tokens: values.concat(),
            layers: vec![],
            norm: vec![],
            lm_head: None,
        };
        let want_norm = clip_grad_norm(&mut all, max_norm).expect("cpu");
        let want_coef = (max_norm / (want_norm + 1e-6)).min(1.0);
        let buffers: Vec<wgpu::Buffer> = values
            .iter()
            .map(|v| ctx.upload("grad", v).expect("upload"))
            .collect();
        let list: Vec<(&wgpu::Buffer, usize)> = buffers.iter().zip(lens.iter().copied()).collect();
        let out = ctx.upload("clip", &[f32::NAN; 2]).expect("upload");
        let mut runs = Vec::new();
        for _ in 0..2 {
            run(ctx, |pass| {
                gpu::optim::record_grad_norm(ctx, pass, &list, max_norm, &out).expect("record");
            });
            runs.push(ctx.read::<f32>(&out, 2).await.expect("read back"));
        }
        let what = format!("case {case} (lengths {lens:?}, max_norm {max_norm})");
        assert_eq!(
            runs[0].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            runs[1].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{what}: two runs differ"
        );
        let got = &runs[0];
        assert_grad_close(
            &got[..1],
            &[want_norm],
            &[f64::from(want_norm)],
            OPTIM_REL_TOL,
            &format!("{what}: norm"),
        );
        assert_grad_close(
            &got[1..],
            &[want_coef],
            &[f64::from(want_coef)],
            OPTIM_REL_TOL,
            &format!("{what}: coefficient"),
        );
    }
    ctx.check().expect("no device error");
}

/// embedding_backward.wgsl == cpu::embedding_backward exactly (the same sums in the same token
/// order): repeated tokens, tokens never looked up (zero rows), one token, tables in chunks of
/// awkward sizes.
pub async fn embedding_backward_matches_cpu(ctx: &mut GpuContext) {
    let mut rng = SmallRng::seed_from_u64(36);
    for case in 0..200 {
        let vocab = pick(&mut rng, &[1usize, 2, 3, 17, 100, 1000]);
        let hidden = pick(&mut rng, &[1usize, 3, 4, 5, 16, 17, 100, 129]);
        let rows = pick(&mut rng, &[1usize, 1, 2, 3, 5, 9, 33, 70]);
        // A few distinct tokens now and then, so that most repeat.
        let distinct = pick(&mut rng, &[vocab, vocab.min(3), 1]);
        let tokens: Vec<u32> = (0..rows)
            .map(|_| rng.random_range(0..distinct as u32))
            .collect();
        let dy = gradients(&mut rng, rows * hidden);
        let chunk_rows = pick(&mut rng, &[1usize, 3, 7, vocab]);
        let want = cpu::embedding_backward(&tokens, &dy, vocab, hidden).expect("cpu");

        let tokens_buf = ctx.upload("tokens", &tokens).expect("upload");
        let dy_buf = ctx.upload("dy", &dy).expect("upload");
        let dtable =
            gpu::GpuGradTable::new_chunked(ctx, vocab, hidden, chunk_rows).expect("dtable");
        run(ctx, |pass| {
            gpu::embedding::record_backward(ctx, pass, &tokens_buf, &dy_buf, &dtable, rows)
                .expect("record");
        });
        let got = dtable.read(ctx).await.expect("read back");
        assert_eq!(
            got, want,
            "case {case} (vocab {vocab}, hidden {hidden}, {rows} tokens, chunks of {chunk_rows})"
        );
    }
    ctx.check().expect("no device error");
}

/// Relative tolerance of sums over up to 1000 terms (lm_head's dx runs over the vocabulary; the
/// CPU adds left to right), of the sum of |terms|.
pub const LONG_SUM_REL_TOL: f64 = 1e-4;

/// lm_head_backward.wgsl == cpu::lm_head_backward: dx within LONG_SUM_REL_TOL and dtable within
/// ROW_SUM_REL_TOL of the sum of |terms|, for f32 and f16 tables in chunks of awkward sizes,
/// dlogits split into groups of rows bound at unaligned offsets, and dtable added to an existing
/// gradient (tied embeddings).
pub async fn lm_head_backward_matches_cpu(ctx: &mut GpuContext) {
    use bitnet_wgpu::gpu::{GpuGradTable, GpuTable, TableStorage};
    let mut rng = SmallRng::seed_from_u64(37);
    for case in 0..200 {
        let vocab = pick(&mut rng, &[1usize, 2, 3, 17, 33, 100, 1000]);
        let hidden = pick(&mut rng, &[1usize, 3, 4, 5, 16, 17, 33, 100, 129]);
        let rows = pick(&mut rng, &[1usize, 1, 2, 3, 5, 9, 33, 70]);
        let storage = pick(&mut rng, &[TableStorage::F32, TableStorage::F16]);
        // Few enough chunks and groups that a case records at most a few hundred dispatches.
        let chunk_rows = pick(&mut rng, &[1usize, 17, vocab.div_ceil(3), vocab]).max(vocab / 64);
        let grad_chunk_rows =
            pick(&mut rng, &[1usize, 5, vocab.div_ceil(2), vocab]).max(vocab / 64);
        let group_rows = pick(&mut rng, &[1usize, 2, 7, rows]).max(rows / 8);
        let accumulate = rng.random_bool(0.25);
        let x: Vec<f32> = (0..rows * hidden)
            .map(|_| rng.random_range(-2.0f32..2.0))
            .collect();
        let table: Vec<f32> = (0..vocab * hidden)
            .map(|_| storage.round(rng.random_range(-1.0f32..1.0)))
            .collect();
        let dl = gradients(&mut rng, rows * vocab);
        let before: Vec<f32> = (0..vocab * hidden)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let (want_dx, mut want_dt) =
            cpu::lm_head_backward(&x, rows, &table, vocab, hidden, &dl).expect("cpu");
        let mut dt_scale: Vec<f64> = (0..vocab * hidden)
            .map(|i| {
                let (v, h) = (i / hidden, i % hidden);
                (0..rows)
                    .map(|r| (f64::from(dl[r * vocab + v]) * f64::from(x[r * hidden + h])).abs())
                    .sum()
            })
            .collect();
        if accumulate {
            for i in 0..want_dt.len() {
                want_dt[i] += before[i];
                dt_scale[i] += f64::from(before[i]).abs();
            }
        }
        let dx_scale: Vec<f64> = (0..rows * hidden)
            .map(|i| {
                let (r, h) = (i / hidden, i % hidden);
                (0..vocab)
                    .map(|v| {
                        (f64::from(dl[r * vocab + v]) * f64::from(table[v * hidden + h])).abs()
                    })
                    .sum()
            })
            .collect();

        let gpu_table =
            GpuTable::upload_f32_chunked(ctx, &table, vocab, hidden, storage, chunk_rows)
                .expect("table");
        let dtable =
            GpuGradTable::new_chunked(ctx, vocab, hidden, grad_chunk_rows).expect("dtable");
        if accumulate {
            let mut encoder = ctx.device.create_command_encoder(&Default::default());
            for i in 0..dtable.chunk_count() {
                let (first, n, buffer) = dtable.chunk(i).expect("chunk");
                let src = ctx
                    .upload("before", &before[first * hidden..(first + n) * hidden])
                    .expect("upload");
                encoder.copy_buffer_to_buffer(&src, 0, buffer, 0, (n * hidden * 4) as u64);
            }
            ctx.queue.submit([encoder.finish()]);
        }
        let x_buf = ctx.upload("x", &x).expect("upload");
        let dl_buf = ctx.upload("dlogits", &dl).expect("upload");
        let dx_buf = ctx
            .upload("dx", &vec![f32::NAN; rows * hidden])
            .expect("dx");
        run(ctx, |pass| {
            gpu::lm_head::record_backward_grouped(
                ctx, pass, &x_buf, &gpu_table, &dl_buf, &dx_buf, &dtable, rows, accumulate,
                group_rows,
            )
            .expect("record");
        });
        let got_dx: Vec<f32> = ctx.read(&dx_buf, rows * hidden).await.expect("read dx");
        let got_dt = dtable.read(ctx).await.expect("read dtable");
        let what = format!(
            "case {case} ({rows} rows, {vocab} x {hidden} {storage:?} in chunks of {chunk_rows}, \
             gradient chunks of {grad_chunk_rows}, groups of {group_rows}, accumulate {accumulate})"
        );
        assert_grad_close(
            &got_dx,
            &want_dx,
            &dx_scale,
            LONG_SUM_REL_TOL,
            &format!("{what}: dx"),
        );
        assert_grad_close(
            &got_dt,
            &want_dt,
            &dt_scale,
            ROW_SUM_REL_TOL,
            &format!("{what}: dtable"),
        );
    }
    ctx.check().expect("no device error");
}

/// Relative tolerance of the SiLU gate's gradients against the CPU's, of `|u * dy| * (1 + |g|)`
/// for `d_gate` (the bound of `|s * (1 + g * (1 - s))|`, whose `1 - s` carries the error of
/// WGSL's `exp` times `|g|`) and of `|d_up|`: `exp` may be off by 3 + 2|x| ulp, for |x| <= 30.
pub const SILU_GRAD_REL_TOL: f64 = 2e-5;

/// The gate kernels' gradients, in the fused gate/up layout: relu2_gate_backward.wgsl ==
/// cpu::relu2_gate_backward bit for bit, silu_gate_backward.wgsl == cpu::silu_gate_backward
/// within [`SILU_GRAD_REL_TOL`]; zero gates included.
pub async fn gate_backward_matches_cpu(ctx: &mut GpuContext) {
    use super::model_ops::{assert_bits_eq, values};
    for activation in [Activation::Relu2, Activation::Silu] {
        let mut rng = SmallRng::seed_from_u64(38);
        for case in 0..200 {
            let rows = pick(&mut rng, &super::ODD_ROWS);
            let inter = pick(&mut rng, &super::ODD_COLS);
            let mut gate_up = Vec::with_capacity(rows * 2 * inter);
            for _ in 0..rows {
                let mut gate = values(&mut rng, inter, &[1.0, 30.0, 1e-3]);
                gate[rng.random_range(0..inter)] = 0.0;
                gate_up.extend(gate);
                gate_up.extend(values(&mut rng, inter, &[1.0, 30.0, 1e-3]));
            }
            let dy = values(&mut rng, rows * inter, &[1.0, 1e-3, 30.0]);
            let (gate, up): (Vec<f32>, Vec<f32>) = gate_up
                .chunks(2 * inter)
                .flat_map(|row| {
                    row[..inter]
                        .iter()
                        .copied()
                        .zip(row[inter..].iter().copied())
                })
                .unzip();
            let (dgate, dup) = activation.gate_backward(&gate, &up, &dy).expect("cpu");
            let interleave = |a: &[f32], b: &[f32]| -> Vec<f32> {
                a.chunks(inter)
                    .zip(b.chunks(inter))
                    .flat_map(|(g, u)| g.iter().chain(u).copied())
                    .collect()
            };
            let want = interleave(&dgate, &dup);
            let gu_buf = ctx.upload("gate_up", &gate_up).expect("upload");
            let dy_buf = ctx.upload("dy", &dy).expect("upload");
            let out = ctx
                .upload("d_gate_up", &vec![f32::NAN; rows * 2 * inter])
                .expect("out");
            run(ctx, |pass| {
                gpu::gate::record_backward(
                    ctx, pass, activation, &gu_buf, &dy_buf, &out, rows, inter,
                )
                .expect("record");
            });
            let got: Vec<f32> = ctx.read(&out, rows * 2 * inter).await.expect("read back");
            let what = format!("{activation:?} case {case} ({rows} x {inter})");
            match activation {
                Activation::Relu2 => assert_bits_eq(&got, &want, &what),
                Activation::Silu => {
                    let gate_scale: Vec<f32> = (0..gate.len())
                        .map(|i| (up[i] * dy[i]).abs() * (1.0 + gate[i].abs()))
                        .collect();
                    let up_scale: Vec<f32> = dup.iter().map(|d| d.abs()).collect();
                    let scale: Vec<f64> = interleave(&gate_scale, &up_scale)
                        .into_iter()
                        .map(f64::from)
                        .collect();
                    assert_grad_close(&got, &want, &scale, SILU_GRAD_REL_TOL, &what);
                }
            }
        }
    }
    ctx.check().expect("no device error");
}

/// rope_backward.wgsl == cpu::rope_backward bit for bit, in place, at positions up to the
/// thousands (angles whose cos and sin the host computes), one row, one head, head_dim 2.
pub async fn rope_backward_matches_cpu(ctx: &mut GpuContext) {
    use super::model_ops::{assert_bits_eq, values};
    let mut rng = SmallRng::seed_from_u64(39);
    for case in 0..200 {
        let rows = pick(&mut rng, &super::ODD_ROWS);
        let heads = pick(&mut rng, &[1usize, 2, 3, 5, 8]);
        let head_dim = pick(&mut rng, &[2usize, 4, 6, 8, 64, 128]);
        let theta = pick(&mut rng, &[10000.0f32, 500000.0]);
        let start = pick(&mut rng, &[0usize, 1, 17, 4090]);
        // Windows of a batch restart at 0 now and then.
        let period = pick(&mut rng, &[rows, 3, 1]);
        let positions: Vec<usize> = (0..rows).map(|r| start + r % period).collect();
        let dx = values(&mut rng, rows * heads * head_dim, &[1.0, 30.0, 1e-3]);
        let mut want = dx.clone();
        cpu::rope_backward(&mut want, &positions, heads, head_dim, theta).expect("cpu");
        let table = gpu::rope::cos_sin_at(ctx, &positions, head_dim, theta).expect("table");
        let buf = ctx.upload("dx", &dx).expect("upload");
        run(ctx, |pass| {
            gpu::rope::record_backward(ctx, pass, &buf, &table, rows, heads, head_dim)
                .expect("record");
        });
        let got: Vec<f32> = ctx.read(&buf, dx.len()).await.expect("read back");
        assert_bits_eq(
            &got,
            &want,
            &format!("case {case} ({rows} rows at {positions:?}, {heads} x {head_dim})"),
        );
    }
    ctx.check().expect("no device error");
}

/// Relative tolerance of the attention gradients, of the sum of |terms| (each softmax weight
/// recomputed in f32 with exp, dot products over head_dim, sums over up to 60 keys).
pub const ATTENTION_GRAD_REL_TOL: f64 = 1e-4;

/// attention_backward.wgsl == cpu::attention_backward within ATTENTION_GRAD_REL_TOL of the sum of
/// |terms|: grouped-query shapes, one query row, queries that are the last rows of a longer cache,
/// head sizes that are no multiple of 4 and above 128.
pub async fn attention_backward_matches_cpu(ctx: &mut GpuContext) {
    use bitnet_wgpu::cpu::AttentionShape;
    let mut rng = SmallRng::seed_from_u64(40);
    for case in 0..200 {
        let (heads, kv_heads) = pick(
            &mut rng,
            &[(1usize, 1usize), (2, 1), (4, 2), (3, 3), (6, 2)],
        );
        let head_dim = pick(&mut rng, &[1usize, 2, 3, 4, 16, 33, 64, 128, 129]);
        let n = pick(&mut rng, &[1usize, 1, 2, 3, 5, 9, 17]);
        let t = n + pick(&mut rng, &[0usize, 0, 1, 7, 40]);
        let shape = AttentionShape {
            heads,
            kv_heads,
            head_dim,
        };
        let (qw, kw) = (heads * head_dim, kv_heads * head_dim);
        // Scores of moderate size: the f32 exp of a score off by a few ulp of it stays within
        // the tolerance.
        let q_magnitude = pick(&mut rng, &[1.0f32, 0.1, 3.0]);
        let q: Vec<f32> = (0..n * qw)
            .map(|_| rng.random_range(-1.0f32..1.0) * q_magnitude)
            .collect();
        let k: Vec<f32> = (0..t * kw)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let v: Vec<f32> = (0..t * kw)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect();
        let dout = gradients(&mut rng, n * qw);
        let (want_dq, want_dk, want_dv) =
            cpu::attention_backward(&q, &k, &v, &dout, shape).expect("cpu");

        let bufs: Vec<wgpu::Buffer> = [&q, &k, &v, &dout]
            .iter()
            .map(|d| ctx.upload("input", d).expect("upload"))
            .collect();
        let dq = ctx.upload("dq", &vec![f32::NAN; n * qw]).expect("dq");
        let dk = ctx.upload("dk", &vec![f32::NAN; t * kw]).expect("dk");
        let dv = ctx.upload("dv", &vec![f32::NAN; t * kw]).expect("dv");
        run(ctx, |pass| {
            gpu::attention::record_backward(
                ctx, pass, &bufs[0], &bufs[1], &bufs[2], &bufs[3], &dq, &dk, &dv, n, t, shape,
            )
            .expect("record");
        });
        let got_dq: Vec<f32> = ctx.read(&dq, n * qw).await.expect("read");
        let got_dk: Vec<f32> = ctx.read(&dk, t * kw).await.expect("read");
        let got_dv: Vec<f32> = ctx.read(&dv, t * kw).await.expect("read");

        // Error scales in f64: |ds[j]| bounded through |da| <= sum |dout * v| and |D| <= sum a |da|.
        let (mut s_dq, mut s_dk, mut s_dv) = (
            vec![0.0f64; n * qw],
            vec![0.0f64; t * kw],
            vec![0.0f64; t * kw],
        );
        let scaling = 1.0 / (head_dim as f64).sqrt();
        let group = heads / kv_heads;
        for r in 0..n {
            let visible = t - n + r + 1;
            for h in 0..heads {
                let g = h / group;
                let qa = (r * heads + h) * head_dim;
                let ka = |j: usize| (j * kv_heads + g) * head_dim;
                let scores: Vec<f64> = (0..visible)
                    .map(|j| {
                        (0..head_dim)
                            .map(|d| f64::from(q[qa + d]) * f64::from(k[ka(j) + d]))
                            .sum::<f64>()
                            * scaling
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                let a: Vec<f64> = scores.iter().map(|s| (s - max).exp() / total).collect();
                let da_abs: Vec<f64> = (0..visible)
                    .map(|j| {
                        (0..head_dim)
                            .map(|d| (f64::from(dout[qa + d]) * f64::from(v[ka(j) + d])).abs())
                            .sum()
                    })
                    .collect();
                let d_abs: f64 = a.iter().zip(&da_abs).map(|(x, y)| x * y).sum();
                for j in 0..visible {
                    let ds = a[j] * (da_abs[j] + d_abs) * scaling;
                    for d in 0..head_dim {
                        s_dq[qa + d] += ds * f64::from(k[ka(j) + d]).abs();
                        s_dk[ka(j) + d] += ds * f64::from(q[qa + d]).abs();
                        s_dv[ka(j) + d] += a[j] * f64::from(dout[qa + d]).abs();
                    }
                }
            }
        }
        let what = format!("case {case} (n {n}, t {t}, {shape:?})");
        let tol = ATTENTION_GRAD_REL_TOL;
        assert_grad_close(&got_dq, &want_dq, &s_dq, tol, &format!("{what}: dq"));
        assert_grad_close(&got_dk, &want_dk, &s_dk, tol, &format!("{what}: dk"));
        assert_grad_close(&got_dv, &want_dv, &s_dv, tol, &format!("{what}: dv"));
    }
    ctx.check().expect("no device error");
}

/// The backward kernels refuse bad shapes, aliased outputs and bad settings with errors, never a
/// panic or a device error.
pub async fn backward_bad_shapes_are_errors(ctx: &mut GpuContext) {
    use bitnet_wgpu::cpu::{AttentionShape, WeightQuantOptions};
    use bitnet_wgpu::gpu::{GpuGradTable, GpuTable, TableStorage};
    use bitnet_wgpu::train::{AdamW, AdamWStep, Sgd};
    let small = ctx.upload("small", &[0.0f32; 3]).expect("upload");
    let big = ctx.upload("big", &[0.0f32; 64]).expect("upload");
    let big2 = ctx.upload("big2", &[0.0f32; 64]).expect("upload");
    let big3 = ctx.upload("big3", &[0.0f32; 64]).expect("upload");
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    let mut compute = encoder.begin_compute_pass(&Default::default());
    let pass = &mut compute;

    let packed =
        cpu::ternary_pack(&[0.5; 16 * 3], 3, 16, WeightQuantOptions::default()).expect("pack");
    let w = gpu::GpuTernary::upload(ctx, &packed).expect("upload");
    let acts = GpuActivations::new(ctx, 2, 16).expect("activations");
    // dy of 2 x 3 needs 6 values; dx of 2 x 16 needs 32.
    assert!(gpu::ternary_matmul::record_dx(ctx, pass, 2, &w, &small, &big).is_err());
    assert!(gpu::ternary_matmul::record_dx(ctx, pass, 2, &w, &big, &small).is_err());
    assert!(gpu::ternary_matmul::record_dx(ctx, pass, 2, &w, &big, &big).is_err());
    assert!(gpu::ternary_matmul::record_dw(ctx, pass, &acts, 3, &big, &small).is_err());

    assert!(
        gpu::rmsnorm::record_backward(ctx, pass, &big, &big2, &big3, &big, &small, 2, 8, 1e-5)
            .is_err(),
        "dx aliasing x"
    );
    assert!(
        gpu::rmsnorm::record_backward(ctx, pass, &big, &big2, &big3, &small, &big, 2, 8, 1e-5)
            .is_err(),
        "short dx"
    );
    assert!(
        gpu::rmsnorm::record_backward(ctx, pass, &big, &small, &big3, &big2, &big, 2, 8, 0.0)
            .is_err(),
        "eps 0"
    );

    let targets = ctx.upload("targets", &[0u32; 2]).expect("upload");
    assert!(
        gpu::nll::record_cross_entropy(ctx, pass, &big, 2, 0, &targets, 0, &big2, 0, 1.0).is_err()
    );
    assert!(
        gpu::nll::record_cross_entropy(ctx, pass, &big, 2, 8, &targets, 1, &big2, 0, 1.0).is_err(),
        "targets past the buffer"
    );
    assert!(
        gpu::nll::record_cross_entropy(ctx, pass, &big, 2, 8, &targets, 0, &big, 0, 1.0).is_err(),
        "losses aliasing logits"
    );
    assert!(
        gpu::nll::record_cross_entropy(ctx, pass, &big, 2, 8, &targets, 0, &big2, 0, f32::NAN)
            .is_err()
    );

    let step = AdamWStep::new(&AdamW::default(), 1e-3, 1);
    assert!(
        gpu::optim::record_adamw(ctx, pass, None, &big, &big2, &big3, &small, 8, &step, None)
            .is_err()
    );
    assert!(
        gpu::optim::record_adamw(ctx, pass, None, &big, &big2, &big3, &big3, 8, &step, None)
            .is_err()
    );
    assert!(
        gpu::optim::record_sgd(
            ctx,
            pass,
            None,
            &big,
            &big,
            &big3,
            8,
            &Sgd::default(),
            0.1,
            true,
            None
        )
        .is_err()
    );
    assert!(gpu::optim::record_grad_norm(ctx, pass, &[(&big, 8)], f32::NAN, &big2).is_err());
    assert!(gpu::optim::record_grad_norm(ctx, pass, &[(&big, 8)], 1.0, &big).is_err());
    assert!(gpu::optim::record_grad_norm(ctx, pass, &[(&small, 8)], 1.0, &big).is_err());

    let dtable = GpuGradTable::new(ctx, 5, 4).expect("dtable");
    assert!(GpuGradTable::new(ctx, 0, 4).is_err());
    assert!(gpu::embedding::record_backward(ctx, pass, &targets, &small, &dtable, 2).is_err());
    let table = GpuTable::upload_f32(ctx, &[0.0; 20], 5, 4, TableStorage::F32).expect("table");
    let other = GpuGradTable::new(ctx, 4, 4).expect("dtable");
    assert!(
        gpu::lm_head::record_backward(ctx, pass, &big, &table, &big2, &big3, &other, 2, false)
            .is_err(),
        "dtable shaped unlike the table"
    );
    assert!(
        gpu::lm_head::record_backward(ctx, pass, &big, &table, &small, &big3, &dtable, 2, false)
            .is_err(),
        "short dlogits"
    );

    let act = Activation::Silu;
    assert!(gpu::gate::record_backward(ctx, pass, act, &big, &big2, &big, 2, 4).is_err());
    assert!(gpu::gate::record_backward(ctx, pass, act, &big, &small, &big2, 2, 4).is_err());

    let cos_sin = gpu::rope::cos_sin_at(ctx, &[0, 1], 4, 10000.0).expect("table");
    assert!(gpu::rope::record_backward(ctx, pass, &small, &cos_sin, 2, 1, 4).is_err());
    assert!(gpu::rope::record_backward(ctx, pass, &big, &cos_sin, 2, 1, 3).is_err());

    let shape = |heads, kv_heads, head_dim| AttentionShape {
        heads,
        kv_heads,
        head_dim,
    };
    let bufs: Vec<wgpu::Buffer> = (0..7)
        .map(|_| ctx.upload("attention", &[0.0f32; 600]).expect("upload"))
        .collect();
    let b = |i: usize| &bufs[i];
    let attn = |ctx: &GpuContext, pass: &mut wgpu::ComputePass<'_>, n, t, s, dq: &wgpu::Buffer| {
        gpu::attention::record_backward(ctx, pass, b(0), b(1), b(2), b(3), dq, b(5), b(6), n, t, s)
    };
    assert!(
        attn(ctx, pass, 2, 3, shape(3, 2, 4), b(4)).is_err(),
        "heads % kv_heads"
    );
    assert!(
        attn(ctx, pass, 1, 1, shape(1, 1, 257), b(4)).is_err(),
        "head_dim > 256"
    );
    assert!(
        attn(ctx, pass, 3, 2, shape(1, 1, 4), b(4)).is_err(),
        "n > t"
    );
    assert!(
        attn(ctx, pass, 2, 3, shape(2, 1, 4), b(0)).is_err(),
        "dq aliasing q"
    );
    assert!(
        attn(ctx, pass, 2, 200, shape(2, 1, 4), b(4)).is_err(),
        "short k"
    );
    drop(compute);
    drop(encoder);
    ctx.check().expect("no device error was raised");
}
