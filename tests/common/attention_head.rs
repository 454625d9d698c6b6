//! GPU-vs-CPU cases for attention, the chunked tables, embedding lookup and the lm_head.
//! Tolerances: attention within ATTENTION_REL_TOL of the largest |value| the head attends over
//! plus ATTENTION_ABS_TOL; lm_head within EPILOGUE_REL_TOL of sum |x_i * w_i| per logit;
//! embeddings bit for bit (f16 tables widen exactly).

use bitnet_wgpu::cpu::{self, AttentionShape};
use bitnet_wgpu::gpu::{self, GpuContext, GpuTable, TableStorage};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{EPILOGUE_REL_TOL, pick, variants};

/// exp and division in WGSL are a few ulp off and the online softmax rescales in another order
/// than the CPU's two passes: 1e-5 of the output's magnitude covers both with room.
pub const ATTENTION_REL_TOL: f32 = 1e-5;
pub const ATTENTION_ABS_TOL: f32 = 1e-6;

const HEADS: [(usize, usize); 4] = [(1, 1), (2, 1), (4, 2), (3, 3)];
const HEAD_DIMS: [usize; 4] = [2, 20, 64, 128];

fn uniform(rng: &mut SmallRng, len: usize, magnitude: f32) -> Vec<f32> {
    (0..len)
        .map(|_| rng.random_range(-1.0f32..1.0) * magnitude)
        .collect()
}

/// One attention call on the GPU; the caches hold `capacity >= total` rows, the rows past
/// `total` filled with huge values that would show if the kernel read them.
#[allow(clippy::too_many_arguments)]
async fn gpu_attention(
    ctx: &GpuContext,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    capacity: usize,
    new_rows: usize,
    total: usize,
    shape: AttentionShape,
) -> Vec<f32> {
    let kv_width = shape.kv_heads * shape.head_dim;
    let pad = |x: &[f32]| {
        let mut x = x.to_vec();
        x.resize(capacity * kv_width, 1e30);
        x
    };
    let q_buf = ctx.upload("q", q).expect("upload");
    let k_buf = ctx.upload("k cache", &pad(k)).expect("upload");
    let v_buf = ctx.upload("v cache", &pad(v)).expect("upload");
    let out = ctx.storage("out", (q.len() * 4) as u64).expect("out");
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    let mut pass = encoder.begin_compute_pass(&Default::default());
    gpu::attention::record(
        ctx, &mut pass, &q_buf, &k_buf, &v_buf, &out, new_rows, total, shape,
    )
    .expect("record");
    drop(pass);
    ctx.queue.submit([encoder.finish()]);
    ctx.read(&out, q.len()).await.expect("read back")
}

/// Runs one case and checks it against cpu::attention; returns the largest error seen as a
/// share of the tolerance.
async fn check_attention(
    ctx: &GpuContext,
    rng: &mut SmallRng,
    shape: AttentionShape,
    new_rows: usize,
    total: usize,
    what: &str,
) -> f32 {
    let q_width = shape.heads * shape.head_dim;
    let kv_width = shape.kv_heads * shape.head_dim;
    let magnitude = pick(rng, &[0.5f32, 1.0, 2.0]);
    let q = uniform(rng, new_rows * q_width, magnitude);
    let k = uniform(rng, total * kv_width, magnitude);
    let v_magnitude = pick(rng, &[1.0f32, 1e-3, 100.0]);
    let v = uniform(rng, total * kv_width, v_magnitude);
    let capacity = total + rng.random_range(0..4);
    let expected = cpu::attention(&q, &k, &v, shape).expect("cpu");
    let got = gpu_attention(ctx, &q, &k, &v, capacity, new_rows, total, shape).await;
    assert_eq!(got.len(), expected.len());
    let group = shape.heads / shape.kv_heads;
    // prefix_max[j * kv_heads + kv]: the largest |value| of kv head kv in rows 0..=j.
    let mut prefix_max = vec![0.0f32; total * shape.kv_heads];
    for j in 0..total {
        for kv in 0..shape.kv_heads {
            let row = &v[j * kv_width + kv * shape.head_dim..][..shape.head_dim];
            let before = if j == 0 {
                0.0
            } else {
                prefix_max[(j - 1) * shape.kv_heads + kv]
            };
            prefix_max[j * shape.kv_heads + kv] = row.iter().fold(before, |m, x| m.max(x.abs()));
        }
    }
    let mut worst = 0.0f32;
    for (i, (g, c)) in got.iter().zip(&expected).enumerate() {
        let (r, h) = (i / q_width, i % q_width / shape.head_dim);
        let visible = total - new_rows + r + 1;
        let kv = h / group;
        let v_max = prefix_max[(visible - 1) * shape.kv_heads + kv];
        let tol = ATTENTION_REL_TOL * v_max + ATTENTION_ABS_TOL;
        assert!(
            (g - c).abs() <= tol,
            "{what}: output {i} (row {r}, head {h}): gpu {g:e} cpu {c:e}"
        );
        worst = worst.max((g - c).abs() / tol);
    }
    worst
}

fn attention_shape(rng: &mut SmallRng) -> AttentionShape {
    let (heads, kv_heads) = pick(rng, &HEADS);
    AttentionShape {
        heads,
        kv_heads,
        head_dim: pick(rng, &HEAD_DIMS),
    }
}

/// attention.wgsl == cpu::attention within ATTENTION_REL_TOL, on 200 random decode and
/// prefill shapes per variant.
pub async fn attention_matches_cpu(ctx: &mut GpuContext) {
    let mut worst = 0.0f32;
    for variant in variants(ctx) {
        ctx.set_variant(variant).expect("variant");
        let mut rng = SmallRng::seed_from_u64(11);
        for case in 0..200 {
            let shape = attention_shape(&mut rng);
            let total = rng.random_range(1..=300);
            let new_rows = match case % 3 {
                0 => 1,
                1 => rng.random_range(1..=total.min(17)),
                _ => total.min(rng.random_range(1..=40)),
            };
            let what = format!("{variant:?} case {case} ({shape:?}, {new_rows} of {total} rows)");
            worst = worst.max(check_attention(ctx, &mut rng, shape, new_rows, total, &what).await);
        }
    }
    eprintln!("attention: largest error {worst:.3} of the tolerance");
}

/// Long caches: decode and a short prefill over up to 4096 positions, head_dim 128; decode
/// around the 64-key split boundaries; BitNet 2B4T's heads with prefills of one key tile split
/// or not, and a block of a few rows over a long cache.
pub async fn attention_long_context_matches_cpu(ctx: &mut GpuContext) {
    let mut rng = SmallRng::seed_from_u64(12);
    for (total, new_rows) in [(4096, 1), (4096, 3), (2049, 1), (257, 257)] {
        for (heads, kv_heads) in [(4, 2), (2, 2)] {
            let shape = AttentionShape {
                heads,
                kv_heads,
                head_dim: 128,
            };
            let what = format!("{shape:?}, {new_rows} of {total} rows");
            check_attention(ctx, &mut rng, shape, new_rows, total, &what).await;
        }
    }
    let cases = [
        (1, 1, 128),
        (64, 1, 128),
        (65, 1, 20),
        (255, 1, 128),
        (256, 2, 64),
        (257, 4, 128),
        (1000, 1, 2),
        (1000, 4, 128),
        (300, 300, 128),
        (700, 5, 128),
        (200, 200, 256),
        (40, 17, 255),
    ];
    for (total, new_rows, head_dim) in cases {
        for (heads, kv_heads) in [(20, 5), (1, 1)] {
            let shape = AttentionShape {
                heads,
                kv_heads,
                head_dim,
            };
            let what = format!("{shape:?}, {new_rows} of {total} rows");
            check_attention(ctx, &mut rng, shape, new_rows, total, &what).await;
        }
    }
}

/// Table shapes: odd sizes, and chunk sizes that split them unevenly (0: the adapter's limit).
/// lm_head stages x 2560 columns at a time for one row, 640 for more: 2B4T's hidden size 2560
/// takes four spans of several rows, 2600 two spans of one row.
const TABLES: [(usize, usize); 8] = [
    (37, 40),
    (1001, 129),
    (5, 1),
    (64, 3),
    (300, 16),
    (2, 257),
    (50, 2560),
    (9, 2600),
];
const CHUNK_ROWS: [usize; 6] = [1, 2, 7, 64, 1000, 0];

/// A random table with f16 subnormals, zeros of both signs and values up to ±2.
fn table_values(rng: &mut SmallRng, len: usize) -> Vec<f32> {
    (0..len)
        .map(|_| match rng.random_range(0..10) {
            0 => pick(rng, &[0.0f32, -0.0]),
            1 => rng.random_range(-1.0f32..1.0) * 6e-5,
            _ => rng.random_range(-2.0f32..2.0),
        })
        .collect()
}

fn upload_table(
    ctx: &GpuContext,
    rng: &mut SmallRng,
    values: &[f32],
    vocab: usize,
    hidden: usize,
    storage: TableStorage,
) -> GpuTable {
    let chunk_rows = pick(rng, &CHUNK_ROWS);
    let table = if chunk_rows == 0 {
        GpuTable::upload_f32(ctx, values, vocab, hidden, storage)
    } else {
        GpuTable::upload_f32_chunked(ctx, values, vocab, hidden, storage, chunk_rows)
    }
    .expect("table upload");
    let per_chunk = if chunk_rows == 0 { vocab } else { chunk_rows };
    assert_eq!(table.chunk_count(), vocab.div_ceil(per_chunk));
    let row_bytes = match storage {
        TableStorage::F32 => 4 * hidden,
        TableStorage::F16 => 2 * hidden,
    }
    .next_multiple_of(16);
    assert_eq!(table.bytes(), (vocab * row_bytes) as u64);
    table
}

/// embedding.wgsl == cpu::embedding bit for bit, f32 and f16 tables, chunked and whole.
pub async fn embedding_matches_cpu(ctx: &mut GpuContext) {
    for variant in variants(ctx) {
        ctx.set_variant(variant).expect("variant");
        let mut rng = SmallRng::seed_from_u64(13);
        for case in 0..200 {
            let (vocab, hidden) = pick(&mut rng, &TABLES);
            let storage = pick(&mut rng, &[TableStorage::F32, TableStorage::F16]);
            let values = table_values(&mut rng, vocab * hidden);
            let table = upload_table(ctx, &mut rng, &values, vocab, hidden, storage);
            let rows = rng.random_range(1..=20);
            let tokens: Vec<u32> = (0..rows)
                .map(|_| rng.random_range(0..vocab as u32))
                .collect();
            let rounded: Vec<f32> = values.iter().map(|&v| storage.round(v)).collect();
            let expected = cpu::embedding(&rounded, vocab, hidden, &tokens).expect("cpu");
            let token_buf = ctx.upload("tokens", &tokens).expect("upload");
            let out = ctx.storage("out", (rows * hidden * 4) as u64).expect("out");
            let mut encoder = ctx.device.create_command_encoder(&Default::default());
            let mut pass = encoder.begin_compute_pass(&Default::default());
            gpu::embedding::record(ctx, &mut pass, &table, &token_buf, &out, rows).expect("record");
            drop(pass);
            ctx.queue.submit([encoder.finish()]);
            let got: Vec<f32> = ctx.read(&out, rows * hidden).await.expect("read back");
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&got),
                bits(&expected),
                "{variant:?} case {case} ({vocab}x{hidden} {storage:?}, {} chunks)",
                table.chunk_count()
            );
        }
    }
}

/// lm_head.wgsl == cpu::lm_head within EPILOGUE_REL_TOL of sum |x_i * w_i|, f32 and f16
/// tables, chunked and whole.
pub async fn lm_head_matches_cpu(ctx: &mut GpuContext) {
    for variant in variants(ctx) {
        ctx.set_variant(variant).expect("variant");
        let mut rng = SmallRng::seed_from_u64(14);
        for case in 0..200 {
            let (vocab, hidden) = pick(&mut rng, &TABLES);
            let storage = pick(&mut rng, &[TableStorage::F32, TableStorage::F16]);
            let values = table_values(&mut rng, vocab * hidden);
            let table = upload_table(ctx, &mut rng, &values, vocab, hidden, storage);
            let rows = pick(&mut rng, &[1usize, 1, 2, 3, 4, 5, 8, 9]);
            let magnitude = pick(&mut rng, &[1.0f32, 1e-3, 30.0]);
            let x = uniform(&mut rng, rows * hidden, magnitude);
            let rounded: Vec<f32> = values.iter().map(|&v| storage.round(v)).collect();
            let expected = cpu::lm_head(&x, rows, &rounded, vocab, hidden).expect("cpu");
            let x_buf = ctx.upload("x", &x).expect("upload");
            let logits = ctx
                .storage("logits", (rows * vocab * 4) as u64)
                .expect("logits");
            let mut encoder = ctx.device.create_command_encoder(&Default::default());
            let mut pass = encoder.begin_compute_pass(&Default::default());
            gpu::lm_head::record(ctx, &mut pass, &x_buf, &table, &logits, rows).expect("record");
            drop(pass);
            ctx.queue.submit([encoder.finish()]);
            let got: Vec<f32> = ctx.read(&logits, rows * vocab).await.expect("read back");
            for (i, (g, c)) in got.iter().zip(&expected).enumerate() {
                let (r, v) = (i / vocab, i % vocab);
                let magnitude: f32 = (0..hidden)
                    .map(|k| (x[r * hidden + k] * rounded[v * hidden + k]).abs())
                    .sum();
                assert!(
                    (g - c).abs() <= EPILOGUE_REL_TOL * magnitude + f32::MIN_POSITIVE,
                    "{variant:?} case {case} ({vocab}x{hidden} {storage:?}, {rows} rows, {} \
                     chunks): logit {i}: gpu {g:e} cpu {c:e}",
                    table.chunk_count()
                );
            }
        }
    }
}

/// Bad shapes and bad tables are errors, not panics or device errors.
pub async fn attention_head_bad_shapes_are_errors(ctx: &mut GpuContext) {
    let buf = ctx.storage("buf", 4096).expect("buf");
    let big = ctx.storage("big", 1 << 20).expect("big");
    let mut encoder = ctx.device.create_command_encoder(&Default::default());
    let mut pass = encoder.begin_compute_pass(&Default::default());
    let shape = AttentionShape {
        heads: 4,
        kv_heads: 2,
        head_dim: 64,
    };
    let kv = ctx.storage("kv", 1 << 20).expect("kv");
    let attention = |pass: &mut wgpu::ComputePass<'_>, q, out, new_rows, total, shape| {
        gpu::attention::record(ctx, pass, q, &kv, &kv, out, new_rows, total, shape)
    };
    let cases = [
        ("4 of 3 rows", &big, &buf, 4, 3),
        ("q too small", &buf, &big, 5, 5),
        ("cache too small", &big, &buf, 1, 3000),
        ("q and out the same buffer", &big, &big, 1, 1),
        ("a fitting call", &big, &buf, 1, 1),
    ];
    for (what, q, out, new_rows, total) in cases {
        let result = attention(&mut pass, q, out, new_rows, total, shape);
        assert_eq!(result.is_ok(), what == "a fitting call", "{what}");
    }
    for bad in [(3, 2, 64), (0, 1, 64), (2, 1, 0), (1, 1, 257)] {
        let shape = AttentionShape {
            heads: bad.0,
            kv_heads: bad.1,
            head_dim: bad.2,
        };
        assert!(
            attention(&mut pass, &big, &buf, 1, 1, shape).is_err(),
            "{shape:?}"
        );
    }

    assert!(GpuTable::upload_f32(ctx, &[0.0; 5], 2, 3, TableStorage::F32).is_err());
    assert!(GpuTable::upload_f32(ctx, &[], 0, 3, TableStorage::F32).is_err());
    assert!(GpuTable::upload_f32(ctx, &[1.0, f32::NAN], 1, 2, TableStorage::F32).is_err());
    assert!(GpuTable::upload_f32(ctx, &[1.0, 1e6], 1, 2, TableStorage::F16).is_err());
    assert!(GpuTable::upload_f32_chunked(ctx, &[1.0; 4], 2, 2, TableStorage::F32, 0).is_err());
    let table =
        GpuTable::upload_f32(ctx, &[0.5; 37 * 40], 37, 40, TableStorage::F16).expect("table");
    let small = ctx.storage("small", 16).expect("small");
    assert!(gpu::embedding::record(ctx, &mut pass, &table, &big, &small, 2).is_err());
    assert!(gpu::embedding::record(ctx, &mut pass, &table, &small, &big, 5).is_err());
    assert!(gpu::lm_head::record(ctx, &mut pass, &small, &table, &big, 1).is_err());
    assert!(gpu::lm_head::record(ctx, &mut pass, &big, &table, &small, 1).is_err());
    assert!(gpu::lm_head::record(ctx, &mut pass, &big, &table, &big, 1).is_err());
    assert!(gpu::embedding::record(ctx, &mut pass, &table, &big, &big, 1).is_err());
    drop(pass);
    ctx.queue.submit([encoder.finish()]);
    ctx.check().expect("no device error was raised");
}
