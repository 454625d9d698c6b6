// Logits (cpu::lm_head) against one chunk of a GpuTable: logits[r, first + v] = x[r] · table[v].
// A workgroup takes VROWS table rows, LANES invocations each; lane l reads words l, l + LANES, ...
// of its row, so that the lanes of a row read consecutive vec4<u32> (coalesced). The x columns a
// span of words needs are staged in workgroup memory first: for one x row (decode) XVECS * 4
// columns of it, for more rows XVECS columns of four rows at once (each table word then serves
// four rows). The lanes' partial sums are added in a fixed tree order.

const WG: u32 = 256u;
const LANES: u32 = 32u;
const VROWS: u32 = WG / LANES;
const XVECS: u32 = 640u;

struct Params {
    rows: u32,
    cols: u32,
    // The logits' row length (the whole vocabulary) and this chunk's first row and row count.
    vocab: u32,
    first: u32,
    count: u32,
    row_vecs: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> table: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read_write> logits: array<f32>;

var<workgroup> x_stage: array<vec4<f32>, XVECS>;
var<workgroup> partials: array<vec4<f32>, WG>;

// x[r, c], zero past the matrix (where the table holds its zero padding).
fn x_at(r: u32, c: u32) -> f32 {
    if r < params.rows && c < params.cols {
        return x[r * params.cols + c];
    }
    return 0.0;
}

// The f32 values of four f16, given as their magnitude bits already moved to f32 position
// (bits 13..27) and their sign bits (bit 31), exactly. With the exponent raised by 113, t is
// twice a normal value, or 2^-14 plus a subnormal (or zero) one; min picks the right one of
// t / 2 and t - 2^-14 (both exact where they are picked, and never an f32 subnormal).
fn halves(bits: vec4<u32>, signs: vec4<u32>) -> vec4<f32> {
    let t = bitcast<vec4<f32>>(bits + vec4<u32>(0x38800000u));
    let v = min(t * 0.5, t - vec4<f32>(bitcast<f32>(0x38800000u)));
    return bitcast<vec4<f32>>(bitcast<vec4<u32>>(v) | signs);
}

// The low (columns 2k) and high (columns 2k + 1) halves of an f16 word.
fn low_halves(w: vec4<u32>) -> vec4<f32> {
    return halves((w << vec4<u32>(13u)) & vec4<u32>(0x0fffe000u), (w << vec4<u32>(16u)) & vec4<u32>(0x80000000u));
}

fn high_halves(w: vec4<u32>) -> vec4<f32> {
    return halves((w >> vec4<u32>(3u)) & vec4<u32>(0x0fffe000u), w & vec4<u32>(0x80000000u));
}

// Adds the lanes' partials of each table row in a fixed tree; lane 0 of a row gets the total.
fn reduce_lanes(v: vec4<f32>, lid: u32) -> vec4<f32> {
    let lane = lid % LANES;
    partials[lid] = v;
    for (var s = LANES / 2u; s > 0u; s = s >> 1u) {
        workgroupBarrier();
        if lane < s {
            partials[lid] += partials[lid + s];
        }
    }
    workgroupBarrier();
    let total = partials[lid];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(WG)
fn lm_head(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = wid.x + wid.y * num.x;
    if group * VROWS >= params.count {
        return;
    }
    let lane = lid % LANES;
    let v = group * VROWS + lid / LANES;
    let live = v < params.count;
    // Rows past the chunk read its last row; their sums are dropped.
    let base = min(v, params.count - 1u) * params.row_vecs;
    // Table columns per vec4<u32> word.
    let per_word = select(4u, 8u, HALF != 0u);

    if params.rows == 1u {
        // x_stage[s] holds the four columns of word s / 2 that its low (s even) or high (s odd)
        // halves multiply for an f16 table, columns 4s..4s+3 for an f32 one.
        let span = XVECS * 4u / per_word;
        var acc = vec4<f32>(0.0);
        for (var w0 = 0u; w0 < params.row_vecs; w0 += span) {
            workgroupBarrier();
            for (var s = lid; s < XVECS; s += WG) {
                var c: vec4<u32>;
                if HALF != 0u {
                    c = vec4<u32>(0u, 2u, 4u, 6u) + (8u * (w0 + s / 2u) + s % 2u);
                } else {
                    c = vec4<u32>(0u, 1u, 2u, 3u) + 4u * (w0 + s);
                }
                x_stage[s] = vec4<f32>(x_at(0u, c.x), x_at(0u, c.y), x_at(0u, c.z), x_at(0u, c.w));
            }
            workgroupBarrier();
            let n = min(span, params.row_vecs - w0);
            for (var i = lane; i < n; i += LANES) {
                let w = table[base + w0 + i];
                if HALF != 0u {
                    acc += x_stage[2u * i] * low_halves(w) + x_stage[2u * i + 1u] * high_halves(w);
                } else {
                    acc += x_stage[i] * bitcast<vec4<f32>>(w);
                }
            }
        }
        let total = reduce_lanes(acc, lid);
        if live && lane == 0u {
            logits[params.first + v] = (total.x + total.y) + (total.z + total.w);
        }
        return;
    }

    // Four x rows at a time: x_stage holds rows r0..r0+3 of XVECS columns, column j of word i
    // (j ^ (i % per_word) slots into the word's block, against bank conflicts).
    let span = XVECS / per_word;
    for (var r0 = 0u; r0 < params.rows; r0 += 4u) {
        var acc = vec4<f32>(0.0);
        for (var w0 = 0u; w0 < params.row_vecs; w0 += span) {
            workgroupBarrier();
            for (var s = lid; s < XVECS; s += WG) {
                let i = s / per_word;
                let j = (s % per_word) ^ (i % per_word);
                let c = (w0 + i) * per_word + j;
                x_stage[s] = vec4<f32>(x_at(r0, c), x_at(r0 + 1u, c), x_at(r0 + 2u, c), x_at(r0 + 3u, c));
            }
            workgroupBarrier();
            let n = min(span, params.row_vecs - w0);
            for (var i = lane; i < n; i += LANES) {
                let w = table[base + w0 + i];
                let at = i * per_word;
                let swizzle = i % per_word;
                if HALF != 0u {
                    let lo = low_halves(w);
                    let hi = high_halves(w);
                    for (var k = 0u; k < 4u; k++) {
                        acc += lo[k] * x_stage[at + ((2u * k) ^ swizzle)];
                        acc += hi[k] * x_stage[at + ((2u * k + 1u) ^ swizzle)];
                    }
                } else {
                    let f = bitcast<vec4<f32>>(w);
                    for (var k = 0u; k < 4u; k++) {
                        acc += f[k] * x_stage[at + (k ^ swizzle)];
                    }
                }
            }
        }
        let total = reduce_lanes(acc, lid);
        if live && lane == 0u {
            for (var j = 0u; j < 4u; j++) {
                if r0 + j < params.rows {
                    logits[(r0 + j) * params.vocab + params.first + v] = total[j];
                }
            }
        }
    }
}
