// Gradients of RMS normalization (cpu::rmsnorm_backward) for the upstream gradient dy:
//   r = 1 / sqrt(mean(x²) + eps) per row (common/rms.wgsl: bit for bit the forward's),
//   g = dy * weight,
//   dx[i] = r * g[i] - (((r * r) * r) * (g · x)) / n * x[i]
//   dweight[i] = sum over rows, in row order, of (dy[i] * x[i]) * r
// rmsnorm_dx takes one row per workgroup (g · x folded in a fixed tree) and keeps r per row;
// rmsnorm_dweight gives each invocation one column and walks the rows in order: no atomics,
// the same sum on every run.

const WG: u32 = 256u;

struct Params {
    rows: u32,
    cols: u32,
    // Always 0, but unknown to the compiler (see common/rms.wgsl).
    no_fuse: u32,
    _pad0: u32,
    eps: f32,
    _pad1: u32,
    _pad2: u32,
    _pad3: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
// 1 / rms of each row: written by rmsnorm_dx, read by rmsnorm_dweight.
@group(0) @binding(3) var<storage, read_write> inv_rms_rows: array<f32>;

// rmsnorm_dx
@group(0) @binding(4) var<storage, read> weight: array<f32>;
@group(0) @binding(5) var<storage, read_write> dx: array<f32>;

// rmsnorm_dweight
@group(0) @binding(4) var<storage, read_write> dweight: array<f32>;

@compute @workgroup_size(WG)
fn rmsnorm_dx(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.x + wid.y * num.x;
    if row >= params.rows {
        return;
    }
    let base = row * params.cols;
    let inv = inv_rms(base, lid);
    var leaf = 0.0;
    for (var k = lid; k < params.cols; k += WG) {
        leaf += (dy[base + k] * weight[k]) * x[base + k];
    }
    let g_dot_x = fold_leaves(leaf, lid);
    let through_r = (((inv * inv) * inv) * g_dot_x) / f32(params.cols);
    for (var k = lid; k < params.cols; k += WG) {
        dx[base + k] = inv * (dy[base + k] * weight[k]) - through_r * x[base + k];
    }
    if lid == 0u {
        inv_rms_rows[row] = inv;
    }
}

const DW_WG: u32 = 64u;

@compute @workgroup_size(DW_WG)
fn rmsnorm_dweight(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let k = (wid.x + wid.y * num.x) * DW_WG + lid;
    if k >= params.cols {
        return;
    }
    var acc = 0.0;
    for (var r = 0u; r < params.rows; r++) {
        let i = r * params.cols + k;
        acc += (dy[i] * x[i]) * inv_rms_rows[r];
    }
    dweight[k] = acc;
}
