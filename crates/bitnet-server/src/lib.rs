//! `bitnet serve`: an OpenAI-compatible HTTP API (axum) over the engine's continuous-batching
//! scheduler. The HTTP layer only parses, validates, renders chat templates and formats
//! responses; every token is produced by `bitnet_engine::scheduler`.

// Handlers return ready-made error responses on the cold error path; their size is fine.
#![allow(clippy::result_large_err)]

mod api;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use bitnet_engine::chat::ChatTemplate;
use bitnet_engine::sampler::SamplingParams;
use bitnet_engine::scheduler::Scheduler;
use bitnet_engine::Model;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub model_path: PathBuf,
    /// Name reported by /v1/models and in responses.
    pub model_name: String,
    /// Sequences decoded together (slots).
    pub n_parallel: usize,
    /// Context per slot: the KV cache holds n_parallel x n_ctx tokens.
    pub n_ctx: usize,
    pub api_key: Option<String>,
    /// Requests waiting for a slot before new ones get 503.
    pub max_queue: usize,
    /// Largest request body in bytes.
    pub body_limit: usize,
    /// Sampling defaults (the same options as `bitnet run`); requests override them.
    pub defaults: SamplingParams,
    /// Default max_tokens when a request gives none (None: until the context is full).
    pub default_max_tokens: Option<usize>,
    /// How long in-flight requests may run after SIGTERM before the process exits anyway.
    pub shutdown_grace: Duration,
    /// How to load the model (`--no-mmap`).
    pub load: bitnet_engine::model::LoadOptions,
}

pub(crate) struct Loaded {
    pub model: Arc<Model>,
    pub sched: Scheduler,
    pub template: ChatTemplate,
}

pub struct AppState {
    pub cfg: ServerConfig,
    pub(crate) loaded: OnceLock<Result<Loaded, String>>,
    pub created: u64,
}

pub type SharedState = Arc<AppState>;

impl AppState {
    pub fn new(cfg: ServerConfig) -> SharedState {
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Arc::new(AppState {
            cfg,
            loaded: OnceLock::new(),
            created,
        })
    }

    /// Load the model and start the scheduler (blocking; run it off the async runtime).
    pub fn load(&self) -> Result<(), String> {
        let r = (|| -> Result<Loaded, String> {
            let model = Arc::new(
                Model::load_with(&self.cfg.model_path, &self.cfg.load)
                    .map_err(|e| e.to_string())?,
            );
            for w in &model.warnings {
                eprintln!("warning: {w}");
            }
            let tok = model.tokenizer.clone().ok_or_else(|| {
                format!(
                    "{}: the model has no tokenizer",
                    self.cfg.model_path.display()
                )
            })?;
            let template = ChatTemplate::for_tokenizer(&tok).map_err(|e| e.to_string())?;
            let sched = Scheduler::start(
                model.clone(),
                self.cfg.n_parallel,
                self.cfg.n_ctx,
                self.cfg.max_queue,
            );
            Ok(Loaded {
                model,
                sched,
                template,
            })
        })();
        let out = r.as_ref().map(|_| ()).map_err(|e| e.clone());
        let _ = self.loaded.set(r);
        out
    }

    pub(crate) fn ready(&self) -> Result<&Loaded, Response> {
        match self.loaded.get() {
            Some(Ok(l)) => Ok(l),
            Some(Err(e)) => Err(api::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable_error",
                &format!("the model failed to load: {e}"),
            )),
            None => Err(api::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable_error",
                "the model is still loading",
            )),
        }
    }

    /// Stop the scheduler (queued requests are dropped): after its running requests finish, or
    /// with `abort` at the end of the current step.
    pub fn shutdown(&self, abort: bool) {
        if let Some(Ok(l)) = self.loaded.get() {
            if abort {
                l.sched.abort();
            } else {
                l.sched.shutdown();
            }
        }
    }
}

/// Every route. `/health` needs no API key (as in llama-server); everything else does when
/// one is configured.
pub fn router(state: SharedState) -> Router {
    Router::new()
        .route("/health", get(api::health))
        .route("/v1/models", get(api::models))
        .route("/v1/chat/completions", post(api::chat_completions))
        .route("/v1/completions", post(api::completions))
        .route("/metrics", get(api::metrics))
        .route("/tokenize", post(api::tokenize))
        .route("/detokenize", post(api::detokenize))
        .fallback(api::not_found)
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}

async fn auth(State(st): State<SharedState>, req: Request<Body>, next: Next) -> Response {
    if let Some(key) = &st.cfg.api_key {
        if req.uri().path() != "/health" {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            if !given.is_some_and(|g| keys_match(g, key)) {
                return api::error(
                    StatusCode::UNAUTHORIZED,
                    "authentication_error",
                    "invalid or missing API key (send Authorization: Bearer KEY)",
                );
            }
        }
    }
    next.run(req).await.into_response()
}

/// Whether a presented API key is the configured one. Every byte is compared whatever
/// differs first, so the time taken does not tell how much of a guess was right.
fn keys_match(given: &str, key: &str) -> bool {
    let (g, k) = (given.as_bytes(), key.as_bytes());
    let diff = g.iter().zip(k).fold(0u8, |acc, (a, b)| acc | (a ^ b));
    g.len() == k.len() && std::hint::black_box(diff) == 0
}

/// Serve on `listener` until `shutdown` resolves; then stop accepting, give in-flight requests
/// `shutdown_grace` to finish, stop the scheduler and return.
pub async fn serve(
    state: SharedState,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let loader = state.clone();
    tokio::task::spawn_blocking(move || {
        if let Err(e) = loader.load() {
            eprintln!("error: {e}");
        }
    });
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let grace = state.cfg.shutdown_grace;
    let app = router(state.clone());
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = tx.send(());
    });
    let server = async move { server.await };
    tokio::pin!(server);
    // Connections run in tasks of their own, which outlive `server` when the grace period
    // ends first: then the scheduler drops the generations still running (their clients see
    // the stream end), rather than waiting for them.
    let (res, graceful) = tokio::select! {
        r = &mut server => (r, true),
        _ = async { let _ = rx.await; tokio::time::sleep(grace).await; } => (Ok(()), false),
    };
    let st = state.clone();
    let _ = tokio::task::spawn_blocking(move || st.shutdown(!graceful)).await;
    res
}
