// A decoding matmul with the normalization and quantization of its input in front
// (cpu::norm_matmul), bit for bit the same as rmsnorm_quant followed by ternary_matmul's gemv:
//   y = ternary_matmul(act_quant(rmsnorm(x, weight, eps)), w)        (y += ... with ADD_TO_Y)
// With GATED, w is gate_proj stacked on up_proj and y = relu2_gate(gate, up) (relu2_gate.wgsl).
//
// Each workgroup normalizes and quantizes the whole input row into workgroup memory itself, then
// computes ROWS outputs from it. The row is small (a few thousand floats, read from cache), so
// repeating that work per workgroup costs less than the two dependent dispatches it replaces.

const WG: u32 = 256u;
// Matrix rows per workgroup, and invocations per row.
const ROWS: u32 = 16u;
const LANES: u32 = WG / ROWS;
// Codes of the largest row, in u32 words of four (8192 columns).
const MAX_CODE_WORDS: u32 = 2048u;

override ADD_TO_Y: bool = false;
override GATED: bool = false;

struct Params {
    // Tokens (rows of x).
    rows: u32,
    cols: u32,
    // Outputs per token: w's rows, or with GATED half of them.
    n: u32,
    k_words: u32,
    // Always 0, but unknown to the compiler: see `square` (common/rms.wgsl).
    no_fuse: u32,
    eps: f32,
    per_channel: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read> w: array<u32>;
@group(0) @binding(4) var<storage, read> w_scales: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;

var<workgroup> codes: array<u32, MAX_CODE_WORDS>;
var<workgroup> lane_sums: array<i32, WG>;
var<workgroup> outputs: array<f32, ROWS>;

fn lanes(word: u32, t: u32) -> u32 {
    return (word >> (2u * t)) & 0x03030303u;
}

// Codes for the 16 columns of weight word j against that word: sum(x * (w + 1)).
fn dot_word(j: u32, word: u32) -> i32 {
    return dot4(codes[4u * j], lanes(word, 0u)) + dot4(codes[4u * j + 1u], lanes(word, 1u))
        + dot4(codes[4u * j + 2u], lanes(word, 2u)) + dot4(codes[4u * j + 3u], lanes(word, 3u));
}

// The matrix row that workgroup row r of block `block` computes, or none past the end. GATED
// blocks pair ROWS / 2 gate rows with the up rows of the same outputs.
fn matrix_row(block: u32, r: u32) -> u32 {
    if GATED {
        let half = ROWS / 2u;
        let o = block * half + r % half;
        if o >= params.n {
            return 0xffffffffu;
        }
        return select(o, params.n + o, r >= half);
    }
    let o = block * ROWS + r;
    return select(0xffffffffu, o, o < params.n);
}

@compute @workgroup_size(WG)
fn norm_gemv(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = wid.x + wid.y * num.x;
    let per_block = select(ROWS, ROWS / 2u, GATED);
    let blocks = (params.n + per_block - 1u) / per_block;
    let m = group / blocks;
    let block = group % blocks;
    if m >= params.rows {
        return;
    }

    // rmsnorm_quant (rmsnorm.wgsl), into workgroup memory.
    let base = m * params.cols;
    let inv = inv_rms(base, lid);
    var amax = 0u;
    for (var k = lid; k < params.cols; k += WG) {
        amax = max(amax, bitcast<u32>(normalized(base, k, inv)) & 0x7fffffffu);
    }
    let top = wg_max(amax, lid);
    let finite = top < 0x7f800000u;
    let s = quant_scale(top);
    var code_total = 0;
    for (var c = lid; c < 4u * params.k_words; c += WG) {
        var word = 0u;
        for (var i = 0u; i < 4u; i++) {
            let k = 4u * c + i;
            if finite && k < params.cols {
                let q = quant_code(normalized(base, k, inv), s);
                word = pack_code(word, q, i);
                code_total += q;
            }
        }
        codes[c] = word;
    }
    let code_sum = wg_sum(vec4<i32>(code_total, 0, 0, 0), lid).x;
    let x_scale = bitcast<f32>(scale_bits_of(s, top));
    workgroupBarrier();

    // gemv (ternary_matmul.wgsl): LANES invocations per row, striding over its words.
    let r = lid / LANES;
    let row = matrix_row(block, r);
    var acc = 0;
    if row != 0xffffffffu {
        let kw = params.k_words;
        for (var j = lid % LANES; j < kw; j += LANES) {
            acc += dot_word(j, w[row * kw + j]);
        }
    }
    lane_sums[lid] = acc;
    workgroupBarrier();
    var value = 0.0;
    if lid < ROWS {
        var total = 0;
        for (var i = 0u; i < LANES; i++) {
            total += lane_sums[lid * LANES + i];
        }
        let rw = matrix_row(block, lid);
        if rw != 0xffffffffu {
            let sw = w_scales[select(0u, rw, params.per_channel == 1u)];
            value = f32(total - code_sum) / (x_scale * sw);
        }
        outputs[lid] = value;
    }
    workgroupBarrier();

    if GATED {
        let half = ROWS / 2u;
        let o = block * half + lid;
        if lid < half && o < params.n {
            let g = outputs[lid];
            // relu2_gate.wgsl's rule.
            let relu = select(g, 0.0, g < 0.0);
            y[m * params.n + o] = (relu * relu) * outputs[lid + half];
        }
    } else {
        let o = block * ROWS + lid;
        if lid < ROWS && o < params.n {
            if ADD_TO_Y {
                y[m * params.n + o] = y[m * params.n + o] + value;
            } else {
                y[m * params.n + o] = value;
            }
        }
    }
}
