//! `convert_dir`: a tiny full-precision checkpoint in, Hugging Face's offline packed format out.
#![cfg(not(target_arch = "wasm32"))]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use bitnet_wgpu::convert::{
    ConversionReport, ConvertOptions, DEQUANTIZED_DIR, Progress, REPORT_FILE, convert_dir,
};
use bitnet_wgpu::cpu::{ScaleGranularity, WeightQuantOptions, weight_quant};
use bitnet_wgpu::formats::hf::load_dir;
use bitnet_wgpu::{Error, Result};
use half::{bf16, f16};
use rand::{Rng, SeedableRng, rngs::SmallRng};
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};

const HIDDEN: usize = 32;
const INTERMEDIATE: usize = 48;
const VOCAB: usize = 40;
const LAYERS: usize = 2;
const KV: usize = 16; // 2 KV heads of head_dim 8

/// A folder under the system's temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "bitnet-convert-{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn config(tied: bool) -> String {
    format!(
        r#"{{"architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "vocab_size": {VOCAB},
        "hidden_size": {HIDDEN}, "intermediate_size": {INTERMEDIATE},
        "num_hidden_layers": {LAYERS}, "num_attention_heads": 4, "num_key_value_heads": 2,
        "hidden_act": "relu2", "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": {tied}, "bos_token_id": 1,
        "eos_token_id": 2, "torch_dtype": "bfloat16"}}"#
    )
}

/// Every tensor of the tiny model: name, shape and bf16 values.
fn tensors(tied: bool, seed: u64) -> Vec<(String, Vec<usize>, Vec<bf16>)> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut t = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, spread: f32, offset: f32| {
        let n = shape.iter().product();
        let values = (0..n)
            .map(|_| bf16::from_f32(offset + rng.random_range(-spread..spread)))
            .collect();
        t.push((name, shape, values));
    };
    add(
        "model.embed_tokens.weight".into(),
        vec![VOCAB, HIDDEN],
        1.0,
        0.0,
    );
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        for (name, out, inp) in [
            ("self_attn.q_proj", HIDDEN, HIDDEN),
            ("self_attn.k_proj", KV, HIDDEN),
            ("self_attn.v_proj", KV, HIDDEN),
            ("self_attn.o_proj", HIDDEN, HIDDEN),
            ("mlp.gate_proj", INTERMEDIATE, HIDDEN),
            ("mlp.up_proj", INTERMEDIATE, HIDDEN),
            ("mlp.down_proj", HIDDEN, INTERMEDIATE),
        ] {
            add(format!("{p}.{name}.weight"), vec![out, inp], 0.05, 0.0);
        }
        for (name, len) in [
            ("input_layernorm", HIDDEN),
            ("self_attn.attn_sub_norm", HIDDEN),
            ("post_attention_layernorm", HIDDEN),
            ("mlp.ffn_sub_norm", INTERMEDIATE),
        ] {
            add(format!("{p}.{name}.weight"), vec![len], 0.1, 1.0);
        }
    }
    add("model.norm.weight".into(), vec![HIDDEN], 0.1, 1.0);
    if !tied {
        add("lm_head.weight".into(), vec![VOCAB, HIDDEN], 1.0, 0.0);
    }
    t
}

fn serialize(tensors: &[(String, Vec<usize>, Vec<bf16>)]) -> Vec<u8> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            (
                name.as_str(),
                TensorView::new(Dtype::BF16, shape.clone(), b).unwrap(),
            )
        })
        .collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(metadata)).unwrap()
}

/// A full-precision checkpoint folder with a tokenizer.json and a tokenizer_config.json.
fn checkpoint(dir: &Path, tied: bool) -> Vec<(String, Vec<usize>, Vec<bf16>)> {
    let t = tensors(tied, 7);
    std::fs::write(dir.join("config.json"), config(tied)).unwrap();
    std::fs::write(dir.join("model.safetensors"), serialize(&t)).unwrap();
    std::fs::write(dir.join("tokenizer.json"), r#"{"dummy": "tokenizer"}"#).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": "</s>"}"#,
    )
    .unwrap();
    t
}

fn convert(
    input: &Path,
    output: &Path,
    options: &ConvertOptions,
) -> (Result<ConversionReport>, Vec<Progress>) {
    let mut events = Vec::new();
    let result = convert_dir(input, output, options, &mut |p| events.push(p));
    (result, events)
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn converts_to_what_loading_the_input_quantizes_with_statistics() {
    let tmp = TempDir::new("main");
    let input = tmp.0.join("in");
    std::fs::create_dir(&input).unwrap();
    let t = checkpoint(&input, false);
    let output = tmp.0.join("nested/out");
    let (report, events) = convert(&input, &output, &ConvertOptions::default());
    let report = report.unwrap();

    let packed = load_dir(&output).unwrap();
    assert_eq!(packed, load_dir(&input).unwrap());

    let input_bytes: u64 = t.iter().map(|(_, _, v)| 2 * v.len() as u64).sum();
    let linear_count: usize = packed
        .layers
        .iter()
        .map(|l| {
            [
                &l.q_proj,
                &l.k_proj,
                &l.v_proj,
                &l.o_proj,
                &l.gate_proj,
                &l.up_proj,
                &l.down_proj,
            ]
            .iter()
            .map(|w| w.codes.len())
            .sum::<usize>()
        })
        .sum();
    let zeros: usize = packed
        .layers
        .iter()
        .flat_map(|l| {
            [
                &l.q_proj,
                &l.k_proj,
                &l.v_proj,
                &l.o_proj,
                &l.gate_proj,
                &l.up_proj,
                &l.down_proj,
            ]
        })
        .map(|w| w.codes.iter().filter(|&&c| c == 0).count())
        .sum();
    assert_eq!(report.mode, "per-tensor");
    assert_eq!(report.threshold, 0.5);
    assert_eq!(report.bitlinear_layers, 7 * LAYERS);
    assert_eq!(report.excluded, ["model.embed_tokens", "lm_head"]);
    assert_eq!(report.exclude_patterns, ["embed_tokens", "lm_head"]);
    assert_eq!(report.original_bytes, input_bytes);
    assert_eq!(report.linear_original_bytes, 2 * linear_count as u64);
    // 2 bits per weight against 16, plus one small scale per linear.
    assert!(
        (7.5..8.0).contains(&report.linear_ratio),
        "{}",
        report.linear_ratio
    );
    assert_eq!(
        report.linear_ratio,
        report.linear_original_bytes as f64 / report.linear_packed_bytes as f64
    );
    assert_eq!(
        report.ratio,
        report.original_bytes as f64 / report.packed_bytes as f64
    );
    assert_eq!(report.sparsity, zeros as f64 / linear_count as f64);
    assert!(report.sparsity > 0.1 && report.sparsity < 0.6);
    assert_eq!(
        report.copied_files,
        ["tokenizer.json", "tokenizer_config.json"]
    );
    assert_eq!(report.dequantized_f16, None);

    // The statistics are in the header, and the sizes are those of the file's tensors.
    let bytes = std::fs::read(output.join("model.safetensors")).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().as_ref().unwrap();
    assert_eq!(meta["format"], "pt");
    assert_eq!(meta["bitnet.mode"], "per-tensor");
    assert_eq!(meta["bitnet.bitlinear_layers"], "14");
    assert_eq!(meta["bitnet.packed_bytes"], report.packed_bytes.to_string());
    assert_eq!(
        meta["bitnet.excluded"],
        r#"["model.embed_tokens","lm_head"]"#
    );
    let data: u64 = header
        .tensors()
        .values()
        .map(|i| (i.data_offsets.1 - i.data_offsets.0) as u64)
        .sum();
    assert_eq!(data, report.packed_bytes);

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(output.join(REPORT_FILE)).unwrap()).unwrap();
    assert_eq!(json, serde_json::to_value(&report).unwrap());

    assert_eq!(
        files_in(&output),
        [
            "config.json",
            REPORT_FILE,
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(
            std::fs::read(output.join(name)).unwrap(),
            std::fs::read(input.join(name)).unwrap()
        );
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(output.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["quantization_config"]["quantization_mode"],
        "offline"
    );

    let quantized: Vec<usize> = events
        .iter()
        .filter_map(|e| match e {
            Progress::Quantized { index, count, .. } => {
                assert_eq!(*count, 7 * LAYERS);
                Some(*index)
            }
            _ => None,
        })
        .collect();
    assert_eq!(quantized, (1..=7 * LAYERS).collect::<Vec<_>>());
    let file_len = std::fs::metadata(input.join("model.safetensors"))
        .unwrap()
        .len();
    assert!(events.contains(&Progress::Read {
        file: "model.safetensors".into(),
        bytes: file_len,
        total: file_len
    }));
    assert!(events.iter().any(
        |e| matches!(e, Progress::Wrote { file, bytes } if file == "model.safetensors" && *bytes == bytes_len(&output))
    ));
}

fn bytes_len(dir: &Path) -> u64 {
    std::fs::metadata(dir.join("model.safetensors"))
        .unwrap()
        .len()
}

#[test]
fn dequantized_f16_is_a_plain_checkpoint_of_codes_over_scales() {
    let tmp = TempDir::new("f16");
    let input = tmp.0.join("in");
    std::fs::create_dir(&input).unwrap();
    let t = checkpoint(&input, true);
    let output = tmp.0.join("out");
    let options = ConvertOptions {
        dequantized_f16: true,
        ..ConvertOptions::default()
    };
    let report = convert(&input, &output, &options).0.unwrap();
    assert_eq!(report.dequantized_f16.as_deref(), Some(DEQUANTIZED_DIR));

    let packed = load_dir(&output).unwrap();
    assert_eq!(packed.lm_head, None);
    let dir = output.join(DEQUANTIZED_DIR);
    assert_eq!(
        files_in(&dir),
        [
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json"
        ]
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert!(config.get("quantization_config").is_none());
    assert_eq!(config["torch_dtype"], "float16");
    assert_eq!(config["model_type"], "bitnet");

    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), t.len());
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), Dtype::F16, "{name}");
    }
    let f16s = |name: &str| -> Vec<f16> {
        st.tensor(name)
            .unwrap()
            .data()
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]))
            .collect()
    };
    for (l, layer) in packed.layers.iter().enumerate() {
        for (name, w) in [
            ("self_attn.k_proj", &layer.k_proj),
            ("mlp.down_proj", &layer.down_proj),
        ] {
            let expected: Vec<f16> = w
                .codes
                .iter()
                .map(|&c| f16::from_f32(f32::from(c) / w.scales[0]))
                .collect();
            assert_eq!(f16s(&format!("model.layers.{l}.{name}.weight")), expected);
        }
    }
    let embed: Vec<f16> = t[0].2.iter().map(|v| f16::from_f32(v.to_f32())).collect();
    assert_eq!(f16s("model.embed_tokens.weight"), embed);

    // It is a full-precision checkpoint: loading quantizes it online.
    let reloaded = load_dir(&dir).unwrap();
    assert_eq!(reloaded.config, packed.config);
}

#[test]
fn threshold_sets_the_codes_and_the_sparsity() {
    let tmp = TempDir::new("threshold");
    let input = tmp.0.join("in");
    std::fs::create_dir(&input).unwrap();
    let t = checkpoint(&input, false);
    let default = convert(&input, &tmp.0.join("a"), &ConvertOptions::default())
        .0
        .unwrap();
    let options = ConvertOptions {
        threshold: 0.9,
        ..ConvertOptions::default()
    };
    let sparse = convert(&input, &tmp.0.join("b"), &options).0.unwrap();
    assert!(sparse.sparsity > default.sparsity);
    assert_eq!(sparse.threshold, 0.9);

    let packed = load_dir(tmp.0.join("b")).unwrap();
    let (_, _, q) = t
        .iter()
        .find(|(n, _, _)| n == "model.layers.1.self_attn.q_proj.weight")
        .unwrap();
    let values: Vec<f32> = q.iter().map(|v| v.to_f32()).collect();
    let opts = WeightQuantOptions {
        threshold: 0.9,
        ..WeightQuantOptions::default()
    };
    let expected = weight_quant(&values, HIDDEN, HIDDEN, opts).unwrap();
    assert_eq!(packed.layers[1].q_proj, expected);
}

#[test]
fn sharded_input_converts_like_a_single_file() {
    let tmp = TempDir::new("sharded");
    let single = tmp.0.join("single");
    let sharded = tmp.0.join("sharded");
    std::fs::create_dir(&single).unwrap();
    std::fs::create_dir(&sharded).unwrap();
    let t = checkpoint(&single, false);
    std::fs::write(sharded.join("config.json"), config(false)).unwrap();
    let (a, b) = t.split_at(t.len() / 2);
    let mut map = serde_json::Map::new();
    for (shard, part) in [
        ("model-00001-of-00002.safetensors", a),
        ("model-00002-of-00002.safetensors", b),
    ] {
        std::fs::write(sharded.join(shard), serialize(part)).unwrap();
        for (name, _, _) in part {
            map.insert(name.clone(), shard.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();

    let r1 = convert(&single, &tmp.0.join("o1"), &ConvertOptions::default())
        .0
        .unwrap();
    let (r2, events) = convert(&sharded, &tmp.0.join("o2"), &ConvertOptions::default());
    let r2 = r2.unwrap();
    assert_eq!(
        load_dir(tmp.0.join("o1")).unwrap(),
        load_dir(tmp.0.join("o2")).unwrap()
    );
    assert_eq!(r1.packed_bytes, r2.packed_bytes);
    assert_eq!(r1.original_bytes, r2.original_bytes);
    let reads = events
        .iter()
        .filter(|e| matches!(e, Progress::Read { .. }))
        .count();
    assert_eq!(reads, 2);
}

fn assert_refused(result: Result<ConversionReport>, words: &str) {
    match result {
        Err(e) => assert!(e.to_string().contains(words), "{e}"),
        Ok(_) => panic!("converted, but should refuse ({words})"),
    }
}

#[test]
fn refuses_to_overwrite_or_to_convert_what_it_cannot_represent() {
    let tmp = TempDir::new("refuse");
    let input = tmp.0.join("in");
    std::fs::create_dir(&input).unwrap();
    checkpoint(&input, false);
    let before = files_in(&input);
    let defaults = ConvertOptions::default();

    assert_refused(convert(&input, &input, &defaults).0, "is the input folder");
    assert_refused(
        convert(&input, &input.join("../in/."), &defaults).0,
        "is the input folder",
    );
    assert_refused(
        convert(&input, &input.join("sub"), &defaults).0,
        "inside the input folder",
    );
    assert_eq!(files_in(&input), before);

    let taken = tmp.0.join("taken");
    std::fs::create_dir(&taken).unwrap();
    std::fs::write(taken.join("model.safetensors"), b"precious").unwrap();
    assert_refused(convert(&input, &taken, &defaults).0, "already exists");
    assert_eq!(files_in(&taken), ["model.safetensors"]);
    assert_eq!(
        std::fs::read(taken.join("model.safetensors")).unwrap(),
        b"precious"
    );

    let out = tmp.0.join("out");
    let per_channel = ConvertOptions {
        granularity: ScaleGranularity::PerChannel,
        ..ConvertOptions::default()
    };
    assert_refused(convert(&input, &out, &per_channel).0, "per-channel");
    for (pattern, words) in [
        ("q_proj", "decoder linear"),
        ("layers.*.mlp", "decoder linear"),
        ("embedings", "matches no module"),
    ] {
        let options = ConvertOptions {
            exclude: vec![pattern.into()],
            ..ConvertOptions::default()
        };
        assert_refused(convert(&input, &out, &options).0, words);
    }
    let bad_threshold = ConvertOptions {
        threshold: -1.0,
        ..ConvertOptions::default()
    };
    assert!(matches!(
        convert(&input, &out, &bad_threshold).0,
        Err(Error::Invalid { .. })
    ));
    assert!(!out.exists());

    // An output folder with unrelated files is fine; a converted folder is not a valid input.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), b"mine").unwrap();
    convert(&input, &out, &defaults).0.unwrap();
    assert_refused(convert(&input, &out, &defaults).0, "already exists");
    assert_refused(
        convert(&out, &tmp.0.join("again"), &defaults).0,
        "already in the offline packed format",
    );
}

#[test]
fn a_truncated_input_leaves_no_output() {
    let tmp = TempDir::new("truncated");
    let input = tmp.0.join("in");
    std::fs::create_dir(&input).unwrap();
    checkpoint(&input, false);
    let path = input.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    let output = tmp.0.join("out/deeper");
    let options = ConvertOptions {
        dequantized_f16: true,
        ..ConvertOptions::default()
    };
    let (result, _) = convert(&input, &output, &options);
    assert!(matches!(result, Err(Error::Safetensors(_))), "{result:?}");
    assert!(!tmp.0.join("out").exists());
}
