// Four int8 lanes of a and b multiplied and summed, in one hardware instruction where there is one.
fn dot4(a: u32, b: u32) -> i32 {
    return dot4I8Packed(a, b);
}
