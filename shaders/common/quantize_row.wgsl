// cpu::act_quant of one row of `cols` values, for the kernels that quantize a row (act_quant,
// rmsnorm_quant, relu2_gate_quant). Each defines `quant_value(row, k) -> f32`, the value of
// column k (recomputed where it is computed rather than stored: the same operations round alike),
// and `codes`, `scale_bits` and `sums` bindings. Every invocation of the workgroup calls it.
// Codes are packed four per u32 (byte i = column 4w + i), the row padded with zero codes to
// `row_words`; a row holding NaN or an infinity gets zero codes and a NaN scale.
fn quantize_row(row: u32, cols: u32, row_words: u32, lid: u32) {
    // The largest |x| as bits: integer order equals float order for non-negative floats, and NaN
    // and infinities sort above every finite value.
    var amax = 0u;
    for (var k = lid; k < cols; k += WG) {
        amax = max(amax, bitcast<u32>(quant_value(row, k)) & 0x7fffffffu);
    }
    let m = wg_max(amax, lid);
    let finite = m < 0x7f800000u;
    let s = quant_scale(m);

    var total = 0;
    let out = row * row_words;
    for (var w = lid; w < row_words; w += WG) {
        var word = 0u;
        for (var i = 0u; i < 4u; i++) {
            let k = 4u * w + i;
            if finite && k < cols {
                let q = quant_code(quant_value(row, k), s);
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
