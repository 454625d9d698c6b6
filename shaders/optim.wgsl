// Optimizer updates on f32 tensors and the global gradient norm for clipping (train::optim's
// adamw_tensor, sgd_tensor, clip_grad_norm).
//
// adamw, sgd: one invocation per scalar, the CPU twin's f32 arithmetic in its order. The gradient
// is multiplied by clip[1], the clipping coefficient grad_clip writes (1 when not clipping), as
// torch's clip_grad_norm_ multiplies it in place before the step.
//
// grad_sum_squares, grad_sum, grad_clip: the sum of squares of every gradient in a fixed order,
// never atomics: each tensor in blocks of 1024 (a workgroup of 256 adds four values each, left to
// right, then a halving tree; cpu::tree_sum's block), the block sums of all tensors side by side,
// then the same blocks level by level down to one; grad_clip takes its square root, the norm, and
// the coefficient min(1, max_norm / (norm + 1e-6)).

const WG: u32 = 256u;
const BLOCK: u32 = 4u * WG;

struct Params {
    // Elements (adamw, sgd, grad_sum_squares, grad_sum), or where the block sums go
    // (grad_sum_squares: `first`).
    count: u32,
    first: u32,
    // sgd: 1 on the optimizer's first step (the momentum buffer starts as the gradient).
    first_step: u32,
    _pad0: u32,
    // adamw: beta2, eps, 1 - lr * weight_decay, 1 - beta1, 1 - beta2, lr / (1 - beta1^t),
    // sqrt(1 - beta2^t). sgd: momentum, weight_decay, lr. grad_clip: max_norm.
    a: f32,
    b: f32,
    c: f32,
    d: f32,
    e: f32,
    f: f32,
    g: f32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;

// adamw, sgd
@group(0) @binding(1) var<storage, read> clip: array<f32>;
@group(0) @binding(2) var<storage, read> grad: array<f32>;
@group(0) @binding(3) var<storage, read_write> w: array<f32>;
@group(0) @binding(4) var<storage, read_write> m: array<f32>;
@group(0) @binding(5) var<storage, read_write> v: array<f32>;

// grad_sum_squares, grad_sum, grad_clip
@group(0) @binding(1) var<storage, read> values: array<f32>;
@group(0) @binding(2) var<storage, read_write> sums: array<f32>;

fn flat_id(wid: vec3<u32>, num: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * num.x) * WG + lid;
}

@compute @workgroup_size(WG)
fn adamw(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = flat_id(wid, num, lid);
    if i >= params.count {
        return;
    }
    let g = grad[i] * clip[1];
    let wi = w[i] * params.c;
    let mi = m[i] + params.d * (g - m[i]);
    let vi = v[i] * params.a + (params.e * g) * g;
    let denom = sqrt(vi) / params.g + params.b;
    w[i] = wi - params.f * (mi / denom);
    m[i] = mi;
    v[i] = vi;
}

// m is the momentum buffer; v is not used.
@compute @workgroup_size(WG)
fn sgd(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = flat_id(wid, num, lid);
    if i >= params.count {
        return;
    }
    var d = grad[i] * clip[1] + params.b * w[i];
    if params.a != 0.0 {
        if params.first_step == 0u {
            d = params.a * m[i] + d;
        }
        m[i] = d;
    }
    w[i] = w[i] - params.c * d;
}

var<workgroup> partial: array<f32, WG>;

// The block of 1024 values starting at `start` (of `count`), squared or not, summed in
// cpu::tree_sum's block order into sums[params.first + block].
fn block_sum(block: u32, lid: u32, square: bool) {
    let start = block * BLOCK;
    var leaf = 0.0;
    for (var j = 0u; j < 4u; j++) {
        let k = start + 4u * lid + j;
        if k < params.count {
            let x = values[k];
            leaf = leaf + select(x, x * x, square);
        }
    }
    partial[lid] = leaf;
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        workgroupBarrier();
        if lid < s {
            partial[lid] = partial[lid] + partial[lid + s];
        }
    }
    if lid == 0u {
        sums[params.first + block] = partial[0];
    }
}

@compute @workgroup_size(WG)
fn grad_sum_squares(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let block = wid.x + wid.y * num.x;
    if block * BLOCK >= max(params.count, 1u) {
        return;
    }
    block_sum(block, lid, true);
}

@compute @workgroup_size(WG)
fn grad_sum(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let block = wid.x + wid.y * num.x;
    if block * BLOCK >= max(params.count, 1u) {
        return;
    }
    block_sum(block, lid, false);
}

// sums[0] = the norm, sums[1] = the clipping coefficient, from the single total values[0].
@compute @workgroup_size(1)
fn grad_clip() {
    let norm = sqrt(values[0]);
    sums[0] = norm;
    sums[1] = min(params.a / (norm + 1e-6), 1.0);
}
