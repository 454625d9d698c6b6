// Softmax cross-entropy fused with its gradient (cpu::cross_entropy), one workgroup per row,
// in place: the row of logits becomes its gradient, so a vocabulary-wide row is stored once.
//   loss[loss_offset + r] = max + log(sum(exp(logit - max))) - logit[target]   (as nll.wgsl)
//   logits[r, i] <- (exp(logit_i - max) / sum - (i == target)) * grad_scale
// with target = targets[target_offset + r]; grad_scale is 1 for the plain gradient of each
// row's loss, 1 / count for the gradient of their mean. In f32, where the twin works in f64: a
// tolerance. A row of -inf only gets loss +inf, a NaN logit loss NaN; their gradients are not
// defined.

const WG: u32 = 256u;

struct Params {
    rows: u32,
    vocab: u32,
    target_offset: u32,
    loss_offset: u32,
    grad_scale: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<u32>;
@group(0) @binding(3) var<storage, read_write> losses: array<f32>;

@compute @workgroup_size(WG)
fn cross_entropy(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.x + wid.y * num.x;
    if row >= params.rows {
        return;
    }
    let base = row * params.vocab;
    let target_index = targets[params.target_offset + row];
    // Read before the barriers below, and so before any invocation overwrites the row.
    let target_logit = logits[base + target_index];
    let shift_sum = softmax_shift_and_sum(base, lid);
    let shift = shift_sum.x;
    let sum = shift_sum.y;
    if lid == 0u {
        // Only a row of -inf sums to 0: log(1) = 0 leaves +inf, where WGSL's log(0) is not defined.
        losses[params.loss_offset + row] = (shift + log(select(sum, 1.0, sum == 0.0))) - target_logit;
    }
    // Each invocation rewrites only the elements it read.
    for (var k = lid; k < params.vocab; k += WG) {
        let p = exp(logits[base + k] - shift) / sum;
        logits[base + k] = (p - select(0.0, 1.0, k == target_index)) * params.grad_scale;
    }
}
