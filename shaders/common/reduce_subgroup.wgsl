// Workgroup-wide integer reductions: one subgroup operation, then one atomic per subgroup.
// No assumption about subgroup size or how invocations map to subgroups.
// Every invocation of the workgroup must call these, from uniform control flow.
var<workgroup> reduce_sum_atomics: array<atomic<i32>, 4>;
var<workgroup> reduce_sum_result: vec4<i32>;
var<workgroup> reduce_max_atomic: atomic<u32>;
var<workgroup> reduce_max_result: u32;

fn wg_sum(v: vec4<i32>, lid: u32) -> vec4<i32> {
    if lid < 4u {
        atomicStore(&reduce_sum_atomics[lid], 0);
    }
    workgroupBarrier();
    let s = subgroupAdd(v);
    if lid == subgroupBroadcastFirst(lid) {
        atomicAdd(&reduce_sum_atomics[0], s.x);
        atomicAdd(&reduce_sum_atomics[1], s.y);
        atomicAdd(&reduce_sum_atomics[2], s.z);
        atomicAdd(&reduce_sum_atomics[3], s.w);
    }
    workgroupBarrier();
    if lid == 0u {
        reduce_sum_result = vec4<i32>(
            atomicLoad(&reduce_sum_atomics[0]),
            atomicLoad(&reduce_sum_atomics[1]),
            atomicLoad(&reduce_sum_atomics[2]),
            atomicLoad(&reduce_sum_atomics[3]),
        );
    }
    return workgroupUniformLoad(&reduce_sum_result);
}

fn wg_max(v: u32, lid: u32) -> u32 {
    if lid == 0u {
        atomicStore(&reduce_max_atomic, 0u);
    }
    workgroupBarrier();
    let m = subgroupMax(v);
    if lid == subgroupBroadcastFirst(lid) {
        atomicMax(&reduce_max_atomic, m);
    }
    workgroupBarrier();
    if lid == 0u {
        reduce_max_result = atomicLoad(&reduce_max_atomic);
    }
    return workgroupUniformLoad(&reduce_max_result);
}
