//! The seed corpus of the fuzz targets (`fuzz/seeds/<target>/`): real-shaped inputs made by the
//! project's own writers from tiny configs, so that fuzzing starts from files the readers accept
//! and mutates them from there.
//!
//! `BITNET_WRITE_FUZZ_SEEDS=1 cargo test --test fuzz_seeds` writes them anew; without it, this
//! checks that every committed seed is still read without error.
//!
//! Seeds holding several files (`hf_load`) are framed as the fuzz crate reads
//! them: each part is its length (u32, little-endian) followed by its bytes.
#![cfg(not(target_arch = "wasm32"))]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bitnet_wgpu::formats::{gguf, hf};
use bitnet_wgpu::model::{ModelConfig, load_model_from_bytes, synthetic};
use bitnet_wgpu::packing;
use bitnet_wgpu::tokenizer::Tokenizer;
use bitnet_wgpu::train::checkpoint::{
    CheckpointMeta, STATE_FILE, export_master, load_checkpoint, load_latent, save_checkpoint,
};
use bitnet_wgpu::train::{AdamW, Optimizer, Quant, Sgd, TrainModel, bpe};

/// The smallest model every format writes: GGUF's I2_S needs each linear's `rows * cols` to be
/// a multiple of 128.
fn small_config(vocab_size: usize) -> ModelConfig {
    ModelConfig {
        vocab_size,
        hidden_size: 16,
        intermediate_size: 16,
        num_hidden_layers: 1,
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: 8,
        max_position_embeddings: 16,
        ..ModelConfig::bitnet_b158_2b4t()
    }
}

/// A smaller model for the training files, which hold f32 weights and optimizer state but are
/// not written to GGUF.
fn train_config() -> ModelConfig {
    ModelConfig {
        hidden_size: 8,
        intermediate_size: 8,
        num_attention_heads: 2,
        head_dim: 4,
        ..small_config(8)
    }
}

fn frames(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for part in parts {
        out.extend_from_slice(&(part.len() as u32).to_le_bytes());
        out.extend_from_slice(part);
    }
    out
}

fn unframe(mut data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    while let Some((len, rest)) = data.split_first_chunk::<4>() {
        let len = (u32::from_le_bytes(*len) as usize).min(rest.len());
        parts.push(&rest[..len]);
        data = &rest[len..];
    }
    parts
}

/// Every seed, by target and file name.
fn seeds() -> BTreeMap<(&'static str, &'static str), Vec<u8>> {
    let texts: Vec<String> = [
        "It was a dark and stormy night; the rain fell in torrents.",
        "The quick brown fox jumps over the lazy dog. Über café, naïve 東京 🦀!",
    ]
    .map(String::from)
    .to_vec();
    let bpe = bpe::train_bpe(&texts, 270).unwrap();
    let bpe_config = ModelConfig {
        bos_token_id: Some(bpe.bos),
        eos_token_id: Some(bpe.eos),
        ..small_config(bpe.tokenizer.vocab_size())
    };
    let (small, with_vocab) = (synthetic(&small_config(16), 1), synthetic(&bpe_config, 2));
    let packed = hf::to_safetensors_bytes(&small, &[]).unwrap();
    let packed_bpe = hf::to_safetensors_bytes(&with_vocab, &[]).unwrap();

    let train = TrainModel::new(train_config(), Quant::BitNet, 3).unwrap();
    let scratch = tempdir("fuzz-seeds");
    export_master(&train, None, &scratch.join("master")).unwrap();
    let master_config = std::fs::read(scratch.join("master").join(hf::CONFIG_FILE)).unwrap();
    let master_weights = std::fs::read(scratch.join("master").join(hf::WEIGHTS_FILE)).unwrap();
    let meta = CheckpointMeta {
        version: 1,
        step: 3,
        config_json: hf::config_json(&train.config).unwrap(),
        quant: "bitnet".into(),
        run: serde_json::json!({ "batch": 1, "context": 8 }),
        epoch: 0,
        cursor: 2,
        optimizer_steps: 3,
    };
    let mut adamw = AdamW::default();
    adamw.restore(Some((train.params.clone(), train.params.clone())), 3);
    let mut sgd = Sgd::new(0.9, 0.0);
    sgd.restore(Some(train.params.clone()));
    let mut checkpoints = Vec::new();
    for (name, optimizer) in [
        ("adamw", Optimizer::AdamW(adamw)),
        ("sgd", Optimizer::Sgd(sgd)),
    ] {
        let dir = scratch.join(name);
        save_checkpoint(&dir, &meta, &train, &optimizer).unwrap();
        checkpoints.push((name, std::fs::read(dir.join(STATE_FILE)).unwrap()));
    }

    let gguf_small = gguf::write_model(&small, None, gguf::TableType::F32).unwrap();
    let gguf_tokenizer = bpe.tokenizer.to_gguf().unwrap();
    let gguf_bpe =
        gguf::write_model(&with_vocab, Some(&gguf_tokenizer), gguf::TableType::F16).unwrap();
    let small_json = hf::config_json(&small.config).unwrap();
    let bpe_json = hf::config_json(&bpe_config).unwrap();
    let text = texts[1].as_bytes();

    let codes: Vec<i8> = (0..256).map(|i| [-1, 0, 1, 1, 0][i % 5]).collect();
    let packing = |layout: u8, rows: u8, cols: u8, bytes: &[u8]| {
        let mut seed = vec![layout, rows, cols];
        seed.extend_from_slice(bytes);
        seed
    };
    let gpu_words: Vec<u8> = packing::gpu_words::pack(&codes[..5 * 9], 5, 9)
        .unwrap()
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();

    let mut seeds = BTreeMap::new();
    let mut add = |target, name, bytes: Vec<u8>| {
        seeds.insert((target, name), bytes);
    };
    add("config_json", "small.json", small_json.clone().into_bytes());
    add("config_json", "master.json", master_config.clone());
    add(
        "config_json",
        "2b4t.json",
        hf::config_json(&ModelConfig::bitnet_b158_2b4t())
            .unwrap()
            .into_bytes(),
    );
    add("safetensors", "packed.safetensors", packed.clone());
    add(
        "hf_load",
        "packed",
        frames(&[small_json.as_bytes(), b"", &packed]),
    );
    add(
        "hf_load",
        "master",
        frames(&[&master_config, b"", &master_weights]),
    );
    add(
        "hf_load",
        "tokenizer",
        frames(&[bpe_json.as_bytes(), bpe.json.as_bytes(), &packed_bpe]),
    );
    add("gguf_file", "small.gguf", gguf_small.clone());
    add("gguf_file", "tokenizer.gguf", gguf_bpe.clone());
    add("gguf_model", "small.gguf", gguf_small);
    add("gguf_model", "tokenizer.gguf", gguf_bpe);
    add("tokenizer_json", "bpe.json", bpe.json.clone().into_bytes());
    add("tokenizer_text", "text", text.to_vec());
    add("tokenizer_text", "ids", (0u8..=255).collect());
    add("packing", "gpu_words", packing(0, 5, 9, &gpu_words));
    add(
        "packing",
        "hf",
        packing(1, 8, 3, &packing::hf::pack(&codes[..24], 8, 3).unwrap()),
    );
    add(
        "packing",
        "i2s",
        packing(2, 1, 128, &packing::i2s::pack(&codes[..128], 0.25).unwrap()),
    );
    add(
        "packing",
        "base3",
        packing(3, 1, 13, &packing::base3::pack(&codes[..13]).unwrap()),
    );
    for (name, bytes) in checkpoints {
        add("train_checkpoint", name, bytes);
    }
    add("train_latent", "master.safetensors", master_weights);
    std::fs::remove_dir_all(&scratch).unwrap();
    seeds
}

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bitnet-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn seed_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds")
}

#[test]
fn seeds_are_read_without_error() {
    let root = seed_dir();
    if std::env::var_os("BITNET_WRITE_FUZZ_SEEDS").is_some() {
        let _ = std::fs::remove_dir_all(&root);
        for ((target, name), bytes) in seeds() {
            std::fs::create_dir_all(root.join(target)).unwrap();
            std::fs::write(root.join(target).join(name), bytes).unwrap();
        }
    }
    let read = |target: &str, name: &str| std::fs::read(root.join(target).join(name)).unwrap();
    let text = |target: &str, name: &str| String::from_utf8(read(target, name)).unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let target_dir = entry.unwrap().path();
        let target = target_dir
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        for entry in std::fs::read_dir(&target_dir).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            let seed = format!("{}", path.display());
            match target.as_str() {
                "config_json" => {
                    hf::parse_checkpoint_config(std::str::from_utf8(&bytes).unwrap()).expect(&seed);
                }
                "safetensors" => {
                    hf::load_from_bytes(&text("config_json", "small.json"), &[&bytes])
                        .expect(&seed);
                }
                "hf_load" => {
                    let parts = unframe(&bytes);
                    let mut files = vec![("config.json", parts[0])];
                    if !parts[1].is_empty() {
                        files.push(("tokenizer.json", parts[1]));
                    }
                    files.push(("model.safetensors", parts[2]));
                    load_model_from_bytes(&files).expect(&seed);
                }
                "gguf_file" | "gguf_model" => {
                    load_model_from_bytes(&[("model.gguf", &bytes)]).expect(&seed);
                }
                "tokenizer_json" => {
                    let tokenizer = Tokenizer::from_json(&bytes).expect(&seed);
                    let text = text("tokenizer_text", "text");
                    let ids = tokenizer.encode(&text, false).expect(&seed);
                    assert_eq!(tokenizer.decode(&ids).expect(&seed), text, "{seed}");
                }
                "tokenizer_text" => {}
                "packing" => {
                    let (rows, cols) = (bytes[1] as usize, bytes[2] as usize);
                    let packed = &bytes[3..];
                    match bytes[0] {
                        0 => {
                            let words: Vec<u32> = packed
                                .chunks_exact(4)
                                .map(|w| u32::from_le_bytes(w.try_into().unwrap()))
                                .collect();
                            packing::gpu_words::unpack(&words, rows, cols).map(drop)
                        }
                        1 => packing::hf::unpack(packed, rows, cols).map(drop),
                        2 => packing::i2s::unpack(packed, rows * cols).map(drop),
                        _ => packing::base3::unpack(packed, rows * cols).map(drop),
                    }
                    .expect(&seed);
                }
                "train_checkpoint" => {
                    let dir = tempdir("fuzz-seed-checkpoint");
                    std::fs::write(dir.join(STATE_FILE), &bytes).unwrap();
                    let optimizer = if path.ends_with("sgd") {
                        Optimizer::Sgd(Sgd::new(0.9, 0.0))
                    } else {
                        Optimizer::AdamW(AdamW::default())
                    };
                    load_checkpoint(&dir, optimizer).expect(&seed);
                    std::fs::remove_dir_all(&dir).unwrap();
                }
                "train_latent" => {
                    let config_text = text("config_json", "master.json");
                    let config = hf::parse_config(&config_text).unwrap();
                    let template = TrainModel::new(config, Quant::BitNet, 0).unwrap();
                    let dir = tempdir("fuzz-seed-latent");
                    std::fs::write(dir.join(hf::CONFIG_FILE), config_text).unwrap();
                    std::fs::write(dir.join(hf::WEIGHTS_FILE), &bytes).unwrap();
                    assert!(load_latent(&dir, &template).expect(&seed).is_some());
                    std::fs::remove_dir_all(&dir).unwrap();
                }
                other => panic!("{seed}: no fuzz target {other}"),
            }
            checked += 1;
        }
    }
    assert!(
        checked >= 20,
        "only {checked} seeds under {}",
        root.display()
    );
}
