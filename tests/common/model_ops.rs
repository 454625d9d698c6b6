//! GPU-vs-CPU cases for the transformer's float ops around the matmuls: rmsnorm (and its fused
//! quantization), rope, the residual add, row copies and the gated squared ReLU. All of them are
//! bit-exact: the shaders reproduce every rounding of their CPU twins.

use super::{assert_activations_eq, pick, variants};
use bitnet_wgpu::cpu;
use bitnet_wgpu::gpu::{self, GpuActivations, GpuContext};
use bitnet_wgpu::model::Activation;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const ROWS: [usize; 4] = [1, 2, 3, 7];
const COLS: [usize; 13] = [
    1, 3, 15, 16, 17, 40, 127, 129, 1000, 1025, 2600, 6912, 17000,
];

/// Sentinel for destination rows a kernel must not touch.
pub const UNTOUCHED: f32 = -7.25;

/// Uniform values scaled by one of `magnitudes`.
pub fn values(rng: &mut SmallRng, n: usize, magnitudes: &[f32]) -> Vec<f32> {
    let magnitude = pick(rng, magnitudes);
    (0..n)
        .map(|_| rng.random_range(-1.0f32..1.0) * magnitude)
        .collect()
}

/// Rows at the magnitudes a residual stream reaches (one row in ten all zero); the squares stay
/// zero or normal, as the rmsnorm shader's exactness requires.
pub fn residual_rows(rng: &mut SmallRng, rows: usize, cols: usize) -> Vec<f32> {
    let mut x = Vec::with_capacity(rows * cols);
    for _ in 0..rows {
        if rng.random_range(0..10) == 0 {
            x.extend(std::iter::repeat_n(0.0, cols));
        } else {
            x.extend(values(rng, cols, &[1.0f32, 50.0, 1e-3, 3e3, 1e-15, 1e15]));
        }
    }
    x
}

/// Equal bits, or NaN for NaN (whose payload no one promises).
pub fn assert_bits_eq(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
            "{what}: element {i}: gpu {g:e} cpu {w:e}"
        );
    }
}

/// rmsnorm.wgsl == cpu::rmsnorm, and rmsnorm_quant == cpu::act_quant(cpu::rmsnorm), bit for bit,
/// NaN and infinities included (a NaN makes its whole row NaN).
pub async fn rmsnorm_matches_cpu(ctx: &mut GpuContext) {
    for variant in variants(ctx) {
        ctx.set_variant(variant).expect("variant");
        let mut rng = SmallRng::seed_from_u64(11);
        for case in 0..200 {
            let rows = pick(&mut rng, &ROWS);
            let cols = pick(&mut rng, &COLS);
            let eps = pick(&mut rng, &[1e-5f32, 1e-6, 1e-30]);
            let what = format!("{variant:?} case {case} ({rows}x{cols}, eps {eps:e})");
            let mut x = residual_rows(&mut rng, rows, cols);
            if case % 13 == 4 {
                // A NaN makes its whole row NaN; an infinity, NaN for itself and zeros around.
                let i = rng.random_range(0..x.len());
                x[i] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][case / 13 % 3];
            }
            let weight: Vec<f32> = (0..cols).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let expected = cpu::rmsnorm(&x, rows, &weight, eps).expect("cpu");
            let expected_q = cpu::act_quant(&expected, rows, cols).expect("cpu act_quant");

            let input = ctx.upload("x", &x).expect("upload");
            let w = ctx.upload("weight", &weight).expect("upload");
            let y = ctx.storage("y", (rows * cols * 4) as u64).expect("y");
            let acts = GpuActivations::new(ctx, rows, cols).expect("activations");
            let mut encoder = ctx.device.create_command_encoder(&Default::default());
            let mut pass = encoder.begin_compute_pass(&Default::default());
            gpu::rmsnorm::record(ctx, &mut pass, &input, &w, &y, rows, cols, eps).expect("record");
            gpu::rmsnorm::record_quant(ctx, &mut pass, &input, &w, &acts, eps).expect("record");
            drop(pass);
            ctx.queue.submit([encoder.finish()]);
            let got: Vec<f32> = ctx.read(&y, rows * cols).await.expect("read back");
            assert_bits_eq(&got, &expected, &what);
            let got_q = acts.read(ctx).await.expect("read back");
            assert_activations_eq(&got_q, &expected_q, &format!("quant {what}"));
        }
    }
}

/// rope.wgsl == cpu::rope bit for bit, written into the middle of a larger destination (a KV
/// cache) without touching its other rows.
pub async fn rope_matches_cpu(ctx: &mut GpuContext) {
    for variant in variants(ctx) {
        ctx.set_variant(variant).expect("variant");
        let mut rng = SmallRng::seed_from_u64(12);
        for case in 0..200 {
            let rows = pick(&mut rng, &ROWS);
            let heads = pick(&mut rng, &[1usize, 2, 3, 5]);
            let head_dim = pick(&mut rng, &[2usize, 20, 64, 128]);
            let theta = pick(&mut rng, &[10_000.0f32, 500_000.0]);
            let random_position = rng.random_range(0..4000);
            let first_position = pick(&mut rng, &[0usize, 1, 17, 4000, random_position]);
            let dst_row = pick(&mut rng, &[0usize, 1, 5]);
            let capacity = dst_row + rows + pick(&mut rng, &[0usize, 3]);
            let what = format!(
                "{variant:?} case {case} ({rows} rows, {heads}x{head_dim}, theta {theta}, \
                 position {first_position}, into row {dst_row} of {capacity})"
            );
            let width = heads * head_dim;
            let x = values(&mut rng, rows * width, &[1.0f32, 30.0]);
            let mut rotated = x.clone();
            let positions: Vec<usize> = (first_position..first_position + rows).collect();
            cpu::rope(&mut rotated, &positions, heads, head_dim, theta).expect("cpu");
            let mut expected = vec![UNTOUCHED; capacity * width];
            expected[dst_row * width..(dst_row + rows) * width].copy_from_slice(&rotated);

            let src = ctx.upload("src", &x).expect("upload");
            let dst = ctx
                .upload("dst", &vec![UNTOUCHED; capacity * width])
                .expect("upload");
            let mut encoder = ctx.device.create_command_encoder(&Default::default());
            let mut pass = encoder.begin_compute_pass(&Default::default());
            gpu::rope::record(
                ctx,
                &mut pass,
                &src,
                &dst,
                dst_row,
                rows,
                heads,
                head_dim,
                theta,
                first_position,
            )
            .expect("record");
            drop(pass);
            ctx.queue.submit([encoder.finish()]);
            let got: Vec<f32> = ctx.read(&dst, capacity * width).await.expect("read back");
            assert_bits_eq(&got, &expected, &what);
        }
    }
}

/// elementwise.wgsl: `copy_rows` moves exactly the rows asked and touches no other; `add_rows`
/// adds them, one f32 addition per element (the CPU's `a + b`, bit for bit); `copy_block` moves a
/// block of columns between row widths and touches nothing else.
pub async fn elementwise_matches_cpu(ctx: &mut GpuContext) {
    let mut rng = SmallRng::seed_from_u64(13);
    for case in 0..200 {
        let rows = pick(&mut rng, &ROWS);
        let cols = pick(&mut rng, &COLS);
        let n = rows * cols;
        let what = format!("case {case} ({rows}x{cols})");
        let b = values(&mut rng, n, &[1.0f32, 1e-4]);
        let dst_row = pick(&mut rng, &[0usize, 1, 4]);
        let capacity = dst_row + rows + pick(&mut rng, &[0usize, 2]);
        // Copy b's rows from src_row on.
        let src_row = pick(&mut rng, &[0usize, rows - 1]);
        let copy = rows - src_row;
        let mut copied = vec![UNTOUCHED; capacity * cols];
        copied[dst_row * cols..(dst_row + copy) * cols].copy_from_slice(&b[src_row * cols..]);

        let addend = ctx.upload("b", &b).expect("upload");
        let dst = ctx
            .upload("dst", &vec![UNTOUCHED; capacity * cols])
            .expect("upload");
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        let mut pass = encoder.begin_compute_pass(&Default::default());
        gpu::elementwise::copy_rows(ctx, &mut pass, &addend, src_row, &dst, dst_row, copy, cols)
            .expect("copy_rows");
        drop(pass);
        ctx.queue.submit([encoder.finish()]);
        let got: Vec<f32> = ctx.read(&dst, capacity * cols).await.expect("read back");
        assert_bits_eq(
            &got,
            &copied,
            &format!("copy_rows {what} into row {dst_row}"),
        );

        // The same rows added to a random destination.
        let base = values(&mut rng, capacity * cols, &[1.0f32, 1e-4]);
        let mut summed = base.clone();
        for (d, &v) in summed[dst_row * cols..(dst_row + copy) * cols]
            .iter_mut()
            .zip(&b[src_row * cols..])
        {
            *d += v;
        }
        let dst = ctx.upload("dst", &base).expect("upload");
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        let mut pass = encoder.begin_compute_pass(&Default::default());
        gpu::elementwise::add_rows(ctx, &mut pass, &addend, src_row, &dst, dst_row, copy, cols)
            .expect("add_rows");
        drop(pass);
        ctx.queue.submit([encoder.finish()]);
        let got: Vec<f32> = ctx.read(&dst, capacity * cols).await.expect("read back");
        assert_bits_eq(
            &got,
            &summed,
            &format!("add_rows {what} into row {dst_row}"),
        );

        // Columns `src_col..src_col + width` of b's rows into columns from `dst_col` of rows
        // `dst_stride` wide.
        let width = 1 + rng.random_range(0..cols);
        let src_col = rng.random_range(0..=cols - width);
        let dst_stride = width + pick(&mut rng, &[0usize, 1, 5]);
        let dst_col = rng.random_range(0..=dst_stride - width);
        let mut block = vec![UNTOUCHED; rows * dst_stride];
        for r in 0..rows {
            block[r * dst_stride + dst_col..][..width]
                .copy_from_slice(&b[r * cols + src_col..][..width]);
        }
        let dst = ctx
            .upload("dst", &vec![UNTOUCHED; rows * dst_stride])
            .expect("upload");
        let (from, to) = (
            gpu::elementwise::Columns {
                stride: cols,
                col: src_col,
            },
            gpu::elementwise::Columns {
                stride: dst_stride,
                col: dst_col,
            },
        );
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        let mut pass = encoder.begin_compute_pass(&Default::default());
        gpu::elementwise::copy_block(ctx, &mut pass, &addend, from, &dst, to, rows, width)
            .expect("copy_block");
        drop(pass);
        ctx.queue.submit([encoder.finish()]);
        let got: Vec<f32> = ctx.read(&dst, rows * dst_stride).await.expect("read back");
        assert_bits_eq(
            &got,
            &block,
            &format!("copy_block {what} {from:?} -> {to:?}"),
        );
    }
}

/// How far the SiLU kernels may be from the CPU, relative to the value: WGSL's `exp` may be off
/// by 3 + 2|x| ulp (Vulkan's bound) and its division by 2.5, for |x| up to 30 here.
pub const SILU_REL_TOL: f32 = 2e-5;

/// `got` within [`SILU_REL_TOL`] of `want`, value by value (NaN for NaN).
pub fn assert_silu_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let close = (g - w).abs() <= SILU_REL_TOL * w.abs() + f32::MIN_POSITIVE;
        assert!(
            close || (g.is_nan() && w.is_nan()),
            "{what}: {i}: gpu {g:e} cpu {w:e}"
        );
    }
}

/// The gate kernels on the fused gate/up layout: relu2_gate.wgsl == cpu::relu2_gate bit for bit,
/// silu_gate.wgsl == cpu::silu_gate within [`SILU_REL_TOL`]; and each one's `_quant` entry ==
/// cpu::act_quant of what the gate kernel wrote, bit for bit.
pub async fn gate_matches_cpu(ctx: &mut GpuContext) {
    for activation in [Activation::Relu2, Activation::Silu] {
        for variant in variants(ctx) {
            ctx.set_variant(variant).expect("variant");
            let mut rng = SmallRng::seed_from_u64(14);
            for case in 0..200 {
                let rows = pick(&mut rng, &ROWS);
                let inter = pick(&mut rng, &COLS);
                let what = format!("{activation:?} {variant:?} case {case} ({rows}x{inter})");
                let gate_up = values(&mut rng, rows * 2 * inter, &[1.0f32, 20.0, 1e-3]);
                let (mut gate, mut up) = (Vec::new(), Vec::new());
                for row in gate_up.chunks_exact(2 * inter) {
                    gate.extend_from_slice(&row[..inter]);
                    up.extend_from_slice(&row[inter..]);
                }
                let expected = activation.gate(&gate, &up).expect("cpu");

                let input = ctx.upload("gate_up", &gate_up).expect("upload");
                let out = ctx.storage("out", (rows * inter * 4) as u64).expect("out");
                let acts = GpuActivations::new(ctx, rows, inter).expect("activations");
                let mut encoder = ctx.device.create_command_encoder(&Default::default());
                let mut pass = encoder.begin_compute_pass(&Default::default());
                gpu::gate::record(ctx, &mut pass, activation, &input, &out, rows, inter)
                    .expect("record");
                gpu::gate::record_quant(ctx, &mut pass, activation, &input, &acts).expect("record");
                drop(pass);
                ctx.queue.submit([encoder.finish()]);
                let got: Vec<f32> = ctx.read(&out, rows * inter).await.expect("read back");
                match activation {
                    Activation::Relu2 => assert_bits_eq(&got, &expected, &what),
                    Activation::Silu => assert_silu_close(&got, &expected, &what),
                }
                let expected_q = cpu::act_quant(&got, rows, inter).expect("cpu act_quant");
                let got_q = acts.read(ctx).await.expect("read back");
                assert_activations_eq(&got_q, &expected_q, &format!("quant {what}"));
            }
        }
    }
}

/// Shape errors of these kernels are errors, not panics or device errors.
pub async fn model_ops_bad_shapes_are_errors(ctx: &mut GpuContext) {
    let small = ctx.upload("small", &[0.0f32; 6]).expect("upload");
    let other = ctx.upload("other", &[0.0f32; 6]).expect("upload");
    let acts = GpuActivations::new(ctx, 2, 4).expect("activations");
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    let mut pass = encoder.begin_compute_pass(&Default::default());
    let p = &mut pass;
    assert!(gpu::rmsnorm::record(ctx, p, &small, &other, &other, 2, 4, 1e-5).is_err());
    assert!(gpu::rmsnorm::record(ctx, p, &small, &other, &other, 1, 0, 1e-5).is_err());
    assert!(gpu::rmsnorm::record(ctx, p, &small, &other, &other, 1, 4, 0.0).is_err());
    assert!(gpu::rmsnorm::record(ctx, p, &small, &other, &other, 1, 4, f32::NAN).is_err());
    assert!(gpu::rmsnorm::record_quant(ctx, p, &small, &other, &acts, 1e-5).is_err());
    assert!(gpu::rope::record(ctx, p, &small, &other, 0, 1, 1, 3, 1e4, 0).is_err());
    assert!(gpu::rope::record(ctx, p, &small, &other, 1, 1, 1, 6, 1e4, 0).is_err());
    assert!(gpu::rope::record(ctx, p, &small, &other, 0, 2, 1, 4, 1e4, 0).is_err());
    assert!(gpu::elementwise::copy_rows(ctx, p, &small, 0, &other, 1, 2, 3).is_err());
    for act in [Activation::Relu2, Activation::Silu] {
        assert!(gpu::gate::record(ctx, p, act, &small, &other, 1, 4).is_err());
        assert!(gpu::gate::record(ctx, p, act, &small, &other, 1, 0).is_err());
        assert!(gpu::gate::record(ctx, p, act, &small, &small, 1, 2).is_err());
        assert!(gpu::gate::record_quant(ctx, p, act, &small, &acts).is_err());
    }
    // One dispatch cannot bind a buffer for reading and writing.
    assert!(gpu::rmsnorm::record(ctx, p, &small, &other, &small, 1, 4, 1e-5).is_err());
    assert!(gpu::rope::record(ctx, p, &small, &small, 0, 1, 1, 6, 1e4, 0).is_err());
    assert!(gpu::elementwise::copy_rows(ctx, p, &small, 0, &small, 0, 1, 3).is_err());
    assert!(gpu::elementwise::add_rows(ctx, p, &small, 0, &other, 1, 2, 3).is_err());
    let cols = |stride, col| gpu::elementwise::Columns { stride, col };
    assert!(
        gpu::elementwise::copy_block(ctx, p, &small, cols(4, 2), &other, cols(4, 0), 1, 3).is_err()
    );
    assert!(
        gpu::elementwise::copy_block(ctx, p, &small, cols(2, 0), &small, cols(2, 0), 1, 2).is_err()
    );
    drop(pass);
    ctx.queue.submit([encoder.finish()]);
    ctx.check().expect("no device error was raised");
}
