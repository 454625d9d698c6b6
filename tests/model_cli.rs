//! `bitnet generate` and `bitnet perplexity` on tiny random models written by the test, run as a
//! user would run them.
#![cfg(not(target_arch = "wasm32"))]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use bitnet_wgpu::cpu::{TernaryWeights, WeightQuantOptions, weight_quant};
use bitnet_wgpu::formats::gguf::{GgufTokenizer, TableType, write_model};
use bitnet_wgpu::formats::hf::save_dir;
use bitnet_wgpu::model::{
    CpuEngine, Family, LayerWeights, ModelConfig, ModelWeights, load_model, perplexity_windows,
};
use bitnet_wgpu::tokenizer::Tokenizer;
use rand::{Rng, SeedableRng, rngs::SmallRng};
use serde_json::Value;

const MAX_POSITIONS: usize = 48;

/// A character-level BPE over lowercase letters and space, with a few merges, and no
/// post-processor: transformers adds no special token to its texts.
fn tokenizer_json() -> String {
    tokenizer_json_with(Value::Null)
}

/// [`tokenizer_json`] with a post-processor like Llama 3's: byte-level offsets, then a template
/// that puts `<s>` (id 1) first.
fn tokenizer_json_adding_bos() -> String {
    let bos = serde_json::json!({"SpecialToken": {"id": "<s>", "type_id": 0}});
    tokenizer_json_with(serde_json::json!({"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        {"type": "TemplateProcessing",
         "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
         "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                  {"SpecialToken": {"id": "<s>", "type_id": 1}},
                  {"Sequence": {"id": "B", "type_id": 1}}],
         "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}]}))
}

fn tokenizer_json_with(post_processor: Value) -> String {
    let mut vocab = vec!["<unk>".to_string(), "<s>".into(), "</s>".into(), " ".into()];
    vocab.extend(('a'..='z').map(String::from));
    vocab.extend(["th", "the", "er", "in"].map(String::from));
    let vocab: serde_json::Map<String, Value> = vocab
        .into_iter()
        .enumerate()
        .map(|(id, token)| (token, Value::from(id)))
        .collect();
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": null,
        "pre_tokenizer": null,
        "post_processor": post_processor,
        "decoder": {"type": "Fuse"},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": false, "vocab": vocab,
            "merges": ["t h", "th e", "e r", "i n"]}
    })
    .to_string()
}

/// A GPT-2 style byte-level vocabulary: the 256 byte characters, two merges and a bos.
fn gguf_tokenizer() -> GgufTokenizer {
    let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
        .into_iter()
        .collect();
    alphabet.sort_unstable();
    let mut tokens: Vec<String> = alphabet.iter().map(char::to_string).collect();
    tokens.extend(["he", "Ġt", "<|begin|>"].map(String::from));
    let mut token_types = vec![1; tokens.len()];
    token_types[258] = 3;
    GgufTokenizer {
        model: "gpt2".into(),
        tokens,
        merges: vec!["h e".into(), "Ġ t".into()],
        token_types,
        bos: Some(258),
        // No eos: generation can only stop at the token budget or the context limit.
        eos: None,
        // llama.cpp adds the bos for this pre-tokenizer (bitnet.cpp writes it for the 2B-4T).
        pre: Some("llama-bpe".into()),
        add_bos: None,
        add_eos: None,
        chat_template: None,
    }
}

fn random_model(vocab_size: usize, bos: Option<u32>, eos: Option<u32>, seed: u64) -> ModelWeights {
    let config = ModelConfig {
        family: Default::default(),
        vocab_size,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        max_position_embeddings: MAX_POSITIONS,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        tie_word_embeddings: true,
        bos_token_id: bos,
        eos_token_id: eos,
    };
    let rng = &mut SmallRng::seed_from_u64(seed);
    let mut floats =
        |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0..1.0)).collect() };
    let mut linear = |rows: usize, cols: usize| -> TernaryWeights {
        weight_quant(
            &floats(rows * cols),
            rows,
            cols,
            WeightQuantOptions::default(),
        )
        .unwrap()
    };
    let layers = (0..config.num_hidden_layers)
        .map(|_| LayerWeights {
            input_layernorm: vec![1.0; 64],
            q_proj: linear(64, 64),
            k_proj: linear(32, 64),
            v_proj: linear(32, 64),
            o_proj: linear(64, 64),
            attn_sub_norm: vec![1.0; 64],
            post_attention_layernorm: vec![1.0; 64],
            gate_proj: linear(128, 64),
            up_proj: linear(128, 64),
            down_proj: linear(64, 128),
            ffn_sub_norm: vec![1.0; 128],
        })
        .collect();
    let rng = &mut SmallRng::seed_from_u64(seed + 1);
    ModelWeights {
        embed_tokens: (0..vocab_size * 64)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect(),
        layers,
        norm: vec![1.0; 64],
        lm_head: None,
        config,
    }
}

/// A folder of its own under the system's temporary folder, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "bitnet-model-cli-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A Hugging Face checkpoint folder with the tokenizer above: 34 tokens of the model's 64, as
/// in checkpoints whose embedding is padded past the vocabulary.
fn hf_model(dir: &TempDir) -> PathBuf {
    let path = dir.0.join("hf");
    save_dir(&random_model(64, Some(1), Some(2), 7), &path, &[]).unwrap();
    std::fs::write(path.join("tokenizer.json"), tokenizer_json()).unwrap();
    path
}

/// A GGUF file with the byte-level vocabulary above embedded.
fn gguf_model(dir: &TempDir) -> PathBuf {
    let path = dir.0.join("tiny.gguf");
    let bytes = write_model(
        &random_model(259, Some(258), None, 11),
        Some(&gguf_tokenizer()),
        TableType::F32,
    )
    .unwrap();
    std::fs::write(&path, bytes).unwrap();
    path
}

fn bitnet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(args)
        .output()
        .expect("the bitnet binary runs")
}

/// Runs `bitnet`, asserting success, and parses its stdout as exactly one line of JSON.
fn bitnet_json(args: &[&str]) -> Value {
    let output = bitnet(args);
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "bitnet {args:?} failed:\n{stdout}\n{stderr}"
    );
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn ids(value: &Value) -> Vec<u32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Sampling with `generate`'s defaults (temperature 0.8, top-p 0.95) on the demo model, on the GPU
/// (lavapipe in CI), where the token is sampled: the same seed gives the same text, another seed
/// another, and neither is the greedy one.
#[test]
fn sampled_generation_on_the_gpu_follows_the_seed() {
    let args = |seed: &'static str| {
        [
            "generate",
            "--prompt",
            "It was a dark and stormy night",
            "--max-new-tokens",
            "24",
            "--device",
            "gpu",
            "--json",
            "--seed",
            seed,
        ]
    };
    let first = bitnet_json(&args("11"));
    assert_ne!(first["adapter"], "cpu", "{first}");
    assert_eq!(ids(&first["generated_ids"]).len(), 24, "{first}");
    assert_eq!(
        bitnet_json(&args("11"))["generated_ids"],
        first["generated_ids"]
    );
    assert_ne!(
        bitnet_json(&args("12"))["generated_ids"],
        first["generated_ids"]
    );
    let greedy = bitnet_json(&[&args("11")[..], &["--temperature", "0"]].concat());
    assert_ne!(greedy["generated_ids"], first["generated_ids"]);
}

#[test]
fn greedy_generation_is_reproducible_and_complete() {
    let dir = TempDir::new("greedy");
    let model = hf_model(&dir);
    let args = [
        "generate",
        "--model",
        path_str(&model),
        "--prompt",
        "the winter",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
        "--json",
    ];
    let cpu_args = [&args[..], &["--device", "cpu"]].concat();
    let first = bitnet_json(&cpu_args);
    let second = bitnet_json(&cpu_args);
    for key in [
        "prompt_ids",
        "generated_ids",
        "text",
        "prompt_tokens_per_s",
        "tokens_per_s",
        "adapter",
    ] {
        assert!(first.get(key).is_some(), "{key} missing from {first}");
    }
    assert_eq!(first["generated_ids"], second["generated_ids"]);
    assert_eq!(first["adapter"], "cpu");

    // The GPU engine (lavapipe in CI: the test command sets WGPU_BACKEND) generates the same
    // tokens: the model's tables are small enough to stay f32 there.
    let gpu = bitnet_json(&[&args[..], &["--device", "gpu"]].concat());
    assert_ne!(gpu["adapter"], "cpu", "{gpu}");
    assert_eq!(gpu["generated_ids"], first["generated_ids"]);
    assert_eq!(gpu["text"], first["text"]);
    assert!(first["prompt_tokens_per_s"].as_f64().unwrap() > 0.0);

    let tokenizer = Tokenizer::from_json(tokenizer_json().as_bytes())
        .unwrap()
        .with_special_ids(Some(1), Some(2))
        .unwrap();
    assert_eq!(
        ids(&first["prompt_ids"]),
        tokenizer.encode("the winter", true).unwrap()
    );
    let generated = ids(&first["generated_ids"]);
    assert!(
        !generated.is_empty() && generated.len() <= 6,
        "{generated:?}"
    );
    // Padding ids past the tokenizer's 34 are never sampled.
    assert!(generated.iter().all(|&id| id < 34), "{generated:?}");
    assert_eq!(first["text"], tokenizer.decode(&generated).unwrap());
    if generated.len() < 6 {
        assert_eq!(
            generated.last(),
            Some(&2),
            "only eos stops early: {generated:?}"
        );
    }
}

#[test]
fn generation_streams_text_and_stops_at_the_context_limit() {
    let dir = TempDir::new("stream");
    let model = gguf_model(&dir);
    let sampled = bitnet_json(&[
        "generate",
        "--model",
        path_str(&model),
        "--prompt",
        "he met the",
        "--max-new-tokens",
        "1000",
        "--seed",
        "3",
        "--top-k",
        "20",
        "--json",
    ]);
    // Without an eos, only the context limit stops: every position holds a token, and the last
    // sampled one is never fed back.
    let prompt = ids(&sampled["prompt_ids"]);
    assert_eq!(prompt[0], 258, "llama-bpe adds the bos");
    assert_eq!(
        prompt.len() + ids(&sampled["generated_ids"]).len(),
        MAX_POSITIONS + 1
    );

    let output = bitnet(&[
        "generate",
        "--model",
        path_str(&model),
        "--prompt",
        "he met the",
        "--max-new-tokens",
        "5",
        "--device",
        "cpu",
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("tokens/s") && stderr.contains("--max-new-tokens"),
        "{stderr}"
    );
}

#[test]
fn perplexity_counts_every_predicted_token() {
    let dir = TempDir::new("perplexity");
    let model = hf_model(&dir);
    let text_path = dir.0.join("text.txt");
    let text = "the winter in the north is longer than the summer and there is snow ".repeat(3);
    std::fs::write(&text_path, &text).unwrap();
    let tokenizer = Tokenizer::from_json(tokenizer_json().as_bytes())
        .unwrap()
        .with_special_ids(Some(1), Some(2))
        .unwrap();
    let n = tokenizer.encode(&text, true).unwrap().len();
    assert!(n > MAX_POSITIONS, "the text should need several windows");

    for (context, arg) in [(16, Some("16")), (7, Some("7")), (MAX_POSITIONS, None)] {
        let mut args = vec![
            "perplexity",
            "--model",
            path_str(&model),
            "--file",
            path_str(&text_path),
            "--json",
        ];
        args.extend(arg.map(|a| ["--context", a]).into_iter().flatten());
        let result = bitnet_json(&args);
        assert_eq!(result.as_object().unwrap().len(), 3, "{result}");
        assert_eq!(result["context"], context);
        // Each window's first token has nothing to be predicted from.
        let windows = n.div_ceil(context);
        assert_eq!(result["tokens"], n - windows, "{result}");
        let perplexity = result["perplexity"].as_f64().unwrap();
        assert!(perplexity.is_finite() && perplexity > 1.0, "{result}");
    }
    // The GPU scores the tokens itself (only the likelihoods come back); the CPU agrees.
    let on = |device: &str| {
        bitnet_json(&[
            "perplexity",
            "--model",
            path_str(&model),
            "--file",
            path_str(&text_path),
            "--context",
            "16",
            "--device",
            device,
            "--json",
        ])["perplexity"]
            .as_f64()
            .unwrap()
    };
    let (gpu, cpu) = (on("gpu"), on("cpu"));
    assert!((gpu - cpu).abs() <= 1e-3 * cpu, "gpu {gpu}, cpu {cpu}");
}

#[test]
fn errors_name_the_problem() {
    let dir = TempDir::new("errors");
    let model = gguf_model(&dir);
    let failure = |args: &[&str]| {
        let output = bitnet(args);
        assert!(!output.status.success(), "bitnet {args:?} succeeded");
        assert!(output.stdout.is_empty(), "{args:?}");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };

    let absent = dir.0.join("absent-model");
    let stderr = failure(&["generate", "--model", path_str(&absent), "--prompt", "x"]);
    assert!(stderr.contains("absent-model"), "{stderr}");

    let no_adapter = |device: &str| {
        Command::new(env!("CARGO_BIN_EXE_bitnet"))
            .args(["generate", "--model", path_str(&model), "--prompt", "x"])
            .args(["--max-new-tokens", "1", "--json", "--device", device])
            .env("WGPU_ADAPTER_NAME", "no adapter has this name")
            .output()
            .unwrap()
    };
    let output = no_adapter("gpu");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--device gpu") && stderr.contains("WGPU_ADAPTER_NAME"),
        "{stderr}"
    );
    // auto falls back to the CPU and says why.
    let output = no_adapter("auto");
    assert!(output.status.success());
    let json: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["adapter"], "cpu");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("running on the CPU"),
        "{output:?}"
    );

    let bytes = std::fs::read(&model).unwrap();
    let truncated = dir.0.join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let stderr = failure(&["generate", "--model", path_str(&truncated), "--prompt", "x"]);
    assert!(stderr.contains("truncated.gguf"), "{stderr}");

    let text = dir.0.join("short.txt");
    std::fs::write(&text, "he").unwrap();
    let stderr = failure(&[
        "perplexity",
        "--model",
        path_str(&model),
        "--file",
        path_str(&text),
        "--context",
        "1000",
    ]);
    assert!(stderr.contains("--context 1000"), "{stderr}");
    let stderr = failure(&[
        "perplexity",
        "--model",
        path_str(&model),
        "--file",
        path_str(&dir.0.join("no-such.txt")),
    ]);
    assert!(stderr.contains("no-such.txt"), "{stderr}");
    let stderr = failure(&["generate", "--prompt", "x", "--model"]);
    assert!(stderr.contains("--model"), "{stderr}");
    let stderr = failure(&[
        "generate",
        "--model",
        path_str(&model),
        "--prompt",
        "x",
        "--top-p",
        "0",
    ]);
    assert!(stderr.contains("top_p"), "{stderr}");

    // Finite weights whose products overflow: the logits turn NaN, on either engine.
    let mut overflowing = random_model(64, Some(1), Some(2), 7);
    overflowing.norm.fill(3e38);
    let path = dir.0.join("overflowing");
    save_dir(&overflowing, &path, &[]).unwrap();
    std::fs::write(path.join("tokenizer.json"), tokenizer_json()).unwrap();
    let long_text = dir.0.join("long.txt");
    std::fs::write(&long_text, "the winter in the north is long ").unwrap();
    for device in ["cpu", "gpu"] {
        let stderr = failure(&[
            "perplexity",
            "--model",
            path_str(&path),
            "--file",
            path_str(&long_text),
            "--device",
            device,
            "--json",
        ]);
        assert!(stderr.contains("NaN"), "{device}: {stderr}");
        let stderr = failure(&[
            "generate",
            "--model",
            path_str(&path),
            "--prompt",
            "the",
            "--temperature",
            "0",
            "--device",
            device,
            "--json",
        ]);
        assert!(stderr.contains("NaN"), "{device}: {stderr}");
    }
}

/// The prompt ids each tokenizer rule gives, written down from the rule itself (transformers'
/// post-processor, llama.cpp's add_bos_token), and the greedy ids and perplexity windows that
/// follow from them, on both engines.
#[test]
fn prompts_get_exactly_the_special_tokens_of_the_models_tokenizer() {
    let dir = TempDir::new("bos");
    let hf = |name: &str, json: String| {
        let path = dir.0.join(name);
        save_dir(&random_model(64, Some(1), Some(2), 7), &path, &[]).unwrap();
        std::fs::write(path.join("tokenizer.json"), json).unwrap();
        path
    };
    let gguf = |name: &str, pre: &str, add_bos: Option<bool>| {
        let path = dir.0.join(name);
        let tokenizer = GgufTokenizer {
            pre: Some(pre.into()),
            add_bos,
            ..gguf_tokenizer()
        };
        let bytes = write_model(
            &random_model(259, Some(258), None, 11),
            Some(&tokenizer),
            TableType::F32,
        );
        std::fs::write(&path, bytes.unwrap()).unwrap();
        path
    };
    // The character BPE has no pre-tokenizer: "the winter " is the, ' ', w, in, t, er, ' '.
    let winter: &[u32] = &[31, 3, 26, 33, 23, 32];
    let winter_text = "the winter ".repeat(8);
    let winter_text_ids: Vec<u32> = [winter, &[3]].concat().repeat(8);
    // The byte-level vocabulary: "he" is one token, " the" is Ġt + he ("h e" merges before
    // "Ġ t"), " he" is Ġ (220 in the sorted byte alphabet) + he.
    let he_the: &[u32] = &[256, 257, 256];
    let he_the_text = format!("he the{}", " he the".repeat(7));
    let he_the_text_ids: Vec<u32> = [he_the, &[220, 256, 257, 256].repeat(7)].concat();
    let with_bos = |bos: u32, ids: &[u32]| [&[bos], ids].concat();
    let hf_plain = hf("plain", tokenizer_json());
    let hf_template = hf("template", tokenizer_json_adding_bos());
    let cases = [
        (
            "no post-processor",
            hf_plain,
            "the winter",
            winter.to_vec(),
            &winter_text,
            winter_text_ids.clone(),
        ),
        (
            "template post-processor",
            hf_template,
            "the winter",
            with_bos(1, winter),
            &winter_text,
            with_bos(1, &winter_text_ids),
        ),
        (
            "add_bos_token true",
            gguf("true.gguf", "gpt-2", Some(true)),
            "he the",
            with_bos(258, he_the),
            &he_the_text,
            with_bos(258, &he_the_text_ids),
        ),
        (
            "add_bos_token false",
            gguf("false.gguf", "llama-bpe", Some(false)),
            "he the",
            he_the.to_vec(),
            &he_the_text,
            he_the_text_ids.clone(),
        ),
        (
            "absent, llama-bpe",
            gguf("llama-bpe.gguf", "llama-bpe", None),
            "he the",
            with_bos(258, he_the),
            &he_the_text,
            with_bos(258, &he_the_text_ids),
        ),
        (
            "absent, gpt-2",
            gguf("gpt-2.gguf", "gpt-2", None),
            "he the",
            he_the.to_vec(),
            &he_the_text,
            he_the_text_ids.clone(),
        ),
    ];
    let text_path = dir.0.join("text.txt");
    for (rule, model, prompt, prompt_ids, text, text_ids) in &cases {
        let (weights, tokenizer) = load_model(model).unwrap();
        let mut engine = CpuEngine::new(&weights).unwrap();
        let vocab = engine.config().vocab_size;
        let mut logits = engine.forward(prompt_ids).unwrap();
        let mut greedy = Vec::new();
        for _ in 0..4 {
            // Ids past the tokenizer's vocabulary (padding) are never chosen.
            let row = &logits[logits.len() - vocab..];
            let id = argmax(&row[..tokenizer.vocab_size()]);
            greedy.push(id);
            logits = engine.forward(&[id]).unwrap();
        }
        std::fs::write(&text_path, text).unwrap();
        let mut perplexities = Vec::new();
        for device in ["cpu", "gpu"] {
            let generated = bitnet_json(&[
                "generate",
                "--model",
                path_str(model),
                "--prompt",
                prompt,
                "--max-new-tokens",
                "4",
                "--temperature",
                "0",
                "--device",
                device,
                "--json",
            ]);
            assert_eq!(
                &ids(&generated["prompt_ids"]),
                prompt_ids,
                "{rule}, {device}"
            );
            let generated = ids(&generated["generated_ids"]);
            assert_eq!(generated, greedy[..generated.len()], "{rule}, {device}");

            let scored = bitnet_json(&[
                "perplexity",
                "--model",
                path_str(model),
                "--file",
                path_str(&text_path),
                "--context",
                "16",
                "--device",
                device,
                "--json",
            ]);
            // Each window's first token is not scored.
            let windows = text_ids.len().div_ceil(16);
            assert_eq!(
                scored["tokens"],
                text_ids.len() - windows,
                "{rule}, {device}"
            );
            perplexities.push(scored["perplexity"].as_f64().unwrap());
        }
        // The CPU reference scores the written-down ids the same way.
        let mut nll = 0.0;
        for window in perplexity_windows(text_ids.len(), 16) {
            engine.reset();
            let logits = engine.forward(&text_ids[window.clone()]).unwrap();
            for (row, &target) in logits
                .chunks(vocab)
                .zip(&text_ids[window.start + 1..window.end])
            {
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
                let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
                nll += max + sum.ln() - row[target as usize] as f64;
            }
        }
        let expected = (nll / (text_ids.len() - text_ids.len().div_ceil(16)) as f64).exp();
        for perplexity in perplexities {
            assert!(
                (perplexity - expected).abs() <= 1e-3 * expected,
                "{rule}: {perplexity} vs {expected}"
            );
        }
    }
    // An empty prompt has a token to start from only where the tokenizer adds one.
    let empty = |model: &Path| bitnet(&["generate", "--model", path_str(model), "--prompt", ""]);
    let output = empty(&cases[0].1);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("empty") && stderr.contains("no bos"),
        "{stderr}"
    );
    let output = empty(&cases[1].1);
    assert!(output.status.success(), "{output:?}");
}

/// The largest logit's id, the lowest on ties.
fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// The same model as transformers' two offline layouts: the released 2B-4T's ("autobitlinear",
/// weight_scale a multiplier, what `save_dir` writes) and the older "bitlinear" (a divisor).
/// Same packed bytes, inverse scales: the same greedy ids and perplexity on both engines.
#[test]
fn both_offline_layouts_generate_alike() {
    use safetensors::SafeTensors;
    use safetensors::tensor::{Dtype, TensorView};

    let dir = TempDir::new("layouts");
    let released = hf_model(&dir);
    let config = std::fs::read_to_string(released.join("config.json")).unwrap();
    assert!(config.contains("\"autobitlinear\""), "{config}");
    let older = dir.0.join("older");
    std::fs::create_dir(&older).unwrap();
    std::fs::write(
        older.join("config.json"),
        config.replace("\"autobitlinear\"", "\"bitlinear\""),
    )
    .unwrap();
    std::fs::copy(
        released.join("tokenizer.json"),
        older.join("tokenizer.json"),
    )
    .unwrap();
    let bytes = std::fs::read(released.join("model.safetensors")).unwrap();
    let file = SafeTensors::deserialize(&bytes).unwrap();
    let mut inverted = Vec::new();
    for (name, view) in file.tensors() {
        let data = if name.ends_with("weight_scale") {
            let m = match view.dtype() {
                Dtype::F32 => f32::from_le_bytes(view.data().try_into().unwrap()),
                Dtype::BF16 => half::bf16::from_le_bytes(view.data().try_into().unwrap()).to_f32(),
                other => panic!("{name}: {other:?}"),
            };
            (Dtype::F32, (1.0 / m).to_le_bytes().to_vec())
        } else {
            (view.dtype(), view.data().to_vec())
        };
        inverted.push((name, view.shape().to_vec(), data));
    }
    let views: Vec<(String, TensorView<'_>)> = inverted
        .iter()
        .map(|(name, shape, (dtype, data))| {
            (
                name.clone(),
                TensorView::new(*dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), &older.join("model.safetensors"))
        .unwrap();

    let text_path = dir.0.join("text.txt");
    std::fs::write(
        &text_path,
        "the winter in the north is longer than the summer ".repeat(2),
    )
    .unwrap();
    let run = |model: &Path, device: &str| {
        let generated = bitnet_json(&[
            "generate",
            "--model",
            path_str(model),
            "--prompt",
            "the winter",
            "--max-new-tokens",
            "8",
            "--temperature",
            "0",
            "--device",
            device,
            "--json",
        ]);
        let scored = bitnet_json(&[
            "perplexity",
            "--model",
            path_str(model),
            "--file",
            path_str(&text_path),
            "--device",
            device,
            "--json",
        ]);
        (
            ids(&generated["generated_ids"]),
            scored["perplexity"].as_f64().unwrap(),
        )
    };
    let (ids_released, ppl_released) = run(&released, "cpu");
    assert!(!ids_released.is_empty());
    for device in ["cpu", "gpu"] {
        for model in [&released, &older] {
            let (ids, ppl) = run(model, device);
            assert_eq!(ids, ids_released, "{device} {model:?}");
            // 1 / (1 / m) is within an ulp of m: the scores agree to float rounding.
            assert!(
                (ppl - ppl_released).abs() <= 1e-4 * ppl_released,
                "{device} {model:?}: {ppl} vs {ppl_released}"
            );
        }
    }
}

/// [`gguf_tokenizer`]'s vocabulary as a tokenizer.json the way Llama 3 ships one: its
/// pre-tokenizer split, byte-level decoding, and a template that puts `<|begin|>` first.
fn byte_level_tokenizer_json() -> String {
    let g = gguf_tokenizer();
    let vocab: serde_json::Map<String, Value> = g.tokens[..258]
        .iter()
        .enumerate()
        .map(|(id, token)| (token.clone(), Value::from(id)))
        .collect();
    let bos = serde_json::json!({"SpecialToken": {"id": "<|begin|>", "type_id": 0}});
    let llama3_split = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 258, "content": "<|begin|>", "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": llama3_split}, "behavior": "Isolated",
             "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true,
             "use_regex": false}]},
        "post_processor": {"type": "TemplateProcessing",
            "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|begin|>": {"id": "<|begin|>", "ids": [258],
                "tokens": ["<|begin|>"]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true,
            "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": false,
            "byte_fallback": false, "ignore_merges": true, "vocab": vocab,
            "merges": g.merges}
    })
    .to_string()
}

/// `convert --format gguf` from a packed and from a full-precision folder: the file bitnet.cpp
/// would write (its token list padded to the vocabulary), and the same prompt ids and greedy
/// tokens as the folder it came from. Rows of 64 weights, which bitnet.cpp would misread, are
/// refused unless --any-row-length is given.
#[test]
fn convert_writes_gguf_that_generates_alike() {
    use safetensors::SafeTensors;
    use safetensors::tensor::{Dtype, TensorView};

    let dir = TempDir::new("to-gguf");
    // Three ids more than the tokenizer's 259 tokens.
    let mut weights = random_model(262, Some(258), None, 11);
    // Embeddings f16 holds exactly, so the GGUF's F16 table changes nothing.
    for v in &mut weights.embed_tokens {
        *v = half::f16::from_f32(*v).to_f32();
    }
    let packed = dir.0.join("packed");
    save_dir(&weights, &packed, &[]).unwrap();
    std::fs::write(packed.join("tokenizer.json"), byte_level_tokenizer_json()).unwrap();

    // The same model in full precision: every linear as codes / scale, quantized at load.
    let full = dir.0.join("full");
    std::fs::create_dir(&full).unwrap();
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(packed.join("config.json")).unwrap())
            .unwrap();
    config
        .as_object_mut()
        .unwrap()
        .remove("quantization_config");
    std::fs::write(full.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(packed.join("tokenizer.json"), full.join("tokenizer.json")).unwrap();
    let packed_bytes = std::fs::read(packed.join("model.safetensors")).unwrap();
    let packed_file = SafeTensors::deserialize(&packed_bytes).unwrap();
    let mut stored: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in packed_file.tensors() {
        if !name.ends_with("_proj.weight") && !name.ends_with("weight_scale") {
            stored.push((name, view.shape().to_vec(), view.data().to_vec()));
        }
    }
    for (l, layer) in weights.layers.iter().enumerate() {
        let names = ["q_proj", "k_proj", "v_proj", "o_proj"]
            .map(|n| format!("self_attn.{n}"))
            .into_iter()
            .chain(["gate_proj", "up_proj", "down_proj"].map(|n| format!("mlp.{n}")));
        for (name, w) in names.zip(layer.linears()) {
            let values: Vec<u8> = w
                .codes
                .iter()
                .flat_map(|&c| (c as f32 / w.scales[0]).to_le_bytes())
                .collect();
            stored.push((
                format!("model.layers.{l}.{name}.weight"),
                vec![w.rows, w.cols],
                values,
            ));
        }
    }
    let views: Vec<(String, TensorView<'_>)> = stored
        .iter()
        .map(|(name, shape, data)| {
            let dtype = if data.len() == shape.iter().product::<usize>() * 4 {
                Dtype::F32
            } else {
                panic!("{name}: not f32")
            };
            (
                name.clone(),
                TensorView::new(dtype, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), &full.join("model.safetensors")).unwrap();

    let generate = |model: &Path, device: &str| {
        let json = bitnet_json(&[
            "generate",
            "--model",
            path_str(model),
            "--prompt",
            "he met the 1234",
            "--max-new-tokens",
            "6",
            "--temperature",
            "0",
            "--device",
            device,
            "--json",
        ]);
        (ids(&json["prompt_ids"]), ids(&json["generated_ids"]))
    };
    // `convert --format gguf` of the packed folder into `output` with `extra` flags, refused: its
    // message.
    let refused = |output: &Path, extra: &[&str]| {
        let mut args = vec![
            "convert",
            "--format",
            "gguf",
            "--input",
            path_str(&packed),
            "--output",
            path_str(output),
        ];
        args.extend(extra);
        let run = bitnet(&args);
        assert!(!run.status.success(), "{args:?}");
        String::from_utf8_lossy(&run.stderr).into_owned()
    };
    let misread = dir.0.join("misread.gguf");
    let stderr = refused(&misread, &[]);
    for needle in [
        "blk.0.attn_q.weight",
        "64 weights",
        "multiples of 128",
        "--any-row-length",
    ] {
        assert!(stderr.contains(needle), "{needle}: {stderr}");
    }
    assert!(!misread.exists());

    for (name, folder) in [("packed", &packed), ("full", &full)] {
        let gguf = dir.0.join(format!("{name}.gguf"));
        let output = bitnet(&[
            "convert",
            "--format",
            "gguf",
            "--any-row-length",
            "--input",
            path_str(folder),
            "--output",
            path_str(&gguf),
        ]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{name}: {stderr}");
        assert!(
            stderr.contains("llama-bpe") && stderr.contains("add_bos_token true"),
            "{stderr}"
        );
        let file =
            bitnet_wgpu::formats::gguf::GgufFile::from_vec(std::fs::read(&gguf).unwrap()).unwrap();
        assert_eq!(
            file.get_str("general.architecture").unwrap(),
            Some("bitnet-b1.58")
        );
        assert_eq!(
            file.get_bool("tokenizer.ggml.add_bos_token").unwrap(),
            Some(true)
        );
        assert_eq!(
            file.get_str("tokenizer.ggml.pre").unwrap(),
            Some("llama-bpe")
        );
        let tokens = file
            .get_string_array("tokenizer.ggml.tokens")
            .unwrap()
            .unwrap();
        let types = file
            .get_i32_array("tokenizer.ggml.token_type")
            .unwrap()
            .unwrap();
        assert_eq!(tokens.len(), 262);
        assert_eq!(
            tokens[258..],
            ["<|begin|>", "[PAD259]", "[PAD260]", "[PAD261]"]
        );
        assert_eq!(types[257..], [1, 3, 5, 5, 5]);
        let embd = file.tensor("token_embd.weight").unwrap();
        assert_eq!(embd.ggml_type, bitnet_wgpu::formats::gguf::GGML_TYPE_F16);
        let q = file.tensor("blk.0.attn_q.weight").unwrap();
        assert_eq!(q.ggml_type, bitnet_wgpu::formats::gguf::GGML_TYPE_I2_S);
        // The weights come back exactly: codes, scales (stored as multipliers), tables.
        assert_eq!(load_model(&gguf).unwrap().0, load_model(folder).unwrap().0);

        let expected = generate(folder, "cpu");
        assert_eq!(expected.0[0], 258, "the template adds the bos");
        for device in ["cpu", "gpu"] {
            assert_eq!(generate(&gguf, device), expected, "{name} {device}");
        }
    }

    let stderr = refused(&dir.0.join("packed.gguf"), &["--any-row-length"]);
    assert!(stderr.contains("already exists"), "{stderr}");
    let stderr = refused(&dir.0.join("other.gguf"), &["--threshold", "0.7"]);
    assert!(stderr.contains("--threshold"), "{stderr}");
    let inside = packed.join("model.gguf");
    let stderr = refused(&inside, &["--any-row-length"]);
    assert!(stderr.contains("inside the input"), "{stderr}");
    assert!(!inside.exists());
}

/// A Llama-family checkpoint (Falcon3's layout: SiLU, no sub-norms, untied head, BitLinear's
/// divisor scales) generates the same ids on both engines, from its folder and from the GGUF
/// `convert` makes of it (architecture `llama`, q/k rows permuted as llama.cpp's converter
/// permutes them), and both name the family.
#[test]
fn the_llama_family_generates_alike_from_its_folder_and_its_gguf() {
    let dir = TempDir::new("llama");
    let mut weights = random_model(262, Some(258), None, 13);
    weights.config.family = Family::Llama;
    weights.config.tie_word_embeddings = false;
    for layer in &mut weights.layers {
        layer.attn_sub_norm.clear();
        layer.ffn_sub_norm.clear();
    }
    let rng = &mut SmallRng::seed_from_u64(14);
    weights.lm_head = Some(
        (0..262 * 64)
            .map(|_| half::f16::from_f32(rng.random_range(-1.0..1.0)).to_f32())
            .collect(),
    );
    for v in &mut weights.embed_tokens {
        *v = half::f16::from_f32(*v).to_f32();
    }
    let folder = dir.0.join("falcon");
    save_dir(&weights, &folder, &[]).unwrap();
    std::fs::write(folder.join("tokenizer.json"), byte_level_tokenizer_json()).unwrap();
    let gguf = dir.0.join("falcon.gguf");
    let output = bitnet(&[
        "convert",
        "--format",
        "gguf",
        "--any-row-length",
        "--input",
        path_str(&folder),
        "--output",
        path_str(&gguf),
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let file =
        bitnet_wgpu::formats::gguf::GgufFile::from_vec(std::fs::read(&gguf).unwrap()).unwrap();
    assert_eq!(file.get_str("general.architecture").unwrap(), Some("llama"));
    assert!(file.tensor("blk.0.attn_sub_norm.weight").is_none());
    assert_eq!(load_model(&gguf).unwrap().0, weights);

    let generate = |model: &Path, device: &str| {
        let json = bitnet_json(&[
            "generate",
            "--model",
            path_str(model),
            "--prompt",
            "he met the 1234",
            "--max-new-tokens",
            "8",
            "--temperature",
            "0",
            "--device",
            device,
            "--json",
        ]);
        let family = json["family"].as_str().unwrap().to_string();
        (
            family,
            ids(&json["prompt_ids"]),
            ids(&json["generated_ids"]),
        )
    };
    let expected = generate(&folder, "cpu");
    assert_eq!((expected.0.as_str(), expected.2.len()), ("llama-bitnet", 8));
    for (model, device) in [(&folder, "gpu"), (&gguf, "cpu"), (&gguf, "gpu")] {
        assert_eq!(generate(model, device), expected, "{model:?} {device}");
    }
    // The same weights as BitNet's decoder generate something else: the family matters.
    let mut bitnet_family = weights.clone();
    bitnet_family.config.family = Family::BitNet;
    bitnet_family.layers.iter_mut().for_each(|l| {
        l.attn_sub_norm = vec![1.0; 64];
        l.ffn_sub_norm = vec![1.0; 128];
    });
    let other = dir.0.join("other");
    save_dir(&bitnet_family, &other, &[]).unwrap();
    std::fs::write(other.join("tokenizer.json"), byte_level_tokenizer_json()).unwrap();
    let (family, _, ids) = generate(&other, "cpu");
    assert_eq!(family, "bitnet-b1.58");
    assert_ne!(ids, expected.2);
}

/// Without --model, the demo model built into the program runs: a prompt in English gets
/// its bos from the demo's tokenizer and a continuation, the same on both engines.
#[test]
fn the_built_in_demo_model_generates() {
    let args = [
        "generate",
        "--prompt",
        "It was a dark and stormy night",
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
        "--json",
    ];
    let cpu = bitnet_json(&[&args[..], &["--device", "cpu"]].concat());
    let prompt = ids(&cpu["prompt_ids"]);
    assert_eq!(
        prompt[0], 0,
        "the demo tokenizer's template adds <|begin_of_text|>"
    );
    assert_eq!(ids(&cpu["generated_ids"]).len(), 12, "{cpu}");
    assert!(!cpu["text"].as_str().unwrap().is_empty(), "{cpu}");
    let gpu = bitnet_json(&[&args[..], &["--device", "gpu"]].concat());
    assert_eq!(gpu["generated_ids"], cpu["generated_ids"]);
}

/// `--head int8` runs the CPU engine with its int8 screen of the lm_head, whose greedy tokens are
/// the exact head's (here on a prompt where the screen's own ids part from them within 40
/// tokens), greedy decoding on the CPU takes it by default, and it is refused on another device.
#[test]
fn the_int8_head_generates_on_the_cpu_only() {
    let args = [
        "generate",
        "--prompt",
        "Hello, my name is",
        "--max-new-tokens",
        "40",
        "--temperature",
        "0",
        "--device",
        "cpu",
        "--json",
    ];
    // Greedy decoding on the CPU engine takes the int8 head unless told otherwise.
    let default = bitnet_json(&args);
    let exact = bitnet_json(&[&args[..], &["--head", "exact"]].concat());
    let int8 = bitnet_json(&[&args[..], &["--head", "int8"]].concat());
    assert_eq!(int8["generated_ids"], exact["generated_ids"]);
    assert_eq!(default["generated_ids"], exact["generated_ids"]);
    let heads = [&default, &exact, &int8].map(|d| d["head"].as_str().unwrap().to_string());
    assert_eq!(heads, ["int8", "exact", "int8"]);
    // Sampling (here the default temperature) uses every logit: the exact head.
    let sampled = bitnet_json(&[&args[..5], &args[7..]].concat());
    assert_eq!(sampled["head"], "exact");
    let refused = bitnet(&["generate", "--prompt", "Hi", "--head", "int8"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("--device cpu"),
        "{stderr}"
    );
}

/// `bench --device cpu` times the CPU engine on a model file, each figure the mean of the runs
/// it reports, for both heads and both formats; options that do not apply are refused.
#[test]
fn the_cpu_engine_is_benched_on_a_model_file() {
    let dir = TempDir::new("bench");
    let (hf, gguf) = (hf_model(&dir), gguf_model(&dir));
    for (model, head) in [(&hf, "exact"), (&gguf, "exact"), (&gguf, "int8")] {
        let d = bitnet_json(&[
            "bench",
            "--device",
            "cpu",
            "--model",
            path_str(model),
            "--prompt-tokens",
            "7",
            "--decode-tokens",
            "3",
            "--repetitions",
            "2",
            "--head",
            head,
            "--json",
        ]);
        assert_eq!(
            (d["device"].as_str(), d["head"].as_str()),
            (Some("cpu"), Some(head))
        );
        assert_eq!(
            (d["prompt_tokens"].as_u64(), d["decode_tokens"].as_u64()),
            (Some(7), Some(3))
        );
        for figure in ["prompt", "decode"] {
            let runs: Vec<f64> = d[format!("{figure}_runs")]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_f64().unwrap())
                .collect();
            assert!(runs.len() == 2 && runs.iter().all(|&r| r > 0.0), "{d}");
            let mean = d[format!("{figure}_tokens_per_s")].as_f64().unwrap();
            assert!(
                (mean - (runs[0] + runs[1]) / 2.0).abs() <= 1e-9 * mean,
                "{d}"
            );
        }
        assert!(d["weight_bytes"].as_u64().unwrap() > 0, "{d}");
    }
    for (args, why) in [
        (&["--head", "int8"][..], "--device cpu"),
        (&["--device", "cpu", "--layers", "1"][..], "--layers"),
        (
            &["--device", "cpu", "--prompt-tokens", "100"][..],
            "positions",
        ),
        (
            &["--device", "cpu", "--repetitions", "0"][..],
            "repetitions",
        ),
    ] {
        let out = bitnet(&[&["bench", "--model", path_str(&gguf)], args].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(why),
            "{args:?}: {stderr}"
        );
    }
}

/// Runs `bitnet` under a 1 GiB address-space limit, so that an allocation sized by a lying
/// header aborts the process instead of passing unnoticed on a machine with memory to spare.
fn bitnet_limited(args: &[&str]) -> Output {
    Command::new("bash")
        .arg("-c")
        .arg("ulimit -v 1048576 && exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_bitnet"))
        .args(args)
        .output()
        .expect("bash runs")
}

/// `bitnet generate` of two greedy tokens after `prompt` on the CPU engine, under the limit of
/// [`bitnet_limited`].
fn generate_limited(model: &Path, prompt: &str) -> Output {
    bitnet_limited(&[
        "generate",
        "--model",
        path_str(model),
        "--prompt",
        prompt,
        "--max-new-tokens",
        "2",
        "--temperature",
        "0",
        "--device",
        "cpu",
    ])
}

/// A run on a mutated model either generates or fails with an error message: never a signal
/// (an abort on a failed allocation), never a panic (exit 101).
fn assert_runs_or_refuses(output: &Output, case: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    match output.status.code() {
        Some(0) => {}
        Some(1) => assert!(stderr.contains("error: "), "{case}: {stderr}"),
        code => panic!("{case}: exit {code:?} (signal or panic):\n{stderr}"),
    }
}

/// Numbers worth lying about: none, tiny, off by one either way, doubled, and far beyond any
/// file (10^9 layers once aborted the loader on a 1.6 GB list of tensor names).
fn lies(truth: u64) -> Vec<u64> {
    let mut values = vec![
        0,
        1,
        3,
        truth.saturating_sub(1),
        truth + 1,
        truth * 2,
        1_000_000_000,
        u64::from(u32::MAX),
    ];
    values.dedup();
    values
}

/// Every number of a valid checkpoint's config.json replaced by another, on the CPU engine
/// under a memory limit: each run generates or is refused with a message.
#[test]
fn lying_config_numbers_are_refused_or_run_never_abort() {
    let dir = TempDir::new("lying-config");
    let base = dir.0.join("base");
    save_dir(&random_model(40, Some(1), Some(2), 5), &base, &[]).unwrap();
    std::fs::write(base.join("tokenizer.json"), tokenizer_json()).unwrap();
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("config.json")).unwrap()).unwrap();
    let folder = dir.0.join("lying");
    std::fs::create_dir(&folder).unwrap();
    std::fs::copy(base.join("tokenizer.json"), folder.join("tokenizer.json")).unwrap();
    std::fs::copy(
        base.join("model.safetensors"),
        folder.join("model.safetensors"),
    )
    .unwrap();
    let generate = |model: &Path| generate_limited(model, "the cat");
    let integers = [
        ("vocab_size", 40),
        ("hidden_size", 64),
        ("intermediate_size", 128),
        ("num_hidden_layers", 2),
        ("num_attention_heads", 4),
        ("num_key_value_heads", 2),
        ("head_dim", 16),
        ("max_position_embeddings", MAX_POSITIONS as u64),
        ("bos_token_id", 1),
        ("eos_token_id", 2),
    ];
    let mut cases: Vec<(String, Value)> = Vec::new();
    for (field, truth) in integers {
        cases.extend(
            lies(truth)
                .into_iter()
                .map(|v| (field.to_string(), v.into())),
        );
        cases.push((field.to_string(), Value::from(-1)));
    }
    for field in ["rms_norm_eps", "rope_theta"] {
        for v in [0.0, -1.0, 1e-30, 1e30] {
            cases.push((field.to_string(), v.into()));
        }
    }
    let (mut ran, mut refused) = (0, 0);
    for (field, value) in &cases {
        let mut lying = config.clone();
        lying[field.as_str()] = value.clone();
        std::fs::write(folder.join("config.json"), lying.to_string()).unwrap();
        let output = generate(&folder);
        assert_runs_or_refuses(&output, &format!("config.json {field} = {value}"));
        if output.status.success() {
            ran += 1;
        } else {
            refused += 1;
        }
    }
    // Both outcomes occur (a bos id of 3 is a real token; 0 layers are refused), so the limit
    // did not make every run fail.
    assert!(ran > 0 && refused > 0, "ran {ran}, refused {refused}");

    let mut lying = config.clone();
    lying["num_hidden_layers"] = 1_000_000_000.into();
    std::fs::write(folder.join("config.json"), lying.to_string()).unwrap();
    let stderr = String::from_utf8_lossy(&generate(&folder).stderr).into_owned();
    assert!(
        stderr.contains("claims 1000000000 layers"),
        "the layer count is checked against the file: {stderr}"
    );
}

/// The same for a GGUF file's metadata numbers, each u32 or f32 value patched in place.
#[test]
fn lying_gguf_numbers_are_refused_or_run_never_abort() {
    let dir = TempDir::new("lying-gguf");
    let weights = random_model(259, Some(258), None, 6);
    let bytes = write_model(&weights, Some(&gguf_tokenizer()), TableType::F32).unwrap();
    let file = dir.0.join("lying.gguf");
    // Where a key's value lies: after its name, the u32 value type tag (4 bytes).
    let value_at = |key: &str| {
        let name = key.as_bytes();
        let at = bytes
            .windows(name.len())
            .position(|w| w == name)
            .unwrap_or_else(|| panic!("{key} is not in the file"));
        at + name.len() + 4
    };
    let arch = "bitnet-b1.58";
    let integers = [
        ("vocab_size", 259),
        ("context_length", MAX_POSITIONS as u64),
        ("embedding_length", 64),
        ("block_count", 2),
        ("feed_forward_length", 128),
        ("attention.head_count", 4),
        ("attention.head_count_kv", 2),
        ("attention.key_length", 16),
        ("rope.dimension_count", 16),
    ];
    let mut cases: Vec<(String, usize, [u8; 4])> = Vec::new();
    for (key, truth) in integers {
        let key = format!("{arch}.{key}");
        let at = value_at(&key);
        for v in lies(truth) {
            cases.push((format!("{key} = {v}"), at, (v as u32).to_le_bytes()));
        }
    }
    for key in ["attention.layer_norm_rms_epsilon", "rope.freq_base"] {
        let key = format!("{arch}.{key}");
        let at = value_at(&key);
        for v in [0.0f32, -1.0, f32::NAN, f32::INFINITY, 1e30] {
            cases.push((format!("{key} = {v}"), at, v.to_le_bytes()));
        }
    }
    for (case, at, value) in &cases {
        let mut lying = bytes.clone();
        lying[*at..at + 4].copy_from_slice(value);
        std::fs::write(&file, &lying).unwrap();
        assert_runs_or_refuses(&generate_limited(&file, "he met"), case);
    }
    let mut lying = bytes.clone();
    let at = value_at(&format!("{arch}.block_count"));
    lying[at..at + 4].copy_from_slice(&1_000_000_000u32.to_le_bytes());
    std::fs::write(&file, &lying).unwrap();
    let output = generate_limited(&file, "he met");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("claims 1000000000 layers"), "{stderr}");
}
