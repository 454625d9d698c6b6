// The f32 baseline the ternary kernels are measured against: y = x · wᵀ with x [m, k], w [n, k]
// (the ternary weights' layout) and y [m, n], all f32, row-major. Rows of x and w are padded
// with zeros to k4 vec4s, so every load is a 16-byte vector load. No subgroups, no f16: what
// any adapter runs.

struct Params {
    m: u32,
    n: u32,
    k4: u32,
    pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

// GEMV: 32 invocations per output row, each striding over the row so that a row's 32 loads are
// 512 contiguous bytes, then a tree sum in workgroup memory. workgroup_id.y is the token.
const GEMV_ROWS: u32 = 8u;
const LANES: u32 = 32u;
var<workgroup> row_sums: array<f32, 256>;

@compute @workgroup_size(256)
fn gemv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = wid.x * GEMV_ROWS + lid / LANES;
    let lane = lid % LANES;
    let token = wid.y;
    var s = 0.0;
    if row < p.n {
        for (var k = lane; k < p.k4; k += LANES) {
            s += dot(x[token * p.k4 + k], w[row * p.k4 + k]);
        }
    }
    row_sums[lid] = s;
    workgroupBarrier();
    for (var h = LANES / 2u; h > 0u; h >>= 1u) {
        if lane < h {
            row_sums[lid] += row_sums[lid + h];
        }
        workgroupBarrier();
    }
    if lane == 0u && row < p.n {
        y[token * p.n + row] = row_sums[lid];
    }
}

// GEMM: a 64 x 64 tile of y per workgroup, 4 x 4 outputs per invocation held in four vec4
// registers (not an indexed array, which can spill to local memory), and 16-deep slices of x
// and w staged in workgroup memory, transposed so the inner loop reads 4 consecutive values.
const TILE: u32 = 64u;
const DEPTH4: u32 = 4u; // the slice depth in vec4s (16 values)
var<workgroup> xs: array<vec4<f32>, 256>; // [16 depths][16 groups of 4 rows]
var<workgroup> ws: array<vec4<f32>, 256>;

fn stage(row: u32, rows: u32, k4: u32, from_x: bool) -> vec4<f32> {
    if row >= rows || k4 >= p.k4 {
        return vec4<f32>(0.0);
    }
    if from_x {
        return x[row * p.k4 + k4];
    }
    return w[row * p.k4 + k4];
}

@compute @workgroup_size(256)
fn gemm(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let m0 = wid.y * TILE;
    let n0 = wid.x * TILE;
    // Staging: invocation lid loads vec4 `q` of tile row `r`, i.e. depths 4q..4q+3.
    let r = lid / DEPTH4;
    let q = lid % DEPTH4;
    // Computing: rows tm..tm+3 and columns tn..tn+3 of the tile.
    let tm4 = lid / 16u;
    let tn4 = lid % 16u;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < p.k4; k0 += DEPTH4) {
        let a = stage(m0 + r, p.m, k0 + q, true);
        let b = stage(n0 + r, p.n, k0 + q, false);
        let slot = r / 4u;
        let lane = r % 4u;
        xs[(4u * q) * 16u + slot][lane] = a.x;
        xs[(4u * q + 1u) * 16u + slot][lane] = a.y;
        xs[(4u * q + 2u) * 16u + slot][lane] = a.z;
        xs[(4u * q + 3u) * 16u + slot][lane] = a.w;
        ws[(4u * q) * 16u + slot][lane] = b.x;
        ws[(4u * q + 1u) * 16u + slot][lane] = b.y;
        ws[(4u * q + 2u) * 16u + slot][lane] = b.z;
        ws[(4u * q + 3u) * 16u + slot][lane] = b.w;
        workgroupBarrier();
        for (var d = 0u; d < 16u; d++) {
            let xv = xs[d * 16u + tm4];
            let wv = ws[d * 16u + tn4];
            acc0 += xv.x * wv;
            acc1 += xv.y * wv;
            acc2 += xv.z * wv;
            acc3 += xv.w * wv;
        }
        workgroupBarrier();
    }
    let acc = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
    for (var i = 0u; i < 4u; i++) {
        let row = m0 + 4u * tm4 + i;
        if row >= p.m {
            break;
        }
        for (var j = 0u; j < 4u; j++) {
            let col = n0 + 4u * tn4 + j;
            if col < p.n {
                y[row * p.n + col] = acc[i][j];
            }
        }
    }
}
