//! Request parsing and response shapes of the OpenAI API (and llama-server's tokenize routes).

use crate::{Loaded, SharedState};
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bitnet_engine::chat::Message;
use bitnet_engine::sampler::{SamplingParams, TokenLogprobs};
use bitnet_engine::scheduler::{Event, FinishReason, Request as GenRequest, SubmitError};
use bitnet_engine::tokenizer::Tokenizer;
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

/// `{"error": {"message", "type", "code"}}` with the status.
pub fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({"error": {"message": message, "type": kind, "code": status.as_u16()}})),
    )
        .into_response()
}

fn bad_request(message: &str) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_request_error", message)
}

pub async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not_found_error", "no such endpoint")
}

/// Read and parse a JSON body ourselves, so that a body over the limit, malformed JSON and
/// wrong field types all become clear JSON errors.
async fn parse_body<T: for<'de> Deserialize<'de>>(
    st: &SharedState,
    body: Body,
) -> Result<T, Response> {
    let bytes = axum::body::to_bytes(body, st.cfg.body_limit)
        .await
        .map_err(|_| {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                &format!("request body larger than {} bytes", st.cfg.body_limit),
            )
        })?;
    serde_json::from_slice(&bytes).map_err(|e| bad_request(&format!("invalid request body: {e}")))
}

/// Run CPU-heavy request work (encoding a prompt of up to the body limit takes about a second)
/// with the runtime told, so that the other connections' tasks, streams and `/health` move to
/// another worker meanwhile. The server runs on a multi-threaded runtime.
fn off_runtime<R>(f: impl FnOnce() -> R) -> R {
    tokio::task::block_in_place(f)
}

pub async fn health(State(st): State<SharedState>) -> Response {
    match st.ready() {
        Ok(_) => axum::Json(json!({"status": "ok"})).into_response(),
        Err(_) if matches!(st.loaded.get(), Some(Err(_))) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable_error",
            "the model failed to load",
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "loading model"})),
        )
            .into_response(),
    }
}

pub async fn models(State(st): State<SharedState>) -> Response {
    axum::Json(json!({"object": "list", "data": [{"id": st.cfg.model_name, "object": "model", "created": st.created, "owned_by": "bitnet-rs"}]})).into_response()
}

pub async fn metrics(State(st): State<SharedState>) -> Response {
    let l = match st.ready() {
        Ok(l) => l,
        Err(r) => return r,
    };
    let m = l.sched.metrics();
    let cap = (l.sched.n_parallel * l.sched.n_ctx) as u64;
    let used = m.kv_tokens_used.load(Ordering::Relaxed);
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: String| {
        out.push_str(&format!(
            "# HELP bitnet_{name} {help}\n# TYPE bitnet_{name} {kind}\nbitnet_{name} {value}\n"
        ));
    };
    metric(
        "requests_total",
        "counter",
        "Generation requests accepted.",
        m.requests_total.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "requests_cancelled_total",
        "counter",
        "Requests cancelled because the client went away.",
        m.requests_cancelled.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "prompt_tokens_total",
        "counter",
        "Prompt tokens processed.",
        m.prompt_tokens_total.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "generated_tokens_total",
        "counter",
        "Tokens generated.",
        m.generated_tokens_total.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "generation_tokens_per_second",
        "gauge",
        "Generation throughput of the last batched step.",
        format!("{:.3}", m.generation_tps()),
    );
    metric(
        "queue_length",
        "gauge",
        "Requests waiting for a slot.",
        m.queue_len.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "active_slots",
        "gauge",
        "Slots generating now.",
        m.active_slots.load(Ordering::Relaxed).to_string(),
    );
    metric(
        "slots_total",
        "gauge",
        "Slots (--parallel).",
        l.sched.n_parallel.to_string(),
    );
    metric(
        "kv_cache_used_tokens",
        "gauge",
        "KV-cache positions in use.",
        used.to_string(),
    );
    metric(
        "kv_cache_capacity_tokens",
        "gauge",
        "KV-cache positions in all slots.",
        cap.to_string(),
    );
    metric(
        "kv_cache_usage_ratio",
        "gauge",
        "Fraction of the KV cache in use.",
        format!("{:.6}", used as f64 / cap.max(1) as f64),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

#[derive(Deserialize)]
struct TokenizeReq {
    content: String,
    #[serde(default)]
    add_special: bool,
    #[serde(default)]
    with_pieces: bool,
}

pub async fn tokenize(State(st): State<SharedState>, body: Body) -> Response {
    let l = match st.ready() {
        Ok(l) => l,
        Err(r) => return r,
    };
    let req: TokenizeReq = match parse_body(&st, body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let tok = l.model.tokenizer.as_ref().expect("checked at load");
    let ids = match off_runtime(|| tok.encode(&req.content, req.add_special)) {
        Ok(ids) => ids,
        Err(e) => return bad_request(&e.to_string()),
    };
    if req.with_pieces {
        let pieces: Vec<Value> = ids
            .iter()
            .map(|&id| {
                let b = tok.token_bytes(id);
                let piece = match std::str::from_utf8(b) {
                    Ok(s) => json!(s),
                    Err(_) => json!(b),
                };
                json!({"id": id, "piece": piece})
            })
            .collect();
        return axum::Json(json!({"tokens": pieces})).into_response();
    }
    axum::Json(json!({"tokens": ids})).into_response()
}

#[derive(Deserialize)]
struct DetokenizeReq {
    tokens: Vec<u32>,
}

pub async fn detokenize(State(st): State<SharedState>, body: Body) -> Response {
    let l = match st.ready() {
        Ok(l) => l,
        Err(r) => return r,
    };
    let req: DetokenizeReq = match parse_body(&st, body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let n = l.model.config.n_vocab;
    if let Some(bad) = req.tokens.iter().find(|&&t| t as usize >= n) {
        return bad_request(&format!(
            "token id {bad} is outside the vocabulary (0..{n})"
        ));
    }
    let tok = l.model.tokenizer.as_ref().expect("checked at load");
    axum::Json(json!({"content": tok.decode(&req.tokens)})).into_response()
}

/// A string or a list of strings (`stop`).
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// Message content: a string or a list of `{"type": "text", "text": ...}` parts.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct ChatMessageIn {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// Fields shared by both completion endpoints.
#[derive(Deserialize)]
struct Common {
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<usize>,
    #[serde(default)]
    min_p: Option<f32>,
    #[serde(default)]
    typical_p: Option<f32>,
    #[serde(default)]
    repeat_penalty: Option<f32>,
    #[serde(default)]
    repeat_last_n: Option<usize>,
    #[serde(default)]
    presence_penalty: Option<f32>,
    #[serde(default)]
    frequency_penalty: Option<f32>,
    #[serde(default)]
    logit_bias: Option<std::collections::HashMap<String, f32>>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    stop: Option<OneOrMany>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
}

#[derive(Deserialize)]
struct ChatReq {
    messages: Vec<ChatMessageIn>,
    #[serde(default)]
    logprobs: bool,
    #[serde(default)]
    top_logprobs: Option<usize>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
    Texts(Vec<String>),
}

#[derive(Deserialize)]
struct CompletionReq {
    prompt: Prompt,
    #[serde(default)]
    logprobs: Option<usize>,
    #[serde(default)]
    echo: bool,
    #[serde(flatten)]
    common: Common,
}

/// Sampling parameters of a request: the server defaults, overridden field by field.
fn sampling(st: &SharedState, c: &Common, n_vocab: usize) -> Result<SamplingParams, Response> {
    let d = &st.cfg.defaults;
    if let Some(n) = c.n {
        if n != 1 {
            return Err(bad_request("only n = 1 is supported"));
        }
    }
    let mut logit_bias: Vec<(u32, f32)> = Vec::new();
    for (k, v) in c.logit_bias.iter().flatten() {
        let id: u32 = k
            .parse()
            .map_err(|_| bad_request(&format!("logit_bias key {k:?} is not a token id")))?;
        // "5", "05" and "+5" are one token: each bias would add up past the allowed range.
        if logit_bias.iter().any(|&(seen, _)| seen == id) {
            return Err(bad_request(&format!(
                "logit_bias lists token {id} more than once (key {k:?})"
            )));
        }
        if !(-100.0..=100.0).contains(v) {
            return Err(bad_request(&format!(
                "logit_bias value {v} for token {id} must be between -100 and 100"
            )));
        }
        // OpenAI semantics: -100 bans a token.
        logit_bias.push((id, if *v <= -100.0 { f32::NEG_INFINITY } else { *v }));
    }
    let seed = match c.seed {
        Some(s) => s as u64,
        None => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    };
    let p = SamplingParams {
        temperature: c.temperature.unwrap_or(d.temperature),
        top_k: c.top_k.unwrap_or(d.top_k),
        top_p: c.top_p.unwrap_or(d.top_p),
        min_p: c.min_p.unwrap_or(d.min_p),
        typical_p: c.typical_p.unwrap_or(d.typical_p),
        repeat_penalty: c.repeat_penalty.unwrap_or(d.repeat_penalty),
        repeat_last_n: c.repeat_last_n.unwrap_or(d.repeat_last_n),
        presence_penalty: c.presence_penalty.unwrap_or(d.presence_penalty),
        frequency_penalty: c.frequency_penalty.unwrap_or(d.frequency_penalty),
        logit_bias,
        seed,
    };
    p.validate().map_err(|e| bad_request(&e.to_string()))?;
    p.validate_vocab(n_vocab)
        .map_err(|e| bad_request(&e.to_string()))?;
    Ok(p)
}

/// Longest stop sequence accepted, in bytes.
const MAX_STOP_BYTES: usize = 256;

fn stops(c: &Common) -> Result<Vec<String>, Response> {
    let v = match &c.stop {
        None => Vec::new(),
        Some(OneOrMany::One(s)) => vec![s.clone()],
        Some(OneOrMany::Many(v)) => v.clone(),
    };
    if v.len() > 16 {
        return Err(bad_request("at most 16 stop sequences"));
    }
    // Every stop string is searched for at every token, on the thread all slots share.
    if let Some(s) = v.iter().find(|s| s.len() > MAX_STOP_BYTES) {
        return Err(bad_request(&format!(
            "a stop sequence has {} bytes; at most {MAX_STOP_BYTES} are allowed",
            s.len()
        )));
    }
    Ok(v)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn request_id(prefix: &str) -> String {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{:x}{:04x}",
        now(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// What the endpoint-specific code needs to run a generation.
struct Job {
    prompt: Vec<u32>,
    params: SamplingParams,
    max_tokens: usize,
    stop: Vec<String>,
    logprobs: Option<usize>,
    stream: bool,
    include_usage: bool,
}

fn build_job(
    st: &SharedState,
    l: &Loaded,
    prompt: Vec<u32>,
    c: &Common,
    logprobs: Option<usize>,
) -> Result<Job, Response> {
    let n_ctx = l.sched.n_ctx;
    if prompt.is_empty() {
        return Err(bad_request("the prompt is empty"));
    }
    let n_vocab = l.model.config.n_vocab;
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= n_vocab) {
        return Err(bad_request(&format!(
            "token id {bad} is outside the vocabulary (0..{n_vocab})"
        )));
    }
    if prompt.len() >= n_ctx {
        return Err(bad_request(&format!("the prompt has {} tokens but a slot's context holds {n_ctx} (--ctx-size); shorten the prompt", prompt.len())));
    }
    let params = sampling(st, c, n_vocab)?;
    let room = n_ctx - prompt.len();
    let asked = c.max_completion_tokens.or(c.max_tokens);
    if asked == Some(0) {
        return Err(bad_request("max_tokens must be at least 1"));
    }
    let max_tokens = asked
        .or(st.cfg.default_max_tokens)
        .unwrap_or(room)
        .min(room);
    if let Some(n) = logprobs {
        if n > 20 {
            return Err(bad_request("top_logprobs / logprobs must be at most 20"));
        }
    }
    Ok(Job {
        prompt,
        params,
        max_tokens,
        stop: stops(c)?,
        logprobs,
        stream: c.stream,
        include_usage: c
            .stream_options
            .as_ref()
            .map(|o| o.include_usage)
            .unwrap_or(false),
    })
}

/// Submit to the scheduler; events arrive on the returned channel. Dropping the receiver
/// cancels the generation at its next token.
fn submit(l: &Loaded, job: &Job) -> Result<mpsc::UnboundedReceiver<Event>, Response> {
    let (tx, rx) = mpsc::unbounded_channel();
    let probe = tx.clone();
    let req = GenRequest {
        prompt: job.prompt.clone(),
        params: job.params.clone(),
        max_tokens: job.max_tokens,
        stop_strings: job.stop.clone(),
        logprobs: job.logprobs,
        sink: Box::new(move |ev| tx.send(ev).is_ok()),
        gone: Box::new(move || probe.is_closed()),
    };
    match l.sched.submit(req) {
        Ok(()) => Ok(rx),
        Err(SubmitError::Busy) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_busy",
            "all slots are busy and the wait queue is full; retry later",
        )),
        Err(SubmitError::ShuttingDown) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable_error",
            "the server is shutting down",
        )),
        Err(SubmitError::TooLong { prompt, n_ctx }) => Err(bad_request(&format!(
            "the prompt has {prompt} tokens but a slot's context holds {n_ctx}"
        ))),
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn piece(tok: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let b = tok.token_bytes(id).to_vec();
    (String::from_utf8_lossy(&b).into_owned(), b)
}

/// One token's entry in chat `logprobs.content`.
fn chat_logprob(tok: &Tokenizer, id: u32, lp: &TokenLogprobs) -> Value {
    let (text, bytes) = piece(tok, id);
    let top: Vec<Value> = lp
        .top
        .iter()
        .map(|&(t, l)| {
            let (s, b) = piece(tok, t);
            json!({"token": s, "logprob": finite(l), "bytes": b})
        })
        .collect();
    json!({"token": text, "logprob": finite(lp.chosen), "bytes": bytes, "top_logprobs": top})
}

/// JSON has no -inf; OpenAI reports -9999 for impossible tokens.
fn finite(x: f32) -> f32 {
    if x.is_finite() {
        x
    } else {
        -9999.0
    }
}

fn render_chat(l: &Loaded, req: &ChatReq) -> Result<Vec<u32>, Response> {
    if req.messages.is_empty() {
        return Err(bad_request("messages must not be empty"));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for m in &req.messages {
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "developer" | "tool"
        ) {
            return Err(bad_request(&format!("unknown message role {:?}", m.role)));
        }
        let content = match &m.content {
            None => String::new(),
            Some(Content::Text(s)) => s.clone(),
            Some(Content::Parts(parts)) => {
                let mut s = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return Err(bad_request(&format!(
                            "content part type {:?} is not supported (text only)",
                            p.kind
                        )));
                    }
                    s.push_str(p.text.as_deref().unwrap_or(""));
                }
                s
            }
        };
        let role = if m.role == "developer" {
            "system"
        } else {
            &m.role
        };
        messages.push(Message::new(role, &content));
    }
    let text = l
        .template
        .render(&messages, true)
        .map_err(|e| bad_request(&e.to_string()))?;
    let tok = l.model.tokenizer.as_ref().expect("checked at load");
    tok.encode(&text, true)
        .map_err(|e| bad_request(&e.to_string()))
}

pub async fn chat_completions(State(st): State<SharedState>, body: Body) -> Response {
    let l = match st.ready() {
        Ok(l) => l,
        Err(r) => return r,
    };
    let req: ChatReq = match parse_body(&st, body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let prompt = match off_runtime(|| render_chat(l, &req)) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let top = if req.logprobs {
        Some(req.top_logprobs.unwrap_or(0))
    } else {
        None
    };
    let job = match build_job(&st, l, prompt, &req.common, top) {
        Ok(j) => j,
        Err(r) => return r,
    };
    let rx = match submit(l, &job) {
        Ok(rx) => rx,
        Err(r) => return r,
    };
    let (id, created, model) = (request_id("chatcmpl"), now(), st.cfg.model_name.clone());
    let tok = l.model.tokenizer.clone().expect("checked at load");
    if job.stream {
        let head = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]});
        let include_usage = job.include_usage;
        let (id2, model2) = (id.clone(), model.clone());
        let format = move |ev| match ev {
            Event::Token {
                id: t,
                text,
                logprobs,
            } => {
                let lp = logprobs.map(|lp| json!({"content": [chat_logprob(&tok, t, &lp)]}));
                vec![
                    json!({"id": id2, "object": "chat.completion.chunk", "created": created, "model": model2,
                    "choices": [{"index": 0, "delta": {"content": text}, "logprobs": lp, "finish_reason": null}]}),
                ]
            }
            Event::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            } => {
                let mut v = vec![
                    json!({"id": id2, "object": "chat.completion.chunk", "created": created, "model": model2,
                    "choices": [{"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish.as_str()}]}),
                ];
                if include_usage {
                    v.push(json!({"id": id2, "object": "chat.completion.chunk", "created": created, "model": model2,
                        "choices": [], "usage": usage(prompt_tokens, completion_tokens)}));
                }
                v
            }
        };
        return sse(head, rx, format);
    }
    let (text, finish, pt, ct, lps) = match collect(rx).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let logprobs = top.map(|_| json!({"content": lps.iter().map(|(t, lp)| chat_logprob(&tok, *t, lp)).collect::<Vec<_>>()}));
    axum::Json(json!({"id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs, "finish_reason": finish.as_str()}],
        "usage": usage(pt, ct)}))
    .into_response()
}

type Collected = (
    String,
    FinishReason,
    usize,
    usize,
    Vec<(u32, TokenLogprobs)>,
);

/// Wait for the whole generation.
async fn collect(mut rx: mpsc::UnboundedReceiver<Event>) -> Result<Collected, Response> {
    let mut text = String::new();
    let mut lps = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token {
                id,
                text: t,
                logprobs,
            } => {
                text.push_str(&t);
                if let Some(lp) = logprobs {
                    lps.push((id, lp));
                }
            }
            Event::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            } => return Ok((text, finish, prompt_tokens, completion_tokens, lps)),
        }
    }
    Err(error(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable_error",
        "the generation was cancelled (server shutting down)",
    ))
}

/// Server-sent events: the first chunk, then the chunks `format` makes of each engine event,
/// then `data: [DONE]`. A forwarding task owns the engine's receiver: when the client goes
/// away (the response stream is dropped), it returns, the receiver drops and the scheduler
/// cancels the request, also while it is still queued or reading its prompt.
fn sse(
    head: Value,
    mut rx: mpsc::UnboundedReceiver<Event>,
    mut format: impl FnMut(Event) -> Vec<Value> + Send + 'static,
) -> Response {
    let (tx, out) = mpsc::unbounded_channel::<Result<SseEvent, Infallible>>();
    let _ = tx.send(Ok(SseEvent::default().data(head.to_string())));
    tokio::spawn(async move {
        loop {
            let ev = tokio::select! {
                ev = rx.recv() => ev,
                _ = tx.closed() => return,
            };
            let Some(ev) = ev else { return };
            let done = matches!(ev, Event::Done { .. });
            for chunk in format(ev) {
                if tx
                    .send(Ok(SseEvent::default().data(chunk.to_string())))
                    .is_err()
                {
                    return;
                }
            }
            if done {
                let _ = tx.send(Ok(SseEvent::default().data("[DONE]")));
                return;
            }
        }
    });
    Sse::new(UnboundedReceiverStream::new(out))
        .keep_alive(KeepAlive::default())
        .into_response()
}

pub async fn completions(State(st): State<SharedState>, body: Body) -> Response {
    let l = match st.ready() {
        Ok(l) => l,
        Err(r) => return r,
    };
    let req: CompletionReq = match parse_body(&st, body).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let tok = l.model.tokenizer.clone().expect("checked at load");
    let (prompt, prompt_text) = match &req.prompt {
        Prompt::Tokens(ids) => (ids.clone(), None),
        Prompt::Text(s) => match off_runtime(|| tok.encode(s, true)) {
            Ok(ids) => (ids, Some(s.clone())),
            Err(e) => return bad_request(&e.to_string()),
        },
        Prompt::Texts(v) if v.len() == 1 => match off_runtime(|| tok.encode(&v[0], true)) {
            Ok(ids) => (ids, Some(v[0].clone())),
            Err(e) => return bad_request(&e.to_string()),
        },
        Prompt::Texts(_) => return bad_request("only one prompt per request is supported"),
    };
    let job = match build_job(&st, l, prompt, &req.common, req.logprobs) {
        Ok(j) => j,
        Err(r) => return r,
    };
    let echo = if req.echo {
        prompt_text.unwrap_or_else(|| tok.decode(&job.prompt))
    } else {
        String::new()
    };
    let rx = match submit(l, &job) {
        Ok(rx) => rx,
        Err(r) => return r,
    };
    let (id, created, model) = (request_id("cmpl"), now(), st.cfg.model_name.clone());
    let legacy_lp = |tok: &Tokenizer, t: u32, lp: &TokenLogprobs| {
        let top: serde_json::Map<String, Value> = lp
            .top
            .iter()
            .map(|&(i, l)| (piece(tok, i).0, json!(finite(l))))
            .collect();
        (piece(tok, t).0, finite(lp.chosen), Value::Object(top))
    };
    if job.stream {
        let head = json!({"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"text": echo, "index": 0, "logprobs": null, "finish_reason": null}]});
        let include_usage = job.include_usage;
        let (id2, model2) = (id.clone(), model.clone());
        let format = move |ev| match ev {
            Event::Token {
                id: t,
                text,
                logprobs,
            } => {
                let lp = logprobs.map(|lp| {
                    let (s, l, top) = legacy_lp(&tok, t, &lp);
                    json!({"tokens": [s], "token_logprobs": [l], "top_logprobs": [top]})
                });
                vec![
                    json!({"id": id2, "object": "text_completion", "created": created, "model": model2,
                    "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": null}]}),
                ]
            }
            Event::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            } => {
                let mut v = vec![
                    json!({"id": id2, "object": "text_completion", "created": created, "model": model2,
                    "choices": [{"text": "", "index": 0, "logprobs": null, "finish_reason": finish.as_str()}]}),
                ];
                if include_usage {
                    v.push(json!({"id": id2, "object": "text_completion", "created": created, "model": model2,
                        "choices": [], "usage": usage(prompt_tokens, completion_tokens)}));
                }
                v
            }
        };
        return sse(head, rx, format);
    }
    let (text, finish, pt, ct, lps) = match collect(rx).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let logprobs = req.logprobs.map(|_| {
        let (mut toks, mut lpv, mut tops, mut offs) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        // `text_offset` counts characters of the returned text, as OpenAI's (Python string
        // indices): token t starts after the bytes of the echo and the tokens before it, and
        // that byte offset is turned into characters of `echo + text` (down to a character
        // boundary when a token ends inside one; clamped where a stop string was cut off).
        let full = format!("{echo}{text}");
        let (mut byte, mut seen, mut chars) = (echo.len(), 0, 0);
        for (t, lp) in &lps {
            let (s, l, top) = legacy_lp(&tok, *t, lp);
            let mut at = byte.min(full.len());
            while !full.is_char_boundary(at) {
                at -= 1;
            }
            if at > seen {
                chars += full[seen..at].chars().count();
                seen = at;
            }
            offs.push(chars);
            byte += tok.token_bytes(*t).len();
            toks.push(s);
            lpv.push(l);
            tops.push(top);
        }
        json!({"tokens": toks, "token_logprobs": lpv, "top_logprobs": tops, "text_offset": offs})
    });
    axum::Json(json!({"id": id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"text": echo + &text, "index": 0, "logprobs": logprobs, "finish_reason": finish.as_str()}],
        "usage": usage(pt, ct)}))
    .into_response()
}
