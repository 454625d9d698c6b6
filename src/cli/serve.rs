//! `bitnet serve`: the model behind an OpenAI-compatible HTTP API ([`bitnet_wgpu::serve`]).

use std::io::Write;
use std::path::Path;

use bitnet_wgpu::model::{Engine, KvCache};
use bitnet_wgpu::serve::{ServeOptions, serve as run_server};
use clap::Args;

use super::{CliResult, ModelArgs, open};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The address to listen on; 0.0.0.0 opens the server to other machines.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// The port to listen on; 0 picks a free one (the address is printed on stdout).
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Requests decoded together, one batched forward per step (the CPU engine; a GPU engine
    /// answers one at a time).
    #[arg(long, default_value_t = 16)]
    max_batch: usize,
    /// Requests waiting beyond those decoding; more are refused with HTTP 429.
    #[arg(long, default_value_t = 64)]
    max_queue: usize,
    /// Positions per request, prompt and answer [default: the model's context].
    #[arg(long)]
    context: Option<usize>,
    /// Require `Authorization: Bearer KEY` on every /v1 request.
    #[arg(long, env = "BITNET_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
}

pub fn serve(args: &ServeArgs) -> CliResult<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // Each request chooses its sampling: the exact head unless asked otherwise.
        let (engine, tokenizer) = open(&args.model, false).await?;
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .map_err(|e| format!("cannot listen on {}:{}: {e}", args.host, args.port))?;
        let name = model_name(args.model.model.as_deref());
        let address = listener.local_addr()?;
        eprintln!(
            "serving {name} ({}, {}) with chat {}; Ctrl-C or SIGTERM stops",
            engine.config().family.name(),
            engine.adapter(),
            if tokenizer.chat_template().is_some() {
                "in its template"
            } else {
                "off (no chat template): /v1/completions only"
            }
        );
        if let Engine::Cpu(_) = engine {
            // Each sequence's cache grows with it, up to the context: say what that can reach.
            let c = engine.config();
            let per_position = KvCache::cpu_bytes_per_position(c);
            let context = args.context.unwrap_or(c.max_position_embeddings);
            eprintln!(
                "KV caches: up to {:.2} GB ({} sequences x {context} positions x {} KB); \
                 --max-batch and --context bound it",
                (args.max_batch * context * per_position) as f64 / 1e9,
                args.max_batch,
                per_position / 1000
            );
        }
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{address}")?;
        out.flush()?;
        drop(out);
        let options = ServeOptions {
            max_batch: args.max_batch,
            max_queue: args.max_queue,
            context: args.context,
            api_key: args.api_key.clone(),
            ..ServeOptions::new(name)
        };
        let shutdown = async {
            stop_signal().await;
            eprintln!("shutting down: finishing the requests in flight");
        };
        run_server(listener, engine, tokenizer, options, shutdown).await?;
        Ok(())
    })
}

/// The name requests give as `model`: the file's or folder's name without its extension, or
/// `demo` for the built-in model.
fn model_name(path: Option<&Path>) -> String {
    path.and_then(|p| p.file_stem())
        .map_or("demo".into(), |s| s.to_string_lossy().into_owned())
}

/// Ctrl-C, or (on Unix) SIGTERM, as service managers and containers stop a program.
async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
