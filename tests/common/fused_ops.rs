//! GPU-vs-CPU cases for decoding's fused kernels: norm_matmul (rmsnorm + act_quant + gemv, plain,
//! added to a residual, gated, or with rope into the KV cache) and rope_qkv (rope of the stacked
//! q/k/v projection into the query buffer and the KV cache). Each must give the same bits as the separate kernels it
//! replaces on the same adapter, and match the CPU.

use super::model_ops::{UNTOUCHED, assert_bits_eq, residual_rows, values};
use super::{assert_close, pick, variants};
use bitnet_wgpu::cpu::{self, AttentionShape, PackedTernary, TernaryWeights};
use bitnet_wgpu::gpu::norm_matmul::NormMatmulOutput;
use bitnet_wgpu::gpu::{
    self, GpuActivations, GpuContext, GpuTernary, MatmulOptions, MatmulOutput, MatmulPath,
};
use bitnet_wgpu::model::Activation;
use bitnet_wgpu::packing::gpu_words;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const COLS: [usize; 13] = [1, 3, 15, 16, 17, 40, 127, 129, 1000, 1025, 2600, 6912, 8192];
const OUTPUTS: [usize; 8] = [1, 2, 3, 8, 16, 17, 33, 100];

/// Random ternary rows; gated matrices get one scale per half (gate and up), others one scale
/// or one per row.
fn ternary(rng: &mut SmallRng, rows: usize, cols: usize, gated: bool) -> TernaryWeights {
    let codes = (0..rows * cols)
        .map(|_| rng.random_range(-1i8..=1))
        .collect();
    let scale = |rng: &mut SmallRng| pick(rng, &[0.5f32, 1.7, 3e-3, 40.0]);
    let scales = if gated {
        let (g, u) = (scale(rng), scale(rng));
        (0..rows)
            .map(|r| if r < rows / 2 { g } else { u })
            .collect()
    } else if rng.random_bool(0.5) {
        (0..rows).map(|_| scale(rng)).collect()
    } else {
        vec![scale(rng)]
    };
    TernaryWeights {
        rows,
        cols,
        codes,
        scales,
    }
}

fn upload(ctx: &GpuContext, w: &TernaryWeights) -> GpuTernary {
    let packed = PackedTernary {
        rows: w.rows,
        cols: w.cols,
        words: gpu_words::pack(&w.codes, w.rows, w.cols).expect("pack"),
        scales: w.scales.clone(),
    };
    GpuTernary::upload(ctx, &packed).expect("upload")
}

/// What rope_qkv makes of stacked `[q | k | v]` rows on the CPU: rotated queries, rotated keys and
/// the values, each `[rows, width]`.
fn cpu_rope_qkv(
    qkv: &[f32],
    shape: AttentionShape,
    first_position: usize,
    theta: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let AttentionShape {
        heads,
        kv_heads,
        head_dim,
    } = shape;
    let (q_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
    let width = q_width + 2 * kv_width;
    let part = |start: usize, len: usize| -> Vec<f32> {
        qkv.chunks_exact(width)
            .flat_map(|row| row[start..start + len].to_vec())
            .collect()
    };
    let rows = qkv.len() / width;
    let positions: Vec<usize> = (first_position..first_position + rows).collect();
    let mut q = part(0, q_width);
    cpu::rope(&mut q, &positions, heads, head_dim, theta).expect("cpu rope");
    let mut k = part(q_width, kv_width);
    cpu::rope(&mut k, &positions, kv_heads, head_dim, theta).expect("cpu rope");
    (q, k, part(q_width + kv_width, kv_width))
}

/// norm_matmul.wgsl gives the bits of rmsnorm_quant (act_quant without a norm) + gemv (+ the
/// gate) and matches cpu::norm_matmul within the epilogue's division tolerance (for SiLU, scaled
/// by `1 + |gate|`: WGSL's `exp` is off by more ulp the larger its argument). Where the adapter lacks the workgroup memory it needs
/// (16 KiB, WebGPU's default), the model takes the separate kernels: the fused one must refuse,
/// and the separate ones match the CPU.
pub async fn norm_matmul_matches_cpu(ctx: &mut GpuContext) {
    for variant in variants(ctx) {
        ctx.set_variant(variant).expect("variant");
        let mut rng = SmallRng::seed_from_u64(15);
        for case in 0..200 {
            let rows = pick(&mut rng, &[1usize, 1, 2, 3]);
            let cols = pick(&mut rng, &COLS);
            let n = pick(&mut rng, &OUTPUTS);
            let output = pick(
                &mut rng,
                &[
                    NormMatmulOutput::Replace,
                    NormMatmulOutput::Add,
                    NormMatmulOutput::Gated(Activation::Relu2),
                    NormMatmulOutput::Gated(Activation::Silu),
                ],
            );
            let gated = matches!(output, NormMatmulOutput::Gated(_));
            let normed = rng.random_range(0..3) > 0;
            let eps = pick(&mut rng, &[1e-5f32, 1e-6]);
            let what = format!(
                "{variant:?} case {case} ({rows}x{cols} -> {n}, {output:?}, normed {normed})"
            );
            let mut x = residual_rows(&mut rng, rows, cols);
            if case % 29 == 3 {
                let i = rng.random_range(0..x.len());
                x[i] = f32::NAN;
            }
            let norm: Vec<f32> = (0..cols).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let w = ternary(&mut rng, if gated { 2 * n } else { n }, cols, gated);
            let before: Vec<f32> = (0..rows * n)
                .map(|_| rng.random_range(-4.0f32..4.0))
                .collect();
            let norm_used = normed.then_some(&norm[..]);
            let activation = match output {
                NormMatmulOutput::Gated(activation) => Some(activation),
                _ => None,
            };
            let cpu_out = cpu::norm_matmul(&x, rows, norm_used, eps, &w, activation).expect("cpu");
            // The gate values before the activation: the first half of the ungated rows.
            let cpu_gates: Vec<f32> = match activation {
                Some(_) => cpu::norm_matmul(&x, rows, norm_used, eps, &w, None)
                    .expect("cpu")
                    .chunks_exact(w.rows)
                    .flat_map(|row| row[..n].to_vec())
                    .collect(),
                None => Vec::new(),
            };

            let input = ctx.upload("x", &x).expect("upload");
            let norm_buf = ctx.upload("norm", &norm).expect("upload");
            let gw = upload(ctx, &w);
            let fused = ctx.upload("fused", &before).expect("upload");
            let split = ctx.upload("split", &before).expect("upload");
            let acts = GpuActivations::new(ctx, rows, cols).expect("activations");
            let gate_up = ctx
                .storage("gate_up", (rows * w.rows * 4) as u64)
                .expect("gate_up");
            let mut encoder = ctx.device.create_command_encoder(&Default::default());
            let mut pass = encoder.begin_compute_pass(&Default::default());
            let fused_here = gpu::norm_matmul::supported(ctx, cols);
            let norm_gpu = normed.then_some(&norm_buf);
            let recorded = gpu::norm_matmul::record(
                ctx, &mut pass, &input, rows, norm_gpu, eps, &gw, &fused, output,
            );
            assert_eq!(
                recorded.is_ok(),
                fused_here,
                "{what}: fused kernel recorded"
            );
            match norm_gpu {
                Some(norm) => gpu::rmsnorm::record_quant(ctx, &mut pass, &input, norm, &acts, eps)
                    .expect("record rmsnorm_quant"),
                None => {
                    gpu::act_quant::record(ctx, &mut pass, &input, &acts).expect("record act_quant")
                }
            }
            let (out, target) = match output {
                NormMatmulOutput::Replace => (MatmulOutput::Scaled, &split),
                NormMatmulOutput::Add => (MatmulOutput::AddScaled, &split),
                NormMatmulOutput::Gated(_) => (MatmulOutput::Scaled, &gate_up),
            };
            let options = MatmulOptions {
                path: MatmulPath::Gemv,
                output: out,
            };
            gpu::ternary_matmul::record(ctx, &mut pass, &acts, &gw, None, target, options)
                .expect("record gemv");
            if let NormMatmulOutput::Gated(activation) = output {
                gpu::gate::record(ctx, &mut pass, activation, &gate_up, &split, rows, n)
                    .expect("record gate");
            }
            drop(pass);
            ctx.queue.submit([encoder.finish()]);
            let separate: Vec<f32> = ctx.read(&split, rows * n).await.expect("read back");
            let got = if fused_here {
                let got: Vec<f32> = ctx.read(&fused, rows * n).await.expect("read back");
                assert_bits_eq(&got, &separate, &format!("{what}: fused vs separate"));
                got
            } else {
                separate
            };
            for (i, (g, c)) in got.iter().zip(&cpu_out).enumerate() {
                match output {
                    NormMatmulOutput::Add => {
                        let r = before[i];
                        assert_close(*g, r + c, c.abs() + r.abs(), &format!("{what}: {i}"));
                    }
                    NormMatmulOutput::Gated(Activation::Silu) => {
                        let scale = c.abs() * (1.0 + cpu_gates[i].abs());
                        assert_close(*g, *c, scale, &format!("{what}: {i}"));
                    }
                    _ => assert_close(*g, *c, c.abs(), &format!("{what}: {i}")),
                }
            }
        }
    }
}

/// rope_qkv gives cpu::rope of the query and key parts, and the value part unchanged, in the
/// right rows of the query buffer and the caches, touching no other row.
pub async fn rope_qkv_matches_cpu(ctx: &mut GpuContext) {
    let mut rng = SmallRng::seed_from_u64(16);
    for case in 0..200 {
        let rows = pick(&mut rng, &[1usize, 2, 3, 7]);
        let kv_heads = pick(&mut rng, &[1usize, 2, 3]);
        let heads = kv_heads * pick(&mut rng, &[1usize, 2, 4]);
        let head_dim = pick(&mut rng, &[2usize, 20, 64, 128]);
        let theta = pick(&mut rng, &[10_000.0f32, 500_000.0]);
        let first_position = pick(&mut rng, &[0usize, 1, 17, 4000]);
        let cache_row = pick(&mut rng, &[0usize, 1, 5]);
        let capacity = cache_row + rows + pick(&mut rng, &[0usize, 3]);
        let what = format!(
            "case {case} ({rows} rows, {heads}/{kv_heads} heads of {head_dim}, position \
             {first_position}, cache row {cache_row} of {capacity})"
        );
        let (q_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
        let width = q_width + 2 * kv_width;
        let qkv = values(&mut rng, rows * width, &[1.0f32, 30.0]);
        let shape = AttentionShape {
            heads,
            kv_heads,
            head_dim,
        };
        let (q, k, v) = cpu_rope_qkv(&qkv, shape, first_position, theta);
        let in_cache = |rows_data: &[f32]| {
            let mut cache = vec![UNTOUCHED; capacity * kv_width];
            cache[cache_row * kv_width..(cache_row + rows) * kv_width].copy_from_slice(rows_data);
            cache
        };

        let src = ctx.upload("qkv", &qkv).expect("upload");
        let table = gpu::rope::cos_sin(ctx, first_position, rows, head_dim, theta).expect("table");
        let q_out = ctx.storage("q", (rows * q_width * 4) as u64).expect("q");
        let untouched = vec![UNTOUCHED; capacity * kv_width];
        let keys = ctx.upload("keys", &untouched).expect("upload");
        let vals = ctx.upload("values", &untouched).expect("upload");
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        let mut pass = encoder.begin_compute_pass(&Default::default());
        gpu::rope::record_qkv(
            ctx, &mut pass, &src, &table, &q_out, &keys, &vals, cache_row, rows, shape,
        )
        .expect("record");
        drop(pass);
        ctx.queue.submit([encoder.finish()]);
        let got_q: Vec<f32> = ctx.read(&q_out, rows * q_width).await.expect("read");
        assert_bits_eq(&got_q, &q, &format!("{what}: queries"));
        let got_k: Vec<f32> = ctx.read(&keys, capacity * kv_width).await.expect("read");
        assert_bits_eq(&got_k, &in_cache(&k), &format!("{what}: keys"));
        let got_v: Vec<f32> = ctx.read(&vals, capacity * kv_width).await.expect("read");
        assert_bits_eq(&got_v, &in_cache(&v), &format!("{what}: values"));
    }
}

/// norm_gemv_rope gives the bits of rmsnorm_quant + gemv + rope_qkv (queries, keys in the cache,
/// values in the cache, other cache rows untouched) and matches the CPU. Where the adapter cannot
/// run it, it refuses, and the separate kernels the model then takes match the CPU.
pub async fn norm_matmul_rope_matches_cpu(ctx: &mut GpuContext) {
    for variant in variants(ctx) {
        ctx.set_variant(variant).expect("variant");
        let mut rng = SmallRng::seed_from_u64(17);
        for case in 0..200 {
            let rows = pick(&mut rng, &[1usize, 1, 2, 3]);
            let cols = pick(&mut rng, &[1usize, 17, 40, 129, 1025, 2600]);
            let kv_heads = pick(&mut rng, &[1usize, 2, 3]);
            let heads = kv_heads * pick(&mut rng, &[1usize, 2, 4]);
            let head_dim = pick(&mut rng, &[2usize, 20, 64, 128]);
            let theta = pick(&mut rng, &[10_000.0f32, 500_000.0]);
            let position = pick(&mut rng, &[0usize, 1, 17, 4000]);
            let cache_row = pick(&mut rng, &[0usize, 1, 5]);
            let capacity = cache_row + rows + pick(&mut rng, &[0usize, 3]);
            let eps = 1e-5;
            let what = format!(
                "{variant:?} case {case} ({rows}x{cols}, {heads}/{kv_heads} heads of {head_dim}, \
                 position {position}, cache row {cache_row} of {capacity})"
            );
            let (q_width, kv_width) = (heads * head_dim, kv_heads * head_dim);
            let width = q_width + 2 * kv_width;
            let x = residual_rows(&mut rng, rows, cols);
            let norm: Vec<f32> = (0..cols).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let mut w = ternary(&mut rng, width, cols, false);
            let part_scales = [0.5f32, 1.7, 40.0];
            w.scales = (0..width)
                .map(|r| part_scales[(r >= q_width) as usize + (r >= q_width + kv_width) as usize])
                .collect();

            let projected = cpu::norm_matmul(&x, rows, Some(&norm), eps, &w, None).expect("cpu");
            let shape = AttentionShape {
                heads,
                kv_heads,
                head_dim,
            };
            let (cpu_q, cpu_k, cpu_v) = cpu_rope_qkv(&projected, shape, position, theta);

            let input = ctx.upload("x", &x).expect("upload");
            let norm_buf = ctx.upload("norm", &norm).expect("upload");
            let gw = upload(ctx, &w);
            let table = gpu::rope::cos_sin(ctx, position, rows, head_dim, theta).expect("table");
            let untouched = vec![UNTOUCHED; capacity * kv_width];
            let buffers = |label| {
                (
                    ctx.storage(label, (rows * q_width * 4) as u64).expect("q"),
                    ctx.upload("keys", &untouched).expect("upload"),
                    ctx.upload("values", &untouched).expect("upload"),
                )
            };
            let fused = buffers("fused q");
            let split = buffers("split q");
            let acts = GpuActivations::new(ctx, rows, cols).expect("activations");
            let qkv = ctx.storage("qkv", (rows * width * 4) as u64).expect("qkv");
            let mut encoder = ctx.device.create_command_encoder(&Default::default());
            let mut pass = encoder.begin_compute_pass(&Default::default());
            let fused_here = gpu::norm_matmul::supported(ctx, cols);
            let recorded = gpu::norm_matmul::record_qkv(
                ctx, &mut pass, &input, rows, &norm_buf, eps, &gw, &table, &fused.0, &fused.1,
                &fused.2, cache_row, shape,
            );
            assert_eq!(
                recorded.is_ok(),
                fused_here,
                "{what}: fused kernel recorded"
            );
            gpu::rmsnorm::record_quant(ctx, &mut pass, &input, &norm_buf, &acts, eps)
                .expect("record");
            let gemv = MatmulOptions {
                path: MatmulPath::Gemv,
                output: MatmulOutput::Scaled,
            };
            gpu::ternary_matmul::record(ctx, &mut pass, &acts, &gw, None, &qkv, gemv)
                .expect("record");
            gpu::rope::record_qkv(
                ctx, &mut pass, &qkv, &table, &split.0, &split.1, &split.2, cache_row, rows, shape,
            )
            .expect("record");
            drop(pass);
            ctx.queue.submit([encoder.finish()]);

            let cpu_cache = |data: &[f32]| {
                let mut cache = untouched.clone();
                cache[cache_row * kv_width..(cache_row + rows) * kv_width].copy_from_slice(data);
                cache
            };
            for (name, (f, s), len, cpu_values) in [
                ("queries", (&fused.0, &split.0), rows * q_width, cpu_q),
                (
                    "keys",
                    (&fused.1, &split.1),
                    capacity * kv_width,
                    cpu_cache(&cpu_k),
                ),
                (
                    "values",
                    (&fused.2, &split.2),
                    capacity * kv_width,
                    cpu_cache(&cpu_v),
                ),
            ] {
                let separate: Vec<f32> = ctx.read(s, len).await.expect("read back");
                let got = if fused_here {
                    let got: Vec<f32> = ctx.read(f, len).await.expect("read back");
                    assert_bits_eq(
                        &got,
                        &separate,
                        &format!("{what}: {name}, fused vs separate"),
                    );
                    got
                } else {
                    separate
                };
                let scale = cpu_values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                for (i, (g, c)) in got.iter().zip(&cpu_values).enumerate() {
                    assert_close(*g, *c, scale, &format!("{what}: {name} {i}"));
                }
            }
        }
    }
}
