// The gradient of the embedding lookup wrt its table (cpu::embedding_backward): row t of dtable
// is the sum, in token order, of the rows of dy whose token is t; rows no token names are zero.
// Deterministic without atomics, and bit for bit the CPU's sum (0.0 + dy[r0] + dy[r1] + ...):
//   embedding_links: for each position r, the next position with the same token (or NONE) and
//     whether r is its token's first occurrence.
//   embedding_zero: zeroes one chunk of dtable.
//   embedding_dtable: one invocation per (position, column); a first occurrence walks its token's
//     chain of positions in order and writes the sum into the chunk holding its token.
// dtable is stored in dense row chunks (GpuGradTable), one dispatch each. Tokens at or past the
// vocabulary are skipped (the CPU twin refuses them).

const WG: u32 = 256u;
const NONE: u32 = 0xffffffffu;

struct Params {
    tokens: u32,
    cols: u32,
    // This dispatch's chunk of dtable: its first row and row count.
    first: u32,
    count: u32,
    vocab: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> tokens: array<u32>;
// Per position: the next position with the same token, then 1 for a first occurrence.
@group(0) @binding(2) var<storage, read_write> links: array<vec2<u32>>;
@group(0) @binding(3) var<storage, read> dy: array<f32>;
@group(0) @binding(4) var<storage, read_write> dtable: array<f32>;

// embedding_zero
@group(0) @binding(1) var<storage, read_write> zero_out: array<f32>;

fn flat_id(wid: vec3<u32>, num: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * num.x) * WG + lid;
}

@compute @workgroup_size(WG)
fn embedding_links(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let r = flat_id(wid, num, lid);
    if r >= params.tokens {
        return;
    }
    let token = tokens[r];
    var first = 1u;
    for (var p = 0u; p < r; p++) {
        if tokens[p] == token {
            first = 0u;
            break;
        }
    }
    var next = NONE;
    for (var p = r + 1u; p < params.tokens; p++) {
        if tokens[p] == token {
            next = p;
            break;
        }
    }
    links[r] = vec2<u32>(next, first);
}

@compute @workgroup_size(WG)
fn embedding_zero(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = flat_id(wid, num, lid);
    if i < params.count * params.cols {
        zero_out[i] = 0.0;
    }
}

@compute @workgroup_size(WG)
fn embedding_dtable(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = flat_id(wid, num, lid);
    if i >= params.tokens * params.cols {
        return;
    }
    let r = i / params.cols;
    let c = i % params.cols;
    let token = tokens[r];
    if token >= params.vocab || token < params.first || token - params.first >= params.count {
        return;
    }
    if links[r].y == 0u {
        return;
    }
    var acc = 0.0;
    var p = r;
    loop {
        acc = acc + dy[p * params.cols + c];
        p = links[p].x;
        if p == NONE {
            break;
        }
    }
    dtable[(token - params.first) * params.cols + c] = acc;
}
