// Rotary position embedding (cpu::rope, rotate-half convention), one invocation per pair
// (i, i + head_dim / 2) of one head of one row, written to dst row dst_row + r (a KV cache, or a
// separate query buffer). cos and sin come from the host, computed as the CPU computes them:
// WGSL's cos and sin are far from correctly rounded at angles in the thousands of radians.
// With the products kept apart from the sums (see `product`), the result is bit-exact.

const WG: u32 = 256u;

struct Params {
    rows: u32,
    heads: u32,
    half_dim: u32,
    dst_row: u32,
    // Always 0, but unknown to the compiler: see `product`.
    no_fuse: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
// (cos, sin) of the angle of row r and frequency i at r * half_dim + i.
@group(0) @binding(2) var<storage, read> cos_sin: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read_write> dst: array<f32>;

// a * b, opaque to the compiler: a driver may otherwise fuse it into the sum that follows (one
// rounding where the CPU rounds the product and the sum each).
fn product(a: f32, b: f32) -> f32 {
    return bitcast<f32>(bitcast<u32>(a * b) ^ params.no_fuse);
}

@compute @workgroup_size(WG)
fn rope(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = (wid.x + wid.y * num.x) * WG + lid;
    let half_dim = params.half_dim;
    if idx >= params.rows * params.heads * half_dim {
        return;
    }
    let i = idx % half_dim;
    let head = (idx / half_dim) % params.heads;
    let r = idx / (half_dim * params.heads);
    let row_len = params.heads * 2u * half_dim;
    let at = r * row_len + head * 2u * half_dim + i;
    let a = src[at];
    let b = src[at + half_dim];
    let cs = cos_sin[r * half_dim + i];
    let out = at + params.dst_row * row_len;
    dst[out] = product(a, cs.x) + product(-b, cs.y);
    dst[out + half_dim] = product(b, cs.x) + product(a, cs.y);
}
