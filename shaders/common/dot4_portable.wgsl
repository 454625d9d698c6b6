// Four int8 lanes of a and b multiplied and summed, for adapters without
// packed_4x8_integer_dot_product; the same integer as dot4I8Packed.
fn dot4(a: u32, b: u32) -> i32 {
    let x = vec4<i32>(bitcast<i32>(a) << 24u, bitcast<i32>(a) << 16u, bitcast<i32>(a) << 8u, bitcast<i32>(a)) >> vec4<u32>(24u);
    let y = vec4<i32>(bitcast<i32>(b) << 24u, bitcast<i32>(b) << 16u, bitcast<i32>(b) << 8u, bitcast<i32>(b)) >> vec4<u32>(24u);
    return dot(x, y);
}
