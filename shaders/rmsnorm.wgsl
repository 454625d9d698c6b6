// RMS normalization (cpu::rmsnorm), one workgroup per row, bit for bit:
//   y = (x * (1 / sqrt(tree_sum(x²) / cols + eps))) * weight
// with the root mean square of common/rms.wgsl. rmsnorm_quant goes on to quantize the normalized
// row exactly as act_quant.wgsl would.

const WG: u32 = 256u;

struct Params {
    rows: u32,
    cols: u32,
    row_words: u32,
    // Always 0, but unknown to the compiler: see `square`.
    no_fuse: u32,
    eps: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

@group(0) @binding(3) var<storage, read_write> codes: array<u32>;
// Bits, as in act_quant.wgsl: a NaN is not a value WGSL promises to carry through f32.
@group(0) @binding(4) var<storage, read_write> scale_bits: array<u32>;
@group(0) @binding(5) var<storage, read_write> sums: array<i32>;

@compute @workgroup_size(WG)
fn rmsnorm(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.x + wid.y * num.x;
    if row >= params.rows {
        return;
    }
    let base = row * params.cols;
    let inv = inv_rms(base, lid);
    for (var k = lid; k < params.cols; k += WG) {
        y[base + k] = normalized(base, k, inv);
    }
}

// rmsnorm_quant's row: its 1 / rms, then the normalized values quantize_row asks for.
var<private> row_inv_rms: f32;

fn quant_value(row: u32, k: u32) -> f32 {
    return normalized(row * params.cols, k, row_inv_rms);
}

@compute @workgroup_size(WG)
fn rmsnorm_quant(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = wid.x + wid.y * num.x;
    if row >= params.rows {
        return;
    }
    row_inv_rms = inv_rms(row * params.cols, lid);
    quantize_row(row, params.cols, params.row_words, lid);
}
