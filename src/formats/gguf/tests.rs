use rand::{Rng, SeedableRng, rngs::SmallRng};

use super::model::{ARCHITECTURES, permute_rows};
use super::writer::{Tensor, encode, ternary_tensor};
use super::*;
use crate::cpu::{WeightQuantOptions, weight_quant};
use crate::model::Family;
use crate::model::{LayerWeights, ModelConfig, ModelWeights};

fn config(
    hidden: usize,
    inter: usize,
    layers: usize,
    heads: usize,
    kv: usize,
    vocab: usize,
) -> ModelConfig {
    ModelConfig {
        family: Default::default(),
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: inter,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim: hidden / heads,
        max_position_embeddings: 128,
        rms_norm_eps: 1e-5,
        rope_theta: 500000.0,
        tie_word_embeddings: true,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
    }
}

fn random_model(rng: &mut SmallRng, mut config: ModelConfig, tied: bool) -> ModelWeights {
    config.tie_word_embeddings = tied;
    let c = &config;
    let mut floats = |n: usize| {
        (0..n)
            .map(|_| rng.random_range(-1.0f32..1.0))
            .collect::<Vec<_>>()
    };
    let linear = |out: usize, inp: usize, floats: &mut dyn FnMut(usize) -> Vec<f32>| {
        weight_quant(&floats(out * inp), out, inp, WeightQuantOptions::default()).unwrap()
    };
    let (h, i, q, kv) = (
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads * c.head_dim,
        c.num_key_value_heads * c.head_dim,
    );
    let layers = (0..c.num_hidden_layers)
        .map(|_| LayerWeights {
            input_layernorm: floats(h),
            q_proj: linear(q, h, &mut floats),
            k_proj: linear(kv, h, &mut floats),
            v_proj: linear(kv, h, &mut floats),
            o_proj: linear(h, q, &mut floats),
            attn_sub_norm: floats(h),
            post_attention_layernorm: floats(h),
            gate_proj: linear(i, h, &mut floats),
            up_proj: linear(i, h, &mut floats),
            down_proj: linear(h, i, &mut floats),
            ffn_sub_norm: floats(i),
        })
        .collect();
    ModelWeights {
        embed_tokens: floats(c.vocab_size * h),
        layers,
        norm: floats(h),
        lm_head: (!tied).then(|| floats(c.vocab_size * h)),
        config,
    }
}

fn tiny(seed: u64, tied: bool) -> ModelWeights {
    let mut rng = SmallRng::seed_from_u64(seed);
    random_model(&mut rng, config(64, 128, 2, 4, 2, 50), tied)
}

/// [`tiny`] as a model of `family`: without sub-norms where the family has none.
fn tiny_of(family: Family, seed: u64, tied: bool) -> ModelWeights {
    let mut model = tiny(seed, tied);
    model.config.family = family;
    if !family.has_sub_norms() {
        for layer in &mut model.layers {
            layer.attn_sub_norm.clear();
            layer.ffn_sub_norm.clear();
        }
    }
    model
}

/// `t` as written for a vocabulary of `vocab`: its token list padded with `[PAD{id}]` tokens of
/// the unused type (5), as llama.cpp's converter pads it.
fn padded(t: &GgufTokenizer, vocab: usize) -> GgufTokenizer {
    let mut out = t.clone();
    out.tokens
        .extend((t.tokens.len()..vocab).map(|id| format!("[PAD{id}]")));
    out.token_types.resize(vocab, 5);
    out
}

fn small_tokenizer() -> GgufTokenizer {
    GgufTokenizer {
        model: "gpt2".into(),
        tokens: ["<unk>", "<s>", "</s>", "a", "b", "ab"]
            .map(String::from)
            .to_vec(),
        merges: vec!["a b".into()],
        token_types: vec![2, 3, 3, 1, 1, 1],
        bos: Some(1),
        eos: Some(2),
        pre: Some("llama-bpe".into()),
        add_bos: Some(true),
        add_eos: None,
        chat_template: Some("{% for m in messages %}{{ m.content }}{% endfor %}".into()),
    }
}

#[test]
fn bos_keys_round_trip_and_default_by_pre_tokenizer() {
    let model = tiny(3, true);
    for (pre, add_bos, adds) in [
        (Some("llama-bpe"), None, true),
        (Some("tekken"), None, true),
        (Some("gpt-2"), None, false),
        (None, None, false),
        (Some("gpt-2"), Some(true), true),
        (Some("llama-bpe"), Some(false), false),
    ] {
        let written = GgufTokenizer {
            pre: pre.map(String::from),
            add_bos,
            add_eos: add_bos.map(|b| !b),
            chat_template: None,
            ..small_tokenizer()
        };
        let file = GgufFile::from_vec(write_model(&model, Some(&written), TableType::F32).unwrap())
            .unwrap();
        assert_eq!(
            file.get_bool("tokenizer.ggml.add_bos_token").unwrap(),
            add_bos
        );
        let read = tokenizer(&file).unwrap().unwrap();
        assert_eq!(read, padded(&written, 50));
        assert_eq!(read.adds_bos(), adds, "{pre:?} {add_bos:?}");
    }
    // A key of the wrong type is named.
    let bytes = write_model(&model, Some(&small_tokenizer()), TableType::F32).unwrap();
    let bytes = rebuild(&bytes, |metadata, _| {
        for (k, v) in metadata.iter_mut() {
            if k == "tokenizer.ggml.add_bos_token" {
                *v = GgufValue::U32(1);
            }
        }
    });
    let e = tokenizer(&GgufFile::from_vec(bytes).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("add_bos_token"), "{e}");
}

/// Parses `bytes`, lets `edit` change metadata and tensors, and encodes the result again.
fn rebuild(
    bytes: &[u8],
    edit: impl FnOnce(&mut Vec<(String, GgufValue)>, &mut Vec<Tensor>),
) -> Vec<u8> {
    let file = GgufFile::parse(bytes).unwrap();
    let mut metadata = file.metadata.clone();
    let mut tensors: Vec<Tensor> = file
        .tensors
        .iter()
        .map(|t| Tensor {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ggml_type: t.ggml_type,
            data: file.tensor_bytes(t).unwrap().to_vec(),
        })
        .collect();
    edit(&mut metadata, &mut tensors);
    encode(&metadata, &tensors)
}

fn model_error(bytes: &[u8]) -> String {
    let file = GgufFile::parse(bytes).unwrap();
    to_model(&file).unwrap_err().to_string()
}

#[test]
fn round_trip_is_bit_exact() {
    for (family, seed, tied) in [
        (Family::BitNet, 1, true),
        (Family::BitNet, 2, false),
        (Family::Llama, 3, false),
        (Family::OneBitLlm, 4, true),
    ] {
        let model = tiny_of(family, seed, tied);
        let tok = small_tokenizer();
        let bytes = write_model(&model, (!tied).then_some(&tok), TableType::F32).unwrap();
        let file = GgufFile::parse(&bytes).unwrap();
        assert_eq!(file.version, 3);
        assert_eq!(
            file.get_str("general.architecture").unwrap(),
            Some(family.gguf_architecture())
        );
        assert_eq!(
            file.tensor("blk.0.attn_sub_norm.weight").is_some(),
            family.has_sub_norms()
        );
        // A llama file's q and k rows are in llama.cpp's order, which reading undoes.
        for (name, w, heads) in [
            ("blk.0.attn_q.weight", &model.layers[0].q_proj, 4),
            ("blk.1.attn_k.weight", &model.layers[1].k_proj, 2),
        ] {
            let stored = file.tensor_ternary(file.tensor(name).unwrap()).unwrap();
            let permuted = permute_rows(w, heads, true);
            assert_ne!(permuted.codes, w.codes);
            let expected = if family == Family::Llama {
                &permuted
            } else {
                w
            };
            assert_eq!(stored.codes, expected.codes, "{family:?} {name}");
        }
        assert_eq!(file.tensor("output.weight").is_none(), tied);
        assert_eq!(to_model(&file).unwrap(), model);
        assert_eq!(tokenizer(&file).unwrap(), (!tied).then(|| padded(&tok, 50)));

        // The stored scale follows bitnet.cpp (W ≈ code * s, s = mean|W| = 1 / weight_scale).
        let info = file.tensor("blk.1.attn_k.weight").unwrap();
        assert_eq!(info.dims, vec![64, 32]);
        let data = file.tensor_bytes(info).unwrap();
        let (_, stored) = crate::packing::i2s::unpack(data, 64 * 32).unwrap();
        let hf = model.layers[1].k_proj.scales[0];
        assert_eq!(1.0 / stored, hf);
        assert!((stored * hf - 1.0).abs() < 1e-6);

        let owned = GgufFile::from_vec(bytes.clone()).unwrap();
        assert_eq!(to_model(&owned).unwrap(), model);
    }
}

#[test]
fn written_architecture_is_one_the_reader_accepts() {
    for family in Family::ALL {
        assert!(ARCHITECTURES.contains(&(family.gguf_architecture(), family)));
    }
}

#[test]
fn llama_row_permutation_is_undone() {
    let mut rng = SmallRng::seed_from_u64(9);
    let w = random_model(&mut rng, config(64, 128, 1, 4, 2, 10), true).layers[0]
        .q_proj
        .clone();
    for heads in [1, 2, 4] {
        let there = permute_rows(&w, heads, true);
        assert_eq!(permute_rows(&there, heads, false), w);
    }
    // Head 0 of 4 (16 rows): file rows 0, 1, 2, 3 are rows 0, 8, 1, 9.
    let there = permute_rows(&w, 4, true);
    let row = |t: &TernaryWeights, r: usize| t.codes[r * 64..][..64].to_vec();
    for (file_row, hf_row) in [(0, 0), (1, 8), (2, 1), (3, 9), (16, 16), (17, 24)] {
        assert_eq!(row(&there, file_row), row(&w, hf_row));
    }
}

/// A little-endian byte builder for hand-written headers.
#[derive(Default)]
struct Bytes(Vec<u8>);

impl Bytes {
    fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.raw(&v.to_le_bytes())
    }
    fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64).raw(s.as_bytes())
    }
    fn pad(&mut self, align: usize) -> &mut Self {
        while !self.0.len().is_multiple_of(align) {
            self.0.push(0);
        }
        self
    }
}

#[test]
fn minimal_hand_built_file() {
    let mut b = Bytes::default();
    b.raw(b"GGUF").u32(3).u64(1).u64(1);
    b.str("general.name").u32(8).str("tiny");
    b.str("w").u32(2).u64(3).u64(2).u32(0).u64(0);
    b.pad(32);
    let values = [1.0f32, -2.0, 3.5, 0.0, 0.25, 7.0];
    for v in values {
        b.raw(&v.to_le_bytes());
    }
    let file = GgufFile::parse(&b.0).unwrap();
    assert_eq!(file.version, 3);
    assert_eq!(file.alignment, 32);
    assert_eq!(file.get_str("general.name").unwrap(), Some("tiny"));
    assert_eq!(
        file.tensors,
        vec![GgufTensorInfo {
            name: "w".into(),
            dims: vec![3, 2],
            ggml_type: GGML_TYPE_F32,
            offset: 0,
        }]
    );
    assert_eq!(file.data_offset % 32, 0);
    assert_eq!(file.tensor_f32(&file.tensors[0]).unwrap(), values);
}

#[test]
fn every_value_type_and_float_tensor_type() {
    let mut b = Bytes::default();
    b.raw(b"GGUF").u32(2).u64(3).u64(15);
    b.str("general.alignment").u32(4).u32(64);
    b.str("u8").u32(0).raw(&[200]);
    b.str("i8").u32(1).raw(&(-5i8).to_le_bytes());
    b.str("u16").u32(2).raw(&60000u16.to_le_bytes());
    b.str("i16").u32(3).raw(&(-30000i16).to_le_bytes());
    b.str("u32").u32(4).u32(4_000_000_000);
    b.str("i32").u32(5).raw(&(-7i32).to_le_bytes());
    b.str("f32").u32(6).raw(&1.5f32.to_le_bytes());
    b.str("bool").u32(7).raw(&[1]);
    b.str("str").u32(8).str("héllo");
    b.str("u64").u32(10).u64(u64::MAX);
    b.str("i64").u32(11).raw(&i64::MIN.to_le_bytes());
    b.str("f64").u32(12).raw(&0.1f64.to_le_bytes());
    b.str("ints")
        .u32(9)
        .u32(5)
        .u64(2)
        .raw(&3i32.to_le_bytes())
        .raw(&(-4i32).to_le_bytes());
    b.str("nested").u32(9).u32(9).u64(2);
    b.u32(8).u64(1).str("x");
    b.u32(6).u64(0);
    b.str("f32t").u32(1).u64(2).u32(GGML_TYPE_F32).u64(0);
    b.str("f16t").u32(1).u64(2).u32(GGML_TYPE_F16).u64(64);
    b.str("bf16t").u32(1).u64(2).u32(GGML_TYPE_BF16).u64(128);
    b.pad(64);
    b.raw(&0.5f32.to_le_bytes())
        .raw(&(-1.0f32).to_le_bytes())
        .pad(64);
    b.raw(&half::f16::from_f32(0.5).to_le_bytes())
        .raw(&half::f16::from_f32(-3.0).to_le_bytes())
        .pad(64);
    b.raw(&half::bf16::from_f32(2.0).to_le_bytes())
        .raw(&half::bf16::from_f32(-0.125).to_le_bytes());
    let file = GgufFile::parse(&b.0).unwrap();
    assert_eq!(
        (file.version, file.alignment, file.data_offset % 64),
        (2, 64, 0)
    );
    let get = |k: &str| file.get(k).unwrap().clone();
    assert_eq!(get("u8"), GgufValue::U8(200));
    assert_eq!(get("i8"), GgufValue::I8(-5));
    assert_eq!(get("u16"), GgufValue::U16(60000));
    assert_eq!(get("i16"), GgufValue::I16(-30000));
    assert_eq!(get("u32"), GgufValue::U32(4_000_000_000));
    assert_eq!(get("i32"), GgufValue::I32(-7));
    assert_eq!(get("f32"), GgufValue::F32(1.5));
    assert_eq!(get("bool"), GgufValue::Bool(true));
    assert_eq!(get("str"), GgufValue::String("héllo".into()));
    assert_eq!(get("u64"), GgufValue::U64(u64::MAX));
    assert_eq!(get("i64"), GgufValue::I64(i64::MIN));
    assert_eq!(get("f64"), GgufValue::F64(0.1));
    assert_eq!(file.get_i32_array("ints").unwrap(), Some(vec![3, -4]));
    assert_eq!(
        get("nested"),
        GgufValue::Array {
            element_type: 9,
            values: vec![
                GgufValue::Array {
                    element_type: 8,
                    values: vec![GgufValue::String("x".into())]
                },
                GgufValue::Array {
                    element_type: 6,
                    values: vec![]
                },
            ],
        }
    );
    assert_eq!(file.get_u32("u8").unwrap(), Some(200));
    assert_eq!(file.get_u32("missing").unwrap(), None);
    assert!(file.get_u32("i8").is_err());
    assert!(file.get_u32("u64").is_err());
    assert_eq!(file.get_f32("f64").unwrap(), Some(0.1));
    assert!(file.get_str("u8").is_err());
    assert!(file.get_string_array("ints").is_err());
    let floats = |name: &str| file.tensor_f32(file.tensor(name).unwrap()).unwrap();
    assert_eq!(floats("f32t"), [0.5, -1.0]);
    assert_eq!(floats("f16t"), [0.5, -3.0]);
    assert_eq!(floats("bf16t"), [2.0, -0.125]);
}

/// A file holding one I2_S tensor of `ne = [128, 2]` with the given bitnet.cpp scale.
fn i2s_file(codes: &[i8], stored_scale: f32) -> Vec<u8> {
    let data = crate::packing::i2s::pack(codes, stored_scale).unwrap();
    let tensor = Tensor {
        name: "m".into(),
        dims: vec![128, 2],
        ggml_type: GGML_TYPE_I2_S,
        data,
    };
    encode(&[], &[tensor])
}

#[test]
fn i2s_scale_is_converted_to_hugging_face_convention() {
    let mut rng = SmallRng::seed_from_u64(4);
    let codes: Vec<i8> = (0..256).map(|_| rng.random_range(-1..=1)).collect();
    let bytes = i2s_file(&codes, 0.25);
    let file = GgufFile::parse(&bytes).unwrap();
    let w = file.tensor_ternary(&file.tensors[0]).unwrap();
    assert_eq!((w.rows, w.cols, w.scales.clone()), (2, 128, vec![4.0]));
    assert_eq!(w.codes, codes);
    let (blocks, scale) = file.tensor_blocks(&file.tensors[0]).unwrap();
    assert_eq!((blocks.rows(), blocks.cols(), scale), (2, 128, 4.0));
    assert_eq!(
        blocks.bytes(),
        &file.tensor_bytes(&file.tensors[0]).unwrap()[..64]
    );

    let zeros = i2s_file(&[0; 256], 0.0);
    let file = GgufFile::parse(&zeros).unwrap();
    assert_eq!(
        file.tensor_ternary(&file.tensors[0]).unwrap().scales,
        [1.0 / 1e-5f32]
    );
    assert_eq!(
        file.tensor_blocks(&file.tensors[0]).unwrap().1,
        1.0 / 1e-5f32
    );

    for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let bytes = i2s_file(&codes, bad);
        let file = GgufFile::parse(&bytes).unwrap();
        let err = file
            .tensor_ternary(&file.tensors[0])
            .unwrap_err()
            .to_string();
        assert!(err.contains("tensor") && err.contains("m:"), "{err}");
        let blocks = file.tensor_blocks(&file.tensors[0]).unwrap_err();
        assert_eq!(blocks.to_string(), err);
    }
    assert!(file.tensor_f32(&file.tensors[0]).is_err());
}

#[test]
fn every_truncation_is_an_error() {
    let mut rng = SmallRng::seed_from_u64(5);
    let model = random_model(&mut rng, config(32, 64, 1, 2, 1, 8), false);
    let bytes = write_model(
        &model,
        Some(&GgufTokenizer {
            tokens: (0..8).map(|i| format!("t{i}")).collect(),
            token_types: vec![1; 8],
            ..small_tokenizer()
        }),
        TableType::F32,
    )
    .unwrap();
    let file = GgufFile::parse(&bytes).unwrap();
    let data_end = file
        .tensors
        .iter()
        .map(|t| file.data_offset + t.offset as usize + file.tensor_bytes(t).unwrap().len())
        .max()
        .unwrap();
    assert_eq!(
        data_end,
        bytes.len(),
        "no trailing padding, so every cut loses data"
    );
    assert_eq!(to_model(&file).unwrap(), model);
    for cut in 0..bytes.len() {
        let result = GgufFile::parse(&bytes[..cut]).and_then(|f| to_model(&f));
        assert!(result.is_err(), "cut at {cut} of {}", bytes.len());
    }
}

#[test]
fn bad_headers_are_errors() {
    let mut b = Bytes::default();
    b.raw(b"GGUX").u32(3).u64(0).u64(0);
    assert!(
        GgufFile::parse(&b.0)
            .unwrap_err()
            .to_string()
            .contains("magic")
    );
    for version in [1, 4] {
        let mut b = Bytes::default();
        b.raw(b"GGUF").u32(version).u64(0).u64(0);
        let err = GgufFile::parse(&b.0).unwrap_err().to_string();
        assert!(err.contains(&format!("version {version}")), "{err}");
    }
    let huge_counts = [(u64::MAX, 0), (0, u64::MAX), (1 << 40, 1 << 40)];
    for (tensors, kvs) in huge_counts {
        let mut b = Bytes::default();
        b.raw(b"GGUF").u32(3).u64(tensors).u64(kvs);
        assert!(GgufFile::parse(&b.0).is_err());
    }
    let mut b = Bytes::default();
    b.raw(b"GGUF")
        .u32(3)
        .u64(0)
        .u64(1)
        .str("a")
        .u32(9)
        .u32(0)
        .u64(u64::MAX);
    assert!(GgufFile::parse(&b.0).is_err());
    let mut b = Bytes::default();
    b.raw(b"GGUF").u32(3).u64(0).u64(1).str("deep").u32(9);
    for _ in 0..1000 {
        b.u32(9).u64(1);
    }
    assert!(
        GgufFile::parse(&b.0)
            .unwrap_err()
            .to_string()
            .contains("nested")
    );
    let mut b = Bytes::default();
    b.raw(b"GGUF").u32(3).u64(0).u64(1).str("k").u32(13);
    assert!(
        GgufFile::parse(&b.0)
            .unwrap_err()
            .to_string()
            .contains("unknown value type 13")
    );
    let mut b = Bytes::default();
    b.raw(b"GGUF").u32(3).u64(1).u64(0).str("t").u32(5);
    assert!(
        GgufFile::parse(&b.0)
            .unwrap_err()
            .to_string()
            .contains("5 dimensions")
    );
    let mut b = Bytes::default();
    b.raw(b"GGUF")
        .u32(3)
        .u64(1)
        .u64(0)
        .str("t")
        .u32(1)
        .u64(4)
        .u32(0)
        .u64(8);
    assert!(
        GgufFile::parse(&b.0)
            .unwrap_err()
            .to_string()
            .contains("alignment")
    );
}

#[test]
fn tensor_data_beyond_the_end_names_the_tensor() {
    let mut b = Bytes::default();
    b.raw(b"GGUF").u32(3).u64(1).u64(0);
    b.str("far").u32(1).u64(4).u32(GGML_TYPE_F32).u64(1 << 20);
    b.pad(32).raw(&[0; 16]);
    let file = GgufFile::parse(&b.0).unwrap();
    let err = file.tensor_f32(&file.tensors[0]).unwrap_err().to_string();
    assert!(err.contains("tensor far"), "{err}");
    let mut b = Bytes::default();
    b.raw(b"GGUF").u32(3).u64(1).u64(0);
    b.str("big")
        .u32(2)
        .u64(u64::MAX)
        .u64(u64::MAX)
        .u32(GGML_TYPE_F32)
        .u64(0);
    let file = GgufFile::parse(&b.0).unwrap();
    let err = file.tensor_f32(&file.tensors[0]).unwrap_err().to_string();
    assert!(err.contains("big"), "{err}");
}

#[test]
fn model_errors_name_the_problem() {
    let bytes = write_model(&tiny(6, true), None, TableType::F32).unwrap();

    let unknown_type = rebuild(&bytes, |_, t| {
        t.iter_mut()
            .find(|t| t.name == "blk.0.attn_q.weight")
            .unwrap()
            .ggml_type = 2;
    });
    let err = model_error(&unknown_type);
    assert!(
        err.contains("type 2 of tensor blk.0.attn_q.weight is not supported (supported: F32, F16, BF16, I2_S)"),
        "{err}"
    );

    let llama = rebuild(&bytes, |m, _| {
        m.iter_mut()
            .find(|(k, _)| k == "general.architecture")
            .unwrap()
            .1 = GgufValue::String("gpt2".into());
    });
    let err = model_error(&llama);
    assert!(err.contains("\"gpt2\""), "{err}");

    let wrong_shape = rebuild(&bytes, |_, t| {
        t.iter_mut()
            .find(|t| t.name == "blk.1.attn_k.weight")
            .unwrap()
            .dims = vec![64, 64];
    });
    let err = model_error(&wrong_shape);
    assert!(
        err.contains("blk.1.attn_k.weight ne = [64, 32]") && err.contains("[64, 64]"),
        "{err}"
    );

    let missing = rebuild(&bytes, |_, t| {
        t.retain(|t| t.name != "blk.1.ffn_down.weight")
    });
    let err = model_error(&missing);
    assert!(err.contains("blk.1.ffn_down.weight is missing"), "{err}");

    let no_key = rebuild(&bytes, |m, _| {
        m.retain(|(k, _)| !k.ends_with(".embedding_length"))
    });
    let err = model_error(&no_key);
    assert!(err.contains("bitnet-b1.58.embedding_length"), "{err}");

    let float_linear = rebuild(&bytes, |_, t| {
        let q = t
            .iter_mut()
            .find(|t| t.name == "blk.0.attn_v.weight")
            .unwrap();
        q.ggml_type = GGML_TYPE_F32;
        q.data = vec![0; 64 * 32 * 4];
    });
    let err = model_error(&float_linear);
    assert!(
        err.contains("blk.0.attn_v.weight is a float tensor"),
        "{err}"
    );

    for (arch, family) in ARCHITECTURES {
        let renamed = rebuild(&bytes, |m, _| {
            for (k, v) in m.iter_mut() {
                if let Some(rest) = k.strip_prefix("bitnet-b1.58.") {
                    *k = format!("{arch}.{rest}");
                }
                if k == "general.architecture" {
                    *v = GgufValue::String(arch.into());
                }
            }
        });
        let read = to_model(&GgufFile::parse(&renamed).unwrap()).unwrap();
        assert_eq!(read.config.family, family, "{arch}");
        if family == Family::BitNet {
            assert_eq!(read, tiny(6, true));
        }
    }
}

#[test]
fn writer_rejects_what_i2s_cannot_hold() {
    let odd = TernaryWeights {
        rows: 3,
        cols: 5,
        codes: vec![0; 15],
        scales: vec![1.0],
    };
    let err = ternary_tensor("x", (3, 5), &odd).unwrap_err().to_string();
    assert!(err.contains("multiple of 128"), "{err}");
    let per_channel = TernaryWeights {
        rows: 2,
        cols: 64,
        codes: vec![0; 128],
        scales: vec![1.0, 2.0],
    };
    let err = ternary_tensor("x", (2, 64), &per_channel)
        .unwrap_err()
        .to_string();
    assert!(err.contains("one scale per tensor"), "{err}");
    assert!(ternary_tensor("x", (64, 2), &per_channel).is_err());

    let mut model = tiny(7, true);
    model.norm.pop();
    assert!(
        write_model(&model, None, TableType::F32)
            .unwrap_err()
            .to_string()
            .contains("output_norm.weight")
    );
    let model = tiny(7, true);
    let tok = GgufTokenizer {
        bos: Some(9),
        ..small_tokenizer()
    };
    assert!(write_model(&model, Some(&tok), TableType::F32).is_err());
}

#[test]
fn shapes_bitnet_cpp_misreads_are_named() {
    let base = ModelConfig::bitnet_b158_2b4t();
    assert!(check_bitnet_cpp_rows(&base).is_ok());
    let ffn = ModelConfig {
        intermediate_size: 6900,
        ..base.clone()
    };
    let e = check_bitnet_cpp_rows(&ffn).unwrap_err().to_string();
    assert!(
        e.contains("blk.0.ffn_down.weight") && e.contains("6900 weights (intermediate_size)"),
        "{e}"
    );
    // 64 heads of 2 make a 128-wide attention, but one kv head gives k and v 2 rows each.
    let narrow = ModelConfig {
        hidden_size: 128,
        num_attention_heads: 64,
        num_key_value_heads: 1,
        head_dim: 2,
        ..base
    };
    let e = check_bitnet_cpp_rows(&narrow).unwrap_err().to_string();
    assert!(
        e.contains("blk.0.attn_k.weight") && e.contains("2 rows"),
        "{e}"
    );
}

/// Logits of `tokens` from a CPU engine over `source`.
fn cpu_logits(source: &dyn crate::model::WeightSource, tokens: &[u32]) -> Vec<u32> {
    let mut engine = crate::model::CpuEngine::new(source).unwrap();
    let logits = engine.forward(tokens).unwrap();
    logits.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn whole_block_rows_are_taken_as_they_lie() {
    use crate::model::{KvCache, WeightSource, forward};
    let mut rng = SmallRng::seed_from_u64(12);
    let tokens = [3, 1, 4, 1, 5, 9];
    for (tied, table) in [(true, TableType::F16), (false, TableType::F32)] {
        // Every row length a multiple of 128: hidden 128, intermediate 256.
        let model = random_model(&mut rng, config(128, 256, 2, 2, 1, 40), tied);
        let bytes = write_model(&model, None, table).unwrap();
        let file = GgufFile::parse(&bytes).unwrap();
        let gguf = GgufModel::new(file.clone()).unwrap();
        assert!(gguf.layer_blocks(1).unwrap().is_some());
        assert!(gguf.layer_blocks(2).is_err());
        // The file's model, decoded whole: the decode path and the reference.
        let decoded = to_model(&file).unwrap();
        let reference = forward(&decoded, &tokens, &mut KvCache::new(&decoded.config)).unwrap();
        let reference: Vec<u32> = reference.iter().map(|v| v.to_bits()).collect();
        assert_eq!(cpu_logits(&gguf, &tokens), cpu_logits(&decoded, &tokens));
        assert_eq!(cpu_logits(&gguf, &tokens), reference);
    }
    // Rows of 64 weights are not whole blocks: the layer is decoded.
    let bytes = write_model(&tiny(1, true), None, TableType::F32).unwrap();
    let gguf = GgufModel::new(GgufFile::parse(&bytes).unwrap()).unwrap();
    assert!(gguf.layer_blocks(0).unwrap().is_none());
}

#[test]
fn a_stored_three_in_whole_block_rows_names_the_tensor() {
    let mut rng = SmallRng::seed_from_u64(13);
    let model = random_model(&mut rng, config(128, 256, 2, 2, 1, 40), true);
    let mut bytes = write_model(&model, None, TableType::F32).unwrap();
    let file = GgufFile::parse(&bytes).unwrap();
    let info = file.tensor("blk.1.ffn_down.weight").unwrap();
    let at = file.data_offset + info.offset as usize + 40;
    bytes[at] |= 0b11; // weight 96 + 8 of block 1: index 232
    let file = GgufFile::parse(&bytes).unwrap();
    let decoded = to_model(&file).unwrap_err().to_string();
    let gguf = GgufModel::new(file).unwrap();
    let e = crate::model::CpuEngine::new(&gguf).unwrap_err().to_string();
    assert!(
        e.contains("blk.1.ffn_down.weight") && e.contains("3 at index 232"),
        "{e}"
    );
    assert_eq!(e, decoded);
}
