// Element-wise steps that a compute pass cannot do with a buffer copy:
//   copy_rows   rows of src into dst from row dst_row on (appending V rows to a KV cache);
//   add_rows    the same rows added to dst instead (summing gradients);
//   copy_block  a block of columns of every row from one row width to another (splitting and
//               joining the halves of a fused gate/up row).

const WG: u32 = 256u;

struct CopyParams {
    // Elements to copy and the element offsets of the first one in dst and in src.
    n: u32,
    dst_offset: u32,
    src_offset: u32,
    _pad: u32,
}

struct BlockParams {
    rows: u32,
    cols: u32,
    src_stride: u32,
    src_col: u32,
    dst_stride: u32,
    dst_col: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> copy_params: CopyParams;
@group(0) @binding(0) var<uniform> block_params: BlockParams;
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

@compute @workgroup_size(WG)
fn add_rows(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.x + wid.y * num.x) * WG + lid;
    if i < copy_params.n {
        let d = copy_params.dst_offset + i;
        dst[d] = dst[d] + src[copy_params.src_offset + i];
    }
}

@compute @workgroup_size(WG)
fn copy_block(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let p = block_params;
    let i = (wid.x + wid.y * num.x) * WG + lid;
    if i < p.rows * p.cols {
        let r = i / p.cols;
        let c = i % p.cols;
        dst[r * p.dst_stride + p.dst_col + c] = src[r * p.src_stride + p.src_col + c];
    }
}
