// Gradients of the gated SiLU (cpu::silu_gate_backward) in the fused gate/up layout of
// silu_gate.wgsl: gate_up is [rows, 2 * inter] (gate in columns 0..inter, up after it), dy is
// [rows, inter], and d_gate_up receives [rows, 2 * inter], ready for the fused matmul's backward:
//   s = sigmoid(g)   d_gate[r, i] = (((s * (1 + g * (1 - s))) * u) * dy)   d_up[r, i] = silu(g) * dy
// in the CPU's order, though not its bits (exp and division are not correctly rounded in WGSL).
// One invocation per (row, i).

const WG: u32 = 256u;

struct Params {
    rows: u32,
    inter: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> gate_up: array<f32>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> d_gate_up: array<f32>;

@compute @workgroup_size(WG)
fn silu_gate_backward(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = (wid.x + wid.y * num.x) * WG + lid;
    if idx >= params.rows * params.inter {
        return;
    }
    let row = idx / params.inter;
    let i = idx % params.inter;
    let base = row * 2u * params.inter;
    let g = gate_up[base + i];
    let u = gate_up[base + params.inter + i];
    let d = dy[idx];
    let s = sigmoid(g);
    d_gate_up[base + i] = ((s * (1.0 + g * (1.0 - s))) * u) * d;
    d_gate_up[base + params.inter + i] = silu(g) * d;
}
