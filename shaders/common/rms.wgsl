// Root mean square of a row, bit for bit as cpu::rmsnorm computes it, for the kernels that
// normalize (rmsnorm.wgsl, norm_matmul.wgsl). Each defines WG = 256 (the fold below is
// cpu::tree_sum's order for that width), a `params` with cols, no_fuse and eps, the row data `x`
// and the norm's `weight`.
// The sum of squares folds in the order of cpu::tree_sum (float sums depend on their order); the
// division and square root are correctly rounded by hand, as WGSL's are not.
// Exact for eps >= 1e-30 (the host checks it) and squares that are zero or normal.

// Elements one fold of 256 leaves covers.
const BLOCK: u32 = 4u * WG;

var<workgroup> partial: array<f32, WG>;
// The folds of four blocks side by side.
var<workgroup> block_sums: array<f32, BLOCK>;

// x * x, opaque to the compiler: a driver may otherwise fuse the product into the sum that follows
// (one fma, one rounding), where cpu::tree_sum adds the rounded square.
fn square(v: f32) -> f32 {
    return bitcast<f32>(bitcast<u32>(v * v) ^ params.no_fuse);
}

// The sum of one leaf per invocation in cpu::tree_sum's halving order.
fn fold_leaves(leaf: f32, lid: u32) -> f32 {
    partial[lid] = leaf;
    for (var s = WG / 2u; s > 0u; s = s >> 1u) {
        workgroupBarrier();
        if lid < s {
            partial[lid] = partial[lid] + partial[lid + s];
        }
    }
    let total = workgroupUniformLoad(&partial[0]);
    workgroupBarrier();
    return total;
}

// cpu::tree_sum of the squares of a row. Four blocks of 1024 fold at once (the same halving
// order per block, a quarter of the barriers), and each group of four block sums is exactly one
// leaf of the next level: rows up to 4096 wide need one fold, 2B4T's 6912-wide rows three.
fn sum_of_squares(base: u32, lid: u32) -> f32 {
    let cols = params.cols;
    let blocks = (cols + BLOCK - 1u) / BLOCK;
    let groups = (blocks + 3u) / 4u;
    var group_leaf = 0.0;
    var total = 0.0;
    for (var g = 0u; g < groups; g++) {
        for (var j = 0u; j < 4u; j++) {
            let b = 4u * g + j;
            var leaf = 0.0;
            for (var i = 0u; i < 4u; i++) {
                let k = b * BLOCK + 4u * lid + i;
                if b < blocks && k < cols {
                    leaf = leaf + square(x[base + k]);
                }
            }
            block_sums[j * WG + lid] = leaf;
        }
        for (var s = WG / 2u; s > 0u; s = s >> 1u) {
            workgroupBarrier();
            if lid < s {
                for (var j = 0u; j < 4u; j++) {
                    block_sums[j * WG + lid] = block_sums[j * WG + lid] + block_sums[j * WG + lid + s];
                }
            }
        }
        workgroupBarrier();
        // Absent blocks add +0.0, which changes no sum: one block gives its own sum, as
        // tree_sum returns it.
        total = ((block_sums[0] + block_sums[WG]) + block_sums[2u * WG]) + block_sums[3u * WG];
        if lid == g {
            group_leaf = total;
        }
        workgroupBarrier();
    }
    if groups == 1u {
        return total;
    }
    return fold_leaves(group_leaf, lid);
}

// Correctly rounded square root of a normal a > 0 (infinity and NaN pass through), by the digit
// recurrence on the 24-bit mantissa: one result bit per step, plus one for rounding. A square root
// is never exactly half-way between two floats, so that bit alone decides the rounding.
fn sqrt_rn(a: f32) -> f32 {
    let bits = bitcast<u32>(a);
    let ea = bits >> 23u;
    if ea == 255u {
        return a;
    }
    let e = i32(ea) - 127;
    var m = (bits & 0x7fffffu) | 0x800000u;
    // An even exponent halves exactly; the odd one goes into the mantissa.
    let odd = (e & 1) != 0;
    if odd {
        m = m << 1u;
    }
    var half_e = (e - select(0, 1, odd)) / 2;
    // The radicand is m * 2^25; its bit pairs past the 13th are zero.
    let radicand = m << 1u;
    var q = 0u;
    var r = 0u;
    for (var j = 0u; j < 25u; j++) {
        var pair = 0u;
        if j < 13u {
            pair = (radicand >> (24u - 2u * j)) & 3u;
        }
        r = (r << 2u) | pair;
        let t = (q << 2u) | 1u;
        q = q << 1u;
        if r >= t {
            r -= t;
            q |= 1u;
        }
    }
    var mant = (q + 1u) >> 1u;
    if mant == 0x1000000u {
        mant = 0x800000u;
        half_e += 1;
    }
    return bitcast<f32>((u32(half_e + 127) << 23u) | (mant & 0x7fffffu));
}

// 1 / sqrt(sum / cols + eps) of the row, rounded as the CPU rounds each step. A NaN in the row
// gives NaN, so that every normalized value of the row is NaN, as on the CPU and in torch (the
// mean's test below would take a NaN sum for zero).
fn inv_rms(base: u32, lid: u32) -> f32 {
    let sum = sum_of_squares(base, lid);
    if (bitcast<u32>(sum) & 0x7fffffffu) > 0x7f800000u {
        // Made from bits at run time: WGSL has no NaN constant.
        return bitcast<f32>(0x7fc00000u | params.no_fuse);
    }
    let n = f32(params.cols);
    // div_rn does not produce subnormals; a mean that small vanishes into eps >= 1e-30 anyway.
    var mean = 0.0;
    if sum >= n * bitcast<f32>(0x00800000u) {
        mean = div_rn(sum, n);
    }
    return div_rn(1.0, sqrt_rn(mean + params.eps));
}

fn normalized(base: u32, k: u32, inv: f32) -> f32 {
    return (x[base + k] * inv) * weight[k];
}
