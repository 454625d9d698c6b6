//! A whole training run, as `bitnet train` drives it: the model (a checkpoint to fine-tune or a
//! new one), the tokenizer, the data, the loop with evaluation, and the run's folder (loss.csv,
//! loss.png, checkpoint/, model/, master/), resumable bit for bit.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use rayon::prelude::*;

use super::bpe::train_bpe;
use super::checkpoint::{
    CheckpointMeta, STATE_FILE, TOKENIZER_FILE, create_dir, export_master, export_packed,
    load_checkpoint, load_latent, quant_name, save_checkpoint, write_atomic,
};
use super::data::{Batches, DataPosition, fingerprint, read_text, read_texts, tokenize};
use super::plot::plot_losses;
use super::{AdamW, Optimizer, Quant, Schedule, Sgd, StepReport, TrainModel, Trainer};
use crate::formats::hf;
use crate::model::{
    Device, ModelConfig, ModelWeights, load_model, load_model_from_bytes, perplexity_windows,
};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// The run folder's files.
pub const LOSS_CSV: &str = "loss.csv";
pub const LOSS_PNG: &str = "loss.png";
pub const CHECKPOINT_DIR: &str = "checkpoint";
pub const MODEL_DIR: &str = "model";
pub const MASTER_DIR: &str = "master";
/// loss.csv's header.
pub const CSV_HEADER: &str = "step,loss,lr,tokens_per_s,eval_loss";

/// Where the model comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelSource {
    /// Fine-tune a checkpoint that [`load_model`] loads (folder or GGUF file), with its
    /// tokenizer. A full-precision folder (such as a run's master/) gives its latent weights
    /// as they are; a packed one its ternary weights ([`TrainModel::from_weights`]).
    Checkpoint(PathBuf),
    /// Fine-tune a checkpoint held in memory as its files' names and bytes (what
    /// [`load_model_from_bytes`] loads; the demo model built into `bitnet`), with its tokenizer.
    Files(Vec<(String, Vec<u8>)>),
    /// A new model of [`tiny_config`]'s shape.
    Tiny,
    /// A new model shaped by a config.json file.
    ConfigFile(PathBuf),
}

/// The optimizer's kind; its hyper-parameters come from [`TrainOptions`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptimizerKind {
    /// torch's AdamW with betas (0.9, 0.95), eps 1e-8 and decoupled weight decay.
    AdamW,
    /// torch's SGD with momentum 0.9 and coupled weight decay.
    Sgd,
}

/// The learning-rate schedule's kind (warm-up and length come from [`TrainOptions`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScheduleKind {
    Constant,
    /// Down a half cosine to 0 at the last step.
    Cosine,
    /// Down linearly to 0 at the last step.
    Linear,
}

/// Everything a run is told. [`TrainOptions::new`] gives the defaults of `bitnet train`.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// UTF-8 text files, joined in this order.
    pub data: Vec<PathBuf>,
    /// The run's folder.
    pub out: PathBuf,
    pub model: ModelSource,
    /// Optimizer steps in the whole run (a resumed run continues up to this).
    pub steps: usize,
    /// Windows per micro-batch.
    pub batch: usize,
    /// Micro-batches per optimizer step (their gradients are averaged).
    pub accumulate: usize,
    /// Tokens per window.
    pub context: usize,
    pub lr: f32,
    pub schedule: ScheduleKind,
    pub warmup: usize,
    pub weight_decay: f32,
    pub optimizer: OptimizerKind,
    /// Clip the global gradient norm to this; 0 turns clipping off.
    pub grad_clip: f32,
    /// Seeds the new model's weights and the order of the windows.
    pub seed: u64,
    /// Draw windows in a seeded random order (else consecutive from the start).
    pub shuffle: bool,
    /// A UTF-8 text to measure eval loss and perplexity on, every `eval_every` steps and at the
    /// end, over the windows `bitnet perplexity --context CONTEXT` scores.
    pub eval_file: Option<PathBuf>,
    pub eval_every: usize,
    /// Score at most this many eval windows (the first ones); `None` for all.
    pub eval_windows: Option<usize>,
    /// Save the checkpoint, exports and loss files every this many steps (and at the end).
    pub save_every: usize,
    pub quant: Quant,
    /// For a new model: train a byte-level BPE of this many tokens on the data (else the
    /// byte-level fallback of 258 tokens).
    pub vocab_size: Option<usize>,
    /// Which processor trains: `Auto` takes a hardware GPU when one opens and can train the
    /// model ([`GpuTrainer::new`]'s conditions), else the multi-threaded CPU path (a software
    /// adapter counts as none); `Gpu` the [`GpuTrainer`] or an error; `Cpu` the CPU path.
    pub device: Device,
    /// Continue the run saved in `out`.
    pub resume: bool,
}

impl TrainOptions {
    /// `bitnet train`'s defaults: a tiny new model, 1000 steps of 8 windows of 128 tokens,
    /// AdamW at 1e-3 with weight decay 0.01 and a cosine schedule after 50 warm-up steps,
    /// clipping at 1, seed 0, shuffled, eval and save every 100 steps, BitNet quantization, CPU.
    pub fn new(data: Vec<PathBuf>, out: PathBuf) -> Self {
        TrainOptions {
            data,
            out,
            model: ModelSource::Tiny,
            steps: 1000,
            batch: 8,
            accumulate: 1,
            context: 128,
            lr: 1e-3,
            schedule: ScheduleKind::Cosine,
            warmup: 50,
            weight_decay: 0.01,
            optimizer: OptimizerKind::AdamW,
            grad_clip: 1.0,
            seed: 0,
            shuffle: true,
            eval_file: None,
            eval_every: 100,
            eval_windows: None,
            save_every: 100,
            quant: Quant::BitNet,
            vocab_size: None,
            device: Device::Auto,
            resume: false,
        }
    }
}

/// What a run reports as it goes.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Training is about to start (or continue from `start_step`).
    Started {
        /// "cpu" or the adapter's name.
        engine: String,
        parameters: usize,
        vocab_size: usize,
        tokens: usize,
        windows_per_pass: usize,
        start_step: usize,
        steps: usize,
    },
    /// A line worth showing (tokenizer training, what an export holds).
    Note(String),
    /// Step `step` (counted from 1) took its update; `loss` is the batch's loss before it.
    Step {
        step: usize,
        loss: f64,
        lr: f32,
        grad_norm: f32,
        tokens_per_s: f64,
    },
    /// The eval loss after step `step`.
    Eval {
        step: usize,
        loss: f64,
        perplexity: f64,
    },
    /// Everything was saved after step `step`.
    Saved { step: usize },
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSummary {
    /// Optimizer steps taken in all, resumed ones included.
    pub steps: usize,
    /// Stopped by the stop flag (Ctrl-C) before `options.steps`; the checkpoint resumes it.
    pub interrupted: bool,
    pub last_loss: Option<f64>,
    pub last_eval_loss: Option<f64>,
}

/// One row of loss.csv.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Row {
    step: usize,
    loss: f64,
    lr: f32,
    tokens_per_s: f64,
    eval_loss: Option<f64>,
}

/// The shape of `--config tiny`: hidden 96, 4 layers of 4 heads (2 key/value heads) of 24,
/// intermediate 256, 256 positions, tied embeddings; about 0.43M parameters with the 258
/// tokens of the byte-level fallback.
pub fn tiny_config(vocab_size: usize) -> ModelConfig {
    ModelConfig {
        family: Default::default(),
        vocab_size,
        hidden_size: 96,
        intermediate_size: 256,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 24,
        max_position_embeddings: 256,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        tie_word_embeddings: true,
        bos_token_id: None,
        eos_token_id: None,
    }
}

/// Computes one optimizer step somewhere.
trait StepEngine {
    fn name(&self) -> String;
    fn step(&mut self, trainer: &mut Trainer, windows: &[&[u32]]) -> Result<StepReport>;
    /// Brings `trainer`'s weights and optimizer state up to date, before they are evaluated or
    /// saved.
    fn sync(&mut self, trainer: &mut Trainer) -> Result<()>;
}

/// [`Trainer::step`]: the multi-threaded CPU path.
struct CpuEngine;

impl StepEngine for CpuEngine {
    fn name(&self) -> String {
        "cpu".into()
    }
    fn step(&mut self, trainer: &mut Trainer, windows: &[&[u32]]) -> Result<StepReport> {
        trainer.step(windows)
    }
    fn sync(&mut self, _: &mut Trainer) -> Result<()> {
        Ok(())
    }
}

/// The GPU side of a run: [`GpuTrainer`] behind [`StepEngine`] where the `gpu` feature is on.
#[cfg(feature = "gpu")]
mod on_gpu {
    use super::{CpuEngine, Device, Event, StepEngine};
    use crate::Result;
    use crate::gpu::GpuContext;
    use crate::train::{GpuTrainer, StepReport, Trainer};

    /// [`GpuTrainer`]: the weights and optimizer state live on the GPU between syncs.
    struct GpuEngine {
        ctx: GpuContext,
        trainer: GpuTrainer,
    }

    impl StepEngine for GpuEngine {
        fn name(&self) -> String {
            self.ctx.adapter_name()
        }
        fn step(&mut self, trainer: &mut Trainer, windows: &[&[u32]]) -> Result<StepReport> {
            pollster::block_on(self.trainer.step(&self.ctx, trainer, windows))
        }
        fn sync(&mut self, trainer: &mut Trainer) -> Result<()> {
            pollster::block_on(self.trainer.read_into(&self.ctx, trainer))
        }
    }

    /// The adapter `device` asks for: opened for [`Device::Gpu`] (or the error), a hardware
    /// one for [`Device::Auto`] (or none), none for [`Device::Cpu`].
    pub(super) fn open_gpu(device: Device) -> Result<Option<GpuContext>> {
        match device {
            Device::Cpu => Ok(None),
            Device::Gpu => Ok(Some(pollster::block_on(GpuContext::new())?)),
            Device::Auto => Ok(pollster::block_on(GpuContext::new())
                .ok()
                .filter(|ctx| ctx.adapter_info().device_type != wgpu::DeviceType::Cpu)),
        }
    }

    /// The engine that trains `trainer` on windows of up to `context` tokens: the GPU when `ctx` is
    /// open and can train the model (with `--device gpu`, an error when it cannot), else the CPU.
    pub(super) fn engine(
        ctx: Option<GpuContext>,
        device: Device,
        trainer: &Trainer,
        context: usize,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Box<dyn StepEngine>> {
        let Some(ctx) = ctx else {
            return Ok(Box::new(CpuEngine));
        };
        match GpuTrainer::new(&ctx, trainer, context) {
            Ok(gpu) => Ok(Box::new(GpuEngine { ctx, trainer: gpu })),
            Err(e) if device == Device::Gpu => Err(e),
            Err(e) => {
                on_event(Event::Note(format!(
                    "training on the CPU: {} cannot train this model ({e})",
                    ctx.adapter_name()
                )));
                Ok(Box::new(CpuEngine))
            }
        }
    }
}

/// Without the `gpu` feature there is no adapter: `--device gpu` is an error, the rest trains on
/// the CPU.
#[cfg(not(feature = "gpu"))]
mod on_gpu {
    use super::{CpuEngine, Device, Event, StepEngine};
    use crate::train::Trainer;
    use crate::{Error, Result};

    /// An adapter, of which this build has none.
    pub(super) enum NoAdapter {}

    pub(super) fn open_gpu(device: Device) -> Result<Option<NoAdapter>> {
        match device {
            Device::Gpu => Err(Error::NoAdapter(
                "this build has no GPU support (bitnet-wgpu's `gpu` feature is off)".into(),
            )),
            Device::Auto | Device::Cpu => Ok(None),
        }
    }

    pub(super) fn engine(
        ctx: Option<NoAdapter>,
        _: Device,
        _: &Trainer,
        _: usize,
        _: &mut dyn FnMut(Event),
    ) -> Result<Box<dyn StepEngine>> {
        match ctx {
            None => Ok(Box::new(CpuEngine)),
        }
    }
}

use on_gpu::{engine, open_gpu};

fn bad_option(why: impl ToString) -> Error {
    Error::invalid("training options", why)
}

/// The model, its tokenizer and what the tokenizer.json of the exports holds.
struct Start {
    model: TrainModel,
    tokenizer: Tokenizer,
    tokenizer_json: Option<String>,
}

/// Runs (or resumes) training as `options` say, reporting through `on_event`, until
/// `options.steps` or until `stop` becomes true (then it saves a checkpoint that resumes
/// exactly and returns with `interrupted`).
///
/// Everything is checked before the folder is touched: bad options, data that is missing,
/// empty, not UTF-8 or shorter than one window, a context beyond the model's positions, a
/// folder that holds another run (unless resuming) or that cannot be written, and on resume a
/// checkpoint of another model, quantization or run settings. A step whose loss or gradient is
/// NaN or infinite stops the run with an error naming the step; the files of the last save
/// stay as they were.
pub fn train(
    options: &TrainOptions,
    stop: &AtomicBool,
    on_event: &mut dyn FnMut(Event),
) -> Result<RunSummary> {
    let o = options;
    check_options(o)?;
    let gpu = open_gpu(o.device)?;
    check_out_dir(o)?;
    let checkpoint_dir = o.out.join(CHECKPOINT_DIR);
    let texts = read_texts(&o.data)?;
    let optimizer = match o.optimizer {
        OptimizerKind::AdamW => Optimizer::AdamW(AdamW::new(0.9, 0.95, 1e-8, o.weight_decay)),
        OptimizerKind::Sgd => Optimizer::Sgd(Sgd::new(0.9, o.weight_decay)),
    };
    let state_file = checkpoint_dir.join(STATE_FILE);
    if o.resume && !state_file.is_file() {
        on_event(Event::Note(format!(
            "{} holds no checkpoint yet (the run stopped during its first save): starting from \
             step 0",
            o.out.display()
        )));
    }
    let (start, resumed) = if o.resume && state_file.is_file() {
        let checkpoint = load_checkpoint(&checkpoint_dir, optimizer.clone())?;
        let wanted = wanted_config(o)?;
        let c = &checkpoint.model.config;
        if let Some(wanted) = wanted.filter(|w| !same_architecture(w, c)) {
            return Err(bad_option(format!(
                "--resume: the run in {} trains another model ({}) than the one given ({})",
                o.out.display(),
                describe(c),
                describe(&wanted)
            )));
        }
        if checkpoint.model.quant != o.quant {
            return Err(bad_option(format!(
                "--resume: the run in {} was trained with --quant {}",
                o.out.display(),
                checkpoint.meta.quant
            )));
        }
        let tokenizer_path = checkpoint_dir.join(TOKENIZER_FILE);
        let (tokenizer, json) = match std::fs::read_to_string(&tokenizer_path) {
            Ok(json) => (
                Tokenizer::from_json(json.as_bytes())?
                    .with_special_ids(c.bos_token_id, c.eos_token_id)?,
                Some(json),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                (Tokenizer::bytes(c.vocab_size), None)
            }
            Err(e) => {
                return Err(Error::Io {
                    path: tokenizer_path.display().to_string(),
                    source: e,
                });
            }
        };
        let start = Start {
            model: checkpoint.model.clone(),
            tokenizer,
            tokenizer_json: json,
        };
        (start, Some(checkpoint))
    } else {
        (new_start(o, &texts, on_event)?, None)
    };
    let Start {
        model,
        tokenizer,
        tokenizer_json,
    } = start;
    let config = model.config.clone();
    if o.context > config.max_position_embeddings {
        return Err(bad_option(format!(
            "--context {} is longer than the model's {} positions (max_position_embeddings)",
            o.context, config.max_position_embeddings
        )));
    }
    let tokens = tokenize(&texts, &tokenizer)?;
    let mut batches = Batches::new(tokens.len(), o.context, o.shuffle, o.seed)?;
    let eval = match &o.eval_file {
        Some(path) => {
            let ids = tokenizer.encode(&read_text(path)?, true)?;
            let mut windows: Vec<_> = perplexity_windows(ids.len(), o.context)
                .into_iter()
                .filter(|w| w.len() >= 2)
                .collect();
            if let Some(n) = o.eval_windows {
                windows.truncate(n);
            }
            if windows.is_empty() {
                return Err(bad_option(format!(
                    "--eval-file {}: {} token(s), and a prediction needs 2",
                    path.display(),
                    ids.len()
                )));
            }
            Some((ids, windows))
        }
        None => None,
    };
    let run_settings = run_settings(o, &tokens);
    let mut rows: Vec<Row> = Vec::new();
    let mut trainer = Trainer::new(model, optimizer, o.lr, schedule(o));
    trainer.micro_batch = Some(o.batch);
    trainer.max_grad_norm = (o.grad_clip > 0.0).then_some(o.grad_clip);
    let resumed_step = resumed.as_ref().map(|c| c.meta.step);
    if let Some(checkpoint) = resumed {
        if checkpoint.meta.run != run_settings {
            return Err(bad_option(format!(
                "--resume: the run in {} used other settings: {}",
                o.out.display(),
                differences(&checkpoint.meta.run, &run_settings)
            )));
        }
        trainer.optimizer = checkpoint.optimizer;
        trainer.set_steps(checkpoint.meta.step);
        batches.seek(DataPosition {
            epoch: checkpoint.meta.epoch,
            cursor: checkpoint.meta.cursor,
        });
        rows = read_rows(&o.out.join(LOSS_CSV), checkpoint.meta.step)?;
    }
    let mut engine = engine(gpu, o.device, &trainer, o.context, on_event)?;
    // The last check: the folder can be written. Nothing was written before this point.
    create_dir(&o.out)
        .and_then(|()| write_atomic(&o.out.join(".write-test"), b""))
        .map_err(|e| bad_option(format!("--out {} cannot be written: {e}", o.out.display())))?;
    let _ = std::fs::remove_file(o.out.join(".write-test"));
    if let Some(json) = &tokenizer_json {
        create_dir(&checkpoint_dir)?;
        write_atomic(&checkpoint_dir.join(TOKENIZER_FILE), json.as_bytes())?;
    }
    if o.quant == Quant::None {
        on_event(Event::Note(format!(
            "--quant none: {}/ holds the full-precision model (no quantization_config); no \
             {}/ is written, since packing it to ternary would be post-training quantization",
            MASTER_DIR, MODEL_DIR
        )));
    }
    on_event(Event::Started {
        engine: engine.name(),
        parameters: trainer.model.params.len(),
        vocab_size: config.vocab_size,
        tokens: tokens.len(),
        windows_per_pass: batches.windows(),
        start_step: trainer.steps(),
        steps: o.steps,
    });

    let save = |trainer: &Trainer, batches: &Batches, rows: &[Row]| -> Result<()> {
        let model = &trainer.model;
        if model.quant == Quant::BitNet {
            export_packed(model, tokenizer_json.as_deref(), &o.out.join(MODEL_DIR))?;
        }
        export_master(model, tokenizer_json.as_deref(), &o.out.join(MASTER_DIR))?;
        write_rows(&o.out.join(LOSS_CSV), rows)?;
        let train: Vec<(usize, f64)> = rows.iter().map(|r| (r.step, r.loss)).collect();
        let eval: Vec<(usize, f64)> = rows
            .iter()
            .filter_map(|r| r.eval_loss.map(|e| (r.step, e)))
            .collect();
        plot_losses(&o.out.join(LOSS_PNG), &train, &eval)?;
        let (_, adam_steps) = match &trainer.optimizer {
            Optimizer::AdamW(a) => a.state(),
            Optimizer::Sgd(_) => (None, 0),
        };
        let position = batches.position();
        let meta = CheckpointMeta {
            version: 1,
            step: trainer.steps(),
            config_json: hf::config_json(&model.config)?,
            quant: quant_name(model.quant).to_string(),
            run: run_settings.clone(),
            epoch: position.epoch,
            cursor: position.cursor,
            optimizer_steps: adam_steps,
        };
        save_checkpoint(&checkpoint_dir, &meta, model, &trainer.optimizer)
    };

    let mut interrupted = false;
    let mut saved_step = resumed_step;
    let per_step = o.batch * o.accumulate;
    while trainer.steps() < o.steps {
        if stop.load(Ordering::SeqCst) {
            interrupted = true;
            break;
        }
        let step = trainer.steps() + 1;
        let ranges = batches.next_batch(per_step);
        let windows: Vec<&[u32]> = ranges.iter().map(|r| &tokens[r.clone()]).collect();
        let started = Instant::now();
        let report = engine.step(&mut trainer, &windows).map_err(|e| {
            let kept = match saved_step {
                Some(s) => format!(
                    "the last good checkpoint (step {s}) stays in {}",
                    checkpoint_dir.display()
                ),
                None => "no checkpoint was saved yet".to_string(),
            };
            Error::invalid(
                "training",
                format!("step {step} failed: {e}. Stopped; {kept}"),
            )
        })?;
        let seconds = started.elapsed().as_secs_f64();
        let tokens_per_s = (per_step * o.context) as f64 / seconds.max(1e-9);
        let mut row = Row {
            step,
            loss: report.loss,
            lr: report.lr,
            tokens_per_s,
            eval_loss: None,
        };
        on_event(Event::Step {
            step,
            loss: report.loss,
            lr: report.lr,
            grad_norm: report.grad_norm,
            tokens_per_s,
        });
        let last = step == o.steps;
        let save_now = step.is_multiple_of(o.save_every.max(1)) || last;
        let eval_now = eval.is_some() && (step.is_multiple_of(o.eval_every.max(1)) || last);
        if save_now || eval_now {
            engine.sync(&mut trainer)?;
        }
        if let Some((ids, windows)) = &eval
            && eval_now
        {
            let loss = eval_loss(&trainer.model, ids, windows)?;
            row.eval_loss = Some(loss);
            on_event(Event::Eval {
                step,
                loss,
                perplexity: loss.exp(),
            });
        }
        rows.push(row);
        if save_now {
            save(&trainer, &batches, &rows)?;
            saved_step = Some(step);
            on_event(Event::Saved { step });
        }
    }
    if interrupted {
        engine.sync(&mut trainer)?;
        save(&trainer, &batches, &rows)?;
        on_event(Event::Saved {
            step: trainer.steps(),
        });
    }
    Ok(RunSummary {
        steps: trainer.steps(),
        interrupted,
        last_loss: rows.last().map(|r| r.loss),
        last_eval_loss: rows.iter().rev().find_map(|r| r.eval_loss),
    })
}

fn check_options(o: &TrainOptions) -> Result<()> {
    for (name, value) in [
        ("--steps", o.steps),
        ("--batch", o.batch),
        ("--accumulate", o.accumulate),
        ("--eval-every", o.eval_every),
        ("--save-every", o.save_every),
    ] {
        if value == 0 {
            return Err(bad_option(format!("{name} must be at least 1")));
        }
    }
    if o.context < 2 {
        return Err(bad_option(format!(
            "--context {}: a window needs at least 2 tokens",
            o.context
        )));
    }
    for (name, value) in [
        ("--lr", o.lr),
        ("--weight-decay", o.weight_decay),
        ("--grad-clip", o.grad_clip),
    ] {
        if !(value.is_finite() && value >= 0.0) {
            return Err(bad_option(format!(
                "{name} {value} must be a finite number >= 0"
            )));
        }
    }
    if o.vocab_size.is_some()
        && matches!(o.model, ModelSource::Checkpoint(_) | ModelSource::Files(_))
    {
        return Err(bad_option(
            "--vocab-size trains a tokenizer for a new model; a --model comes with its own",
        ));
    }
    if o.eval_windows == Some(0) {
        return Err(bad_option("--eval-windows must be at least 1"));
    }
    Ok(())
}

/// Refuses an --out that is a file, that holds anything when not resuming (another run, or
/// other files), or that holds no checkpoint when resuming, unless all it holds is what a run
/// writes before its first checkpoint (a run killed then starts again from step 0).
fn check_out_dir(o: &TrainOptions) -> Result<()> {
    let out = &o.out;
    let state = out.join(CHECKPOINT_DIR).join(STATE_FILE);
    if out.exists() && !out.is_dir() {
        return Err(bad_option(format!(
            "--out {} is a file, not a folder",
            out.display()
        )));
    }
    if o.resume {
        if !state.is_file() && !only_a_first_save(out) {
            return Err(bad_option(format!(
                "--resume: {} holds no checkpoint to resume ({} is missing)",
                out.display(),
                state.display()
            )));
        }
        return Ok(());
    }
    let mut entries = match std::fs::read_dir(out) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(bad_option(format!(
                "--out {} cannot be written: {e}",
                out.display()
            )));
        }
    };
    if entries.next().is_none() {
        return Ok(());
    }
    if state.is_file() || out.join(LOSS_CSV).is_file() {
        return Err(bad_option(format!(
            "--out {} holds another run; pass --resume to continue it, or choose another folder",
            out.display()
        )));
    }
    Err(bad_option(format!(
        "--out {} is not empty; a run needs a new or empty folder",
        out.display()
    )))
}

/// Whether `out` holds nothing but what a run writes before its first checkpoint is complete:
/// its exports, loss curve and tokenizer, and temporary files (a save killed midway).
fn only_a_first_save(out: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(out) else {
        return false;
    };
    let ours = [LOSS_CSV, LOSS_PNG, CHECKPOINT_DIR, MODEL_DIR, MASTER_DIR];
    let mut any = false;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(ours.contains(&name.as_ref()) || name.starts_with('.')) {
            return false;
        }
        any = true;
    }
    any
}

/// The model's config that the options ask for without building anything (for --resume), or
/// `None` when they name none.
fn wanted_config(o: &TrainOptions) -> Result<Option<ModelConfig>> {
    Ok(Some(match &o.model {
        ModelSource::Checkpoint(_) | ModelSource::Files(_) => {
            let (weights, _) = load_source(&o.model)?.expect("a checkpoint source");
            let mut c = weights.config;
            c.tie_word_embeddings = weights.lm_head.is_none();
            c
        }
        ModelSource::Tiny => tiny_config(o.vocab_size.unwrap_or(BYTE_VOCAB)),
        ModelSource::ConfigFile(path) => config_file(path, o.vocab_size)?,
    }))
}

/// Vocabulary of the byte-level fallback for a new model: 256 bytes, bos and eos.
const BYTE_VOCAB: usize = 258;
/// The most tokens [`load_model`] accepts without a tokenizer.json.
const BYTE_VOCAB_MAX: usize = 260;

fn config_file(path: &Path, vocab_size: Option<usize>) -> Result<ModelConfig> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    let mut c = hf::parse_config(&text)
        .map_err(|e| bad_option(format!("--config {}: {e}", path.display())))?;
    if let Some(v) = vocab_size {
        c.vocab_size = v;
    } else if !(BYTE_VOCAB..=BYTE_VOCAB_MAX).contains(&c.vocab_size) {
        return Err(bad_option(format!(
            "--config {}: vocab_size {} needs a tokenizer: give --vocab-size to train one (or \
             use {BYTE_VOCAB} to {BYTE_VOCAB_MAX} for the byte-level fallback)",
            path.display(),
            c.vocab_size
        )));
    }
    Ok(c)
}

/// Whether two configs describe the same model (ids of special tokens aside: they follow the
/// tokenizer).
fn same_architecture(a: &ModelConfig, b: &ModelConfig) -> bool {
    let strip = |c: &ModelConfig| ModelConfig {
        bos_token_id: None,
        eos_token_id: None,
        ..c.clone()
    };
    strip(a) == strip(b)
}

fn describe(c: &ModelConfig) -> String {
    format!(
        "vocab {}, hidden {}, {} layers, {} heads, intermediate {}",
        c.vocab_size,
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.intermediate_size
    )
}

/// The weights and tokenizer of a checkpoint source, `None` for a new model.
fn load_source(source: &ModelSource) -> Result<Option<(ModelWeights, Tokenizer)>> {
    match source {
        ModelSource::Checkpoint(path) => load_model(path).map(Some),
        ModelSource::Files(files) => {
            let named: Vec<(&str, &[u8])> = files
                .iter()
                .map(|(name, bytes)| (name.as_str(), bytes.as_slice()))
                .collect();
            load_model_from_bytes(&named).map(Some)
        }
        ModelSource::Tiny | ModelSource::ConfigFile(_) => Ok(None),
    }
}

/// A new run's model and tokenizer.
fn new_start(o: &TrainOptions, texts: &[String], on_event: &mut dyn FnMut(Event)) -> Result<Start> {
    if let Some((weights, tokenizer)) = load_source(&o.model)? {
        // The run exports Hugging Face folders: a family without a layout there fails now,
        // not after training.
        hf::config_json(&weights.config).map_err(|e| {
            Error::invalid(
                "--model",
                format!("a fine-tuned copy of this model could not be exported: {e}"),
            )
        })?;
        let mut model = TrainModel::from_weights(&weights, o.quant)?;
        if let ModelSource::Checkpoint(path) = &o.model
            && let Some(latent) = load_latent(path, &model)?
        {
            model.params = latent;
            on_event(Event::Note(format!(
                "{}: full-precision weights, fine-tuned as they are",
                path.display()
            )));
        }
        let tokenizer_json = tokenizer.to_json()?;
        return Ok(Start {
            model,
            tokenizer,
            tokenizer_json,
        });
    }
    let mut config = match &o.model {
        ModelSource::ConfigFile(path) => config_file(path, o.vocab_size)?,
        _ => tiny_config(o.vocab_size.unwrap_or(BYTE_VOCAB)),
    };
    let (tokenizer, tokenizer_json) = match o.vocab_size {
        Some(v) => {
            on_event(Event::Note(format!(
                "training a byte-level BPE of {v} tokens on the data"
            )));
            let trained = train_bpe(texts, v)?;
            on_event(Event::Note(format!(
                "tokenizer: {} tokens",
                trained.tokenizer.vocab_size()
            )));
            config.bos_token_id = Some(trained.bos);
            config.eos_token_id = Some(trained.eos);
            (trained.tokenizer, Some(trained.json))
        }
        None => {
            let t = Tokenizer::bytes(config.vocab_size);
            config.bos_token_id = t.bos();
            config.eos_token_id = t.eos();
            (t, None)
        }
    };
    Ok(Start {
        model: TrainModel::new(config, o.quant, o.seed)?,
        tokenizer,
        tokenizer_json,
    })
}

fn schedule(o: &TrainOptions) -> Schedule {
    match o.schedule {
        ScheduleKind::Constant => Schedule::Constant { warmup: o.warmup },
        ScheduleKind::Linear => Schedule::Linear {
            warmup: o.warmup,
            total: o.steps,
        },
        ScheduleKind::Cosine => Schedule::Cosine {
            warmup: o.warmup,
            total: o.steps,
            min_ratio: 0.0,
        },
    }
}

/// The settings that fix a run's arithmetic, which a resumed run must repeat.
fn run_settings(o: &TrainOptions, tokens: &[u32]) -> serde_json::Value {
    serde_json::json!({
        "data_tokens": tokens.len(),
        "data_fingerprint": format!("{:016x}", fingerprint(tokens)),
        "steps": o.steps,
        "batch": o.batch,
        "accumulate": o.accumulate,
        "context": o.context,
        "lr": o.lr,
        "schedule": format!("{:?}", o.schedule).to_lowercase(),
        "warmup": o.warmup,
        "weight_decay": o.weight_decay,
        "optimizer": format!("{:?}", o.optimizer).to_lowercase(),
        "grad_clip": o.grad_clip,
        "seed": o.seed,
        "shuffle": o.shuffle,
    })
}

fn differences(saved: &serde_json::Value, now: &serde_json::Value) -> String {
    let (Some(saved), Some(now)) = (saved.as_object(), now.as_object()) else {
        return "unreadable settings".into();
    };
    let mut out = Vec::new();
    for (key, value) in now {
        let was = saved.get(key).cloned().unwrap_or(serde_json::Value::Null);
        if &was != value {
            let name = match key.as_str() {
                "data_tokens" | "data_fingerprint" => "the data (--data)".to_string(),
                k => format!("--{}", k.replace('_', "-")),
            };
            let line = format!("{name}: {was} then, {value} now");
            if !out.contains(&line) {
                out.push(line);
            }
        }
    }
    out.join("; ")
}

/// Mean loss over the eval windows (each window's predictions weigh equally per token), the
/// windows spread over all cores.
fn eval_loss(model: &TrainModel, ids: &[u32], windows: &[std::ops::Range<usize>]) -> Result<f64> {
    let sums = windows
        .par_iter()
        .map(|w| {
            let n = (w.len() - 1) as f64;
            model.loss(&[&ids[w.clone()]]).map(|l| l * n)
        })
        .collect::<Result<Vec<f64>>>()?;
    let count: usize = windows.iter().map(|w| w.len() - 1).sum();
    Ok(sums.iter().sum::<f64>() / count as f64)
}

fn write_rows(path: &Path, rows: &[Row]) -> Result<()> {
    let mut text = format!("{CSV_HEADER}\n");
    for r in rows {
        let eval = r.eval_loss.map_or(String::new(), |e| e.to_string());
        text += &format!(
            "{},{},{},{:.1},{eval}\n",
            r.step, r.loss, r.lr, r.tokens_per_s
        );
    }
    write_atomic(path, text.as_bytes())
}

/// loss.csv's rows up to step `upto` (a resumed run drops rows after its checkpoint).
fn read_rows(path: &Path, upto: usize) -> Result<Vec<Row>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(Error::Io {
                path: path.display().to_string(),
                source,
            });
        }
    };
    let bad = |line: &str| Error::invalid("loss.csv", format!("unreadable row {line:?}"));
    let mut rows = Vec::new();
    for line in text.lines().skip(1).filter(|l| !l.is_empty()) {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != 5 {
            return Err(bad(line));
        }
        let row = Row {
            step: f[0].parse().map_err(|_| bad(line))?,
            loss: f[1].parse().map_err(|_| bad(line))?,
            lr: f[2].parse().map_err(|_| bad(line))?,
            tokens_per_s: f[3].parse().map_err(|_| bad(line))?,
            eval_loss: if f[4].is_empty() {
                None
            } else {
                Some(f[4].parse().map_err(|_| bad(line))?)
            },
        };
        if row.step <= upto {
            rows.push(row);
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(dir: &Path, name: &str) -> TrainOptions {
        let data = dir.join("data.txt");
        if !data.exists() {
            std::fs::write(&data, "one two three four five six seven. ".repeat(30)).unwrap();
        }
        let mut o = TrainOptions::new(vec![data], dir.join(name));
        (o.steps, o.batch, o.context, o.save_every, o.warmup) = (8, 2, 16, 3, 2);
        o.accumulate = 2;
        o
    }

    /// A run stopped after step 4 and resumed ends where the uninterrupted run ends, bit for bit.
    fn check_resume(device: Device, tag: &str) {
        let dir = std::env::temp_dir().join(format!("bitnet-run-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let options = |name: &str| TrainOptions {
            device,
            ..options(&dir, name)
        };
        let never = AtomicBool::new(false);
        let mut engine = String::new();
        let whole = train(&options("whole"), &never, &mut |e| {
            if let Event::Started { engine: name, .. } = e {
                engine = name;
            }
        })
        .unwrap();
        assert_eq!((whole.steps, whole.interrupted), (8, false));
        assert_eq!(engine == "cpu", device == Device::Cpu, "{engine}");

        let stop = AtomicBool::new(false);
        let cut = options("cut");
        let summary = train(&cut, &stop, &mut |e| {
            if let Event::Step { step: 4, .. } = e {
                stop.store(true, Ordering::SeqCst);
            }
        })
        .unwrap();
        assert_eq!((summary.steps, summary.interrupted), (4, true));
        let mut resumed = cut.clone();
        resumed.resume = true;
        let mut first = None;
        let summary = train(&resumed, &never, &mut |e| {
            if let Event::Started { start_step, .. } = e {
                first = Some(start_step);
            }
        })
        .unwrap();
        assert_eq!((first, summary.steps), (Some(4), 8));
        assert_eq!(summary.last_loss, whole.last_loss);
        let state = |run: &str| std::fs::read(dir.join(run).join(CHECKPOINT_DIR).join(STATE_FILE));
        assert!(state("whole").unwrap() == state("cut").unwrap());
        // Rows come back from loss.csv without the rows after the checkpoint.
        assert_eq!(
            read_rows(&dir.join("cut").join(LOSS_CSV), 5).unwrap().len(),
            5
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_stopped_run_resumes_to_the_uninterrupted_result() {
        check_resume(Device::Cpu, "cpu");
    }

    #[test]
    fn a_stopped_gpu_run_resumes_to_the_uninterrupted_result() {
        check_resume(Device::Gpu, "gpu");
    }

    #[test]
    fn gpu_training_refuses_what_it_cannot_train_before_writing() {
        let dir = std::env::temp_dir().join(format!("bitnet-run-refuse-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let o = TrainOptions {
            device: Device::Gpu,
            quant: Quant::None,
            ..options(&dir, "float")
        };
        let err = train(&o, &AtomicBool::new(false), &mut |_| {}).unwrap_err();
        assert!(err.to_string().contains("train on the CPU"), "{err}");
        assert!(!o.out.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
