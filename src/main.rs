//! `bitnet`: the command-line program (native only; the browser uses the library directly).
// The browser has no command line: on wasm32 this binary is empty.
#![cfg_attr(target_arch = "wasm32", no_main)]
#![cfg(not(target_arch = "wasm32"))]

use std::process::ExitCode;

use bitnet_wgpu::BitLinear;
use bitnet_wgpu::cpu::{ScaleGranularity, WeightQuantOptions};
use bitnet_wgpu::gpu::{AdapterSummary, GpuContext};
use clap::{Args, Parser, Subcommand};

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
}

/// Largest relative difference between the GPU and CPU outputs that still counts as agreement.
/// The integer part is exact on both sides; only the final f32 division and bias add may differ
/// (WGSL allows 2.5 ulp for division), far below this.
const TOLERANCE: f64 = 1e-4;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Info(args) => match pollster::block_on(info(&args)) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
    }
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
            println!(
                "hint: install a Vulkan driver (Debian/Ubuntu: apt-get install mesa-vulkan-drivers \
                 gives the lavapipe software adapter); continuing on the CPU only"
            );
            None
        }
    };

    let (out, inp, rows) = (args.out_features, args.in_features, args.tokens);
    let mut rng = SplitMix64(args.seed);
    let weights: Vec<f32> = (0..out * inp).map(|_| rng.uniform()).collect();
    let bias: Vec<f32> = (0..out).map(|_| 0.1 * rng.uniform()).collect();
    let x: Vec<f32> = (0..rows * inp).map(|_| 4.0 * rng.uniform()).collect();
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
         max_buffer_size: {}",
        yes_no(caps.shader_f16),
        yes_no(caps.dot4),
        caps.max_storage_binding,
        caps.max_buffer
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

/// SplitMix64 (Steele, Lea, Flood 2014): a few lines of deterministic randomness, so the test
/// layer is the same on every machine without a dependency.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1), from the top 24 bits (exactly representable in f32).
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}
