use std::path::{Path, PathBuf};

use half::bf16;
use rand::{Rng, SeedableRng, rngs::SmallRng};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::{Value, json};

use super::*;
use crate::Error;
use crate::cpu::{TernaryWeights, WeightQuantOptions, weight_quant};
use crate::formats::scale::multiplier_of;
use crate::model::{Family, LayerWeights, ModelConfig, ModelWeights};

/// Awkward sizes: head_dim 20, one KV head for two query heads, out % 4 == 0 throughout.
fn tiny_config(tied: bool) -> ModelConfig {
    ModelConfig {
        family: Default::default(),
        vocab_size: 37,
        hidden_size: 40,
        intermediate_size: 56,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: 20,
        max_position_embeddings: 64,
        rms_norm_eps: 1e-6,
        rope_theta: 10000.0,
        tie_word_embeddings: tied,
        bos_token_id: Some(1),
        eos_token_id: None,
    }
}

fn random(rng: &mut SmallRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn random_linear(rng: &mut SmallRng, rows: usize, cols: usize) -> TernaryWeights {
    let w = random(rng, rows * cols);
    weight_quant(&w, rows, cols, WeightQuantOptions::default()).unwrap()
}

fn random_weights(seed: u64, tied: bool) -> ModelWeights {
    let mut rng = SmallRng::seed_from_u64(seed);
    let rng = &mut rng;
    let (h, i, q, kv) = (40, 56, 40, 20);
    let mut layers: Vec<LayerWeights> = (0..2)
        .map(|_| LayerWeights {
            input_layernorm: random(rng, h),
            q_proj: random_linear(rng, q, h),
            k_proj: random_linear(rng, kv, h),
            v_proj: random_linear(rng, kv, h),
            o_proj: random_linear(rng, h, q),
            attn_sub_norm: random(rng, h),
            post_attention_layernorm: random(rng, h),
            gate_proj: random_linear(rng, i, h),
            up_proj: random_linear(rng, i, h),
            down_proj: random_linear(rng, h, i),
            ffn_sub_norm: random(rng, i),
        })
        .collect();
    // One scale whose multiplier (4) bf16 holds exactly, to exercise the BF16 weight_scale path.
    layers[1].k_proj.scales = vec![0.25];
    ModelWeights {
        config: tiny_config(tied),
        embed_tokens: random(rng, 37 * h),
        layers,
        norm: random(rng, h),
        lm_head: (!tied).then(|| random(rng, 37 * h)),
    }
}

/// Equality of every float by bits, and of everything else.
fn assert_bit_exact(a: &ModelWeights, b: &ModelWeights) {
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(a.config, b.config);
    assert_eq!(bits(&a.embed_tokens), bits(&b.embed_tokens));
    assert_eq!(bits(&a.norm), bits(&b.norm));
    assert_eq!(
        a.lm_head.as_deref().map(bits),
        b.lm_head.as_deref().map(bits)
    );
    for (la, lb) in a.layers.iter().zip(&b.layers) {
        for (x, y) in [
            (&la.q_proj, &lb.q_proj),
            (&la.k_proj, &lb.k_proj),
            (&la.v_proj, &lb.v_proj),
            (&la.o_proj, &lb.o_proj),
            (&la.gate_proj, &lb.gate_proj),
            (&la.up_proj, &lb.up_proj),
            (&la.down_proj, &lb.down_proj),
        ] {
            assert_eq!(bits(&x.scales), bits(&y.scales));
        }
        assert_eq!(bits(&la.ffn_sub_norm), bits(&lb.ffn_sub_norm));
    }
    assert_eq!(a, b);
}

/// A folder under the system's temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "bitnet-hf-{tag}-{}-{n}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A tensor as owned parts, easy to edit before serializing.
#[derive(Clone)]
struct Raw {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn raw_tensors(file: &[u8]) -> Vec<Raw> {
    let mut all: Vec<Raw> = SafeTensors::deserialize(file)
        .unwrap()
        .tensors()
        .into_iter()
        .map(|(name, v)| Raw {
            name,
            dtype: v.dtype(),
            shape: v.shape().to_vec(),
            bytes: v.data().to_vec(),
        })
        .collect();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    all
}

fn serialize(tensors: &[Raw]) -> Vec<u8> {
    let views = tensors.iter().map(|t| {
        (
            t.name.as_str(),
            TensorView::new(t.dtype, t.shape.clone(), &t.bytes).unwrap(),
        )
    });
    safetensors::serialize(views, None).unwrap()
}

fn bf16_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
        .collect()
}

/// The packed checkpoint of `random_weights` as (config.json, tensors).
fn packed_checkpoint(tied: bool) -> (ModelWeights, String, Vec<Raw>) {
    let w = random_weights(7, tied);
    let bytes = to_safetensors_bytes(&w, &[]).unwrap();
    (
        w.clone(),
        config_json(&w.config).unwrap(),
        raw_tensors(&bytes),
    )
}

fn load_error(config: &str, tensors: &[Raw]) -> String {
    match load_from_bytes(config, &[&serialize(tensors)]) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("expected an error"),
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).unwrap();
}

#[test]
fn save_dir_then_load_dir_is_bit_exact() {
    for tied in [true, false] {
        let w = random_weights(1 + tied as u64, tied);
        let dir = TempDir::new("roundtrip");
        let target = dir.0.join("model");
        let meta = [("bitnet.note".to_string(), "test".to_string())];
        save_dir(&w, &target, &meta).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&target)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, [CONFIG_FILE, WEIGHTS_FILE]);
        assert_bit_exact(&w, &load_dir(&target).unwrap());

        let bytes = std::fs::read(target.join(WEIGHTS_FILE)).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(file.names().contains(&"lm_head.weight"), !tied);
        let q = file
            .tensor("model.layers.0.self_attn.q_proj.weight")
            .unwrap();
        assert_eq!((q.dtype(), q.shape()), (Dtype::U8, &[10, 40][..]));
        let s = file
            .tensor("model.layers.1.self_attn.k_proj.weight_scale")
            .unwrap();
        assert_eq!((s.dtype(), s.shape()), (Dtype::BF16, &[1][..]));
        let s = file
            .tensor("model.layers.0.self_attn.k_proj.weight_scale")
            .unwrap();
        assert_eq!((s.dtype(), s.shape()), (Dtype::F32, &[1][..]));
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let m = header.metadata().as_ref().unwrap();
        assert_eq!(
            (m["format"].as_str(), m["bitnet.note"].as_str()),
            ("pt", "test")
        );

        // Never overwrites.
        let e = save_dir(&w, &target, &[]).unwrap_err();
        assert!(
            matches!(&e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::AlreadyExists),
            "{e}"
        );
        assert_bit_exact(&w, &load_dir(&target).unwrap());
    }
}

/// A Llama-family model is written in Falcon3's layout: no sub-norms, `weight_scale` the
/// divisor transformers' `BitLinear` divides by, and reads back bit for bit.
#[test]
fn llama_family_round_trips_in_its_own_layout() {
    let mut w = random_weights(5, false);
    w.config.family = Family::Llama;
    for layer in &mut w.layers {
        layer.attn_sub_norm.clear();
        layer.ffn_sub_norm.clear();
    }
    let dir = TempDir::new("llama");
    let target = dir.0.join("model");
    save_dir(&w, &target, &[]).unwrap();
    assert_bit_exact(&w, &load_dir(&target).unwrap());
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(target.join(CONFIG_FILE)).unwrap()).unwrap();
    assert_eq!(config["architectures"], json!(["LlamaForCausalLM"]));
    assert_eq!(config["hidden_act"], "silu");
    assert_eq!(
        config["quantization_config"],
        json!({"quant_method": "bitnet", "modules_to_not_convert": ["lm_head"]})
    );
    let bytes = std::fs::read(target.join(WEIGHTS_FILE)).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    assert!(!file.names().iter().any(|n| n.contains("sub_norm")));
    let s = file
        .tensor("model.layers.1.self_attn.k_proj.weight_scale")
        .unwrap();
    assert_eq!(s.data(), bf16::from_f32(0.25).to_le_bytes());

    // Sub-norm tensors in a Llama checkpoint are tensors nobody asked for.
    let mut extra = raw_tensors(&bytes);
    extra.push(Raw {
        name: "model.layers.0.self_attn.attn_sub_norm.weight".into(),
        dtype: Dtype::F32,
        shape: vec![40],
        bytes: vec![0; 160],
    });
    let e = load_error(&config_json(&w.config).unwrap(), &extra);
    assert!(e.contains("attn_sub_norm"), "{e}");
}

#[test]
fn written_config_is_what_transformers_expects() {
    let json: Value = serde_json::from_str(&config_json(&tiny_config(true)).unwrap()).unwrap();
    assert_eq!(json["model_type"], "bitnet");
    assert_eq!(json["architectures"], json!(["BitNetForCausalLM"]));
    assert_eq!(json["hidden_act"], "relu2");
    assert_eq!(json["torch_dtype"], "bfloat16");
    assert_eq!(json["rms_norm_eps"], json!(1e-6));
    assert_eq!(
        json["quantization_config"],
        json!({"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"})
    );
    assert!(json.get("head_dim").is_none());
    for tied in [true, false] {
        let c = tiny_config(tied);
        let back = parse_checkpoint_config(&config_json(&c).unwrap()).unwrap();
        assert_eq!(back.model, c);
        assert_eq!(
            back.weight_format,
            WeightFormat::OfflinePacked(LinearClass::AutoBitLinear)
        );
    }
}

#[test]
fn parses_the_released_2b4t_config() {
    let text = r#"{
        "architectures": ["BitNetForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
        "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "relu2",
        "hidden_size": 2560, "initializer_range": 0.02, "intermediate_size": 6912,
        "max_position_embeddings": 4096, "model_type": "bitnet", "num_attention_heads": 20,
        "num_hidden_layers": 30, "num_key_value_heads": 5, "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
        "use_cache": true, "vocab_size": 128256,
        "quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                "quantization_mode": "offline"}
    }"#;
    let c = parse_checkpoint_config(text).unwrap();
    assert_eq!(
        c.weight_format,
        WeightFormat::OfflinePacked(LinearClass::AutoBitLinear)
    );
    // The older layout, and transformers' defaults (class "bitlinear", mode "offline").
    for q in [
        r#"{"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline"}"#,
        r#"{"quant_method": "bitnet"}"#,
    ] {
        let older = text.replace(
            r#"{"quant_method": "bitnet", "linear_class": "autobitlinear",
                                "quantization_mode": "offline"}"#,
            q,
        );
        assert_eq!(
            parse_checkpoint_config(&older).unwrap().weight_format,
            WeightFormat::OfflinePacked(LinearClass::BitLinear),
            "{q}"
        );
    }
    assert_eq!(
        c.model,
        ModelConfig {
            family: Default::default(),
            vocab_size: 128256,
            hidden_size: 2560,
            intermediate_size: 6912,
            num_hidden_layers: 30,
            num_attention_heads: 20,
            num_key_value_heads: 5,
            head_dim: 128,
            max_position_embeddings: 4096,
            rms_norm_eps: 1e-5,
            rope_theta: 500000.0,
            tie_word_embeddings: true,
            bos_token_id: Some(128000),
            eos_token_id: Some(128001),
        }
    );
    // transformers' BitNetConfig defaults fill the gaps; 2048 positions and untied there.
    let d = parse_checkpoint_config(r#"{"model_type": "bitnet"}"#).unwrap();
    assert_eq!(d.weight_format, WeightFormat::FullPrecision);
    assert_eq!(
        d.model,
        ModelConfig {
            max_position_embeddings: 2048,
            tie_word_embeddings: false,
            ..c.model.clone()
        }
    );
    // Newer transformers nest rope_theta; eos lists keep the first; null ids are none.
    let n = parse_config(
        r#"{"model_type": "bitnet", "rope_parameters": {"rope_type": "default", "rope_theta": 1000.0},
            "eos_token_id": [7, 8], "bos_token_id": null}"#,
    )
    .unwrap();
    assert_eq!(
        (n.rope_theta, n.eos_token_id, n.bos_token_id),
        (1000.0, Some(7), None)
    );
    // LLaMA-style configs take LlamaConfig's defaults but must ask for relu2.
    let l = parse_config(
        r#"{"model_type": "llama", "hidden_act": "relu2", "hidden_size": 64,
            "num_attention_heads": 4, "quantization_config": {"quant_method": "bitnet",
            "linear_class": "autobitlinear", "quantization_mode": "online"}}"#,
    )
    .unwrap();
    assert_eq!(
        (
            l.num_key_value_heads,
            l.head_dim,
            l.rope_theta,
            l.rms_norm_eps
        ),
        (4, 16, 10000.0, 1e-6)
    );
    assert_eq!(l.family, Family::BitNet);
}

/// Falcon3-1B-Instruct-1.58bit's config.json as published (the numbers), and 1bitLLM's
/// bitnet_b1_58-large.
#[test]
fn llama_family_configs_load() {
    let falcon = parse_checkpoint_config(
        r#"{"architectures": ["LlamaForCausalLM"], "attention_bias": false,
            "attention_dropout": 0.0, "eos_token_id": 11, "head_dim": 256, "hidden_act": "silu",
            "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
            "is_bitnet_config": true, "max_position_embeddings": 8192, "mlp_bias": false,
            "model_type": "llama", "num_attention_heads": 8, "num_hidden_layers": 18,
            "num_key_value_heads": 4, "pretraining_tp": 1, "quantization_config":
            {"modules_to_not_convert": ["lm_head"], "quant_method": "bitnet"},
            "rms_norm_eps": 1e-06, "rope_scaling": null, "rope_theta": 1000042,
            "tie_word_embeddings": false, "torch_dtype": "bfloat16",
            "transformers_version": "4.48.0.dev0", "use_cache": true, "vocab_size": 131072}"#,
    )
    .unwrap();
    let c = &falcon.model;
    assert_eq!(c.family, Family::Llama);
    assert_eq!(
        falcon.weight_format,
        WeightFormat::OfflinePacked(LinearClass::BitLinear)
    );
    assert_eq!(
        (
            c.head_dim,
            c.rope_theta,
            c.rms_norm_eps,
            c.bos_token_id,
            c.eos_token_id
        ),
        (256, 1000042.0, 1e-6, Some(1), Some(11))
    );
    assert!(!c.tie_word_embeddings);
    // No sub-norms: a layer holds two norms, and the written config reads back the same.
    assert_eq!(present_norms(c).count(), 2);
    assert_eq!(parse_config(&config_json(c).unwrap()).unwrap(), *c);

    let onebit = parse_config(
        r#"{"architectures": ["BitnetForCausalLM"], "hidden_act": "silu", "hidden_size": 1536,
            "input_bits": 8, "intermediate_size": 4096, "max_position_embeddings": 2048,
            "model_type": "llama", "num_attention_heads": 16, "num_hidden_layers": 24,
            "num_key_value_heads": 16, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
            "tie_word_embeddings": true, "vocab_size": 32002}"#,
    )
    .unwrap();
    assert_eq!(onebit.family, Family::OneBitLlm);
    assert_eq!(
        present_norms(&onebit)
            .map(|(name, _)| name)
            .collect::<Vec<_>>(),
        [
            "input_layernorm",
            "self_attn.inner_attn_ln",
            "post_attention_layernorm",
            "mlp.ffn_layernorm"
        ]
    );
    assert!(config_json(&onebit).is_err());
}

#[test]
fn bad_configs_are_named() {
    let cases = [
        (
            r#"{"model_type": "bitnet", "hidden_size": 40, "num_attention_heads": 3, "num_key_value_heads": 1}"#,
            "num_attention_heads 3",
        ),
        (
            r#"{"model_type": "bitnet", "num_attention_heads": 20, "num_key_value_heads": 3}"#,
            "num_key_value_heads 3",
        ),
        (
            r#"{"model_type": "bitnet", "hidden_size": 40, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16}"#,
            "head_dim 16",
        ),
        (
            r#"{"model_type": "bitnet", "num_hidden_layers": 0}"#,
            "num_hidden_layers",
        ),
        (
            r#"{"model_type": "bitnet", "hidden_size": 2560.5}"#,
            "hidden_size",
        ),
        (r#"{"model_type": "gpt2"}"#, "model_type"),
        (r#"{"hidden_size": 8}"#, "model_type"),
        (r#"{"model_type": "llama"}"#, "full-precision Llama"),
        (
            r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "relu2"}"#,
            "hidden_act \"relu2\" is not supported for LlamaForCausalLM",
        ),
        (
            r#"{"architectures": ["MistralForCausalLM"], "model_type": "llama"}"#,
            "MistralForCausalLM",
        ),
        (
            r#"{"model_type": "bitnet", "attention_bias": true}"#,
            "attention_bias",
        ),
        (
            r#"{"model_type": "bitnet", "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}"#,
            "rope_type",
        ),
        (
            r#"{"model_type": "bitnet", "quantization_config": {"quant_method": "gptq"}}"#,
            "quant_method",
        ),
        (
            r#"{"model_type": "bitnet", "quantization_config": {"quant_method": "bitnet", "linear_class": "ternarylinear"}}"#,
            "ternarylinear",
        ),
        (
            r#"{"model_type": "bitnet", "quantization_config": {"quant_method": "bitnet", "quantization_mode": "hybrid"}}"#,
            "hybrid",
        ),
        (
            r#"{"model_type": "bitnet", "quantization_config": {"quant_method": "bitnet", "use_rms_norm": true}}"#,
            "use_rms_norm",
        ),
        ("[1, 2]", "config.json"),
    ];
    for (text, needle) in cases {
        let e = parse_config(text).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Invalid {
                    what: "config.json",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains(needle), "{text}: {e}");
    }
}

/// A full-precision checkpoint of `family` (1bitLLM's as its repositories hold it: sub-norms
/// `inner_attn_ln` and `ffn_layernorm`, no `quantization_config`) loads quantized per tensor; a
/// Llama one only under an online `quantization_config` (without one it is a plain Llama).
fn full_precision_checkpoint_of(family: Family) {
    let c = ModelConfig {
        family,
        ..tiny_config(false)
    };
    let mut rng = SmallRng::seed_from_u64(9);
    let mut tensors = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, rng: &mut SmallRng| {
        let values = random(rng, shape.iter().product());
        tensors.push(Raw {
            name,
            dtype: Dtype::BF16,
            shape,
            bytes: bf16_bytes(&values),
        });
    };
    add("model.embed_tokens.weight".into(), vec![37, 40], &mut rng);
    add("lm_head.weight".into(), vec![37, 40], &mut rng);
    add("model.norm.weight".into(), vec![40], &mut rng);
    for l in 0..2 {
        for (name, out, inp) in layer_linears(&c) {
            add(
                format!("model.layers.{l}.{name}.weight"),
                vec![out, inp],
                &mut rng,
            );
        }
        for (name, len) in present_norms(&c) {
            add(
                format!("model.layers.{l}.{name}.weight"),
                vec![len],
                &mut rng,
            );
        }
    }
    let file = serialize(&tensors);
    let widened = |name: &str| -> Vec<f32> {
        let t = tensors.iter().find(|t| t.name == name).unwrap();
        t.bytes
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect()
    };

    let mut plain: Value =
        serde_json::from_str(&config_json(&tiny_config(false)).unwrap()).unwrap();
    let object = plain.as_object_mut().unwrap();
    object.remove("quantization_config");
    object.insert("architectures".into(), json!([family.hf_architecture()]));
    object.insert("hidden_act".into(), json!(family.activation().name()));
    if family != Family::BitNet {
        object.insert("model_type".into(), json!("llama"));
    }
    let mut online = plain.clone();
    online["quantization_config"] = json!({"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"});
    let mut configs = vec![online];
    if family == Family::Llama {
        let e = load_error(&plain.to_string(), &tensors);
        assert!(e.contains("full-precision Llama"), "{e}");
    } else {
        configs.push(plain);
    }
    for config in configs {
        let w = load_from_bytes(&config.to_string(), &[&file]).unwrap();
        assert_eq!(w.config, c);
        assert_eq!(w.embed_tokens, widened("model.embed_tokens.weight"));
        assert_eq!(w.lm_head.as_deref(), Some(&widened("lm_head.weight")[..]));
        let l1 = &w.layers[1];
        let [.., (ffn_sub_norm, _)] = c.layer_norms().map(|n| (n.hf, n.len));
        let expected_norm = match family.has_sub_norms() {
            true => widened(&format!("model.layers.1.{ffn_sub_norm}.weight")),
            false => Vec::new(),
        };
        assert_eq!(l1.ffn_sub_norm, expected_norm);
        for (got, name, out, inp) in [
            (&l1.k_proj, "self_attn.k_proj", 20, 40),
            (&l1.down_proj, "mlp.down_proj", 40, 56),
        ] {
            let values = widened(&format!("model.layers.1.{name}.weight"));
            let expected: TernaryWeights =
                weight_quant(&values, out, inp, WeightQuantOptions::default()).unwrap();
            assert_eq!(got, &expected);
        }
    }
}

#[test]
fn full_precision_checkpoints_are_quantized_at_load() {
    for family in Family::ALL {
        full_precision_checkpoint_of(family);
    }
    let c = tiny_config(false);
    // Packed weights under a config without quantization_config are refused.
    let (_, _, packed) = packed_checkpoint(false);
    let mut plain: Value = serde_json::from_str(&config_json(&c).unwrap()).unwrap();
    plain.as_object_mut().unwrap().remove("quantization_config");
    let e = load_error(&plain.to_string(), &packed);
    assert!(
        e.contains("model.layers.0.self_attn.q_proj.weight") && e.contains("U8"),
        "{e}"
    );
}

#[test]
fn released_checkpoint_dtypes_load() {
    // bf16 norms and embeddings, bf16 weight_scale of shape [1] (or [] / f16), as 2B4T ships them.
    let (w, config, mut tensors) = packed_checkpoint(true);
    for t in &mut tensors {
        if t.dtype == Dtype::F32 || t.dtype == Dtype::BF16 {
            let values: Vec<f32> = if t.dtype == Dtype::F32 {
                t.bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect()
            } else {
                t.bytes
                    .chunks_exact(2)
                    .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect()
            };
            if t.name.ends_with("q_proj.weight_scale") {
                t.dtype = Dtype::F16;
                t.shape = vec![];
                t.bytes = half::f16::from_f32(values[0]).to_le_bytes().to_vec();
            } else {
                t.dtype = Dtype::BF16;
                t.bytes = bf16_bytes(&values);
            }
        }
    }
    let back = load_from_bytes(&config, &[&serialize(&tensors)]).unwrap();
    let round = |v: f32| bf16::from_f32(v).to_f32();
    assert_eq!(
        back.embed_tokens,
        w.embed_tokens.iter().map(|&v| round(v)).collect::<Vec<_>>()
    );
    // The files hold multipliers (autobitlinear): rounded there, then inverted.
    let stored = |w: &TernaryWeights| multiplier_of(w.scales[0]);
    for (a, b) in back.layers.iter().zip(&w.layers) {
        assert_eq!(a.up_proj.codes, b.up_proj.codes);
        assert_eq!(a.up_proj.scales, [1.0 / round(stored(&b.up_proj))]);
        assert_eq!(
            a.q_proj.scales,
            [1.0 / half::f16::from_f32(stored(&b.q_proj)).to_f32()]
        );
    }
}

#[test]
fn sharded_checkpoints_load() {
    let (w, config, tensors) = packed_checkpoint(false);
    let dir = TempDir::new("sharded");
    let (first, second) = tensors.split_at(tensors.len() / 2);
    let names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let mut weight_map = serde_json::Map::new();
    for (part, name) in [first, second].into_iter().zip(names) {
        write(&dir.0, name, &serialize(part));
        for t in part {
            weight_map.insert(t.name.clone(), json!(name));
        }
    }
    write(&dir.0, CONFIG_FILE, config.as_bytes());
    let index = json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    write(&dir.0, INDEX_FILE, index.to_string().as_bytes());
    assert_bit_exact(&w, &load_dir(&dir.0).unwrap());

    // The same shards from memory, in either order.
    let (a, b) = (serialize(first), serialize(second));
    assert_bit_exact(&w, &load_from_bytes(&config, &[&b, &a]).unwrap());
    assert!(matches!(
        load_from_bytes(&config, &[]),
        Err(Error::Empty(_))
    ));
    // A tensor in two shards is ambiguous.
    let e = load_from_bytes(&config, &[&a, &a]).unwrap_err().to_string();
    assert!(e.contains("is in both shard 0 and shard 1"), "{e}");

    // An index that misplaces a tensor, or points outside the folder, is refused.
    weight_map.insert(first[0].name.clone(), json!(names[1]));
    let index = json!({"weight_map": weight_map});
    write(&dir.0, INDEX_FILE, index.to_string().as_bytes());
    let e = load_dir(&dir.0).unwrap_err().to_string();
    assert!(e.contains(&first[0].name) && e.contains(INDEX_FILE), "{e}");
    let index = json!({"weight_map": {"x": "../model.safetensors"}});
    write(&dir.0, INDEX_FILE, index.to_string().as_bytes());
    let e = load_dir(&dir.0).unwrap_err().to_string();
    assert!(e.contains("../model.safetensors"), "{e}");
}

#[test]
fn broken_files_are_named() {
    let (w, config, _) = packed_checkpoint(true);
    let dir = TempDir::new("broken");
    let e = load_dir(&dir.0).unwrap_err();
    assert!(
        matches!(&e, Error::Io { path, .. } if path.ends_with(CONFIG_FILE)),
        "{e}"
    );

    write(&dir.0, CONFIG_FILE, config.as_bytes());
    let e = load_dir(&dir.0).unwrap_err();
    assert!(
        matches!(e, Error::Io { .. }) && e.to_string().contains(WEIGHTS_FILE),
        "{e}"
    );

    let bytes = to_safetensors_bytes(&w, &[]).unwrap();
    for cut in [0, 7, 100, bytes.len() - 1] {
        write(&dir.0, WEIGHTS_FILE, &bytes[..cut]);
        let e = load_dir(&dir.0).unwrap_err().to_string();
        assert!(e.contains(WEIGHTS_FILE) && e.contains("truncated"), "{e}");
    }

    write(&dir.0, WEIGHTS_FILE, &bytes);
    write(
        &dir.0,
        CONFIG_FILE,
        br#"{"model_type": "bitnet", "hidden_size": 40, "num_attention_heads": 3}"#,
    );
    let e = load_dir(&dir.0).unwrap_err().to_string();
    assert!(
        e.contains("config.json") && e.contains("num_attention_heads"),
        "{e}"
    );
}

#[test]
fn bad_tensors_are_named() {
    let (_, config, good) = packed_checkpoint(false);
    let edit = |name: &str, f: &dyn Fn(&mut Raw)| -> Vec<Raw> {
        let mut t = good.clone();
        f(t.iter_mut().find(|t| t.name == name).unwrap());
        t
    };
    let q = "model.layers.1.self_attn.q_proj.weight";

    let missing: Vec<Raw> = good.iter().filter(|t| t.name != q).cloned().collect();
    let e = load_error(&config, &missing);
    assert!(e.contains(&format!("missing tensor `{q}`")), "{e}");

    let e = load_error(
        &config,
        &edit(q, &|t| {
            t.dtype = Dtype::I32;
            t.shape = vec![10, 10];
        }),
    );
    assert!(e.contains(q) && e.contains("I32"), "{e}");

    let e = load_error(&config, &edit(q, &|t| t.shape = vec![20, 20]));
    assert!(
        e.contains(q) && e.contains("[20, 20]") && e.contains("[10, 40]"),
        "{e}"
    );

    let norm = "model.layers.0.mlp.ffn_sub_norm.weight";
    let e = load_error(
        &config,
        &edit(norm, &|t| {
            t.shape = vec![40];
            t.bytes.truncate(160);
        }),
    );
    assert!(e.contains(norm) && e.contains("[56]"), "{e}");

    let e = load_error(
        &config,
        &edit(norm, &|t| {
            t.bytes[0..4].copy_from_slice(&f32::NAN.to_le_bytes())
        }),
    );
    assert!(e.contains(norm) && e.contains("NaN"), "{e}");

    let scale = "model.layers.0.mlp.up_proj.weight_scale";
    let e = load_error(
        &config,
        &edit(scale, &|t| t.bytes = 0f32.to_le_bytes().to_vec()),
    );
    assert!(e.contains(scale) && e.contains("> 0"), "{e}");

    let e = load_error(&config, &edit(q, &|t| t.bytes[3] = 0xff));
    assert!(e.contains(q), "{e}");

    // A tensor config.json does not describe, here a third layer.
    let mut extra = good.clone();
    let mut t = extra.iter().find(|t| t.name == q).unwrap().clone();
    t.name = "model.layers.2.self_attn.q_proj.weight".into();
    extra.push(t);
    let e = load_error(&config, &extra);
    assert!(
        e.contains("unexpected") && e.contains("model.layers.2.self_attn.q_proj.weight"),
        "{e}"
    );

    // RoPE buffers are ignored.
    let mut rope = good.clone();
    rope.push(Raw {
        name: "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
        dtype: Dtype::F32,
        shape: vec![10],
        bytes: vec![0; 40],
    });
    load_from_bytes(&config, &[&serialize(&rope)]).unwrap();
}

#[test]
fn a_checkpoint_is_checked_whole_then_read_a_layer_at_a_time() {
    use crate::model::{CpuEngine, WeightSource, collect};
    for tied in [false, true] {
        let (w, config, good) = packed_checkpoint(tied);
        let bytes = serialize(&good);
        let checkpoint = Checkpoint::from_bytes(&config, &[&bytes]).unwrap();
        for (i, layer) in w.layers.iter().enumerate() {
            assert_eq!(*checkpoint.layer(i).unwrap(), *layer);
        }
        assert!(checkpoint.layer(w.layers.len()).is_err());
        assert_bit_exact(&collect(&checkpoint).unwrap(), &w);
        // An engine built part by part computes what one built from the whole model does.
        let tokens = [3, 1, 4, 1, 5];
        let streamed = CpuEngine::new(&checkpoint)
            .unwrap()
            .forward(&tokens)
            .unwrap();
        let whole = CpuEngine::new(&w).unwrap().forward(&tokens).unwrap();
        assert_eq!(streamed, whole);
    }
    let (w, config, good) = packed_checkpoint(false);
    // A tensor missing from the last layer is found when the checkpoint opens, before any
    // weight is decoded.
    let last = format!("model.layers.{}.mlp.down_proj.weight", w.layers.len() - 1);
    let missing: Vec<Raw> = good.iter().filter(|t| t.name != last).cloned().collect();
    let bytes = serialize(&missing);
    let e = Checkpoint::from_bytes(&config, &[&bytes])
        .err()
        .expect("missing tensor");
    assert!(
        e.to_string().contains(&format!("missing tensor `{last}`")),
        "{e}"
    );
    // A bad value shows when its layer is read, and in no other layer.
    let norm = "model.layers.1.input_layernorm.weight";
    let mut bad = good.clone();
    let t = bad.iter_mut().find(|t| t.name == norm).unwrap();
    t.bytes[0..4].copy_from_slice(&f32::INFINITY.to_le_bytes());
    let bytes = serialize(&bad);
    let checkpoint = Checkpoint::from_bytes(&config, &[&bytes]).unwrap();
    assert_eq!(*checkpoint.layer(0).unwrap(), w.layers[0]);
    let e = checkpoint.layer(1).expect_err("infinite norm");
    assert!(e.to_string().contains(norm), "{e}");
    assert!(CpuEngine::new(&checkpoint).is_err());
}

#[test]
fn tied_lm_head_copies_are_tolerated_only_when_equal() {
    let (w, config, tensors) = packed_checkpoint(true);
    let mut with_copy = tensors.clone();
    let mut head = tensors
        .iter()
        .find(|t| t.name == "model.embed_tokens.weight")
        .unwrap()
        .clone();
    head.name = "lm_head.weight".into();
    with_copy.push(head.clone());
    assert_bit_exact(
        &w,
        &load_from_bytes(&config, &[&serialize(&with_copy)]).unwrap(),
    );
    head.bytes[0] ^= 1;
    let mut differing = tensors;
    differing.push(head);
    let e = load_error(&config, &differing);
    assert!(
        e.contains("lm_head.weight") && e.contains("tie_word_embeddings"),
        "{e}"
    );
}

#[test]
fn unsavable_weights_are_refused_before_writing() {
    let w = random_weights(3, true);
    let dir = TempDir::new("refused");
    let mut per_channel = w.clone();
    per_channel.layers[0].o_proj.scales = vec![1.0; 40];
    let mut untied_head = w.clone();
    untied_head.lm_head = Some(vec![0.0; 37 * 40]);
    let mut wrong_shape = w.clone();
    wrong_shape.layers[1].down_proj = w.layers[1].up_proj.clone();
    let mut few_layers = w.clone();
    few_layers.layers.pop();
    let mut bad_config = w.clone();
    bad_config.config.num_key_value_heads = 3;
    for (bad, needle) in [
        (per_channel, "model.layers.0.self_attn.o_proj"),
        (untied_head, "lm_head"),
        (wrong_shape, "model.layers.1.mlp.down_proj"),
        (few_layers, "layers"),
        (bad_config, "num_key_value_heads"),
    ] {
        let e = save_dir(&bad, &dir.0, &[]).unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
        assert_eq!(std::fs::read_dir(&dir.0).unwrap().count(), 0);
    }
    let e = to_safetensors_bytes(&w, &[("format".into(), "np".into())]).unwrap_err();
    assert!(e.to_string().contains("format"), "{e}");
}

/// Rows of whole I2_S blocks reach the CPU engine in that layout, turned rather than unpacked,
/// and the engine equals one built from the unpacked codes.
#[test]
fn whole_block_rows_are_turned_into_i2s_rows() {
    use crate::cpu::fast::PackedMatrix;
    use crate::model::{CpuEngine, WeightSource, synthetic};
    let config = ModelConfig {
        vocab_size: 50,
        hidden_size: 128,
        intermediate_size: 384,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 32,
        max_position_embeddings: 16,
        ..ModelConfig::bitnet_b158_2b4t()
    };
    let w = synthetic(&config, 5);
    let json = config_json(&config).unwrap();
    let bytes = to_safetensors_bytes(&w, &[]).unwrap();
    let checkpoint = Checkpoint::from_bytes(&json, &[&bytes]).unwrap();
    for (i, layer) in w.layers.iter().enumerate() {
        let blocks = checkpoint.layer_blocks(i).unwrap().expect("whole blocks");
        let norms = [
            &layer.input_layernorm,
            &layer.attn_sub_norm,
            &layer.post_attention_layernorm,
            &layer.ffn_sub_norm,
        ];
        assert_eq!(blocks.norms.each_ref(), norms);
        for ((rows, scale), want) in blocks.linears.iter().zip(layer.linears()) {
            assert_eq!(
                PackedMatrix::from_blocks(&[(rows.clone(), *scale)]).unwrap(),
                PackedMatrix::new(&[want]).unwrap()
            );
        }
    }
    assert!(checkpoint.layer_blocks(2).is_err());
    let tokens = [3, 1, 4, 1, 5];
    let turned = CpuEngine::new(&checkpoint)
        .unwrap()
        .forward(&tokens)
        .unwrap();
    assert_eq!(
        turned,
        CpuEngine::new(&w).unwrap().forward(&tokens).unwrap()
    );
    // Rows that are not whole blocks are unpacked.
    let (_, tiny, tensors) = packed_checkpoint(false);
    let bytes = serialize(&tensors);
    let checkpoint = Checkpoint::from_bytes(&tiny, &[&bytes]).unwrap();
    assert!(checkpoint.layer_blocks(0).unwrap().is_none());
    // A stored 3 is named with its tensor, as when unpacked.
    let name = "model.layers.1.mlp.up_proj.weight";
    let mut raw = raw_tensors(&to_safetensors_bytes(&w, &[]).unwrap());
    raw.iter_mut().find(|t| t.name == name).unwrap().bytes[7] = 0b11_01_01_01;
    let bytes = serialize(&raw);
    let checkpoint = Checkpoint::from_bytes(&json, &[&bytes]).unwrap();
    assert!(checkpoint.layer_blocks(0).is_ok());
    let e = checkpoint.layer_blocks(1).unwrap_err().to_string();
    assert!(e.contains(name) && e.contains("3 at index"), "{e}");
    assert_eq!(e, checkpoint.layer(1).unwrap_err().to_string());
}

#[test]
fn both_offline_layouts_load_to_the_same_weights() {
    let (w, autobitlinear, tensors) = packed_checkpoint(false);
    // The older "bitlinear" file of the same model: the same packed bytes, each weight_scale
    // the inverse of the written multiplier.
    let mut older = tensors.clone();
    for t in older
        .iter_mut()
        .filter(|t| t.name.ends_with("weight_scale"))
    {
        let m = match t.dtype {
            Dtype::BF16 => bf16::from_le_bytes([t.bytes[0], t.bytes[1]]).to_f32(),
            _ => f32::from_le_bytes(t.bytes[..4].try_into().unwrap()),
        };
        t.dtype = Dtype::F32;
        t.bytes = (1.0 / m).to_le_bytes().to_vec();
    }
    let bitlinear = autobitlinear.replace("\"autobitlinear\"", "\"bitlinear\"");
    assert_ne!(bitlinear, autobitlinear);
    let a = load_from_bytes(&autobitlinear, &[&serialize(&tensors)]).unwrap();
    let b = load_from_bytes(&bitlinear, &[&serialize(&older)]).unwrap();
    assert_bit_exact(&w, &a);
    for (la, lb) in a.layers.iter().zip(&b.layers) {
        for (x, y) in la.linears().into_iter().zip(lb.linears()) {
            assert_eq!(x.codes, y.codes);
            // 1 / (1 / s) comes back within one ulp of s.
            let ulps = (x.scales[0].to_bits() as i64 - y.scales[0].to_bits() as i64).abs();
            assert!(ulps <= 1, "{} vs {}", x.scales[0], y.scales[0]);
        }
    }
    // The packed tensors are byte for byte those of the older layout.
    for (x, y) in tensors.iter().zip(&older) {
        if !x.name.ends_with("weight_scale") {
            assert_eq!((&x.name, &x.bytes), (&y.name, &y.bytes));
        }
    }
}

/// config.json exactly as transformers' `save_pretrained` writes it (every field of its
/// `BitNetQuantConfig`), for both linear classes.
#[test]
fn transformers_written_configs_load() {
    for (class, expected) in [
        ("autobitlinear", LinearClass::AutoBitLinear),
        ("bitlinear", LinearClass::BitLinear),
    ] {
        let text = format!(
            r#"{{
  "architectures": ["BitNetForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 1,
  "dtype": "bfloat16",
  "eos_token_id": null,
  "head_dim": 20,
  "hidden_act": "relu2",
  "hidden_size": 40,
  "initializer_range": 0.02,
  "intermediate_size": 56,
  "max_position_embeddings": 64,
  "model_type": "bitnet",
  "num_attention_heads": 2,
  "num_hidden_layers": 2,
  "num_key_value_heads": 1,
  "pad_token_id": null,
  "quantization_config": {{
    "linear_class": "{class}",
    "modules_to_not_convert": null,
    "quant_method": "bitnet",
    "quantization_mode": "offline",
    "rms_norm_eps": 1e-06,
    "use_rms_norm": false
  }},
  "rms_norm_eps": 1e-06,
  "rope_theta": 10000.0,
  "tie_word_embeddings": false,
  "transformers_version": "4.57.1",
  "use_cache": true,
  "vocab_size": 37
}}"#
        );
        let c = parse_checkpoint_config(&text).unwrap();
        assert_eq!(c.model, tiny_config(false));
        assert_eq!(c.weight_format, WeightFormat::OfflinePacked(expected));
    }
}
