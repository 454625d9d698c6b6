//! `bitnet chat`: a conversation in the model's chat template, one user message per line of
//! stdin, each answer streamed as it is made, the earlier turns kept in the engine's cache.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bitnet_wgpu::chat::Conversation;
use bitnet_wgpu::model::{Generator, Stop};
use clap::Args;

use super::{CliResult, ModelArgs, SamplingArgs, open};

#[derive(Args)]
pub struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// A system message that starts the conversation (and every one after /reset).
    #[arg(long)]
    system: Option<String>,
    /// Stop an answer after this many tokens (or earlier, at the template's end of turn).
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
}

/// The line that starts a new conversation.
const RESET: &str = "/reset";

pub async fn chat(args: &ChatArgs) -> CliResult<()> {
    let params = args.sampling.params(args.max_new_tokens)?;
    let greedy = params.sampling.temperature == 0.0;
    let (engine, tokenizer) = open(&args.model, greedy).await?;
    let Some(template) = tokenizer.chat_template().cloned() else {
        return Err(no_template(args.model.model.as_ref()).into());
    };
    let mut generator = Generator::new(engine, tokenizer);
    let mut conversation = Conversation::new(template, args.system.clone());

    // Ctrl-C during an answer stops the answer; at the prompt it quits.
    let answering = Arc::new(AtomicBool::new(false));
    let cancel = Arc::new(AtomicBool::new(false));
    let (flag_answering, flag_cancel) = (answering.clone(), cancel.clone());
    ctrlc::set_handler(move || {
        if flag_answering.load(Ordering::SeqCst) {
            flag_cancel.store(true, Ordering::SeqCst);
        } else {
            std::process::exit(130);
        }
    })?;

    let json = args.model.json;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!(
            "chatting with {} on {}: one message per line, {RESET} starts over, Ctrl-C stops an \
             answer, Ctrl-D quits",
            generator.engine().config().family.name(),
            generator.engine().adapter()
        );
    }
    let mut out = std::io::stdout().lock();
    let mut lines = std::io::stdin().lock().lines();
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next().transpose()? else {
            return Ok(());
        };
        let message = line.trim();
        if message.is_empty() {
            continue;
        }
        if message == RESET {
            conversation.reset();
            generator.engine_mut().reset();
            eprintln!("(a new conversation)");
            continue;
        }
        cancel.store(false, Ordering::SeqCst);
        answering.store(true, Ordering::SeqCst);
        let mut shown = Ok(());
        let result = conversation
            .reply(&mut generator, message, &params, |piece| {
                if !json {
                    shown = out.write_all(piece.as_bytes()).and_then(|()| out.flush());
                }
                shown.is_ok() && !cancel.load(Ordering::SeqCst)
            })
            .await;
        answering.store(false, Ordering::SeqCst);
        shown?;
        let generation = match result {
            Ok(generation) => generation,
            // A full context or a message the template refuses ends the turn, not the program.
            Err(e) => {
                eprintln!("error: {e}");
                continue;
            }
        };
        if json {
            let line = serde_json::json!({
                "prompt_ids": generation.prompt_ids,
                "prefilled": generation.prefilled,
                "generated_ids": generation.generated_ids,
                "text": generation.text,
                "stop": format!("{:?}", generation.stop),
            });
            writeln!(out, "{line}")?;
        } else {
            writeln!(out)?;
        }
        match generation.stop {
            Stop::EndOfSequence => {}
            Stop::MaxNewTokens => eprintln!("(cut at --max-new-tokens)"),
            Stop::ContextFull => {
                eprintln!("(the model's context is full: {RESET} starts a new conversation)")
            }
            Stop::Cancelled => eprintln!("(stopped)"),
        }
    }
}

/// Why there is no chat: the model has no template.
fn no_template(model: Option<&PathBuf>) -> String {
    match model {
        None => "the built-in demo model has no chat template; give --model a chat model (a \
                 folder whose tokenizer_config.json has a chat_template, or a GGUF file with \
                 tokenizer.chat_template)"
            .into(),
        Some(path) => format!(
            "{}: the model has no chat template (no chat_template in tokenizer_config.json, no \
             chat_template.jinja, no tokenizer.chat_template in a GGUF file); `bitnet generate` \
             continues plain text",
            path.display()
        ),
    }
}
