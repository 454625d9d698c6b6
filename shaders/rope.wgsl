// Rotary position embedding (cpu::rope, rotate-half convention), one invocation per pair
// (i, i + head_dim / 2) of one head of one row.
//   rope      src [rows, heads * head_dim] rotated into dst row dst_row + r (a KV cache, or a
//             separate query buffer);
//   rope_qkv  src the fused q/k/v projection [rows, (heads + 2 * kv_heads) * head_dim]: queries
//             rotated into dst row r, keys rotated into k_cache row dst_row + r and values copied
//             into v_cache row dst_row + r, one dispatch for all three. cos and sin come from the host, computed as the CPU computes them:
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
    // rope_qkv only.
    kv_heads: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
// (cos, sin) of the angle of row r and frequency i at r * half_dim + i.
@group(0) @binding(2) var<storage, read> cos_sin: array<vec2<f32>>;
@group(0) @binding(3) var<storage, read_write> dst: array<f32>;
@group(0) @binding(4) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(5) var<storage, read_write> v_cache: array<f32>;

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

@compute @workgroup_size(WG)
fn rope_qkv(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = (wid.x + wid.y * num.x) * WG + lid;
    let half_dim = params.half_dim;
    let heads = params.heads;
    let kv_heads = params.kv_heads;
    let all_heads = heads + 2u * kv_heads;
    if idx >= params.rows * all_heads * half_dim {
        return;
    }
    let i = idx % half_dim;
    let head = (idx / half_dim) % all_heads;
    let r = idx / (half_dim * all_heads);
    let hd = 2u * half_dim;
    let at = (r * all_heads + head) * hd + i;
    let a = src[at];
    let b = src[at + half_dim];
    let cs = cos_sin[r * half_dim + i];
    let rotated_a = product(a, cs.x) + product(-b, cs.y);
    let rotated_b = product(b, cs.x) + product(a, cs.y);
    let cache_row = (params.dst_row + r) * kv_heads;
    if head < heads {
        let out = (r * heads + head) * hd + i;
        dst[out] = rotated_a;
        dst[out + half_dim] = rotated_b;
    } else if head < heads + kv_heads {
        let out = (cache_row + head - heads) * hd + i;
        k_cache[out] = rotated_a;
        k_cache[out + half_dim] = rotated_b;
    } else {
        let out = (cache_row + head - heads - kv_heads) * hd + i;
        v_cache[out] = a;
        v_cache[out + half_dim] = b;
    }
}
