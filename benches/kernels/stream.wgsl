// The streaming-read ceiling: every invocation reads its share of `data` as vec4<u32> with a
// grid stride, four loads in flight per step, and each workgroup writes the wrapping sum of what
// it read, so no load can be dropped and the host can check that every word was read.

@group(0) @binding(0) var<storage, read> data: array<vec4<u32>>;
@group(0) @binding(1) var<storage, read_write> sums: array<u32>;

const WG: u32 = 256u;
var<workgroup> partial: array<u32, WG>;

@compute @workgroup_size(256)
fn stream(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let len = arrayLength(&data);
    let stride = groups.x * WG;
    var acc = vec4<u32>(0u);
    var i = gid.x;
    for (; i + 3u * stride < len; i += 4u * stride) {
        let a = data[i];
        let b = data[i + stride];
        let c = data[i + 2u * stride];
        let d = data[i + 3u * stride];
        acc += (a + b) + (c + d);
    }
    for (; i < len; i += stride) {
        acc += data[i];
    }
    partial[lid] = acc.x + acc.y + acc.z + acc.w;
    workgroupBarrier();
    for (var h = WG / 2u; h > 0u; h >>= 1u) {
        if lid < h {
            partial[lid] += partial[lid + h];
        }
        workgroupBarrier();
    }
    if lid == 0u {
        sums[wid.x] = partial[0];
    }
}
