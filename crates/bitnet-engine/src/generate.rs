//! The generation loop shared by `run`, `chat` and the server: prefill the new prompt tokens,
//! then sample one token at a time until a stop token, the token budget, the context end, or
//! the caller says stop.

use crate::model::{Model, Session};
use crate::sampler::Sampler;
use crate::{bail, Result};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token (end of turn / end of text) was sampled; it is not part of the output.
    StopToken,
    /// `max_tokens` were generated.
    Length,
    /// The context is full.
    ContextFull,
    /// The callback asked to stop (stop string found, client gone, Ctrl-C).
    Cancelled,
}

#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub prompt_tokens: usize,
    pub prompt_time: Duration,
    pub generated_tokens: usize,
    pub generation_time: Duration,
}

impl Timings {
    pub fn prompt_tps(&self) -> f64 {
        self.prompt_tokens as f64 / self.prompt_time.as_secs_f64().max(1e-9)
    }

    pub fn generation_tps(&self) -> f64 {
        self.generated_tokens as f64 / self.generation_time.as_secs_f64().max(1e-9)
    }
}

pub struct Generation {
    pub tokens: Vec<u32>,
    /// The logits after the prompt, from which the first token was sampled.
    pub first_logits: Vec<f32>,
    pub stop: StopReason,
    pub timings: Timings,
}

/// Continue `session` with `new_tokens` (the part of the prompt not yet in its cache) and
/// generate up to `max_tokens`. `on_token` sees each generated token (stop tokens excluded) and
/// returns false to stop. Sampling sees the whole sequence as history for its penalties.
pub fn generate(
    model: &Model,
    session: &mut Session,
    sampler: &mut Sampler,
    new_tokens: &[u32],
    max_tokens: usize,
    stop_ids: &[u32],
    mut on_token: impl FnMut(u32) -> bool,
) -> Result<Generation> {
    if new_tokens.is_empty() {
        bail!("the prompt is empty");
    }
    if session.pos() + new_tokens.len() > session.n_ctx {
        bail!(
            "the prompt has {} tokens but only {} of the context's {} positions are free; use a larger --ctx-size or a shorter prompt",
            new_tokens.len(),
            session.n_ctx - session.pos(),
            session.n_ctx
        );
    }
    let mut timings = Timings {
        prompt_tokens: new_tokens.len(),
        ..Default::default()
    };
    let start = Instant::now();
    let mut logits = model.forward(session, new_tokens, false)?.to_vec();
    timings.prompt_time = start.elapsed();

    let first_logits = logits.clone();
    let gen_start = Instant::now();
    let mut out = Vec::new();
    let stop = loop {
        if out.len() >= max_tokens {
            break StopReason::Length;
        }
        let tok = sampler.sample(&logits, session.tokens());
        if stop_ids.contains(&tok) {
            break StopReason::StopToken;
        }
        out.push(tok);
        if !on_token(tok) {
            break StopReason::Cancelled;
        }
        if out.len() >= max_tokens {
            break StopReason::Length;
        }
        if session.pos() >= session.n_ctx {
            break StopReason::ContextFull;
        }
        let l = model.forward(session, &[tok], false)?;
        logits.copy_from_slice(l);
    };
    timings.generated_tokens = out.len();
    timings.generation_time = gen_start.elapsed();
    Ok(Generation {
        tokens: out,
        first_logits,
        stop,
        timings,
    })
}
