// The gradient of rotary position embedding (cpu::rope_backward), in place: dx holds the gradient
// wrt rope's output [rows, heads * head_dim] and leaves holding the gradient wrt its input. Each
// pair (i, i + head_dim / 2) turns back by its angle:
//   dx'[i] = dx[i] * cos + dx[i + d/2] * sin      dx'[i + d/2] = dx[i + d/2] * cos - dx[i] * sin
// with the forward's host-computed (cos, sin) of each row (rope.rs's cos_sin). Products kept apart
// from the sums (see `product`): bit for bit. One invocation per pair.

const WG: u32 = 256u;

struct Params {
    rows: u32,
    heads: u32,
    half_dim: u32,
    // Always 0, but unknown to the compiler: see `product`.
    no_fuse: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
// (cos, sin) of the angle of row r and frequency i at r * half_dim + i.
@group(0) @binding(1) var<storage, read> cos_sin: array<vec2<f32>>;
@group(0) @binding(2) var<storage, read_write> dx: array<f32>;

// a * b, opaque to the compiler: a driver may otherwise fuse it into the sum that follows.
fn product(a: f32, b: f32) -> f32 {
    return bitcast<f32>(bitcast<u32>(a * b) ^ params.no_fuse);
}

@compute @workgroup_size(WG)
fn rope_backward(
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
    let at = r * params.heads * 2u * half_dim + head * 2u * half_dim + i;
    let da = dx[at];
    let db = dx[at + half_dim];
    let cs = cos_sin[r * half_dim + i];
    dx[at] = product(da, cs.x) + product(db, cs.y);
    dx[at + half_dim] = product(db, cs.x) - product(da, cs.y);
}
