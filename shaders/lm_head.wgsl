// Logits (cpu::lm_head) against one chunk of a GpuTable: logits[r, first + v] = x[r] · table[v].
// A workgroup takes VROWS table rows, LANES invocations each; every lane strides over the row's
// vec4 words and accumulates four x rows at once, so each table word is read once per four rows.
// The lanes' partial sums are added in a fixed tree order.

const WG: u32 = 256u;
const LANES: u32 = 64u;
const VROWS: u32 = WG / LANES;

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

var<workgroup> partials: array<vec4<f32>, WG>;

// Column c of x rows r0..r0+3; zero past the matrix, where the table holds its zero padding.
fn x_column(r0: u32, c: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if c < params.cols {
        for (var j = 0u; j < 4u; j++) {
            if r0 + j < params.rows {
                v[j] = x[(r0 + j) * params.cols + c];
            }
        }
    }
    return v;
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
    for (var r0 = 0u; r0 < params.rows; r0 += 4u) {
        var acc = vec4<f32>(0.0);
        if live {
            let base = v * params.row_vecs;
            for (var i = lane; i < params.row_vecs; i += LANES) {
                let w = table[base + i];
                if HALF == 0u {
                    let c = 4u * i;
                    acc += bitcast<f32>(w.x) * x_column(r0, c);
                    acc += bitcast<f32>(w.y) * x_column(r0, c + 1u);
                    acc += bitcast<f32>(w.z) * x_column(r0, c + 2u);
                    acc += bitcast<f32>(w.w) * x_column(r0, c + 3u);
                } else {
                    let c = 8u * i;
                    for (var k = 0u; k < 4u; k++) {
                        acc += half_to_f32(w[k] & 0xffffu) * x_column(r0, c + 2u * k);
                        acc += half_to_f32(w[k] >> 16u) * x_column(r0, c + 2u * k + 1u);
                    }
                }
            }
        }
        partials[lid] = acc;
        for (var s = LANES / 2u; s > 0u; s = s >> 1u) {
            workgroupBarrier();
            if lane < s {
                partials[lid] += partials[lid + s];
            }
        }
        workgroupBarrier();
        if live && lane == 0u {
            let total = partials[lid];
            for (var j = 0u; j < 4u; j++) {
                if r0 + j < params.rows {
                    logits[(r0 + j) * params.vocab + params.first + v] = total[j];
                }
            }
        }
        workgroupBarrier();
    }
}
