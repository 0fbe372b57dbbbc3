//! The `huggingface_hub` cache layout, shared with the Python tools:
//!
//! ```text
//! <cache>/models--OWNER--REPO/
//!     blobs/<etag>                  file contents, named by the Hub's ETag (sha256 or git sha1)
//!     blobs/<etag>.incomplete       a download in progress (resumed with a Range request)
//!     refs/<revision>               the commit a branch or tag pointed to when last resolved
//!     snapshots/<commit>/<file>     relative symlinks to ../../blobs/<etag>
//! ```
//!
//! `<cache>` is `HF_HUB_CACHE`, else `HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`,
//! else `~/.cache/huggingface/hub`, as in `huggingface_hub`.

use crate::reference::ModelRef;
use crate::{ErrorKind, HubError, Result};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// The Hub cache directory from the environment (see the module docs).
pub fn default_cache_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        return Some(p);
    }
    Some(hf_home()?.join("hub"))
}

/// `HF_HOME`, else `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`.
pub fn hf_home() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = var("HF_HOME") {
        return Some(p);
    }
    if let Some(p) = var("XDG_CACHE_HOME") {
        return Some(p.join("huggingface"));
    }
    let home = var("HOME").or_else(|| var("USERPROFILE"))?;
    Some(home.join(".cache").join("huggingface"))
}

/// `models--OWNER--REPO`.
pub fn repo_folder_name(repo: &str) -> String {
    format!("models--{}", repo.replace('/', "--"))
}

/// Is this a full 40-hex-digit commit hash?
pub fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn io_err(path: &Path, e: std::io::Error) -> HubError {
    HubError::io(path, e)
}

/// One repository's folder in the cache.
#[derive(Debug, Clone)]
pub struct RepoCache {
    pub repo: String,
    pub dir: PathBuf,
}

impl RepoCache {
    pub fn new(cache_dir: &Path, repo: &str) -> RepoCache {
        RepoCache {
            repo: repo.to_string(),
            dir: cache_dir.join(repo_folder_name(repo)),
        }
    }

    pub fn blob_path(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(etag)
    }

    /// The lock file of one blob's download, where `huggingface_hub` keeps its own
    /// (`<cache>/.locks/<repo folder>/<etag>.lock`, also an flock), so that two downloads of
    /// one blob, ours or Python's, take turns instead of appending to one partial file.
    pub fn lock_path(&self, etag: &str) -> PathBuf {
        let cache = self.dir.parent().unwrap_or(Path::new("."));
        let folder = self.dir.file_name().unwrap_or_default();
        cache
            .join(".locks")
            .join(folder)
            .join(format!("{etag}.lock"))
    }

    pub fn incomplete_path(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(format!("{etag}.incomplete"))
    }

    pub fn snapshot_dir(&self, commit: &str) -> PathBuf {
        self.dir.join("snapshots").join(commit)
    }

    pub fn snapshot_file(&self, commit: &str, file: &str) -> PathBuf {
        let mut p = self.snapshot_dir(commit);
        for part in file.split('/') {
            p.push(part);
        }
        p
    }

    fn ref_path(&self, revision: &str) -> PathBuf {
        let mut p = self.dir.join("refs");
        for part in revision.split('/') {
            p.push(part);
        }
        p
    }

    /// The commit a revision resolves to from the cache alone: a commit hash whose snapshot
    /// exists, or the content of `refs/<revision>`.
    pub fn cached_commit(&self, revision: &str) -> Option<String> {
        if is_commit_hash(revision) && self.snapshot_dir(revision).is_dir() {
            return Some(revision.to_string());
        }
        let text = std::fs::read_to_string(self.ref_path(revision)).ok()?;
        let c = text.trim();
        is_commit_hash(c).then(|| c.to_string())
    }

    /// Record that `revision` points to `commit` (nothing to do for a commit hash).
    pub fn write_ref(&self, revision: &str, commit: &str) -> Result<()> {
        if revision == commit {
            return Ok(());
        }
        let p = self.ref_path(revision);
        if std::fs::read_to_string(&p).is_ok_and(|t| t.trim() == commit) {
            return Ok(());
        }
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
        }
        std::fs::write(&p, commit).map_err(|e| io_err(&p, e))
    }

    /// Files of a snapshot whose blob exists, as '/'-separated paths relative to it.
    pub fn snapshot_files(&self, commit: &str) -> Vec<String> {
        fn walk(dir: &Path, prefix: &str, out: &mut Vec<String>) {
            let Ok(rd) = std::fs::read_dir(dir) else {
                return;
            };
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                let rel = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}/{name}")
                };
                let path = e.path();
                if path.is_dir() {
                    walk(&path, &rel, out);
                } else if path.is_file() {
                    // is_file follows the symlink: a dangling link is not a file.
                    out.push(rel);
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.snapshot_dir(commit), "", &mut out);
        out.sort();
        out
    }

    /// Point `snapshots/<commit>/<file>` at `blobs/<etag>` (a relative symlink, as
    /// `huggingface_hub` makes; a copy where symlinks are not available).
    pub fn link(&self, commit: &str, file: &str, etag: &str) -> Result<PathBuf> {
        let pointer = self.snapshot_file(commit, file);
        let blob = self.blob_path(etag);
        if let Some(parent) = pointer.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
        }
        if pointer.symlink_metadata().is_ok() {
            std::fs::remove_file(&pointer).map_err(|e| io_err(&pointer, e))?;
        }
        #[cfg(unix)]
        {
            let depth = file.split('/').count() + 1; // snapshots/<commit>/<dirs...>/file
            let mut target = PathBuf::new();
            for _ in 0..depth {
                target.push("..");
            }
            target.push("blobs");
            target.push(etag);
            std::os::unix::fs::symlink(&target, &pointer).map_err(|e| io_err(&pointer, e))?;
        }
        #[cfg(not(unix))]
        {
            std::fs::copy(&blob, &pointer).map_err(|e| io_err(&pointer, e))?;
        }
        let _ = blob;
        Ok(pointer)
    }
}

/// A model in the cache, for `bitnet list`.
#[derive(Debug, Clone)]
pub struct CachedModel {
    pub repo: String,
    pub dir: PathBuf,
    /// Bytes of complete blobs.
    pub size: u64,
    /// Bytes of unfinished downloads (`.incomplete`).
    pub incomplete: u64,
    /// (revision, commit) from `refs/`.
    pub refs: Vec<(String, String)>,
    /// (commit, files) per snapshot.
    pub snapshots: Vec<(String, Vec<String>)>,
    pub modified: Option<SystemTime>,
}

fn dir_size(dir: &Path) -> (u64, u64, Option<SystemTime>) {
    let (mut done, mut partial, mut modified) = (0, 0, None::<SystemTime>);
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let Ok(md) = e.metadata() else { continue };
            if !md.is_file() {
                continue;
            }
            if e.file_name().to_string_lossy().ends_with(".incomplete") {
                partial += md.len();
            } else {
                done += md.len();
            }
            if let Ok(m) = md.modified() {
                modified = Some(modified.map_or(m, |x| x.max(m)));
            }
        }
    }
    (done, partial, modified)
}

fn read_refs(dir: &Path, prefix: &str, out: &mut Vec<(String, String)>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let rel = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let p = e.path();
        if p.is_dir() {
            read_refs(&p, &rel, out);
        } else if let Ok(t) = std::fs::read_to_string(&p) {
            out.push((rel, t.trim().to_string()));
        }
    }
}

/// Every model repository in the cache (`models--*` folders), sorted by name.
pub fn scan(cache_dir: &Path) -> Result<Vec<CachedModel>> {
    let rd = match std::fs::read_dir(cache_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(cache_dir, e)),
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix("models--") else {
            continue;
        };
        let Some((owner, repo)) = rest.split_once("--") else {
            continue;
        };
        let dir = e.path();
        if !dir.is_dir() {
            continue;
        }
        let repo_id = format!("{owner}/{repo}");
        let rc = RepoCache {
            repo: repo_id.clone(),
            dir: dir.clone(),
        };
        let (size, incomplete, modified) = dir_size(&dir.join("blobs"));
        let mut refs = Vec::new();
        read_refs(&dir.join("refs"), "", &mut refs);
        refs.sort();
        let mut snapshots = Vec::new();
        if let Ok(rd) = std::fs::read_dir(dir.join("snapshots")) {
            for s in rd.flatten() {
                let commit = s.file_name().to_string_lossy().to_string();
                snapshots.push((commit.clone(), rc.snapshot_files(&commit)));
            }
        }
        snapshots.sort();
        out.push(CachedModel {
            repo: repo_id,
            dir,
            size,
            incomplete,
            refs,
            snapshots,
            modified,
        });
    }
    out.sort_by(|a, b| a.repo.cmp(&b.repo));
    Ok(out)
}

/// What [`remove`] deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removed {
    pub path: PathBuf,
    pub bytes: u64,
    /// True when the whole repository folder went.
    pub whole_repo: bool,
}

/// Remove a model from the cache: the whole repository, or with `@REVISION` only that
/// snapshot (and the blobs no other snapshot uses). `:X` is refused: files of a snapshot are
/// not removed one by one.
pub fn remove(cache_dir: &Path, r: &ModelRef) -> Result<Removed> {
    if r.selector.is_some() {
        return Err(HubError::new(
            ErrorKind::InvalidReference,
            format!(
                "bitnet rm removes a whole repository or one revision of it: drop ':{}' from {r}",
                r.selector.as_deref().unwrap_or("")
            ),
        ));
    }
    let rc = RepoCache::new(cache_dir, &r.repo);
    if !rc.dir.is_dir() {
        return Err(HubError::new(
            ErrorKind::NotCached,
            format!("{} is not in the cache ({})", r.repo, cache_dir.display()),
        ));
    }
    let Some(rev) = &r.revision else {
        let (size, partial, _) = dir_size(&rc.dir.join("blobs"));
        std::fs::remove_dir_all(&rc.dir).map_err(|e| io_err(&rc.dir, e))?;
        return Ok(Removed {
            path: rc.dir,
            bytes: size + partial,
            whole_repo: true,
        });
    };
    let Some(commit) = rc.cached_commit(rev).or_else(|| {
        // A short commit hash names the snapshot it is a prefix of.
        let snaps = std::fs::read_dir(rc.dir.join("snapshots")).ok()?;
        let m: Vec<String> = snaps
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|c| rev.len() >= 7 && c.starts_with(rev.as_str()))
            .collect();
        (m.len() == 1).then(|| m[0].clone())
    }) else {
        return Err(HubError::new(
            ErrorKind::NotCached,
            format!("revision {rev} of {} is not in the cache", r.repo),
        ));
    };
    let snap = rc.snapshot_dir(&commit);
    if snap.is_dir() {
        std::fs::remove_dir_all(&snap).map_err(|e| io_err(&snap, e))?;
    }
    let mut refs = Vec::new();
    read_refs(&rc.dir.join("refs"), "", &mut refs);
    for (name, c) in refs {
        if c == commit {
            let p = rc.ref_path(&name);
            std::fs::remove_file(&p).map_err(|e| io_err(&p, e))?;
        }
    }
    // Blobs still used by the remaining snapshots.
    let mut used = std::collections::HashSet::new();
    if let Ok(rd) = std::fs::read_dir(rc.dir.join("snapshots")) {
        for s in rd.flatten() {
            let c = s.file_name().to_string_lossy().to_string();
            for f in rc.snapshot_files(&c) {
                if let Ok(t) = std::fs::read_link(rc.snapshot_file(&c, &f)) {
                    if let Some(n) = t.file_name() {
                        used.insert(n.to_string_lossy().to_string());
                    }
                }
            }
        }
    }
    let mut bytes = 0;
    if let Ok(rd) = std::fs::read_dir(rc.dir.join("blobs")) {
        for b in rd.flatten() {
            let name = b.file_name().to_string_lossy().to_string();
            if !used.contains(&name) && !name.ends_with(".incomplete") {
                bytes += b.metadata().map(|m| m.len()).unwrap_or(0);
                let p = b.path();
                std::fs::remove_file(&p).map_err(|e| io_err(&p, e))?;
            }
        }
    }
    let any_left = std::fs::read_dir(rc.dir.join("snapshots"))
        .map(|mut rd| rd.next().is_some())
        .unwrap_or(false);
    if !any_left {
        let (size, partial, _) = dir_size(&rc.dir.join("blobs"));
        std::fs::remove_dir_all(&rc.dir).map_err(|e| io_err(&rc.dir, e))?;
        return Ok(Removed {
            path: rc.dir,
            bytes: bytes + size + partial,
            whole_repo: true,
        });
    }
    Ok(Removed {
        path: snap,
        bytes,
        whole_repo: false,
    })
}
