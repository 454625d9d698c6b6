// silu(g) = g / (1 + e^-g), written as cpu::silu_gate writes it, for the kernels that gate with
// it (silu_gate.wgsl, silu_gate_backward.wgsl, norm_matmul.wgsl): one function, so that the fused
// and the separate decode paths round alike. WGSL's exp and division are not correctly rounded,
// so unlike relu²'s products these values are a few ulp from the CPU's.
fn silu(g: f32) -> f32 {
    return g / (1.0 + exp(-g));
}

// sigmoid(g) = 1 / (1 + e^-g), as cpu::silu_gate_backward forms it.
fn sigmoid(g: f32) -> f32 {
    return 1.0 / (1.0 + exp(-g));
}
