//! `bitnet serve`: the OpenAI-compatible server (see crates/bitnet-server).

use crate::args::{init_threads, SamplingArgs};
use anyhow::{anyhow, Result};
use bitnet_server::{AppState, ServerConfig};
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Model: a GGUF file, a Hugging Face model directory, or a Hub reference OWNER/REPO[:X][@REV].
    #[arg(short = 'm', long, default_value = crate::args::DEFAULT_MODEL)]
    pub model: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Sequences decoded together (slots). The KV cache holds parallel x ctx-size tokens.
    #[arg(long = "parallel", visible_alias = "np", default_value_t = 4)]
    pub parallel: usize,
    /// Context per slot, in tokens: each request may use up to this many (prompt + answer).
    /// The KV cache holds --parallel x --ctx-size tokens.
    #[arg(short = 'c', long = "ctx-size", default_value_t = 2048)]
    pub ctx_size: usize,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health.
    #[arg(long = "api-key", env = "BITNET_API_KEY")]
    pub api_key: Option<String>,
    /// Compute threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Default max_tokens for requests that give none (default: until the slot's context is full).
    #[arg(short = 'n', long = "n-predict", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub n_predict: Option<usize>,
    /// Requests that may wait for a free slot; more get 503.
    #[arg(long = "queue-size", default_value_t = 64)]
    pub queue_size: usize,
    /// Largest request body, in bytes.
    #[arg(long = "body-limit", default_value_t = 4 << 20)]
    pub body_limit: usize,
    /// Model name reported by the API (default: the file or directory name).
    #[arg(long)]
    pub alias: Option<String>,
    #[command(flatten)]
    pub head: crate::args::HeadArg,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

pub fn run(a: ServeArgs) -> Result<()> {
    let defaults = a.sampling.params()?;
    init_threads(a.threads)?;
    if a.parallel == 0 || a.ctx_size < 2 {
        return Err(anyhow!(
            "--parallel must be at least 1 and --ctx-size at least 2"
        ));
    }
    let name = a.alias.clone().unwrap_or_else(|| {
        a.model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    });
    let model_path = crate::args::resolve_model_path(&a.model)?;
    let cfg = ServerConfig {
        model_path,
        model_name: name,
        n_parallel: a.parallel,
        n_ctx: a.ctx_size,
        api_key: a.api_key.clone(),
        max_queue: a.queue_size,
        body_limit: a.body_limit,
        defaults,
        default_max_tokens: a.n_predict,
        shutdown_grace: Duration::from_secs(30),
        load: a.head.load_options()?,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .map_err(|e| anyhow!("cannot listen on {}:{}: {e}", a.host, a.port))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "bitnet serve: listening on http://{addr} ({} slots x {} tokens); loading {}",
            a.parallel,
            a.ctx_size,
            a.model.display()
        );
        let state = AppState::new(cfg);
        bitnet_server::serve(state, listener, shutdown_signal()).await?;
        eprintln!("bitnet serve: stopped");
        Ok(())
    })
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("bitnet serve: shutting down (finishing in-flight requests)");
}
