//! Llama-family BitNet models made and run by transformers itself (tests/fixtures/transformers,
//! written by scripts/transformers-fixtures.py): the offline packed BitLinear layout of
//! tiiuae's Falcon3-*-1.58bit and the full-precision AutoBitLinear "online" layout. The
//! reference forward, the CPU engine and the GPU engine must generate transformers' greedy ids
//! and give its last-position logits; the trainer must give its loss and straight-through
//! gradients. The GPU test needs an adapter (lavapipe will do) and fails loudly without one.
#![cfg(not(target_arch = "wasm32"))]

use std::path::PathBuf;

use bitnet_wgpu::gpu::{GpuContext, TableStorage};
use bitnet_wgpu::model::{
    CpuEngine, GpuModel, KvCache, LmHead, Logits, ModelFiles, ModelWeights, forward, load_model,
};
use bitnet_wgpu::train::{Quant, TrainModel};
use serde_json::Value;

const FIXTURES: [&str; 2] = ["llama-offline", "llama-online"];

/// Last-position logits: the largest |ours - transformers'| over the largest |transformers'|.
/// Float noise (float64 instead of float32, or every weight moved by a relative 1e-6) moves them
/// by at most 5.5e-6 of that scale for the fixtures' prompts (`last_logits_noise` in
/// expected.json; prompts where an int8 rounding tie flips were dropped); a wrong model moves
/// them by tenths ([`the_tolerance_catches_a_wrong_model`]).
const LOGITS_REL_TOL: f32 = 1e-3;
/// Gradients: per tensor, the largest difference over the tensor's largest magnitude.
const GRAD_REL_TOL: f32 = 2e-3;
/// The loss, relative.
const LOSS_REL_TOL: f64 = 1e-4;

fn dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/transformers")
        .join(name)
}

fn expected(name: &str) -> Value {
    let text = std::fs::read_to_string(dir(name).join("expected.json")).expect("expected.json");
    serde_json::from_str(&text).expect("expected.json parses")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("a list of ids")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("a list of numbers")
        .iter()
        .map(|x| x.as_f64().expect("a number") as f32)
        .collect()
}

struct Case {
    prompt: Vec<u32>,
    generated: Vec<u32>,
    logits: Vec<f32>,
}

fn cases(name: &str) -> Vec<Case> {
    let e = expected(name);
    let cases: Vec<Case> = e["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| Case {
            prompt: ids(&p["prompt"]),
            generated: ids(&p["generated"]),
            logits: floats(&p["last_logits"]),
        })
        .collect();
    assert!(cases.len() >= 3, "{name}: at least 3 prompts");
    cases
}

/// The first maximum, as torch.argmax.
fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

fn largest(v: &[f32]) -> f32 {
    v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
}

/// The largest |got - want| over the largest |want|.
fn rel_diff(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "lengths");
    let diff = got
        .iter()
        .zip(want)
        .fold(0.0f32, |m, (g, w)| m.max((g - w).abs()));
    diff / largest(want)
}

/// Greedy decoding through `step` (new tokens in, the last position's logits out, the cache
/// kept by `step`): the prompt's last logits and `n` generated ids.
fn greedy(
    mut step: impl FnMut(&[u32]) -> Vec<f32>,
    prompt: &[u32],
    n: usize,
    vocab: usize,
) -> (Vec<f32>, Vec<u32>) {
    let last = |row: Vec<f32>| row[row.len() - vocab..].to_vec();
    let first = last(step(prompt));
    let mut out = vec![argmax(&first)];
    while out.len() < n {
        let row = last(step(&[*out.last().unwrap()]));
        out.push(argmax(&row));
    }
    (first, out)
}

/// Runs every prompt of fixture `name` through `run` (a fresh sequence per prompt) and checks
/// the ids and logits against transformers'.
fn check_engine(
    name: &str,
    engine: &str,
    mut run: impl FnMut(&[u32], usize) -> (Vec<f32>, Vec<u32>),
) {
    for case in cases(name) {
        let (logits, generated) = run(&case.prompt, case.generated.len());
        let diff = rel_diff(&logits, &case.logits);
        eprintln!(
            "{name} {engine} prompt {:?}: logits rel diff {diff:.2e}, generated {generated:?}",
            case.prompt
        );
        assert_eq!(
            generated, case.generated,
            "{name} {engine} prompt {:?}: greedy ids",
            case.prompt
        );
        assert!(
            diff <= LOGITS_REL_TOL,
            "{name} {engine} prompt {:?}: last logits differ by {diff:.3e} of their scale \
             (tolerance {LOGITS_REL_TOL:e})",
            case.prompt
        );
    }
}

fn load(name: &str) -> ModelWeights {
    load_model(dir(name))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .0
}

fn reference(weights: &ModelWeights, prompt: &[u32], n: usize) -> (Vec<f32>, Vec<u32>) {
    let mut cache = KvCache::new(&weights.config);
    let vocab = weights.config.vocab_size;
    greedy(
        |t| forward(weights, t, &mut cache).expect("forward"),
        prompt,
        n,
        vocab,
    )
}

#[test]
fn reference_matches_transformers() {
    for name in FIXTURES {
        let weights = load(name);
        check_engine(name, "reference", |p, n| reference(&weights, p, n));
    }
}

#[test]
fn cpu_engine_matches_transformers() {
    for name in FIXTURES {
        let files = ModelFiles::read(dir(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (source, _) = files.open().unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut engine = CpuEngine::new(&*source).unwrap_or_else(|e| panic!("{name}: {e}"));
        let vocab = engine.config().vocab_size;
        check_engine(name, "cpu engine", |p, n| {
            engine.reset();
            greedy(
                |t| engine.forward_logits(t, Logits::Last).expect("forward"),
                p,
                n,
                vocab,
            )
        });
    }
}

/// The int8 screen of the lm_head (`LmHead::Int8`) keeps transformers' greedy ids, and the
/// largest logit is the exact engine's bit for bit (the others are the screen's approximations).
#[test]
fn cpu_engine_with_the_int8_head_keeps_the_greedy_ids() {
    for name in FIXTURES {
        let files = ModelFiles::read(dir(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (source, _) = files.open().unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut exact = CpuEngine::new(&*source).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut int8 =
            CpuEngine::with_head(&*source, LmHead::Int8).unwrap_or_else(|e| panic!("{name}: {e}"));
        let vocab = int8.config().vocab_size;
        for case in cases(name) {
            let run = |engine: &mut CpuEngine| {
                engine.reset();
                greedy(
                    |t| engine.forward_logits(t, Logits::Last).expect("forward"),
                    &case.prompt,
                    case.generated.len(),
                    vocab,
                )
            };
            let ((want, _), (got, generated)) = (run(&mut exact), run(&mut int8));
            assert_eq!(generated, case.generated, "{name} prompt {:?}", case.prompt);
            let top = argmax(&want) as usize;
            assert_eq!(argmax(&got) as usize, top);
            assert_eq!(got[top].to_bits(), want[top].to_bits());
        }
    }
}

#[test]
fn gpu_engine_matches_transformers() {
    let ctx = pollster::block_on(GpuContext::new())
        .unwrap_or_else(|e| panic!("GPU tests need an adapter (lavapipe in CI): {e}"));
    let info = ctx.adapter_info();
    eprintln!(
        "adapter: {} ({:?}, {:?})",
        info.name, info.backend, info.device_type
    );
    for name in FIXTURES {
        let files = ModelFiles::read(dir(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (source, _) = files.open().unwrap_or_else(|e| panic!("{name}: {e}"));
        let context = source.config().max_position_embeddings;
        let mut model = GpuModel::new(&ctx, &*source, context, TableStorage::F32)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let vocab = model.config().vocab_size;
        check_engine(name, "gpu engine", |p, n| {
            model.reset();
            greedy(
                |t| pollster::block_on(model.forward(&ctx, t, Logits::Last)).expect("forward"),
                p,
                n,
                vocab,
            )
        });
    }
}

/// The fixture's tensors, widened to f32, by name.
fn safetensors_f32(path: PathBuf) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    let mut out: Vec<(String, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = view.data();
            let values = match view.dtype() {
                safetensors::Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                safetensors::Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                other => panic!("{name}: {other:?}"),
            };
            (name, values)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The trainer's model of the online fixture with transformers' latent weights: every tensor
/// of model.safetensors (bf16, widened exactly) in its place.
fn latent_model(weights: &ModelWeights) -> TrainModel {
    let mut model = TrainModel::new(weights.config.clone(), Quant::BitNet, 1).expect("model");
    let stored = safetensors_f32(dir("llama-online").join("model.safetensors"));
    let names: Vec<String> = model.params.tensors().into_iter().map(|(n, _)| n).collect();
    let mut filled = 0;
    for (name, slot) in names.iter().zip(model.params.tensors_mut()) {
        if let Some((_, values)) = stored.iter().find(|(n, _)| n == name) {
            assert_eq!(slot.len(), values.len(), "{name}: length");
            slot.copy_from_slice(values);
            filled += 1;
        }
    }
    assert_eq!(
        filled,
        stored.len(),
        "every stored tensor has a place among the trainer's {names:?}"
    );
    model
}

fn check_gradients(model: &TrainModel, what: &str) {
    let e = expected("llama-online");
    let g = &e["gradients"];
    let tokens = ids(&g["input_ids"]);
    let want_loss = g["loss"].as_f64().expect("loss");
    let want = safetensors_f32(dir("llama-online").join("gradients.safetensors"));

    let (loss, grads) = model.loss_and_gradients(&[&tokens]).expect("gradients");
    eprintln!("{what}: loss {loss} (transformers {want_loss})");
    assert!(
        (loss - want_loss).abs() <= LOSS_REL_TOL * want_loss.abs(),
        "{what}: loss {loss} vs transformers' {want_loss}"
    );
    let ours = grads.tensors();
    for (name, want) in &want {
        let (_, got) = ours
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{what}: the trainer has no {name}"));
        let diff = rel_diff(got, want);
        eprintln!(
            "{what} {name}: rel diff {diff:.2e} (scale {:.3e})",
            largest(want)
        );
        assert!(
            diff <= GRAD_REL_TOL,
            "{what} {name}: gradients differ by {diff:.3e} of their scale (tolerance \
             {GRAD_REL_TOL:e})"
        );
    }
}

/// transformers' online AutoBitLinear loss and straight-through gradients, from the latent
/// weights; and from the loaded (quantized) checkpoint through `TrainModel::from_weights`,
/// whose latent matrices re-quantize to the same codes, so its gradients are the same.
#[test]
fn gradients_match_transformers() {
    let weights = load("llama-online");
    check_gradients(&latent_model(&weights), "latent weights");
    let from_weights = TrainModel::from_weights(&weights, Quant::BitNet).expect("from_weights");
    check_gradients(&from_weights, "from_weights");
}

/// The tolerance has teeth: models a little wrong (the final norm's weights taken as ones, RoPE
/// at the usual theta instead of config.json's) fail it by far.
#[test]
fn the_tolerance_catches_a_wrong_model() {
    for name in FIXTURES {
        let good = load(name);
        let case = cases(name)
            .into_iter()
            .max_by_key(|c| c.prompt.len())
            .unwrap();
        let mut wrongs: Vec<(&str, ModelWeights)> = Vec::new();
        let mut w = good.clone();
        w.norm.iter_mut().for_each(|v| *v = 1.0);
        wrongs.push(("final norm weights as ones", w));
        let mut w = good.clone();
        w.config.rope_theta = 10_000.0;
        wrongs.push(("rope_theta 10000", w));
        for (what, wrong) in wrongs {
            let (logits, _) = reference(&wrong, &case.prompt, 1);
            let diff = rel_diff(&logits, &case.logits);
            eprintln!("{name} {what}: logits rel diff {diff:.2e}");
            assert!(
                diff > 10.0 * LOGITS_REL_TOL,
                "{name} {what}: only {diff:.3e} off: the tolerance would not catch it"
            );
        }
    }
}
