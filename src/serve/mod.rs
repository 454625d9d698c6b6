//! An OpenAI-compatible HTTP server: `POST /v1/chat/completions` and `POST /v1/completions`
//! (streamed as server-sent events or not), `GET /v1/models`, `GET /health`.
//!
//! Requests are decoded together: the CPU engine runs every active sequence's next token in one
//! forward (continuous batching: requests join between steps and leave when they end), each
//! sequence with its own KV cache and getting the tokens it would get alone. A GPU engine, whose
//! cache lives on the device, answers one request at a time, the others waiting in the queue.
//! Bad requests get a 400 with OpenAI's error object; past the queue's limit, a 429; a client
//! that goes away cancels its sequence.
//!
//! ```
//! use bitnet_wgpu::model::{Device, Engine, ModelConfig, synthetic};
//! use bitnet_wgpu::serve::{ServeOptions, serve};
//! use bitnet_wgpu::tokenizer::Tokenizer;
//! # tokio::runtime::Runtime::new()?.block_on(async {
//! let config = ModelConfig {
//!     vocab_size: 258,
//!     hidden_size: 64,
//!     intermediate_size: 128,
//!     num_hidden_layers: 1,
//!     num_attention_heads: 4,
//!     num_key_value_heads: 2,
//!     head_dim: 16,
//!     max_position_embeddings: 64,
//!     ..ModelConfig::bitnet_b158_2b4t()
//! };
//! let (engine, _) = Engine::new(Device::Cpu, &synthetic(&config, 7)).await?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! println!("listening on http://{}", listener.local_addr()?);
//! let until_ctrl_c = async {
//!     tokio::signal::ctrl_c().await.ok();
//! };
//! # let until_ctrl_c = async {};
//! serve(listener, engine, Tokenizer::bytes(258), ServeOptions::new("tiny"), until_ctrl_c).await?;
//! # Ok::<(), Box<dyn std::error::Error>>(()) })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod api;
mod batch;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::chat::ChatTemplate;
use crate::model::{Engine, Sampler};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};
use api::{Ask, BadRequest, ChatRequest, CompletionRequest, Options, check_context};
use batch::{Backend, Batcher, Event, Finish, Job};

/// How [`serve`] runs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The model's name in `/v1/models`, which requests must give as `model`.
    pub model_name: String,
    /// Sequences decoded together (the CPU engine; a GPU engine runs one).
    pub max_batch: usize,
    /// Requests waiting beyond those decoding; more get HTTP 429.
    pub max_queue: usize,
    /// Positions per sequence (prompt and answer); `None`: the model's context.
    pub context: Option<usize>,
    /// When set, every `/v1` request must carry `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// The largest request body accepted, in bytes.
    pub max_body_bytes: usize,
}

impl ServeOptions {
    /// Defaults for `model_name`: 16 sequences together, 64 waiting, the model's context, no
    /// key, bodies up to 4 MiB.
    pub fn new(model_name: impl Into<String>) -> Self {
        ServeOptions {
            model_name: model_name.into(),
            max_batch: 16,
            max_queue: 64,
            context: None,
            api_key: None,
            max_body_bytes: 4 << 20,
        }
    }
}

struct AppState {
    batcher: Batcher,
    tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    options: ServeOptions,
    context: usize,
    vocab: usize,
    /// When the server started, for `/v1/models`.
    created: u64,
    /// Makes request ids unique.
    requests: AtomicU64,
}

/// Serves `engine` on `listener` until `shutdown` completes; then stops accepting requests,
/// finishes those in flight and returns. Errors: a `context` option of 0 or past the model's,
/// a zero `max_batch`, and the listener's.
pub async fn serve(
    listener: TcpListener,
    engine: Engine,
    tokenizer: Tokenizer,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let model_context = engine.config().max_position_embeddings;
    let context = options.context.unwrap_or(model_context);
    if context == 0 || context > model_context {
        return Err(Error::invalid(
            "context",
            format!("{context} is not between 1 and the model's context of {model_context}"),
        ));
    }
    if options.max_batch == 0 {
        return Err(Error::invalid("max batch", "it must be at least 1"));
    }
    let vocab = engine.config().vocab_size;
    let tokenizer = Arc::new(tokenizer);
    let batcher = Batcher::start(
        Backend::new(engine),
        tokenizer.clone(),
        options.max_batch,
        options.max_queue,
        context,
    );
    let state = Arc::new(AppState {
        batcher,
        template: tokenizer.chat_template().cloned(),
        tokenizer,
        options,
        context,
        vocab,
        created: unix_time(),
        requests: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .fallback(not_found)
        .with_state(state.clone());
    let io = |e: std::io::Error| Error::Io {
        path: "server".into(),
        source: e,
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(io)?;
    // The batch thread ends once the last request's state is gone.
    drop(state);
    Ok(())
}

fn unix_time() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An error response in OpenAI's shape.
fn error(status: StatusCode, kind: &str, message: &str, param: Option<&str>) -> Response {
    let body = json!({
        "error": { "message": message, "type": kind, "param": param, "code": Value::Null }
    });
    (status, axum::Json(body)).into_response()
}

fn bad_request(e: BadRequest) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        &e.message,
        e.param,
    )
}

async fn not_found() -> Response {
    error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "no such endpoint: the server has POST /v1/chat/completions, POST /v1/completions, \
         GET /v1/models and GET /health",
        None,
    )
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    axum::Json(json!({ "status": "ok", "load": state.batcher.load() })).into_response()
}

impl AppState {
    /// Refuses a request without the server's key, when it has one.
    fn authorize(&self, headers: &HeaderMap) -> std::result::Result<(), Response> {
        let Some(key) = &self.options.api_key else {
            return Ok(());
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given == Some(key.as_str()) {
            Ok(())
        } else {
            Err(error(
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "a missing or wrong API key: send Authorization: Bearer <key>",
                None,
            ))
        }
    }

    /// The request's JSON body, within the size limit, as `T`. A body announced larger than
    /// the limit is refused before it is read.
    async fn body<T: serde::de::DeserializeOwned>(
        &self,
        headers: &HeaderMap,
        body: Body,
    ) -> std::result::Result<T, Response> {
        let limit = self.options.max_body_bytes;
        let too_large = || {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                &format!("the request body is larger than {limit} bytes"),
                None,
            )
        };
        let announced = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if announced.is_some_and(|len| len > limit as u64) {
            return Err(too_large());
        }
        let bytes: Bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            let over_limit = std::iter::from_fn(|| {
                let error = source?;
                source = error.source();
                Some(error)
            })
            .any(|error| error.is::<http_body_util::LengthLimitError>());
            if over_limit {
                too_large()
            } else {
                bad_request(BadRequest::new(
                    None,
                    format!("the request body could not be read: {e}"),
                ))
            }
        })?;
        serde_json::from_slice(&bytes).map_err(|e| {
            bad_request(BadRequest::new(
                None,
                format!("the body is not a valid request: {e}"),
            ))
        })
    }

    fn check_model(&self, model: &str) -> std::result::Result<(), Response> {
        if model == self.options.model_name {
            Ok(())
        } else {
            Err(bad_request(BadRequest::new(
                Some("model"),
                format!(
                    "no model {model:?} here: this server runs {:?}",
                    self.options.model_name
                ),
            )))
        }
    }

    fn next_id(&self, prefix: &str) -> String {
        let n = self.requests.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:x}{n:06x}", self.created)
    }

    /// Queues the job, answering 429 when the queue is full.
    fn submit(&self, job: Job) -> std::result::Result<(), Response> {
        if self.batcher.submit(job) {
            return Ok(());
        }
        Err(error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            &format!(
                "the server is busy ({} requests decoding or waiting); try again later",
                self.batcher.load()
            ),
            None,
        ))
    }
}

async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(r) = state.authorize(&headers) {
        return r;
    }
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": state.options.model_name,
            "object": "model",
            "created": state.created,
            "owned_by": "bitnet-wgpu",
        }],
    }))
    .into_response()
}

/// Which endpoint a response is for: its object names and how a piece of text is wrapped.
#[derive(Clone, Copy)]
enum Kind {
    Chat,
    Completion,
}

impl Kind {
    fn id_prefix(self) -> &'static str {
        match self {
            Kind::Chat => "chatcmpl",
            Kind::Completion => "cmpl",
        }
    }

    fn object(self, streamed: bool) -> &'static str {
        match (self, streamed) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    /// A whole answer's choice.
    fn choice(self, text: &str, finish: Finish) -> Value {
        match self {
            Kind::Chat => json!({
                "index": 0,
                "message": { "role": "assistant", "content": text },
                "logprobs": Value::Null,
                "finish_reason": finish.as_str(),
            }),
            Kind::Completion => json!({
                "index": 0,
                "text": text,
                "logprobs": Value::Null,
                "finish_reason": finish.as_str(),
            }),
        }
    }

    /// A streamed piece's choice: `text`, or (with `finish`) the end.
    fn delta(self, text: Option<&str>, finish: Option<Finish>) -> Value {
        let finish = finish.map(Finish::as_str);
        match self {
            Kind::Chat => {
                let delta = text.map_or(json!({}), |t| json!({ "content": t }));
                json!({ "index": 0, "delta": delta, "logprobs": Value::Null, "finish_reason": finish })
            }
            Kind::Completion => json!({
                "index": 0,
                "text": text.unwrap_or(""),
                "logprobs": Value::Null,
                "finish_reason": finish,
            }),
        }
    }
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let prepared = async {
        state.authorize(&headers)?;
        let request: ChatRequest = state.body(&headers, body).await?;
        state.check_model(&request.model)?;
        let ids = request
            .prompt_ids(state.template.as_ref(), &state.tokenizer)
            .map_err(bad_request)?;
        check_context(ids.len(), state.context, "messages").map_err(bad_request)?;
        let stop_ids = state
            .template
            .as_ref()
            .map_or(Vec::new(), |t| t.end_of_turn().to_vec());
        Ok((request.options, ids, stop_ids))
    }
    .await;
    answer(&state, Kind::Chat, prepared).await
}

async fn completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let prepared = async {
        state.authorize(&headers)?;
        let request: CompletionRequest = state.body(&headers, body).await?;
        state.check_model(&request.model)?;
        let ids = request
            .prompt_ids(&state.tokenizer, state.vocab)
            .map_err(bad_request)?;
        check_context(ids.len(), state.context, "prompt").map_err(bad_request)?;
        let stop_ids = state.tokenizer.eos().into_iter().collect();
        Ok((request.options, ids, stop_ids))
    }
    .await;
    answer(&state, Kind::Completion, prepared).await
}

/// What a request asks, its prompt's ids and the ids that end its answer; or the response
/// that refuses it.
type Prepared = std::result::Result<(Options, Vec<u32>, Vec<u32>), Response>;

/// Queues the checked request and answers it, streamed or whole.
async fn answer(state: &Arc<AppState>, kind: Kind, prepared: Prepared) -> Response {
    let (options, prompt_ids, stop_ids) = match prepared {
        Ok(prepared) => prepared,
        Err(response) => return response,
    };
    let id = state.next_id(kind.id_prefix());
    let seed = unix_time() ^ state.requests.load(Ordering::Relaxed).rotate_left(32);
    let Ask {
        max_tokens,
        sampling,
        stop_texts,
    } = match options.check(state.context, seed) {
        Ok(ask) => ask,
        Err(e) => return bad_request(e),
    };
    let sampler = match Sampler::new(sampling) {
        Ok(sampler) => sampler,
        Err(e) => return bad_request(BadRequest::new(None, e.to_string())),
    };
    let (events, mut receiver) = mpsc::unbounded_channel();
    let job = Job {
        id: id.clone(),
        prompt_ids,
        stop_ids,
        stop_texts,
        max_tokens,
        sampler,
        events,
    };
    if let Err(r) = state.submit(job) {
        return r;
    }
    let created = unix_time();
    let head = json!({
        "id": id,
        "object": kind.object(options.stream),
        "created": created,
        "model": state.options.model_name,
    });
    if options.stream {
        return stream(head, kind, options.include_usage(), receiver);
    }
    let mut text = String::new();
    while let Some(event) = receiver.recv().await {
        match event {
            Event::Text(piece) => text += &piece,
            Event::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            } => {
                let mut body = head;
                body["choices"] = json!([kind.choice(&text, finish)]);
                body["usage"] = usage(prompt_tokens, completion_tokens);
                return axum::Json(body).into_response();
            }
            Event::Failed(why) => return server_error(&why),
        }
    }
    server_error("the request was dropped")
}

fn server_error(why: &str) -> Response {
    error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", why, None)
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// The answer as server-sent events: a chunk per piece of text, one with the finish reason,
/// the usage if asked, then `[DONE]`. The events are formed by a task of their own, so that a
/// client that leaves drops the stream, the task's sender fails and the job is cancelled.
fn stream(
    head: Value,
    kind: Kind,
    include_usage: bool,
    mut events: mpsc::UnboundedReceiver<Event>,
) -> Response {
    let (sender, receiver) = mpsc::channel::<std::result::Result<SseEvent, Infallible>>(16);
    tokio::spawn(async move {
        let chunk = |choices: Value, usage: Option<Value>| {
            let mut body = head.clone();
            body["choices"] = choices;
            if let Some(usage) = usage {
                body["usage"] = usage;
            } else if include_usage {
                body["usage"] = Value::Null;
            }
            Ok(SseEvent::default().data(body.to_string()))
        };
        if let Kind::Chat = kind {
            let role = json!([{ "index": 0, "delta": { "role": "assistant", "content": "" },
                                 "logprobs": Value::Null, "finish_reason": Value::Null }]);
            if sender.send(chunk(role, None)).await.is_err() {
                return;
            }
        }
        while let Some(event) = events.recv().await {
            let sent = match event {
                Event::Text(piece) => {
                    sender
                        .send(chunk(json!([kind.delta(Some(&piece), None)]), None))
                        .await
                }
                Event::Done {
                    finish,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    let _ = sender
                        .send(chunk(json!([kind.delta(None, Some(finish))]), None))
                        .await;
                    if include_usage {
                        let usage = usage(prompt_tokens, completion_tokens);
                        let _ = sender.send(chunk(json!([]), Some(usage))).await;
                    }
                    break;
                }
                Event::Failed(why) => {
                    let body = json!({ "error": { "message": why, "type": "server_error",
                                                  "param": Value::Null, "code": Value::Null } });
                    let _ = sender
                        .send(Ok(SseEvent::default().data(body.to_string())))
                        .await;
                    break;
                }
            };
            if sent.is_err() {
                return;
            }
        }
        let _ = sender.send(Ok(SseEvent::default().data("[DONE]"))).await;
    });
    Sse::new(ReceiverStream::new(receiver))
        .keep_alive(KeepAlive::default())
        .into_response()
}
