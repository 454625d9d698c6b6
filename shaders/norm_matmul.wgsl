// A decoding matmul with the normalization and quantization of its input in front
// (cpu::norm_matmul), bit for bit the same as rmsnorm_quant followed by ternary_matmul's gemv:
//   norm_gemv       y = ternary_matmul(act_quant(rmsnorm(x, weight, eps)), w)
//                   (y += ... with ADD_TO_Y; with GATED, w is gate_proj stacked on up_proj and
//                   y = relu2_gate(gate, up) as relu2_gate.wgsl computes it, or with SILU
//                   silu_gate(gate, up) as silu_gate.wgsl does; without NORMED, x is quantized
//                   as it is, as act_quant.wgsl would, for the families without sub-norms);
//   norm_gemv_rope  w is q_proj, k_proj and v_proj stacked, and the outputs go where rope_qkv
//                   (rope.wgsl) would put them: queries rotated into y, keys rotated and values
//                   copied into row cache_row + m of the KV cache.
//
// Each workgroup normalizes and quantizes the whole input row into workgroup memory itself, then
// computes ROWS matrix rows from it. The row is small (a few thousand floats, read from cache), so
// repeating that work per workgroup costs less on a GPU than the dependent dispatches it replaces.

const WG: u32 = 256u;
// Matrix rows per workgroup, and invocations per row.
const ROWS: u32 = 16u;
const LANES: u32 = WG / ROWS;
// Rows that pair with the other half of the block (gate with up, a rope pair's two halves).
const HALF: u32 = ROWS / 2u;
// Codes of the largest row, in u32 words of four (8192 columns).
const MAX_CODE_WORDS: u32 = 2048u;
const WORDS_PER_INVOCATION: u32 = MAX_CODE_WORDS / WG;
const NO_ROW: u32 = 0xffffffffu;

override ADD_TO_Y: bool = false;
override GATED: bool = false;
override SILU: bool = false;
override NORMED: bool = true;

struct Params {
    // Tokens (rows of x).
    rows: u32,
    cols: u32,
    // norm_gemv: outputs per token (w's rows, or with GATED half of them).
    n: u32,
    k_words: u32,
    // Always 0, but unknown to the compiler: see `square` (common/rms.wgsl) and `product`.
    no_fuse: u32,
    eps: f32,
    per_channel: u32,
    // norm_gemv_rope: the attention shape and the cache row of token 0.
    heads: u32,
    kv_heads: u32,
    half_dim: u32,
    cache_row: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> weight: array<f32>;
@group(0) @binding(3) var<storage, read> w: array<u32>;
@group(0) @binding(4) var<storage, read> w_scales: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
// norm_gemv_rope: (cos, sin) of token m and frequency i at m * half_dim + i, and the caches.
@group(0) @binding(6) var<storage, read> cos_sin: array<vec2<f32>>;
@group(0) @binding(7) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(8) var<storage, read_write> v_cache: array<f32>;

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

// a * b, opaque to the compiler, as rope.wgsl computes it.
fn product(a: f32, b: f32) -> f32 {
    return bitcast<f32>(bitcast<u32>(a * b) ^ params.no_fuse);
}

// Column k of token m (at base) as quantize_row takes it: normalized, or as it is.
fn input_value(base: u32, k: u32, inv: f32) -> f32 {
    if NORMED {
        return normalized(base, k, inv);
    }
    return x[base + k];
}

// rmsnorm_quant (rmsnorm.wgsl), or without NORMED act_quant, of token m into `codes`: returns
// (code sum, scale bits).
// Invocation lid takes the words lid, lid + WG, ... (four columns each), loads all of them at
// once and keeps the normalized values in registers from the max to the quantization: loops of
// constant length unroll, so the loads go out together instead of one round trip each.
fn quantize_row(m: u32, lid: u32) -> vec2<u32> {
    let base = m * params.cols;
    var inv = 0.0;
    if NORMED {
        inv = inv_rms(base, lid);
    }
    let words = 4u * params.k_words;
    var values: array<vec4<f32>, WORDS_PER_INVOCATION>;
    var amax = 0u;
    for (var i = 0u; i < WORDS_PER_INVOCATION; i++) {
        let c = lid + i * WG;
        var v = vec4<f32>(0.0);
        if c < words {
            for (var l = 0u; l < 4u; l++) {
                let k = 4u * c + l;
                if k < params.cols {
                    v[l] = input_value(base, k, inv);
                }
            }
        }
        values[i] = v;
        let b = bitcast<vec4<u32>>(v) & vec4<u32>(0x7fffffffu);
        amax = max(amax, max(max(b.x, b.y), max(b.z, b.w)));
    }
    let top = wg_max(amax, lid);
    let finite = top < 0x7f800000u;
    let s = quant_scale(top);
    var total = 0;
    for (var i = 0u; i < WORDS_PER_INVOCATION; i++) {
        let c = lid + i * WG;
        if c < words {
            var word = 0u;
            for (var l = 0u; l < 4u; l++) {
                if finite && 4u * c + l < params.cols {
                    let q = quant_code(values[i][l], s);
                    word = pack_code(word, q, l);
                    total += q;
                }
            }
            codes[c] = word;
        }
    }
    let code_sum = wg_sum(vec4<i32>(total, 0, 0, 0), lid).x;
    workgroupBarrier();
    return vec2<u32>(bitcast<u32>(code_sum), scale_bits_of(s, top));
}

// The gemv (ternary_matmul.wgsl) of the codes against the block's matrix rows: `lane_row` is
// the row of this invocation's group of LANES (NO_ROW: none), `own_row` the row whose output
// invocation lid < ROWS writes into outputs[lid].
fn block_outputs(quantized: vec2<u32>, lane_row: u32, own_row: u32, lid: u32) {
    var acc = 0;
    if lane_row != NO_ROW {
        let kw = params.k_words;
        let base = lane_row * kw;
        // Four weight words at a time, their loads issued together (one after the other, each
        // would wait for its own memory round trip); words past the row read its last word and
        // count for nothing.
        for (var j = lid % LANES; j < kw; j += 4u * LANES) {
            let jj = vec4<u32>(j, j + LANES, j + 2u * LANES, j + 3u * LANES);
            let at = base + min(jj, vec4<u32>(kw - 1u));
            let ws = vec4<u32>(w[at.x], w[at.y], w[at.z], w[at.w]);
            acc += dot_word(jj.x, ws.x);
            for (var u = 1u; u < 4u; u++) {
                if jj[u] < kw {
                    acc += dot_word(jj[u], ws[u]);
                }
            }
        }
    }
    lane_sums[lid] = acc;
    workgroupBarrier();
    if lid < ROWS {
        var total = 0;
        for (var i = 0u; i < LANES; i++) {
            total += lane_sums[lid * LANES + i];
        }
        var value = 0.0;
        if own_row != NO_ROW {
            let sw = w_scales[select(0u, own_row, params.per_channel == 1u)];
            let x_scale = bitcast<f32>(quantized.y);
            value = f32(total - bitcast<i32>(quantized.x)) / (x_scale * sw);
        }
        outputs[lid] = value;
    }
    workgroupBarrier();
}

// norm_gemv's matrix row for row r of block `block`. GATED blocks pair HALF gate rows with the
// up rows of the same outputs.
fn gemv_row(block: u32, r: u32) -> u32 {
    if GATED {
        let o = block * HALF + r % HALF;
        if o >= params.n {
            return NO_ROW;
        }
        return select(o, params.n + o, r >= HALF);
    }
    let o = block * ROWS + r;
    return select(NO_ROW, o, o < params.n);
}

@compute @workgroup_size(WG)
fn norm_gemv(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = wid.x + wid.y * num.x;
    let per_block = select(ROWS, HALF, GATED);
    let blocks = (params.n + per_block - 1u) / per_block;
    let m = group / blocks;
    let block = group % blocks;
    if m >= params.rows {
        return;
    }
    let quantized = quantize_row(m, lid);
    block_outputs(quantized, gemv_row(block, lid / LANES), gemv_row(block, lid), lid);

    if GATED {
        let o = block * HALF + lid;
        if lid < HALF && o < params.n {
            let g = outputs[lid];
            var act: f32;
            if SILU {
                act = silu(g);
            } else {
                // relu2_gate.wgsl's rule.
                let relu = select(g, 0.0, g < 0.0);
                act = relu * relu;
            }
            y[m * params.n + o] = act * outputs[lid + HALF];
        }
    } else {
        let o = block * ROWS + lid;
        if lid < ROWS && o < params.n {
            if ADD_TO_Y {
                y[m * params.n + o] = y[m * params.n + o] + outputs[lid];
            } else {
                y[m * params.n + o] = outputs[lid];
            }
        }
    }
}

// norm_gemv_rope's blocks, per token: first the rope blocks, HALF pairs (i, i + half_dim) of one
// query or key head each, then the value blocks of ROWS value rows.
fn rope_blocks_per_head() -> u32 {
    return (params.half_dim + HALF - 1u) / HALF;
}

fn rope_row(block: u32, r: u32) -> u32 {
    let hd = 2u * params.half_dim;
    let rope_blocks = (params.heads + params.kv_heads) * rope_blocks_per_head();
    if block < rope_blocks {
        let head = block / rope_blocks_per_head();
        let i = (block % rope_blocks_per_head()) * HALF + r % HALF;
        if i >= params.half_dim {
            return NO_ROW;
        }
        // Query rows, then key rows: head h's rows start at h * head_dim either way.
        return head * hd + i + select(0u, params.half_dim, r >= HALF);
    }
    let v = (block - rope_blocks) * ROWS + r;
    let kv_width = params.kv_heads * hd;
    return select(NO_ROW, (params.heads + params.kv_heads) * hd + v, v < kv_width);
}

@compute @workgroup_size(WG)
fn norm_gemv_rope(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = wid.x + wid.y * num.x;
    let half_dim = params.half_dim;
    let hd = 2u * half_dim;
    let heads = params.heads;
    let kv_heads = params.kv_heads;
    let kv_width = kv_heads * hd;
    let rope_blocks = (heads + kv_heads) * rope_blocks_per_head();
    let blocks = rope_blocks + (kv_width + ROWS - 1u) / ROWS;
    let m = group / blocks;
    let block = group % blocks;
    if m >= params.rows {
        return;
    }
    let quantized = quantize_row(m, lid);
    block_outputs(quantized, rope_row(block, lid / LANES), rope_row(block, lid), lid);

    let cache_row = (params.cache_row + m) * kv_heads;
    if block < rope_blocks {
        let head = block / rope_blocks_per_head();
        let i = (block % rope_blocks_per_head()) * HALF + lid;
        if lid < HALF && i < half_dim {
            let a = outputs[lid];
            let b = outputs[lid + HALF];
            let cs = cos_sin[m * half_dim + i];
            let rotated_a = product(a, cs.x) + product(-b, cs.y);
            let rotated_b = product(b, cs.x) + product(a, cs.y);
            if head < heads {
                let out = (m * heads + head) * hd + i;
                y[out] = rotated_a;
                y[out + half_dim] = rotated_b;
            } else {
                let out = (cache_row + head - heads) * hd + i;
                k_cache[out] = rotated_a;
                k_cache[out + half_dim] = rotated_b;
            }
        }
    } else {
        let v = (block - rope_blocks) * ROWS + lid;
        if lid < ROWS && v < kv_width {
            v_cache[cache_row * hd + v] = outputs[lid];
        }
    }
}
