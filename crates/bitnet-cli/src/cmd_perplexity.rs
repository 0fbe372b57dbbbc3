//! `bitnet perplexity`: perplexity over a text file, and KL divergence against the saved
//! log-probabilities of a reference run, as llama.cpp's `llama-perplexity` computes them.
//!
//! The text is tokenized once (with BOS when the tokenizer adds one) and cut into
//! non-overlapping windows of `--ctx` tokens; each window starts from an empty context with its
//! first token replaced by BOS (when the tokenizer uses one), and only its second half is
//! scored: rows `ctx/2 .. ctx-2` predict tokens `ctx/2+1 .. ctx-1`, so every scored token has
//! at least `ctx/2` tokens of context. PPL = exp(mean NLL); its uncertainty is
//! `PPL * sd(NLL) / sqrt(n - 1)`.
//!
//! `--save-logits FILE` writes the log-softmax of every scored row as f16, after a header:
//!
//! ```text
//! magic    8 bytes  "BNLOGPR1"
//! n_vocab  u32      (all integers little-endian)
//! n_ctx    u32
//! first    u32      first scored row of a window (n_ctx / 2)
//! n_chunks u32
//! tokens   u32 x n_chunks * n_ctx   the windows as evaluated (BOS substituted)
//! rows     f16 x n_vocab, (n_ctx - 1 - first) per window, window after window
//! ```
//!
//! `--kl-divergence FILE` reads such a file, evaluates the same tokens (the text file is then
//! optional; if given it must tokenize to the same windows) and reports the mean KL divergence
//! `KL(base || this)` per scored token with its standard error, its maximum, percentiles, and
//! how often both runs rank the same token first. Both distributions are compared at the
//! storage precision (this run's log-probabilities are rounded to f16 too), so a run compared
//! with its own file gives exactly 0 and 100%.

use crate::args::init_threads;
use anyhow::{anyhow, Context, Result};
use clap::Args;
use half::f16;
use serde_json::json;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::PathBuf;

pub const MAGIC: &[u8; 8] = b"BNLOGPR1";

#[derive(Args, Debug)]
pub struct PerplexityArgs {
    /// Model: a GGUF file or a Hugging Face model directory.
    #[arg(short = 'm', long)]
    pub model: PathBuf,
    /// Text file to score (optional with --kl-divergence, whose file holds the tokens).
    #[arg(short = 'f', long)]
    pub file: Option<PathBuf>,
    /// Window size in tokens (default 512, or the --kl-divergence file's).
    #[arg(short = 'c', long)]
    pub ctx: Option<usize>,
    /// Score at most this many windows.
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Compare with the log-probabilities saved by --save-logits of a reference run.
    #[arg(long, value_name = "BASE_LOGITS", conflicts_with = "save_logits")]
    pub kl_divergence: Option<PathBuf>,
    /// Save the log-probabilities of every scored position (f16) for a later --kl-divergence.
    #[arg(long, value_name = "FILE")]
    pub save_logits: Option<PathBuf>,
    #[command(flatten)]
    pub head: crate::args::HeadArg,
    /// Compute threads (default: all cores).
    #[arg(short = 't', long)]
    pub threads: Option<usize>,
    /// Print the final figures as one JSON object on stdout (progress goes to stderr).
    #[arg(long)]
    pub json: bool,
}

/// Header of a saved log-probabilities file.
struct BaseHeader {
    n_vocab: usize,
    n_ctx: usize,
    n_chunks: usize,
    tokens: Vec<u32>,
}

fn read_u32(r: &mut impl Read) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

fn read_header(r: &mut impl Read, file_len: u64) -> Result<BaseHeader> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)
        .map_err(|_| anyhow!("not a log-probabilities file (too short)"))?;
    if &magic != MAGIC {
        return Err(anyhow!(
            "not a log-probabilities file written by `bitnet perplexity --save-logits`"
        ));
    }
    let n_vocab = read_u32(r)? as usize;
    let n_ctx = read_u32(r)? as usize;
    let first = read_u32(r)? as usize;
    let n_chunks = read_u32(r)? as usize;
    if n_vocab == 0 || n_ctx < 4 || first != n_ctx / 2 || n_chunks == 0 {
        return Err(anyhow!(
            "corrupt header (n_vocab {n_vocab}, n_ctx {n_ctx}, first {first}, n_chunks {n_chunks})"
        ));
    }
    let rows = (n_ctx - 1 - first) as u64;
    let want = 24 + 4 * (n_chunks * n_ctx) as u64 + 2 * rows * n_vocab as u64 * n_chunks as u64;
    if file_len != want {
        return Err(anyhow!(
            "the file has {file_len} bytes, its header says {want} (truncated or corrupt)"
        ));
    }
    let mut raw = vec![0u8; 4 * n_chunks * n_ctx];
    r.read_exact(&mut raw)?;
    let tokens = raw
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    Ok(BaseHeader {
        n_vocab,
        n_ctx,
        n_chunks,
        tokens,
    })
}

/// Log-softmax of one row: `x_i - logsumexp(x)` (the sum in f64).
pub fn log_softmax(x: &[f32], out: &mut [f32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let sum: f64 = x.iter().map(|&v| ((v - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v as f64 - lse) as f32;
    }
}

/// Running sums for a mean and its standard error.
#[derive(Default)]
struct Stat {
    n: u64,
    sum: f64,
    sum2: f64,
}

impl Stat {
    fn push(&mut self, x: f64) {
        self.n += 1;
        self.sum += x;
        self.sum2 += x * x;
    }

    fn mean(&self) -> f64 {
        self.sum / self.n.max(1) as f64
    }

    /// Standard error of the mean (0 with fewer than two values).
    fn stderr(&self) -> f64 {
        if self.n < 2 {
            return 0.0;
        }
        let m = self.mean();
        let var = (self.sum2 / self.n as f64 - m * m).max(0.0);
        (var / (self.n - 1) as f64).sqrt()
    }
}

/// Linear-interpolated percentile of sorted values (q in 0..=1).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

fn argmax(x: &[u16]) -> usize {
    let mut best = 0;
    for i in 1..x.len() {
        if f16::from_bits(x[i]).to_f32() > f16::from_bits(x[best]).to_f32() {
            best = i;
        }
    }
    best
}

pub fn run(a: PerplexityArgs) -> Result<()> {
    init_threads(a.threads)?;
    let mut base = match &a.kl_divergence {
        None => None,
        Some(p) => {
            let f = std::fs::File::open(p).with_context(|| p.display().to_string())?;
            let len = f.metadata()?.len();
            let mut r = BufReader::with_capacity(1 << 20, f);
            let h = read_header(&mut r, len).with_context(|| p.display().to_string())?;
            Some((h, r))
        }
    };
    if base.is_none() && a.file.is_none() {
        return Err(anyhow!(
            "-f/--file is required (the text to score), unless --kl-divergence gives the tokens"
        ));
    }
    let model = crate::args::load_model(&a.model, &a.head)?;
    let n_vocab = model.config.n_vocab;

    let text_tokens = match &a.file {
        None => None,
        Some(f) => {
            let text = std::fs::read_to_string(f).with_context(|| f.display().to_string())?;
            let tok = model
                .tokenizer
                .as_ref()
                .ok_or_else(|| anyhow!("the model has no tokenizer, so it cannot read text"))?;
            Some(tok.encode(&text, true)?)
        }
    };
    let bos = model
        .tokenizer
        .as_ref()
        .filter(|t| t.add_bos())
        .and_then(|t| t.bos_id());

    // The windows: from the base file, or from the text.
    let (n_ctx, windows): (usize, Vec<Vec<u32>>) = match &base {
        Some((h, _)) => {
            if let Some(c) = a.ctx {
                if c != h.n_ctx {
                    return Err(anyhow!(
                        "--ctx {c} differs from the base file's window of {}",
                        h.n_ctx
                    ));
                }
            }
            if h.n_vocab != n_vocab {
                return Err(anyhow!(
                    "the base file has {} log-probabilities per row, the model's vocabulary {n_vocab}",
                    h.n_vocab
                ));
            }
            let n = a.chunks.unwrap_or(h.n_chunks).min(h.n_chunks);
            let w: Vec<Vec<u32>> = h
                .tokens
                .chunks(h.n_ctx)
                .take(n)
                .map(|c| c.to_vec())
                .collect();
            if let Some(t) = &text_tokens {
                let same = w.iter().enumerate().all(|(i, win)| {
                    let start = i * h.n_ctx;
                    t.len() >= start + h.n_ctx && win[1..] == t[start + 1..start + h.n_ctx]
                });
                if !same {
                    return Err(anyhow!(
                        "the text does not tokenize to the base file's tokens (another text or tokenizer)"
                    ));
                }
            }
            (h.n_ctx, w)
        }
        None => {
            let tokens = text_tokens.as_ref().expect("checked above");
            let n_ctx = a.ctx.unwrap_or(512);
            if n_ctx < 4 {
                return Err(anyhow!("--ctx must be at least 4"));
            }
            if n_ctx > model.config.n_ctx_train {
                return Err(anyhow!(
                    "--ctx {n_ctx} exceeds the model's context of {}",
                    model.config.n_ctx_train
                ));
            }
            let mut n = tokens.len() / n_ctx;
            if let Some(c) = a.chunks {
                n = n.min(c);
            }
            if n == 0 {
                return Err(anyhow!(
                    "the text has {} tokens, fewer than one window of {n_ctx} (use a smaller --ctx)",
                    tokens.len()
                ));
            }
            let w = (0..n)
                .map(|i| {
                    let mut win = tokens[i * n_ctx..(i + 1) * n_ctx].to_vec();
                    if let Some(b) = bos {
                        win[0] = b;
                    }
                    win
                })
                .collect();
            (n_ctx, w)
        }
    };
    let first = n_ctx / 2;
    let n_rows = n_ctx - 1 - first;

    let mut save = match &a.save_logits {
        None => None,
        Some(p) => {
            let f = std::fs::File::create(p).with_context(|| p.display().to_string())?;
            let mut w = BufWriter::with_capacity(1 << 20, f);
            w.write_all(MAGIC)?;
            for v in [n_vocab, n_ctx, first, windows.len()] {
                w.write_all(&(v as u32).to_le_bytes())?;
            }
            for win in &windows {
                for &t in win {
                    w.write_all(&t.to_le_bytes())?;
                }
            }
            Some((p.clone(), w))
        }
    };

    let mut progress: Box<dyn Write> = if a.json {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::stdout())
    };
    let kl_mode = base.is_some();
    if kl_mode {
        writeln!(
            progress,
            "{:>5} {:>10} {:>10} {:>12} {:>10}",
            "chunk", "PPL", "PPL(base)", "KLD", "same top"
        )?;
    }

    let mut nll = Stat::default();
    let mut nll_base = Stat::default();
    // This run's NLL at the storage precision, for a ratio to the base that is exactly 1 when
    // the runs agree.
    let mut nll_cur16 = Stat::default();
    let mut kld = Stat::default();
    let mut kld_values: Vec<f64> = Vec::new();
    let mut same_top = 0u64;
    let mut session = model.new_session(n_ctx);
    let mut logp = vec![0f32; n_vocab];
    let mut cur16 = vec![0u16; n_vocab];
    let mut base16 = vec![0u16; n_vocab];
    let mut raw = vec![0u8; 2 * n_vocab];
    let t0 = std::time::Instant::now();
    for (ci, win) in windows.iter().enumerate() {
        session.reset();
        model.forward(&mut session, &win[..first], false)?;
        let logits = model.forward(&mut session, &win[first..n_ctx - 1], true)?;
        for j in 0..n_rows {
            let row = &logits[j * n_vocab..(j + 1) * n_vocab];
            let target = win[first + j + 1] as usize;
            log_softmax(row, &mut logp);
            nll.push(-(logp[target] as f64));
            if save.is_none() && base.is_none() {
                continue;
            }
            for (c, &l) in cur16.iter_mut().zip(&logp) {
                *c = f16::from_f32(l).to_bits();
            }
            if let Some((p, w)) = &mut save {
                for (dst, &c) in raw.chunks_exact_mut(2).zip(&cur16) {
                    dst.copy_from_slice(&c.to_le_bytes());
                }
                w.write_all(&raw).with_context(|| p.display().to_string())?;
            }
            if let Some((_, r)) = &mut base {
                r.read_exact(&mut raw)?;
                for (b, c) in base16.iter_mut().zip(raw.chunks_exact(2)) {
                    *b = u16::from_le_bytes([c[0], c[1]]);
                }
                let mut kl = 0f64;
                for (&b, &c) in base16.iter().zip(&cur16) {
                    let lb = f16::from_bits(b).to_f32() as f64;
                    let lc = f16::from_bits(c).to_f32() as f64;
                    kl += lb.exp() * (lb - lc);
                }
                kld.push(kl);
                kld_values.push(kl);
                nll_base.push(-(f16::from_bits(base16[target]).to_f32() as f64));
                nll_cur16.push(-(f16::from_bits(cur16[target]).to_f32() as f64));
                if argmax(&base16) == argmax(&cur16) {
                    same_top += 1;
                }
            }
        }
        if kl_mode {
            writeln!(
                progress,
                "{:>5} {:>10.4} {:>10.4} {:>12.6} {:>9.3}%",
                ci + 1,
                nll.mean().exp(),
                nll_base.mean().exp(),
                kld.mean(),
                100.0 * same_top as f64 / kld.n.max(1) as f64
            )?;
        } else {
            write!(
                progress,
                "{}[{}]{:.4}",
                if ci > 0 { "," } else { "" },
                ci + 1,
                nll.mean().exp()
            )?;
        }
        progress.flush()?;
    }
    if !kl_mode {
        writeln!(progress)?;
    }
    if let Some((p, mut w)) = save {
        w.flush().with_context(|| p.display().to_string())?;
    }

    let ppl = nll.mean().exp();
    let ppl_err = nll.stderr() * ppl;
    let secs = t0.elapsed().as_secs_f64();
    let n_scored = nll.n;
    let mut summary = json!({
        "n_ctx": n_ctx,
        "n_chunks": windows.len(),
        "n_scored": n_scored,
        "mean_nll": nll.mean(),
        "ppl": ppl,
        "ppl_stderr": ppl_err,
        "seconds": secs,
    });
    let mut text = format!(
        "Final estimate: PPL = {ppl:.4} +/- {ppl_err:.5} ({} windows of {n_ctx} tokens, {n_scored} scored, {secs:.1} s)",
        windows.len()
    );
    if kl_mode {
        kld_values.sort_by(|a, b| a.total_cmp(b));
        let n = kld.n.max(1) as f64;
        let p_same = same_top as f64 / n;
        let same_err = if kld.n > 1 {
            (p_same * (1.0 - p_same) / (n - 1.0)).sqrt()
        } else {
            0.0
        };
        let base_ppl = nll_base.mean().exp();
        let ratio = (nll_cur16.mean() - nll_base.mean()).exp();
        let kl = json!({
            "base_ppl": base_ppl,
            "ppl_ratio": ratio,
            "kld_mean": kld.mean(),
            "kld_stderr": kld.stderr(),
            "kld_max": kld_values.last().copied().unwrap_or(0.0),
            "kld_p99": percentile(&kld_values, 0.99),
            "kld_p95": percentile(&kld_values, 0.95),
            "kld_median": percentile(&kld_values, 0.5),
            "kld_min": kld_values.first().copied().unwrap_or(0.0),
            "same_top_pct": 100.0 * p_same,
            "same_top_stderr_pct": 100.0 * same_err,
        });
        text.push_str(&format!(
            "\nPPL(base)        = {base_ppl:.4}\nPPL / PPL(base)  = {:.5}\n\
             Mean    KLD      = {:.6} +/- {:.6}\nMaximum KLD      = {:.6}\n\
             99.0%   KLD      = {:.6}\n95.0%   KLD      = {:.6}\nMedian  KLD      = {:.6}\n\
             Minimum KLD      = {:.6}\nSame top token   = {:.3} +/- {:.3} %",
            ratio,
            kld.mean(),
            kld.stderr(),
            kl["kld_max"].as_f64().unwrap_or(0.0),
            kl["kld_p99"].as_f64().unwrap_or(0.0),
            kl["kld_p95"].as_f64().unwrap_or(0.0),
            kl["kld_median"].as_f64().unwrap_or(0.0),
            kl["kld_min"].as_f64().unwrap_or(0.0),
            100.0 * p_same,
            100.0 * same_err
        ));
        if let (Some(s), Some(k)) = (summary.as_object_mut(), kl.as_object()) {
            s.extend(k.clone());
        }
    }
    if a.json {
        println!("{summary}");
    } else {
        println!("{text}");
    }
    Ok(())
}
