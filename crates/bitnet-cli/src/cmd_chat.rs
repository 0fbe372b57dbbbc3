//! `bitnet chat`: an interactive multi-turn chat in the terminal, or a line-per-message filter
//! when stdin is not a terminal.

use crate::args::{init_threads, load_model_with_progress, SamplingArgs};
use anyhow::{anyhow, Result};
use bitnet_engine::chat::{Chat, Message, TurnResult};
use bitnet_engine::generate::StopReason;
use clap::Args;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Args, Debug)]
pub struct ChatArgs {
    /// Model: a GGUF file, a Hugging Face model directory, or a Hub reference OWNER/REPO[:X][@REV].
    #[arg(short = 'm', long, default_value = crate::args::DEFAULT_MODEL)]
    pub model: PathBuf,
    /// System prompt.
    #[arg(long = "system-prompt", visible_alias = "sys")]
    pub system_prompt: Option<String>,
    /// Most tokens per answer.
    #[arg(short = 'n', long = "n-predict", default_value_t = 1024)]
    pub n_predict: usize,
    /// Context size in tokens (default: 2048, at most the model's training context).
    #[arg(short = 'c', long = "ctx-size")]
    pub ctx_size: Option<usize>,
    /// Compute threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Stop an answer at this text (repeatable); the text itself is not shown.
    #[arg(long = "stop", visible_alias = "reverse-prompt", short = 'r')]
    pub stop: Vec<String>,
    /// When stdin is not a terminal: print each answer as a JSON object on one line.
    #[arg(long)]
    pub jsonl: bool,
    /// Hide the load progress and the speed after each answer.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    #[command(flatten)]
    pub head: crate::args::HeadArg,
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

const HELP: &str = "commands:
  /help          this help
  /reset         forget the conversation (keeps the system prompt)
  /system TEXT   set the system prompt (and reset)
  /save FILE     save the conversation as an OpenAI-style messages JSON array
  /load FILE     load a conversation saved with /save
  /stats         context use and the last answer's speed
  /exit          quit (also Ctrl-D; Ctrl-C stops an answer, Ctrl-C at the prompt quits)";

pub fn run(a: ChatArgs) -> Result<()> {
    let params = a.sampling.params()?;
    init_threads(a.threads)?;
    let interactive = std::io::stdin().is_terminal();
    let model = load_model_with_progress(&a.model, &a.head, interactive && !a.quiet)?;
    params.validate_vocab(model.config.n_vocab)?;
    let n_ctx = a.ctx_size.unwrap_or(2048).min(model.config.n_ctx_train);
    let mut chat =
        Chat::new(&model, n_ctx, params, a.n_predict).map_err(|e| e.context(a.model.display()))?;
    chat.system = a.system_prompt.clone();
    chat.stop_strings = a.stop.clone();
    if interactive {
        interactive_loop(&mut chat, &a)
    } else {
        piped_loop(&mut chat, &a)
    }
}

/// stdin is a pipe: one message per line; answers only, each followed by a newline and an
/// empty line (or one JSON object per line with --jsonl).
fn piped_loop(chat: &mut Chat, a: &ChatArgs) -> Result<()> {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let line = line.map_err(|e| anyhow!("cannot read stdin: {e}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let jsonl = a.jsonl;
        let r = chat.turn(&line, |text| {
            if !jsonl {
                let _ = out.write_all(text.as_bytes());
                let _ = out.flush();
            }
            true
        });
        let r = match r {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: {e}");
                continue;
            }
        };
        report_drops(&r);
        if jsonl {
            let obj = serde_json::json!({"role": "assistant", "content": r.answer});
            writeln!(out, "{obj}")?;
        } else {
            writeln!(out, "\n")?;
        }
        out.flush()?;
        if !a.quiet {
            print_speed(&r);
        }
    }
    Ok(())
}

fn report_drops(r: &TurnResult) {
    if r.dropped_turns > 0 {
        eprintln!(
            "[context full: dropped the {} oldest exchange(s); the system prompt is kept]",
            r.dropped_turns
        );
    }
}

fn print_speed(r: &TurnResult) {
    let t = &r.timings;
    eprintln!(
        "[prompt {} tok, {:.1} tok/s | answer {} tok, {:.1} tok/s]",
        t.prompt_tokens,
        t.prompt_tps(),
        t.generated_tokens,
        t.generation_tps()
    );
}

fn interactive_loop(chat: &mut Chat, a: &ChatArgs) -> Result<()> {
    // Ctrl-C while an answer streams sets this flag; the answer stops at the next token.
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))
        .map_err(|e| anyhow!("cannot install the Ctrl-C handler: {e}"))?;
    let mut rl =
        rustyline::DefaultEditor::new().map_err(|e| anyhow!("cannot open the terminal: {e}"))?;
    let history = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".bitnet_history"));
    if let Some(h) = &history {
        let _ = rl.load_history(h);
    }
    eprintln!(
        "bitnet chat: {} (context {} tokens). Type /help for commands.",
        a.model.display(),
        chat.session().n_ctx
    );
    let mut last: Option<TurnResult> = None;
    loop {
        let line = match rl.readline("> ") {
            Ok(l) => l,
            Err(rustyline::error::ReadlineError::Interrupted)
            | Err(rustyline::error::ReadlineError::Eof) => break,
            Err(e) => return Err(anyhow!("terminal error: {e}")),
        };
        let line = line.trim_end().to_string();
        if line.is_empty() {
            continue;
        }
        let _ = rl.add_history_entry(line.as_str());
        if let Some(cmd) = line.strip_prefix('/') {
            let (name, arg) = cmd
                .split_once(' ')
                .map(|(n, r)| (n, r.trim()))
                .unwrap_or((cmd, ""));
            match name {
                "help" => println!("{HELP}"),
                "exit" | "quit" => break,
                "reset" => {
                    chat.reset();
                    println!("[conversation cleared]");
                }
                "system" => {
                    chat.set_system(if arg.is_empty() {
                        None
                    } else {
                        Some(arg.to_string())
                    });
                    chat.reset();
                    println!("[system prompt set; conversation cleared]");
                }
                "save" if !arg.is_empty() => {
                    match std::fs::write(arg, serde_json::to_string_pretty(&chat.all_messages())?) {
                        Ok(()) => {
                            println!("[saved {} messages to {arg}]", chat.all_messages().len())
                        }
                        Err(e) => println!("[cannot write {arg}: {e}]"),
                    }
                }
                "load" if !arg.is_empty() => match std::fs::read_to_string(arg)
                    .map_err(|e| e.to_string())
                    .and_then(|s| {
                        serde_json::from_str::<Vec<Message>>(&s).map_err(|e| e.to_string())
                    }) {
                    Ok(msgs) => {
                        let n = msgs.len();
                        chat.set_messages(msgs);
                        println!("[loaded {n} messages from {arg}]");
                    }
                    Err(e) => println!("[cannot load {arg}: {e}]"),
                },
                "stats" => {
                    println!(
                        "[context: {} of {} tokens used; {} messages]",
                        chat.session().pos(),
                        chat.session().n_ctx,
                        chat.all_messages().len()
                    );
                    if let Some(r) = &last {
                        print_speed(r);
                    }
                }
                _ => println!("[unknown command /{name}; /help lists them]"),
            }
            continue;
        }
        interrupted.store(false, Ordering::SeqCst);
        let mut out = std::io::stdout().lock();
        let r = chat.turn(&line, |text| {
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
            !interrupted.load(Ordering::SeqCst)
        });
        drop(out);
        match r {
            Ok(r) => {
                println!();
                report_drops(&r);
                if r.stop == StopReason::Cancelled && interrupted.load(Ordering::SeqCst) {
                    eprintln!("[stopped]");
                }
                if r.stop == StopReason::ContextFull {
                    eprintln!("[the context is full: the answer was cut; /reset to start over]");
                }
                if !a.quiet {
                    print_speed(&r);
                }
                last = Some(r);
            }
            Err(e) => eprintln!("error: {e}"),
        }
    }
    if let Some(h) = &history {
        let _ = rl.save_history(h);
    }
    Ok(())
}
