// The gated SiLU (cpu::silu_gate) on the output of the fused gate/up matmul: gate_up is
// [rows, 2 * inter], gate in columns 0..inter, up in inter..2 * inter.
//   silu_gate        out[r, i] = silu(g) * u (common/silu.wgsl);
//   silu_gate_quant  the same values quantized exactly as act_quant.wgsl would
//                    (common/quantize_row.wgsl), one workgroup per row.

const WG: u32 = 256u;

struct Params {
    rows: u32,
    inter: u32,
    row_words: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> gate_up: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@group(0) @binding(2) var<storage, read_write> codes: array<u32>;
// Bits, as in act_quant.wgsl: a NaN is not a value WGSL promises to carry through f32.
@group(0) @binding(3) var<storage, read_write> scale_bits: array<u32>;
@group(0) @binding(4) var<storage, read_write> sums: array<i32>;

fn gated(row: u32, i: u32) -> f32 {
    let base = row * 2u * params.inter;
    return silu(gate_up[base + i]) * gate_up[base + params.inter + i];
}

@compute @workgroup_size(WG)
fn silu_gate(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let idx = (wid.x + wid.y * num.x) * WG + lid;
    if idx >= params.rows * params.inter {
        return;
    }
    out[idx] = gated(idx / params.inter, idx % params.inter);
}

fn quant_value(row: u32, k: u32) -> f32 {
    return gated(row, k);
}

@compute @workgroup_size(WG)
fn silu_gate_quant(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.x + wid.y * num.x;
    if row >= params.rows {
        return;
    }
    quantize_row(row, params.inter, params.row_words, lid);
}
