//! GPU-vs-CPU cases shared by the native tests (tests/gpu_vs_cpu.rs, on every native adapter the
//! test command selects) and the browser tests (tests/web.rs, on WebGPU in headless Chromium).
//! Each case runs at least 200 random inputs through a shader and its CPU twin; integers (codes,
//! packed words, accumulators, code sums) and scales must match bit for bit.

use bitnet_wgpu::cpu::{self, QuantizedActivations, ScaleGranularity, WeightQuantOptions};
use bitnet_wgpu::gpu::{self, GpuActivations, GpuContext, MatmulOptions, MatmulOutput, MatmulPath};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

pub mod argmax;
pub mod attention_head;
pub mod backward;
pub mod fused_ops;
pub mod model;
pub mod model_ops;
pub mod nll;
pub mod sampling;

/// Relative tolerance for float epilogues: WGSL lets a division be off by 2.5 ulp (~3e-7).
pub const EPILOGUE_REL_TOL: f32 = 1e-5;

/// A float epilogue within EPILOGUE_REL_TOL of `scale`; NaN and infinities must match exactly
/// (a scale product that underflows to zero gives infinities on both sides).
fn assert_close(gpu: f32, cpu: f32, scale: f32, what: &str) {
    if cpu.is_nan() || cpu.is_infinite() {
        assert!(
            gpu.to_bits() == cpu.to_bits() || (gpu.is_nan() && cpu.is_nan()),
            "{what}: gpu {gpu:e} cpu {cpu:e}"
        );
        return;
    }
    let tol = EPILOGUE_REL_TOL * scale + f32::MIN_POSITIVE;
    assert!((gpu - cpu).abs() <= tol, "{what}: gpu {gpu:e} cpu {cpu:e}");
}

const ODD_COLS: [usize; 12] = [1, 3, 4, 5, 15, 16, 17, 100, 127, 128, 129, 1000];
const ODD_ROWS: [usize; 8] = [1, 2, 3, 5, 8, 9, 17, 33];

/// The shader variants to test on this adapter: everything it offers, and the portable path.
pub fn variants(ctx: &GpuContext) -> Vec<gpu::ShaderVariant> {
    let best = ctx.capabilities().best_variant();
    gpu::ShaderVariant::ALL
        .into_iter()
        .filter(|v| (!v.subgroups || best.subgroups) && (!v.dot4 || best.dot4))
        .collect()
}

/// The variants the adapters of the test command offer, by backend: lavapipe and SwiftShader
/// on Vulkan, like hardware GPUs there and on Metal and DX12, have subgroups and `dot4I8Packed`;
/// wgpu's GL backend and Chromium's WebGPU have `dot4I8Packed` but no subgroups. An adapter that
/// offers other than its backend's entry fails [`variants_tested`], so a variant cannot drop out
/// of the tests unnoticed (nor a new one go untested).
fn expected_variants(backend: wgpu::Backend) -> Vec<gpu::ShaderVariant> {
    let all = gpu::ShaderVariant::ALL.to_vec();
    match backend {
        wgpu::Backend::Gl | wgpu::Backend::BrowserWebGpu => {
            all.into_iter().filter(|v| !v.subgroups).collect()
        }
        _ => all,
    }
}

/// The variants [`variants`] gives, which must be [`expected_variants`] for the adapter's
/// backend; every other variant must be refused by [`GpuContext::set_variant`].
pub fn variants_tested(ctx: &mut GpuContext) -> Vec<gpu::ShaderVariant> {
    let tested = variants(ctx);
    let info = ctx.adapter_info().clone();
    assert_eq!(
        tested,
        expected_variants(info.backend),
        "{} ({:?}) offers other shader variants than its backend's entry",
        info.name,
        info.backend
    );
    let chosen = ctx.variant();
    for variant in gpu::ShaderVariant::ALL {
        assert_eq!(
            ctx.set_variant(variant).is_ok(),
            tested.contains(&variant),
            "{variant:?}: set_variant disagrees with the capabilities"
        );
    }
    ctx.set_variant(chosen).expect("the variant chosen before");
    tested
}

fn pick<T: Copy>(rng: &mut SmallRng, items: &[T]) -> T {
    items[rng.random_range(0..items.len())]
}

/// Activations with the awkward values a real model produces and a few it should not.
fn activations(rng: &mut SmallRng, rows: usize, cols: usize) -> Vec<f32> {
    let mut x = Vec::with_capacity(rows * cols);
    for _ in 0..rows {
        let kind = rng.random_range(0..10);
        let magnitude = pick(rng, &[1.0f32, 1e-30, 1e30, 3e-6, 50.0]);
        for c in 0..cols {
            let v = match kind {
                // An all-zero row.
                0 => 0.0,
                // Exact half-way products: max 127 gives s = 1, so x.5 rounds half to even.
                1 => {
                    if c == 0 {
                        127.0
                    } else {
                        rng.random_range(-60i32..60) as f32 + 0.5
                    }
                }
                // One outlier among small values.
                2 => {
                    if c == cols / 2 {
                        1e4
                    } else {
                        rng.random_range(-1.0f32..1.0)
                    }
                }
                _ => rng.random_range(-1.0f32..1.0) * magnitude,
            };
            x.push(v);
        }
    }
    x
}

/// Compares quantized activations bit for bit (a NaN scale must be a NaN scale).
fn assert_activations_eq(gpu: &QuantizedActivations, cpu: &QuantizedActivations, what: &str) {
    assert_eq!(gpu.codes, cpu.codes, "{what}: codes");
    assert_eq!(gpu.sums, cpu.sums, "{what}: code sums");
    for (row, (g, c)) in gpu.scales.iter().zip(&cpu.scales).enumerate() {
        assert!(
            g.to_bits() == c.to_bits() || (g.is_nan() && c.is_nan()),
            "{what}: scale of row {row}: gpu {g:e} cpu {c:e}"
        );
    }
}

async fn gpu_act_quant(
    ctx: &GpuContext,
    x: &[f32],
    rows: usize,
    cols: usize,
) -> QuantizedActivations {
    let input = ctx.upload("x", x).expect("upload");
    let acts = GpuActivations::new(ctx, rows, cols).expect("activations");
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    let mut pass = encoder.begin_compute_pass(&Default::default());
    gpu::act_quant::record(ctx, &mut pass, &input, &acts).expect("record");
    drop(pass);
    ctx.queue.submit([encoder.finish()]);
    acts.read(ctx).await.expect("read back")
}

/// act_quant.wgsl == cpu::act_quant, bit for bit, on 200 random inputs per variant.
pub async fn act_quant_matches_cpu(ctx: &mut GpuContext) {
    for variant in variants(ctx) {
        ctx.set_variant(variant).expect("variant");
        let mut rng = SmallRng::seed_from_u64(1);
        for case in 0..200 {
            let rows = pick(&mut rng, &ODD_ROWS);
            let cols = pick(&mut rng, &ODD_COLS);
            let mut x = activations(&mut rng, rows, cols);
            if case % 17 == 3 {
                let i = rng.random_range(0..x.len());
                x[i] = pick(&mut rng, &[f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
            }
            let expected = cpu::act_quant(&x, rows, cols).expect("cpu");
            let got = gpu_act_quant(ctx, &x, rows, cols).await;
            assert_activations_eq(
                &got,
                &expected,
                &format!("{variant:?} case {case} ({rows}x{cols})"),
            );
        }
    }
}

fn weight_options(rng: &mut SmallRng) -> WeightQuantOptions {
    WeightQuantOptions {
        granularity: if rng.random_bool(0.5) {
            ScaleGranularity::PerChannel
        } else {
            ScaleGranularity::PerTensor
        },
        threshold: pick(rng, &[0.5f32, 0.5, 0.3, 0.75]),
    }
}

/// Latent weights with at least one nonzero ternary code, at magnitudes from under the 1e-5 floor
/// of mean |W| to 1e20, with some or most of them zero.
fn weights(rng: &mut SmallRng, len: usize) -> Vec<f32> {
    let magnitude = pick(rng, &[1.0f32, 0.02, 1e20, 1e-6, 1e-20]);
    let zero_share = pick(rng, &[0.0f64, 0.3, 0.9]);
    let mut w: Vec<f32> = (0..len)
        .map(|_| {
            if rng.random_bool(zero_share) {
                0.0
            } else {
                rng.random_range(-1.0f32..1.0) * magnitude
            }
        })
        .collect();
    if magnitude < 1e-5 {
        // Under the floor the scale is 1e5 and these weights alone all quantize to 0: one in
        // eight becomes an outlier that quantizes to ±1 while the mean stays under the floor
        // (in groups of more than a dozen weights).
        for v in w.iter_mut().step_by(8) {
            *v = rng.random_range(1e-5f32..1e-4) * pick(rng, &[1.0f32, -1.0]);
        }
    } else {
        // One nonzero weight is enough: where mean |W| is at or above the floor, the largest
        // |w| * scale is at least 1, above every threshold.
        let i = rng.random_range(0..len);
        w[i] = rng.random_range(0.5f32..1.0) * pick(rng, &[magnitude, -magnitude]);
    }
    w
}

/// Every 25th ternary_pack and ternary_matmul case quantizes weights whose codes are all 0.
fn zero_codes_case(case: usize) -> bool {
    case.is_multiple_of(25)
}

/// Weights whose codes are all 0: exact zeros, or a mean |W| under the 1e-5 floor (scale 1e5)
/// with every |w| * 1e5 at most 0.1, under every threshold.
fn zero_code_weights(rng: &mut SmallRng, len: usize) -> Vec<f32> {
    let magnitude = pick(rng, &[0.0f32, 1e-6, 1e-20]);
    (0..len)
        .map(|_| rng.random_range(-1.0f32..1.0) * magnitude)
        .collect()
}

/// Whether any code of a packed matrix is nonzero.
fn has_nonzero_code(packed: &cpu::PackedTernary) -> bool {
    bitnet_wgpu::packing::gpu_words::unpack(&packed.words, packed.rows, packed.cols)
        .expect("unpack")
        .iter()
        .any(|&c| c != 0)
}

/// Checks that a case's codes are all 0 exactly where `zero_codes_case` says so, and returns
/// whether it has nonzero codes.
fn check_codes(case: usize, packed: &cpu::PackedTernary, what: &str) -> bool {
    let real = has_nonzero_code(packed);
    assert_eq!(real, !zero_codes_case(case), "{what}: nonzero codes");
    real
}

async fn assert_pack_eq(
    ctx: &GpuContext,
    packed: gpu::GpuTernary,
    expected: cpu::PackedTernary,
    what: &str,
) {
    let got = packed.read(ctx).await.expect("read back");
    assert_eq!(got.words, expected.words, "{what}: packed words");
    let got_bits: Vec<u32> = got.scales.iter().map(|s| s.to_bits()).collect();
    let want_bits: Vec<u32> = expected.scales.iter().map(|s| s.to_bits()).collect();
    assert_eq!(
        got_bits, want_bits,
        "{what}: scales {:?} vs {:?}",
        got.scales, expected.scales
    );
}

/// ternary_pack.wgsl == cpu::ternary_pack: words and scales bit for bit.
/// All but the zero-code cases quantize to some nonzero codes.
pub async fn ternary_pack_matches_cpu(ctx: &mut GpuContext) {
    const CASES: usize = 200;
    for variant in variants(ctx) {
        ctx.set_variant(variant).expect("variant");
        let mut rng = SmallRng::seed_from_u64(2);
        let mut real = 0;
        for case in 0..CASES {
            let rows = pick(&mut rng, &ODD_ROWS);
            let cols = pick(&mut rng, &ODD_COLS);
            let opts = weight_options(&mut rng);
            let what = format!("{variant:?} case {case} ({rows}x{cols}, {opts:?})");
            let w = if zero_codes_case(case) {
                zero_code_weights(&mut rng, rows * cols)
            } else {
                weights(&mut rng, rows * cols)
            };
            let mut encoder = ctx.device.create_command_encoder(&Default::default());
            let mut pass = encoder.begin_compute_pass(&Default::default());
            let expected = cpu::ternary_pack(&w, rows, cols, opts).expect("cpu");
            real += usize::from(check_codes(case, &expected, &what));
            let packed = pack_on_gpu(ctx, &mut pass, &w, rows, cols, opts).expect("record");
            drop(pass);
            ctx.queue.submit([encoder.finish()]);
            assert_pack_eq(ctx, packed, expected, &what).await;
        }
        eprintln!("ternary_pack {variant:?}: {real} of {CASES} cases with nonzero codes");
        assert_eq!(real, CASES - CASES.div_ceil(25), "{variant:?}: real cases");
    }
}

/// Uploads f32 weights and records their quantization and packing, as the trainer does with its
/// latent weights.
fn pack_on_gpu(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    w: &[f32],
    rows: usize,
    cols: usize,
    opts: WeightQuantOptions,
) -> bitnet_wgpu::Result<gpu::GpuTernary> {
    let input = ctx.upload("weights", w)?;
    gpu::ternary_pack::record_from_buffer(ctx, pass, &input, rows, cols, opts)
}

/// A matrix large enough for three levels of the GPU sum (over 2^20 elements).
pub async fn ternary_pack_large_matches_cpu(ctx: &mut GpuContext) {
    let mut rng = SmallRng::seed_from_u64(3);
    let (rows, cols) = (1031, 1043);
    let w: Vec<f32> = (0..rows * cols)
        .map(|_| rng.random_range(-0.05f32..0.05))
        .collect();
    for granularity in [ScaleGranularity::PerTensor, ScaleGranularity::PerChannel] {
        let opts = WeightQuantOptions {
            granularity,
            threshold: 0.5,
        };
        let expected = cpu::ternary_pack(&w, rows, cols, opts).expect("cpu");
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        let mut pass = encoder.begin_compute_pass(&Default::default());
        let packed = pack_on_gpu(ctx, &mut pass, &w, rows, cols, opts).expect("record");
        drop(pass);
        ctx.queue.submit([encoder.finish()]);
        assert_pack_eq(
            ctx,
            packed,
            expected,
            &format!("{rows}x{cols} {granularity:?}"),
        )
        .await;
    }
}

async fn gpu_matmul(
    ctx: &GpuContext,
    x: &[f32],
    rows: usize,
    packed: &cpu::PackedTernary,
    bias: Option<&[f32]>,
    options: MatmulOptions,
    y_before: &[f32],
) -> Vec<f32> {
    let input = ctx.upload("x", x).expect("upload");
    let acts = GpuActivations::new(ctx, rows, packed.cols).expect("activations");
    let w = gpu::GpuTernary::upload(ctx, packed).expect("weights");
    let bias = bias.map(|b| ctx.upload("bias", b).expect("bias"));
    let y = ctx.upload("y", y_before).expect("y");
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    let mut pass = encoder.begin_compute_pass(&Default::default());
    gpu::act_quant::record(ctx, &mut pass, &input, &acts).expect("act_quant");
    gpu::ternary_matmul::record(ctx, &mut pass, &acts, &w, bias.as_ref(), &y, options)
        .expect("matmul");
    drop(pass);
    ctx.queue.submit([encoder.finish()]);
    ctx.read(&y, rows * packed.rows).await.expect("read back")
}

/// ternary_matmul.wgsl == cpu::ternary_matmul on both paths: accumulators bit for bit, scaled
/// outputs within EPILOGUE_REL_TOL, NaN rows where the activations held a NaN or infinity.
pub async fn ternary_matmul_matches_cpu(ctx: &mut GpuContext) {
    const CASES: usize = 200;
    let ms = [1usize, 1, 2, 3, 7, 8, 9, 33, 40, 70];
    // Past 1024 columns each GEMV invocation loops over more than one group of words; 2560 and
    // 6912 are 2B4T's hidden and intermediate sizes.
    let ks = [1usize, 3, 4, 15, 16, 17, 100, 129, 300, 1030, 2560, 6912];
    let ns = [1usize, 2, 3, 5, 31, 33, 64, 65];
    for variant in variants(ctx) {
        ctx.set_variant(variant).expect("variant");
        let mut rng = SmallRng::seed_from_u64(4);
        let (mut real, mut nonzero_acc) = (0, 0);
        for case in 0..CASES {
            let (m, k, n) = (
                pick(&mut rng, &ms),
                pick(&mut rng, &ks),
                pick(&mut rng, &ns),
            );
            let opts = weight_options(&mut rng);
            let w = if zero_codes_case(case) {
                zero_code_weights(&mut rng, n * k)
            } else {
                weights(&mut rng, n * k)
            };
            let packed = cpu::ternary_pack(&w, n, k, opts).expect("pack");
            let what = format!("{variant:?} case {case} (m {m}, k {k}, n {n}, {opts:?})");
            real += usize::from(check_codes(case, &packed, &what));
            let ternary = cpu::TernaryWeights {
                rows: n,
                cols: k,
                codes: bitnet_wgpu::packing::gpu_words::unpack(&packed.words, n, k)
                    .expect("unpack"),
                scales: packed.scales.clone(),
            };
            let mut x = activations(&mut rng, m, k);
            if case % 23 == 5 {
                let i = rng.random_range(0..x.len());
                x[i] = f32::NAN;
            }
            let bias: Option<Vec<f32>> = rng
                .random_bool(0.5)
                .then(|| (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect());
            let qx = cpu::act_quant(&x, m, k).expect("cpu act_quant");
            let acc = cpu::ternary_matmul_acc(&qx, &ternary).expect("cpu acc");
            nonzero_acc += usize::from(acc.iter().any(|&a| a != 0));
            let y = cpu::ternary_matmul(&qx, &ternary, bias.as_deref()).expect("cpu matmul");
            let zeros = vec![0.0f32; m * n];
            for path in [MatmulPath::Gemv, MatmulPath::Gemm] {
                let what = format!("{what} {path:?}");
                let got = gpu_matmul(
                    ctx,
                    &x,
                    m,
                    &packed,
                    bias.as_deref(),
                    MatmulOptions {
                        path,
                        output: MatmulOutput::Accumulator,
                    },
                    &zeros,
                )
                .await;
                for (i, (g, c)) in got.iter().zip(&acc).enumerate() {
                    let row_is_nan = qx.scales[i / n].is_nan();
                    if !row_is_nan {
                        assert_eq!(*g, *c as f32, "{what}: accumulator {i}");
                    }
                }
                let got = gpu_matmul(
                    ctx,
                    &x,
                    m,
                    &packed,
                    bias.as_deref(),
                    MatmulOptions {
                        path,
                        output: MatmulOutput::Scaled,
                    },
                    &zeros,
                )
                .await;
                for (i, (g, c)) in got.iter().zip(&y).enumerate() {
                    let b = bias.as_ref().map_or(0.0, |b| b[i % n].abs());
                    assert_close(*g, *c, c.abs() + b, &format!("{what}: output {i}"));
                }
                // Added to a residual stream: one more f32 addition per output.
                let residual: Vec<f32> =
                    (0..m * n).map(|_| rng.random_range(-4.0f32..4.0)).collect();
                let got = gpu_matmul(
                    ctx,
                    &x,
                    m,
                    &packed,
                    bias.as_deref(),
                    MatmulOptions {
                        path,
                        output: MatmulOutput::AddScaled,
                    },
                    &residual,
                )
                .await;
                for (i, g) in got.iter().enumerate() {
                    let (c, r) = (y[i], residual[i]);
                    let b = bias.as_ref().map_or(0.0, |b| b[i % n].abs());
                    assert_close(
                        *g,
                        r + c,
                        c.abs() + b + r.abs(),
                        &format!("{what}: residual {i}"),
                    );
                }
            }
        }
        eprintln!(
            "ternary_matmul {variant:?}: {real} of {CASES} cases with nonzero codes, \
             {nonzero_acc} with nonzero accumulators"
        );
        assert_eq!(real, CASES - CASES.div_ceil(25), "{variant:?}: real cases");
        // The others meet activation rows whose codes are all 0 or whose scale is NaN, which
        // act_quant's own cases are about.
        assert!(
            nonzero_acc >= CASES * 3 / 4,
            "{variant:?}: only {nonzero_acc} cases with nonzero accumulators"
        );
    }
}

/// Weights quantized and packed on the GPU feed the GPU matmul and agree with the CPU pipeline.
pub async fn gpu_pipeline_matches_cpu(ctx: &mut GpuContext) {
    let mut rng = SmallRng::seed_from_u64(5);
    for case in 0..20 {
        let (m, k, n) = (
            pick(&mut rng, &[1usize, 5, 12]),
            pick(&mut rng, &[33usize, 160, 257]),
            pick(&mut rng, &[7usize, 48]),
        );
        let opts = weight_options(&mut rng);
        let w = weights(&mut rng, n * k);
        let x = activations(&mut rng, m, k);
        let expected = {
            let t = cpu::weight_quant(&w, n, k, opts).expect("cpu quant");
            cpu::ternary_matmul(&cpu::act_quant(&x, m, k).expect("cpu"), &t, None)
                .expect("cpu matmul")
        };
        let input = ctx.upload("x", &x).expect("upload");
        let acts = GpuActivations::new(ctx, m, k).expect("activations");
        let y = ctx.storage("y", (m * n * 4) as u64).expect("y");
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        let mut pass = encoder.begin_compute_pass(&Default::default());
        let packed = pack_on_gpu(ctx, &mut pass, &w, n, k, opts).expect("pack");
        gpu::act_quant::record(ctx, &mut pass, &input, &acts).expect("act_quant");
        gpu::ternary_matmul::record(
            ctx,
            &mut pass,
            &acts,
            &packed,
            None,
            &y,
            MatmulOptions::default(),
        )
        .expect("matmul");
        drop(pass);
        ctx.queue.submit([encoder.finish()]);
        let got: Vec<f32> = ctx.read(&y, m * n).await.expect("read back");
        for (i, (g, c)) in got.iter().zip(&expected).enumerate() {
            assert_close(*g, *c, c.abs(), &format!("case {case} output {i}"));
        }
    }
}

/// Shape errors are errors, not panics or hangs.
pub async fn bad_shapes_are_errors(ctx: &mut GpuContext) {
    let acts = GpuActivations::new(ctx, 2, 17).expect("activations");
    let small = ctx.upload("x", &[0.0f32; 3]).expect("upload");
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    let mut pass = encoder.begin_compute_pass(&Default::default());
    assert!(gpu::act_quant::record(ctx, &mut pass, &small, &acts).is_err());
    let packed =
        cpu::ternary_pack(&[0.5; 16 * 3], 3, 16, WeightQuantOptions::default()).expect("pack");
    let w = gpu::GpuTernary::upload(ctx, &packed).expect("upload");
    let y = ctx.storage("y", 64).expect("y");
    let r = gpu::ternary_matmul::record(
        ctx,
        &mut pass,
        &acts,
        &w,
        None,
        &y,
        MatmulOptions::default(),
    );
    assert!(r.is_err(), "17 columns against 16 must be an error");
    assert!(GpuActivations::new(ctx, 1, 0).is_err());
    let four = ctx.upload("four weights", &[1.0f32; 4]).expect("upload");
    assert!(
        gpu::ternary_pack::record_from_buffer(
            ctx,
            &mut pass,
            &four,
            2,
            3,
            WeightQuantOptions::default()
        )
        .is_err(),
        "4 weights cannot be 2 x 3"
    );
    let limit = ctx.capabilities().max_storage_binding;
    assert!(matches!(
        ctx.storage("too big", limit + 4),
        Err(bitnet_wgpu::Error::Limit { .. })
    ));
    ctx.check().expect("no device error was raised");
}
