//! The browser side of the demo: what the page's Web Worker calls (see `www/worker.js`). A
//! [`Demo`] holds one loaded model; it generates, chats in the model's template (rendered by the
//! library's [`Conversation`], as `bitnet chat` renders it), fine-tunes in the tab and exports
//! the result.
//! Every method that computes returns a promise and never blocks the worker. Nothing here runs
//! natively: the library itself is what native code uses.
#![cfg(target_arch = "wasm32")]

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use bitnet_wgpu::Error;
use bitnet_wgpu::chat::Conversation;
use bitnet_wgpu::formats::hf::{config_json, to_safetensors_bytes};
use bitnet_wgpu::model::{
    Device, Engine, Generation, GenerationParams, Generator, ModelWeights, SamplingParams, Stop,
    collect, open_model_from_bytes,
};
use bitnet_wgpu::train::data::{Batches, tokenize};
use bitnet_wgpu::train::{
    AdamW, GpuTrainer, Optimizer, Quant, Schedule, StepReport, TrainModel, Trainer,
};
use js_sys::{Array, Function, Promise, Uint8Array};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

/// One model in the browser: load it from file bytes, then generate, stop, or ask what runs it.
#[wasm_bindgen]
pub struct Demo {
    /// The loaded model; taken out while a generation or a fine-tune runs.
    generator: Rc<RefCell<Option<Generator>>>,
    /// The loaded model's weights on the host, kept for fine-tuning, export and a restart after a
    /// lost GPU device when the model is small enough to train in a tab ([`MAX_TUNE_PARAMETERS`]).
    weights: Rc<RefCell<Option<ModelWeights>>>,
    /// The device the model was loaded for, which the tuned model runs on too.
    device: Rc<Cell<Device>>,
    /// The conversation of chat mode, when one was started for the loaded model; taken out
    /// while it answers.
    chat: Rc<RefCell<Option<Conversation>>>,
    busy: Rc<Cell<bool>>,
    cancel: Rc<Cell<bool>>,
}

/// Fine-tuning keeps four f32 copies of every parameter (weights, gradients, two moments): at
/// this size 1 GiB, well within a tab's wasm32 memory and a browser GPU's.
const MAX_TUNE_PARAMETERS: usize = 64 << 20;

/// Why chat mode cannot start with the loaded model.
const NO_TEMPLATE: &str = "this model has no chat template (no chat_template in \
    tokenizer_config.json, no chat_template.jinja, no tokenizer.chat_template in its GGUF file), \
    so it cannot chat: open a chat model's files with them; Generate continues plain text with \
    this one";

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
            weights: Rc::new(RefCell::new(None)),
            device: Rc::new(Cell::new(Device::Auto)),
            chat: Rc::new(RefCell::new(None)),
            busy: Rc::new(Cell::new(false)),
            cancel: Rc::new(Cell::new(false)),
        }
    }

    /// Loads a model from `files`, an array of `[name, Uint8Array]` pairs (one GGUF file, or a
    /// Hugging Face folder's config.json, safetensors and tokenizer.json, with the files of its
    /// chat template when it has one: tokenizer_config.json or chat_template.jinja), on `device`
    /// ("auto", "gpu" or "cpu"). Resolves to the model's description (JSON text, see
    /// [`describe`]); the model loaded before stays in use when this fails.
    pub fn load(&self, files: Array, device: String) -> Promise {
        let slot = self.generator.clone();
        let weights_slot = self.weights.clone();
        let device_slot = self.device.clone();
        let chat_slot = self.chat.clone();
        let busy = self.busy.clone();
        future_to_promise(async move {
            if busy.get() {
                return Err(message("a generation is running; stop it first".into()));
            }
            let device: Device = device.parse().map_err(error)?;
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
            // The files stay packed; the engine unpacks them a layer at a time. Only a model
            // small enough to fine-tune is kept whole, for training and recovery.
            let (source, tokenizer) = open_model_from_bytes(&named).map_err(error)?;
            let kept = if source
                .config()
                .parameter_count()
                .is_some_and(|n| n <= MAX_TUNE_PARAMETERS)
            {
                Some(collect(&*source).map_err(error)?)
            } else {
                None
            };
            let (engine, fallback) = Engine::new(device, &*source).await.map_err(error)?;
            drop(source);
            drop(named);
            drop(owned);
            let generator = Generator::new(engine, tokenizer);
            let description = describe(&generator, fallback.map(|e| e.to_string()));
            *slot.borrow_mut() = Some(generator);
            *weights_slot.borrow_mut() = kept;
            // A conversation belongs to the model whose template wrote it.
            *chat_slot.borrow_mut() = None;
            device_slot.set(device);
            Ok(JsValue::from_str(&description.to_string()))
        })
    }

    /// Generates from `prompt`, calling `on_text(piece)` as text arrives. Resolves to JSON text
    /// ([`generation_json`]): `prompt_ids`, `prefilled`, `generated_ids`, `text`,
    /// `prompt_tokens_per_s`, `tokens_per_s`, `first_token_ms` and `stop`. When the GPU device
    /// was lost, the model (if small enough to be kept, [`MAX_TUNE_PARAMETERS`]) starts again on
    /// a new device and the generation runs again: then `recovered_from` names the loss and
    /// `model` describes the new engine.
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
        let weights = self.weights.clone();
        let device = self.device.get();
        let busy = self.busy.clone();
        let cancel = self.cancel.clone();
        let params = generation_params(max_new_tokens, temperature, top_k, top_p, seed);
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
            let on_piece = streamer(&on_text, &cancel);
            let (generation, recovered) =
                recovering(&mut generator, &weights, device, async |generator| {
                    generator.generate(&prompt, &params, &on_piece).await
                })
                .await;
            let json = generation.map(|g| generation_json(&g, recovered, &generator));
            *slot.borrow_mut() = Some(generator);
            busy.set(false);
            Ok(JsValue::from_str(&json.map_err(error)?.to_string()))
        })
    }

    /// Starts a conversation in the loaded model's chat template, with `system` as its system
    /// message when given, replacing the conversation before (starting again is how the page
    /// resets a chat). The engine's cache starts empty too, as after `bitnet chat`'s /reset.
    ///
    /// Errors: no model loaded, a generation running, and a model without a chat template.
    pub fn chat_start(&self, system: Option<String>) -> Result<(), JsValue> {
        if self.busy.get() {
            return Err(message("a generation is running; stop it first".into()));
        }
        let mut generator = self.generator.borrow_mut();
        let generator = generator
            .as_mut()
            .ok_or_else(|| message("no model is loaded".into()))?;
        let template = generator.tokenizer().chat_template().cloned();
        let template = template.ok_or_else(|| message(NO_TEMPLATE.into()))?;
        generator.engine_mut().reset();
        *self.chat.borrow_mut() = Some(Conversation::new(template, system));
        Ok(())
    }

    /// Sends `user`, the user's message, in the conversation [`Demo::chat_start`] began and
    /// generates the answer in the model's template, calling `on_text(piece)` as text arrives
    /// and stopping at the template's end of turn: `bitnet chat`'s turn
    /// ([`Conversation::reply`]). The earlier turns stay in the engine's cache, so only the new
    /// one is processed (`prefilled`).
    /// Resolves to JSON text as [`Demo::generate`]'s, with `messages` (the conversation so far,
    /// each `role` and `content`). A lost GPU device is recovered from as there.
    ///
    /// Errors, after which the conversation is as before: no conversation started, the
    /// template's (a role it refuses), a conversation that fills the model's context (start
    /// again), and the generator's.
    #[allow(clippy::too_many_arguments)]
    pub fn chat_send(
        &self,
        user: String,
        max_new_tokens: usize,
        temperature: f32,
        top_k: usize,
        top_p: f32,
        seed: u32,
        on_text: Function,
    ) -> Promise {
        let slot = self.generator.clone();
        let chat_slot = self.chat.clone();
        let weights = self.weights.clone();
        let device = self.device.get();
        let busy = self.busy.clone();
        let cancel = self.cancel.clone();
        let params = generation_params(max_new_tokens, temperature, top_k, top_p, seed);
        future_to_promise(async move {
            if busy.get() {
                return Err(message("a generation is already running".into()));
            }
            let mut generator = slot
                .borrow_mut()
                .take()
                .ok_or_else(|| message("no model is loaded".into()))?;
            let Some(mut conversation) = chat_slot.borrow_mut().take() else {
                *slot.borrow_mut() = Some(generator);
                return Err(message(
                    "no conversation: start one (chat mode) before sending".into(),
                ));
            };
            busy.set(true);
            cancel.set(false);
            let on_piece = streamer(&on_text, &cancel);
            let (generation, recovered) =
                recovering(&mut generator, &weights, device, async |generator| {
                    conversation
                        .reply(generator, &user, &params, &on_piece)
                        .await
                })
                .await;
            let json = generation.map(|g| {
                let mut json = generation_json(&g, recovered, &generator);
                json["messages"] = serde_json::json!(conversation.messages());
                json
            });
            *slot.borrow_mut() = Some(generator);
            *chat_slot.borrow_mut() = Some(conversation);
            busy.set(false);
            Ok(JsValue::from_str(&json.map_err(error)?.to_string()))
        })
    }

    /// Destroys the loaded model's GPU device, as a driver reset or a removed GPU would lose
    /// it: the page's way to show (and test) that it recovers. Nothing happens on the CPU path.
    pub fn lose_device(&self) {
        if let Some(generator) = self.generator.borrow().as_ref()
            && let Engine::Gpu(gpu) = generator.engine()
        {
            gpu.0.device.destroy();
        }
    }

    /// Asks the running generation to stop after its current token, or the running fine-tune
    /// after its current step.
    pub fn stop(&self) {
        self.cancel.set(true);
    }

    /// Fine-tunes the loaded model on `text` in the tab: `steps` AdamW steps (betas 0.9 and
    /// 0.95, no weight decay, gradient norm clipped to 1) at the constant rate `lr`, each on
    /// `batch` windows of `context` tokens taken in order from the text (what `bitnet train
    /// --no-shuffle` takes from a file holding it), on the GPU with the backward shaders (on the CPU path where the model runs on
    /// the CPU). Calls `on_step(step, loss, tokens_per_s)` after each step; [`Demo::stop`] ends
    /// the run after its current step, keeping what it learned. The tuned model then replaces
    /// the loaded one. Resolves to JSON text: `steps`, `losses`, `tokens_per_s`, `engine`, and
    /// the model's new description (as [`Demo::load`]'s) in `model`. On error the loaded model
    /// stays as it was.
    #[allow(clippy::too_many_arguments)]
    pub fn finetune(
        &self,
        text: String,
        steps: usize,
        lr: f32,
        context: usize,
        batch: usize,
        on_step: Function,
    ) -> Promise {
        let slot = self.generator.clone();
        let weights_slot = self.weights.clone();
        let device = self.device.get();
        let busy = self.busy.clone();
        let cancel = self.cancel.clone();
        future_to_promise(async move {
            if busy.get() {
                return Err(message("the model is busy; stop it first".into()));
            }
            let weights = weights_slot.borrow().clone().ok_or_else(|| {
                message(format!(
                    "no model to fine-tune: load one of at most {}M parameters",
                    MAX_TUNE_PARAMETERS >> 20
                ))
            })?;
            let generator = slot
                .borrow_mut()
                .take()
                .ok_or_else(|| message("no model is loaded".into()))?;
            busy.set(true);
            cancel.set(false);
            let request = TuneRequest {
                text: &text,
                steps,
                lr,
                context,
                batch,
            };
            let tuned = tune(&generator, &weights, &request, &on_step, &cancel).await;
            let result = match tuned {
                Ok((tuned, mut summary)) => {
                    let tokenizer = generator.tokenizer().clone();
                    // The old model's GPU memory is released before the tuned one's is taken.
                    drop(generator);
                    match Engine::new(device, &tuned).await {
                        Ok((engine, fallback)) => {
                            let generator = Generator::new(engine, tokenizer);
                            summary["model"] =
                                describe(&generator, fallback.map(|e| e.to_string()));
                            *slot.borrow_mut() = Some(generator);
                            *weights_slot.borrow_mut() = Some(tuned);
                            Ok(JsValue::from_str(&summary.to_string()))
                        }
                        Err(e) => Err(message(format!(
                            "the tuned model did not start ({e}); load a model again"
                        ))),
                    }
                }
                Err(e) => {
                    *slot.borrow_mut() = Some(generator);
                    Err(error(e))
                }
            };
            busy.set(false);
            result
        })
    }

    /// The loaded model as the files of a Hugging Face folder that `bitnet generate --model DIR`
    /// and transformers load: an array of `[name, Uint8Array]` pairs (config.json,
    /// model.safetensors with the packed ternary weights, and tokenizer.json unless the model
    /// uses the byte-level fallback).
    pub fn export(&self) -> Result<Array, JsValue> {
        let weights = self.weights.borrow();
        let weights = weights.as_ref().ok_or_else(|| {
            message(format!(
                "only models of at most {}M parameters are kept for export",
                MAX_TUNE_PARAMETERS >> 20
            ))
        })?;
        let generator = self.generator.borrow();
        let generator = generator
            .as_ref()
            .ok_or_else(|| message("the model is busy; try again when it is done".into()))?;
        let mut files = vec![
            (
                "config.json",
                config_json(&weights.config).map_err(error)?.into_bytes(),
            ),
            (
                "model.safetensors",
                to_safetensors_bytes(weights, &[]).map_err(error)?,
            ),
        ];
        if let Some(json) = generator.tokenizer().to_json().map_err(error)? {
            files.push(("tokenizer.json", json.into_bytes()));
        }
        Ok(files
            .into_iter()
            .map(|(name, bytes)| {
                Array::of2(
                    &JsValue::from_str(name),
                    &Uint8Array::from(bytes.as_slice()),
                )
            })
            .collect())
    }
}

/// The parameters of one generation, as the page's controls give them.
fn generation_params(
    max_new_tokens: usize,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    seed: u32,
) -> GenerationParams {
    GenerationParams {
        max_new_tokens,
        sampling: SamplingParams {
            temperature,
            top_k,
            top_p,
            seed: seed.into(),
        },
    }
}

/// The generator's text callback: each piece goes to the page's `on_text`; [`Demo::stop`]
/// ends the generation after its current token.
fn streamer<'a>(on_text: &'a Function, cancel: &'a Cell<bool>) -> impl Fn(&str) -> bool + 'a {
    move |piece| {
        let _ = on_text.call1(&JsValue::NULL, &JsValue::from_str(piece));
        !cancel.get()
    }
}

/// A GPU device lost during a generation, and the engine that took its place.
struct Recovered {
    /// Why the device was lost.
    reason: String,
    /// Why the CPU runs the new engine, when it does.
    fallback: Option<String>,
}

/// Runs `run` on `generator`. A lost GPU device takes the model's buffers with it: then the
/// kept weights (when the model is small enough to keep, [`MAX_TUNE_PARAMETERS`]) start on a new
/// device, which replaces `generator`'s engine, and `run` runs again, once.
async fn recovering(
    generator: &mut Generator,
    weights: &RefCell<Option<ModelWeights>>,
    device: Device,
    mut run: impl AsyncFnMut(&mut Generator) -> bitnet_wgpu::Result<Generation>,
) -> (bitnet_wgpu::Result<Generation>, Option<Recovered>) {
    let generation = run(generator).await;
    let Err(Error::DeviceLost(reason)) = &generation else {
        return (generation, None);
    };
    let Some(kept) = weights.borrow().clone() else {
        return (generation, None);
    };
    match Engine::new(device, &kept).await {
        Ok((engine, fallback)) => {
            let recovered = Recovered {
                reason: reason.clone(),
                fallback: fallback.map(|e| e.to_string()),
            };
            *generator = Generator::new(engine, generator.tokenizer().clone());
            (run(generator).await, Some(recovered))
        }
        Err(e) => (Err(e), None),
    }
}

/// What the page shows of a generation: `prompt_ids`, `prefilled` (how many of them were
/// processed; the others came from the cache of the turn before), `generated_ids`, `text`,
/// `prompt_tokens_per_s`, `tokens_per_s`, `first_token_ms`, `stop`, and after a lost device
/// `recovered_from` (why) and `model` (the new engine's description).
fn generation_json(
    generation: &Generation,
    recovered: Option<Recovered>,
    generator: &Generator,
) -> serde_json::Value {
    serde_json::json!({
        "prompt_ids": generation.prompt_ids,
        "prefilled": generation.prefilled,
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
        "model": recovered.as_ref().map(|r| describe(generator, r.fallback.clone())),
        "recovered_from": recovered.map(|r| r.reason),
    })
}

/// What [`Demo::finetune`] was asked.
struct TuneRequest<'a> {
    text: &'a str,
    steps: usize,
    lr: f32,
    context: usize,
    batch: usize,
}

/// Trains a copy of `weights` as `request` says, on the GPU of `generator`'s engine when it has
/// one, and returns the tuned weights with a summary.
async fn tune(
    generator: &Generator,
    weights: &ModelWeights,
    request: &TuneRequest<'_>,
    on_step: &Function,
    cancel: &Cell<bool>,
) -> bitnet_wgpu::Result<(ModelWeights, serde_json::Value)> {
    let invalid = |why: String| Error::Invalid {
        what: "fine-tuning",
        why,
    };
    if request.steps == 0 || request.batch == 0 {
        return Err(invalid("steps and batch must be at least 1".into()));
    }
    if !(request.lr.is_finite() && request.lr > 0.0) {
        return Err(invalid(format!(
            "learning rate {} is not positive",
            request.lr
        )));
    }
    // The windows `bitnet train --no-shuffle` takes from a file holding this text.
    let ids = tokenize(&[request.text.to_string()], generator.tokenizer())?;
    let context = request.context.min(weights.config.max_position_embeddings);
    let mut batches = Batches::new(ids.len(), context, false, 0)?;
    let model = TrainModel::from_weights(weights, Quant::BitNet)?;
    let adam = Optimizer::AdamW(AdamW::new(0.9, 0.95, 1e-8, 0.0));
    let mut trainer = Trainer::new(model, adam, request.lr, Schedule::Constant { warmup: 0 });
    trainer.max_grad_norm = Some(1.0);
    let mut gpu = match generator.engine() {
        Engine::Gpu(g) => Some((&g.0, GpuTrainer::new(&g.0, &trainer, context)?)),
        Engine::Cpu(_) => None,
    };
    let (mut losses, mut speeds) = (Vec::new(), Vec::new());
    for step in 0..request.steps {
        if cancel.get() {
            break;
        }
        let ranges = batches.next_batch(request.batch);
        let batch: Vec<&[u32]> = ranges.iter().map(|r| &ids[r.clone()]).collect();
        let started = js_sys::Date::now();
        let report: StepReport = match &mut gpu {
            Some((ctx, g)) => g.step(ctx, &mut trainer, &batch).await?,
            None => trainer.step(&batch)?,
        };
        let seconds = ((js_sys::Date::now() - started) / 1e3).max(1e-3);
        let tokens: usize = batch.iter().map(|w| w.len()).sum();
        let speed = tokens as f64 / seconds;
        losses.push(report.loss);
        speeds.push(speed);
        let _ = on_step.call3(
            &JsValue::NULL,
            &JsValue::from(step + 1),
            &JsValue::from(report.loss),
            &JsValue::from(speed),
        );
    }
    if let Some((ctx, g)) = &gpu {
        g.read_into(ctx, &mut trainer).await?;
    }
    let engine = match gpu {
        Some((ctx, _)) => ctx.adapter_name(),
        None => "cpu".to_string(),
    };
    let tuned = trainer.model.to_weights()?;
    let summary = serde_json::json!({
        "steps": losses.len(),
        "losses": losses,
        "tokens_per_s": speeds.iter().sum::<f64>() / speeds.len().max(1) as f64,
        "engine": engine,
    });
    Ok((tuned, summary))
}

/// What the page shows about a loaded model: `adapter`, `backend`, `features` (what the
/// shaders use), `gpu_bytes` (weights and KV cache, 0 on the CPU), `fallback` (why the CPU runs
/// it, when it does), `vocab_size`, `layers`, `hidden_size`, `context`, and `chat` (whether it
/// has a chat template).
fn describe(generator: &Generator, fallback: Option<String>) -> serde_json::Value {
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
        "chat": generator.tokenizer().chat_template().is_some(),
    })
}

fn error(e: Error) -> JsValue {
    message(e.to_string())
}

fn message(text: String) -> JsValue {
    js_sys::Error::new(&text).into()
}
