//! The server end to end on the tiny model, over real loopback HTTP: every endpoint, the
//! error cases, streaming, cancellation, and a bounded load test with batch invariance.

use bitnet_engine::sampler::SamplingParams;
use bitnet_server::{AppState, ServerConfig};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn start(n_parallel: usize, max_queue: usize, api_key: Option<&str>) -> Server {
    let cfg = ServerConfig {
        model_path: PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/data/tiny/gguf/tiny-i2_s.gguf"),
        model_name: "tiny".into(),
        n_parallel,
        n_ctx: 256,
        api_key: api_key.map(String::from),
        max_queue,
        body_limit: 64 * 1024,
        defaults: SamplingParams::default(),
        default_max_tokens: Some(16),
        shutdown_grace: Duration::from_secs(5),
        load: Default::default(),
    };
    let (tx_addr, rx_addr) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx_addr.send(listener.local_addr().unwrap()).unwrap();
            bitnet_server::serve(AppState::new(cfg), listener, async move {
                let _ = stop_rx.await;
            })
            .await
            .unwrap();
        });
    });
    let addr = rx_addr.recv().unwrap();
    let s = Server {
        addr,
        stop: Some(stop_tx),
        thread: Some(thread),
    };
    let t0 = Instant::now();
    while http(&s, "GET", "/health", None, &[]).0 != 200 {
        assert!(t0.elapsed() < Duration::from_secs(30), "model did not load");
        std::thread::sleep(Duration::from_millis(20));
    }
    s
}

/// A minimal HTTP/1.0 client (the server closes the connection after the response, so
/// streamed bodies need no chunked decoding). Returns (status, body).
fn http(
    s: &Server,
    method: &str,
    path: &str,
    body: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = body.unwrap_or("");
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    c.write_all(req.as_bytes()).unwrap();
    c.write_all(body.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn post(s: &Server, path: &str, body: Value) -> (u16, Value) {
    let (st, b) = http(s, "POST", path, Some(&body.to_string()), &[]);
    (
        st,
        serde_json::from_str(&b).unwrap_or_else(|_| panic!("not JSON ({st}): {b}")),
    )
}

/// The `data:` payloads of a server-sent-events body.
fn sse_data(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(|s| s.trim().to_string())
        .collect()
}

fn streamed_text(body: &str, chat: bool) -> (String, Vec<Value>) {
    let data = sse_data(body);
    assert_eq!(
        data.last().map(String::as_str),
        Some("[DONE]"),
        "stream must end with [DONE]: {body}"
    );
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let text = chunks
        .iter()
        .filter_map(|c| c["choices"].get(0))
        .map(|ch| {
            if chat {
                ch["delta"]["content"].as_str().unwrap_or("").to_string()
            } else {
                ch["text"].as_str().unwrap_or("").to_string()
            }
        })
        .collect();
    (text, chunks)
}

#[test]
fn endpoints() {
    let s = start(2, 8, None);
    let (st, b) = http(&s, "GET", "/health", None, &[]);
    assert_eq!((st, b.contains("ok")), (200, true));
    let (st, b) = http(&s, "GET", "/v1/models", None, &[]);
    assert_eq!(st, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&b).unwrap()["data"][0]["id"],
        "tiny"
    );

    // Chat, non-streamed and streamed with the same seed: the same text.
    let req = json!({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}], "max_tokens": 12, "seed": 7, "temperature": 0.9});
    let (st, v) = post(&s, "/v1/chat/completions", req.clone());
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 12);
    let pt = v["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(v["usage"]["total_tokens"].as_u64().unwrap(), pt + 12);
    let mut sreq = req.clone();
    sreq["stream"] = json!(true);
    sreq["stream_options"] = json!({"include_usage": true});
    let (st, body) = http(
        &s,
        "POST",
        "/v1/chat/completions",
        Some(&sreq.to_string()),
        &[],
    );
    assert_eq!(st, 200);
    let (stext, chunks) = streamed_text(&body, true);
    assert_eq!(stext, text);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    assert_eq!(last["usage"]["completion_tokens"], 12);
    assert_eq!(
        chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
        "length"
    );

    // Logprobs.
    let (st, v) = post(
        &s,
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "logprobs": true, "top_logprobs": 2, "temperature": 0}),
    );
    assert_eq!(st, 200);
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 3);
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
    assert!(content[0]["logprob"].as_f64().unwrap() <= 0.0);

    // Completions logprobs: `text_offset` counts characters of the returned text (echo
    // included), not bytes: each offset is where that token's text starts.
    let prompt = "é€ Ünïcödé";
    let (st, v) = post(
        &s,
        "/v1/completions",
        json!({"prompt": prompt, "max_tokens": 6, "temperature": 0, "echo": true, "logprobs": 1}),
    );
    assert_eq!(st, 200, "{v}");
    let text: Vec<char> = v["choices"][0]["text"].as_str().unwrap().chars().collect();
    let lp = &v["choices"][0]["logprobs"];
    let offs: Vec<usize> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap() as usize)
        .collect();
    let toks: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(offs.len(), 6);
    assert_eq!(offs[0], prompt.chars().count(), "{v}");
    for (i, t) in toks.iter().enumerate() {
        // A token that is whole UTF-8 sits at its offset in the text.
        if !t.contains('\u{fffd}') && offs[i] + t.chars().count() <= text.len() {
            let at: String = text[offs[i]..offs[i] + t.chars().count()].iter().collect();
            assert_eq!(&at, t, "token {i} at {}: {v}", offs[i]);
        }
    }

    // Completions: token-array prompt, greedy, stop sequence, streaming equals non-streaming.
    let (st, v) = post(
        &s,
        "/v1/completions",
        json!({"prompt": [1, 17, 42], "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(st, 200, "{v}");
    let full = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(v["usage"]["prompt_tokens"], 3);
    let (st, body) = http(
        &s,
        "POST",
        "/v1/completions",
        Some(
            &json!({"prompt": [1, 17, 42], "max_tokens": 8, "temperature": 0, "stream": true})
                .to_string(),
        ),
        &[],
    );
    assert_eq!(st, 200);
    assert_eq!(streamed_text(&body, false).0, full);
    if full.chars().count() > 3 {
        let stop: String = full.chars().skip(2).take(2).collect();
        let (_, v) = post(
            &s,
            "/v1/completions",
            json!({"prompt": [1, 17, 42], "max_tokens": 8, "temperature": 0, "stop": [stop.clone()]}),
        );
        let t = v["choices"][0]["text"].as_str().unwrap();
        assert!(
            !t.contains(&stop) && full.starts_with(t),
            "{t:?} / {full:?} / {stop:?}"
        );
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }
    let (st, v) = post(
        &s,
        "/v1/completions",
        json!({"prompt": "Hello world", "max_tokens": 2}),
    );
    assert_eq!(st, 200, "{v}");

    // Tokenize / detokenize.
    let (_, v) = post(&s, "/tokenize", json!({"content": "Hello world"}));
    assert_eq!(v["tokens"], json!([39, 68, 270, 78, 307, 265, 911]));
    let (_, v) = post(
        &s,
        "/tokenize",
        json!({"content": "Hello", "add_special": true, "with_pieces": true}),
    );
    assert_eq!(v["tokens"][0]["id"], 1022);
    let (_, v) = post(
        &s,
        "/detokenize",
        json!({"tokens": [39, 68, 270, 78, 307, 265, 911]}),
    );
    assert_eq!(v["content"], "Hello world");

    // Metrics.
    let (st, m) = http(&s, "GET", "/metrics", None, &[]);
    assert_eq!(st, 200);
    for name in [
        "bitnet_requests_total",
        "bitnet_prompt_tokens_total",
        "bitnet_generated_tokens_total",
        "bitnet_generation_tokens_per_second",
        "bitnet_queue_length",
        "bitnet_kv_cache_usage_ratio",
    ] {
        assert!(m.contains(name), "{name} missing:\n{m}");
    }
}

#[test]
fn errors() {
    let s = start(1, 0, None);
    let bad = |body: &str| {
        let (st, b) = http(&s, "POST", "/v1/chat/completions", Some(body), &[]);
        let v: Value = serde_json::from_str(&b).unwrap_or_else(|_| panic!("not JSON: {b}"));
        assert!(
            v["error"]["message"].is_string()
                && v["error"]["type"].is_string()
                && v["error"]["code"].is_number(),
            "{v}"
        );
        (st, v["error"]["message"].as_str().unwrap().to_string())
    };
    assert_eq!(bad("{not json").0, 400);
    assert_eq!(bad(r#"{"messages": "x"}"#).0, 400);
    assert_eq!(
        bad(r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}"#).0,
        400
    );
    assert_eq!(
        bad(r#"{"messages": [{"role": "user", "content": "hi"}], "n": 2}"#).0,
        400
    );
    assert_eq!(
        bad(r#"{"messages": [{"role": "user", "content": "hi"}], "temperature": -1}"#).0,
        400
    );
    assert_eq!(bad(r#"{"messages": []}"#).0, 400);
    // Asking for no tokens at all is an error (it used to return one token).
    let (st, msg) = bad(r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}"#);
    assert!(st == 400 && msg.contains("max_tokens"), "{st} {msg}");
    // "5" and "05" name one token: two biases for it would add up past the allowed range.
    let (st, msg) = bad(
        r#"{"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 100, "05": 100}}"#,
    );
    assert!(st == 400 && msg.contains("token 5"), "{st} {msg}");
    let (st, msg) = bad(
        &json!({"messages": [{"role": "user", "content": "hi"}], "stop": ["x".repeat(257)]})
            .to_string(),
    );
    assert!(st == 400 && msg.contains("stop"), "{st} {msg}");
    let long = "word ".repeat(400);
    let (st, msg) = bad(&json!({"messages": [{"role": "user", "content": long}]}).to_string());
    assert!(st == 400 && msg.contains("context"), "{st} {msg}");
    let (st, _) = http(
        &s,
        "POST",
        "/v1/completions",
        Some(&json!({"prompt": [5000]}).to_string()),
        &[],
    );
    assert_eq!(st, 400);
    let big = format!("{{\"prompt\": \"{}\"}}", "a".repeat(70 * 1024));
    assert_eq!(http(&s, "POST", "/v1/completions", Some(&big), &[]).0, 413);
    assert_eq!(http(&s, "GET", "/nope", None, &[]).0, 404);
    assert_eq!(
        http(
            &s,
            "POST",
            "/detokenize",
            Some(r#"{"tokens": [99999]}"#),
            &[]
        )
        .0,
        400
    );
}

#[test]
fn api_key_and_queue_limit_and_cancellation() {
    let s = start(1, 0, Some("sekret"));
    assert_eq!(
        http(&s, "GET", "/health", None, &[]).0,
        200,
        "/health needs no key"
    );
    assert_eq!(http(&s, "GET", "/v1/models", None, &[]).0, 401);
    assert_eq!(
        http(
            &s,
            "GET",
            "/v1/models",
            None,
            &[("Authorization", "Bearer wrong")]
        )
        .0,
        401
    );
    // Same length, a prefix, the key with more after it: all refused.
    for wrong in ["Bearer sekreT", "Bearer sekre", "Bearer sekrett", "sekret"] {
        let h = [("Authorization", wrong)];
        assert_eq!(http(&s, "GET", "/v1/models", None, &h).0, 401, "{wrong}");
    }
    let auth = [("Authorization", "Bearer sekret")];
    assert_eq!(http(&s, "GET", "/v1/models", None, &auth).0, 200);

    // One slot, no queue: a long streaming request occupies the slot; a second one gets 503.
    let long_req = json!({"prompt": [1, 2, 3], "max_tokens": 200, "stream": true, "logit_bias": {"1023": -100}}).to_string();
    let mut c = TcpStream::connect(s.addr).unwrap();
    write!(c, "POST /v1/completions HTTP/1.0\r\nAuthorization: Bearer sekret\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{long_req}", long_req.len()).unwrap();
    let mut buf = [0u8; 256];
    let _ = c.read(&mut buf).unwrap(); // the stream has started
    let (st, _) = http(
        &s,
        "POST",
        "/v1/completions",
        Some(&json!({"prompt": [1], "max_tokens": 2}).to_string()),
        &auth,
    );
    assert_eq!(st, 503);
    // The client disconnects mid-stream: its generation is cancelled and the slot freed.
    drop(c);
    let t0 = Instant::now();
    loop {
        let (st, _) = http(
            &s,
            "POST",
            "/v1/completions",
            Some(&json!({"prompt": [1], "max_tokens": 2}).to_string()),
            &auth,
        );
        if st == 200 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "slot was not freed after the client left"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let (_, m) = http(&s, "GET", "/metrics", None, &auth);
    assert!(m.contains("bitnet_requests_cancelled_total 1"), "{m}");
}

/// 32 concurrent streaming clients with different prompts and lengths: all finish, each gets
/// exactly the answer its prompt gives alone with the same seed, and /health stays fast.
#[test]
fn load_test_is_batch_invariant() {
    let s = start(8, 64, None);
    let reqs: Vec<Value> = (0..32)
        .map(|i| json!({"prompt": (0..(3 + i % 7)).map(|j| (i * 31 + j * 7) % 1000 + 1).collect::<Vec<_>>(), "max_tokens": 4 + i % 9, "seed": i, "temperature": 1.0, "stream": true}))
        .collect();
    // Alone, one at a time.
    let alone: Vec<String> = reqs
        .iter()
        .map(|r| {
            streamed_text(
                &http(&s, "POST", "/v1/completions", Some(&r.to_string()), &[]).1,
                false,
            )
            .0
        })
        .collect();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (d2, addr) = (done.clone(), s.addr);
    let health = std::thread::spawn(move || {
        let probe = Server {
            addr,
            stop: None,
            thread: None,
        };
        let mut worst = Duration::ZERO;
        while !d2.load(std::sync::atomic::Ordering::SeqCst) {
            let t = Instant::now();
            assert_eq!(http(&probe, "GET", "/health", None, &[]).0, 200);
            worst = worst.max(t.elapsed());
            std::thread::sleep(Duration::from_millis(10));
        }
        worst
    });
    let handles: Vec<_> = reqs
        .iter()
        .map(|r| {
            let (body, addr) = (r.to_string(), s.addr);
            std::thread::spawn(move || {
                let probe = Server {
                    addr,
                    stop: None,
                    thread: None,
                };
                streamed_text(
                    &http(&probe, "POST", "/v1/completions", Some(&body), &[]).1,
                    false,
                )
                .0
            })
        })
        .collect();
    let together: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let worst = health.join().unwrap();
    assert_eq!(together, alone);
    assert!(
        worst < Duration::from_millis(100),
        "/health took {worst:?} under load"
    );
}
