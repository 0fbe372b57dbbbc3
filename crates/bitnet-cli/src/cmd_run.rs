//! `bitnet run`: generate a continuation of a prompt and stream it to stdout.

use crate::args::{init_threads, load_model, SamplingArgs};
use anyhow::{anyhow, Result};
use bitnet_engine::chat::{ChatTemplate, Message, StopStrings};
use bitnet_engine::generate::{generate, StopReason};
use bitnet_engine::sampler::Sampler;
use bitnet_engine::tokenizer::StreamDecoder;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Model: a GGUF file, a Hugging Face model directory, or a Hub reference
    /// OWNER/REPO[:FILE_OR_QUANT][@REVISION] (downloaded into the Hugging Face cache).
    #[arg(short = 'm', long, default_value = crate::args::DEFAULT_MODEL)]
    pub model: PathBuf,
    /// The prompt.
    #[arg(
        short = 'p',
        long,
        required_unless_present = "file",
        conflicts_with = "file"
    )]
    pub prompt: Option<String>,
    /// Read the prompt from a file (exactly as stored).
    #[arg(short = 'f', long)]
    pub file: Option<PathBuf>,
    /// Treat the prompt as one user message and apply the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System prompt (with --chat).
    #[arg(long = "system-prompt", visible_alias = "sys", requires = "chat")]
    pub system_prompt: Option<String>,
    /// Stop at this text (repeatable); the text itself is not printed.
    #[arg(long = "stop", visible_alias = "reverse-prompt", short = 'r')]
    pub stop: Vec<String>,
    /// Number of tokens to generate.
    #[arg(short = 'n', long = "n-predict", default_value_t = 128)]
    pub n_predict: usize,
    /// Context size in tokens (default: 2048, at most the model's training context).
    #[arg(short = 'c', long = "ctx-size")]
    pub ctx_size: Option<usize>,
    /// Compute threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Print timings to stderr.
    #[arg(long)]
    pub verbose: bool,
    #[command(flatten)]
    pub head: crate::args::HeadArg,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

pub fn run(a: RunArgs) -> Result<()> {
    let params = a.sampling.params()?;
    init_threads(a.threads)?;
    let model = load_model(&a.model, &a.head)?;
    let tok = model.tokenizer.clone().ok_or_else(|| {
        anyhow!(
            "{}: the model has no tokenizer, so it cannot take a text prompt",
            a.model.display()
        )
    })?;
    let text = match (&a.prompt, &a.file) {
        (Some(p), _) => p.clone(),
        (None, Some(f)) => {
            std::fs::read_to_string(f).map_err(|e| anyhow!("{}: {e}", f.display()))?
        }
        (None, None) => unreachable!("clap requires one"),
    };
    let text = if a.chat {
        let template = ChatTemplate::for_tokenizer(&tok)?;
        let mut messages = Vec::new();
        if let Some(s) = &a.system_prompt {
            messages.push(Message::new("system", s));
        }
        messages.push(Message::new("user", &text));
        template.render(&messages, true)?
    } else {
        text
    };
    let prompt = tok.encode(&text, true)?;
    let n_ctx = a.ctx_size.unwrap_or(2048).min(model.config.n_ctx_train);
    if prompt.len() > n_ctx {
        return Err(anyhow!("the prompt has {} tokens but the context holds {n_ctx}; use a larger --ctx-size (the model allows {})", prompt.len(), model.config.n_ctx_train));
    }
    params.validate_vocab(model.config.n_vocab)?;
    let mut session = model.new_session(n_ctx);
    let mut sampler = Sampler::new(params);
    let mut dec = StreamDecoder::new();
    let mut stops = StopStrings::new(a.stop.clone());
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut write_failed = None;
    let g = generate(
        &model,
        &mut session,
        &mut sampler,
        &prompt,
        a.n_predict,
        &tok.stop_ids(),
        |id| {
            let (text, stop) = stops.push(&dec.push(&tok, id));
            // A closed pipe (e.g. `| head`) ends generation quietly.
            if let Err(e) = out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
                write_failed = Some(e);
                return false;
            }
            !stop
        },
    )?;
    if write_failed.is_none() {
        // Nothing follows a stop string; otherwise release what was held back for one.
        let rest = if stops.stopped() {
            String::new()
        } else {
            let (text, _) = stops.push(&dec.flush());
            text + &stops.finish()
        };
        let _ = writeln!(out, "{rest}");
    }
    if g.stop == StopReason::ContextFull {
        eprintln!("note: stopped because the context ({n_ctx} tokens) is full");
    }
    if a.verbose {
        let t = &g.timings;
        eprintln!(
            "prompt: {} tokens in {:.2} s ({:.1} tok/s); generation: {} tokens in {:.2} s ({:.1} tok/s); kernels: {}",
            t.prompt_tokens,
            t.prompt_time.as_secs_f64(),
            t.prompt_tps(),
            t.generated_tokens,
            t.generation_time.as_secs_f64(),
            t.generation_tps(),
            model.isa.name()
        );
    }
    Ok(())
}
