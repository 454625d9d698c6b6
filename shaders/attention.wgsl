// Causal grouped-query attention over a KV cache (cpu::attention). Three entry points:
//
// - attention_split (decode, a few query rows): one workgroup per (query row, head, split of
//   SPLIT_KEYS keys). A team of TEAM invocations takes one key at a time, each invocation reading
//   consecutive floats of the key (coalesced), so many workgroups share a long cache.
// - attention_tiles (prefill, many query rows): one workgroup per (block of block_rows query
//   rows, head, split of split_keys keys). Tiles of tile_keys keys (and then their values) are
//   staged in workgroup memory and shared by every query row of the block; an online softmax
//   (running max and sum, earlier results rescaled when the max grows) walks the tiles.
// - attention_merge: when a (row, head) has several splits, the partial results (the split's
//   max score, its sum of exp and its unnormalised weighted values) are combined in split order.
//
// With one split the first two write the normalised output themselves. Every float reduction
// runs in a fixed order, so that a result never depends on scheduling.

const WG: u32 = 128u;

// attention_split: keys per workgroup, invocations per key and head dims per invocation.
const SPLIT_KEYS: u32 = 64u;
const TEAM: u32 = 32u;
const PARTS: u32 = WG / TEAM;
const MAX_HEAD_DIM: u32 = 256u;
const DIM_STEPS: u32 = MAX_HEAD_DIM / TEAM;
// Row stride of the per-invocation dot products, padded against bank conflicts.
const DOT_STRIDE: u32 = TEAM + 1u;

// attention_tiles: workgroup memory for the query block and the key (or value) tile, rows
// padded to head_dim + 1 floats; the host sizes block_rows and tile_keys to fit.
const Q_FLOATS: u32 = 1056u;
const KV_FLOATS: u32 = 2112u;
const MAX_BLOCK_ROWS: u32 = 16u;
const MAX_TILE_KEYS: u32 = 32u;
// Outputs per invocation: block_rows * head_dim < Q_FLOATS <= ACCS * WG.
const ACCS: u32 = 9u;

struct Params {
    new_rows: u32,
    total_rows: u32,
    heads: u32,
    kv_heads: u32,
    head_dim: u32,
    // 1 / sqrt(head_dim), computed on the host exactly as the CPU reference does.
    scaling: f32,
    // Key splits per (query row, head) and keys per split; one split writes `out` directly.
    splits: u32,
    split_keys: u32,
    // attention_tiles: query rows per workgroup and keys per staged tile.
    block_rows: u32,
    tile_keys: u32,
    // Where the (max, sum) pairs of the partials start in `scratch`, after the partial outputs.
    stats_offset: u32,
    _pad0: u32,
}

// Partial p = (query row * heads + head) * splits + split: its outputs at scratch[p * head_dim..]
// and its (max, sum) at scratch[stats_offset + 2 * p..].
@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> scratch: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> q: array<f32>;
@group(0) @binding(4) var<storage, read> k_cache: array<f32>;
@group(0) @binding(5) var<storage, read> v_cache: array<f32>;

// The lowest finite float (a literal this size is rejected by some WGSL compilers). A visible
// key's score always beats it, and exp(LOWEST - finite) is 0.
fn lowest() -> f32 {
    return bitcast<f32>(0xff7fffffu);
}

// Writes output `d` of (query row, head) `rh` for split `s`: normalised into `out` when there is
// one split, else the unnormalised partial into `scratch`.
fn write_output(rh: u32, s: u32, d: u32, value: f32, sum: f32) {
    let hd = params.head_dim;
    if params.splits == 1u {
        out[rh * hd + d] = value / sum;
    } else {
        scratch[(rh * params.splits + s) * hd + d] = value;
    }
}

fn write_stats(rh: u32, s: u32, max_score: f32, sum: f32) {
    if params.splits > 1u {
        let at = params.stats_offset + 2u * (rh * params.splits + s);
        scratch[at] = max_score;
        scratch[at + 1u] = sum;
    }
}

// ---- attention_split ----

var<workgroup> split_q: array<f32, MAX_HEAD_DIM>;
var<workgroup> split_dots: array<f32, SPLIT_KEYS * DOT_STRIDE>;
var<workgroup> split_slots: array<f32, SPLIT_KEYS>;
var<workgroup> split_weights: array<f32, SPLIT_KEYS>;

fn split_max(v: f32, lid: u32) -> f32 {
    if lid < SPLIT_KEYS {
        split_slots[lid] = v;
    }
    for (var s = SPLIT_KEYS / 2u; s > 0u; s = s >> 1u) {
        workgroupBarrier();
        if lid < s {
            split_slots[lid] = max(split_slots[lid], split_slots[lid + s]);
        }
    }
    let m = workgroupUniformLoad(&split_slots[0]);
    workgroupBarrier();
    return m;
}

fn split_sum(v: f32, lid: u32) -> f32 {
    if lid < SPLIT_KEYS {
        split_slots[lid] = v;
    }
    for (var s = SPLIT_KEYS / 2u; s > 0u; s = s >> 1u) {
        workgroupBarrier();
        if lid < s {
            split_slots[lid] += split_slots[lid + s];
        }
    }
    let total = workgroupUniformLoad(&split_slots[0]);
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(WG)
fn attention_split(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let flat = wid.x + wid.y * num.x;
    let splits = params.splits;
    if flat >= params.new_rows * params.heads * splits {
        return;
    }
    let s = flat % splits;
    let rh = flat / splits;
    let row = rh / params.heads;
    let h = rh % params.heads;
    let g = h / (params.heads / params.kv_heads);
    let hd = params.head_dim;
    let kv_width = params.kv_heads * hd;
    let k_base = g * hd;
    let visible = params.total_rows - params.new_rows + row + 1u;
    let j0 = s * SPLIT_KEYS;
    // Earlier rows see fewer keys: their last splits have nothing to do (and are not merged).
    if j0 >= visible {
        return;
    }
    let n = min(SPLIT_KEYS, visible - j0);

    for (var d = lid; d < hd; d += WG) {
        split_q[d] = q[rh * hd + d];
    }
    workgroupBarrier();

    // Scores: PARTS teams, team `part` takes keys part, part + PARTS, ...; invocation t of a
    // team sums dimensions t, t + TEAM, ... of the key. Four keys at a time, their loads issued
    // together: a cache row is a memory round trip, and one key after the other would wait for
    // each in turn. Keys past n read row n - 1 and are discarded.
    let t = lid % TEAM;
    let part = lid / TEAM;
    for (var i = 0u; i < SPLIT_KEYS / PARTS; i += 4u) {
        let kk = part + vec4<u32>(i, i + 1u, i + 2u, i + 3u) * PARTS;
        let kr = (j0 + min(kk, vec4<u32>(n - 1u))) * kv_width + k_base;
        var dots = vec4<f32>(0.0);
        for (var m = 0u; m < DIM_STEPS; m++) {
            let d = t + m * TEAM;
            if d < hd {
                let qd = split_q[d];
                dots.x += qd * k_cache[kr.x + d];
                dots.y += qd * k_cache[kr.y + d];
                dots.z += qd * k_cache[kr.z + d];
                dots.w += qd * k_cache[kr.w + d];
            }
        }
        let kept = select(vec4<f32>(0.0), dots, kk < vec4<u32>(n));
        split_dots[kk.x * DOT_STRIDE + t] = kept.x;
        split_dots[kk.y * DOT_STRIDE + t] = kept.y;
        split_dots[kk.z * DOT_STRIDE + t] = kept.z;
        split_dots[kk.w * DOT_STRIDE + t] = kept.w;
    }
    workgroupBarrier();
    var score = lowest();
    if lid < n {
        var total = 0.0;
        for (var tt = 0u; tt < TEAM; tt++) {
            total += split_dots[lid * DOT_STRIDE + tt];
        }
        score = total * params.scaling;
    }
    let top = split_max(score, lid);
    var p = 0.0;
    if lid < n {
        p = exp(score - top);
    }
    if lid < SPLIT_KEYS {
        split_weights[lid] = p;
    }
    let sum = split_sum(p, lid);

    // Values: the same teams; invocation t accumulates dimensions t, t + TEAM, ...
    var acc: array<f32, DIM_STEPS>;
    for (var m = 0u; m < DIM_STEPS; m++) {
        acc[m] = 0.0;
    }
    // Four keys at a time, as for the scores; the sums run in key order.
    for (var i = 0u; i < SPLIT_KEYS / PARTS; i += 4u) {
        let kk = part + vec4<u32>(i, i + 1u, i + 2u, i + 3u) * PARTS;
        let live = kk < vec4<u32>(n);
        let vr = (j0 + min(kk, vec4<u32>(n - 1u))) * kv_width + k_base;
        let w = vec4<f32>(
            split_weights[kk.x],
            split_weights[kk.y],
            split_weights[kk.z],
            split_weights[kk.w],
        );
        for (var m = 0u; m < DIM_STEPS; m++) {
            let d = t + m * TEAM;
            if d < hd {
                let v = vec4<f32>(
                    v_cache[vr.x + d],
                    v_cache[vr.y + d],
                    v_cache[vr.z + d],
                    v_cache[vr.w + d],
                );
                if live.x {
                    acc[m] += w.x * v.x;
                }
                if live.y {
                    acc[m] += w.y * v.y;
                }
                if live.z {
                    acc[m] += w.z * v.z;
                }
                if live.w {
                    acc[m] += w.w * v.w;
                }
            }
        }
    }
    // The teams' sums, added in team order (split_dots is free again: read before split_max).
    for (var m = 0u; m < DIM_STEPS; m++) {
        let d = t + m * TEAM;
        if d < hd {
            split_dots[part * MAX_HEAD_DIM + d] = acc[m];
        }
    }
    workgroupBarrier();
    for (var d = lid; d < hd; d += WG) {
        var total = 0.0;
        for (var pp = 0u; pp < PARTS; pp++) {
            total += split_dots[pp * MAX_HEAD_DIM + d];
        }
        write_output(rh, s, d, total, sum);
    }
    if lid == 0u {
        write_stats(rh, s, top, sum);
    }
}

// ---- attention_tiles ----

var<workgroup> tile_q: array<f32, Q_FLOATS>;
var<workgroup> tile_kv: array<f32, KV_FLOATS>;
var<workgroup> tile_p: array<f32, MAX_BLOCK_ROWS * MAX_TILE_KEYS>;
var<workgroup> tile_alpha: array<f32, MAX_BLOCK_ROWS>;
var<workgroup> tile_sum: array<f32, MAX_BLOCK_ROWS>;

// Stages rows j0..j0 + len of one kv head of `cache` (0: keys, 1: values) into tile_kv.
fn stage_tile(which: u32, j0: u32, len: u32, k_base: u32, lid: u32) {
    let hd = params.head_dim;
    let kv_width = params.kv_heads * hd;
    for (var e = lid; e < len * hd; e += WG) {
        let b = e / hd;
        let d = e % hd;
        let at = (j0 + b) * kv_width + k_base + d;
        var x: f32;
        if which == 0u {
            x = k_cache[at];
        } else {
            x = v_cache[at];
        }
        tile_kv[b * (hd + 1u) + d] = x;
    }
}

@compute @workgroup_size(WG)
fn attention_tiles(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let flat = wid.x + wid.y * num.x;
    let rows = params.block_rows;
    let keys = params.tile_keys;
    let splits = params.splits;
    let blocks = (params.new_rows + rows - 1u) / rows;
    if flat >= blocks * params.heads * splits {
        return;
    }
    let s = flat % splits;
    let bh = flat / splits;
    let block = bh / params.heads;
    let h = bh % params.heads;
    let g = h / (params.heads / params.kv_heads);
    let hd = params.head_dim;
    let stride = hd + 1u;
    let first_row = block * rows;
    let live_rows = min(rows, params.new_rows - first_row);
    // Query row r sits at position offset + r and sees keys 0..=its position.
    let offset = params.total_rows - params.new_rows;
    let last_key = offset + first_row + live_rows - 1u;
    let j_start = s * params.split_keys;
    if j_start > last_key {
        return;
    }
    let j_end = min(j_start + params.split_keys, last_key + 1u);

    // Rows past the last query row repeat it; their results are dropped.
    for (var e = lid; e < rows * hd; e += WG) {
        let r = e / hd;
        let d = e % hd;
        let qrow = min(first_row + r, params.new_rows - 1u);
        tile_q[r * stride + d] = q[(qrow * params.heads + h) * hd + d];
    }
    var acc: array<f32, ACCS>;
    for (var m = 0u; m < ACCS; m++) {
        acc[m] = 0.0;
    }
    // Invocation r < rows keeps row r's running max and sum.
    var run_max = lowest();
    var run_sum = 0.0;
    for (var t0 = j_start; t0 < j_end; t0 += keys) {
        let len = min(keys, j_end - t0);
        // The previous tile's values (and, the first time, tile_q) are done with.
        workgroupBarrier();
        stage_tile(0u, t0, len, g * hd, lid);
        workgroupBarrier();
        for (var e = lid; e < rows * keys; e += WG) {
            let r = e / keys;
            let b = e % keys;
            var score = lowest();
            if b < len && t0 + b <= offset + first_row + r {
                var dot = 0.0;
                for (var d = 0u; d < hd; d++) {
                    dot += tile_q[r * stride + d] * tile_kv[b * stride + d];
                }
                score = dot * params.scaling;
            }
            tile_p[e] = score;
        }
        workgroupBarrier();
        if lid < rows {
            var top = run_max;
            for (var b = 0u; b < len; b++) {
                top = max(top, tile_p[lid * keys + b]);
            }
            let alpha = exp(run_max - top);
            var sum = 0.0;
            for (var b = 0u; b < len; b++) {
                let score = tile_p[lid * keys + b];
                let p = select(0.0, exp(score - top), score > lowest());
                tile_p[lid * keys + b] = p;
                sum += p;
            }
            run_sum = run_sum * alpha + sum;
            run_max = top;
            tile_alpha[lid] = alpha;
        }
        stage_tile(1u, t0, len, g * hd, lid);
        workgroupBarrier();
        for (var m = 0u; m < ACCS; m++) {
            let o = lid + m * WG;
            if o < rows * hd {
                let r = o / hd;
                let d = o % hd;
                var pv = 0.0;
                for (var b = 0u; b < len; b++) {
                    pv += tile_p[r * keys + b] * tile_kv[b * stride + d];
                }
                acc[m] = acc[m] * tile_alpha[r] + pv;
            }
        }
    }

    if lid < rows {
        tile_sum[lid] = run_sum;
        if lid < live_rows {
            write_stats((first_row + lid) * params.heads + h, s, run_max, run_sum);
        }
    }
    workgroupBarrier();
    for (var m = 0u; m < ACCS; m++) {
        let o = lid + m * WG;
        if o < live_rows * hd {
            let r = o / hd;
            write_output((first_row + r) * params.heads + h, s, o % hd, acc[m], tile_sum[r]);
        }
    }
}

// ---- attention_merge ----

// One workgroup per (query row, head): the splits that hold any of its keys, in order.
@compute @workgroup_size(WG)
fn attention_merge(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let rh = wid.x + wid.y * num.x;
    if rh >= params.new_rows * params.heads {
        return;
    }
    let row = rh / params.heads;
    let hd = params.head_dim;
    let visible = params.total_rows - params.new_rows + row + 1u;
    let n = (visible + params.split_keys - 1u) / params.split_keys;
    let first = rh * params.splits;
    var top = lowest();
    for (var s = 0u; s < n; s++) {
        top = max(top, scratch[params.stats_offset + 2u * (first + s)]);
    }
    var sum = 0.0;
    for (var s = 0u; s < n; s++) {
        let at = params.stats_offset + 2u * (first + s);
        sum += scratch[at + 1u] * exp(scratch[at] - top);
    }
    for (var d = lid; d < hd; d += WG) {
        var total = 0.0;
        for (var s = 0u; s < n; s++) {
            let scale = exp(scratch[params.stats_offset + 2u * (first + s)] - top);
            total += scratch[(first + s) * hd + d] * scale;
        }
        out[rh * hd + d] = total / sum;
    }
}
