// The greedy choice over one row of logits (cpu::argmax): the largest logit, the lowest id on
// ties, -inf never chosen; a NaN or +inf logit is an error, reported as its first id.
//   argmax_partial  workgroup g takes CHUNK logits and writes its best and its first bad id;
//   argmax_final    one workgroup combines the partials into `result`:
//                   [token, first bad id (NONE: none), that logit's bits, any token allowed].
// Logits compare as integers: order_key maps f32 bits to u32 in the same order (-0 below +0,
// as Rust's total_cmp), and every reduction step keeps the (key, id) pair that is larger by key
// and smaller by id, a total order, so the result never depends on scheduling.

const WG: u32 = 256u;
// Logits per invocation of argmax_partial, loaded together.
const PER_INVOCATION: u32 = 8u;
const CHUNK: u32 = WG * PER_INVOCATION;
const NONE: u32 = 0xffffffffu;

struct Params {
    // Logits considered: ids 0..count of the row.
    count: u32,
    partials: u32,
    _pad0: u32,
    _pad1: u32,
}

// One candidate: its order key (0: none), its id, and the first bad id and that logit's bits.
struct Best {
    key: u32,
    id: u32,
    bad: u32,
    bad_bits: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read_write> partials: array<Best>;
// As bits: a NaN is not a value WGSL promises to carry through f32.
@group(0) @binding(2) var<storage, read> logits: array<u32>;
@group(0) @binding(2) var<storage, read_write> result: array<u32, 4>;

var<workgroup> slots: array<Best, WG>;

fn order_key(bits: u32) -> u32 {
    return select(bits | 0x80000000u, ~bits, (bits & 0x80000000u) != 0u);
}

fn candidate(id: u32, bits: u32) -> Best {
    let magnitude = bits & 0x7fffffffu;
    // NaN, or +inf.
    if magnitude > 0x7f800000u || bits == 0x7f800000u {
        return Best(0u, NONE, id, bits);
    }
    // -inf: a forbidden token.
    if bits == 0xff800000u {
        return Best(0u, NONE, NONE, 0u);
    }
    return Best(order_key(bits), id, NONE, 0u);
}

fn better(a: Best, b: Best) -> Best {
    var out = a;
    if b.key > a.key || (b.key == a.key && b.id < a.id) {
        out.key = b.key;
        out.id = b.id;
    }
    if b.bad < a.bad {
        out.bad = b.bad;
        out.bad_bits = b.bad_bits;
    }
    return out;
}

fn reduce(v: Best, lid: u32) -> Best {
    slots[lid] = v;
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        workgroupBarrier();
        if lid < s {
            slots[lid] = better(slots[lid], slots[lid + s]);
        }
    }
    workgroupBarrier();
    return slots[0];
}

@compute @workgroup_size(WG)
fn argmax_partial(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = wid.x + wid.y * num.x;
    if group >= params.partials {
        return;
    }
    var best = Best(0u, NONE, NONE, 0u);
    var bits: array<u32, PER_INVOCATION>;
    for (var i = 0u; i < PER_INVOCATION; i++) {
        let id = group * CHUNK + i * WG + lid;
        bits[i] = logits[min(id, params.count - 1u)];
    }
    for (var i = 0u; i < PER_INVOCATION; i++) {
        let id = group * CHUNK + i * WG + lid;
        if id < params.count {
            best = better(best, candidate(id, bits[i]));
        }
    }
    let total = reduce(best, lid);
    if lid == 0u {
        partials[group] = total;
    }
}

@compute @workgroup_size(WG)
fn argmax_final(@builtin(local_invocation_index) lid: u32) {
    var best = Best(0u, NONE, NONE, 0u);
    for (var p = lid; p < params.partials; p += WG) {
        best = better(best, partials[p]);
    }
    let total = reduce(best, lid);
    if lid == 0u {
        // Always a valid id: a step already submitted may embed it before the host sees the
        // error flags.
        result[0] = select(0u, total.id, total.key != 0u);
        result[1] = total.bad;
        result[2] = total.bad_bits;
        result[3] = select(0u, 1u, total.key != 0u);
    }
}
