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

/// Declares every kernel once, as `Variant: "name", common [..], entries [..];`: its file
/// `shaders/NAME.wgsl`, the files of `shaders/common/` it includes before its own (after the
/// preamble every kernel gets) and its entry points.
macro_rules! kernels {
    ($(
        $kernel:ident: $name:literal,
        common [$($common:literal),*],
        entries [$($entry:literal),+];
    )+) => {
        /// The kernel families, one WGSL file each.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Kernel {
            $($kernel,)+
        }

        impl Kernel {
            pub const ALL: [Kernel; [$(stringify!($kernel)),+].len()] = [$(Kernel::$kernel),+];

            pub fn name(self) -> &'static str {
                match self {
                    $(Kernel::$kernel => $name,)+
                }
            }

            /// The entry points of the file.
            pub fn entries(self) -> &'static [&'static str] {
                match self {
                    $(Kernel::$kernel => &[$($entry),+],)+
                }
            }

            fn body(self) -> &'static str {
                match self {
                    $(Kernel::$kernel => concat!(
                        $(include_str!(concat!("../../shaders/common/", $common, ".wgsl")),)*
                        include_str!(concat!("../../shaders/", $name, ".wgsl"))
                    ),)+
                }
            }
        }
    };
}

kernels! {
    ActQuant: "act_quant", common ["quantize_row"], entries ["act_quant"];
    Argmax: "argmax", common [], entries ["argmax_partial", "argmax_final"];
    Sampling: "sampling", common [], entries ["sample"];
    TernaryPack: "ternary_pack", common [],
        entries ["reduce_sum", "finish_scales", "pack_words"];
    TernaryMatmul: "ternary_matmul", common [], entries ["gemv", "gemm"];
    Rmsnorm: "rmsnorm", common ["rms", "quantize_row"], entries ["rmsnorm", "rmsnorm_quant"];
    NormMatmul: "norm_matmul", common ["rms", "silu"], entries ["norm_gemv", "norm_gemv_rope"];
    Rope: "rope", common [], entries ["rope", "rope_qkv"];
    Elementwise: "elementwise", common [], entries ["copy_rows", "add_rows", "copy_block"];
    Relu2Gate: "relu2_gate", common ["quantize_row"], entries ["relu2_gate", "relu2_gate_quant"];
    SiluGate: "silu_gate", common ["silu", "quantize_row"], entries ["silu_gate", "silu_gate_quant"];
    Attention: "attention", common [],
        entries ["attention_split", "attention_tiles", "attention_merge"];
    Embedding: "embedding", common ["table"], entries ["embedding"];
    LmHead: "lm_head", common ["table"], entries ["lm_head"];
    Nll: "nll", common ["softmax"], entries ["nll"];
    TernaryMatmulBackward: "ternary_matmul_backward", common [],
        entries ["ternary_dx", "ternary_dw"];
    RmsnormBackward: "rmsnorm_backward", common ["rms"], entries ["rmsnorm_dx", "rmsnorm_dweight"];
    CrossEntropy: "cross_entropy", common ["softmax"], entries ["cross_entropy"];
    Optim: "optim", common [],
        entries ["adamw", "sgd", "grad_sum_squares", "grad_sum", "grad_clip"];
    EmbeddingBackward: "embedding_backward", common [],
        entries ["embedding_links", "embedding_zero", "embedding_dtable"];
    LmHeadBackward: "lm_head_backward", common ["table"], entries ["lm_head_dx", "lm_head_dtable"];
    Relu2GateBackward: "relu2_gate_backward", common [], entries ["relu2_gate_backward"];
    SiluGateBackward: "silu_gate_backward", common ["silu"], entries ["silu_gate_backward"];
    RopeBackward: "rope_backward", common [], entries ["rope_backward"];
    AttentionBackward: "attention_backward", common [], entries ["attention_dq", "attention_dkv"];
}

impl Kernel {
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

/// Declares, in a host module, the `var<uniform>` each of its uniform structs fills, one line
/// each: `Kernel.global = Struct { every field };`. The WGSL and Rust structs are written
/// separately; a test compares these declarations with the layout naga gives the WGSL. Naming a
/// field twice or leaving one out does not compile (the pattern below is exhaustive).
macro_rules! uniforms {
    ($($kernel:ident . $global:ident = $ty:ident { $($field:ident),+ $(,)? };)+) => {
        #[cfg(test)]
        pub(crate) const UNIFORMS: &[$crate::gpu::shaders::UniformLayout] = &[$({
            const _: fn($ty) = |s| {
                let $ty { $($field: _),+ } = s;
            };
            $crate::gpu::shaders::UniformLayout {
                kernel: $crate::gpu::Kernel::$kernel,
                global: stringify!($global),
                size: ::std::mem::size_of::<$ty>(),
                fields: &[$($crate::gpu::shaders::UniformField::of(
                    stringify!($field),
                    ::std::mem::offset_of!($ty, $field),
                    |s: &$ty| &s.$field,
                )),+],
            }
        }),+];
    };
}
pub(crate) use uniforms;

/// The 4-byte scalars uniform members hold.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Scalar {
    U32,
    F32,
}

/// A Rust type a uniform field may have: a 4-byte scalar, or an array of them that stands for as
/// many WGSL members.
#[cfg(test)]
pub(crate) trait UniformMember {
    const SCALAR: Scalar;
}

#[cfg(test)]
impl UniformMember for u32 {
    const SCALAR: Scalar = Scalar::U32;
}

#[cfg(test)]
impl UniformMember for f32 {
    const SCALAR: Scalar = Scalar::F32;
}

#[cfg(test)]
impl<T: UniformMember, const N: usize> UniformMember for [T; N] {
    const SCALAR: Scalar = T::SCALAR;
}

/// One field of a host uniform struct.
#[cfg(test)]
pub(crate) struct UniformField {
    name: &'static str,
    offset: usize,
    size: usize,
    scalar: Scalar,
}

#[cfg(test)]
impl UniformField {
    /// The field `name` at `offset`; `field`, which selects it, gives its type.
    pub(crate) const fn of<S, T: UniformMember>(
        name: &'static str,
        offset: usize,
        _field: fn(&S) -> &T,
    ) -> Self {
        UniformField {
            name,
            offset,
            size: size_of::<T>(),
            scalar: T::SCALAR,
        }
    }
}

/// A host struct written into the uniform `global` of `kernel`.
#[cfg(test)]
pub(crate) struct UniformLayout {
    pub(crate) kernel: Kernel,
    pub(crate) global: &'static str,
    pub(crate) size: usize,
    pub(crate) fields: &'static [UniformField],
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{
        act_quant, argmax, attention, elementwise, embedding, gate, lm_head, nll, norm_matmul,
        optim, rmsnorm, rope, sampling, ternary_matmul, ternary_pack,
    };

    /// Every host module's uniform declarations.
    const HOST_UNIFORMS: &[&[UniformLayout]] = &[
        act_quant::UNIFORMS,
        argmax::UNIFORMS,
        attention::UNIFORMS,
        elementwise::UNIFORMS,
        embedding::UNIFORMS,
        gate::UNIFORMS,
        lm_head::UNIFORMS,
        nll::UNIFORMS,
        norm_matmul::UNIFORMS,
        optim::UNIFORMS,
        rmsnorm::UNIFORMS,
        rope::UNIFORMS,
        sampling::UNIFORMS,
        ternary_matmul::UNIFORMS,
        ternary_pack::UNIFORMS,
    ];

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

    /// One 4-byte word of a uniform struct: its byte offset, the member or field holding it, and
    /// its scalar.
    struct Word<'a> {
        offset: usize,
        name: &'a str,
        scalar: Scalar,
    }

    /// The words of the WGSL struct `ty` and its size, as naga lays them out.
    fn wgsl_words(module: &naga::Module, ty: naga::Handle<naga::Type>) -> (usize, Vec<Word<'_>>) {
        let naga::TypeInner::Struct { members, span } = &module.types[ty].inner else {
            panic!("a uniform that is not a struct");
        };
        let words = members
            .iter()
            .map(|m| {
                let name = m.name.as_deref().unwrap_or_default();
                let scalar = match module.types[m.ty].inner {
                    naga::TypeInner::Scalar(naga::Scalar::U32) => Scalar::U32,
                    naga::TypeInner::Scalar(naga::Scalar::F32) => Scalar::F32,
                    ref other => panic!("member `{name}` is a {other:?}: extend this test"),
                };
                Word {
                    offset: m.offset as usize,
                    name,
                    scalar,
                }
            })
            .collect();
        (*span as usize, words)
    }

    /// Checks that `host` has the size of the WGSL struct and a field of the same scalar at each
    /// of its words; named as the WGSL member, except that an array field stands for several
    /// members, and the host may fill a word the shader leaves as padding, never the reverse.
    fn compare(host: &UniformLayout, module: &naga::Module, ty: naga::Handle<naga::Type>) {
        let what = format!("{} `{}`", host.kernel.name(), host.global);
        let (size, wgsl) = wgsl_words(module, ty);
        assert_eq!(host.size, size, "{what}: size");
        let mut fields: Vec<&UniformField> = host.fields.iter().collect();
        fields.sort_by_key(|f| f.offset);
        let rust: Vec<(Word<'_>, bool)> = fields
            .iter()
            .flat_map(|f| {
                (0..f.size / 4).map(move |i| {
                    let word = Word {
                        offset: f.offset + 4 * i,
                        name: f.name,
                        scalar: f.scalar,
                    };
                    (word, f.size > 4)
                })
            })
            .collect();
        assert_eq!(
            rust.iter().map(|(w, _)| w.offset).collect::<Vec<_>>(),
            wgsl.iter().map(|w| w.offset).collect::<Vec<_>>(),
            "{what}: word offsets of the host fields and the WGSL members"
        );
        for ((r, array), w) in rust.iter().zip(&wgsl) {
            let at = format!(
                "{what} at byte {}: host `{}` {:?}, WGSL `{}` {:?}",
                r.offset, r.name, r.scalar, w.name, w.scalar
            );
            assert_eq!(r.scalar, w.scalar, "{at}");
            let host_pad = r.name.starts_with("pad");
            let wgsl_pad = w.name.starts_with("_pad");
            if host_pad {
                assert!(
                    wgsl_pad,
                    "{at}: the shader reads a word the host leaves as padding"
                );
            } else if !array && !wgsl_pad {
                assert_eq!(r.name, w.name, "{at}");
            }
        }
    }

    #[test]
    fn host_uniforms_match_the_wgsl_structs() {
        let host: Vec<&UniformLayout> = HOST_UNIFORMS.iter().flat_map(|m| m.iter()).collect();
        let mut found = Vec::new();
        for kernel in Kernel::ALL {
            let source = kernel.source(ShaderVariant::PORTABLE);
            let module = naga::front::wgsl::parse_str(&source).expect("parses");
            for (_, global) in module.global_variables.iter() {
                if global.space != naga::AddressSpace::Uniform {
                    continue;
                }
                let name = global.name.as_deref().unwrap_or_default();
                let decls: Vec<&&UniformLayout> = host
                    .iter()
                    .filter(|u| u.kernel == kernel && u.global == name)
                    .collect();
                assert_eq!(
                    decls.len(),
                    1,
                    "{} `{name}`: host declarations (the `uniforms!` of its module)",
                    kernel.name()
                );
                compare(decls[0], &module, global.ty);
                found.push((kernel, name.to_string()));
            }
        }
        for u in &host {
            assert!(
                found.iter().any(|(k, g)| *k == u.kernel && g == u.global),
                "{} has no uniform `{}`",
                u.kernel.name(),
                u.global
            );
        }
    }
}
