// Gradients of causal grouped-query attention (cpu::attention_backward) wrt q, k and v, for the
// upstream gradient dout. Query row r (of n) sits at position t - n + r and sees keys 0..=that;
// query head h reads kv head g = h / (heads / kv_heads). With s[j] = (q_h · k_g[j]) * scaling,
// a = softmax(s), da[j] = dout_h · v_g[j] and D = sum_j a[j] * da[j]:
//   ds[j] = a[j] * (da[j] - D) * scaling
//   dq_h = sum_j ds[j] * k_g[j]
//   dk_g[j] = sum over the group's heads and the queries that see j of ds[j] * q_h
//   dv_g[j] = the same sum of a[j] * dout_h
// attention_dq: one workgroup per (query row, head): the softmax statistics (max, sum, D), kept
//   for attention_dkv, then dq, keys staged KEYS at a time.
// attention_dkv: one workgroup per (key row, kv head): the (query row, head) pairs that see the
//   key, PAIRS at a time, in the CPU's order (rows, then heads); each sum is one invocation's.
// No atomics: every k/v gradient is summed by one invocation in a fixed order. f32 throughout; the
// twin adds in another order (a tolerance). head_dim <= 256.

const WG: u32 = 64u;
// Accumulators per invocation: head_dim / WG, rounded up.
const SLOTS: u32 = 4u;

struct Params {
    n: u32,
    t: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    scaling: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read> dout: array<f32>;
// Per (query row, head): max score, sum of exp(s - max), D.
@group(0) @binding(5) var<storage, read_write> stats: array<vec4<f32>>;

// attention_dq
@group(0) @binding(6) var<storage, read_write> dq: array<f32>;

// attention_dkv
@group(0) @binding(6) var<storage, read_write> dk: array<f32>;
@group(0) @binding(7) var<storage, read_write> dv: array<f32>;

var<workgroup> fold: array<f32, WG>;
var<workgroup> tile_a: array<f32, WG>;
var<workgroup> tile_ds: array<f32, WG>;

fn q_at(r: u32, h: u32) -> u32 {
    return (r * params.heads + h) * params.head_dim;
}

fn kv_at(j: u32, g: u32) -> u32 {
    return (j * params.kv_heads + g) * params.head_dim;
}

// Left to right, as the CPU's dot.
fn dot_q_k(qa: u32, ka: u32) -> f32 {
    var acc = 0.0;
    for (var d = 0u; d < params.head_dim; d++) {
        acc += q[qa + d] * k[ka + d];
    }
    return acc;
}

fn dot_dout_v(oa: u32, va: u32) -> f32 {
    var acc = 0.0;
    for (var d = 0u; d < params.head_dim; d++) {
        acc += dout[oa + d] * v[va + d];
    }
    return acc;
}

fn fold_max(x: f32, lid: u32) -> f32 {
    workgroupBarrier();
    fold[lid] = x;
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        workgroupBarrier();
        if lid < s {
            fold[lid] = max(fold[lid], fold[lid + s]);
        }
    }
    return workgroupUniformLoad(&fold[0]);
}

fn fold_sum(x: f32, lid: u32) -> f32 {
    workgroupBarrier();
    fold[lid] = x;
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        workgroupBarrier();
        if lid < s {
            fold[lid] = fold[lid] + fold[lid + s];
        }
    }
    return workgroupUniformLoad(&fold[0]);
}

@compute @workgroup_size(WG)
fn attention_dq(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let pair = wid.x + wid.y * num.x;
    if pair >= params.n * params.heads {
        return;
    }
    let r = pair / params.heads;
    let h = pair % params.heads;
    let g = h / (params.heads / params.kv_heads);
    let visible = params.t - params.n + r + 1u;
    let qa = q_at(r, h);
    // Statistics: every key's score is finite (a finite q and k), and key 0 is always visible.
    var top = dot_q_k(qa, kv_at(0u, g)) * params.scaling;
    for (var j = lid; j < visible; j += WG) {
        top = max(top, dot_q_k(qa, kv_at(j, g)) * params.scaling);
    }
    top = fold_max(top, lid);
    var sum_e = 0.0;
    var sum_e_da = 0.0;
    for (var j = lid; j < visible; j += WG) {
        let e = exp(dot_q_k(qa, kv_at(j, g)) * params.scaling - top);
        sum_e += e;
        sum_e_da += e * dot_dout_v(qa, kv_at(j, g));
    }
    let total = fold_sum(sum_e, lid);
    let big_d = fold_sum(sum_e_da, lid) / total;
    if lid == 0u {
        stats[pair] = vec4<f32>(top, total, big_d, 0.0);
    }
    var acc: array<f32, SLOTS>;
    for (var j0 = 0u; j0 < visible; j0 += WG) {
        let j = j0 + lid;
        var ds = 0.0;
        if j < visible {
            let a = exp(dot_q_k(qa, kv_at(j, g)) * params.scaling - top) / total;
            ds = a * (dot_dout_v(qa, kv_at(j, g)) - big_d) * params.scaling;
        }
        workgroupBarrier();
        tile_ds[lid] = ds;
        workgroupBarrier();
        let keys = min(WG, visible - j0);
        for (var s = 0u; s < SLOTS; s++) {
            let d = lid + s * WG;
            if d < params.head_dim {
                for (var jj = 0u; jj < keys; jj++) {
                    acc[s] += tile_ds[jj] * k[kv_at(j0 + jj, g) + d];
                }
            }
        }
    }
    for (var s = 0u; s < SLOTS; s++) {
        let d = lid + s * WG;
        if d < params.head_dim {
            dq[qa + d] = acc[s];
        }
    }
}

@compute @workgroup_size(WG)
fn attention_dkv(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let pair = wid.x + wid.y * num.x;
    if pair >= params.t * params.kv_heads {
        return;
    }
    let j = pair / params.kv_heads;
    let g = pair % params.kv_heads;
    let group = params.heads / params.kv_heads;
    let ka = kv_at(j, g);
    // Query rows that see key j: position t - n + r >= j.
    let offset = params.t - params.n;
    let r_min = select(0u, j - offset, j > offset);
    let pairs = (params.n - r_min) * group;
    var dk_acc: array<f32, SLOTS>;
    var dv_acc: array<f32, SLOTS>;
    for (var p0 = 0u; p0 < pairs; p0 += WG) {
        let p = p0 + lid;
        var a = 0.0;
        var ds = 0.0;
        if p < pairs {
            let r = r_min + p / group;
            let h = g * group + p % group;
            let st = stats[r * params.heads + h];
            let qa = q_at(r, h);
            a = exp(dot_q_k(qa, ka) * params.scaling - st.x) / st.y;
            ds = a * (dot_dout_v(qa, ka) - st.z) * params.scaling;
        }
        workgroupBarrier();
        tile_a[lid] = a;
        tile_ds[lid] = ds;
        workgroupBarrier();
        let count = min(WG, pairs - p0);
        for (var s = 0u; s < SLOTS; s++) {
            let d = lid + s * WG;
            if d < params.head_dim {
                for (var pp = 0u; pp < count; pp++) {
                    let qa = q_at(r_min + (p0 + pp) / group, g * group + (p0 + pp) % group);
                    dk_acc[s] += tile_ds[pp] * q[qa + d];
                    dv_acc[s] += tile_a[pp] * dout[qa + d];
                }
            }
        }
    }
    for (var s = 0u; s < SLOTS; s++) {
        let d = lid + s * WG;
        if d < params.head_dim {
            dk[ka + d] = dk_acc[s];
            dv[ka + d] = dv_acc[s];
        }
    }
}
