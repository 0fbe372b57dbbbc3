//! The continuous-batching scheduler on the tiny model: text held back for a stop string is
//! released at a stop token, requests whose callers left are dropped unrun, and `abort` ends
//! running generations instead of waiting for them.

use bitnet_engine::sampler::SamplingParams;
use bitnet_engine::scheduler::{Event, FinishReason, Request, Scheduler};
use bitnet_engine::Model;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};

fn tiny() -> Arc<Model> {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/tiny/gguf/tiny-i2_s.gguf");
    Arc::new(Model::load(&p).unwrap())
}

/// A request whose events go to a channel.
fn request(
    prompt: Vec<u32>,
    params: SamplingParams,
    max_tokens: usize,
    stop: &[&str],
) -> (Request, mpsc::Receiver<Event>) {
    let (tx, rx) = mpsc::channel();
    let req = Request {
        prompt,
        params,
        max_tokens,
        stop_strings: stop.iter().map(|s| s.to_string()).collect(),
        logprobs: None,
        sink: Box::new(move |ev| tx.send(ev).is_ok()),
        gone: Box::new(|| false),
    };
    (req, rx)
}

/// (text, finish, completion tokens) of a finished request's events.
fn collect(rx: &mpsc::Receiver<Event>) -> (String, FinishReason, usize) {
    let mut text = String::new();
    loop {
        match rx.recv().expect("the request ended without Done") {
            Event::Token { text: t, .. } => text.push_str(&t),
            Event::Done {
                finish,
                completion_tokens,
                ..
            } => return (text, finish, completion_tokens),
        }
    }
}

/// Only "a" and the end-of-sequence token may be drawn, at a temperature that makes both
/// likely; the stop string is longer than any answer, so every "a" is held back as its
/// possible beginning. Whether the answer ends at the stop token or at max_tokens, all of it
/// must reach the caller (an answer that ended at the stop token used to lose the held text).
#[test]
fn held_back_text_is_released_at_a_stop_token() {
    let model = tiny();
    let tok = model.tokenizer.clone().unwrap();
    let a = tok.encode("a", false).unwrap();
    assert_eq!(a.len(), 1, "\"a\" is one token in the tiny vocabulary");
    let (a, eos) = (a[0], tok.stop_ids()[0]);
    let n_vocab = model.config.n_vocab as u32;
    let sched = Scheduler::start(model, 1, 64, 8);
    let mut ended_by_stop_token = 0;
    for seed in 0..16 {
        let params = SamplingParams {
            temperature: 50.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            logit_bias: (0..n_vocab)
                .filter(|&t| t != a && t != eos)
                .map(|t| (t, f32::NEG_INFINITY))
                .collect(),
            seed,
            ..SamplingParams::default()
        };
        let (req, rx) = request(vec![1, 2, 3], params, 6, &["aaaaaaaaaaz"]);
        sched.submit(req).unwrap();
        let (text, finish, n) = collect(&rx);
        assert_eq!(text, "a".repeat(n), "seed {seed}");
        if finish == FinishReason::Stop {
            ended_by_stop_token += 1;
            assert!(
                n < 6,
                "seed {seed}: a stop at max_tokens is a length finish"
            );
        } else {
            assert_eq!(n, 6, "seed {seed}");
        }
    }
    // Otherwise this test would not test the stop-token path at all.
    assert!(ended_by_stop_token > 0, "no answer ended at the stop token");
    sched.shutdown();
}

/// A request whose caller left while it waited is dropped without running; the one behind it
/// runs as usual.
#[test]
fn requests_of_callers_that_left_are_dropped_unrun() {
    let sched = Scheduler::start(tiny(), 1, 64, 8);
    let greedy = SamplingParams {
        temperature: 0.0,
        ..SamplingParams::default()
    };
    let (mut gone_req, gone_rx) = request(vec![1, 2, 3], greedy.clone(), 4, &[]);
    gone_req.gone = Box::new(|| true);
    let (req, rx) = request(vec![4, 5, 6], greedy, 4, &[]);
    sched.submit(gone_req).unwrap();
    sched.submit(req).unwrap();
    assert_eq!(collect(&rx).2, 4);
    // The dropped request's sink was dropped unused: no event, a closed channel.
    assert!(gone_rx.recv().is_err());
    assert_eq!(
        sched.metrics().requests_cancelled.load(Ordering::Relaxed),
        1
    );
    sched.shutdown();
}

/// `abort` drops a generation that would otherwise run to the end of its context: its caller
/// sees the events stop without a Done, and `abort` returns.
#[test]
fn abort_ends_running_generations() {
    let model = tiny();
    let n_ctx = model.config.n_ctx_train;
    let sched = Arc::new(Scheduler::start(model, 1, n_ctx, 8));
    let (tx, rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let req = Request {
        prompt: vec![1, 2, 3],
        params: SamplingParams::default(),
        max_tokens: n_ctx,
        stop_strings: Vec::new(),
        logprobs: None,
        // After each token the scheduler waits for the test's go-ahead, until the test drops
        // its sender (then it runs freely).
        sink: Box::new(move |ev| {
            let ok = tx.send(ev).is_ok();
            let _ = go_rx.recv();
            ok
        }),
        gone: Box::new(|| false),
    };
    sched.submit(req).unwrap();
    let mut tokens = 0;
    let mut next = || match rx.recv().expect("events end only after the abort") {
        Event::Token { .. } => tokens += 1,
        Event::Done { .. } => panic!("an aborted request must not finish normally"),
    };
    next();
    go_tx.send(()).unwrap();
    next();
    // The scheduler now waits in the sink after the second token.
    let s = sched.clone();
    let aborting = std::thread::spawn(move || s.abort());
    drop(go_tx);
    aborting.join().unwrap();
    for ev in rx.iter() {
        match ev {
            Event::Token { .. } => tokens += 1,
            Event::Done { .. } => panic!("an aborted request must not finish normally"),
        }
    }
    // Running to the end of the context would take thousands of steps; the abort is seen at
    // the next one.
    assert!(tokens >= 2 && tokens < n_ctx - 3, "{tokens} tokens");
}
