// Correctly rounded a / b. WGSL lets `/` be off by 2.5 ulp, and a scale that differs in its last
// bit moves round(x * s) across a half-way point now and then: the integer core would no longer be
// bit-exact with the CPU reference, which divides in IEEE f32. A 25-step long division of the
// 24-bit mantissas gives the IEEE result on every adapter.
// Domain: a finite and >= 0, b > 0 and normal, a / b normal (or a zero / subnormal a: returns 0,
// which callers clamp to 1e-5 or above, as they would the exact quotient). An infinite a or b
// gives inf or 0, as IEEE does.
fn div_rn(a: f32, b: f32) -> f32 {
    let ab = bitcast<u32>(a);
    let bb = bitcast<u32>(b);
    let ea = (ab >> 23u) & 0xffu;
    let eb = (bb >> 23u) & 0xffu;
    if ea == 255u {
        return a;
    }
    if ea == 0u || eb == 255u {
        return 0.0;
    }
    var ma = (ab & 0x7fffffu) | 0x800000u;
    let mb = (bb & 0x7fffffu) | 0x800000u;
    var e = i32(ea) - i32(eb) + 127;
    if ma < mb {
        ma = ma << 1u;
        e -= 1;
    }
    var q = 0u;
    var r = ma;
    for (var i = 0u; i < 25u; i++) {
        q = q << 1u;
        if r >= mb {
            r -= mb;
            q |= 1u;
        }
        r = r << 1u;
    }
    // q: 24 mantissa bits and one rounding bit; r != 0 is the sticky bit.
    var mant = q >> 1u;
    if (q & 1u) == 1u && (r != 0u || (mant & 1u) == 1u) {
        mant += 1u;
    }
    if mant == 0x1000000u {
        mant = 0x800000u;
        e += 1;
    }
    return bitcast<f32>((u32(e) << 23u) | (mant & 0x7fffffu));
}
