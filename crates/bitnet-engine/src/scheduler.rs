//! Continuous batching: up to N sequences ("slots") decode together, one batched forward pass
//! per step, so every weight row is read once per step for all active sequences. New requests
//! join between steps; long prompts are fed in chunks so decoding sequences are not stalled.
//! Each slot owns its KV cache; a finished or cancelled request frees its slot at once.
//!
//! The scheduler runs on its own thread and knows nothing about HTTP: results go to a
//! per-request callback, which returns false when the client is gone (cancelling it).

use crate::chat::StopStrings;
use crate::model::{BatchItem, Model, Session, Workspace};
use crate::sampler::{Sampler, SamplingParams, TokenLogprobs};
use crate::tokenizer::StreamDecoder;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Most prompt tokens processed per step across all slots, so that one long prompt delays the
/// other sequences' next tokens by at most one chunk.
pub const PREFILL_CHUNK: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` or the end of the slot's context.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

pub enum Event {
    /// One generated token and the text it completes (possibly empty: held back for UTF-8 or
    /// a possible stop string).
    Token {
        id: u32,
        text: String,
        logprobs: Option<TokenLogprobs>,
    },
    /// The end; no more events follow.
    Done {
        finish: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
}

pub type Sink = Box<dyn FnMut(Event) -> bool + Send>;

/// Whether the caller has gone (a client that disconnected): asked while a request waits in
/// the queue and before each of its prompt chunks, when no event is sent that could tell.
pub type GoneProbe = Box<dyn Fn() -> bool + Send>;

pub struct Request {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop_strings: Vec<String>,
    /// Report log-probabilities with this many alternatives.
    pub logprobs: Option<usize>,
    /// Receives the events; returns false to cancel.
    pub sink: Sink,
    pub gone: GoneProbe,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubmitError {
    /// The wait queue is full.
    Busy,
    /// The server is shutting down.
    ShuttingDown,
    /// The prompt cannot fit in a slot's context.
    TooLong { prompt: usize, n_ctx: usize },
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct Metrics {
    pub requests_total: AtomicU64,
    pub requests_cancelled: AtomicU64,
    pub prompt_tokens_total: AtomicU64,
    pub generated_tokens_total: AtomicU64,
    pub queue_len: AtomicU64,
    pub active_slots: AtomicU64,
    pub kv_tokens_used: AtomicU64,
    /// Generation throughput over the last step, tokens/s, as f64 bits.
    pub generation_tps_bits: AtomicU64,
}

impl Metrics {
    pub fn generation_tps(&self) -> f64 {
        f64::from_bits(self.generation_tps_bits.load(Ordering::Relaxed))
    }
}

struct Shared {
    queue: Mutex<VecDeque<Request>>,
    wake: Condvar,
    max_queue: usize,
    stopping: AtomicBool,
    /// Stop now: running requests are dropped (their callers see a closed stream).
    aborting: AtomicBool,
    metrics: Metrics,
}

pub struct Scheduler {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    pub n_parallel: usize,
    pub n_ctx: usize,
}

struct Active {
    /// Prompt tokens not yet run.
    pending: Vec<u32>,
    prompt_len: usize,
    /// The token to run next while decoding.
    next: Option<u32>,
    generated: usize,
    max_tokens: usize,
    sampler: Sampler,
    logprobs: Option<usize>,
    dec: StreamDecoder,
    stops: StopStrings,
    sink: Sink,
    gone: GoneProbe,
}

struct Slot {
    session: Session,
    active: Option<Active>,
}

impl Scheduler {
    /// Start the scheduler thread with `n_parallel` slots of `n_ctx` tokens each.
    pub fn start(
        model: Arc<Model>,
        n_parallel: usize,
        n_ctx: usize,
        max_queue: usize,
    ) -> Scheduler {
        let n_ctx = n_ctx.clamp(1, model.config.n_ctx_train);
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
            max_queue,
            stopping: AtomicBool::new(false),
            aborting: AtomicBool::new(false),
            metrics: Metrics::default(),
        });
        let sh = shared.clone();
        let thread = std::thread::Builder::new()
            .name("bitnet-scheduler".into())
            .spawn(move || run_loop(&model, &sh, n_parallel.max(1), n_ctx))
            .expect("cannot start the scheduler thread");
        Scheduler {
            shared,
            thread: Mutex::new(Some(thread)),
            n_parallel: n_parallel.max(1),
            n_ctx,
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.shared.metrics
    }

    /// Queue a request. It starts as soon as a slot is free.
    pub fn submit(&self, req: Request) -> Result<(), SubmitError> {
        if self.shared.stopping.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        if req.prompt.is_empty() || req.prompt.len() >= self.n_ctx {
            return Err(SubmitError::TooLong {
                prompt: req.prompt.len(),
                n_ctx: self.n_ctx,
            });
        }
        let mut q = self.shared.queue.lock().unwrap();
        // Room = free slots + the wait queue.
        let active = self.shared.metrics.active_slots.load(Ordering::SeqCst) as usize;
        if q.len() + active >= self.n_parallel + self.shared.max_queue {
            return Err(SubmitError::Busy);
        }
        q.push_back(req);
        self.shared
            .metrics
            .queue_len
            .store(q.len() as u64, Ordering::Relaxed);
        self.shared
            .metrics
            .requests_total
            .fetch_add(1, Ordering::Relaxed);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Stop accepting requests, let the running ones finish (queued ones are dropped, which
    /// their callers see as a cancelled stream), and wait for the thread.
    pub fn shutdown(&self) {
        self.stop(false)
    }

    /// [`shutdown`](Self::shutdown), but running requests are dropped too, at the end of the
    /// current step: for when a grace period is over.
    pub fn abort(&self) {
        self.stop(true)
    }

    fn stop(&self, abort: bool) {
        if abort {
            self.shared.aborting.store(true, Ordering::SeqCst);
        }
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.queue.lock().unwrap().clear();
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.lock().unwrap().take() {
            let _ = t.join();
        }
    }
}

fn run_loop(model: &Model, sh: &Shared, n_parallel: usize, n_ctx: usize) {
    let tok = model.tokenizer.clone();
    let stop_ids = tok.as_ref().map(|t| t.stop_ids()).unwrap_or_default();
    let mut slots: Vec<Slot> = (0..n_parallel)
        .map(|_| Slot {
            session: model.new_session(n_ctx),
            active: None,
        })
        .collect();
    let mut ws = Workspace::default();
    let m = &sh.metrics;
    loop {
        if sh.aborting.load(Ordering::SeqCst) {
            for slot in &mut slots {
                if slot.active.take().is_some() {
                    m.requests_cancelled.fetch_add(1, Ordering::Relaxed);
                }
            }
            m.active_slots.store(0, Ordering::SeqCst);
            return;
        }
        // Admit queued requests into free slots (or sleep when there is nothing to do).
        {
            let mut q = sh.queue.lock().unwrap();
            // Requests whose callers left while waiting.
            let before = q.len();
            q.retain(|r| !(r.gone)());
            m.requests_cancelled
                .fetch_add((before - q.len()) as u64, Ordering::Relaxed);
            loop {
                for slot in slots.iter_mut().filter(|s| s.active.is_none()) {
                    let Some(req) = q.pop_front() else { break };
                    slot.session.reset();
                    m.prompt_tokens_total
                        .fetch_add(req.prompt.len() as u64, Ordering::Relaxed);
                    slot.active = Some(Active {
                        prompt_len: req.prompt.len(),
                        pending: req.prompt,
                        next: None,
                        generated: 0,
                        max_tokens: req.max_tokens,
                        sampler: Sampler::new(req.params),
                        logprobs: req.logprobs,
                        dec: StreamDecoder::new(),
                        stops: StopStrings::new(req.stop_strings),
                        sink: req.sink,
                        gone: req.gone,
                    });
                }
                m.queue_len.store(q.len() as u64, Ordering::Relaxed);
                m.active_slots.store(
                    slots.iter().filter(|s| s.active.is_some()).count() as u64,
                    Ordering::SeqCst,
                );
                if slots.iter().any(|s| s.active.is_some()) {
                    break;
                }
                if sh.stopping.load(Ordering::SeqCst) {
                    return;
                }
                q = sh
                    .wake
                    .wait_timeout(q, Duration::from_millis(200))
                    .unwrap()
                    .0;
            }
        }

        // This step's tokens: every decoding slot's next token, plus prompt chunks.
        let mut budget = PREFILL_CHUNK;
        let mut plan: Vec<(usize, Vec<u32>, bool)> = Vec::new(); // (slot, tokens, sample after?)
        for (i, slot) in slots.iter_mut().enumerate() {
            let Some(a) = slot.active.as_mut() else {
                continue;
            };
            if let Some(t) = a.next.take() {
                plan.push((i, vec![t], true));
            } else if !a.pending.is_empty() && budget > 0 {
                if (a.gone)() {
                    m.requests_cancelled.fetch_add(1, Ordering::Relaxed);
                    slot.active = None;
                    continue;
                }
                let n = a.pending.len().min(budget);
                budget -= n;
                let chunk: Vec<u32> = a.pending.drain(..n).collect();
                plan.push((i, chunk, a.pending.is_empty()));
            }
        }
        if plan.is_empty() {
            continue;
        }
        let start = Instant::now();
        let result = {
            let mut items: Vec<BatchItem> = Vec::with_capacity(plan.len());
            let mut rest: &mut [Slot] = &mut slots;
            let mut base = 0;
            for (i, toks, _) in &plan {
                let (_, tail) = std::mem::take(&mut rest).split_at_mut(i - base);
                let (head, tail) = tail.split_at_mut(1);
                items.push(BatchItem {
                    session: &mut head[0].session,
                    tokens: toks,
                });
                rest = tail;
                base = i + 1;
            }
            model.forward_batch(&mut ws, &mut items).map(|l| l.to_vec())
        };
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                // Cannot happen for validated requests; end them rather than loop forever.
                eprintln!("error: batched forward failed: {e}");
                for (i, _, _) in &plan {
                    if let Some(mut a) = slots[*i].active.take() {
                        (a.sink)(Event::Done {
                            finish: FinishReason::Length,
                            prompt_tokens: a.prompt_len,
                            completion_tokens: a.generated,
                        });
                    }
                }
                continue;
            }
        };
        let v = model.config.n_vocab;
        let mut decoded = 0u64;
        for (k, (i, _, sample)) in plan.iter().enumerate() {
            if !sample {
                continue;
            }
            let slot = &mut slots[*i];
            let a = slot.active.as_mut().expect("planned slot is active");
            let row = &logits[k * v..(k + 1) * v];
            let (id, lp) = match a.logprobs {
                Some(n) => {
                    let (id, lp) = a
                        .sampler
                        .sample_with_logprobs(row, slot.session.tokens(), n);
                    (id, Some(lp))
                }
                None => (a.sampler.sample(row, slot.session.tokens()), None),
            };
            decoded += 1;
            let mut finish = None;
            let mut alive = true;
            if stop_ids.contains(&id) {
                finish = Some(FinishReason::Stop);
            } else {
                a.generated += 1;
                let piece = tok.as_ref().map(|t| a.dec.push(t, id)).unwrap_or_default();
                let (text, hit) = a.stops.push(&piece);
                alive = (a.sink)(Event::Token {
                    id,
                    text,
                    logprobs: lp,
                });
                if hit {
                    finish = Some(FinishReason::Stop);
                } else if a.generated >= a.max_tokens || slot.session.pos() >= slot.session.n_ctx {
                    finish = Some(FinishReason::Length);
                }
            }
            if finish.is_some() && !a.stops.stopped() && alive {
                // Release text held back for a stop string that never came (and bytes of an
                // unfinished character, as U+FFFD), after the last token or at a stop token.
                let (tail, hit) = a.stops.push(&a.dec.flush());
                let rest = tail + &a.stops.finish();
                if hit {
                    finish = Some(FinishReason::Stop);
                }
                if !rest.is_empty() {
                    alive = (a.sink)(Event::Token {
                        id,
                        text: rest,
                        logprobs: None,
                    });
                }
            }
            if !alive {
                m.requests_cancelled.fetch_add(1, Ordering::Relaxed);
                slot.active = None;
                continue;
            }
            match finish {
                Some(f) => {
                    let mut a = slot.active.take().expect("active");
                    (a.sink)(Event::Done {
                        finish: f,
                        prompt_tokens: a.prompt_len,
                        completion_tokens: a.generated,
                    });
                }
                None => a.next = Some(id),
            }
        }
        let dt = start.elapsed().as_secs_f64();
        m.generated_tokens_total
            .fetch_add(decoded, Ordering::Relaxed);
        if decoded > 0 {
            m.generation_tps_bits
                .store((decoded as f64 / dt.max(1e-9)).to_bits(), Ordering::Relaxed);
        }
        m.kv_tokens_used.store(
            slots
                .iter()
                .filter(|s| s.active.is_some())
                .map(|s| s.session.pos() as u64)
                .sum(),
            Ordering::Relaxed,
        );
    }
}
