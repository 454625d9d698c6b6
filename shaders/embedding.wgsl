// Embedding lookup (cpu::embedding) from one chunk of a GpuTable: out[r] = table[tokens[r]] for
// the rows whose token falls in this chunk; one invocation per output value. The other chunks'
// dispatches write the other rows. Values travel as bits, so f32 rows are copied exactly.

const WG: u32 = 256u;

struct Params {
    rows: u32,
    cols: u32,
    // The chunk's first table row and its row count.
    first: u32,
    count: u32,
    row_words: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> table: array<u32>;
@group(0) @binding(2) var<storage, read> tokens: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<u32>;

@compute @workgroup_size(WG)
fn embedding(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) num: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let i = (wid.x + wid.y * num.x) * WG + lid;
    if i >= params.rows * params.cols {
        return;
    }
    let r = i / params.cols;
    let c = i % params.cols;
    let token = tokens[r];
    // Also keeps a token past the table's end from reading out of bounds.
    if token < params.first || token - params.first >= params.count {
        return;
    }
    let base = (token - params.first) * params.row_words;
    if HALF == 0u {
        out[i] = table[base + c];
    } else {
        let word = table[base + c / 2u];
        out[i] = bitcast<u32>(half_to_f32((word >> (16u * (c & 1u))) & 0xffffu));
    }
}
