//! `bitnet chat` on a tiny model folder with Llama 3's chat template, its messages piped on
//! stdin.
#![cfg(not(target_arch = "wasm32"))]

use std::path::Path;

use serde_json::Value;

#[path = "support/chat_model.rs"]
mod chat_model;
#[path = "support/cli.rs"]
mod cli;
use chat_model::ChatModel;
use cli::{bitnet, json_lines};

fn path_str(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// The Llama 3 rendering of a conversation, with the start of the answer.
fn llama3(messages: &[(&str, &str)]) -> String {
    let mut text = String::from("<|begin_of_text|>");
    for (role, content) in messages {
        text += &format!(
            "<|start_header_id|>{role}<|end_header_id|>\n\n{}<|eot_id|>",
            content.trim()
        );
    }
    text + "<|start_header_id|>assistant<|end_header_id|>\n\n"
}

const SAMPLING: [&str; 6] = [
    "--device",
    "cpu",
    "--temperature",
    "0",
    "--max-new-tokens",
    "6",
];

/// Each turn's answer is `generate --temperature 0` of the rendered conversation; the second
/// turn prefills only what follows the first turn's cached tokens; /reset starts over.
#[test]
fn chat_answers_as_generate_does_and_reuses_the_cache() {
    let model = ChatModel::new(true);
    let m = model.path();
    let mut args = vec!["chat", "--model", m, "--json", "--system", "Be brief."];
    args.extend(SAMPLING);
    let turns = json_lines(&bitnet(&args, "Hello\n\nAnd then?\n/reset\nHello\n"));
    assert_eq!(turns.len(), 3);
    let ids = |v: &Value| -> Vec<u64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect()
    };
    let first_answer = turns[0]["text"].as_str().unwrap();
    let conversations = [
        llama3(&[("system", "Be brief."), ("user", "Hello")]),
        llama3(&[
            ("system", "Be brief."),
            ("user", "Hello"),
            ("assistant", first_answer),
            ("user", "And then?"),
        ]),
    ];
    for (turn, text) in turns.iter().zip(&conversations) {
        // generate adds the tokenizer's bos itself.
        let prompt = text.strip_prefix("<|begin_of_text|>").unwrap();
        let mut args = vec!["generate", "--model", m, "--json", "--prompt", prompt];
        args.extend(SAMPLING);
        let generated = &json_lines(&bitnet(&args, ""))[0];
        assert_eq!(ids(&turn["prompt_ids"]), ids(&generated["prompt_ids"]));
        assert_eq!(
            ids(&turn["generated_ids"]),
            ids(&generated["generated_ids"])
        );
    }
    let [first, second, again] = [&turns[0], &turns[1], &turns[2]];
    let len = |v: &Value| v["prompt_ids"].as_array().unwrap().len() as u64;
    assert_eq!(first["prefilled"].as_u64().unwrap(), len(first));
    assert!(second["prefilled"].as_u64().unwrap() <= len(second) - len(first));
    assert_eq!(again["prompt_ids"], first["prompt_ids"]);
    assert_eq!(again["generated_ids"], first["generated_ids"]);

    // The GGUF `convert` writes carries the template (tokenizer.chat_template): the same turn.
    let gguf = model.0.with_extension("gguf");
    let converted = bitnet(
        &[
            "convert",
            "--format",
            "gguf",
            "--any-row-length",
            "--input",
            m,
            "--output",
            path_str(&gguf),
        ],
        "",
    );
    assert!(
        converted.status.success(),
        "{}",
        String::from_utf8_lossy(&converted.stderr)
    );
    let mut args = vec![
        "chat",
        "--model",
        path_str(&gguf),
        "--json",
        "--system",
        "Be brief.",
    ];
    args.extend(SAMPLING);
    let from_gguf = json_lines(&bitnet(&args, "Hello\n"));
    assert_eq!(from_gguf[0]["prompt_ids"], first["prompt_ids"]);
    assert_eq!(from_gguf[0]["generated_ids"], first["generated_ids"]);
    std::fs::remove_file(&gguf).unwrap();
}

/// Without a template, chat is an error that says so; so is a conversation past the context,
/// which ends the turn but not the program.
#[test]
fn chat_needs_a_template_and_room() {
    let plain = ChatModel::new(false);
    let output = bitnet(&["chat", "--model", plain.path()], "Hi\n");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no chat template"), "{stderr}");

    let output = bitnet(&["chat"], "Hi\n");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("demo model"),
        "{stderr}"
    );

    let model = ChatModel::new(true);
    let mut args = vec!["chat", "--model", model.path(), "--json"];
    args.extend(SAMPLING);
    let long = "word ".repeat(40);
    let output = bitnet(&args, &format!("{long}\nHi\n"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("context is full"), "{stderr}");
    assert_eq!(json_lines(&output).len(), 1);
}
