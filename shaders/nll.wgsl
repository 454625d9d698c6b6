// Negative log-likelihoods of the next tokens (cpu::nll), one workgroup per row of logits:
//   out[out_offset + r] = max + log(sum(exp(logit - max))) - logit[target]
// with target = targets[target_offset + r]. In f32, where the twin works in f64: a tolerance, not
// bits. The sum runs in a fixed order (each invocation's strided elements, then a halving tree),
// so the result never depends on scheduling; a NaN logit makes the row NaN, a -inf target +inf.

const WG: u32 = 256u;

struct Params {
    rows: u32,
    vocab: u32,
    target_offset: u32,
    out_offset: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> targets: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(WG)
fn nll(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.x + wid.y * num.x;
    if row >= params.rows {
        return;
    }
    let base = row * params.vocab;
    let shift_sum = softmax_shift_and_sum(base, lid);
    let shift = shift_sum.x;
    // Only a row of -inf sums to 0 (else the max adds exp(0) = 1): its target is -inf too, and
    // log(1) = 0 leaves +inf, where WGSL's log(0) is not defined.
    let sum = select(shift_sum.y, 1.0, shift_sum.y == 0.0);
    if lid == 0u {
        let next = targets[params.target_offset + row];
        out[params.out_offset + row] = (shift + log(sum)) - logits[base + next];
    }
}
