//! The browser side of the demo: what the page's Web Worker calls (see `www/worker.js`). A
//! [`Demo`] holds one loaded model; every method returns a promise and never blocks the worker.
//! Nothing here runs natively: the library itself is what native code uses.
#![cfg(target_arch = "wasm32")]

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use bitnet_wgpu::model::{
    Device, Engine, GenerationParams, Generator, SamplingParams, Stop, load_model_from_bytes,
};
use js_sys::{Array, Function, Promise, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

/// One model in the browser: load it from file bytes, then generate, stop, or ask what runs it.
#[wasm_bindgen]
pub struct Demo {
    /// The loaded model; taken out while a generation runs.
    generator: Rc<RefCell<Option<Generator>>>,
    busy: Rc<Cell<bool>>,
    cancel: Rc<Cell<bool>>,
}

impl Default for Demo {
    fn default() -> Self {
        Demo::new()
    }
}

#[wasm_bindgen]
impl Demo {
    #[wasm_bindgen(constructor)]
    pub fn new() -> Demo {
        Demo {
            generator: Rc::new(RefCell::new(None)),
            busy: Rc::new(Cell::new(false)),
            cancel: Rc::new(Cell::new(false)),
        }
    }

    /// Loads a model from `files`, an array of `[name, Uint8Array]` pairs (one GGUF file, or a
    /// Hugging Face folder's config.json, safetensors and tokenizer.json), on `device` ("auto",
    /// "gpu" or "cpu"). Resolves to the model's description (JSON text, see [`describe`]); the
    /// model loaded before stays in use when this fails.
    pub fn load(&self, files: Array, device: String) -> Promise {
        let slot = self.generator.clone();
        let busy = self.busy.clone();
        future_to_promise(async move {
            if busy.get() {
                return Err(message("a generation is running; stop it first".into()));
            }
            let device = match device.as_str() {
                "auto" => Device::Auto,
                "gpu" => Device::Gpu,
                "cpu" => Device::Cpu,
                other => return Err(message(format!("unknown device {other:?}"))),
            };
            let owned: Vec<(String, Vec<u8>)> = files
                .iter()
                .map(|pair| {
                    let pair = Array::from(&pair);
                    let name = pair.get(0).as_string().unwrap_or_default();
                    (name, Uint8Array::new(&pair.get(1)).to_vec())
                })
                .collect();
            let named: Vec<(&str, &[u8])> = owned
                .iter()
                .map(|(name, bytes)| (name.as_str(), bytes.as_slice()))
                .collect();
            let (weights, tokenizer) = load_model_from_bytes(&named).map_err(error)?;
            drop(named);
            drop(owned);
            let (engine, fallback) = Engine::new(device, weights).await.map_err(error)?;
            let generator = Generator::new(engine, tokenizer);
            let description = describe(&generator, fallback.map(|e| e.to_string()));
            *slot.borrow_mut() = Some(generator);
            Ok(JsValue::from_str(&description))
        })
    }

    /// Generates from `prompt`, calling `on_text(piece)` as text arrives. Resolves to JSON text:
    /// `prompt_ids`, `generated_ids`, `text`, `prompt_tokens_per_s`, `tokens_per_s`,
    /// `first_token_ms` and `stop`.
    #[allow(clippy::too_many_arguments)]
    pub fn generate(
        &self,
        prompt: String,
        max_new_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        seed: u32,
        on_text: Function,
    ) -> Promise {
        let slot = self.generator.clone();
        let busy = self.busy.clone();
        let cancel = self.cancel.clone();
        future_to_promise(async move {
            if busy.get() {
                return Err(message("a generation is already running".into()));
            }
            let mut generator = slot
                .borrow_mut()
                .take()
                .ok_or_else(|| message("no model is loaded".into()))?;
            busy.set(true);
            cancel.set(false);
            let params = GenerationParams {
                max_new_tokens,
                sampling: SamplingParams {
                    temperature,
                    top_k,
                    top_p,
                    seed: seed.into(),
                },
            };
            let generation = generator
                .generate(&prompt, &params, |piece| {
                    let _ = on_text.call1(&JsValue::NULL, &JsValue::from_str(piece));
                    !cancel.get()
                })
                .await;
            *slot.borrow_mut() = Some(generator);
            busy.set(false);
            let generation = generation.map_err(error)?;
            let json = serde_json::json!({
                "prompt_ids": generation.prompt_ids,
                "generated_ids": generation.generated_ids,
                "text": generation.text,
                "prompt_tokens_per_s": generation.prompt_tokens_per_s(),
                "tokens_per_s": generation.tokens_per_s(),
                "first_token_ms": generation.prompt_time.as_secs_f64() * 1e3,
                "stop": match generation.stop {
                    Stop::EndOfSequence => "end of sequence",
                    Stop::MaxNewTokens => "max new tokens",
                    Stop::ContextFull => "context full",
                    Stop::Cancelled => "stopped",
                },
            });
            Ok(JsValue::from_str(&json.to_string()))
        })
    }

    /// Asks the running generation to stop after its current token.
    pub fn stop(&self) {
        self.cancel.set(true);
    }
}

/// What the page shows about a loaded model: JSON text with `adapter`, `backend`, `features`
/// (what the shaders use), `gpu_bytes` (weights and KV cache, 0 on the CPU), `fallback` (why
/// the CPU runs it, when it does), `vocab_size`, `layers`, `hidden_size` and `context`.
fn describe(generator: &Generator, fallback: Option<String>) -> String {
    let engine = generator.engine();
    let config = engine.config();
    let (backend, features, gpu_bytes) = match engine {
        Engine::Gpu(gpu) => {
            let (ctx, model) = &**gpu;
            let caps = ctx.capabilities();
            let mut features = Vec::new();
            if caps.subgroups {
                features.push(format!("subgroups ({})", caps.subgroup_size.1));
            }
            if caps.dot4 {
                features.push("dot4I8Packed".to_string());
            }
            if caps.shader_f16 {
                features.push("shader-f16".to_string());
            }
            features.push(format!(
                "{} MiB per storage binding",
                caps.max_storage_binding >> 20
            ));
            (
                format!("{:?}", ctx.adapter_info().backend),
                features,
                model.weight_and_cache_bytes(),
            )
        }
        Engine::Cpu(_) => ("CPU (wasm)".to_string(), Vec::new(), 0),
    };
    serde_json::json!({
        "adapter": engine.adapter(),
        "backend": backend,
        "features": features,
        "gpu_bytes": gpu_bytes,
        "fallback": fallback,
        "vocab_size": config.vocab_size,
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "context": config.max_position_embeddings,
    })
    .to_string()
}

fn error(e: bitnet_wgpu::Error) -> JsValue {
    message(e.to_string())
}

fn message(text: String) -> JsValue {
    js_sys::Error::new(&text).into()
}
