//! `bitnet serve` started on a free loopback port and spoken to over HTTP: OpenAI's shapes,
//! answers equal to `bitnet generate` and `bitnet chat`, concurrent requests decoded together
//! with each its solo answer, cancelling, the queue's limit, refused requests, shutdown.
#![cfg(not(target_arch = "wasm32"))]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use ureq::Agent;

#[path = "support/chat_model.rs"]
mod chat_model;
#[path = "support/cli.rs"]
mod cli;
use chat_model::ChatModel;
use cli::{bitnet, json_lines};

/// A running server; killed when dropped.
struct Server {
    child: Child,
    url: String,
    /// Its stderr so far: one line per request.
    log: Arc<Mutex<String>>,
    agent: Agent,
}

impl Server {
    /// `bitnet serve --port 0 --device cpu` with `args`, once it listens.
    fn start(args: &[&str]) -> Self {
        Server::start_on("cpu", args)
    }

    /// `bitnet serve --port 0 --device DEVICE` with `args`, once it listens.
    fn start_on(device: &str, args: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bitnet"))
            .args(["serve", "--port", "0", "--device", device])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the bitnet binary runs");
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut line = String::new();
            while stderr.read_line(&mut line).is_ok_and(|n| n > 0) {
                sink.lock().unwrap().push_str(&line);
                line.clear();
            }
        });
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let Some(url) = first.trim().strip_prefix("listening on ") else {
            std::thread::sleep(Duration::from_millis(200));
            panic!(
                "the server did not start: {first:?} {}",
                log.lock().unwrap()
            );
        };
        let agent = Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build()
            .new_agent();
        Server {
            url: url.to_string(),
            child,
            log,
            agent,
        }
    }

    fn get(&self, path: &str, key: Option<&str>) -> (u16, Value) {
        let mut request = self.agent.get(format!("{}{path}", self.url));
        if let Some(key) = key {
            request = request.header("Authorization", format!("Bearer {key}"));
        }
        let mut response = request.call().unwrap();
        let status = response.status().as_u16();
        (status, response.body_mut().read_json().unwrap())
    }

    /// POSTs `body` (raw bytes, so that bad JSON can be sent) with an optional key.
    fn post_raw(&self, path: &str, body: &[u8], key: Option<&str>) -> (u16, Value) {
        let mut request = self
            .agent
            .post(format!("{}{path}", self.url))
            .header("Content-Type", "application/json");
        if let Some(key) = key {
            request = request.header("Authorization", format!("Bearer {key}"));
        }
        let mut response = request.send(body).unwrap();
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap();
        let json = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{status} {text:?} is not JSON: {e}"));
        (status, json)
    }

    /// A POST whose headers announce a body of `len` bytes, without sending it: a server that
    /// refuses it from its length answers before the body (sent anyway, it would be cut off,
    /// and the connection reset under the answer).
    fn announce_body(&self, len: usize, key: &str) -> (u16, Value) {
        use std::io::Write;
        let address = self.url.strip_prefix("http://").unwrap();
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        write!(
            stream,
            "POST /v1/completions HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response.split(' ').nth(1).unwrap().parse().unwrap();
        let body = response.split("\r\n\r\n").nth(1).unwrap();
        (status, serde_json::from_str(body).unwrap())
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, body.to_string().as_bytes(), None)
    }

    /// A streamed request's events, once it started (status 200): a reader of its body.
    fn open_stream(&self, path: &str, body: &Value) -> Events {
        let mut body = body.clone();
        body["stream"] = json!(true);
        let response = self
            .agent
            .post(format!("{}{path}", self.url))
            .send_json(&body)
            .unwrap();
        assert_eq!(response.status().as_u16(), 200);
        let content_type = response.headers()["content-type"].to_str().unwrap();
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        Events(BufReader::new(Box::new(response.into_body().into_reader())))
    }

    /// Every event of a streamed request, up to `[DONE]` (which must come).
    fn stream(&self, path: &str, body: &Value) -> Vec<Value> {
        let mut events = self.open_stream(path, body);
        let mut all = Vec::new();
        loop {
            match events.next_event() {
                Some(Some(event)) => all.push(event),
                Some(None) => return all,
                None => panic!("the stream ended without [DONE] after {all:?}"),
            }
        }
    }

    /// Waits until no request is queued or decoding.
    fn wait_idle(&self) {
        let start = Instant::now();
        while self.get("/health", None).1["load"] != 0 {
            assert!(start.elapsed() < Duration::from_secs(30), "still busy");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The log once `lines` of its lines pass `wanted` (a request's line is written after its
    /// answer is sent).
    fn log_with(&self, lines: usize, wanted: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            let log = self.log();
            if log.lines().filter(|l| wanted(l)).count() >= lines {
                return log;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "{log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The log line of request `id`.
    fn log_line(&self, id: &str) -> String {
        let log = self.log_with(1, |l| l.starts_with(id));
        log.lines().find(|l| l.starts_with(id)).unwrap().to_string()
    }

    /// The name requests give as `model`.
    fn model(&self) -> String {
        let (status, models) = self.get("/v1/models", None);
        assert_eq!(status, 200, "{models}");
        models["data"][0]["id"].as_str().unwrap().to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Events(BufReader<Box<dyn Read + Send>>);

impl Events {
    /// The next event: `Some(Some(json))`, `Some(None)` for `[DONE]`, `None` at the end.
    fn next_event(&mut self) -> Option<Option<Value>> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.0.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if let Some(data) = line.trim_end().strip_prefix("data: ") {
                return Some((data != "[DONE]").then(|| serde_json::from_str(data).unwrap()));
            }
        }
    }
}

/// The text of a streamed answer, its finish reason and (when asked for) its usage.
fn streamed(events: &[Value], chat: bool) -> (String, String, Option<Value>) {
    let mut text = String::new();
    let mut finish = None;
    let mut usage = None;
    for event in events {
        if event["usage"].is_object() {
            usage = Some(event["usage"].clone());
        }
        let Some(choice) = event["choices"].get(0) else {
            continue;
        };
        let piece = if chat {
            &choice["delta"]["content"]
        } else {
            &choice["text"]
        };
        text += piece.as_str().unwrap_or("");
        if let Some(reason) = choice["finish_reason"].as_str() {
            assert!(finish.is_none(), "two finish reasons in {events:?}");
            finish = Some(reason.to_string());
        }
    }
    (text, finish.expect("a finish reason"), usage)
}

/// The JSON lines a `bitnet` command prints.
fn bitnet_lines(args: &[&str], stdin: &str) -> Vec<Value> {
    json_lines(&bitnet(args, stdin))
}

/// Completions (whole and streamed, text and token-id prompts, stop texts) are `bitnet
/// generate`'s greedy answer; a chat completion is `bitnet chat`'s.
#[test]
fn answers_are_those_of_generate_and_chat() {
    let model = ChatModel::new(true);
    let server = Server::start(&["--model", model.path()]);
    let name = server.model();
    let generated = &bitnet_lines(
        &[
            "generate",
            "--model",
            model.path(),
            "--device",
            "cpu",
            "--json",
            "--prompt",
            "Once upon",
            "--temperature",
            "0",
            "--max-new-tokens",
            "20",
        ],
        "",
    )[0];
    let want_text = generated["text"].as_str().unwrap();
    let prompt_ids = generated["prompt_ids"].as_array().unwrap().len();
    let new_ids = generated["generated_ids"].as_array().unwrap().len();
    let want_finish = if new_ids < 20 { "stop" } else { "length" };
    let request = json!({"model": name, "prompt": "Once upon", "max_tokens": 20,
                         "temperature": 0});
    let (status, whole) = server.post("/v1/completions", &request);
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "text_completion");
    assert!(whole["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(whole["model"], name.as_str());
    assert!(whole["created"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(whole["choices"][0]["text"], want_text);
    assert_eq!(whole["choices"][0]["finish_reason"], want_finish);
    assert_eq!(
        whole["usage"],
        json!({"prompt_tokens": prompt_ids, "completion_tokens": new_ids,
               "total_tokens": prompt_ids + new_ids})
    );
    let mut with_usage = request.clone();
    with_usage["stream_options"] = json!({"include_usage": true});
    let events = server.stream("/v1/completions", &with_usage);
    let (text, finish, usage) = streamed(&events, false);
    assert_eq!((text.as_str(), finish.as_str()), (want_text, want_finish));
    assert_eq!(usage.as_ref(), Some(&whole["usage"]));
    assert!(events.iter().all(|e| e["id"] == events[0]["id"]));
    // The prompt as ids: the same answer.
    let ids = generated["prompt_ids"].clone();
    let (_, by_ids) = server.post(
        "/v1/completions",
        &json!({"model": name, "prompt": ids, "max_tokens": 20, "temperature": 0}),
    );
    assert_eq!(by_ids["choices"][0]["text"], want_text);
    // A stop text: the answer ends before its first occurrence.
    let chars: Vec<char> = want_text.chars().collect();
    assert!(chars.len() >= 6, "{want_text:?}");
    let stop: String = chars[3..5].iter().collect();
    let cut = &want_text[..want_text.find(&stop).unwrap()];
    for stream in [false, true] {
        let request = json!({"model": name, "prompt": "Once upon", "max_tokens": 20,
                             "temperature": 0, "stop": [stop], "stream": stream});
        let (text, finish) = if stream {
            let (text, finish, _) = streamed(&server.stream("/v1/completions", &request), false);
            (json!(text), json!(finish))
        } else {
            let (_, answer) = server.post("/v1/completions", &request);
            let choice = &answer["choices"][0];
            (choice["text"].clone(), choice["finish_reason"].clone())
        };
        assert_eq!(
            (text, finish),
            (json!(cut), json!("stop")),
            "stream {stream}"
        );
    }

    let turns = bitnet_lines(
        &[
            "chat",
            "--model",
            model.path(),
            "--device",
            "cpu",
            "--json",
            "--system",
            "Be brief.",
            "--temperature",
            "0",
            "--max-new-tokens",
            "12",
        ],
        "Hello\nAnd then?\n",
    );
    let chat = &turns[0];
    let messages = json!([{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": [{"type": "text", "text": "Hello"}]}]);
    let request = json!({"model": name, "messages": messages, "max_completion_tokens": 12,
                         "temperature": 0});
    let (status, answer) = server.post("/v1/chat/completions", &request);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["object"], "chat.completion");
    assert_eq!(answer["choices"][0]["message"]["role"], "assistant");
    assert_eq!(answer["choices"][0]["message"]["content"], chat["text"]);
    let chat_ids = chat["generated_ids"].as_array().unwrap().len();
    assert_eq!(answer["usage"]["completion_tokens"], chat_ids);
    assert_eq!(
        answer["usage"]["prompt_tokens"],
        chat["prompt_ids"].as_array().unwrap().len()
    );
    let events = server.stream("/v1/chat/completions", &request);
    assert_eq!(events[0]["object"], "chat.completion.chunk");
    assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
    let (text, finish, usage) = streamed(&events, true);
    assert_eq!(json!(text), chat["text"]);
    assert_eq!(
        finish,
        answer["choices"][0]["finish_reason"].as_str().unwrap()
    );
    assert_eq!(usage, None);
    // The next turn, the whole conversation sent again: `bitnet chat`'s second answer; the
    // earlier requests' caches held its start.
    let mut request = request;
    request["messages"] = json!([{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Hello"},
                                 {"role": "assistant", "content": chat["text"]},
                                 {"role": "user", "content": "And then?"}]);
    let (_, second) = server.post("/v1/chat/completions", &request);
    assert_eq!(second["choices"][0]["message"]["content"], turns[1]["text"]);
    let line = server.log_line(second["id"].as_str().unwrap());
    let reused: usize = line
        .split(" reused)")
        .next()
        .unwrap()
        .rsplit('(')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        reused >= chat["prompt_ids"].as_array().unwrap().len(),
        "{line}"
    );
}

/// Sixteen streamed requests at once, greedy and sampled, of different prompts and lengths, are
/// decoded together and each gets the answer it gets alone.
#[test]
fn concurrent_requests_get_their_solo_answers() {
    let server = Server::start(&["--max-batch", "16"]);
    let name = server.model();
    let requests: Vec<Value> = (0..16)
        .map(|i| {
            let prompt = ["It was", "The whale", "Call me", "A ship"][i % 4].repeat(1 + i / 4);
            let temperature = if i % 3 == 0 { 0.9 } else { 0.0 };
            json!({"model": name, "prompt": prompt, "max_tokens": 24 + 4 * i,
                   "temperature": temperature, "top_k": 40, "seed": i})
        })
        .collect();
    let solo: Vec<(String, String, Option<Value>)> = requests
        .iter()
        .map(|r| {
            let (status, answer) = server.post("/v1/completions", r);
            assert_eq!(status, 200, "{answer}");
            let choice = &answer["choices"][0];
            (
                choice["text"].as_str().unwrap().to_string(),
                choice["finish_reason"].as_str().unwrap().to_string(),
                Some(answer["usage"].clone()),
            )
        })
        .collect();
    let server = Arc::new(server);
    let barrier = Arc::new(Barrier::new(requests.len()));
    let together: Vec<_> = requests
        .iter()
        .map(|r| {
            let (server, barrier) = (server.clone(), barrier.clone());
            let mut r = r.clone();
            r["stream_options"] = json!({"include_usage": true});
            std::thread::spawn(move || {
                barrier.wait();
                streamed(&server.stream("/v1/completions", &r), false)
            })
        })
        .collect();
    for (i, (handle, want)) in together.into_iter().zip(&solo).enumerate() {
        assert_eq!(&handle.join().unwrap(), want, "request {i}");
    }
    // Some of them shared a step.
    let log = server.log_with(32, |l| l.starts_with("cmpl-"));
    let largest = log
        .lines()
        .filter_map(|l| l.split("batches of up to ").nth(1))
        .filter_map(|rest| rest.split(')').next()?.parse::<usize>().ok())
        .max();
    assert!(largest.unwrap_or(0) > 1, "{log}");
    // This model has no chat template.
    let (status, error) = server.post(
        "/v1/chat/completions",
        &json!({"model": name, "messages": [{"role": "user", "content": "Hi"}]}),
    );
    assert_eq!(status, 400);
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("no chat template"), "{message}");
}

/// A client that leaves cancels its sequence; past the queue's limit a request gets 429; SIGTERM
/// lets the request in flight finish, then the server exits.
#[test]
fn cancelling_queueing_and_shutdown() {
    let server = Server::start(&["--max-batch", "1", "--max-queue", "3"]);
    let name = server.model();
    // The demo model's context is 256: each of these runs for ~250 steps, one at a time.
    let long = json!({"model": name, "prompt": "It", "max_tokens": 250, "temperature": 0});
    let mut first = server.open_stream("/v1/completions", &long);
    assert!(first.next_event().unwrap().is_some());
    let queued: Vec<Events> = (0..3)
        .map(|_| server.open_stream("/v1/completions", &long))
        .collect();
    let (status, busy) = server.post("/v1/completions", &long);
    assert_eq!(status, 429, "{busy}");
    assert_eq!(busy["error"]["type"], "rate_limit_error");
    drop(first);
    drop(queued);
    server.wait_idle();
    let log = server.log_with(4, |l| l.contains("cancelled"));
    let cancelled: Vec<&str> = log.lines().filter(|l| l.contains("cancelled")).collect();
    assert_eq!(cancelled.len(), 4, "{log}");
    assert!(cancelled.iter().all(|l| !l.contains("+ 250 new")), "{log}");

    let mut server = server;
    let mut last = server.open_stream("/v1/completions", &long);
    assert!(last.next_event().unwrap().is_some());
    let interrupted = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(interrupted.success());
    let mut events = 1;
    while let Some(Some(_)) = last.next_event() {
        events += 1;
    }
    // Every token's chunk (some tokens are only part of a character), the finish.
    assert!(events > 200, "{events} events");
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status} {}", server.log());
}

/// Bad requests get OpenAI's error object with the right status; the server goes on.
#[test]
fn bad_requests_are_refused_cleanly() {
    let model = ChatModel::new(true);
    let server = Server::start(&["--model", model.path(), "--context", "40", "--api-key", "k"]);
    let name = {
        let (status, models) = server.get("/v1/models", Some("k"));
        assert_eq!(status, 200);
        models["data"][0]["id"].as_str().unwrap().to_string()
    };
    let key = Some("k");
    let chat =
        |body: Value| server.post_raw("/v1/chat/completions", body.to_string().as_bytes(), key);
    let hello = json!([{"role": "user", "content": "Hello"}]);
    // What, the answer (status, body), the status wanted, the field the error names.
    type Case<'a> = (&'a str, (u16, Value), u16, Option<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "no key",
            server.post_raw("/v1/completions", b"{}", None),
            401,
            None,
        ),
        (
            "wrong key",
            server.post_raw("/v1/completions", b"{}", Some("x")),
            401,
            None,
        ),
        (
            "models without a key",
            server.get("/v1/models", None),
            401,
            None,
        ),
        (
            "bad JSON",
            server.post_raw("/v1/completions", b"{\"model\": ", key),
            400,
            None,
        ),
        (
            "not an object",
            server.post_raw("/v1/completions", b"[1]", key),
            400,
            None,
        ),
        (
            "unknown model",
            chat(json!({"model": "gpt-4", "messages": hello})),
            400,
            Some("model"),
        ),
        ("no messages", chat(json!({"model": name})), 400, None),
        (
            "empty messages",
            chat(json!({"model": name, "messages": []})),
            400,
            Some("messages"),
        ),
        (
            "temperature",
            chat(json!({"model": name, "messages": hello, "temperature": 7})),
            400,
            Some("temperature"),
        ),
        (
            "max_tokens past the context",
            chat(json!({"model": name, "messages": hello, "max_tokens": 41})),
            400,
            Some("max_tokens"),
        ),
        (
            "a prompt past the context",
            server.post_raw(
                "/v1/completions",
                json!({"model": name, "prompt": "x".repeat(60)})
                    .to_string()
                    .as_bytes(),
                key,
            ),
            400,
            Some("prompt"),
        ),
        (
            "a wrong type",
            chat(json!({"model": name, "messages": hello, "seed": "one"})),
            400,
            None,
        ),
        (
            "no such endpoint",
            server.post_raw("/v1/embeddings", b"{}", key),
            404,
            None,
        ),
        (
            "a body too large",
            server.announce_body(5 << 20, "k"),
            413,
            None,
        ),
    ];
    for (what, (status, body), want, param) in cases {
        assert_eq!(status, want, "{what}: {body}");
        let error = &body["error"];
        assert!(
            error["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {body}"
        );
        assert!(error["type"].is_string(), "{what}: {body}");
        if let Some(param) = param {
            assert_eq!(error["param"], param, "{what}: {body}");
        }
    }
    let (status, overflow) = chat(json!({"model": name, "messages": [{"role": "user",
                                         "content": "y".repeat(60)}]}));
    assert_eq!(status, 400);
    let message = overflow["error"]["message"].as_str().unwrap();
    assert!(message.contains("context holds 40"), "{message}");
    // Health needs no key; the server still answers.
    assert_eq!(server.get("/health", None).0, 200);
    let (status, answer) = chat(json!({"model": name, "messages": hello, "max_tokens": 3}));
    assert_eq!(status, 200, "{answer}");
    assert!(answer["usage"]["completion_tokens"].as_u64().unwrap() <= 3);
}

/// On a GPU (lavapipe in CI; an error, not a skip, without one) the server answers one request
/// at a time, each with `bitnet generate --device gpu`'s greedy answer.
#[test]
fn a_gpu_engine_answers_each_request_as_generate_does() {
    let model = ChatModel::new(true);
    let server = Server::start_on("gpu", &["--model", model.path()]);
    let name = server.model();
    let server = Arc::new(server);
    let prompts = ["Once upon", "A B C", "Hello there, how"];
    let answers: Vec<_> = prompts
        .iter()
        .map(|prompt| {
            let server = server.clone();
            let request = json!({"model": name, "prompt": prompt, "max_tokens": 16,
                                 "temperature": 0});
            std::thread::spawn(move || server.stream("/v1/completions", &request))
        })
        .collect();
    for (prompt, answer) in prompts.iter().zip(answers) {
        let (text, _, _) = streamed(&answer.join().unwrap(), false);
        let generated = &bitnet_lines(
            &[
                "generate",
                "--model",
                model.path(),
                "--device",
                "gpu",
                "--json",
                "--prompt",
                prompt,
                "--temperature",
                "0",
                "--max-new-tokens",
                "16",
            ],
            "",
        )[0];
        assert_eq!(json!(text), generated["text"], "{prompt}");
    }
    let log = server.log();
    assert_eq!(log.matches("batches of up to 1)").count(), 3, "{log}");
}
