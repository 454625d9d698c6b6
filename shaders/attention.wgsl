// Causal grouped-query attention over a KV cache (cpu::attention): one workgroup per (query row,
// head), its invocations spread over the keys. Keys are visited in blocks of WG with an online
// softmax (running max and sum, earlier partial results rescaled when the max grows), so that
// workgroup memory stays a few KiB whatever the cache length.

const WG: u32 = 256u;

struct Params {
    new_rows: u32,
    total_rows: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    // 1 / sqrt(head_dim), computed on the host exactly as the CPU reference does.
    scaling: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k_cache: array<f32>;
@group(0) @binding(3) var<storage, read> v_cache: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

var<workgroup> q_head: array<f32, WG>;
var<workgroup> weights: array<f32, WG>;
var<workgroup> slots: array<f32, WG>;

// Float reductions in a fixed tree order, so that a result never depends on scheduling.
fn block_max(v: f32, lid: u32) -> f32 {
    slots[lid] = v;
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        workgroupBarrier();
        if lid < s {
            slots[lid] = max(slots[lid], slots[lid + s]);
        }
    }
    let m = workgroupUniformLoad(&slots[0]);
    workgroupBarrier();
    return m;
}

fn block_sum(v: f32, lid: u32) -> f32 {
    slots[lid] = v;
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        workgroupBarrier();
        if lid < s {
            slots[lid] += slots[lid + s];
        }
    }
    let total = workgroupUniformLoad(&slots[0]);
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(WG)
fn attention(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let flat = wid.x + wid.y * num.x;
    if flat >= params.new_rows * params.heads {
        return;
    }
    let row = flat / params.heads;
    let h = flat % params.heads;
    let g = h / (params.heads / params.kv_heads);
    let hd = params.head_dim;
    let kv_width = params.kv_heads * hd;
    let k_base = g * hd;
    let visible = params.total_rows - params.new_rows + row + 1u;

    if lid < hd {
        q_head[lid] = q[flat * hd + lid];
    }
    workgroupBarrier();

    // The value phase: invocation (part, d) sums keys part, part + splits, ... of each block for
    // dimension d; the parts are added in order at the end.
    let splits = WG / hd;
    let d = lid % hd;
    let part = lid / hd;
    var acc = 0.0;
    var running_max = 0.0;
    var running_sum = 0.0;
    for (var b0 = 0u; b0 < visible; b0 += WG) {
        let j = b0 + lid;
        let live = j < visible;
        var score = 0.0;
        if live {
            let kr = j * kv_width + k_base;
            var qk = 0.0;
            for (var i = 0u; i < hd; i++) {
                qk += q_head[i] * k_cache[kr + i];
            }
            score = qk * params.scaling;
        }
        // Key b0 is always visible, so the lowest finite float (-f32::MAX) never wins the max.
        let block_top = block_max(select(bitcast<f32>(0xff7fffffu), score, live), lid);
        var new_max = block_top;
        var rescale = 0.0;
        if b0 > 0u {
            new_max = max(running_max, block_top);
            rescale = exp(running_max - new_max);
        }
        let p = select(0.0, exp(score - new_max), live);
        weights[lid] = p;
        running_sum = running_sum * rescale + block_sum(p, lid);
        running_max = new_max;

        if part < splits {
            var partial = 0.0;
            let block_len = min(WG, visible - b0);
            for (var jj = part; jj < block_len; jj += splits) {
                partial += weights[jj] * v_cache[(b0 + jj) * kv_width + k_base + d];
            }
            acc = acc * rescale + partial;
        }
        workgroupBarrier();
    }

    slots[lid] = acc;
    workgroupBarrier();
    if lid < hd {
        var total = 0.0;
        for (var s = 0u; s < splits; s++) {
            total += slots[s * hd + lid];
        }
        out[flat * hd + lid] = total / running_sum;
    }
}
