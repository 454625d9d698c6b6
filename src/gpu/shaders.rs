//! WGSL sources and their variants. Each kernel file is prefixed with a small preamble chosen by
//! the adapter's capabilities: the `requires` directive and a native or portable `dot4`, and
//! subgroup or workgroup-memory reductions, plus the correctly rounded division every scale uses.
//! Every variant gives the same results; naga validates them all in a unit test.

/// Which optional hardware paths a shader is compiled with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ShaderVariant {
    /// Integer reductions through subgroup operations (else through workgroup memory).
    pub subgroups: bool,
    /// `dot4I8Packed` (else four shifts, a multiply and an add per lane).
    pub dot4: bool,
}

impl ShaderVariant {
    /// Every combination, for tests.
    pub const ALL: [ShaderVariant; 4] = [
        ShaderVariant {
            subgroups: false,
            dot4: false,
        },
        ShaderVariant {
            subgroups: false,
            dot4: true,
        },
        ShaderVariant {
            subgroups: true,
            dot4: false,
        },
        ShaderVariant {
            subgroups: true,
            dot4: true,
        },
    ];
    /// The variant that needs nothing optional.
    pub const PORTABLE: ShaderVariant = ShaderVariant {
        subgroups: false,
        dot4: false,
    };
}

/// The kernel families, one WGSL file each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    ActQuant,
    Argmax,
    TernaryPack,
    TernaryMatmul,
    Rmsnorm,
    NormMatmul,
    Rope,
    Elementwise,
    Relu2Gate,
    Attention,
    Embedding,
    LmHead,
    Nll,
    TernaryMatmulBackward,
    RmsnormBackward,
    CrossEntropy,
    Optim,
    EmbeddingBackward,
    LmHeadBackward,
    Relu2GateBackward,
    RopeBackward,
    AttentionBackward,
}

impl Kernel {
    pub const ALL: [Kernel; 22] = [
        Kernel::ActQuant,
        Kernel::Argmax,
        Kernel::TernaryPack,
        Kernel::TernaryMatmul,
        Kernel::Rmsnorm,
        Kernel::NormMatmul,
        Kernel::Rope,
        Kernel::Elementwise,
        Kernel::Relu2Gate,
        Kernel::Attention,
        Kernel::Embedding,
        Kernel::LmHead,
        Kernel::Nll,
        Kernel::TernaryMatmulBackward,
        Kernel::RmsnormBackward,
        Kernel::CrossEntropy,
        Kernel::Optim,
        Kernel::EmbeddingBackward,
        Kernel::LmHeadBackward,
        Kernel::Relu2GateBackward,
        Kernel::RopeBackward,
        Kernel::AttentionBackward,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::ActQuant => "act_quant",
            Kernel::Argmax => "argmax",
            Kernel::TernaryPack => "ternary_pack",
            Kernel::TernaryMatmul => "ternary_matmul",
            Kernel::Rmsnorm => "rmsnorm",
            Kernel::NormMatmul => "norm_matmul",
            Kernel::Rope => "rope",
            Kernel::Elementwise => "elementwise",
            Kernel::Relu2Gate => "relu2_gate",
            Kernel::Attention => "attention",
            Kernel::Embedding => "embedding",
            Kernel::LmHead => "lm_head",
            Kernel::Nll => "nll",
            Kernel::TernaryMatmulBackward => "ternary_matmul_backward",
            Kernel::RmsnormBackward => "rmsnorm_backward",
            Kernel::CrossEntropy => "cross_entropy",
            Kernel::Optim => "optim",
            Kernel::EmbeddingBackward => "embedding_backward",
            Kernel::LmHeadBackward => "lm_head_backward",
            Kernel::Relu2GateBackward => "relu2_gate_backward",
            Kernel::RopeBackward => "rope_backward",
            Kernel::AttentionBackward => "attention_backward",
        }
    }

    /// The entry points of the file.
    pub fn entries(self) -> &'static [&'static str] {
        match self {
            Kernel::ActQuant => &["act_quant"],
            Kernel::Argmax => &["argmax_partial", "argmax_final"],
            Kernel::TernaryPack => &["reduce_sum", "finish_scales", "pack_words", "widen_f16"],
            Kernel::TernaryMatmul => &["gemv", "gemm"],
            Kernel::Rmsnorm => &["rmsnorm", "rmsnorm_quant"],
            Kernel::NormMatmul => &["norm_gemv", "norm_gemv_rope"],
            Kernel::Rope => &["rope", "rope_qkv"],
            Kernel::Elementwise => &["copy_rows", "add_rows", "copy_block"],
            Kernel::Relu2Gate => &["relu2_gate", "relu2_gate_quant"],
            Kernel::Attention => &["attention_split", "attention_tiles", "attention_merge"],
            Kernel::Embedding => &["embedding"],
            Kernel::LmHead => &["lm_head"],
            Kernel::Nll => &["nll"],
            Kernel::TernaryMatmulBackward => &["ternary_dx", "ternary_dw"],
            Kernel::RmsnormBackward => &["rmsnorm_dx", "rmsnorm_dweight"],
            Kernel::CrossEntropy => &["cross_entropy"],
            Kernel::Optim => &["adamw", "sgd", "grad_sum_squares", "grad_sum", "grad_clip"],
            Kernel::EmbeddingBackward => &["embedding_links", "embedding_zero", "embedding_dtable"],
            Kernel::LmHeadBackward => &["lm_head_dx", "lm_head_dtable"],
            Kernel::Relu2GateBackward => &["relu2_gate_backward"],
            Kernel::RopeBackward => &["rope_backward"],
            Kernel::AttentionBackward => &["attention_dq", "attention_dkv"],
        }
    }

    fn body(self) -> &'static str {
        match self {
            Kernel::ActQuant => concat!(
                include_str!("../../shaders/common/quantize_row.wgsl"),
                include_str!("../../shaders/act_quant.wgsl")
            ),
            Kernel::Argmax => include_str!("../../shaders/argmax.wgsl"),
            Kernel::TernaryPack => include_str!("../../shaders/ternary_pack.wgsl"),
            Kernel::TernaryMatmul => include_str!("../../shaders/ternary_matmul.wgsl"),
            Kernel::Rmsnorm => concat!(
                include_str!("../../shaders/common/rms.wgsl"),
                include_str!("../../shaders/common/quantize_row.wgsl"),
                include_str!("../../shaders/rmsnorm.wgsl")
            ),
            Kernel::NormMatmul => concat!(
                include_str!("../../shaders/common/rms.wgsl"),
                include_str!("../../shaders/norm_matmul.wgsl")
            ),
            Kernel::Rope => include_str!("../../shaders/rope.wgsl"),
            Kernel::Elementwise => include_str!("../../shaders/elementwise.wgsl"),
            Kernel::Relu2Gate => concat!(
                include_str!("../../shaders/common/quantize_row.wgsl"),
                include_str!("../../shaders/relu2_gate.wgsl")
            ),
            Kernel::Attention => include_str!("../../shaders/attention.wgsl"),
            Kernel::Embedding => concat!(
                include_str!("../../shaders/common/table.wgsl"),
                include_str!("../../shaders/embedding.wgsl")
            ),
            Kernel::LmHead => concat!(
                include_str!("../../shaders/common/table.wgsl"),
                include_str!("../../shaders/lm_head.wgsl")
            ),
            Kernel::Nll => concat!(
                include_str!("../../shaders/common/softmax.wgsl"),
                include_str!("../../shaders/nll.wgsl")
            ),
            Kernel::TernaryMatmulBackward => {
                include_str!("../../shaders/ternary_matmul_backward.wgsl")
            }
            Kernel::RmsnormBackward => concat!(
                include_str!("../../shaders/common/rms.wgsl"),
                include_str!("../../shaders/rmsnorm_backward.wgsl")
            ),
            Kernel::CrossEntropy => concat!(
                include_str!("../../shaders/common/softmax.wgsl"),
                include_str!("../../shaders/cross_entropy.wgsl")
            ),
            Kernel::Optim => include_str!("../../shaders/optim.wgsl"),
            Kernel::EmbeddingBackward => include_str!("../../shaders/embedding_backward.wgsl"),
            Kernel::LmHeadBackward => concat!(
                include_str!("../../shaders/common/table.wgsl"),
                include_str!("../../shaders/lm_head_backward.wgsl")
            ),
            Kernel::Relu2GateBackward => include_str!("../../shaders/relu2_gate_backward.wgsl"),
            Kernel::RopeBackward => include_str!("../../shaders/rope_backward.wgsl"),
            Kernel::AttentionBackward => include_str!("../../shaders/attention_backward.wgsl"),
        }
    }

    /// The full WGSL text of this kernel for `variant`.
    pub fn source(self, variant: ShaderVariant) -> String {
        let mut text = String::new();
        if variant.dot4 {
            text.push_str("requires packed_4x8_integer_dot_product;\n");
        }
        // WebGPU wants `enable subgroups;` where native wgpu (and naga) reject it; wgpu's WebGPU
        // backend does not request the feature yet, so web builds never pick this variant.
        if variant.subgroups && cfg!(target_arch = "wasm32") {
            text.push_str("enable subgroups;\n");
        }
        text.push_str(if variant.dot4 {
            include_str!("../../shaders/common/dot4_native.wgsl")
        } else {
            include_str!("../../shaders/common/dot4_portable.wgsl")
        });
        text.push_str(if variant.subgroups {
            include_str!("../../shaders/common/reduce_subgroup.wgsl")
        } else {
            include_str!("../../shaders/common/reduce_shared.wgsl")
        });
        text.push_str(include_str!("../../shaders/common/exact_div.wgsl"));
        text.push_str(include_str!("../../shaders/common/quantize.wgsl"));
        text.push_str(self.body());
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(kernel: Kernel, variant: ShaderVariant) {
        let source = kernel.source(variant);
        let module = naga::front::wgsl::parse_str(&source).unwrap_or_else(|e| {
            panic!(
                "{} {variant:?}: {}",
                kernel.name(),
                e.emit_to_string(&source)
            )
        });
        let mut validator = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        );
        validator.validate(&module).unwrap_or_else(|e| {
            panic!(
                "{} {variant:?}: {}",
                kernel.name(),
                e.emit_to_string(&source)
            )
        });
        for entry in kernel.entries() {
            assert!(
                module.entry_points.iter().any(|e| e.name == *entry),
                "{} lacks entry point {entry}",
                kernel.name()
            );
        }
        assert_eq!(module.entry_points.len(), kernel.entries().len());
    }

    #[test]
    fn every_kernel_and_variant_validates() {
        for kernel in Kernel::ALL {
            for variant in ShaderVariant::ALL {
                validate(kernel, variant);
            }
        }
    }

    #[test]
    fn portable_variant_uses_no_optional_feature() {
        for kernel in Kernel::ALL {
            let source = kernel.source(ShaderVariant::PORTABLE);
            assert!(
                !source.contains("subgroupAdd") && !source.contains("subgroupMax"),
                "{}",
                kernel.name()
            );
            assert!(!source.contains("dot4I8Packed("), "{}", kernel.name());
            let module = naga::front::wgsl::parse_str(&source).expect("parses");
            let mut validator = naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                naga::valid::Capabilities::empty(),
            );
            validator
                .validate(&module)
                .unwrap_or_else(|e| panic!("{}: {}", kernel.name(), e.emit_to_string(&source)));
        }
    }
}
