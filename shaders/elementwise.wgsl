// Element-wise steps of the forward pass that a compute pass cannot do with a buffer copy:
//   copy_rows  rows of src into dst from row dst_row on (appending V rows to a KV cache).

const WG: u32 = 256u;

struct CopyParams {
    // Elements to copy and the element offsets of the first one in dst and in src.
    n: u32,
    dst_offset: u32,
    src_offset: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> copy_params: CopyParams;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read_write> dst: array<f32>;

@compute @workgroup_size(WG)
fn copy_rows(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.x + wid.y * num.x) * WG + lid;
    if i < copy_params.n {
        dst[copy_params.dst_offset + i] = src[copy_params.src_offset + i];
    }
}
