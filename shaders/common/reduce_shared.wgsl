// Workgroup-wide integer reductions through workgroup memory, for adapters without subgroups.
// Integer sums and maxima do not depend on the order, so both variants give the same value.
// Every invocation of the workgroup must call these, from uniform control flow.
var<workgroup> reduce_sum_slots: array<vec4<i32>, WG>;
var<workgroup> reduce_max_slots: array<u32, WG>;

fn wg_sum(v: vec4<i32>, lid: u32) -> vec4<i32> {
    reduce_sum_slots[lid] = v;
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        workgroupBarrier();
        if lid < s {
            reduce_sum_slots[lid] += reduce_sum_slots[lid + s];
        }
    }
    let total = workgroupUniformLoad(&reduce_sum_slots[0]);
    workgroupBarrier();
    return total;
}

fn wg_max(v: u32, lid: u32) -> u32 {
    reduce_max_slots[lid] = v;
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        workgroupBarrier();
        if lid < s {
            reduce_max_slots[lid] = max(reduce_max_slots[lid], reduce_max_slots[lid + s]);
        }
    }
    let total = workgroupUniformLoad(&reduce_max_slots[0]);
    workgroupBarrier();
    return total;
}
