// Row-wide f32 folds for the softmax kernels (nll.wgsl, cross_entropy.wgsl), one workgroup per
// row of WG invocations: a maximum that keeps NaN, and a sum, each in a fixed halving-tree order,
// so the result never depends on scheduling. Every invocation must call them, from uniform control
// flow. `softmax_shift_and_sum` reads the including shader's `logits` and `params.vocab`.

var<workgroup> slots: array<f32, WG>;

// By its bits: a compiler may assume that v != v is false.
fn is_nan(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u;
}

// max(a, b), but NaN when either is: WGSL's max need not keep a NaN.
fn max_or_nan(a: f32, b: f32) -> f32 {
    return select(max(a, b), a + b, is_nan(a) || is_nan(b));
}

fn fold_max(v: f32, lid: u32) -> f32 {
    slots[lid] = v;
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        workgroupBarrier();
        if lid < s {
            slots[lid] = max_or_nan(slots[lid], slots[lid + s]);
        }
    }
    return workgroupUniformLoad(&slots[0]);
}

// The row's maximum (0 for a row of -inf, whose exp(-inf - -inf) would be NaN) and the sum of
// exp(logit - that shift) over the row starting at `base`.
fn softmax_shift_and_sum(base: u32, lid: u32) -> vec2<f32> {
    // Start from an element of the row (WGSL has no -inf constant).
    var top = logits[base + min(lid, params.vocab - 1u)];
    for (var k = lid; k < params.vocab; k += WG) {
        top = max_or_nan(top, logits[base + k]);
    }
    top = fold_max(top, lid);
    let shift = select(top, 0.0, bitcast<u32>(top) == 0xff800000u);
    var sum = 0.0;
    for (var k = lid; k < params.vocab; k += WG) {
        sum += exp(logits[base + k] - shift);
    }
    return vec2<f32>(shift, fold_sum(sum, lid));
}

fn fold_sum(v: f32, lid: u32) -> f32 {
    workgroupBarrier();
    slots[lid] = v;
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        workgroupBarrier();
        if lid < s {
            slots[lid] = slots[lid] + slots[lid + s];
        }
    }
    return workgroupUniformLoad(&slots[0]);
}
