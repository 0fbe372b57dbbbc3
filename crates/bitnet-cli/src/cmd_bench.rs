//! `bitnet bench`: the llama-bench equivalent. For every thread count, prompt processing
//! (`ppN`: one forward of N random tokens into an empty context, logits of the last token only)
//! and generation (`tgN`: N single-token forwards starting from an empty context) are timed
//! separately, after one warm-up run, over `-r` repetitions; the result is the mean and sample
//! standard deviation of the per-repetition tokens/s, as a markdown table or (`--json`) an
//! array of records with llama-bench's keys.
//!
//! Each thread count gets its own rayon pool and the whole test runs inside `pool.install`, so
//! every parallel loop of the engine uses exactly that many threads.

use anyhow::{anyhow, Result};
use bitnet_engine::synth::Rng;
use bitnet_engine::{Config, Model};
use clap::Args;
use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Model: a GGUF file or a Hugging Face model directory.
    #[arg(short = 'm', long)]
    pub model: PathBuf,
    /// Prompt sizes to test, comma-separated (0 = no prompt test).
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "512"
    )]
    pub n_prompt: Vec<usize>,
    /// Numbers of generated tokens to test, comma-separated (0 = no generation test).
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "128"
    )]
    pub n_gen: Vec<usize>,
    /// Thread counts to test, comma-separated (default: all cores).
    #[arg(short = 't', long, value_delimiter = ',')]
    pub threads: Vec<usize>,
    /// Context depths to test at, comma-separated: each test runs after this many tokens are
    /// already in the KV cache (filled once, not timed), as llama-bench's `-d`.
    #[arg(
        short = 'd',
        long = "n-depth",
        value_delimiter = ',',
        default_value = "0"
    )]
    pub n_depth: Vec<usize>,
    /// Repetitions of each test.
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    pub repetitions: usize,
    #[command(flatten)]
    pub head: crate::args::HeadArg,
    /// Print a JSON array of records instead of the markdown table.
    #[arg(long)]
    pub json: bool,
    /// Skip the warm-up run.
    #[arg(long)]
    pub no_warmup: bool,
    /// Seed of the random tokens.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// One finished test.
struct Record {
    test: String,
    n_prompt: usize,
    n_gen: usize,
    n_depth: usize,
    n_threads: usize,
    samples_ns: Vec<u64>,
}

impl Record {
    fn n_tokens(&self) -> usize {
        self.n_prompt + self.n_gen
    }

    fn samples_ts(&self) -> Vec<f64> {
        self.samples_ns
            .iter()
            .map(|&ns| self.n_tokens() as f64 * 1e9 / ns.max(1) as f64)
            .collect()
    }
}

/// Mean and sample standard deviation (0 for fewer than two values).
pub fn mean_sd(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// Every weight of the model (all tensors' elements), as llama.cpp counts them.
pub fn n_params(c: &Config) -> u64 {
    let (e, f, q, kv) = (
        c.n_embd as u64,
        c.n_ff as u64,
        c.q_dim() as u64,
        c.kv_dim() as u64,
    );
    let mut per_layer = 2 * e + e * q + 2 * e * kv + q * e + 3 * e * f;
    if c.sub_norms {
        per_layer += q + f;
    }
    let heads = if c.tied_head { 1 } else { 2 };
    c.n_layer as u64 * per_layer + heads * c.n_vocab as u64 * e + e
}

/// Bytes of tensor data: the tensors of a GGUF file, or the safetensors files of a directory.
fn model_size(path: &Path) -> u64 {
    if path.is_dir() {
        std::fs::read_dir(path)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    } else {
        match bitnet_formats::GgufFile::open(path) {
            Ok(g) => g.tensors().iter().map(|t| t.size).sum(),
            Err(_) => std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        }
    }
}

/// The CPU's model name (Linux), or "unknown".
pub fn cpu_info() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// Peak resident set size of this process in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn human_size(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else {
        format!("{:.2} MiB", b / (1u64 << 20) as f64)
    }
}

fn human_params(n: u64) -> String {
    if n >= 1_000_000_000 {
        format!("{:.2} B", n as f64 / 1e9)
    } else {
        format!("{:.2} M", n as f64 / 1e6)
    }
}

fn random_tokens(rng: &mut Rng, n: usize, n_vocab: usize) -> Vec<u32> {
    (0..n).map(|_| rng.below(n_vocab as u64) as u32).collect()
}

/// Time one prompt of `n` random tokens after the first `depth` positions of the context.
fn run_pp(
    model: &Model,
    s: &mut bitnet_engine::Session,
    rng: &mut Rng,
    depth: usize,
    n: usize,
) -> Result<u64> {
    s.truncate(depth);
    let tokens = random_tokens(rng, n, model.config.n_vocab);
    let t0 = Instant::now();
    model.forward(s, &tokens, false)?;
    Ok(t0.elapsed().as_nanos() as u64)
}

/// Time `n` single-token forwards after the first `depth` positions of the context (from an
/// empty one: BOS first when the tokenizer adds one, then random tokens, as llama-bench does).
fn run_tg(
    model: &Model,
    s: &mut bitnet_engine::Session,
    rng: &mut Rng,
    depth: usize,
    n: usize,
) -> Result<u64> {
    s.truncate(depth);
    let v = model.config.n_vocab;
    let mut tok = match &model.tokenizer {
        Some(t) if t.add_bos() && depth == 0 => t.bos_id().unwrap_or(0),
        _ => rng.below(v as u64) as u32,
    };
    let t0 = Instant::now();
    for _ in 0..n {
        model.forward(s, &[tok], false)?;
        tok = rng.below(v as u64) as u32;
    }
    Ok(t0.elapsed().as_nanos() as u64)
}

/// The context of one depth: `depth` random tokens already in the cache, with room for the
/// largest test after them. Filled once; every test truncates back to `depth`.
fn depth_session(
    model: &Model,
    rng: &mut Rng,
    depth: usize,
    tests: &[(usize, usize)],
) -> Result<bitnet_engine::Session> {
    let longest = tests.iter().map(|&(p, g)| p + g).max().unwrap_or(0);
    let n = depth + longest;
    if n > model.config.n_ctx_train {
        return Err(anyhow!(
            "a test of {longest} tokens at depth {depth} does not fit the model's context of {}",
            model.config.n_ctx_train
        ));
    }
    let mut s = model.new_session(n);
    if depth > 0 {
        model.forward(
            &mut s,
            &random_tokens(rng, depth, model.config.n_vocab),
            false,
        )?;
    }
    Ok(s)
}

fn run_test(
    model: &Model,
    a: &BenchArgs,
    s: &mut bitnet_engine::Session,
    rng: &mut Rng,
    (n_depth, n_prompt, n_gen): (usize, usize, usize),
    n_threads: usize,
) -> Result<Record> {
    let once = |s: &mut bitnet_engine::Session, rng: &mut Rng, n_gen: usize| {
        if n_prompt > 0 {
            run_pp(model, s, rng, n_depth, n_prompt)
        } else {
            run_tg(model, s, rng, n_depth, n_gen)
        }
    };
    if !a.no_warmup {
        once(s, rng, 1)?;
    }
    let mut samples_ns = Vec::with_capacity(a.repetitions);
    for _ in 0..a.repetitions {
        samples_ns.push(once(s, rng, n_gen)?);
    }
    let mut test = if n_prompt > 0 {
        format!("pp{n_prompt}")
    } else {
        format!("tg{n_gen}")
    };
    if n_depth > 0 {
        test += &format!(" @ d{n_depth}"); // llama-bench's spelling
    }
    Ok(Record {
        test,
        n_prompt,
        n_gen,
        n_depth,
        n_threads,
        samples_ns,
    })
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.repetitions == 0 {
        return Err(anyhow!("-r/--repetitions must be at least 1"));
    }
    let threads = if a.threads.is_empty() {
        vec![std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)]
    } else {
        a.threads.clone()
    };
    if threads.contains(&0) {
        return Err(anyhow!("-t/--threads: thread counts must be at least 1"));
    }
    let tests: Vec<(usize, usize)> = a
        .n_prompt
        .iter()
        .filter(|&&p| p > 0)
        .map(|&p| (p, 0))
        .chain(a.n_gen.iter().filter(|&&g| g > 0).map(|&g| (0, g)))
        .collect();
    if tests.is_empty() {
        return Err(anyhow!("nothing to test: every -p and -n value is 0"));
    }

    let t0 = Instant::now();
    let model = crate::args::load_model(&a.model, &a.head)?;
    let load_ms = t0.elapsed().as_secs_f64() * 1e3;
    let c = &model.config;
    let size = model_size(&model.path);
    let params = n_params(c);
    let ternary_type = model
        .weights
        .layers
        .first()
        .map(|l| {
            let stored = l.wq.stored_as.split_whitespace().next().unwrap_or("?");
            match l.wq.layout {
                bitnet_kernels::ternary::Layout::Tq1 => format!("{stored} native"),
                bitnet_kernels::ternary::Layout::I2s | bitnet_kernels::ternary::Layout::Tq2 => {
                    stored.to_string()
                }
            }
        })
        .unwrap_or_else(|| "?".to_string());
    let head_type = model.weights.head_type_name();
    let model_type = format!(
        "{} {} {ternary_type}, head {head_type}",
        c.arch,
        human_params(params).replace(' ', "")
    );
    let backend = format!("CPU ({})", model.isa.name());
    let filename = model.path.display().to_string();
    let cpu = cpu_info();

    let mut out = std::io::stdout().lock();
    if !a.json {
        writeln!(
            out,
            "| model | size | params | backend | threads | test | t/s |"
        )?;
        writeln!(out, "| --- | ---: | ---: | --- | ---: | ---: | ---: |")?;
        out.flush()?;
    }
    let mut rng = Rng::new(a.seed);
    let mut records = Vec::new();
    for &nt in &threads {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(nt)
            .build()
            .map_err(|e| anyhow!("cannot start {nt} threads: {e}"))?;
        for &depth in &a.n_depth {
            let mut s = pool.install(|| depth_session(&model, &mut rng, depth, &tests))?;
            for &(np, ng) in &tests {
                let r =
                    pool.install(|| run_test(&model, &a, &mut s, &mut rng, (depth, np, ng), nt))?;
                let (avg, sd) = mean_sd(&r.samples_ts());
                if !a.json {
                    writeln!(
                        out,
                        "| {model_type} | {} | {} | {backend} | {nt} | {} | {avg:.2} ± {sd:.2} |",
                        human_size(size),
                        human_params(params),
                        r.test
                    )?;
                    out.flush()?;
                }
                let peak = peak_rss_bytes();
                records.push((r, peak));
            }
        }
    }
    let peak = peak_rss_bytes();
    if a.json {
        let arr: Vec<Value> = records
            .iter()
            .map(|(r, peak)| {
                let ts = r.samples_ts();
                let (avg_ts, sd_ts) = mean_sd(&ts);
                let ns: Vec<f64> = r.samples_ns.iter().map(|&x| x as f64).collect();
                let (avg_ns, sd_ns) = mean_sd(&ns);
                json!({
                    "test": r.test,
                    "model_filename": filename,
                    "model_type": model_type,
                    "model_size": size,
                    "model_n_params": params,
                    "cpu_info": cpu,
                    "backends": "CPU",
                    "isa": model.isa.name(),
                    "head_type": head_type,
                    "type_k": model.kv_type.name(),
                    "type_v": model.kv_type.name(),
                    "n_threads": r.n_threads,
                    "n_prompt": r.n_prompt,
                    "n_gen": r.n_gen,
                    "n_depth": r.n_depth,
                    "avg_ns": avg_ns.round() as u64,
                    "stddev_ns": sd_ns.round() as u64,
                    "avg_ts": avg_ts,
                    "stddev_ts": sd_ts,
                    "samples_ns": r.samples_ns,
                    "samples_ts": ts,
                    "load_time_ms": load_ms,
                    "peak_rss_bytes": peak,
                })
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&arr)?)?;
    } else {
        writeln!(out)?;
        writeln!(
            out,
            "load time {load_ms:.0} ms; peak RSS {}; file {}; CPU: {cpu}",
            peak.map(human_size).unwrap_or_else(|| "unknown".into()),
            human_size(size)
        )?;
    }
    out.flush()?;
    Ok(())
}
