//! `bitnet`: the command-line program (native only; the browser uses the library directly).
// The browser has no command line: on wasm32 this binary is empty.
#![cfg_attr(target_arch = "wasm32", no_main)]
#![cfg(not(target_arch = "wasm32"))]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bitnet_wgpu::BitLinear;
use bitnet_wgpu::cpu::{ScaleGranularity, WeightQuantOptions};
use bitnet_wgpu::gpu::table::TableStorage;
use bitnet_wgpu::gpu::{AdapterSummary, GpuContext};
use bitnet_wgpu::model::{
    CpuEngine, DecodePath, Device, Engine, GenerationParams, Generator, GpuModel, LmHead, Logits,
    ModelConfig, ModelFiles, ModelWeights, Sampler, SamplingParams, Stop, WeightSource, load_model,
    open_model_from_bytes, perplexity_windows, synthetic,
};
use bitnet_wgpu::rng::SplitMix64;
use bitnet_wgpu::tokenizer::Tokenizer;
use clap::{Args, Parser, Subcommand, ValueEnum};

#[path = "cli/chat.rs"]
mod chat;
#[path = "cli/serve.rs"]
mod serve;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Parser)]
#[command(
    name = "bitnet",
    version,
    about = "BitNet b1.58 (ternary weights, int8 activations) on any GPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the GPU adapters, then check a random BitLinear on the GPU against the CPU reference.
    Info(InfoArgs),
    /// Continue a prompt, streaming the text to stdout as it is produced.
    Generate(GenerateArgs),
    /// Talk with a chat model in its chat template: one message per line on stdin, the answer
    /// streamed to stdout; /reset starts over, Ctrl-C stops an answer.
    Chat(chat::ChatArgs),
    /// Serve the model over HTTP with OpenAI's API (/v1/chat/completions, /v1/completions,
    /// /v1/models), decoding concurrent requests together.
    Serve(serve::ServeArgs),
    /// Perplexity of a model on a text file, over consecutive windows of --context tokens.
    Perplexity(PerplexityArgs),
    /// Turn a full-precision Hugging Face checkpoint into the offline packed ternary format that
    /// transformers loads (2 bits per weight), with compression statistics; or any checkpoint
    /// folder into one I2_S GGUF file that bitnet.cpp runs (--format gguf).
    Convert(ConvertArgs),
    /// Prompt and decoding speed of a model on the GPU (with its GPU memory) or on the CPU engine
    /// (--device cpu), after an untimed warm-up run.
    Bench(BenchArgs),
    /// Train a model on text files (new, or fine-tuning a checkpoint), on the CPU: loss.csv,
    /// loss.png, a resumable checkpoint/, the packed model/ and the full-precision master/.
    Train(TrainArgs),
}

#[derive(Args)]
struct BenchArgs {
    /// A checkpoint folder or .gguf file (else --synthetic).
    #[arg(
        long,
        conflicts_with = "synthetic",
        required_unless_present = "synthetic"
    )]
    model: Option<PathBuf>,
    /// Random ternary weights with the shapes of a known model.
    #[arg(long, value_enum)]
    synthetic: Option<Synthetic>,
    /// Keep only this many layers (quick runs on slow adapters).
    #[arg(long)]
    layers: Option<usize>,
    /// Tokens of the prompt, processed at once.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Tokens decoded one at a time after the prompt, three times on the GPU: greedily on the
    /// GPU, sampled on the GPU (temperature 0.8, top-p 0.95), and greedily with each step's logits
    /// read back; greedily on the CPU engine.
    #[arg(long, default_value_t = 128)]
    decode_tokens: usize,
    /// Where the model runs: the GPU (any adapter, software ones included) or the CPU engine.
    #[arg(long, value_enum, default_value_t = BenchDevice::Gpu)]
    device: BenchDevice,
    /// How the CPU engine keeps the lm_head (as `generate --head`).
    #[arg(long, value_enum, default_value_t = LmHead::Exact)]
    head: LmHead,
    /// Timed runs of the prompt and of greedy decoding, after the untimed warm-up; the rates
    /// reported are their mean (as llama-bench's -r).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    repetitions: u32,
    /// How decoding steps run [default: the faster on this kind of adapter].
    #[arg(long, value_enum)]
    decode_path: Option<DecodePathArg>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, ValueEnum)]
enum BenchDevice {
    Gpu,
    Cpu,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DecodePathArg {
    /// Each linear with its input's norm in one dispatch (GPUs).
    Fused,
    /// Norm and quantization, then the matmul (CPU adapters).
    Separate,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Synthetic {
    /// microsoft/bitnet-b1.58-2B-4T: 30 layers, hidden 2560, vocabulary 128256.
    #[value(name = "2b4t")]
    B2b4t,
}

#[derive(Args)]
struct ConvertArgs {
    /// The checkpoint folder (config.json and safetensors): full precision, or for --format gguf
    /// also offline packed.
    #[arg(long)]
    input: PathBuf,
    /// The folder to write (hf), or the .gguf file (gguf); never inside the input, never one
    /// that exists already.
    #[arg(long)]
    output: PathBuf,
    /// hf: the packed Hugging Face layout of bitnet-b1.58-2B-4T; gguf: one I2_S GGUF file as
    /// bitnet.cpp writes it (quantized per tensor, round-to-nearest).
    #[arg(long, value_enum, default_value_t = ConvertFormat::Hf)]
    format: ConvertFormat,
    /// Modules kept full precision, comma-separated (`*` matches any run of characters).
    #[arg(long, value_delimiter = ',', default_values_t = bitnet_wgpu::convert::DEFAULT_EXCLUDE.map(String::from))]
    exclude: Vec<String>,
    /// One scale per output channel instead of one per tensor.
    #[arg(long)]
    per_channel: bool,
    /// A weight becomes ±1 when |w| / mean|W| exceeds this (0.5 is round-to-nearest).
    #[arg(long, default_value_t = 0.5)]
    threshold: f32,
    /// Also write the dequantized model as f16 safetensors, for full-precision training.
    #[arg(long)]
    dequantized_f16: bool,
    /// gguf: also write a model whose rows are not a multiple of 128 weights, which this
    /// project reads but bitnet.cpp's I2_S kernels misread (refused without this flag).
    #[arg(long)]
    any_row_length: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ConvertFormat {
    Hf,
    Gguf,
}

#[derive(Args)]
struct InfoArgs {
    /// Input features of the test layer.
    #[arg(long = "in", default_value_t = 1024)]
    in_features: usize,
    /// Output features of the test layer.
    #[arg(long = "out", default_value_t = 1000)]
    out_features: usize,
    /// Tokens (rows) pushed through the layer.
    #[arg(long, default_value_t = 4)]
    tokens: usize,
    /// Seed of the random weights, bias and inputs.
    #[arg(long, default_value_t = 2024)]
    seed: u64,
    /// One weight scale per output channel instead of one per tensor.
    #[arg(long)]
    per_channel: bool,
    /// Also describe this model (a checkpoint folder or a .gguf file): its family and shape.
    #[arg(long)]
    model: Option<PathBuf>,
}

#[derive(Args)]
struct ModelArgs {
    /// A Hugging Face checkpoint folder (config.json, safetensors, tokenizer.json) or a .gguf file
    /// [default: the demo model built into this program, models/demo].
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// How the CPU engine keeps the lm_head: `exact` (logits equal the reference's) or `int8`
    /// (an int8 screen, half the bytes of an f16 table per token, then the exact logits of every
    /// token that could be the likeliest: the same greedy ids, the other logits close; needs
    /// --device cpu) [default: int8 where only the greedy ids are used (--temperature 0 on the
    /// CPU engine), else exact].
    #[arg(long, value_enum)]
    head: Option<LmHead>,
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text to continue, after the special tokens the model's tokenizer adds (its bos, for
    /// most).
    #[arg(long)]
    prompt: String,
    /// Stop after this many new tokens (or earlier, at the end-of-sequence token or the
    /// model's context limit).
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// How `generate` and `chat` choose each token.
#[derive(Args)]
struct SamplingArgs {
    /// Softmax temperature; 0 is greedy (always the most likely token).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Sample among the k most likely tokens only; 0 keeps all.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Then among the fewest most likely tokens whose probabilities add up to p.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Seed of the sampler: the same seed, model and prompt give the same text.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    /// The generation parameters, checked (bad ones fail before a possibly long model load).
    fn params(&self, max_new_tokens: usize) -> CliResult<GenerationParams> {
        let params = GenerationParams {
            max_new_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                seed: self.seed,
            },
        };
        Sampler::new(params.sampling)?;
        Ok(params)
    }
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The text to score.
    #[arg(long)]
    file: PathBuf,
    /// Tokens per window [default: the model's max_position_embeddings, at most 1024].
    #[arg(long)]
    context: Option<usize>,
}

#[derive(Args)]
struct TrainArgs {
    /// UTF-8 text files to train on, joined in order with the tokenizer's eos between them.
    #[arg(long, num_args = 1.., required = true)]
    data: Vec<PathBuf>,
    /// The run's folder: new or empty, or with --resume the folder of the run to continue.
    #[arg(long)]
    out: PathBuf,
    /// A checkpoint to fine-tune (folder or .gguf), with its tokenizer [default: the demo model
    /// built into this program, models/demo, unless --config or --vocab-size asks for a new
    /// model].
    #[arg(long, conflicts_with = "config")]
    model: Option<PathBuf>,
    /// A new model: `tiny` (about 0.43M parameters) or a config.json file [default with
    /// --vocab-size: tiny].
    #[arg(long)]
    config: Option<String>,
    /// Optimizer steps in the whole run.
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    /// Windows per micro-batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Tokens per window.
    #[arg(long, default_value_t = 128)]
    context: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    #[arg(long, value_enum, default_value_t = ScheduleArg::Cosine)]
    schedule: ScheduleArg,
    /// Steps of linear warm-up from 0.
    #[arg(long, default_value_t = 50)]
    warmup: usize,
    #[arg(long, default_value_t = 0.01)]
    weight_decay: f32,
    #[arg(long, value_enum, default_value_t = OptimizerArg::Adamw)]
    optimizer: OptimizerArg,
    /// Clip the global gradient norm to this (0 = off).
    #[arg(long, default_value_t = 1.0)]
    grad_clip: f32,
    /// Micro-batches whose gradients are averaged into one step.
    #[arg(long, default_value_t = 1)]
    accumulate: usize,
    /// Seeds the new model's weights and the order of the windows.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Take consecutive windows from the start instead of a shuffled order.
    #[arg(long)]
    no_shuffle: bool,
    /// A text to report eval loss and perplexity on.
    #[arg(long)]
    eval_file: Option<PathBuf>,
    #[arg(long, default_value_t = 100)]
    eval_every: usize,
    /// Score only the first N windows of --eval-file [default: all].
    #[arg(long)]
    eval_windows: Option<usize>,
    /// Save checkpoint/, model/, master/ and the loss files every N steps (and at the end).
    #[arg(long, default_value_t = 100)]
    save_every: usize,
    /// `bitnet`: ternary weights and int8 activations in every forward (QAT); `none`: full
    /// precision (the baseline; exported to master/ only).
    #[arg(long, value_enum, default_value_t = QuantArg::Bitnet)]
    quant: QuantArg,
    /// For a new model: train a byte-level BPE of this many tokens on the data [default: the
    /// byte-level fallback, 258 tokens].
    #[arg(long)]
    vocab_size: Option<usize>,
    /// `auto`: a hardware GPU that can train the model, else the CPU (a software adapter such
    /// as lavapipe trains slower than the CPU); `gpu`: the adapter that opens, or an error.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// Continue the run in --out from its checkpoint (the same options give the same result as
    /// an uninterrupted run, bit for bit).
    #[arg(long)]
    resume: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ScheduleArg {
    Constant,
    Cosine,
    Linear,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OptimizerArg {
    Adamw,
    Sgd,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum QuantArg {
    Bitnet,
    None,
}

/// The CLI's errors: the library's, plus messages about arguments and files.
type CliResult<T> = Result<T, Box<dyn std::error::Error>>;

/// Largest relative difference between the GPU and CPU outputs that still counts as agreement.
/// The integer part is exact on both sides; only the final f32 division and bias add may differ
/// (WGSL allows 2.5 ulp for division), far below this.
const TOLERANCE: f64 = 1e-4;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Info(args) => match pollster::block_on(info(&args)) {
            Ok(code) => code,
            Err(e) => fail(&e),
        },
        Command::Generate(args) => match pollster::block_on(generate(&args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&*e),
        },
        Command::Chat(args) => match pollster::block_on(chat::chat(&args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&*e),
        },
        Command::Serve(args) => match serve::serve(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&*e),
        },
        Command::Perplexity(args) => match pollster::block_on(perplexity(&args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&*e),
        },
        Command::Bench(args) => match pollster::block_on(bench(&args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&*e),
        },
        Command::Convert(args) => match convert(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&*e),
        },
        Command::Train(args) => match train(&args) {
            Ok(code) => code,
            Err(e) => fail(&*e),
        },
    }
}

/// `bitnet train`: the options to the library's run, a progress bar, Ctrl-C to stop and save.
fn train(args: &TrainArgs) -> CliResult<ExitCode> {
    use bitnet_wgpu::train::Quant;
    use bitnet_wgpu::train::run::{Event, ModelSource, OptimizerKind, ScheduleKind, TrainOptions};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut o = TrainOptions::new(args.data.clone(), args.out.clone());
    o.model = match (&args.model, args.config.as_deref(), args.vocab_size) {
        (Some(path), _, _) => ModelSource::Checkpoint(path.clone()),
        (None, None, None) => ModelSource::Files(
            DEMO_MODEL
                .iter()
                .map(|&(name, bytes)| (name.to_string(), bytes.to_vec()))
                .collect(),
        ),
        (None, None | Some("tiny"), _) => ModelSource::Tiny,
        (None, Some(file), _) => ModelSource::ConfigFile(PathBuf::from(file)),
    };
    (o.steps, o.batch, o.context, o.accumulate) =
        (args.steps, args.batch, args.context, args.accumulate);
    (o.lr, o.warmup, o.weight_decay, o.grad_clip) =
        (args.lr, args.warmup, args.weight_decay, args.grad_clip);
    o.schedule = match args.schedule {
        ScheduleArg::Constant => ScheduleKind::Constant,
        ScheduleArg::Cosine => ScheduleKind::Cosine,
        ScheduleArg::Linear => ScheduleKind::Linear,
    };
    o.optimizer = match args.optimizer {
        OptimizerArg::Adamw => OptimizerKind::AdamW,
        OptimizerArg::Sgd => OptimizerKind::Sgd,
    };
    o.quant = match args.quant {
        QuantArg::Bitnet => Quant::BitNet,
        QuantArg::None => Quant::None,
    };
    o.device = args.device;
    (o.seed, o.shuffle, o.resume) = (args.seed, !args.no_shuffle, args.resume);
    (o.eval_file, o.eval_every, o.eval_windows) =
        (args.eval_file.clone(), args.eval_every, args.eval_windows);
    (o.save_every, o.vocab_size) = (args.save_every, args.vocab_size);

    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\nsecond Ctrl-C: quitting without saving");
            std::process::exit(130);
        }
        eprintln!("\nCtrl-C: saving a checkpoint after this step (Ctrl-C again to quit now)");
    })?;
    let bar = ProgressBar::hidden();
    let summary = bitnet_wgpu::train::run::train(&o, &stop, &mut |event| match event {
        Event::Note(line) => eprintln!("{line}"),
        Event::Started {
            engine,
            parameters,
            vocab_size,
            tokens,
            windows_per_pass,
            start_step,
            steps,
        } => {
            eprintln!(
                "training {parameters} parameters (vocab {vocab_size}) on {tokens} tokens \
                 ({windows_per_pass} windows of {} per pass), engine: {engine}{}",
                o.context,
                if start_step > 0 {
                    format!(", resuming at step {start_step}")
                } else {
                    String::new()
                }
            );
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.set_length(steps as u64);
            bar.set_position(start_step as u64);
            bar.reset_eta();
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30} step {pos}/{len} {msg} [{elapsed_precise}, eta {eta_precise}]",
                )
                .expect("a valid template"),
            );
        }
        Event::Step {
            step,
            loss,
            tokens_per_s,
            ..
        } => {
            bar.set_position(step as u64);
            bar.set_message(format!("loss {loss:.4}, {tokens_per_s:.0} tokens/s"));
        }
        Event::Eval {
            step,
            loss,
            perplexity,
        } => bar.println(format!(
            "step {step}: eval loss {loss:.4}, perplexity {perplexity:.2}"
        )),
        Event::Saved { .. } => {}
    })?;
    bar.finish_and_clear();
    let out = o.out.display();
    if summary.interrupted {
        eprintln!(
            "stopped at step {} of {}; saved. Continue with the same command plus --resume",
            summary.steps, o.steps
        );
        return Ok(ExitCode::from(130));
    }
    eprintln!(
        "done: {} steps, last loss {}{}; wrote {out}/loss.csv, loss.png, checkpoint/, {}master/",
        summary.steps,
        summary.last_loss.map_or("-".into(), |l| format!("{l:.4}")),
        summary.last_eval_loss.map_or(String::new(), |l| format!(
            ", eval loss {l:.4} (perplexity {:.2})",
            l.exp()
        )),
        if o.quant == Quant::BitNet {
            "model/, "
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// The synthetic model `bench --synthetic` names, with `layers` of its layers where given.
fn bench_synthetic(model: Synthetic, layers: Option<usize>) -> ModelWeights {
    let Synthetic::B2b4t = model;
    let mut config = ModelConfig::bitnet_b158_2b4t();
    if let Some(layers) = layers {
        config.num_hidden_layers = layers;
    }
    eprintln!("making a synthetic model with the shapes of bitnet-b1.58-2B-4T");
    synthetic(&config, 1)
}

/// The prompt `bench` times (random ids, the same for every device), once its length and the
/// decoded tokens are checked to fit the model's positions.
fn bench_prompt(args: &BenchArgs, c: &ModelConfig) -> CliResult<Vec<u32>> {
    let context = args.prompt_tokens + args.decode_tokens;
    if args.prompt_tokens == 0 || context > c.max_position_embeddings {
        return Err(format!(
            "--prompt-tokens {} + --decode-tokens {} must be 1 to {} positions",
            args.prompt_tokens, args.decode_tokens, c.max_position_embeddings
        )
        .into());
    }
    let mut rng = SplitMix64(2);
    Ok((0..args.prompt_tokens)
        .map(|_| (rng.next_u64() % c.vocab_size as u64) as u32)
        .collect())
}

/// The mean of `rates` and the rates themselves, for the text output.
fn mean_of(rates: &[f64]) -> (f64, String) {
    let runs: Vec<String> = rates.iter().map(|r| format!("{r:.1}")).collect();
    (
        rates.iter().sum::<f64>() / rates.len().max(1) as f64,
        runs.join(" / "),
    )
}

/// `bench --device cpu`: the CPU engine over the model's files as `generate` opens them (a
/// GGUF or safetensors file mapped), the prompt and greedy decoding (each step's logits, the
/// token chosen on the host), each timed `--repetitions` times after one untimed run.
fn bench_cpu(args: &BenchArgs) -> CliResult<()> {
    if args.decode_path.is_some() {
        return Err("--decode-path is for --device gpu".into());
    }
    let files = args.model.as_ref().map(ModelFiles::read).transpose()?;
    let opened = files.as_ref().map(ModelFiles::open).transpose()?;
    let made;
    let source: &dyn WeightSource = match (&opened, args.synthetic) {
        (Some(_), _) if args.layers.is_some() => {
            return Err("--layers with --model is for --device gpu".into());
        }
        (Some((source, _)), _) => &**source,
        (None, Some(model)) => {
            made = bench_synthetic(model, args.layers);
            &made
        }
        (None, None) => return Err("give --model PATH or --synthetic 2b4t".into()),
    };
    let c = source.config().clone();
    let prompt = bench_prompt(args, &c)?;
    let started = Instant::now();
    let mut engine = CpuEngine::with_head(source, args.head)?;
    let load_time = started.elapsed();
    drop(opened);
    let argmax = bitnet_wgpu::cpu::argmax;
    // The warm-up: buffers sized, pages mapped, the threads started.
    let logits = engine.forward_logits(&prompt, Logits::Last)?;
    engine.forward_logits(&[argmax(&logits)?], Logits::Last)?;
    let (mut prompt_rates, mut decode_rates) = (Vec::new(), Vec::new());
    for _ in 0..args.repetitions {
        engine.reset();
        let started = Instant::now();
        let logits = engine.forward_logits(&prompt, Logits::Last)?;
        prompt_rates.push(rate(args.prompt_tokens, started.elapsed()));
        let mut next = argmax(&logits)?;
        let started = Instant::now();
        for _ in 0..args.decode_tokens {
            next = argmax(&engine.forward_logits(&[next], Logits::Last)?)?;
        }
        decode_rates.push(rate(args.decode_tokens, started.elapsed()));
    }
    let threads = rayon::current_num_threads();
    let head = format!("{:?}", args.head).to_lowercase();
    let ((prompt_rate, prompt_runs), (decode_rate, decode_runs)) =
        (mean_of(&prompt_rates), mean_of(&decode_rates));
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "device": "cpu",
                "threads": threads,
                "head": head,
                "layers": c.num_hidden_layers,
                "load_seconds": load_time.as_secs_f64(),
                "weight_bytes": engine.weight_bytes(),
                "prompt_tokens": args.prompt_tokens,
                "prompt_tokens_per_s": prompt_rate,
                "prompt_runs": prompt_rates,
                "decode_tokens": args.decode_tokens,
                "decode_tokens_per_s": decode_rate,
                "decode_runs": decode_rates,
            })
        );
    } else {
        println!(
            "CPU engine, {threads} thread{}, --head {head}, {} layers: built in {:.2} s, {:.3} GB \
             of weights held",
            if threads == 1 { "" } else { "s" },
            c.num_hidden_layers,
            load_time.as_secs_f64(),
            engine.weight_bytes() as f64 / 1e9
        );
        println!(
            "prompt: {} tokens, {prompt_rate:.1} tokens/s (mean of {prompt_runs})",
            args.prompt_tokens
        );
        println!(
            "decode, greedy: {} tokens, {decode_rate:.1} tokens/s (mean of {decode_runs})",
            args.decode_tokens
        );
    }
    Ok(())
}

async fn bench(args: &BenchArgs) -> CliResult<()> {
    if args.device == BenchDevice::Cpu {
        return bench_cpu(args);
    }
    if args.head != LmHead::Exact {
        return Err("--head int8 is a CPU engine option: add --device cpu".into());
    }
    let mut weights = match (&args.model, args.synthetic) {
        (Some(path), _) => load_model(path)?.0,
        (None, Some(model)) => bench_synthetic(model, args.layers),
        (None, None) => return Err("give --model PATH or --synthetic 2b4t".into()),
    };
    if let Some(layers) = args.layers {
        weights.layers.truncate(layers);
        weights.config.num_hidden_layers = weights.layers.len();
    }
    let c = weights.config.clone();
    let context = args.prompt_tokens + args.decode_tokens;
    let prompt = bench_prompt(args, &c)?;
    let ctx = GpuContext::new().await?;
    let mut model = GpuModel::new(&ctx, &weights, context, TableStorage::F16)?;
    drop(weights);
    if let Some(path) = args.decode_path {
        let path = match path {
            DecodePathArg::Fused => DecodePath::Fused,
            DecodePathArg::Separate => DecodePath::Separate,
        };
        model.set_decode_path(&ctx, path)?;
    }
    let decode_path = format!("{:?}", model.decode_path()).to_lowercase();
    // Pipelines compile on first use: untimed steps first.
    model.forward(&ctx, &prompt[..1], Logits::Last).await?;
    model.reset();
    let mut warm = Sampler::new(SamplingParams {
        temperature: 1.0,
        ..SamplingParams::default()
    })?;
    model
        .sample(&ctx, &prompt[..1], 1, c.vocab_size, &mut warm, |_| true)
        .await?;
    model.reset();

    let (mut prompt_rates, mut decode_rates, mut first) = (Vec::new(), Vec::new(), 0);
    for _ in 0..args.repetitions {
        model.reset();
        let started = Instant::now();
        let logits = model.forward(&ctx, &prompt, Logits::Last).await?;
        prompt_rates.push(rate(args.prompt_tokens, started.elapsed()));
        first = bitnet_wgpu::cpu::argmax(&logits)?;
        // Greedy, chosen on the GPU (what `bitnet generate --temperature 0` does).
        let started = Instant::now();
        model
            .greedy(&ctx, &[first], args.decode_tokens, c.vocab_size, |_| true)
            .await?;
        decode_rates.push(rate(args.decode_tokens, started.elapsed()));
    }
    // Sampled on the GPU with `generate`'s defaults, one token read back per step.
    let sampling = SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        ..SamplingParams::default()
    };
    let mut sampler = Sampler::new(sampling)?;
    model.reset();
    model.forward(&ctx, &prompt, Logits::Last).await?;
    let started = Instant::now();
    model
        .sample(
            &ctx,
            &[first],
            args.decode_tokens,
            c.vocab_size,
            &mut sampler,
            |_| true,
        )
        .await?;
    let sampled_time = started.elapsed();
    // Each step's logits read back, as sampling on the host needs.
    model.reset();
    model.forward(&ctx, &prompt, Logits::Last).await?;
    let started = Instant::now();
    let mut next = first;
    for _ in 0..args.decode_tokens {
        next = bitnet_wgpu::cpu::argmax(&model.forward(&ctx, &[next], Logits::Last).await?)?;
    }
    let logits_decode_time = started.elapsed();
    if ctx.profiling() {
        // Where one decode step and one prompt spend their GPU time.
        ctx.profile().await?;
        model.reset();
        model.forward(&ctx, &prompt, Logits::Last).await?;
        let prompt_profile = ctx.profile().await?;
        model.forward(&ctx, &prompt[..1], Logits::Last).await?;
        let step_profile = ctx.profile().await?;
        for (what, profile) in [("decode step", step_profile), ("prompt", prompt_profile)] {
            let total: f64 = profile.iter().map(|k| k.millis).sum();
            eprintln!("GPU time of one {what}: {total:.3} ms");
            for k in profile {
                eprintln!(
                    "  {:>16} {:>5} dispatches {:>9.3} ms {:>5.1}%",
                    k.entry,
                    k.dispatches,
                    k.millis,
                    100.0 * k.millis / total
                );
            }
        }
    }
    let ((prompt_rate, prompt_runs), (decode_rate, decode_runs)) =
        (mean_of(&prompt_rates), mean_of(&decode_rates));
    let logits_decode_rate = rate(args.decode_tokens, logits_decode_time);
    let sampled_rate = rate(args.decode_tokens, sampled_time);
    let memory = model.weight_and_cache_bytes();
    let adapter = ctx.adapter_info().name.clone();
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "adapter": adapter,
                "layers": c.num_hidden_layers,
                "prompt_tokens": args.prompt_tokens,
                "prompt_tokens_per_s": prompt_rate,
                "prompt_runs": prompt_rates,
                "decode_tokens": args.decode_tokens,
                "decode_tokens_per_s": decode_rate,
                "decode_runs": decode_rates,
                "decode_path": decode_path,
                "decode_sampled_tokens_per_s": sampled_rate,
                "decode_logits_tokens_per_s": logits_decode_rate,
                "gpu_memory_bytes": memory,
            })
        );
    } else {
        println!("adapter: {adapter}, {} layers", c.num_hidden_layers);
        println!(
            "prompt: {} tokens, {prompt_rate:.1} tokens/s (mean of {prompt_runs})",
            args.prompt_tokens
        );
        println!(
            "decode ({decode_path}), greedy on the GPU: {} tokens, {decode_rate:.1} tokens/s \
             ({:.2} ms per token; mean of {decode_runs})",
            args.decode_tokens,
            1e3 / decode_rate.max(f64::MIN_POSITIVE)
        );
        println!(
            "decode ({decode_path}), sampled on the GPU (temperature 0.8, top-p 0.95): \
             {sampled_rate:.1} tokens/s ({:.2} ms per token)",
            sampled_time.as_secs_f64() * 1e3 / args.decode_tokens.max(1) as f64
        );
        println!(
            "decode ({decode_path}), logits read back: {logits_decode_rate:.1} tokens/s ({:.2} ms \
             per token)",
            logits_decode_time.as_secs_f64() * 1e3 / args.decode_tokens.max(1) as f64
        );
        println!(
            "GPU memory for weights and KV cache: {:.3} GB",
            memory as f64 / 1e9
        );
    }
    Ok(())
}

fn convert(args: &ConvertArgs) -> CliResult<()> {
    use bitnet_wgpu::convert::{ConvertOptions, Progress, REPORT_FILE, convert_dir};
    if args.format == ConvertFormat::Gguf {
        return convert_gguf(args);
    }
    if args.any_row_length {
        return Err(
            "--any-row-length is for --format gguf (Hugging Face's layout has no row rule)".into(),
        );
    }
    let options = ConvertOptions {
        exclude: args.exclude.clone(),
        granularity: if args.per_channel {
            ScaleGranularity::PerChannel
        } else {
            ScaleGranularity::PerTensor
        },
        threshold: args.threshold,
        dequantized_f16: args.dequantized_f16,
    };
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{msg:>12} [{bar:40}] {pos}/{len}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let report = convert_dir(&args.input, &args.output, &options, &mut |p| match p {
        Progress::Read { bytes, total, .. } => {
            bar.set_message("reading");
            bar.set_length(total);
            bar.set_position(bytes);
        }
        Progress::Quantized { index, count, .. } => {
            bar.set_message("quantizing");
            bar.set_length(count as u64);
            bar.set_position(index as u64);
        }
        Progress::Wrote { file, .. } => bar.println(format!("wrote {file}")),
    })?;
    bar.finish_and_clear();
    eprintln!(
        "{} BitLinear layers, linears {:.2}x smaller ({} -> {} bytes), {:.1}% zeros; report in {}",
        report.bitlinear_layers,
        report.linear_ratio,
        report.linear_original_bytes,
        report.linear_packed_bytes,
        100.0 * report.sparsity,
        args.output.join(REPORT_FILE).display()
    );
    Ok(())
}

/// `convert --format gguf`: the whole model in one file, as bitnet.cpp writes it.
fn convert_gguf(args: &ConvertArgs) -> CliResult<()> {
    use bitnet_wgpu::convert::{DEFAULT_EXCLUDE, RowLengths, convert_to_gguf};
    let unsupported = [
        (args.per_channel, "--per-channel"),
        (args.threshold != 0.5, "--threshold"),
        (args.dequantized_f16, "--dequantized-f16"),
        (
            args.exclude != DEFAULT_EXCLUDE.map(String::from),
            "--exclude",
        ),
    ];
    if let Some((_, flag)) = unsupported.iter().find(|(set, _)| *set) {
        return Err(format!(
            "{flag} is not available with --format gguf (I2_S holds one scale per tensor, and \
             bitnet.cpp's layout fixes the rest)"
        )
        .into());
    }
    let rows = if args.any_row_length {
        RowLengths::Any
    } else {
        RowLengths::BitnetCpp
    };
    let conversion = convert_to_gguf(&args.input, &args.output, rows, &mut |_| {})?;
    let tokenizer = match &conversion.tokenizer {
        Some(t) => format!(
            "tokenizer: {} tokens, padded to the vocabulary, pre {}, add_bos_token {}",
            t.tokens.len(),
            t.pre.as_deref().unwrap_or("none"),
            t.add_bos.unwrap_or(false)
        ),
        None => "no tokenizer (byte-level)".to_string(),
    };
    eprintln!(
        "wrote {} ({} bytes; I2_S linears, F16 embeddings; {tokenizer})",
        args.output.display(),
        conversion.bytes
    );
    Ok(())
}

fn fail(e: &dyn std::error::Error) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::FAILURE
}

/// The project's demo model (models/demo: a small BitNet b1.58 model trained on public-domain
/// books), so that `generate` writes English with no download.
const DEMO_MODEL: [(&str, &[u8]); 3] = [
    ("config.json", include_bytes!("../models/demo/config.json")),
    (
        "model.safetensors",
        include_bytes!("../models/demo/model.safetensors"),
    ),
    (
        "tokenizer.json",
        include_bytes!("../models/demo/tokenizer.json"),
    ),
];

/// Loads the model behind `args` and starts its engine, saying on stderr why `auto` fell back
/// to the CPU. `greedy`: only the likeliest token of each step is used.
async fn open(args: &ModelArgs, greedy: bool) -> CliResult<(Engine, Tokenizer)> {
    // The checkpoint stays packed in memory; the engine unpacks it a layer at a time.
    let files;
    let (weights, tokenizer) = match &args.model {
        Some(path) => {
            files = ModelFiles::read(path)?;
            files.open()?
        }
        None => open_model_from_bytes(&DEMO_MODEL)?,
    };
    let head = match args.head {
        Some(LmHead::Int8) if args.device != Device::Cpu => {
            return Err("--head int8 is a CPU engine option: add --device cpu".into());
        }
        Some(head) => head,
        // The screen's greedy ids are the exact head's, its memory and time per token less.
        None if greedy => LmHead::Int8,
        None => LmHead::Exact,
    };
    match Engine::with_head(args.device, &*weights, head).await {
        Ok((engine, fallback)) => {
            if let Some(why) = fallback {
                eprintln!("running on the CPU: {why}");
            }
            Ok((engine, tokenizer))
        }
        Err(e) if args.device == Device::Gpu => Err(format!("--device gpu: {e}").into()),
        Err(e) => Err(e.into()),
    }
}

async fn generate(args: &GenerateArgs) -> CliResult<()> {
    let params = args.sampling.params(args.max_new_tokens)?;
    let greedy = params.sampling.temperature == 0.0;
    let (engine, tokenizer) = open(&args.model, greedy).await?;
    let mut generator = Generator::new(engine, tokenizer);
    let mut out = std::io::stdout().lock();
    let mut shown = Ok(());
    let generation = generator
        .generate(&args.prompt, &params, |piece| {
            if !args.model.json {
                shown = out.write_all(piece.as_bytes()).and_then(|()| out.flush());
            }
            shown.is_ok()
        })
        .await?;
    shown?;
    let adapter = generator.engine().adapter();
    let head = generator.engine().head();
    let family = generator.engine().config().family.name();
    if args.model.json {
        let json = serde_json::json!({
            "family": family,
            "head": head.map(|h| format!("{h:?}").to_lowercase()),
            "prompt_ids": generation.prompt_ids,
            "generated_ids": generation.generated_ids,
            "text": generation.text,
            "prompt_tokens_per_s": generation.prompt_tokens_per_s(),
            "tokens_per_s": generation.tokens_per_s(),
            "adapter": adapter,
        });
        writeln!(out, "{json}")?;
    } else {
        writeln!(out)?;
    }
    eprintln!(
        "prompt: {} tokens, {:.1} tokens/s; generated: {} tokens, {:.1} tokens/s; stopped at {}; \
         engine: {adapter}; model: {family}",
        generation.prompt_ids.len(),
        generation.prompt_tokens_per_s(),
        generation.generated_ids.len(),
        generation.tokens_per_s(),
        stop_reason(generation.stop),
    );
    Ok(())
}

/// Why a generation stopped, for its summary line.
fn stop_reason(stop: Stop) -> &'static str {
    match stop {
        Stop::EndOfSequence => "the end-of-sequence token",
        Stop::MaxNewTokens => "--max-new-tokens",
        Stop::ContextFull => "the model's context limit",
        Stop::Cancelled => "an output error",
    }
}

/// Tokens per second; 0 for no tokens (a rate over no work means nothing).
fn rate(tokens: usize, time: Duration) -> f64 {
    let seconds = time.as_secs_f64();
    if tokens == 0 || seconds == 0.0 {
        0.0
    } else {
        tokens as f64 / seconds
    }
}

async fn perplexity(args: &PerplexityArgs) -> CliResult<()> {
    let text = read_text(&args.file)?;
    let (mut engine, tokenizer) = open(&args.model, false).await?;
    let context = args
        .context
        .unwrap_or(engine.config().max_position_embeddings.min(1024));
    let ids = tokenizer.encode(&text, true)?;
    let scored: usize = perplexity_windows(ids.len(), context)
        .iter()
        .map(|w| w.len().saturating_sub(1))
        .sum();
    let bar = if args.model.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(scored as u64).with_style(ProgressStyle::with_template(
            "{bar:40} {pos}/{len} tokens, {per_sec}, eta {eta}",
        )?)
    };
    let p = engine
        .perplexity(&ids, context, &mut |done| bar.set_position(done as u64))
        .await
        .map_err(|e| format!("{} (--context {context}): {e}", args.file.display()))?;
    bar.finish_and_clear();
    if args.model.json {
        println!(
            "{}",
            serde_json::json!({"perplexity": p.perplexity, "tokens": p.scored, "context": p.context})
        );
    } else {
        println!(
            "perplexity: {:.4} over {} predicted tokens ({} windows of up to {} tokens, engine: \
             {})",
            p.perplexity,
            p.scored,
            p.windows,
            p.context,
            engine.adapter()
        );
    }
    Ok(())
}

fn read_text(path: &Path) -> CliResult<String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()).into())
}

async fn info(args: &InfoArgs) -> bitnet_wgpu::Result<ExitCode> {
    for var in ["WGPU_BACKEND", "WGPU_ADAPTER_NAME"] {
        if let Ok(value) = std::env::var(var) {
            println!("{var}={value}");
        }
    }
    let adapters = GpuContext::adapters().await;
    let ctx = GpuContext::new().await;
    println!("GPU adapters: {}", adapters.len());
    for (i, adapter) in adapters.iter().enumerate() {
        let picked = ctx
            .as_ref()
            .is_ok_and(|c| same_adapter(c.adapter_info(), &adapter.info));
        print_adapter(i, adapter, picked);
    }
    let ctx = match ctx {
        Ok(ctx) => {
            let info = ctx.adapter_info();
            println!(
                "GpuContext::new() picks: {} ({:?}, {:?})",
                info.name, info.backend, info.device_type
            );
            Some(ctx)
        }
        Err(e) => {
            let why = match e {
                bitnet_wgpu::Error::NoAdapter(why) => why,
                other => other.to_string(),
            };
            println!("no GPU adapter was found: {why}");
            println!("continuing on the CPU only");
            None
        }
    };

    if let Some(path) = &args.model {
        let files = ModelFiles::read(path)?;
        let (weights, _) = files.open()?;
        let c = weights.config();
        println!(
            "model: {} ({}), {} layers, hidden {}, {} heads ({} key/value) of {}, intermediate \
             {} ({} gate), vocabulary {}, {} parameters",
            c.family.name(),
            c.family.hf_architecture(),
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
            c.intermediate_size,
            c.family.activation().name(),
            c.vocab_size,
            c.parameter_count().unwrap_or(usize::MAX),
        );
    }
    let (out, inp, rows) = (args.out_features, args.in_features, args.tokens);
    let mut rng = SplitMix64(args.seed);
    let weights: Vec<f32> = (0..out * inp).map(|_| rng.uniform_f32()).collect();
    let bias: Vec<f32> = (0..out).map(|_| 0.1 * rng.uniform_f32()).collect();
    let x: Vec<f32> = (0..rows * inp).map(|_| 4.0 * rng.uniform_f32()).collect();
    let opts = WeightQuantOptions {
        granularity: if args.per_channel {
            ScaleGranularity::PerChannel
        } else {
            ScaleGranularity::PerTensor
        },
        ..Default::default()
    };
    let layer = BitLinear::from_f32(&weights, out, inp, Some(bias), opts)?;
    println!(
        "BitLinear {inp} in x {out} out ({:?} scale, with bias), {rows} token(s), seed {}",
        layer.granularity(),
        args.seed
    );
    println!("memory: {}", layer.memory_footprint());

    let cpu = layer.forward_cpu(&x, rows)?;
    println!("CPU forward: ok, {} outputs", cpu.len());

    let Some(ctx) = ctx else {
        return Ok(ExitCode::SUCCESS);
    };
    let gpu = layer.to_gpu(&ctx)?.forward(&ctx, &x, rows).await?;
    println!("GPU forward: ok, {} outputs", gpu.len());
    let diff = max_relative_difference(&gpu, &cpu);
    if gpu.len() == cpu.len() && diff <= TOLERANCE {
        println!("GPU and CPU agree: max relative difference {diff:.3e} (tolerance {TOLERANCE:e})");
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "GPU result MISMATCHES the CPU reference: max relative difference {diff:.3e} \
             (tolerance {TOLERANCE:e})"
        );
        Ok(ExitCode::FAILURE)
    }
}

fn print_adapter(i: usize, adapter: &AdapterSummary, picked: bool) {
    let info = &adapter.info;
    let caps = &adapter.capabilities;
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let subgroups = if caps.subgroups {
        format!("yes ({}..{})", caps.subgroup_size.0, caps.subgroup_size.1)
    } else {
        "no".to_string()
    };
    println!(
        "{} [{i}] {} ({:?}, {:?}), driver: {} {}",
        if picked { "*" } else { " " },
        info.name,
        info.backend,
        info.device_type,
        info.driver,
        info.driver_info
    );
    println!(
        "      subgroups: {subgroups}, shader_f16: {}, dot4: {}, max_storage_buffer_binding_size: {}, \
         max_buffer_size: {}, memory: {}",
        yes_no(caps.shader_f16),
        yes_no(caps.dot4),
        caps.max_storage_binding,
        caps.max_buffer,
        caps.device_memory
            .map_or("not reported".to_string(), |b| format!(
                "{:.2} GB",
                b as f64 / 1e9
            ))
    );
}

fn same_adapter(a: &wgpu::AdapterInfo, b: &wgpu::AdapterInfo) -> bool {
    (&a.name, a.backend, a.vendor, a.device) == (&b.name, b.backend, b.vendor, b.device)
}

/// `|gpu - cpu| / max(|cpu|, 1% of the largest |cpu|)`: relative, except that outputs near zero
/// (where a bias cancels the product) are measured against the output's overall magnitude, the
/// size of the rounding they carry.
fn max_relative_difference(gpu: &[f32], cpu: &[f32]) -> f64 {
    let largest = cpu.iter().fold(0.0f64, |m, &c| m.max(f64::from(c).abs()));
    let floor = (0.01 * largest).max(f64::MIN_POSITIVE);
    gpu.iter()
        .zip(cpu)
        .map(|(&g, &c)| {
            let (g, c) = (f64::from(g), f64::from(c));
            if g.is_nan() || c.is_nan() {
                f64::INFINITY
            } else {
                (g - c).abs() / c.abs().max(floor)
            }
        })
        .fold(0.0, f64::max)
}
