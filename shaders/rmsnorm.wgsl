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
    let base = row * params.cols;
    let inv = inv_rms(base, lid);

    // From here on act_quant.wgsl, on values recomputed rather than stored: the same products
    // round to the same floats.
    var amax = 0u;
    for (var k = lid; k < params.cols; k += WG) {
        amax = max(amax, bitcast<u32>(normalized(base, k, inv)) & 0x7fffffffu);
    }
    let m = wg_max(amax, lid);
    let finite = m < 0x7f800000u;
    let s = quant_scale(m);

    var total = 0;
    let out = row * params.row_words;
    for (var w = lid; w < params.row_words; w += WG) {
        var word = 0u;
        for (var i = 0u; i < 4u; i++) {
            let k = 4u * w + i;
            if finite && k < params.cols {
                let q = quant_code(normalized(base, k, inv), s);
                word = pack_code(word, q, i);
                total += q;
            }
        }
        codes[out + w] = word;
    }
    let sum = wg_sum(vec4<i32>(total, 0, 0, 0), lid).x;
    if lid == 0u {
        scale_bits[row] = scale_bits_of(s, m);
        sums[row] = sum;
    }
}
