// Gradients of the logits (cpu::lm_head_backward) against one chunk of a GpuTable, for one group
// of rows of dlogits (the host splits both to respect the storage binding limit):
//   lm_head_dx:     dx[row0 + r, h]   (+)= sum over the chunk's v of dl[r, first + v] * table[v, h]
//   lm_head_dtable: dtable[v, h]      (+)= sum over the group's r of dl[r, first + v] * x[row0 + r, h]
// where dl[r, c] = dlogits[shift + r * vocab + c] (the group's rows, bound from an aligned offset)
// and dtable is the chunk's dense f32 rows. Both are f32 GEMMs tiled TM x TN per workgroup (each
// invocation 4 x 4), TK inner steps staged in workgroup memory; `accumulate` adds to what the
// output holds (later chunks and groups, tied embeddings), so sums split at chunk and group
// boundaries, in a fixed order.

const WG: u32 = 64u;
const TM: u32 = 32u;
const TN: u32 = 32u;
const TK: u32 = 8u;

struct Params {
    // Output rows (the group's rows for dx, the chunk's rows for dtable), hidden, inner length.
    m: u32,
    hidden: u32,
    k: u32,
    vocab: u32,
    first: u32,
    shift: u32,
    row0: u32,
    row_words: u32,
    accumulate: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> dl: array<f32>;

// lm_head_dx
@group(0) @binding(2) var<storage, read> table: array<u32>;
@group(0) @binding(3) var<storage, read_write> dx: array<f32>;

// lm_head_dtable
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> dtable: array<f32>;

var<workgroup> tile_a: array<f32, TK * TM>;
var<workgroup> tile_b: array<f32, TK * TN>;

fn table_at(v: u32, h: u32) -> f32 {
    let base = v * params.row_words;
    if HALF == 0u {
        return bitcast<f32>(table[base + h]);
    }
    let word = table[base + h / 2u];
    return half_to_f32((word >> (16u * (h & 1u))) & 0xffffu);
}

// One invocation's 4 x 4 block of the product of the staged tiles, step kk.
fn tile_step(acc: ptr<function, array<vec4<f32>, 4>>, tm: u32, tn: u32) {
    for (var kk = 0u; kk < TK; kk++) {
        let b = vec4<f32>(
            tile_b[kk * TN + tn * 4u],
            tile_b[kk * TN + tn * 4u + 1u],
            tile_b[kk * TN + tn * 4u + 2u],
            tile_b[kk * TN + tn * 4u + 3u],
        );
        for (var i = 0u; i < 4u; i++) {
            (*acc)[i] += tile_a[kk * TM + tm * 4u + i] * b;
        }
    }
}

@compute @workgroup_size(WG)
fn lm_head_dx(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = wid.x + wid.y * num.x;
    let tiles_n = (params.hidden + TN - 1u) / TN;
    let m0 = (group / tiles_n) * TM;
    let n0 = (group % tiles_n) * TN;
    if m0 >= params.m {
        return;
    }
    let tm = lid / 8u;
    let tn = lid % 8u;
    var acc: array<vec4<f32>, 4>;
    for (var k0 = 0u; k0 < params.k; k0 += TK) {
        for (var e = lid; e < TK * TM; e += WG) {
            let kk = k0 + e / TM;
            let mm = m0 + e % TM;
            var v = 0.0;
            if kk < params.k && mm < params.m {
                v = dl[params.shift + mm * params.vocab + params.first + kk];
            }
            tile_a[e] = v;
        }
        for (var e = lid; e < TK * TN; e += WG) {
            let kk = k0 + e / TN;
            let nn = n0 + e % TN;
            var v = 0.0;
            if kk < params.k && nn < params.hidden {
                v = table_at(kk, nn);
            }
            tile_b[e] = v;
        }
        workgroupBarrier();
        tile_step(&acc, tm, tn);
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let mm = m0 + tm * 4u + i;
        for (var c = 0u; c < 4u; c++) {
            let nn = n0 + tn * 4u + c;
            if mm < params.m && nn < params.hidden {
                let o = (params.row0 + mm) * params.hidden + nn;
                dx[o] = select(acc[i][c], dx[o] + acc[i][c], params.accumulate == 1u);
            }
        }
    }
}

@compute @workgroup_size(WG)
fn lm_head_dtable(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = wid.x + wid.y * num.x;
    let tiles_n = (params.hidden + TN - 1u) / TN;
    let m0 = (group / tiles_n) * TM;
    let n0 = (group % tiles_n) * TN;
    if m0 >= params.m {
        return;
    }
    let tm = lid / 8u;
    let tn = lid % 8u;
    var acc: array<vec4<f32>, 4>;
    for (var k0 = 0u; k0 < params.k; k0 += TK) {
        for (var e = lid; e < TK * TM; e += WG) {
            let kk = k0 + e / TM;
            let mm = m0 + e % TM;
            var v = 0.0;
            if kk < params.k && mm < params.m {
                v = dl[params.shift + kk * params.vocab + params.first + mm];
            }
            tile_a[e] = v;
        }
        for (var e = lid; e < TK * TN; e += WG) {
            let kk = k0 + e / TN;
            let nn = n0 + e % TN;
            var v = 0.0;
            if kk < params.k && nn < params.hidden {
                v = x[(params.row0 + kk) * params.hidden + nn];
            }
            tile_b[e] = v;
        }
        workgroupBarrier();
        tile_step(&acc, tm, tn);
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let mm = m0 + tm * 4u + i;
        for (var c = 0u; c < 4u; c++) {
            let nn = n0 + tn * 4u + c;
            if mm < params.m && nn < params.hidden {
                let o = mm * params.hidden + nn;
                dtable[o] = select(acc[i][c], dtable[o] + acc[i][c], params.accumulate == 1u);
            }
        }
    }
}
