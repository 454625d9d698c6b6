// Sampling one token from a row of logits (cpu::sample): temperature, then top-k, then top-p over
// the probabilities renormalized over the top-k survivors, then the draw. The result has
// argmax.wgsl's layout: [token, first bad id (NONE: none), that logit's bits, any token allowed],
// so a decoding step can embed the token without the host.
//
// One workgroup does it all, in passes over the row, so nothing waits on another dispatch.
// Weights exp((logit - max) / temperature) are kept in fixed point, 40 fractional bits, as
// (lo, hi) u32 pairs: integer sums are exact in any order, so workgroup atomics can build
// histograms and every result is the same on every run. Candidates rank by logit (the order key
// of argmax.wgsl), ties by the lower id. Each cut is a radix selection: four rounds of a
// 256-bin histogram over the order key find the key at which a running total in rank order first
// reaches a need (a count for top-k, a weight for top-p and the draw); ties at that key are then
// walked in id order.
//   levels of candidates: 0 every allowed token, 1 the top-k survivors, 2 the nucleus of those.

const WG: u32 = 256u;
const NONE: u32 = 0xffffffffu;
// 2^32 as f32, for moving between fixed point and f32.
const WORD: f32 = 4294967296.0;

struct Params {
    // Logits considered: ids 0..count of the row.
    count: u32,
    // 0: no top-k cut.
    top_k: u32,
    // > 0 (temperature 0 is argmax.wgsl's job).
    temperature: f32,
    // In (0, 1]; 1: no nucleus cut.
    top_p: f32,
}

// A key and a fixed-point amount: a cut found by a selection, what remains of a need, a total.
struct Found {
    key: u32,
    amount: vec2<u32>,
}

struct Overview {
    best: u32,
    alive: u32,
    bad: u32,
    bad_bits: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
// The draw: u in [0, 1) as the fraction draw[0] / 2^32.
@group(0) @binding(1) var<storage, read> draw: array<u32>;
// As bits: a NaN is not a value WGSL promises to carry through f32.
@group(0) @binding(2) var<storage, read> logits: array<u32>;
// Each token's weight in fixed point (0 for a forbidden token).
@group(0) @binding(3) var<storage, read_write> weights: array<vec2<u32>>;
@group(0) @binding(4) var<storage, read_write> result: array<u32, 4>;

var<workgroup> bin_lo: array<atomic<u32>, WG>;
var<workgroup> bin_hi: array<atomic<u32>, WG>;
var<workgroup> sums: array<vec2<u32>, WG>;
var<workgroup> flags: array<vec2<u32>, WG>;
var<workgroup> found: Found;
var<workgroup> overview: Overview;
var<workgroup> found_id: u32;
// The top-k and nucleus cuts: a token is in when its key is above the cut's key, or equal to it
// and its id at most the cut's id.
var<workgroup> cut_k: vec2<u32>;
var<workgroup> cut_p: vec2<u32>;

fn add64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    let lo = a.x + b.x;
    return vec2<u32>(lo, a.y + b.y + select(0u, 1u, lo < a.x));
}

fn sub64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    return vec2<u32>(a.x - b.x, a.y - b.y - select(0u, 1u, a.x < b.x));
}

fn ge64(a: vec2<u32>, b: vec2<u32>) -> bool {
    return a.y > b.y || (a.y == b.y && a.x >= b.x);
}

fn min64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    return select(a, b, ge64(a, b));
}

fn max64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    return select(b, a, ge64(a, b));
}

// The full 64-bit product of two u32, from 16-bit halves.
fn mul32(a: u32, b: u32) -> vec2<u32> {
    let a0 = a & 0xffffu;
    let a1 = a >> 16u;
    let b0 = b & 0xffffu;
    let b1 = b >> 16u;
    let low = a0 * b0;
    let mid = a0 * b1 + (low >> 16u);
    let mid2 = a1 * b0 + (mid & 0xffffu);
    return vec2<u32>((mid2 << 16u) | (low & 0xffffu), a1 * b1 + (mid >> 16u) + (mid2 >> 16u));
}

fn to_float(a: vec2<u32>) -> f32 {
    return f32(a.y) * WORD + f32(a.x);
}

// x >= 0, below 2^64; exact where x is (an f32 holds 24 bits).
fn to_fixed(x: f32) -> vec2<u32> {
    let hi = floor(x / WORD);
    return vec2<u32>(u32(x - hi * WORD), u32(hi));
}

// 0 for -inf (a forbidden token); only called on logits that are not NaN or +inf.
fn order_key(bits: u32) -> u32 {
    if bits == 0xff800000u {
        return 0u;
    }
    return select(bits | 0x80000000u, ~bits, (bits & 0x80000000u) != 0u);
}

fn key_value(key: u32) -> f32 {
    return bitcast<f32>(select(~key, key & 0x7fffffffu, (key & 0x80000000u) != 0u));
}

// floor(exp((logit - best) / temperature) * 2^40): in (0, 2^40] for the best token.
fn weight(logit: f32, best: f32) -> vec2<u32> {
    let w = min(exp((logit - best) / params.temperature), 1.0) * 256.0;
    let hi = floor(w);
    return vec2<u32>(u32((w - hi) * WORD), u32(hi));
}

fn kept(level: u32, id: u32, key: u32) -> bool {
    if key == 0u {
        return false;
    }
    if level >= 1u && !(key > cut_k.x || (key == cut_k.x && id <= cut_k.y)) {
        return false;
    }
    return level < 2u || key > cut_p.x || (key == cut_p.x && id <= cut_p.y);
}

fn amount(by_weight: bool, id: u32) -> vec2<u32> {
    if by_weight {
        return weights[id];
    }
    return vec2<u32>(1u, 0u);
}

// The key of the first candidate of `level`, in rank order, at which the running amount reaches
// `need` (at most the level's total), and what of `need` remains for the ties at that key.
fn select_key(level: u32, by_weight: bool, need_in: vec2<u32>, lid: u32) -> Found {
    var prefix = 0u;
    var mask = 0u;
    var need = need_in;
    for (var round = 0u; round < 4u; round++) {
        let shift = 24u - 8u * round;
        atomicStore(&bin_lo[lid], 0u);
        atomicStore(&bin_hi[lid], 0u);
        workgroupBarrier();
        for (var i = lid; i < params.count; i += WG) {
            let key = order_key(logits[i]);
            if (key & mask) == prefix && kept(level, i, key) {
                let bin = (key >> shift) & 0xffu;
                let a = amount(by_weight, i);
                let old = atomicAdd(&bin_lo[bin], a.x);
                atomicAdd(&bin_hi[bin], a.y + select(0u, 1u, old + a.x < old));
            }
        }
        workgroupBarrier();
        if lid == 0u {
            var before = vec2<u32>(0u, 0u);
            var digit = 0u;
            for (var d = WG; d > 0u; d--) {
                let bin = vec2<u32>(atomicLoad(&bin_lo[d - 1u]), atomicLoad(&bin_hi[d - 1u]));
                let through = add64(before, bin);
                if ge64(through, need) {
                    digit = d - 1u;
                    break;
                }
                before = through;
            }
            found = Found(prefix | (digit << shift), sub64(need, before));
        }
        let f = workgroupUniformLoad(&found);
        prefix = f.key;
        need = f.amount;
        mask |= 0xffu << shift;
    }
    return Found(prefix, need);
}

// The first candidate of `level` (with key `tie`, unless `any_key`) in id order at which the
// running amount reaches `need`. Each invocation sums a contiguous run of ids, one finds the run
// that holds the answer, and that one walks it.
fn first_reaching(
    level: u32,
    any_key: bool,
    tie: u32,
    by_weight: bool,
    need: vec2<u32>,
    lid: u32,
) -> u32 {
    let run = (params.count + WG - 1u) / WG;
    let start = min(lid * run, params.count);
    let end = min(start + run, params.count);
    var total = vec2<u32>(0u, 0u);
    for (var i = start; i < end; i++) {
        let key = order_key(logits[i]);
        if (any_key || key == tie) && kept(level, i, key) {
            total = add64(total, amount(by_weight, i));
        }
    }
    sums[lid] = total;
    found_id = NONE;
    workgroupBarrier();
    if lid == 0u {
        var before = vec2<u32>(0u, 0u);
        var owner = NONE;
        for (var t = 0u; t < WG; t++) {
            let through = add64(before, sums[t]);
            if ge64(through, need) {
                owner = t;
                break;
            }
            before = through;
        }
        found = Found(owner, sub64(need, before));
    }
    let f = workgroupUniformLoad(&found);
    if lid == f.key {
        var through = vec2<u32>(0u, 0u);
        for (var i = start; i < end; i++) {
            let key = order_key(logits[i]);
            if (any_key || key == tie) && kept(level, i, key) {
                through = add64(through, amount(by_weight, i));
                if ge64(through, f.amount) {
                    found_id = i;
                    break;
                }
            }
        }
    }
    return workgroupUniformLoad(&found_id);
}

// The total weight of the candidates of `level`.
fn total_weight(level: u32, lid: u32) -> vec2<u32> {
    var total = vec2<u32>(0u, 0u);
    for (var i = lid; i < params.count; i += WG) {
        if kept(level, i, order_key(logits[i])) {
            total = add64(total, weights[i]);
        }
    }
    sums[lid] = total;
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        workgroupBarrier();
        if lid < s {
            sums[lid] = add64(sums[lid], sums[lid + s]);
        }
    }
    workgroupBarrier();
    if lid == 0u {
        found = Found(0u, sums[0]);
    }
    return workgroupUniformLoad(&found).amount;
}

@compute @workgroup_size(WG)
fn sample(@builtin(local_invocation_index) lid: u32) {
    // The best key, how many tokens are allowed, and the first bad logit.
    var best = 0u;
    var alive = 0u;
    var bad = vec2<u32>(NONE, 0u);
    for (var i = lid; i < params.count; i += WG) {
        let bits = logits[i];
        if (bits & 0x7fffffffu) > 0x7f800000u || bits == 0x7f800000u {
            if i < bad.x {
                bad = vec2<u32>(i, bits);
            }
        } else {
            let key = order_key(bits);
            best = max(best, key);
            alive += select(0u, 1u, key != 0u);
        }
    }
    sums[lid] = vec2<u32>(best, alive);
    flags[lid] = bad;
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        workgroupBarrier();
        if lid < s {
            sums[lid] = vec2<u32>(max(sums[lid].x, sums[lid + s].x), sums[lid].y + sums[lid + s].y);
            if flags[lid + s].x < flags[lid].x {
                flags[lid] = flags[lid + s];
            }
        }
    }
    workgroupBarrier();
    if lid == 0u {
        overview = Overview(sums[0].x, sums[0].y, flags[0].x, flags[0].y);
        cut_k = vec2<u32>(0u, NONE);
        cut_p = vec2<u32>(0u, NONE);
    }
    let o = workgroupUniformLoad(&overview);
    if o.bad != NONE || o.alive == 0u {
        if lid == 0u {
            result[0] = 0u;
            result[1] = o.bad;
            result[2] = o.bad_bits;
            result[3] = select(0u, 1u, o.alive != 0u);
        }
        return;
    }

    let top = key_value(o.best);
    for (var i = lid; i < params.count; i += WG) {
        let bits = logits[i];
        var w = vec2<u32>(0u, 0u);
        if order_key(bits) != 0u {
            w = weight(bitcast<f32>(bits), top);
        }
        weights[i] = w;
    }
    storageBarrier();

    var ranked = false;
    if params.top_k > 0u && params.top_k < o.alive {
        let f = select_key(0u, false, vec2<u32>(params.top_k, 0u), lid);
        let id = first_reaching(0u, false, f.key, false, f.amount, lid);
        if lid == 0u {
            cut_k = vec2<u32>(f.key, id);
        }
        workgroupBarrier();
        ranked = true;
    }
    var mass = total_weight(1u, lid);
    if params.top_p < 1.0 {
        // The best token weighs 2^40, so a need of at least 1 always takes it.
        let need = max64(min64(to_fixed(params.top_p * to_float(mass)), mass), vec2<u32>(1u, 0u));
        let f = select_key(1u, true, need, lid);
        let id = first_reaching(1u, false, f.key, true, f.amount, lid);
        if lid == 0u {
            cut_p = vec2<u32>(f.key, id);
        }
        workgroupBarrier();
        mass = total_weight(2u, lid);
        ranked = true;
    }
    // The first candidate whose running weight passes floor(u * mass).
    let u = draw[0];
    let drawn = add64(vec2<u32>(mul32(u, mass.x).y, 0u), mul32(u, mass.y));
    let need = add64(drawn, vec2<u32>(1u, 0u));
    var token: u32;
    if ranked {
        let f = select_key(2u, true, need, lid);
        token = first_reaching(2u, false, f.key, true, f.amount, lid);
    } else {
        token = first_reaching(2u, true, 0u, true, need, lid);
    }
    if lid == 0u {
        result[0] = min(token, params.count - 1u);
        result[1] = NONE;
        result[2] = 0u;
        result[3] = 1u;
    }
}
