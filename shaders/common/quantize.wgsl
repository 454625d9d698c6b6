// Per-row absmax int8 quantization, cpu::act_quant's rule, shared by every kernel that writes
// activation codes (act_quant, and the fused rmsnorm_quant and relu2_gate_quant).

// The scale for a row whose largest |x| has the bits `amax_bits` (taken as an integer max over
// the bits of |x|: NaN and infinities sort above every finite value); 0 for such a row.
fn quant_scale(amax_bits: u32) -> f32 {
    if amax_bits >= 0x7f800000u {
        return 0.0;
    }
    return div_rn(127.0, max(bitcast<f32>(amax_bits), 1e-5));
}

fn quant_code(v: f32, s: f32) -> i32 {
    return i32(clamp(round(v * s), -128.0, 127.0));
}

// `word` with code `q` in byte `lane`.
fn pack_code(word: u32, q: i32, lane: u32) -> u32 {
    return word | ((bitcast<u32>(q) & 0xffu) << (8u * lane));
}

// What a row's scale is stored as: NaN (as bits: WGSL does not promise to carry a NaN through
// f32) when the row held a NaN or an infinity.
fn scale_bits_of(s: f32, amax_bits: u32) -> u32 {
    return select(bitcast<u32>(s), 0x7fc00000u, amax_bits >= 0x7f800000u);
}
