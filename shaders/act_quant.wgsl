// Per-token absmax int8 quantization (cpu::act_quant): one workgroup per row.
// s = 127 / max(max|x|, 1e-5), q = clamp(round_half_even(x * s), -128, 127).
// Rows are padded to `row_words`, a multiple of 4 words, so the matmul can read them as vec4<u32>
// (common/quantize_row.wgsl).

const WG: u32 = 256u;

struct Params {
    rows: u32,
    cols: u32,
    row_words: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> codes: array<u32>;
// Scales are written as bits: a NaN is not a value WGSL promises to carry through f32.
@group(0) @binding(3) var<storage, read_write> scale_bits: array<u32>;
@group(0) @binding(4) var<storage, read_write> sums: array<i32>;

fn quant_value(row: u32, k: u32) -> f32 {
    return x[row * params.cols + k];
}

@compute @workgroup_size(WG)
fn act_quant(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.x + wid.y * num.x;
    if row >= params.rows {
        return;
    }
    quantize_row(row, params.cols, params.row_words, lid);
}
