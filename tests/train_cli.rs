//! `bitnet train` run as a user runs it: a tiny model learns a repetitive text, resumes bit for
//! bit after Ctrl-C, fine-tunes checkpoints, exports folders that `bitnet generate` loads, and
//! refuses bad input without writing anything.
#![cfg(not(target_arch = "wasm32"))]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use bitnet_wgpu::formats::hf::save_dir;
use bitnet_wgpu::model::{Family, load_model};
use bitnet_wgpu::train::run::tiny_config;
use bitnet_wgpu::train::{Quant, TrainModel};

const TEXT: &str = "the quick brown fox jumps over the lazy dog. ";

fn bitnet() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bitnet"))
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("bitnet-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, name: &str, bytes: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn run(args: &[&str]) -> Output {
    bitnet().args(args).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(args: &[&str]) -> Output {
    let o = run(args);
    assert!(o.status.success(), "bitnet {args:?} failed: {}", stderr(&o));
    o
}

/// `(step, loss, lr, eval_loss)` of each row of a run's loss.csv.
fn losses(out: &Path) -> Vec<(usize, f64, f32, Option<f64>)> {
    let text = std::fs::read_to_string(out.join("loss.csv")).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("step,loss,lr,tokens_per_s,eval_loss"));
    lines
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let eval = (!f[4].is_empty()).then(|| f[4].parse().unwrap());
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
                eval,
            )
        })
        .collect()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn tiny_model_learns_a_repetitive_text_and_its_exports_generate() {
    let dir = scratch("learn");
    let data = write(&dir, "data.txt", TEXT.repeat(120));
    let eval = write(&dir, "eval.txt", TEXT.repeat(8));
    let out = dir.join("run");
    let args = [
        "train",
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--config",
        "tiny",
        "--steps",
        "60",
        "--batch",
        "4",
        "--context",
        "32",
        "--lr",
        "3e-3",
        "--warmup",
        "5",
        "--eval-file",
        s(&eval),
        "--eval-every",
        "20",
        "--save-every",
        "20",
        "--device",
        "cpu",
    ];
    let started = Instant::now();
    let o = ok(&args);
    eprintln!(
        "60 steps in {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        stderr(&o)
    );
    let rows = losses(&out);
    assert_eq!(rows.len(), 60);
    assert_eq!(
        rows.iter().map(|r| r.0).collect::<Vec<_>>(),
        (1..=60).collect::<Vec<_>>()
    );
    // A fresh model predicts uniformly over 258 tokens; the text is periodic, so the loss falls
    // far below that.
    let first = rows[0].1;
    assert!((first - 258f64.ln()).abs() < 0.1, "{first}");
    let last: f64 = rows[55..].iter().map(|r| r.1).sum::<f64>() / 5.0;
    assert!(last < 0.4 * first, "first {first}, last {last}");
    let evals: Vec<f64> = rows.iter().filter_map(|r| r.3).collect();
    assert_eq!(evals.len(), 3);
    assert!(evals[2] < evals[0], "{evals:?}");
    for f in [
        "loss.png",
        "checkpoint/state.safetensors",
        "model/config.json",
        "model/model.safetensors",
        "master/config.json",
        "master/model.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let master = std::fs::read_to_string(out.join("master/config.json")).unwrap();
    assert!(
        master.contains("\"online\"") && master.contains("autobitlinear"),
        "{master}"
    );

    // The eval loss is the perplexity command's on the exported model (same tokenization, same
    // windows, the same forward under BitNet).
    let model = out.join("model");
    let p = ok(&[
        "perplexity",
        "--model",
        s(&model),
        "--file",
        s(&eval),
        "--context",
        "32",
        "--device",
        "cpu",
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_slice(&p.stdout).unwrap();
    let ppl = json["perplexity"].as_f64().unwrap();
    assert!(
        (ppl.ln() - evals[2]).abs() < 1e-4 * evals[2].max(1.0),
        "{ppl} vs {}",
        evals[2]
    );

    // Both exports generate; greedy continuation of the text follows the pattern.
    for folder in ["model", "master"] {
        let g = ok(&[
            "generate",
            "--model",
            s(&out.join(folder)),
            "--prompt",
            "the quick brown",
            "--temperature",
            "0",
            "--max-new-tokens",
            "12",
            "--device",
            "cpu",
        ]);
        let text = String::from_utf8_lossy(&g.stdout);
        eprintln!("{folder}: {text:?}");
        assert!(!text.trim().is_empty());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn resume_after_ctrl_c_equals_an_uninterrupted_run() {
    let dir = scratch("resume");
    let data = write(&dir, "data.txt", TEXT.repeat(60));
    let common = |out: &Path| -> Vec<String> {
        [
            "train",
            "--data",
            s(&data),
            "--out",
            s(out),
            "--steps",
            "40",
            "--batch",
            "2",
            "--context",
            "32",
            "--save-every",
            "3",
            "--warmup",
            "4",
            "--schedule",
            "cosine",
            "--seed",
            "5",
            "--device",
            "cpu",
            "--config",
            "tiny",
        ]
        .map(String::from)
        .to_vec()
    };
    let whole = dir.join("whole");
    let args = common(&whole);
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());

    // Interrupt a second run once its first save is on disk, then resume it.
    let cut = dir.join("cut");
    let child = bitnet()
        .args(common(&cut))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !cut.join("loss.csv").exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(stderr(&o).contains("--resume"), "{}", stderr(&o));
    let stopped = losses(&cut).len();
    assert!(stopped < 40, "the run was not interrupted");
    let mut resume = common(&cut);
    resume.push("--resume".into());
    let o = ok(&resume.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(stderr(&o).contains("resuming at step"), "{}", stderr(&o));

    let strip = |rows: Vec<(usize, f64, f32, Option<f64>)>| -> Vec<(usize, u64, u32)> {
        rows.into_iter()
            .map(|r| (r.0, r.1.to_bits(), r.2.to_bits()))
            .collect()
    };
    assert_eq!(strip(losses(&cut)), strip(losses(&whole)));
    for f in [
        "checkpoint/state.safetensors",
        "model/model.safetensors",
        "master/model.safetensors",
    ] {
        let (a, b) = (
            std::fs::read(whole.join(f)).unwrap(),
            std::fs::read(cut.join(f)).unwrap(),
        );
        assert!(a == b, "{f} differs (interrupted after {stopped} steps)");
    }
    // Resuming a finished run, or resuming with other settings, is refused or a no-op.
    let mut other = common(&cut);
    let seed = other.iter().position(|a| a == "5").unwrap();
    other[seed] = "6".into();
    other.push("--resume".into());
    let o = run(&other.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--seed: 5 then, 6 now"),
        "{}",
        stderr(&o)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// For BitNet and for the Llama family (a Falcon3/Falcon-E layout folder), which comes back out
/// in its own layout.
#[test]
fn fine_tunes_a_checkpoint_folder_and_its_own_master() {
    for family in [Family::BitNet, Family::Llama] {
        fine_tunes_a_checkpoint_folder_of(family);
    }
}

fn fine_tunes_a_checkpoint_folder_of(family: Family) {
    let dir = scratch(&format!("finetune-{family:?}"));
    let data = write(&dir, "data.txt", TEXT.repeat(40));
    let mut config = tiny_config(258);
    config.family = family;
    config.bos_token_id = Some(256);
    config.eos_token_id = Some(257);
    config.tie_word_embeddings = false;
    let base = TrainModel::new(config.clone(), Quant::BitNet, 9).unwrap();
    let packed = dir.join("packed");
    save_dir(&base.to_weights().unwrap(), &packed, &[]).unwrap();

    let out = dir.join("ft");
    let o = ok(&[
        "train",
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--model",
        s(&packed),
        "--steps",
        "6",
        "--batch",
        "2",
        "--context",
        "32",
        "--warmup",
        "0",
        "--lr",
        "1e-2",
        "--device",
        "cpu",
    ]);
    let rows = losses(&out);
    assert_eq!(rows.len(), 6);
    assert!(rows[0].1 > 0.0 && rows[0].1 < 10.0, "{}", stderr(&o));
    let (weights, _) = load_model(&packed).unwrap();
    let (tuned, _) = load_model(out.join("model")).unwrap();
    assert_eq!(tuned.config, weights.config);
    assert!(tuned.lm_head.is_some());
    let exported = std::fs::read_to_string(out.join("model/config.json")).unwrap();
    assert!(exported.contains(family.hf_architecture()), "{exported}");

    // The run's master/ (full precision) fine-tunes from its latent weights as they are.
    let again = dir.join("again");
    let o = ok(&[
        "train",
        "--data",
        s(&data),
        "--out",
        s(&again),
        "--model",
        s(&out.join("master")),
        "--steps",
        "2",
        "--batch",
        "2",
        "--context",
        "32",
        "--device",
        "cpu",
    ]);
    assert!(
        stderr(&o).contains("full-precision weights"),
        "{}",
        stderr(&o)
    );
    ok(&[
        "generate",
        "--model",
        s(&again.join("model")),
        "--prompt",
        "the",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
    ]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_bpe_tokenizer_is_trained_and_saved_with_the_model() {
    let dir = scratch("bpe");
    let data = write(&dir, "data.txt", TEXT.repeat(50));
    let out = dir.join("run");
    let o = ok(&[
        "train",
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--vocab-size",
        "300",
        "--steps",
        "3",
        "--batch",
        "2",
        "--context",
        "16",
        "--device",
        "cpu",
    ]);
    assert!(
        stderr(&o).contains("training a byte-level BPE"),
        "{}",
        stderr(&o)
    );
    for folder in ["model", "master", "checkpoint"] {
        assert!(
            out.join(folder).join("tokenizer.json").is_file(),
            "{folder}"
        );
    }
    let (weights, tokenizer) = load_model(out.join("model")).unwrap();
    assert_eq!(weights.config.vocab_size, 300);
    let ids = tokenizer.encode("the lazy dog", true).unwrap();
    assert_eq!(Some(ids[0]), tokenizer.bos());
    assert!(ids.len() < 8, "{ids:?}");
    ok(&[
        "generate",
        "--model",
        s(&out.join("model")),
        "--prompt",
        "the lazy",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
    ]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bad_input_is_a_clear_error_and_writes_nothing() {
    let dir = scratch("bad");
    let data = write(&dir, "data.txt", TEXT.repeat(20));
    let empty = write(&dir, "empty.txt", "");
    let binary = write(&dir, "binary.txt", [0x66, 0x6f, 0xff, 0xfe, 0x00]);
    let short = write(&dir, "short.txt", "tiny");
    let big_config = write(
        &dir,
        "config.json",
        r#"{"model_type": "bitnet", "vocab_size": 258, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 2, "max_position_embeddings": 64}"#,
    );
    let out = dir.join("out");
    let base = |data: &Path| -> Vec<String> {
        [
            "train",
            "--data",
            s(data),
            "--out",
            s(&out),
            "--steps",
            "2",
            "--batch",
            "2",
            "--context",
            "32",
            "--device",
            "cpu",
        ]
        .map(String::from)
        .to_vec()
    };
    // `args` with each of `more`'s flags set (a value after a flag replaces the one there).
    let with = |mut args: Vec<String>, more: &[&str]| {
        let mut i = 0;
        while i < more.len() {
            let value = more.get(i + 1).filter(|v| !v.starts_with("--"));
            match (args.iter().position(|a| a == more[i]), value) {
                (Some(at), Some(v)) => args[at + 1] = v.to_string(),
                (Some(_), None) => {}
                (None, _) => args.extend(
                    std::iter::once(more[i])
                        .chain(value.copied())
                        .map(String::from),
                ),
            }
            i += 1 + usize::from(value.is_some());
        }
        args
    };
    let context_300 = with(base(&data), &["--context", "300"]);
    // 1bitLLM's family has no Hugging Face layout the run could export.
    let mut onebit = tiny_config(258);
    onebit.family = Family::OneBitLlm;
    let onebit_gguf = write(
        &dir,
        "onebit.gguf",
        bitnet_wgpu::formats::gguf::write_model(
            &TrainModel::new(onebit, Quant::BitNet, 1)
                .unwrap()
                .to_weights()
                .unwrap(),
            None,
            bitnet_wgpu::formats::gguf::TableType::F32,
        )
        .unwrap(),
    );
    let cases: Vec<(Vec<String>, &str)> = vec![
        (base(&empty), "holds no text"),
        (base(&binary), "not UTF-8"),
        (base(&dir.join("missing.txt")), "missing.txt"),
        (base(&short), "shorter than one window of 32 tokens"),
        (context_300, "longer than the model's 256 positions"),
        (
            with(base(&data), &["--device", "gpu", "--quant", "none"]),
            "train on the CPU",
        ),
        (with(base(&data), &["--resume"]), "no checkpoint to resume"),
        (with(base(&data), &["--vocab-size", "10"]), "at least 258"),
        (
            with(base(&data), &["--model", s(&dir)]),
            "neither model.safetensors",
        ),
        (
            with(base(&data), &["--model", s(&onebit_gguf)]),
            "could not be exported: invalid config.json: 1bitLLM",
        ),
    ];
    for (args, message) in cases {
        let o = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(stderr(&o).contains(message), "{args:?}: {}", stderr(&o));
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
    // An --out below a file cannot be written.
    let o = run(&[
        "train",
        "--data",
        s(&data),
        "--out",
        s(&data.join("run")),
        "--steps",
        "1",
        "--context",
        "16",
        "--device",
        "cpu",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("cannot be written"), "{}", stderr(&o));

    // A finished run is not overwritten, nor resumed as another model.
    let args = base(&data);
    ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let state = std::fs::read(out.join("checkpoint/state.safetensors")).unwrap();
    let o = run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        stderr(&o).contains("holds another run; pass --resume"),
        "{}",
        stderr(&o)
    );
    let other = with(base(&data), &["--config", s(&big_config), "--resume"]);
    let o = run(&other.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(
        stderr(&o).contains("trains another model"),
        "{}",
        stderr(&o)
    );
    let o = run(&with(base(&data), &["--quant", "none", "--resume"])
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert!(stderr(&o).contains("--quant bitnet"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(out.join("checkpoint/state.safetensors")).unwrap(),
        state
    );

    // A loss that blows up stops the run at that step; the last save stays.
    let nan = dir.join("nan");
    let o = run(&[
        "train",
        "--data",
        s(&data),
        "--out",
        s(&nan),
        "--steps",
        "50",
        "--batch",
        "2",
        "--context",
        "32",
        "--quant",
        "none",
        "--optimizer",
        "sgd",
        "--lr",
        "1e30",
        "--grad-clip",
        "0",
        "--warmup",
        "0",
        "--save-every",
        "1",
        "--schedule",
        "constant",
        "--device",
        "cpu",
    ]);
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("failed") && err.contains("step "), "{err}");
    assert!(
        err.contains("last good checkpoint") || err.contains("no checkpoint"),
        "{err}"
    );
    if err.contains("last good checkpoint") {
        assert!(nan.join("checkpoint/state.safetensors").is_file());
        assert!(nan.join("master/model.safetensors").is_file());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The demo model (BitNet) and a tiny Llama-family one (SiLU, no sub-norms).
#[test]
fn the_gpu_fine_tunes_as_the_cpu_does() {
    let dir = scratch("gpu");
    let data = write(&dir, "data.txt", TEXT.repeat(40));
    let mut models = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo")];
    let mut llama = tiny_config(258);
    llama.family = Family::Llama;
    let llama = TrainModel::new(llama, Quant::BitNet, 9).unwrap();
    models.push(dir.join("llama"));
    save_dir(&llama.to_weights().unwrap(), &models[1], &[]).unwrap();
    for model in &models {
        let train = |device: &str| {
            let out = dir.join(format!("{}-{device}", model.file_name().unwrap().display()));
            let o = ok(&[
                "train",
                "--data",
                s(&data),
                "--out",
                s(&out),
                "--model",
                s(model),
                "--steps",
                "3",
                "--batch",
                "2",
                "--context",
                "16",
                "--lr",
                "1e-3",
                "--device",
                device,
            ]);
            (out, stderr(&o))
        };
        let (gpu, log) = train("gpu");
        assert!(!log.contains("engine: cpu"), "{log}");
        let (cpu, log) = train("cpu");
        assert!(log.contains("engine: cpu"), "{log}");
        let (on_gpu, on_cpu) = (losses(&gpu), losses(&cpu));
        assert_eq!(on_gpu.len(), 3);
        // The same windows through the same forward: the first loss agrees to the f32 rounding
        // of each token's loss; the later ones to the float differences of the updates.
        assert!(
            (on_gpu[0].1 - on_cpu[0].1).abs() < 1e-5 * on_cpu[0].1,
            "{model:?}: {on_gpu:?} {on_cpu:?}"
        );
        for (g, c) in on_gpu.iter().zip(&on_cpu) {
            assert!(
                (g.1 - c.1).abs() < 1e-3 * c.1,
                "{model:?}: {on_gpu:?} {on_cpu:?}"
            );
        }
        let (trained, _) = load_model(gpu.join("model")).unwrap();
        let (base, _) = load_model(model).unwrap();
        assert_eq!(trained.config.family, base.config.family);
        let g = ok(&[
            "generate",
            "--model",
            s(&gpu.join("model")),
            "--prompt",
            "the quick",
            "--max-new-tokens",
            "5",
            "--device",
            "cpu",
        ]);
        assert!(!String::from_utf8_lossy(&g.stdout).trim().is_empty());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sigkill_at_any_moment_leaves_complete_files_and_resumes_bit_for_bit() {
    let dir = scratch("kill");
    let data = write(&dir, "data.txt", TEXT.repeat(60));
    let args = |out: &Path| -> Vec<String> {
        [
            "train",
            "--data",
            s(&data),
            "--out",
            s(out),
            "--steps",
            "30",
            "--batch",
            "2",
            "--context",
            "32",
            "--save-every",
            "1",
            "--seed",
            "3",
            "--device",
            "cpu",
            "--config",
            "tiny",
        ]
        .map(String::from)
        .to_vec()
    };
    let whole = dir.join("whole");
    ok(&args(&whole).iter().map(String::as_str).collect::<Vec<_>>());
    let files = [
        "checkpoint/state.safetensors",
        "model/model.safetensors",
        "master/model.safetensors",
    ];

    // Killed a little after a save, at a different moment each time: mid-step, mid-save or
    // between the two.
    for (trial, delay_ms) in [0u64, 7, 23, 61, 150].into_iter().enumerate() {
        let out = dir.join(format!("killed-{trial}"));
        let mut child = bitnet()
            .args(args(&out))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(300);
        while !out.join("loss.csv").exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        // Whatever was on disk is whole: every export loads, loss.csv parses.
        let saved = losses(&out).len();
        for folder in ["model", "master"] {
            load_model(out.join(folder)).unwrap_or_else(|e| panic!("trial {trial}: {folder}: {e}"));
        }
        let mut resume = args(&out);
        resume.push("--resume".into());
        ok(&resume.iter().map(String::as_str).collect::<Vec<_>>());
        for f in files {
            let (a, b) = (
                std::fs::read(whole.join(f)).unwrap(),
                std::fs::read(out.join(f)).unwrap(),
            );
            assert!(
                a == b,
                "trial {trial} (killed after {saved} saved steps): {f} differs"
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn with_no_model_named_train_fine_tunes_the_built_in_demo_model() {
    let dir = scratch("demo");
    let data = write(&dir, "data.txt", TEXT.repeat(20));
    let out = dir.join("run");
    let o = ok(&[
        "train",
        "--data",
        s(&data),
        "--out",
        s(&out),
        "--steps",
        "2",
        "--batch",
        "1",
        "--context",
        "16",
        "--warmup",
        "0",
        "--lr",
        "1e-2",
        "--device",
        "cpu",
    ]);
    assert!(stderr(&o).contains("(vocab 4096)"), "{}", stderr(&o));
    let (tuned, _) = load_model(out.join("model")).unwrap();
    let (demo, _) = load_model(Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo")).unwrap();
    assert_eq!(tuned.config, demo.config);
    let changed = tuned.layers.iter().zip(&demo.layers).any(|(a, b)| {
        a.linears()
            .iter()
            .zip(b.linears())
            .any(|(x, y)| x.codes != y.codes || x.scales != y.scales)
    });
    assert!(changed, "two steps changed nothing");
    assert!(out.join("model/tokenizer.json").is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}
