//! Options shared by several subcommands (llama.cpp's names), and model loading.

use anyhow::{anyhow, Result};
use bitnet_engine::sampler::{parse_logit_bias, SamplingParams};
use bitnet_engine::Model;
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Args, Debug, Clone)]
pub struct SamplingArgs {
    /// Temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.8, allow_negative_numbers = true)]
    pub temp: f32,
    /// Keep only the K most likely tokens (0 = off).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set reaching probability P (1 = off).
    #[arg(long, default_value_t = 0.95, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Drop tokens less likely than P times the most likely one (0 = off).
    #[arg(long, default_value_t = 0.05, allow_negative_numbers = true)]
    pub min_p: f32,
    /// Locally typical sampling (1 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub typical: f32,
    /// Penalise repeated tokens (1 = off).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at (0 = off).
    #[arg(long, default_value_t = 64)]
    pub repeat_last_n: usize,
    /// OpenAI-style presence penalty.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub presence_penalty: f32,
    /// OpenAI-style frequency penalty.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    pub frequency_penalty: f32,
    /// Bias a token: ID+BIAS or ID-BIAS (e.g. 15043+1, 15043-inf bans it). Repeatable.
    #[arg(
        long = "logit-bias",
        value_name = "ID(+|-)BIAS",
        allow_hyphen_values = true
    )]
    pub logit_bias: Vec<String>,
    /// Random seed (default: from the clock). Same seed and settings give the same text.
    #[arg(short = 's', long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    pub fn params(&self) -> Result<SamplingParams> {
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        let logit_bias = self
            .logit_bias
            .iter()
            .map(|s| parse_logit_bias(s))
            .collect::<Result<Vec<_>, _>>()?;
        let p = SamplingParams {
            temperature: self.temp,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            typical_p: self.typical,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias,
            seed,
        };
        p.validate()?;
        Ok(p)
    }
}

/// Set the size of the compute thread pool (default: the available cores).
pub fn init_threads(threads: Option<usize>) -> Result<()> {
    let n = match threads {
        Some(0) => return Err(anyhow!("--threads must be at least 1")),
        Some(n) => n,
        None => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    };
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| anyhow!("cannot start {n} threads: {e}"))
}

/// The model `run`, `chat` and `serve` use when `-m` is not given.
pub const DEFAULT_MODEL: &str = "microsoft/bitnet-b1.58-2B-4T-gguf";

/// A `-m` argument as a local path. A path that exists always wins; anything else is a Hugging
/// Face reference `OWNER/REPO[:FILE_OR_QUANT][@REVISION]`, found in (or downloaded into) the
/// standard Hugging Face cache, with progress on stderr.
pub fn resolve_model(arg: &str) -> Result<PathBuf> {
    let path = Path::new(arg);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    if bitnet_hub::ModelRef::looks_like_path(arg) {
        return Err(anyhow!("{arg}: no such file or directory"));
    }
    let r = bitnet_hub::ModelRef::parse(arg)
        .map_err(|e| anyhow!("{arg}: no such file or directory, and {e}"))?;
    let hub = bitnet_hub::Hub::from_env()?;
    hub.resolve(&r).map_err(|e| match e.kind {
        bitnet_hub::ErrorKind::NotFound | bitnet_hub::ErrorKind::Unauthorized => {
            anyhow!("{e} (there is no local file or directory named {arg:?} either)")
        }
        _ => anyhow!("{e}"),
    })
}

/// [`resolve_model`] for a `PathBuf` argument (an existing path is used as it is, even when it
/// is not valid UTF-8).
pub fn resolve_model_path(arg: &Path) -> Result<PathBuf> {
    if arg.exists() {
        return Ok(arg.to_path_buf());
    }
    resolve_model(&arg.to_string_lossy())
}

/// Print a model's load-time warnings to stderr.
pub fn print_warnings(warnings: &[String]) {
    for w in warnings {
        if w.contains("all zeros") {
            // The engine names the tensor; say how to avoid the broken upload.
            eprintln!("warning: {w}; pin a known-good revision with -m OWNER/REPO@REVISION");
        } else {
            eprintln!("warning: {w}");
        }
    }
}

/// The global load options (`--no-mmap`, `--kv-type`, `--tq1-native`), set once by `main`.
static GLOBAL_LOAD: std::sync::OnceLock<bitnet_engine::model::LoadOptions> =
    std::sync::OnceLock::new();

pub fn set_global_load_options(
    no_mmap: bool,
    kv_type: bitnet_engine::model::KvType,
    tq1_native: bool,
) {
    let _ = GLOBAL_LOAD.set(bitnet_engine::model::LoadOptions {
        no_mmap,
        kv_type,
        tq1_native,
        ..Default::default()
    });
}

/// How every command loads a model (the global options).
pub fn load_options() -> bitnet_engine::model::LoadOptions {
    GLOBAL_LOAD.get().cloned().unwrap_or_default()
}

/// `--head-type`, for every command that runs the model (`run`, `chat`, `serve`, `bench`,
/// `perplexity`).
#[derive(Args, Debug, Clone, Default)]
pub struct HeadArg {
    /// Compute the output head as f16 (as stored), q8_0 or q6_k (requantized at load; for
    /// 2B4T 0.3 / 0.39 GB less memory and faster generation; q6_k needs a hidden size that is
    /// a multiple of 256 and is a little less exact; `bitnet perplexity --kl-divergence`
    /// against a --save-logits run of the stored head measures what each costs).
    #[arg(long)]
    pub head_type: Option<String>,
}

impl HeadArg {
    /// The global load options with this head type.
    pub fn load_options(&self) -> Result<bitnet_engine::model::LoadOptions> {
        let head_type = self
            .head_type
            .as_deref()
            .map(|h| h.parse::<bitnet_engine::model::HeadType>())
            .transpose()
            .map_err(|e| anyhow!("--head-type: {e}"))?;
        Ok(bitnet_engine::model::LoadOptions {
            head_type,
            ..load_options()
        })
    }
}

/// Load a model (a path or a Hub reference, see [`resolve_model`]) with the output head
/// computed as `head` says, and print its load-time warnings to stderr.
pub fn load_model(path: &Path, head: &HeadArg) -> Result<Model> {
    let opts = head.load_options()?;
    let path = resolve_model_path(path)?;
    let model = Model::load_with(&path, &opts)?;
    print_warnings(&model.warnings);
    Ok(model)
}

/// Load a model with a spinner on stderr (when `show` and stderr is a terminal).
pub fn load_model_with_progress(path: &Path, head: &HeadArg, show: bool) -> Result<Model> {
    use std::io::IsTerminal;
    // Download first (with its own progress bars), then show the spinner while loading.
    let path = &resolve_model_path(path)?;
    let bar = if show && std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new_spinner();
        b.set_message(format!("loading {}", path.display()));
        b.enable_steady_tick(std::time::Duration::from_millis(100));
        Some(b)
    } else {
        None
    };
    let model = load_model(path, head);
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    model
}
