// Per-token absmax int8 quantization (cpu::act_quant): one workgroup per row.
// s = 127 / max(max|x|, 1e-5), q = clamp(round_half_even(x * s), -128, 127).
// Codes are packed four per u32 (byte i = column 4w + i), rows padded with zero codes to
// `row_words`, a multiple of 4 words, so the matmul can read them as vec4<u32>.
// A row holding NaN or an infinity gets zero codes and a NaN scale.

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
    let base = row * params.cols;

    // The largest |x| as bits: integer order equals float order for non-negative floats, and NaN
    // and infinities sort above every finite value.
    var amax = 0u;
    for (var k = lid; k < params.cols; k += WG) {
        amax = max(amax, bitcast<u32>(x[base + k]) & 0x7fffffffu);
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
                let q = quant_code(x[base + k], s);
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
