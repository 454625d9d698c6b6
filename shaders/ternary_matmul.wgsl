// Packed ternary weights x int8 activations (cpu::ternary_matmul): y = acc / (s_x * s_w) + bias.
//
// Weights use the private layout of packing::gpu_words: per output row, words of 16 two-bit
// values w + 1, arranged so that (word >> 2t) & 0x03030303 holds, in its four bytes, w + 1 for
// columns 16j + 4t + i. dot4 of those bytes with the activation word for the same four columns
// gives sum(x * (w + 1)); subtracting the row's code sum (written by act_quant) leaves the exact
// int32 sum(x * w) without ever forming negative weight bytes.

const WG: u32 = 64u;
// Output rows per GEMV workgroup: each activation vector read is reused four times.
const ROWS: u32 = 4u;
// GEMM tile: TM tokens x TN output rows, TK weight words (16 columns each) per step.
const TM: u32 = 32u;
const TN: u32 = 32u;
const TK: u32 = 4u;

// When true, y holds the exact accumulator as f32 (exact while |acc| < 2^24) instead of the
// scaled output: it lets tests compare the integer core bit for bit.
override ACC_ONLY: bool = false;
// When true, the output is added to what y holds (a residual stream) instead of replacing it:
// one dispatch fewer than a separate add, and the same single f32 addition.
override ADD_TO_Y: bool = false;

struct Params {
    m: u32,
    n: u32,
    k_words: u32,
    per_channel: u32,
    has_bias: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
// Row m of the activations: k_words vec4s (4 words, 16 columns each).
@group(0) @binding(1) var<storage, read> x: array<vec4<u32>>;
@group(0) @binding(2) var<storage, read> x_scales: array<f32>;
@group(0) @binding(3) var<storage, read> x_sums: array<i32>;
@group(0) @binding(4) var<storage, read> w: array<u32>;
@group(0) @binding(5) var<storage, read> w_scales: array<f32>;
@group(0) @binding(6) var<storage, read> bias: array<f32>;
@group(0) @binding(7) var<storage, read_write> y: array<f32>;

fn lanes(word: u32, t: u32) -> u32 {
    return (word >> (2u * t)) & 0x03030303u;
}

fn dot_word(xv: vec4<u32>, word: u32) -> i32 {
    return dot4(xv.x, lanes(word, 0u)) + dot4(xv.y, lanes(word, 1u))
        + dot4(xv.z, lanes(word, 2u)) + dot4(xv.w, lanes(word, 3u));
}

fn epilogue(m: u32, n: u32, biased: i32) -> f32 {
    let acc = biased - x_sums[m];
    if ACC_ONLY {
        return f32(acc);
    }
    let sw = w_scales[select(0u, n, params.per_channel == 1u)];
    var v = f32(acc) / (x_scales[m] * sw);
    if params.has_bias == 1u {
        v += bias[n];
    }
    return v;
}

fn store(i: u32, v: f32) {
    if ADD_TO_Y {
        y[i] = y[i] + v;
    } else {
        y[i] = v;
    }
}

// Decoding (few tokens): a workgroup computes ROWS outputs of one token, its invocations striding
// over the columns, then one exact integer reduction.
@compute @workgroup_size(WG)
fn gemv(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = wid.x + wid.y * num.x;
    let row_groups = (params.n + ROWS - 1u) / ROWS;
    let m = group / row_groups;
    let n0 = (group % row_groups) * ROWS;
    if m >= params.m {
        return;
    }
    let kw = params.k_words;
    let rows = min(ROWS, params.n - n0);
    var acc = vec4<i32>(0);
    for (var j = lid; j < kw; j += WG) {
        let xv = x[m * kw + j];
        acc.x += dot_word(xv, w[n0 * kw + j]);
        if rows > 1u {
            acc.y += dot_word(xv, w[(n0 + 1u) * kw + j]);
        }
        if rows > 2u {
            acc.z += dot_word(xv, w[(n0 + 2u) * kw + j]);
        }
        if rows > 3u {
            acc.w += dot_word(xv, w[(n0 + 3u) * kw + j]);
        }
    }
    let total = wg_sum(acc, lid);
    if lid < rows {
        store(m * params.n + n0 + lid, epilogue(m, n0 + lid, total[lid]));
    }
}

var<workgroup> tile_x: array<vec4<u32>, TM * TK>;
var<workgroup> tile_w: array<u32, TN * TK>;

// Prompts (many tokens): a workgroup computes a TM x TN tile, each invocation a 4 x 4 block,
// from activation and weight tiles staged in workgroup memory.
@compute @workgroup_size(WG)
fn gemm(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = wid.x + wid.y * num.x;
    let tiles_n = (params.n + TN - 1u) / TN;
    let m0 = (group / tiles_n) * TM;
    let n0 = (group % tiles_n) * TN;
    if m0 >= params.m {
        return;
    }
    let kw = params.k_words;
    let tx = lid % 8u;
    let ty = lid / 8u;
    var acc: array<vec4<i32>, 4>;
    for (var k0 = 0u; k0 < kw; k0 += TK) {
        for (var e = lid; e < TM * TK; e += WG) {
            let gm = m0 + e / TK;
            let gk = k0 + e % TK;
            var v = vec4<u32>(0u);
            if gm < params.m && gk < kw {
                v = x[gm * kw + gk];
            }
            tile_x[e] = v;
        }
        for (var e = lid; e < TN * TK; e += WG) {
            let gn = n0 + e / TK;
            let gk = k0 + e % TK;
            // 0x55555555: sixteen zero weights.
            var v = 0x55555555u;
            if gn < params.n && gk < kw {
                v = w[gn * kw + gk];
            }
            tile_w[e] = v;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let x0 = tile_x[(ty * 4u) * TK + kk];
            let x1 = tile_x[(ty * 4u + 1u) * TK + kk];
            let x2 = tile_x[(ty * 4u + 2u) * TK + kk];
            let x3 = tile_x[(ty * 4u + 3u) * TK + kk];
            for (var r = 0u; r < 4u; r++) {
                let word = tile_w[(tx * 4u + r) * TK + kk];
                let l = vec4<u32>(lanes(word, 0u), lanes(word, 1u), lanes(word, 2u), lanes(word, 3u));
                acc[0][r] += dot4(x0.x, l.x) + dot4(x0.y, l.y) + dot4(x0.z, l.z) + dot4(x0.w, l.w);
                acc[1][r] += dot4(x1.x, l.x) + dot4(x1.y, l.y) + dot4(x1.z, l.z) + dot4(x1.w, l.w);
                acc[2][r] += dot4(x2.x, l.x) + dot4(x2.y, l.y) + dot4(x2.z, l.z) + dot4(x2.w, l.w);
                acc[3][r] += dot4(x3.x, l.x) + dot4(x3.y, l.y) + dot4(x3.z, l.z) + dot4(x3.w, l.w);
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let gm = m0 + ty * 4u + i;
        for (var r = 0u; r < 4u; r++) {
            let gn = n0 + tx * 4u + r;
            if gm < params.m && gn < params.n {
                store(gm * params.n + gn, epilogue(gm, gn, acc[i][r]));
            }
        }
    }
}
