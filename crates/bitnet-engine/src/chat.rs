//! Chat: templates (rendered with minijinja the way transformers' `apply_chat_template` renders
//! them) and a multi-turn conversation that keeps its KV cache between turns.

use crate::generate::{generate, StopReason, Timings};
use crate::model::{Model, Session};
use crate::sampler::{Sampler, SamplingParams};
use crate::tokenizer::{StreamDecoder, Tokenizer};
use crate::{bail, Error, Result};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The BitNet b1.58 2B4T chat template (REFERENCE.md section 3): `Role: content<|eot_id|>` per
/// message, then `Assistant: `. The BOS before it comes from the tokenizer.
pub const BITNET_TEMPLATE: &str = "{% for message in messages %}{{ message['role'] | capitalize + ': ' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}";

/// bitnet.cpp's converter embeds a placeholder (`Human: ...` / `BITNETAssistant: `) that is
/// not the model's format (REFERENCE.md trap 9). Never use it.
pub fn is_placeholder_template(src: &str) -> bool {
    src.contains("BITNETAssistant")
        || (src.contains("Human: ") && src.contains("Assistant: ") && src.contains("eos_token"))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Message {
        Message {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    /// True when the model's own template was missing or the broken placeholder.
    pub builtin: bool,
    pub source: String,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    /// A template from its Jinja source; `bos` / `eos` are the texts of those tokens.
    pub fn new(source: &str, bos: &str, eos: &str) -> Result<ChatTemplate> {
        let mut env = minijinja::Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks, and Python string methods.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_function("strftime_now", |fmt: String| -> String {
            // Templates use it for "today's date"; a fixed, clearly formatted date keeps renders
            // reproducible. Only the common formats are supported.
            let _ = fmt;
            "26 Jul 2024".to_string()
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| Error::new(format!("invalid chat template: {e}")))?;
        Ok(ChatTemplate {
            env,
            builtin: false,
            source: source.to_string(),
            bos: bos.to_string(),
            eos: eos.to_string(),
        })
    }

    /// The model's template, or the built-in BitNet one when it has none or the placeholder.
    pub fn for_tokenizer(tok: &Tokenizer) -> Result<ChatTemplate> {
        let text = |id: Option<u32>| id.map(|i| tok.decode(&[i])).unwrap_or_default();
        let (bos, eos) = (text(tok.bos_id()), text(tok.eos_id()));
        match tok.chat_template() {
            Some(src) if !is_placeholder_template(src) => ChatTemplate::new(src, &bos, &eos),
            _ => {
                let mut t = ChatTemplate::new(BITNET_TEMPLATE, &bos, &eos)?;
                t.builtin = true;
                Ok(t)
            }
        }
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| Error::new(e.to_string()))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos,
            eos_token => &self.eos,
        })
        .map_err(|e| Error::new(format!("chat template failed: {e}")))
    }
}

/// Text-level stop strings for streaming: text is released only once it can no longer be the
/// beginning of a stop string, and a stop string itself is never released.
#[derive(Debug, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    text: String,
    released: usize,
    stopped: bool,
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        StopStrings {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            text: String::new(),
            released: 0,
            stopped: false,
        }
    }

    /// Add generated text; returns (text safe to show now, whether a stop string was found).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        self.text.push_str(piece);
        let search_from = self
            .released
            .saturating_sub(self.stops.iter().map(|s| s.len()).max().unwrap_or(0));
        let search_from = floor_char_boundary(&self.text, search_from);
        if let Some(pos) = self
            .stops
            .iter()
            .filter_map(|s| {
                self.text[search_from..]
                    .find(s.as_str())
                    .map(|p| p + search_from)
            })
            .min()
        {
            let out = self.text[self.released.min(pos)..pos].to_string();
            self.text.truncate(pos);
            self.released = pos;
            self.stopped = true;
            return (out, true);
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        let mut hold = 0;
        for s in &self.stops {
            for k in (1..s.len().min(self.text.len()) + 1).rev() {
                if self.text.is_char_boundary(self.text.len() - k)
                    && s.is_char_boundary(k)
                    && self.text.ends_with(&s[..k])
                {
                    hold = hold.max(k);
                    break;
                }
            }
        }
        let safe = (self.text.len() - hold).max(self.released);
        let out = self.text[self.released..safe].to_string();
        self.released = safe;
        (out, false)
    }

    /// Everything not yet released (at the end of an answer without a stop string).
    pub fn finish(&mut self) -> String {
        let out = self.text[self.released..].to_string();
        self.released = self.text.len();
        out
    }

    /// Whether a stop string has been found (the answer ends there).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// The answer so far, without any stop string.
    pub fn text(&self) -> &str {
        &self.text
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// What one turn produced.
#[derive(Debug)]
pub struct TurnResult {
    pub answer: String,
    pub stop: StopReason,
    pub timings: Timings,
    /// How many earlier user/assistant turns were dropped to make room.
    pub dropped_turns: usize,
    /// The logits the first answer token was sampled from.
    pub first_logits: Vec<f32>,
}

/// A conversation with a model: messages, template, sampler and the KV cache of everything said
/// so far. A new turn runs only the tokens the cache does not hold yet.
pub struct Chat<'m> {
    model: &'m Model,
    tok: Arc<Tokenizer>,
    pub template: ChatTemplate,
    pub system: Option<String>,
    /// User and assistant messages, alternating (the system prompt is kept apart).
    pub messages: Vec<Message>,
    session: Session,
    /// The text whose tokens the cache holds (a rendered prefix of the conversation).
    cached_text: String,
    sampler: Sampler,
    pub max_tokens: usize,
    pub stop_strings: Vec<String>,
}

impl<'m> Chat<'m> {
    pub fn new(
        model: &'m Model,
        n_ctx: usize,
        params: SamplingParams,
        max_tokens: usize,
    ) -> Result<Chat<'m>> {
        let tok = model
            .tokenizer
            .clone()
            .ok_or_else(|| Error::new("the model has no tokenizer"))?;
        let template = ChatTemplate::for_tokenizer(&tok)?;
        Ok(Chat {
            model,
            tok,
            template,
            system: None,
            messages: Vec::new(),
            session: model.new_session(n_ctx),
            cached_text: String::new(),
            sampler: Sampler::new(params),
            max_tokens,
            stop_strings: Vec::new(),
        })
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tok
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    /// All messages, system prompt first.
    pub fn all_messages(&self) -> Vec<Message> {
        let mut v = Vec::with_capacity(self.messages.len() + 1);
        if let Some(s) = &self.system {
            v.push(Message::new("system", s));
        }
        v.extend(self.messages.iter().cloned());
        v
    }

    /// Forget the conversation (the system prompt stays).
    pub fn reset(&mut self) {
        self.messages.clear();
        self.session.reset();
        self.cached_text.clear();
    }

    /// Replace the conversation (e.g. `/load`): a leading system message becomes the system prompt.
    pub fn set_messages(&mut self, mut messages: Vec<Message>) {
        self.system = None;
        if messages
            .first()
            .map(|m| m.role == "system")
            .unwrap_or(false)
        {
            self.system = Some(messages.remove(0).content);
        }
        self.messages = messages;
        self.session.reset();
        self.cached_text.clear();
    }

    pub fn set_system(&mut self, system: Option<String>) {
        self.system = system;
        self.session.reset();
        self.cached_text.clear();
    }

    /// The tokens to feed for a conversation whose rendered text is `full`: only the part after
    /// what the cache holds when the text extends it; otherwise the cache keeps the longest
    /// common token prefix and the rest is recomputed.
    fn tokens_to_feed(&mut self, full: &str) -> Result<Vec<u32>> {
        if !self.cached_text.is_empty()
            && full.starts_with(&self.cached_text)
            && self.session.pos() > 0
        {
            return self.tok.encode(&full[self.cached_text.len()..], false);
        }
        let all = self.tok.encode(full, true)?;
        let common = self
            .session
            .tokens()
            .iter()
            .zip(&all)
            .take_while(|(a, b)| a == b)
            .count();
        // Keep at least one token to run, so there are logits to sample from.
        let keep = common.min(all.len().saturating_sub(1));
        self.session.truncate(keep);
        Ok(all[keep..].to_vec())
    }

    /// One user turn: `on_text` receives the answer as it streams and returns false to stop it.
    /// It is called once per generated token with the text that token releases, which may be
    /// empty (so a caller's stop request is honoured promptly).
    pub fn turn(
        &mut self,
        user: &str,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<TurnResult> {
        let n_ctx = self.session.n_ctx;
        let reserve = self.max_tokens.min(n_ctx / 4).max(1);
        self.messages.push(Message::new("user", user));
        let mut dropped = 0;
        let (full, feed) = loop {
            let full = self.template.render(&self.all_messages(), true)?;
            let feed = self.tokens_to_feed(&full)?;
            if self.session.pos() + feed.len() + reserve <= n_ctx {
                break (full, feed);
            }
            // Drop the oldest user/assistant pair (never the system prompt or this message).
            if self.messages.len() >= 3 {
                self.messages.drain(..2);
                dropped += 1;
                self.session.reset();
                self.cached_text.clear();
                continue;
            }
            let total = self.tok.encode(&full, true)?.len();
            self.messages.pop();
            bail!("the message needs {total} tokens plus room for an answer, but the context holds {n_ctx}; use a larger --ctx-size or a shorter message");
        };
        let stop_ids = self.tok.stop_ids();
        let mut stops = StopStrings::new(self.stop_strings.clone());
        let mut dec = StreamDecoder::new();
        let mut found_stop = false;
        let tok = self.tok.clone();
        let start_pos = self.session.pos() + feed.len();
        let g = generate(
            self.model,
            &mut self.session,
            &mut self.sampler,
            &feed,
            self.max_tokens,
            &stop_ids,
            |id| {
                let (text, stop) = stops.push(&dec.push(&tok, id));
                found_stop = stop;
                // Called for every token, also one that shows no text yet (half a UTF-8
                // character, a special token, text held back for a stop string), so that a
                // request to stop (Ctrl-C) is seen at the next token whatever the model emits.
                let keep_going = on_text(&text);
                keep_going && !stop
            },
        )?;
        if !found_stop {
            let (text, _) = stops.push(&dec.flush());
            let rest = text + &stops.finish();
            if !rest.is_empty() {
                on_text(&rest);
            }
        }
        let answer = stops.text().to_string();
        // The cache holds the prompt and the generated tokens that were fed back.
        let fed_back = &self.session.tokens()[start_pos.min(self.session.pos())..];
        self.cached_text = full + &self.tok.decode(fed_back);
        if found_stop {
            // The stop string's tokens are in the cache but not in the answer: recompute them.
            self.cached_text.clear();
        }
        self.messages.push(Message::new("assistant", &answer));
        let stop = if found_stop {
            StopReason::Cancelled
        } else {
            g.stop
        };
        Ok(TurnResult {
            answer,
            stop,
            timings: g.timings,
            dropped_turns: dropped,
            first_logits: g.first_logits,
        })
    }

    /// Logits of the conversation as it stands (for tests of cache reuse).
    pub fn session_mut(&mut self) -> &mut Session {
        &mut self.session
    }
}
