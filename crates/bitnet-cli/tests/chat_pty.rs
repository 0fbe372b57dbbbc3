//! The interactive `bitnet chat` in a pseudo-terminal, the way a person uses it: rustyline's
//! prompt, streamed answers, /commands, Ctrl-C (stop an answer; quit at the prompt) and Ctrl-D.
//! Drives the real binary with the tiny model. Every wait has a timeout and the child is killed
//! when a test fails, so a broken interactive loop fails the test instead of hanging it.
#![cfg(unix)]

use rexpect::process::WaitStatus;
use rexpect::session::{spawn_with_options, Options, PtySession};
use rexpect::ReadUntil;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// Longest wait for any one piece of output (generous: CI has two slow cores).
const TIMEOUT_MS: u64 = 240_000;

fn model() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data/tiny/gguf/tiny-i2_s.gguf")
        .display()
        .to_string()
}

/// The ids that end an answer for the tiny model (its EOS/EOT from the GGUF metadata), read
/// with `bitnet info` so the test follows the model.
fn stop_token_ids() -> Vec<u32> {
    let o = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(["info", "-m", &model()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    let ids: Vec<u32> = text
        .lines()
        .filter_map(|l| {
            let (key, value) = l.trim().split_once(" = ")?;
            let is_stop = key == "tokenizer.ggml.eos_token_id"
                || key == "tokenizer.ggml.eot_token_id"
                || key == "tokenizer.ggml.eom_token_id";
            if is_stop {
                value.trim().parse().ok()
            } else {
                None
            }
        })
        .collect();
    assert!(!ids.is_empty(), "no EOS id in `bitnet info`:\n{text}");
    ids
}

/// The numbers of one `[prompt P tok, ... | answer A tok, ...]` line.
#[derive(Debug, Clone, Copy)]
struct Speed {
    prompt_tokens: usize,
    answer_tokens: usize,
}

/// The numbers of one `/stats` line: `[context: U of N tokens used; M messages]`.
#[derive(Debug, Clone, Copy)]
struct Stats {
    used: usize,
    messages: usize,
}

/// The number just before `word` in `s` (`"... 12 tok ..."`, `"tok"`).
fn number_before(s: &str, word: &str) -> usize {
    let end = s
        .find(word)
        .unwrap_or_else(|| panic!("no {word:?} in {s:?}"));
    let digits: String = s[..end]
        .trim_end()
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_digit())
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("no number before {word:?} in {s:?}"))
}

/// One `bitnet chat` in a pseudo-terminal, with its own HOME (for the history file) and
/// working directory.
struct Chat {
    s: PtySession,
    dir: tempfile::TempDir,
}

impl Chat {
    fn start(extra: &[&str]) -> Chat {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bitnet"));
        cmd.args(["chat", "-m", &model(), "-t", "1", "--seed", "7"])
            .args(extra)
            .current_dir(dir.path())
            .env("HOME", dir.path())
            .env("TERM", "xterm");
        // Escape sequences (rustyline's drawing) are kept: the random model can print an ESC
        // byte, and stripping would then swallow the text after it.
        let opts = Options::default().timeout_ms(Some(TIMEOUT_MS));
        let mut s = spawn_with_options(cmd, opts).expect("cannot start bitnet chat in a pty");
        // When a test fails, dropping the session kills the child (SIGTERM, then SIGKILL).
        s.process_mut().set_kill_timeout(Some(5_000));
        let mut c = Chat { s, dir };
        c.expect("Type /help for commands.");
        c.expect_prompt();
        c
    }

    fn expect(&mut self, needle: &str) -> String {
        self.s
            .exp_string(needle)
            .unwrap_or_else(|e| panic!("waiting for {needle:?}: {e}"))
    }

    /// Waits for the first of `needles`; returns (the text before it, which one).
    fn expect_any(&mut self, needles: &[&str]) -> (String, String) {
        let any = needles
            .iter()
            .map(|n| ReadUntil::String(n.to_string()))
            .collect();
        self.s
            .exp_any(any)
            .unwrap_or_else(|e| panic!("waiting for one of {needles:?}: {e}"))
    }

    /// rustyline's prompt.
    fn expect_prompt(&mut self) {
        self.expect("> ");
    }

    /// Waits for at least `n` more characters of output.
    fn expect_output(&mut self, n: usize) {
        self.s
            .exp_regex(&format!("(?s).{{{n}}}"))
            .unwrap_or_else(|e| panic!("waiting for {n} characters of output: {e}"));
    }

    fn send_line(&mut self, line: &str) {
        self.s.send_line(line).unwrap();
        self.s.flush().unwrap();
    }

    fn ctrl(&mut self, c: char) {
        self.s.send_control(c).unwrap();
    }

    /// The speed line printed after an answer, then the prompt; returns the numbers and the
    /// output before the speed line (the answer and any notes).
    fn expect_answer_end(&mut self) -> (Speed, String) {
        let before = self.expect("[prompt ");
        let line = self.expect("]");
        let (prompt_part, answer_part) = line
            .split_once('|')
            .unwrap_or_else(|| panic!("not a speed line: [prompt {line}]"));
        let speed = Speed {
            prompt_tokens: number_before(prompt_part, "tok"),
            answer_tokens: number_before(answer_part, "tok"),
        };
        self.expect_prompt();
        (speed, before)
    }

    /// Sends a message and waits for the whole answer and the next prompt.
    fn turn(&mut self, message: &str) -> (Speed, String) {
        self.send_line(message);
        self.expect_answer_end()
    }

    fn stats(&mut self) -> Stats {
        self.send_line("/stats");
        self.expect("[context: ");
        let line = self.expect("]");
        let stats = Stats {
            used: number_before(&line, "of"),
            messages: number_before(&line, "messages"),
        };
        assert!(
            line.contains("tokens used;"),
            "unexpected /stats: [context: {line}]"
        );
        self.expect_prompt();
        stats
    }

    /// `/save FILE` into the working directory, then the file's messages as (role, content).
    fn save(&mut self, name: &str) -> Vec<(String, String)> {
        self.send_line(&format!("/save {name}"));
        self.expect(&format!("messages to {name}]"));
        self.expect_prompt();
        let text = std::fs::read_to_string(self.dir.path().join(name)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v.as_array()
            .unwrap_or_else(|| panic!("not a messages array: {text}"))
            .iter()
            .map(|m| {
                (
                    m["role"].as_str().unwrap().to_string(),
                    m["content"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    /// Waits until the child has exited and returns its exit code (panics if it was killed
    /// by a signal or does not exit in time).
    fn expect_exit(&mut self) -> i32 {
        if let Err(e) = self.s.exp_eof() {
            panic!("bitnet chat did not exit: {e}");
        }
        let deadline = Instant::now() + Duration::from_millis(TIMEOUT_MS);
        loop {
            match self.s.process().status() {
                Some(WaitStatus::Exited(_, code)) => return code,
                Some(WaitStatus::StillAlive) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                other => panic!("bitnet chat did not exit cleanly: {other:?}"),
            }
        }
    }
}

/// Two turns: both answers stream back and the prompt returns after each; the second turn runs
/// only the new tokens (the KV cache of the first turn is kept), as `/stats` and the speed line
/// show.
#[test]
fn two_turns_keep_the_cache() {
    let mut c = Chat::start(&["-n", "24", "-c", "1024"]);
    let first = "Please tell me everything you know about ternary neural networks, \
                 quantization, and why one and a half bits per weight can be enough.";
    let (s1, _) = c.turn(first);
    assert!(s1.answer_tokens > 0, "{s1:?}");
    let st1 = c.stats();
    assert_eq!(st1.messages, 2, "{st1:?}");
    assert!(st1.used >= s1.prompt_tokens, "{st1:?} {s1:?}");

    let (s2, _) = c.turn("Thanks!");
    assert!(s2.answer_tokens > 0, "{s2:?}");
    let st2 = c.stats();
    assert_eq!(st2.messages, 4, "{st2:?}");
    // Re-running the whole conversation would take at least the first prompt's tokens again;
    // with the cache kept, the second turn feeds only its own few tokens.
    assert!(
        s2.prompt_tokens < s1.prompt_tokens,
        "the second turn re-ran the conversation: {s1:?} then {s2:?}"
    );
    assert!(st2.used > st1.used, "{st1:?} then {st2:?}");
    assert!(
        st2.used <= st1.used + s2.prompt_tokens + s2.answer_tokens,
        "{st1:?} {s2:?} {st2:?}"
    );
    let saved = c.save("two.json");
    let roles: Vec<&str> = saved.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
    assert_eq!(saved[0].1, first);
    assert_eq!(saved[2].1, "Thanks!");
    c.send_line("/exit");
    assert_eq!(c.expect_exit(), 0);
}

/// `/reset` forgets the conversation but keeps the system prompt.
#[test]
fn reset_keeps_only_the_system_prompt() {
    let mut c = Chat::start(&["-n", "8", "-c", "512", "-sys", "You are brief."]);
    c.turn("Hello there");
    let before = c.save("before.json");
    let roles: Vec<&str> = before.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(roles, ["system", "user", "assistant"]);
    assert!(c.stats().used > 0);

    c.send_line("/reset");
    c.expect("[conversation cleared]");
    c.expect_prompt();
    let after = c.save("after.json");
    assert_eq!(
        after,
        [("system".to_string(), "You are brief.".to_string())]
    );
    let st = c.stats();
    assert_eq!((st.used, st.messages), (0, 1), "{st:?}");

    // The chat goes on after the reset.
    let (s, _) = c.turn("Hi again");
    assert!(s.answer_tokens > 0);
    assert_eq!(c.stats().messages, 3);
    c.ctrl('d');
    assert_eq!(c.expect_exit(), 0);
}

/// Ctrl-C while an answer streams stops it and returns to the prompt; the chat still answers
/// (and can be stopped again); Ctrl-C at the prompt quits with status 0.
#[test]
fn ctrl_c_stops_an_answer_and_quits_at_the_prompt() {
    // The stop tokens are forbidden and -n is huge: without Ctrl-C the answer runs until the
    // context is full (thousands of tokens).
    let mut args: Vec<String> = ["-n", "100000", "-c", "4096"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for id in stop_token_ids() {
        args.push("--logit-bias".to_string());
        args.push(format!("{id}-inf"));
    }
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let mut c = Chat::start(&args);

    for message in ["Tell me a very long story.", "Are you still there?"] {
        c.send_line(message);
        // The echo of the message plus a good part of the answer: it is streaming now.
        c.expect_output(message.len() + 300);
        c.ctrl('c');
        let (_, which) = c.expect_any(&["[stopped]", "[the context is full"]);
        assert_eq!(which, "[stopped]", "Ctrl-C did not stop the answer");
        let (speed, _) = c.expect_answer_end();
        assert!(speed.answer_tokens < 4096, "{speed:?}");
    }
    // Both stopped answers are part of the conversation.
    assert_eq!(c.stats().messages, 4);
    let saved = c.save("stopped.json");
    assert_eq!(saved.len(), 4);
    assert!(!saved[1].1.is_empty(), "the stopped answer was lost");

    c.ctrl('c');
    assert_eq!(c.expect_exit(), 0);
}

/// Ctrl-D at the prompt quits with status 0; /help and unknown commands answer at the prompt.
#[test]
fn ctrl_d_at_the_prompt_exits_cleanly() {
    let mut c = Chat::start(&["-n", "8", "-c", "512"]);
    c.send_line("/help");
    c.expect("/reset");
    c.expect("/exit");
    c.expect_prompt();
    c.send_line("/nonsense");
    c.expect("[unknown command /nonsense");
    c.expect_prompt();
    c.ctrl('d');
    assert_eq!(c.expect_exit(), 0);
    // The line history is saved on the way out.
    let history = std::fs::read_to_string(c.dir.path().join(".bitnet_history")).unwrap_or_default();
    assert!(history.contains("/nonsense"), "history: {history:?}");
}
