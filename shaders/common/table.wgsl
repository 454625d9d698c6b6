// The layout of a GpuTable chunk: row-major, each row padded with zeros to a whole number of
// vec4<u32>; an f32 table holds one value per u32, an f16 table two (column 2i in the low half).
// HALF selects the f16 layout (pipeline-overridable, so one file serves both).
override HALF: u32 = 0u;

// The f32 of an f16 given as bits, exactly: a normal f16 moves its exponent and mantissa into
// f32 position, a subnormal one is mant * 2^-24 (exact in f32). Tables hold finite values only.
fn half_to_f32(h: u32) -> f32 {
    let sign = (h & 0x8000u) << 16u;
    let e = (h >> 10u) & 0x1fu;
    let mant = h & 0x3ffu;
    if e == 0u {
        return bitcast<f32>(bitcast<u32>(f32(mant) * 5.9604645e-8) | sign);
    }
    return bitcast<f32>(sign | ((e + 112u) << 23u) | (mant << 13u));
}
