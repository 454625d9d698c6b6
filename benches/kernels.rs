//! Kernel timings on the adapter `GpuContext::new()` picks, for the linear shapes of BitNet b1.58
//! 2B4T, beside two yardsticks from the same run: an f32 WGSL matmul of the same shapes, and the
//! adapter's streaming-read rate against a ternary GEMV whose weights are far larger than any
//! cache. Prints Markdown tables for BENCHMARKS.md. `cargo bench --bench kernels`;
//! `BENCH_QUICK=1` times one call per figure, with smaller yardsticks, a correctness run for
//! software adapters, where timings mean nothing.
//!
//! Each figure records its calls (200) into one command buffer, submits once and waits, so the
//! per-call time includes the dispatch cost a real forward step pays, not a submit per call.
#![cfg_attr(target_arch = "wasm32", no_main)]
#![cfg(not(target_arch = "wasm32"))]

use std::time::Instant;

use bitnet_wgpu::cpu::{self, PackedTernary, WeightQuantOptions};
use bitnet_wgpu::gpu::{self, GpuActivations, GpuContext, MatmulOptions};
use bitnet_wgpu::packing::gpu_words;
use bitnet_wgpu::rng::SplitMix64;
use wgpu::util::DeviceExt;

const MIB: u64 = 1 << 20;

/// How many calls each figure times, after how many warm-up calls, and how large the yardsticks
/// are: the full run, or `BENCH_QUICK`'s.
#[derive(Clone, Copy)]
struct Runs {
    iters: usize,
    warmup: usize,
    stream_bytes: u64,
    far_gemv_bytes: u64,
}

impl Runs {
    fn from_env() -> Self {
        if std::env::var_os("BENCH_QUICK").is_some_and(|v| v != "0") {
            Runs {
                iters: 1,
                warmup: 0,
                stream_bytes: 256 * MIB,
                far_gemv_bytes: 64 * MIB,
            }
        } else {
            // 1 GiB and 256 MiB: many times the largest L2 cache (H200: 50 MB).
            Runs {
                iters: 200,
                warmup: 3,
                stream_bytes: 1024 * MIB,
                far_gemv_bytes: 256 * MIB,
            }
        }
    }
}

struct Shape {
    name: &'static str,
    m: usize,
    k: usize,
    n: usize,
    /// Also timed as an f32 matmul: every shape but the one that measures a dispatch's cost.
    f32_baseline: bool,
}

const SHAPES: [Shape; 7] = [
    Shape {
        name: "smallest (the cost of a dependent dispatch)",
        m: 1,
        k: 16,
        n: 4,
        f32_baseline: false,
    },
    Shape {
        name: "q/o proj",
        m: 1,
        k: 2560,
        n: 2560,
        f32_baseline: true,
    },
    Shape {
        name: "k/v proj",
        m: 1,
        k: 2560,
        n: 640,
        f32_baseline: true,
    },
    Shape {
        name: "gate/up proj",
        m: 1,
        k: 2560,
        n: 6912,
        f32_baseline: true,
    },
    Shape {
        name: "down proj",
        m: 1,
        k: 6912,
        n: 2560,
        f32_baseline: true,
    },
    Shape {
        name: "gate/up proj, 512-token prompt",
        m: 512,
        k: 2560,
        n: 6912,
        f32_baseline: true,
    },
    Shape {
        name: "down proj, 512-token prompt",
        m: 512,
        k: 6912,
        n: 2560,
        f32_baseline: true,
    },
];

/// Deterministic values in [-1, 1): benchmarks need no statistics.
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = SplitMix64(seed);
    (0..len).map(|_| rng.uniform_f32()).collect()
}

fn wait(ctx: &GpuContext) {
    ctx.device
        .poll(wgpu::PollType::wait_indefinitely())
        .expect("device poll");
}

/// How a benchmark lays out its calls.
#[derive(Clone, Copy, PartialEq)]
enum Passes {
    /// All calls in one compute pass, as a recorded forward step does.
    One,
    /// A compute pass per call.
    PerCall,
}

/// Per-call seconds of `record` recorded `runs.iters` times into one command buffer: on the CPU
/// (recording and `finish`, where wgpu encodes the commands), and on the GPU (submit to idle).
fn time(
    ctx: &GpuContext,
    runs: Runs,
    passes: Passes,
    mut record: impl FnMut(&mut wgpu::ComputePass<'_>),
) -> (f64, f64) {
    let mut run = |iters: usize| {
        let start = Instant::now();
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        if passes == Passes::One {
            let mut pass = encoder.begin_compute_pass(&Default::default());
            for _ in 0..iters {
                record(&mut pass);
            }
        } else {
            for _ in 0..iters {
                record(&mut encoder.begin_compute_pass(&Default::default()));
            }
        }
        let commands = encoder.finish();
        let recorded = start.elapsed().as_secs_f64();
        let start = Instant::now();
        ctx.queue.submit([commands]);
        wait(ctx);
        (recorded, start.elapsed().as_secs_f64())
    };
    run(runs.warmup);
    let (cpu, gpu) = run(runs.iters);
    ctx.check().expect("no device error");
    (cpu / runs.iters as f64, gpu / runs.iters as f64)
}

/// The f32 baseline (`kernels/f32_matmul.wgsl`): `y = x · wᵀ` with the ternary weights' layout,
/// a GEMV for as few rows as the ternary matmul's GEMV takes, a tiled GEMM otherwise.
struct F32Matmul {
    gemv: wgpu::ComputePipeline,
    gemm: wgpu::ComputePipeline,
}

/// One f32 product ready to record: its buffers bound to the pipeline its shape takes.
struct F32Problem {
    pipeline: wgpu::ComputePipeline,
    bind_group: wgpu::BindGroup,
    groups: (u32, u32),
    y: wgpu::Buffer,
}

/// Rows of `k` values widened with zeros to `k4` vec4s, the shader's layout.
fn padded(values: &[f32], rows: usize, k: usize, k4: usize) -> Vec<f32> {
    let mut out = vec![0.0; rows * k4 * 4];
    for (to, from) in out.chunks_exact_mut(k4 * 4).zip(values.chunks_exact(k)) {
        to[..k].copy_from_slice(from);
    }
    out
}

impl F32Matmul {
    fn new(ctx: &GpuContext) -> Self {
        let module = ctx
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some("f32_matmul"),
                source: wgpu::ShaderSource::Wgsl(include_str!("kernels/f32_matmul.wgsl").into()),
            });
        let pipeline = |entry| compute_pipeline(ctx, &module, entry);
        F32Matmul {
            gemv: pipeline("gemv"),
            gemm: pipeline("gemm"),
        }
    }

    fn prepare(
        &self,
        ctx: &GpuContext,
        x: &[f32],
        w: &[f32],
        m: usize,
        k: usize,
        n: usize,
    ) -> F32Problem {
        let k4 = k.div_ceil(4);
        let params = ctx
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some("f32 matmul params"),
                contents: bytemuck::cast_slice(&[m as u32, n as u32, k4 as u32, 0]),
                usage: wgpu::BufferUsages::UNIFORM,
            });
        let x = ctx.upload("f32 x", &padded(x, m, k, k4)).expect("upload x");
        let w = ctx.upload("f32 w", &padded(w, n, k, k4)).expect("upload w");
        let y = ctx.storage("f32 y", (m * n * 4) as u64).expect("y");
        let (pipeline, groups) = if m < gpu::ternary_matmul::GEMM_MIN_ROWS {
            (&self.gemv, (n.div_ceil(8), m))
        } else {
            (&self.gemm, (n.div_ceil(64), m.div_ceil(64)))
        };
        let bind_group = bind_group(ctx, pipeline, &[&params, &x, &w, &y]);
        F32Problem {
            pipeline: pipeline.clone(),
            bind_group,
            groups: (groups.0 as u32, groups.1 as u32),
            y,
        }
    }
}

impl F32Problem {
    fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_pipeline(&self.pipeline);
        pass.set_bind_group(0, &self.bind_group, &[]);
        pass.dispatch_workgroups(self.groups.0, self.groups.1, 1);
    }
}

fn compute_pipeline(
    ctx: &GpuContext,
    module: &wgpu::ShaderModule,
    entry: &str,
) -> wgpu::ComputePipeline {
    ctx.device
        .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: None,
            module,
            entry_point: Some(entry),
            compilation_options: Default::default(),
            cache: None,
        })
}

fn bind_group(
    ctx: &GpuContext,
    pipeline: &wgpu::ComputePipeline,
    buffers: &[&wgpu::Buffer],
) -> wgpu::BindGroup {
    let entries: Vec<_> = buffers
        .iter()
        .enumerate()
        .map(|(i, b)| wgpu::BindGroupEntry {
            binding: i as u32,
            resource: b.as_entire_binding(),
        })
        .collect();
    ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
        label: None,
        layout: &pipeline.get_bind_group_layout(0),
        entries: &entries,
    })
}

/// Holds the f32 baseline to a plain f32 matmul on odd shapes (partial tiles, rows padded to
/// vec4s, both kernels), so that a broken baseline is never timed.
fn check_f32_matmul(ctx: &GpuContext, f32_matmul: &F32Matmul) {
    for (m, k, n) in [(1, 83, 45), (3, 83, 45), (67, 83, 70)] {
        let x = values(m * k, 5);
        let w = values(n * k, 6);
        let problem = f32_matmul.prepare(ctx, &x, &w, m, k, n);
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        problem.record(&mut encoder.begin_compute_pass(&Default::default()));
        ctx.queue.submit([encoder.finish()]);
        let got: Vec<f32> = pollster::block_on(ctx.read(&problem.y, m * n)).expect("read y");
        for i in 0..m {
            for j in 0..n {
                let terms = (0..k).map(|l| x[i * k + l] * w[j * k + l]);
                let want: f32 = terms.clone().sum();
                let size: f32 = terms.map(f32::abs).sum();
                let got = got[i * n + j];
                assert!(
                    (got - want).abs() <= 1e-5 * size.max(1e-30),
                    "f32 matmul {m} x {k} -> {n}, y[{i}][{j}]: {got} on the GPU, {want} on the CPU"
                );
            }
        }
    }
}

/// The streaming-read kernel (`kernels/stream.wgsl`) over `bytes` of patterned words, in as
/// many buffers as the adapter's binding limit asks for.
struct Stream {
    pipeline: wgpu::ComputePipeline,
    chunks: Vec<(wgpu::BindGroup, wgpu::Buffer)>,
    bytes: u64,
    /// The wrapping sum of every word, which the workgroups' sums must add up to.
    sum: u32,
}

/// Workgroups of one streaming dispatch (256 invocations each, grid-stride): enough waves to
/// fill any GPU of today, few enough that each invocation has several loads to issue.
const STREAM_GROUPS: u64 = 8192;

impl Stream {
    fn new(ctx: &GpuContext, bytes: u64) -> Self {
        let caps = ctx.capabilities();
        let chunk = (256 * MIB)
            .min(caps.max_storage_binding)
            .min(caps.max_buffer)
            / MIB
            * MIB;
        let module = ctx
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some("stream"),
                source: wgpu::ShaderSource::Wgsl(include_str!("kernels/stream.wgsl").into()),
            });
        let pipeline = compute_pipeline(ctx, &module, "stream");
        let mut sum = 0u32;
        let mut chunks = Vec::new();
        let mut word = 0u32;
        for start in (0..bytes).step_by(chunk as usize) {
            let len = chunk.min(bytes - start) as usize / 4;
            let data: Vec<u32> = (0..len)
                .map(|_| {
                    word = word.wrapping_add(1);
                    let v = word.wrapping_mul(0x9E37_79B1);
                    sum = sum.wrapping_add(v);
                    v
                })
                .collect();
            let data = ctx
                .upload("stream data", &data)
                .expect("upload stream data");
            let groups = STREAM_GROUPS.min((len as u64).div_ceil(4 * 256));
            let sums = ctx.storage("stream sums", groups * 4).expect("sums");
            chunks.push((bind_group(ctx, &pipeline, &[&data, &sums]), sums));
        }
        Stream {
            pipeline,
            chunks,
            bytes,
            sum,
        }
    }

    fn record(&self, pass: &mut wgpu::ComputePass<'_>) {
        pass.set_pipeline(&self.pipeline);
        for (bind_group, sums) in &self.chunks {
            pass.set_bind_group(0, bind_group, &[]);
            pass.dispatch_workgroups((sums.size() / 4) as u32, 1, 1);
        }
    }

    fn check(&self, ctx: &GpuContext) {
        let mut sum = 0u32;
        for (_, sums) in &self.chunks {
            let got: Vec<u32> =
                pollster::block_on(ctx.read(sums, (sums.size() / 4) as usize)).expect("read sums");
            sum = got.iter().fold(sum, |a, &b| a.wrapping_add(b));
        }
        assert_eq!(
            sum, self.sum,
            "the streaming kernel did not read every word once"
        );
    }
}

/// Random ternary weights packed straight into GPU words, without the f32 matrix `ternary_pack`
/// would need (4 GiB for 256 MiB of words).
fn random_packed(rows: usize, cols: usize, seed: u64) -> PackedTernary {
    // A random byte to four 2-bit fields, each a valid code (0, 1 or 2): its base-3 digits.
    let trits: Vec<u32> = (0..256u32)
        .map(|r| {
            (0..4)
                .map(|i| ((r % 81) / 3u32.pow(i) % 3) << (2 * i))
                .sum()
        })
        .collect();
    let mut rng = SplitMix64(seed);
    let words = (0..rows * gpu_words::words_per_row(cols))
        .map(|_| {
            let r = rng.next_u64();
            (0..4).fold(0, |w, i| {
                w | trits[(r >> (8 * i)) as usize & 255] << (8 * i)
            })
        })
        .collect();
    PackedTernary {
        rows,
        cols,
        words,
        scales: vec![1.0],
    }
}

/// The project's ternary matmul as the model records it (no bias, default options).
fn ternary_matmul(
    ctx: &GpuContext,
    pass: &mut wgpu::ComputePass<'_>,
    acts: &GpuActivations,
    weights: &gpu::GpuTernary,
    y: &wgpu::Buffer,
) {
    gpu::ternary_matmul::record(ctx, pass, acts, weights, None, y, MatmulOptions::default())
        .expect("matmul");
}

fn main() {
    let runs = Runs::from_env();
    let ctx = pollster::block_on(GpuContext::new()).expect("a GPU adapter");
    let info = ctx.adapter_info();
    println!(
        "adapter: {} ({:?}, {:?}), variant {:?}",
        info.name,
        info.backend,
        info.device_type,
        ctx.variant()
    );
    println!(
        "calls per figure: {}, after {} warm-up calls",
        runs.iters, runs.warmup
    );
    let f32_matmul = F32Matmul::new(&ctx);
    check_f32_matmul(&ctx, &f32_matmul);
    println!();
    println!(
        "| shape (M x K -> N) | act_quant + matmul | matmul | matmul, a pass per call | weight bytes/s | int8 ops/s | CPU recording per act_quant + matmul |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let mut against_f32 = Vec::new();
    for shape in &SHAPES {
        let w = values(shape.n * shape.k, 1);
        let x = values(shape.m * shape.k, 2);
        let packed =
            cpu::ternary_pack(&w, shape.n, shape.k, WeightQuantOptions::default()).expect("pack");
        let weights = gpu::GpuTernary::upload(&ctx, &packed).expect("upload weights");
        let input = ctx.upload("x", &x).expect("upload x");
        let acts = GpuActivations::new(&ctx, shape.m, shape.k).expect("activations");
        let y = ctx.storage("y", (shape.m * shape.n * 4) as u64).expect("y");
        let matmul =
            |pass: &mut wgpu::ComputePass<'_>| ternary_matmul(&ctx, pass, &acts, &weights, &y);
        let (record_cpu, both) = time(&ctx, runs, Passes::One, |pass| {
            gpu::act_quant::record(&ctx, pass, &input, &acts).expect("act_quant");
            matmul(pass);
        });
        let (_, only) = time(&ctx, runs, Passes::One, matmul);
        let (_, per_pass) = time(&ctx, runs, Passes::PerCall, matmul);
        let bytes = (packed.words.len() * 4) as f64;
        let ops = 2.0 * (shape.m * shape.k * shape.n) as f64;
        println!(
            "| {} ({} x {} -> {}) | {:.1} us | {:.1} us | {:.1} us | {:.0} GB/s | {:.2} TOPS | {:.1} us |",
            shape.name,
            shape.m,
            shape.k,
            shape.n,
            both * 1e6,
            only * 1e6,
            per_pass * 1e6,
            bytes / only / 1e9,
            ops / only / 1e12,
            record_cpu * 1e6
        );
        if shape.f32_baseline {
            drop((weights, acts, y));
            let problem = f32_matmul.prepare(&ctx, &x, &w, shape.m, shape.k, shape.n);
            let (_, f32_time) = time(&ctx, runs, Passes::One, |pass| problem.record(pass));
            against_f32.push((shape, only, f32_time, ops));
        }
    }

    println!();
    println!(
        "| shape (M x K -> N) | ternary matmul | f32 matmul | ternary int8 ops/s | f32 flops/s | ternary speed / f32 speed |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for (shape, ternary, f32_time, ops) in against_f32 {
        println!(
            "| {} x {} -> {} | {:.1} us | {:.1} us | {:.2} TOPS | {:.2} TFLOPS | {:.2}x |",
            shape.m,
            shape.k,
            shape.n,
            ternary * 1e6,
            f32_time * 1e6,
            ops / ternary / 1e12,
            ops / f32_time / 1e12,
            f32_time / ternary
        );
    }

    let stream = Stream::new(&ctx, runs.stream_bytes);
    let (_, stream_time) = time(&ctx, runs, Passes::One, |pass| stream.record(pass));
    stream.check(&ctx);
    let stream_rate = stream.bytes as f64 / stream_time;
    let cols = 16384;
    let row_bytes = (gpu_words::words_per_row(cols) * 4) as u64;
    let rows = (runs
        .far_gemv_bytes
        .min(ctx.capabilities().max_storage_binding)
        / row_bytes) as usize;
    let packed = random_packed(rows, cols, 7);
    let weights = gpu::GpuTernary::upload(&ctx, &packed).expect("upload weights");
    let bytes = (packed.words.len() * 4) as f64;
    drop(packed);
    let input = ctx.upload("x", &values(cols, 8)).expect("upload x");
    let acts = GpuActivations::new(&ctx, 1, cols).expect("activations");
    let y = ctx.storage("y", (rows * 4) as u64).expect("y");
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    gpu::act_quant::record(
        &ctx,
        &mut encoder.begin_compute_pass(&Default::default()),
        &input,
        &acts,
    )
    .expect("act_quant");
    ctx.queue.submit([encoder.finish()]);
    let (_, gemv_time) = time(&ctx, runs, Passes::One, |pass| {
        ternary_matmul(&ctx, pass, &acts, &weights, &y)
    });
    let gemv_rate = bytes / gemv_time;
    println!();
    println!("| far beyond the caches | time per call | bytes/s | of the streaming read |");
    println!("| --- | --- | --- | --- |");
    println!(
        "| streaming read ({} MiB in {} bindings, vec4<u32> loads) | {:.1} us | {:.1} GB/s | 100% |",
        stream.bytes / MIB,
        stream.chunks.len(),
        stream_time * 1e6,
        stream_rate / 1e9
    );
    println!(
        "| ternary GEMV (1 x {cols} -> {rows}, {} MiB of weights) | {:.1} us | {:.1} GB/s | {:.1}% |",
        bytes as u64 / MIB,
        gemv_time * 1e6,
        gemv_rate / 1e9,
        100.0 * gemv_rate / stream_rate
    );
    drop((stream, weights, acts, y));

    let (rows, cols) = (6912, 2560);
    let w = values(rows * cols, 3);
    let start = Instant::now();
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    let mut pass = encoder.begin_compute_pass(&Default::default());
    let input = ctx.upload("weights", &w).expect("upload");
    let packed = gpu::ternary_pack::record_from_buffer(
        &ctx,
        &mut pass,
        &input,
        rows,
        cols,
        WeightQuantOptions::default(),
    )
    .expect("pack");
    drop(pass);
    ctx.queue.submit([encoder.finish()]);
    wait(&ctx);
    let elapsed = start.elapsed().as_secs_f64();
    drop(packed);
    println!();
    println!(
        "ternary_pack of {rows} x {cols} f32 weights on the GPU, upload included: {:.1} ms",
        elapsed * 1e3
    );
}
