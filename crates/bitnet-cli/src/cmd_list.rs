//! `bitnet list`: the models in the Hugging Face cache with their sizes; `bitnet rm REF`:
//! remove one (a whole repository, or one revision with `@REVISION`).

use anyhow::{anyhow, Result};
use bitnet_hub::cache::{self, CachedModel};
use bitnet_hub::client::human_bytes;
use bitnet_hub::{HubConfig, ModelRef};
use clap::Args;

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Also show the cache folder of each model and every file of every snapshot.
    #[arg(short = 'v', long)]
    pub verbose: bool,
}

#[derive(Args, Debug)]
pub struct RmArgs {
    /// OWNER/REPO, or OWNER/REPO@REVISION to remove only that revision.
    #[arg(value_name = "REF")]
    pub reference: String,
}

/// What a cached model holds, in one short phrase.
fn contents(m: &CachedModel) -> String {
    let mut ggufs: Vec<&str> = Vec::new();
    let mut n_files = 0;
    for (_, files) in &m.snapshots {
        n_files += files.len();
        for f in files {
            if f.to_ascii_lowercase().ends_with(".gguf") && !ggufs.contains(&f.as_str()) {
                ggufs.push(f);
            }
        }
    }
    if !ggufs.is_empty() {
        ggufs.join(", ")
    } else if m
        .snapshots
        .iter()
        .any(|(_, f)| f.iter().any(|x| x == "config.json"))
    {
        format!("Hugging Face directory ({n_files} files)")
    } else {
        format!("{n_files} files")
    }
}

/// The first seven characters of a commit hash as git shows them; a hand-edited cache may hold
/// something else, shown whole.
fn short_hash(c: &str) -> &str {
    c.get(..7).unwrap_or(c)
}

fn revisions(m: &CachedModel) -> String {
    let mut out: Vec<String> = m
        .refs
        .iter()
        .map(|(name, c)| format!("{name}={}", short_hash(c)))
        .collect();
    for (c, _) in &m.snapshots {
        if !m.refs.iter().any(|(_, rc)| rc == c) {
            out.push(short_hash(c).to_string());
        }
    }
    if out.is_empty() {
        "-".into()
    } else {
        out.join(",")
    }
}

pub fn run_list(a: ListArgs) -> Result<()> {
    let cfg = HubConfig::from_env()?;
    let models = cache::scan(&cfg.cache_dir)?;
    if models.is_empty() {
        println!(
            "no models in the Hugging Face cache ({}); download one with `bitnet pull OWNER/REPO`",
            cfg.cache_dir.display()
        );
        return Ok(());
    }
    let rows: Vec<[String; 4]> = models
        .iter()
        .map(|m| {
            let mut size = human_bytes(m.size);
            if m.incomplete > 0 {
                size.push_str(&format!(" (+{} partial)", human_bytes(m.incomplete)));
            }
            [m.repo.clone(), size, revisions(m), contents(m)]
        })
        .collect();
    let head = ["MODEL", "SIZE", "REVISIONS", "FILES"];
    let w: Vec<usize> = (0..3)
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([head[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    println!(
        "{:<w0$}  {:>w1$}  {:<w2$}  {}",
        head[0],
        head[1],
        head[2],
        head[3],
        w0 = w[0],
        w1 = w[1],
        w2 = w[2]
    );
    for (r, m) in rows.iter().zip(&models) {
        println!(
            "{:<w0$}  {:>w1$}  {:<w2$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2]
        );
        if a.verbose {
            println!("    {}", m.dir.display());
            for (c, files) in &m.snapshots {
                for f in files {
                    println!("    snapshots/{c}/{f}");
                }
            }
        }
    }
    let total: u64 = models.iter().map(|m| m.size + m.incomplete).sum();
    println!(
        "{} model(s), {} in {}",
        models.len(),
        human_bytes(total),
        cfg.cache_dir.display()
    );
    Ok(())
}

pub fn run_rm(a: RmArgs) -> Result<()> {
    let r = ModelRef::parse(&a.reference).map_err(|e| anyhow!("{e}"))?;
    let cfg = HubConfig::from_env()?;
    let removed = cache::remove(&cfg.cache_dir, &r)?;
    if removed.whole_repo {
        println!("removed {} ({} freed)", r.repo, human_bytes(removed.bytes));
    } else {
        println!(
            "removed {} ({} freed; other revisions are kept)",
            r,
            human_bytes(removed.bytes)
        );
    }
    Ok(())
}
