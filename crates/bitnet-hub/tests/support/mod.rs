//! A stand-in for the Hugging Face Hub on 127.0.0.1, for tests: a tiny HTTP/1.1 server (one
//! thread per connection, `Connection: close`, bounded timeouts) that serves repositories with
//! the Hub's routes and headers:
//!
//! - `GET /api/models/{repo}/revision/{rev}`: `{"id", "sha", "siblings": [{"rfilename"}]}`;
//! - `HEAD|GET /{repo}/resolve/{rev}/{file}`: `X-Repo-Commit`, `ETag` (git blob SHA-1); LFS
//!   files answer 302 to `/cdn-lfs/{sha256}?...` (an absolute URL, like the real CDN) with
//!   `X-Linked-Etag` (sha256) and `X-Linked-Size`;
//! - `GET /cdn-lfs/{sha256}`: the bytes, with `Range` support.
//!
//! Errors carry `X-Error-Code` like the Hub's (`RepositoryNotFound`, `RevisionNotFound`,
//! `EntryNotFound`). Knobs in [`State`]: a required token (401 otherwise), dropping the
//! connection part-way through the next CDN download, serving corrupted bytes. Every request is
//! logged. Used by `crates/bitnet-hub/tests` and (through `#[path]`) the CLI tests.
#![allow(dead_code)]

use sha1::Digest;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct RepoFile {
    pub name: String,
    pub data: Vec<u8>,
    pub lfs: bool,
}

impl RepoFile {
    pub fn sha256(&self) -> String {
        hex(&sha2::Sha256::digest(&self.data))
    }

    pub fn git_sha1(&self) -> String {
        let mut h = sha1::Sha1::new();
        h.update(format!("blob {}\0", self.data.len()).as_bytes());
        h.update(&self.data);
        hex(&h.finalize())
    }

    /// The ETag the Hub uses as the blob name.
    pub fn etag(&self) -> String {
        if self.lfs {
            self.sha256()
        } else {
            self.git_sha1()
        }
    }
}

pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

pub struct Repo {
    pub id: String,
    pub commit: String,
    pub files: Vec<RepoFile>,
}

#[derive(Default)]
pub struct State {
    pub repos: Vec<Repo>,
    /// When set, API and resolve requests need `Authorization: Bearer <token>`.
    pub token: Option<String>,
    /// Close the connection after this many body bytes of the next CDN download (once).
    pub drop_after: Option<usize>,
    /// Serve LFS bytes with one byte flipped.
    pub corrupt: bool,
    /// Serve LFS files with this many bytes more than their size (a runaway body).
    pub overlong: usize,
    /// The CDN answers 403, as an expired signed link does.
    pub cdn_forbidden: bool,
    /// Renamed repositories, (old id, new id): their API and resolve URLs answer 307 with a
    /// relative Location under the new id, as the Hub does.
    pub renamed: Vec<(String, String)>,
    /// "METHOD path [range=..] [auth=...]" per request.
    pub log: Vec<String>,
}

pub struct HubServer {
    pub url: String,
    pub state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    addr: std::net::SocketAddr,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A repository made of files read from disk: `(name in the repo, path, lfs)`.
pub fn repo_from_files(id: &str, commit: &str, files: &[(&str, &Path, bool)]) -> Repo {
    Repo {
        id: id.into(),
        commit: commit.into(),
        files: files
            .iter()
            .map(|(n, p, lfs)| RepoFile {
                name: n.to_string(),
                data: std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
                lfs: *lfs,
            })
            .collect(),
    }
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).to_string()
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Close after this many body bytes (a dropped connection).
    cut: Option<usize>,
}

fn answer(status: u16, headers: Vec<(&str, String)>, body: Vec<u8>) -> Answer {
    Answer {
        status,
        headers: headers
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        body,
        cut: None,
    }
}

fn error(status: u16, code: &str) -> Answer {
    answer(
        status,
        vec![
            ("X-Error-Code", code.to_string()),
            ("X-Error-Message", format!("{code} (stand-in Hub)")),
        ],
        format!("{{\"error\":\"{code}\"}}").into_bytes(),
    )
}

impl HubServer {
    pub fn start(repos: Vec<Repo>) -> HubServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let url = format!("http://{addr}");
        let state = Arc::new(Mutex::new(State {
            repos,
            ..Default::default()
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp, base) = (state.clone(), stop.clone(), url.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if sp.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (st, base) = (st.clone(), base.clone());
                std::thread::spawn(move || {
                    let _ = handle(conn, &st, &base);
                });
            }
        });
        HubServer {
            url,
            state,
            stop,
            addr,
            thread: Some(thread),
        }
    }

    pub fn log(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }

    pub fn clear_log(&self) {
        self.state.lock().unwrap().log.clear();
    }
}

impl Drop for HubServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn handle(conn: TcpStream, state: &Mutex<State>, base: &str) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(10)))?;
    conn.set_write_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or("").to_string(),
        parts.next().unwrap_or("").to_string(),
    );
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let get = |k: &str| headers.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let auth = get("authorization");
    let range = get("range");
    let ans = route(
        &method,
        &target,
        auth.as_deref(),
        range.as_deref(),
        state,
        base,
    );
    {
        let mut s = state.lock().unwrap();
        let mut entry = format!("{method} {}", target.split('?').next().unwrap_or(""));
        if let Some(r) = &range {
            entry.push_str(&format!(" range={r}"));
        }
        if let Some(a) = &auth {
            entry.push_str(&format!(" auth={a}"));
        }
        s.log.push(entry);
    }
    let mut out = conn;
    let reason = match ans.status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        _ => "Status",
    };
    let mut head = format!("HTTP/1.1 {} {reason}\r\nConnection: close\r\n", ans.status);
    let mut has_len = false;
    for (k, v) in &ans.headers {
        has_len |= k.eq_ignore_ascii_case("content-length");
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has_len {
        head.push_str(&format!("Content-Length: {}\r\n", ans.body.len()));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    if method != "HEAD" {
        match ans.cut {
            Some(n) => {
                out.write_all(&ans.body[..n.min(ans.body.len())])?;
                out.flush()?;
                let _ = out.shutdown(Shutdown::Both);
                return Ok(());
            }
            None => out.write_all(&ans.body)?,
        }
    }
    out.flush()?;
    // Drain anything left so the client sees a clean close.
    let _ = out.shutdown(Shutdown::Write);
    let mut sink = [0u8; 64];
    let _ = reader
        .get_mut()
        .set_read_timeout(Some(Duration::from_millis(200)));
    let _ = reader.read(&mut sink);
    Ok(())
}

fn route(
    method: &str,
    target: &str,
    auth: Option<&str>,
    range: Option<&str>,
    state: &Mutex<State>,
    base: &str,
) -> Answer {
    let mut s = state.lock().unwrap();
    let path = target.split('?').next().unwrap_or("");
    if let Some(sha) = path.strip_prefix("/cdn-lfs/") {
        if s.cdn_forbidden {
            return answer(403, vec![], b"Request has expired".to_vec());
        }
        let Some(f) = s
            .repos
            .iter()
            .flat_map(|r| &r.files)
            .find(|f| f.lfs && f.sha256() == sha)
        else {
            return error(404, "EntryNotFound");
        };
        let mut data = f.data.clone();
        if s.corrupt {
            let mid = data.len() / 2;
            data[mid] ^= 0x40;
        }
        data.resize(data.len() + s.overlong, b'x');
        let total = data.len();
        let start = range
            .and_then(|r| r.strip_prefix("bytes="))
            .and_then(|r| r.split('-').next())
            .and_then(|v| v.parse::<usize>().ok());
        let mut ans = match start {
            Some(st) if st >= total => {
                return answer(
                    416,
                    vec![("Content-Range", format!("bytes */{total}"))],
                    vec![],
                )
            }
            Some(st) => answer(
                206,
                vec![
                    ("Content-Range", format!("bytes {st}-{}/{total}", total - 1)),
                    ("Accept-Ranges", "bytes".into()),
                    ("ETag", format!("\"{sha}\"")),
                ],
                data[st..].to_vec(),
            ),
            None => answer(
                200,
                vec![
                    ("Accept-Ranges", "bytes".into()),
                    ("ETag", format!("\"{sha}\"")),
                ],
                data,
            ),
        };
        if method == "GET" {
            ans.cut = s.drop_after.take();
        }
        return ans;
    }
    if let Some(tok) = &s.token {
        if auth != Some(&format!("Bearer {tok}")) {
            return error(401, "RepositoryNotFound");
        }
    }
    for (old, new) in &s.renamed {
        for prefix in ["/api/models/", "/"] {
            if let Some(rest) = path.strip_prefix(&format!("{prefix}{old}/")) {
                return answer(
                    307,
                    vec![("Location", format!("{prefix}{new}/{rest}"))],
                    vec![],
                );
            }
        }
    }
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let Some((repo, rev)) = rest.split_once("/revision/") else {
            return error(404, "RepositoryNotFound");
        };
        let Some(r) = s.repos.iter().find(|r| r.id == repo) else {
            return error(404, "RepositoryNotFound");
        };
        let rev = decode(rev);
        if rev != "main" && rev != r.commit {
            return error(404, "RevisionNotFound");
        }
        let siblings: Vec<serde_json::Value> = r
            .files
            .iter()
            .map(|f| serde_json::json!({ "rfilename": f.name }))
            .collect();
        let body = serde_json::json!({
            "_id": "0123", "id": r.id, "modelId": r.id, "sha": r.commit,
            "private": s.token.is_some(), "tags": ["gguf"], "siblings": siblings,
        });
        return answer(
            200,
            vec![("Content-Type", "application/json".into())],
            body.to_string().into_bytes(),
        );
    }
    // /{owner}/{repo}/resolve/{rev}/{file...}
    let segs: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    if segs.len() == 5 && segs[2] == "resolve" {
        let repo = format!("{}/{}", segs[0], segs[1]);
        let Some(r) = s.repos.iter().find(|r| r.id == repo) else {
            return error(404, "RepositoryNotFound");
        };
        let rev = decode(segs[3]);
        if rev != "main" && rev != r.commit {
            return error(404, "RevisionNotFound");
        }
        let file = decode(segs[4]);
        let Some(f) = r.files.iter().find(|f| f.name == file) else {
            return error(404, "EntryNotFound");
        };
        let commit = r.commit.clone();
        if f.lfs {
            let sha = f.sha256();
            return answer(
                302,
                vec![
                    (
                        "Location",
                        format!("{base}/cdn-lfs/{sha}?response-content-disposition=attachment&X-Amz-Signature=abc"),
                    ),
                    ("X-Repo-Commit", commit),
                    ("X-Linked-Etag", format!("\"{sha}\"")),
                    ("X-Linked-Size", f.data.len().to_string()),
                    // The ETag of the LFS pointer file, which a client must not use.
                    ("ETag", "\"0000000000000000000000000000000000000000\"".into()),
                    ("Content-Length", "0".into()),
                ],
                vec![],
            );
        }
        return answer(
            200,
            vec![
                ("X-Repo-Commit", commit),
                ("ETag", format!("\"{}\"", f.git_sha1())),
                ("Content-Type", "text/plain".into()),
            ],
            f.data.clone(),
        );
    }
    error(404, "RepositoryNotFound")
}
