// Ternary weight quantization and packing on the GPU (cpu::ternary_pack), in three steps:
//   reduce_sum    sums |w| per scale group, in blocks of 1024, over as many levels as needed,
//                 in exactly the order of cpu::tree_sum (float sums depend on their order, and
//                 the scale decides which weights round to zero);
//   finish_scales scale = 1 / max(sum / count, 1e-5), both divisions correctly rounded;
//   pack_words    w * scale -> {-1, 0, +1} -> the private layout of packing::gpu_words.

const WG: u32 = 256u;
// Elements one workgroup of reduce_sum folds into one partial sum.
const BLOCK: u32 = 4u * WG;

struct ReduceParams {
    // Elements per scale group (segment) in src, segments, partial sums per segment in dst.
    seg_len: u32,
    segments: u32,
    blocks: u32,
    take_abs: u32,
}

struct ScaleParams {
    segments: u32,
    // Elements per scale group, as f32 rounded on the host the way the CPU reference rounds it.
    count: f32,
    _pad0: u32,
    _pad1: u32,
}

struct PackParams {
    rows: u32,
    cols: u32,
    k_words: u32,
    per_channel: u32,
    threshold: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> reduce_params: ReduceParams;
@group(0) @binding(1) var<storage, read> reduce_src: array<f32>;
@group(0) @binding(2) var<storage, read_write> reduce_dst: array<f32>;

var<workgroup> partial: array<f32, WG>;

@compute @workgroup_size(WG)
fn reduce_sum(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = wid.x + wid.y * num.x;
    let seg = group / reduce_params.blocks;
    let block = group % reduce_params.blocks;
    if seg >= reduce_params.segments {
        return;
    }
    var leaf = 0.0;
    for (var i = 0u; i < 4u; i++) {
        let k = block * BLOCK + 4u * lid + i;
        if k < reduce_params.seg_len {
            var v = reduce_src[seg * reduce_params.seg_len + k];
            if reduce_params.take_abs == 1u {
                v = abs(v);
            }
            leaf = leaf + v;
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
        reduce_dst[group] = partial[0];
    }
}

@group(0) @binding(0) var<uniform> scale_params: ScaleParams;
@group(0) @binding(1) var<storage, read> group_sums: array<f32>;
@group(0) @binding(2) var<storage, read_write> scales_out: array<f32>;

@compute @workgroup_size(WG)
fn finish_scales(@builtin(global_invocation_id) gid: vec3<u32>) {
    let seg = gid.x;
    if seg >= scale_params.segments {
        return;
    }
    let gamma = div_rn(group_sums[seg], scale_params.count);
    scales_out[seg] = div_rn(1.0, max(gamma, 1e-5));
}

@group(0) @binding(0) var<uniform> pack_params: PackParams;
@group(0) @binding(1) var<storage, read> weights: array<f32>;
@group(0) @binding(2) var<storage, read> scales_in: array<f32>;
@group(0) @binding(3) var<storage, read_write> words: array<u32>;

@compute @workgroup_size(WG)
fn pack_words(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = (wid.x + wid.y * num.x) * WG + lid;
    if idx >= pack_params.rows * pack_params.k_words {
        return;
    }
    let n = idx / pack_params.k_words;
    let j = idx % pack_params.k_words;
    let s = scales_in[select(0u, n, pack_params.per_channel == 1u)];
    var word = 0u;
    for (var l = 0u; l < 16u; l++) {
        let k = 16u * j + l;
        var code = 1u;
        if k < pack_params.cols {
            let v = weights[n * pack_params.cols + k] * s;
            if abs(v) > pack_params.threshold {
                code = select(0u, 2u, v > 0.0);
            }
        }
        word |= code << (8u * (l % 4u) + 2u * (l / 4u));
    }
    words[idx] = word;
}
