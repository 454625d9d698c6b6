// Straight-through gradients of the BitLinear product (cpu::ternary_matmul_backward), y = x̂ · Ŵᵀ:
//   dx[m, k] = sum_n dy[m, n] * Ŵ[n, k]    (ternary_dx: from the packed codes, adds and subtracts)
//   dw[n, k] = sum_m dy[m, n] * x̂[m, k]    (ternary_dw: an f32 GEMM over the tokens)
// with Ŵ = code / sw and x̂ = code / sx. Float sums: the order differs from the CPU's, so tests
// compare with a tolerance relative to the sum of |terms|.
//
// The weights use packing::gpu_words: per row, words of 16 two-bit values w + 1; column
// 16j + 4t + i of word j sits at bit 8i + 2t. Activations are act_quant's int8 codes, four per
// u32, rows padded to whole 16-column words.

const WG: u32 = 64u;
// ternary_dx: tokens per workgroup, and weight rows staged per step.
const DX_TM: u32 = 4u;
const DX_NC: u32 = 64u;
// ternary_dw: a TN x TK output tile (each invocation 4 x 4), TM tokens staged per step.
const TN: u32 = 32u;
const TK: u32 = 32u;
const TM: u32 = 8u;

struct Params {
    m: u32,
    n: u32,
    k: u32,
    k_words: u32,
    per_channel: u32,
    x_row_words: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
// [m, n] upstream gradient.
@group(0) @binding(1) var<storage, read> dy: array<f32>;

// ternary_dx
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read> w_scales: array<f32>;
@group(0) @binding(4) var<storage, read_write> dx: array<f32>;

// ternary_dw
@group(0) @binding(2) var<storage, read> x_codes: array<u32>;
@group(0) @binding(3) var<storage, read> x_scales: array<f32>;
@group(0) @binding(4) var<storage, read_write> dw: array<f32>;

var<workgroup> dy_tile: array<f32, DX_TM * DX_NC>;

// +d, -d or 0 for the stored value (w + 1) in {2, 0, 1}: no multiplication.
fn signed(value: u32, d: f32) -> f32 {
    return select(select(0.0, -d, value == 0u), d, value == 2u);
}

// A workgroup takes DX_TM tokens and WG weight words (16 columns each) of dx; its invocations own
// one word each and walk the weight rows in order, dy staged DX_NC rows at a time. Per-channel
// scales are folded into the staged dy; a per-tensor scale divides the finished sum.
@compute @workgroup_size(WG)
fn ternary_dx(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = wid.x + wid.y * num.x;
    let word_groups = (params.k_words + WG - 1u) / WG;
    let m0 = (group / word_groups) * DX_TM;
    if m0 >= params.m {
        return;
    }
    let j = (group % word_groups) * WG + lid;
    let kw = params.k_words;
    var acc: array<array<f32, 16>, DX_TM>;
    for (var n0 = 0u; n0 < params.n; n0 += DX_NC) {
        for (var e = lid; e < DX_TM * DX_NC; e += WG) {
            let mm = m0 + e / DX_NC;
            let nn = n0 + e % DX_NC;
            var d = 0.0;
            if mm < params.m && nn < params.n {
                d = dy[mm * params.n + nn];
                if params.per_channel == 1u {
                    d = d / w_scales[nn];
                }
            }
            dy_tile[e] = d;
        }
        workgroupBarrier();
        let rows = min(DX_NC, params.n - n0);
        if j < kw {
            for (var r = 0u; r < rows; r++) {
                let word = w[(n0 + r) * kw + j];
                for (var l = 0u; l < 16u; l++) {
                    let value = (word >> (8u * (l % 4u) + 2u * (l / 4u))) & 3u;
                    for (var t = 0u; t < DX_TM; t++) {
                        acc[t][l] += signed(value, dy_tile[t * DX_NC + r]);
                    }
                }
            }
        }
        workgroupBarrier();
    }
    if j >= kw {
        return;
    }
    for (var t = 0u; t < DX_TM; t++) {
        let mm = m0 + t;
        if mm >= params.m {
            break;
        }
        for (var l = 0u; l < 16u; l++) {
            let k = 16u * j + l;
            if k < params.k {
                var v = acc[t][l];
                if params.per_channel == 0u {
                    v = v / w_scales[0];
                }
                dx[mm * params.k + k] = v;
            }
        }
    }
}

var<workgroup> tile_dy: array<f32, TM * TN>;
var<workgroup> tile_x: array<f32, TM * TK>;

// The dequantized activation x̂[m, k] = code / sx.
fn x_hat(m: u32, k: u32) -> f32 {
    let word = x_codes[m * params.x_row_words + k / 4u];
    let code = extractBits(bitcast<i32>(word), 8u * (k % 4u), 8u);
    return f32(code) / x_scales[m];
}

// A workgroup computes a TN x TK tile of dw, each invocation a 4 x 4 block, the tokens staged TM
// at a time in workgroup memory and summed in token order.
@compute @workgroup_size(WG)
fn ternary_dw(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = wid.x + wid.y * num.x;
    let tiles_k = (params.k + TK - 1u) / TK;
    let n0 = (group / tiles_k) * TN;
    let k0 = (group % tiles_k) * TK;
    if n0 >= params.n {
        return;
    }
    let tn = lid / 8u;
    let tk = lid % 8u;
    var acc: array<vec4<f32>, 4>;
    for (var m0 = 0u; m0 < params.m; m0 += TM) {
        for (var e = lid; e < TM * TN; e += WG) {
            let mm = m0 + e / TN;
            let nn = n0 + e % TN;
            var d = 0.0;
            if mm < params.m && nn < params.n {
                d = dy[mm * params.n + nn];
            }
            tile_dy[e] = d;
        }
        for (var e = lid; e < TM * TK; e += WG) {
            let mm = m0 + e / TK;
            let kk = k0 + e % TK;
            var v = 0.0;
            if mm < params.m && kk < params.k {
                v = x_hat(mm, kk);
            }
            tile_x[e] = v;
        }
        workgroupBarrier();
        let rows = min(TM, params.m - m0);
        for (var t = 0u; t < rows; t++) {
            let xv = vec4<f32>(
                tile_x[t * TK + tk * 4u],
                tile_x[t * TK + tk * 4u + 1u],
                tile_x[t * TK + tk * 4u + 2u],
                tile_x[t * TK + tk * 4u + 3u],
            );
            for (var i = 0u; i < 4u; i++) {
                acc[i] += tile_dy[t * TN + tn * 4u + i] * xv;
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let nn = n0 + tn * 4u + i;
        for (var c = 0u; c < 4u; c++) {
            let kk = k0 + tk * 4u + c;
            if nn < params.n && kk < params.k {
                dw[nn * params.k + kk] = acc[i][c];
            }
        }
    }
}
