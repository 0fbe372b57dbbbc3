//! `bitnet pull OWNER/REPO[:FILE_OR_QUANT][@REVISION]`: download a model into the standard
//! Hugging Face cache (shared with the Python tools) and print its local path on stdout;
//! progress goes to stderr. `HF_TOKEN`, `HF_ENDPOINT`, `HF_HOME` / `HF_HUB_CACHE` and
//! `HF_HUB_OFFLINE` are honoured as `huggingface_hub` does.

use anyhow::{anyhow, Result};
use bitnet_hub::{Hub, ModelRef};
use clap::Args;

#[derive(Args, Debug)]
pub struct PullArgs {
    /// OWNER/REPO, optionally :FILE or :QUANT (e.g. :i2_s) and @REVISION (branch, tag or commit).
    #[arg(value_name = "REF")]
    pub reference: String,
}

pub fn run(a: PullArgs) -> Result<()> {
    let r = ModelRef::parse(&a.reference).map_err(|e| anyhow!("{e}"))?;
    let hub = Hub::from_env()?;
    let path = hub.resolve(&r)?;
    println!("{}", path.display());
    Ok(())
}
