//! A small blocking client for the Hugging Face Hub, on `ureq`.
//!
//! Routes, as the Hub serves them:
//! - `GET {endpoint}/api/models/{repo}/revision/{revision}`: JSON with `sha` (the commit) and
//!   `siblings: [{rfilename}]` (the files).
//! - `HEAD {endpoint}/{repo}/resolve/{commit}/{file}`: `X-Repo-Commit`, `ETag` (git blob SHA-1
//!   of a small file), and for LFS files `X-Linked-Etag` (sha256) and `X-Linked-Size` with a
//!   302 redirect to a CDN URL. Relative redirects (renamed repositories) are followed.
//! - `GET` of that URL (or the CDN URL), with `Range: bytes=N-` to resume.
//!
//! Downloads go to `blobs/<etag>.incomplete`, are checked against the size and the hash the
//! Hub reported (sha256 for LFS files, `sha1("blob <len>\0" + content)` for small files), and
//! only then become `blobs/<etag>` and get their snapshot link. A file that fails the check stays
//! `.incomplete` (so an interrupted download can resume) and is never used; the next attempt
//! checks it again and starts over if it is still wrong.

use crate::cache::{self, is_commit_hash, RepoCache};
use crate::reference::{select_files, ModelRef, Selection};
use crate::{ErrorKind, HubError, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use sha1::Digest;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use ureq::http::{Response, StatusCode};

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Everything the client takes from the environment, explicit so that tests (and library
/// users) need not touch process-wide variables.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// `HF_ENDPOINT` (default `https://huggingface.co`), without a trailing slash.
    pub endpoint: String,
    /// The cache directory (see [`cache::default_cache_dir`]).
    pub cache_dir: PathBuf,
    /// `HF_TOKEN` (or the token file `huggingface-cli login` writes), sent as a bearer token
    /// to the endpoint only.
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE=1`: never touch the network, use the cache only.
    pub offline: bool,
    /// Progress bars and notes on stderr.
    pub progress: bool,
}

fn env_flag(k: &str) -> bool {
    std::env::var(k)
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

impl HubConfig {
    /// From `HF_ENDPOINT`, `HF_HUB_CACHE` / `HF_HOME`, `HF_TOKEN`, `HF_HUB_OFFLINE`, as
    /// `huggingface_hub` reads them. Progress is on.
    pub fn from_env() -> Result<HubConfig> {
        let endpoint = std::env::var("HF_ENDPOINT")
            .ok()
            .filter(|s| !s.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());
        let cache_dir = cache::default_cache_dir().ok_or_else(|| {
            HubError::new(
                ErrorKind::Io,
                "cannot find the Hugging Face cache: set HF_HUB_CACHE or HF_HOME (HOME is not set)",
            )
        })?;
        let token = std::env::var("HF_TOKEN")
            .or_else(|_| std::env::var("HUGGING_FACE_HUB_TOKEN"))
            .ok()
            .or_else(|| {
                let path = std::env::var_os("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .or_else(|| cache::hf_home().map(|h| h.join("token")))?;
                std::fs::read_to_string(path).ok()
            })
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        Ok(HubConfig {
            endpoint: endpoint.trim().trim_end_matches('/').to_string(),
            cache_dir,
            token,
            offline: env_flag("HF_HUB_OFFLINE"),
            progress: true,
        })
    }
}

/// Percent-encode one URL path segment (everything but unreserved characters).
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn encode_path(s: &str) -> String {
    s.split('/')
        .map(encode_segment)
        .collect::<Vec<_>>()
        .join("/")
}

/// `scheme://authority` of a URL.
fn origin(url: &str) -> &str {
    match url.find("://") {
        Some(i) => match url[i + 3..].find('/') {
            Some(j) => &url[..i + 3 + j],
            None => url,
        },
        None => url,
    }
}

fn is_loopback(url: &str) -> bool {
    let host = origin(url).split("://").nth(1).unwrap_or("");
    host.starts_with("127.") || host.starts_with("localhost") || host.starts_with("[::1]")
}

fn header<'a>(r: &'a Response<ureq::Body>, name: &str) -> Option<&'a str> {
    r.headers().get(name).and_then(|v| v.to_str().ok())
}

/// An ETag without `W/` and quotes.
fn clean_etag(s: &str) -> String {
    s.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

pub fn human_bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", U[i])
    }
}

/// What the Hub says about one file.
#[derive(Debug, Clone)]
struct FileMeta {
    etag: String,
    size: Option<u64>,
    /// Where to GET the bytes (the CDN URL of an LFS file, else the resolve URL).
    url: String,
}

/// The hash an ETag stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HashKind {
    Sha256,
    GitSha1,
    Unknown,
}

fn hash_kind(etag: &str) -> HashKind {
    let hex = etag.bytes().all(|b| b.is_ascii_hexdigit());
    match etag.len() {
        64 if hex => HashKind::Sha256,
        40 if hex => HashKind::GitSha1,
        _ => HashKind::Unknown,
    }
}

/// The hash of a file as the Hub computes it for this kind of ETag.
fn hash_file(path: &Path, kind: HashKind) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut buf = vec![0u8; 1 << 20];
    fn hex(d: &[u8]) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }
    match kind {
        HashKind::Sha256 => {
            let mut h = sha2::Sha256::new();
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            Ok(hex(&h.finalize()))
        }
        HashKind::GitSha1 => {
            let mut h = sha1::Sha1::new();
            h.update(format!("blob {len}\0").as_bytes());
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            Ok(hex(&h.finalize()))
        }
        HashKind::Unknown => Ok(String::new()),
    }
}

/// A Hub client with its cache.
pub struct Hub {
    cfg: HubConfig,
    agent: ureq::Agent,
}

impl Hub {
    pub fn new(cfg: HubConfig) -> Hub {
        let mut b = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .max_redirects_will_error(false)
            .timeout_connect(Some(Duration::from_secs(20)))
            .timeout_per_read(Some(Duration::from_secs(60)))
            .user_agent(format!("bitnet-rs/{}", env!("CARGO_PKG_VERSION")));
        if is_loopback(&cfg.endpoint) {
            b = b.proxy(None);
        }
        Hub {
            agent: b.build().new_agent(),
            cfg,
        }
    }

    pub fn from_env() -> Result<Hub> {
        Ok(Hub::new(HubConfig::from_env()?))
    }

    pub fn config(&self) -> &HubConfig {
        &self.cfg
    }

    fn note(&self, msg: &str) {
        if self.cfg.progress {
            eprintln!("{msg}");
        }
    }

    /// The local path of a reference, downloading what is missing: the GGUF file (or the
    /// file named with `:FILE`), or the snapshot folder of a safetensors repository.
    ///
    /// Offline (`HF_HUB_OFFLINE`), only the cache is used. When the Hub cannot be reached
    /// and the cache has the reference, the cached copy is used with a note.
    pub fn resolve(&self, r: &ModelRef) -> Result<PathBuf> {
        if self.cfg.offline {
            return self.resolve_cached(r).map_err(|e| {
                HubError::new(
                    e.kind,
                    format!(
                        "{} (HF_HUB_OFFLINE is set, so the Hub was not asked)",
                        e.message
                    ),
                )
            });
        }
        let info = match self.model_info(&r.repo, r.revision()) {
            Ok(i) => i,
            Err(e) if e.kind == ErrorKind::Network => {
                return match self.resolve_cached(r) {
                    Ok(p) => {
                        self.note(&format!(
                            "note: {}; using the cached copy of {r}",
                            e.message.split(';').next().unwrap_or(&e.message)
                        ));
                        Ok(p)
                    }
                    Err(_) => Err(e),
                };
            }
            Err(e) => return Err(e),
        };
        let sel = select_files(&r.repo, &info.files, r.selector.as_deref())?;
        let rc = RepoCache::new(&self.cfg.cache_dir, &r.repo);
        for f in sel.files() {
            self.ensure_file(&rc, &info.commit, &f)?;
        }
        rc.write_ref(r.revision(), &info.commit)?;
        Ok(match sel {
            Selection::File(f) => rc.snapshot_file(&info.commit, &f),
            Selection::Dir(_) => rc.snapshot_dir(&info.commit),
        })
    }

    /// The local path of a reference from the cache alone.
    pub fn resolve_cached(&self, r: &ModelRef) -> Result<PathBuf> {
        let rc = RepoCache::new(&self.cfg.cache_dir, &r.repo);
        let not_cached = |what: String| {
            HubError::new(
                ErrorKind::NotCached,
                format!(
                    "{what} is not in the Hugging Face cache ({}); download it first with `bitnet pull {r}` while online",
                    self.cfg.cache_dir.display()
                ),
            )
        };
        let Some(commit) = rc.cached_commit(r.revision()) else {
            return Err(not_cached(format!("{}@{}", r.repo, r.revision())));
        };
        let files = rc.snapshot_files(&commit);
        let sel = select_files(&r.repo, &files, r.selector.as_deref())
            .map_err(|_| not_cached(r.to_string()))?;
        Ok(match sel {
            Selection::File(f) => rc.snapshot_file(&commit, &f),
            Selection::Dir(_) => {
                let dir = rc.snapshot_dir(&commit);
                // A pull cut off between shards leaves config.json, the index and some
                // shards: that snapshot is not a usable copy of the model.
                if let Some(missing) = missing_shards(&dir, &files) {
                    return Err(HubError::new(
                        ErrorKind::NotCached,
                        format!(
                            "{r} is only partly in the Hugging Face cache ({}): {missing} missing; finish the download with `bitnet pull {r}` while online",
                            self.cfg.cache_dir.display()
                        ),
                    ));
                }
                dir
            }
        })
    }

    /// A request to `url`, with the token when it goes to the endpoint's origin.
    fn request(&self, method: &str, url: &str, range_from: u64) -> Result<Response<ureq::Body>> {
        let mut req = match method {
            "HEAD" => self.agent.head(url),
            _ => self.agent.get(url),
        }
        .header("Accept-Encoding", "identity");
        if origin(url) == origin(&self.cfg.endpoint) {
            if let Some(t) = &self.cfg.token {
                req = req.header("Authorization", format!("Bearer {t}"));
            }
        }
        if range_from > 0 {
            req = req.header("Range", format!("bytes={range_from}-"));
        }
        req.call().map_err(|e| self.transport_error(url, e))
    }

    fn transport_error(&self, url: &str, e: ureq::Error) -> HubError {
        let why = match &e {
            ureq::Error::HostNotFound => "host not found".to_string(),
            ureq::Error::Io(io) => io.to_string(),
            ureq::Error::Timeout(t) => format!("timed out ({t:?})"),
            other => other.to_string(),
        };
        HubError::new(
            ErrorKind::Network,
            format!(
                "cannot reach the Hugging Face Hub at {} ({why}); check the network connection, or set HF_HUB_OFFLINE=1 to use only models already in the cache",
                origin(url)
            ),
        )
    }

    /// The error for an HTTP status that is not a success.
    fn status_error(
        &self,
        resp: &Response<ureq::Body>,
        repo: &str,
        revision: &str,
        file: Option<&str>,
    ) -> HubError {
        let status = resp.status();
        let code = header(resp, "x-error-code").unwrap_or("");
        let server_msg = header(resp, "x-error-message")
            .map(|m| format!(" (the Hub says: {m})"))
            .unwrap_or_default();
        let what = match file {
            Some(f) => format!("{f} in {repo}@{revision}"),
            None => format!("{repo}@{revision}"),
        };
        match status.as_u16() {
            401 | 403 if code == "GatedRepo" || status == StatusCode::FORBIDDEN => HubError::new(
                ErrorKind::Unauthorized,
                format!(
                    "access to {repo} denied ({status}){server_msg}: it is private or gated; accept its terms on its Hub page and set HF_TOKEN to an access token of that account{}",
                    if self.cfg.token.is_some() { " (the token in HF_TOKEN was sent)" } else { "" }
                ),
            ),
            401 => HubError::new(
                ErrorKind::Unauthorized,
                if self.cfg.token.is_some() {
                    format!("{repo}: the Hub refused the token in HF_TOKEN ({status}){server_msg}; check that it is valid and has access to this repository (or that the name is right)")
                } else {
                    format!("{repo} was not found or is private ({status}){server_msg}; check the name, and for a private repository set HF_TOKEN to an access token")
                },
            ),
            404 => HubError::new(
                ErrorKind::NotFound,
                match (code, file) {
                    ("RevisionNotFound", _) => format!("revision {revision:?} not found in {repo}{server_msg}"),
                    (_, Some(_)) if code == "EntryNotFound" || code.is_empty() => format!("{what} not found (404){server_msg}"),
                    _ => format!("{repo} not found on {} (404){server_msg}; check the name (private repositories also need HF_TOKEN)", self.cfg.endpoint),
                },
            ),
            429 => HubError::new(
                ErrorKind::Network,
                format!("the Hub is rate-limiting requests (429) for {what}; wait a minute and try again"),
            ),
            500..=599 => HubError::new(
                ErrorKind::Network,
                format!("the Hub answered {status} for {what}; try again later"),
            ),
            _ => HubError::new(
                ErrorKind::Protocol,
                format!("unexpected answer {status} from the Hub for {what}{server_msg}"),
            ),
        }
    }

    fn model_info(&self, repo: &str, revision: &str) -> Result<RepoInfo> {
        let url = format!(
            "{}/api/models/{repo}/revision/{}",
            self.cfg.endpoint,
            encode_segment(revision)
        );
        let bad = |why: &str| {
            HubError::new(
                ErrorKind::Protocol,
                format!("the Hub's answer for {repo}@{revision} is not usable: {why}"),
            )
        };
        // A renamed repository answers with a redirect to its new name on the same server;
        // one to another server is not followed (it would get the token).
        let mut url = url;
        let mut hops = 0;
        let mut resp = loop {
            let resp = self.request("GET", &url, 0)?;
            if !resp.status().is_redirection() {
                break resp;
            }
            let loc = header(&resp, "location").unwrap_or("").to_string();
            let next = if loc.starts_with('/') && !loc.starts_with("//") {
                format!("{}{loc}", origin(&url))
            } else {
                loc
            };
            hops += 1;
            if hops > 5 || next.is_empty() || origin(&next) != origin(&url) {
                return Err(bad(&format!("redirected to {next:?}")));
            }
            url = next;
        };
        if !resp.status().is_success() {
            return Err(self.status_error(&resp, repo, revision, None));
        }
        let text = resp
            .body_mut()
            .with_config()
            .limit(64 << 20)
            .read_to_string()
            .map_err(|e| match e {
                ureq::Error::BodyExceedsLimit(_) => bad("larger than 64 MiB"),
                e => self.transport_error(&url, e),
            })?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| bad(&format!("invalid JSON ({e})")))?;
        let commit = v
            .get("sha")
            .and_then(|s| s.as_str())
            .filter(|s| is_commit_hash(s))
            .ok_or_else(|| bad("no commit hash (\"sha\")"))?
            .to_string();
        let files = v
            .get("siblings")
            .and_then(|s| s.as_array())
            .ok_or_else(|| bad("no file list (\"siblings\")"))?
            .iter()
            .filter_map(|s| s.get("rfilename").and_then(|f| f.as_str()))
            .filter(|f| safe_repo_path(f))
            .map(str::to_string)
            .collect();
        Ok(RepoInfo { commit, files })
    }

    /// HEAD the resolve URL of a file, following relative redirects; the ETag, size and the URL
    /// to download from.
    fn file_meta(&self, repo: &str, commit: &str, file: &str) -> Result<FileMeta> {
        let mut url = format!(
            "{}/{repo}/resolve/{commit}/{}",
            self.cfg.endpoint,
            encode_path(file)
        );
        for _ in 0..5 {
            let resp = self.request("HEAD", &url, 0)?;
            let status = resp.status();
            if status.is_redirection() {
                let loc = header(&resp, "location").unwrap_or("").to_string();
                if loc.starts_with('/') {
                    // A renamed repository: same server, follow and read the headers there.
                    url = format!("{}{loc}", origin(&url));
                    continue;
                }
                if loc.is_empty() {
                    return Err(HubError::new(
                        ErrorKind::Protocol,
                        format!("the Hub redirected {file} without a Location"),
                    ));
                }
                return self.meta_from(&resp, repo, file, loc);
            }
            if !status.is_success() {
                return Err(self.status_error(&resp, repo, commit, Some(file)));
            }
            return self.meta_from(&resp, repo, file, url);
        }
        Err(HubError::new(
            ErrorKind::Protocol,
            format!("too many redirects for {file} of {repo}"),
        ))
    }

    fn meta_from(
        &self,
        resp: &Response<ureq::Body>,
        repo: &str,
        file: &str,
        url: String,
    ) -> Result<FileMeta> {
        let etag = header(resp, "x-linked-etag")
            .or_else(|| header(resp, "etag"))
            .map(clean_etag)
            .unwrap_or_default();
        if etag.is_empty()
            || !etag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(HubError::new(
                ErrorKind::Protocol,
                format!("the Hub sent no usable ETag for {file} of {repo} (is HF_ENDPOINT a Hub?)"),
            ));
        }
        let size = header(resp, "x-linked-size")
            .or_else(|| header(resp, "content-length"))
            .and_then(|s| s.trim().parse::<u64>().ok());
        Ok(FileMeta { etag, size, url })
    }

    /// Make `snapshots/<commit>/<file>` exist, downloading its blob when needed.
    fn ensure_file(&self, rc: &RepoCache, commit: &str, file: &str) -> Result<PathBuf> {
        let pointer = rc.snapshot_file(commit, file);
        if pointer.is_file() {
            return Ok(pointer);
        }
        let meta = self.file_meta(&rc.repo, commit, file)?;
        // Held until the file is linked; checked after it is taken, since another process may
        // have finished the blob meanwhile.
        let _lock = self.lock_blob(rc, &meta.etag, file)?;
        let blob = rc.blob_path(&meta.etag);
        let blob_ok = blob
            .metadata()
            .is_ok_and(|m| m.is_file() && meta.size.is_none_or(|s| s == m.len()));
        if !blob_ok {
            self.download(rc, commit, file, &meta)?;
        }
        rc.link(commit, file, &meta.etag)
    }

    /// Take the blob's download lock (released when the file is dropped), saying so when
    /// another download holds it.
    fn lock_blob(&self, rc: &RepoCache, etag: &str, file: &str) -> Result<std::fs::File> {
        let path = rc.lock_path(etag);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| HubError::io(parent, e))?;
        }
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| HubError::io(&path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                self.note(&format!(
                    "note: waiting for another download of {file} of {} to finish",
                    rc.repo
                ));
                lock.lock().map_err(|e| HubError::io(&path, e))?;
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(HubError::io(&path, e)),
        }
        Ok(lock)
    }

    fn bar(&self, file: &str, size: Option<u64>, start: u64) -> ProgressBar {
        if !self.cfg.progress {
            return ProgressBar::hidden();
        }
        if !std::io::stderr().is_terminal() {
            eprintln!(
                "downloading {file}{}",
                size.map(|s| format!(" ({})", human_bytes(s)))
                    .unwrap_or_default()
            );
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::with_draw_target(size, ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{msg:32!} [{bar:30}] {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>12} eta {eta}",
        ) {
            pb.set_style(style.progress_chars("=> "));
        }
        pb.set_message(file.to_string());
        pb.set_position(start);
        pb
    }

    /// Download a file into `blobs/<etag>`, resuming `blobs/<etag>.incomplete`, and verify it.
    fn download(&self, rc: &RepoCache, commit: &str, file: &str, meta: &FileMeta) -> Result<()> {
        let inc = rc.incomplete_path(&meta.etag);
        let blob = rc.blob_path(&meta.etag);
        if let Some(parent) = inc.parent() {
            std::fs::create_dir_all(parent).map_err(|e| HubError::io(parent, e))?;
        }
        let kind = hash_kind(&meta.etag);
        let mut have = inc.metadata().map(|m| m.len()).unwrap_or(0);
        let truncate = |p: &Path| -> Result<()> {
            std::fs::File::create(p)
                .map(|_| ())
                .map_err(|e| HubError::io(p, e))
        };
        if meta.size.is_some_and(|s| have > s) {
            truncate(&inc)?;
            have = 0;
        }
        if have > 0 && meta.size == Some(have) {
            // Complete from an earlier attempt that failed the check: check it again, and
            // start over if it is still wrong.
            if self.verify(&inc, kind, meta, file, &rc.repo).is_ok() {
                return std::fs::rename(&inc, &blob).map_err(|e| HubError::io(&blob, e));
            }
            self.note(&format!(
                "note: discarding {} (it failed the checksum); downloading {file} again",
                inc.display()
            ));
            truncate(&inc)?;
            have = 0;
        }

        let mut url = meta.url.clone();
        let mut resp = None;
        for _ in 0..6 {
            let r = self.request("GET", &url, have)?;
            let status = r.status();
            if status.is_redirection() {
                let loc = header(&r, "location").unwrap_or("").to_string();
                url = if loc.starts_with('/') {
                    format!("{}{loc}", origin(&url))
                } else {
                    loc
                };
                continue;
            }
            if status == StatusCode::RANGE_NOT_SATISFIABLE && have > 0 {
                truncate(&inc)?;
                have = 0;
                continue;
            }
            let from_hub = url.starts_with(&self.cfg.endpoint) && url.contains("/resolve/");
            if !from_hub && matches!(status.as_u16(), 401 | 403) {
                // The Hub's file server (a signed link the Hub handed out) refused: an expired
                // link or a proxy, not a token problem.
                return Err(HubError::new(
                    ErrorKind::Network,
                    format!(
                        "the file server {} refused {file} of {}@{commit} ({status}): the signed download link may have expired or a proxy blocks it; run the command again",
                        origin(&url),
                        rc.repo
                    ),
                ));
            }
            if !status.is_success() {
                return Err(self.status_error(&r, &rc.repo, commit, Some(file)));
            }
            if status == StatusCode::PARTIAL_CONTENT {
                let start = header(&r, "content-range")
                    .and_then(|c| c.trim().strip_prefix("bytes "))
                    .and_then(|c| c.split('-').next())
                    .and_then(|s| s.parse::<u64>().ok());
                if start != Some(have) {
                    truncate(&inc)?;
                    have = 0;
                    continue;
                }
            } else if have > 0 {
                // The server ignored the Range header: start over.
                truncate(&inc)?;
                have = 0;
            }
            resp = Some(r);
            break;
        }
        let Some(resp) = resp else {
            return Err(HubError::new(
                ErrorKind::Protocol,
                // (A 416 or a misplaced 206 restarts from zero once, without a range: only
                // redirects can use up the tries.)
                format!(
                    "too many redirects downloading {file} of {}@{commit}",
                    rc.repo
                ),
            ));
        };

        let mut out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&inc)
            .map_err(|e| HubError::io(&inc, e))?;
        let pb = self.bar(file, meta.size, have);
        let mut reader = resp.into_body().into_reader();
        let mut buf = vec![0u8; 1 << 20];
        let mut got = have;
        let interrupted = |got: u64, why: String| {
            HubError::new(
                ErrorKind::Network,
                format!(
                    "the download of {file} from {} was interrupted after {} of {} ({why}); run the command again to resume",
                    rc.repo,
                    human_bytes(got),
                    meta.size.map(human_bytes).unwrap_or_else(|| "?".into())
                ),
            )
        };
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let _ = out.flush();
                    pb.abandon();
                    return Err(interrupted(got, e.to_string()));
                }
            };
            if let Some(size) = meta.size.filter(|&s| got + n as u64 > s) {
                // A body longer than announced would fill the disk; it is not this file.
                drop(out);
                pb.abandon();
                let _ = std::fs::File::create(&inc);
                return Err(HubError::new(
                    ErrorKind::Protocol,
                    format!(
                        "the server sent more than the {size} bytes announced for {file} of {}; the partial file was discarded",
                        rc.repo
                    ),
                ));
            }
            out.write_all(&buf[..n])
                .map_err(|e| HubError::io(&inc, e))?;
            got += n as u64;
            pb.set_position(got);
        }
        out.flush().map_err(|e| HubError::io(&inc, e))?;
        out.sync_all().map_err(|e| HubError::io(&inc, e))?;
        drop(out);
        pb.finish_and_clear();
        if let Some(size) = meta.size {
            if got != size {
                return Err(interrupted(got, "connection closed early".into()));
            }
        }
        self.verify(&inc, kind, meta, file, &rc.repo)?;
        std::fs::rename(&inc, &blob).map_err(|e| HubError::io(&blob, e))
    }

    fn verify(
        &self,
        path: &Path,
        kind: HashKind,
        meta: &FileMeta,
        file: &str,
        repo: &str,
    ) -> Result<()> {
        let len = path.metadata().map_err(|e| HubError::io(path, e))?.len();
        if let Some(size) = meta.size {
            if len != size {
                return Err(HubError::new(
                    ErrorKind::ChecksumMismatch,
                    format!("{file} of {repo}: {len} bytes downloaded but the Hub reports {size}; the partial file {} is kept and never used", path.display()),
                ));
            }
        }
        if kind == HashKind::Unknown {
            return Ok(());
        }
        let got = hash_file(path, kind).map_err(|e| HubError::io(path, e))?;
        if got != meta.etag.to_ascii_lowercase() {
            let what = if kind == HashKind::Sha256 {
                "sha256"
            } else {
                "git blob SHA-1"
            };
            return Err(HubError::new(
                ErrorKind::ChecksumMismatch,
                format!(
                    "checksum mismatch for {file} of {repo}: the Hub reports {what} {} but the download has {got}; the file was not used (it is kept as {} and checked again, then replaced, on the next attempt)",
                    meta.etag,
                    path.display()
                ),
            ));
        }
        Ok(())
    }
}

struct RepoInfo {
    commit: String,
    files: Vec<String>,
}

/// A repository file name that stays inside the snapshot folder on every OS: `/`-separated
/// parts, none empty, `.` or `..`, none with a backslash, a colon (a drive or stream on
/// Windows) or a control character.
fn safe_repo_path(f: &str) -> bool {
    !f.split('/').any(|p| {
        p.is_empty()
            || p == "."
            || p == ".."
            || p.chars().any(|c| c == '\\' || c == ':' || c.is_control())
    })
}

/// The shards that `model.safetensors.index.json` in `dir` names and `files` lacks, as a
/// list for a message; `None` when there is no index or every shard is there. An index
/// that cannot be read counts as missing shards: the loader could not use it either.
fn missing_shards(dir: &Path, files: &[String]) -> Option<String> {
    let index = "model.safetensors.index.json";
    if !files.iter().any(|f| f == index) {
        return None;
    }
    let parsed: Option<serde_json::Value> = std::fs::read(dir.join(index))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let Some(map) = parsed
        .as_ref()
        .and_then(|v| v.get("weight_map"))
        .and_then(|m| m.as_object())
    else {
        return Some(format!("a readable {index}"));
    };
    let mut missing: Vec<&str> = map
        .values()
        .filter_map(|v| v.as_str())
        .filter(|shard| !files.iter().any(|f| f == shard))
        .collect();
    missing.sort();
    missing.dedup();
    (!missing.is_empty()).then(|| missing.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_encoded_per_segment() {
        assert_eq!(encode_segment("refs/pr/1"), "refs%2Fpr%2F1");
        assert_eq!(encode_path("sub dir/a+b.gguf"), "sub%20dir/a%2Bb.gguf");
        assert_eq!(origin("http://127.0.0.1:8080/a/b"), "http://127.0.0.1:8080");
        assert_eq!(origin("https://huggingface.co"), "https://huggingface.co");
        assert!(is_loopback("http://127.0.0.1:5/x") && !is_loopback("https://huggingface.co"));
        assert_eq!(clean_etag("W/\"abc\""), "abc");
    }

    /// Names a hostile repository could list, refused: they would leave the snapshot folder
    /// (on Windows a backslash or drive is a separator too) or break the link depth.
    #[test]
    fn repository_file_names_stay_inside_the_snapshot() {
        for ok in [
            "a.gguf",
            "sub/dir/model-00001-of-00002.safetensors",
            "x..y.gguf",
            ".gitattributes",
        ] {
            assert!(safe_repo_path(ok), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "a//b",
            "../x.gguf",
            "a/../../x.gguf",
            "./x-i2_s.gguf",
            "..\\..\\x-i2_s.gguf",
            "model\\..\\x.safetensors",
            "C:/x.gguf",
            "a\0b.gguf",
            "a\nb.gguf",
        ] {
            assert!(!safe_repo_path(bad), "{bad:?}");
        }
    }

    #[test]
    fn git_blob_sha1_matches_git() {
        // `printf 'hello\n' | git hash-object --stdin`
        let dir = std::env::temp_dir().join(format!("bitnet-hub-sha1-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        std::fs::write(&p, b"hello\n").unwrap();
        assert_eq!(
            hash_file(&p, HashKind::GitSha1).unwrap(),
            "ce013625030ba8dba906f756967f9e9ca394464a"
        );
        assert_eq!(
            hash_file(&p, HashKind::Sha256).unwrap(),
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
