//! The Hub client against a local stand-in for the Hub (tests/support): full download, cache
//! layout, cache reuse, resume, checksum mismatch, 404, 401 and tokens, offline mode, no
//! network, disk full, and listing / removing cached models. Nothing here leaves 127.0.0.1.

mod support;

use bitnet_hub::cache::{self, RepoCache};
use bitnet_hub::{ErrorKind, Hub, HubConfig, ModelRef};
use std::path::{Path, PathBuf};
use support::{repo_from_files, HubServer};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const HF_COMMIT: &str = "89abcdef0123456789abcdef0123456789abcdef";

fn data(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data/tiny")
        .join(rel)
}

/// `test/tiny-gguf` (three GGUF files and a README) and `test/tiny-hf` (a safetensors model
/// directory).
fn server() -> HubServer {
    let readme = || support::RepoFile {
        name: "README.md".into(),
        data: b"# tiny\n".to_vec(),
        lfs: false,
    };
    let mut gguf = repo_from_files(
        "test/tiny-gguf",
        COMMIT,
        &[
            ("tiny-tq1_0.gguf", &data("gguf/tiny-tq1_0.gguf"), true),
            ("tiny-tq2_0.gguf", &data("gguf/tiny-tq2_0.gguf"), true),
            ("tiny-i2_s.gguf", &data("gguf/tiny-i2_s.gguf"), true),
        ],
    );
    gguf.files.insert(0, readme());
    let mut hf = repo_from_files(
        "test/tiny-hf",
        HF_COMMIT,
        &[
            ("config.json", &data("checkpoint_packed/config.json"), false),
            (
                "model.safetensors",
                &data("checkpoint_packed/model.safetensors"),
                true,
            ),
        ],
    );
    hf.files.insert(0, readme());
    HubServer::start(vec![gguf, hf])
}

fn hub(endpoint: &str, cache: &Path) -> Hub {
    Hub::new(HubConfig {
        endpoint: endpoint.to_string(),
        cache_dir: cache.to_path_buf(),
        token: None,
        offline: false,
        progress: false,
    })
}

fn r(s: &str) -> ModelRef {
    ModelRef::parse(s).unwrap()
}

fn same_bytes(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

fn sha256_of(p: &Path) -> String {
    use sha2::Digest;
    support::hex(&sha2::Sha256::digest(std::fs::read(p).unwrap()))
}

#[test]
fn downloads_a_gguf_repository_into_the_standard_cache_layout() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let h = hub(&srv.url, tmp.path());
    let p = h.resolve(&r("test/tiny-gguf")).unwrap();
    // The default file is the I2_S one.
    let repo_dir = tmp.path().join("models--test--tiny-gguf");
    assert_eq!(
        p,
        repo_dir
            .join("snapshots")
            .join(COMMIT)
            .join("tiny-i2_s.gguf")
    );
    assert!(same_bytes(&p, &data("gguf/tiny-i2_s.gguf")));
    // huggingface_hub's layout: a relative symlink to blobs/<sha256>, refs/main = commit.
    let sha = sha256_of(&data("gguf/tiny-i2_s.gguf"));
    assert_eq!(
        std::fs::read_link(&p).unwrap(),
        Path::new("../../blobs").join(&sha)
    );
    assert!(repo_dir.join("blobs").join(&sha).is_file());
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        COMMIT
    );
    let log = srv.log();
    assert!(
        log[0].starts_with("GET /api/models/test/tiny-gguf/revision/main"),
        "{log:?}"
    );
    assert!(
        log.iter().any(|l| l.starts_with(&format!(
            "HEAD /test/tiny-gguf/resolve/{COMMIT}/tiny-i2_s.gguf"
        ))),
        "{log:?}"
    );
    assert!(
        log.iter()
            .any(|l| l.starts_with(&format!("GET /cdn-lfs/{sha}"))),
        "{log:?}"
    );
    assert!(
        !log.iter()
            .any(|l| l.contains("tq2_0") || l.contains("README")),
        "{log:?}"
    );

    // Cache reuse: the second time only the model-info call is made.
    srv.clear_log();
    assert_eq!(h.resolve(&r("test/tiny-gguf")).unwrap(), p);
    assert_eq!(srv.log().len(), 1, "{:?}", srv.log());

    // `:quant` (any case) and `:file` pick other files; the I2_S blob is not fetched again.
    let tq2 = h.resolve(&r("test/tiny-gguf:TQ2_0")).unwrap();
    assert!(same_bytes(&tq2, &data("gguf/tiny-tq2_0.gguf")));
    let tq1 = h
        .resolve(&r(&format!("test/tiny-gguf:tiny-tq1_0.gguf@{COMMIT}")))
        .unwrap();
    assert!(same_bytes(&tq1, &data("gguf/tiny-tq1_0.gguf")));
    let e = h.resolve(&r("test/tiny-gguf:q4_0")).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidReference);
    assert!(e.message.contains("tiny-i2_s.gguf"), "{e}");
}

#[test]
fn downloads_a_safetensors_repository_as_a_model_directory() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let h = hub(&srv.url, tmp.path());
    let dir = h.resolve(&r("test/tiny-hf")).unwrap();
    assert_eq!(
        dir,
        tmp.path()
            .join("models--test--tiny-hf/snapshots")
            .join(HF_COMMIT)
    );
    assert!(same_bytes(
        &dir.join("config.json"),
        &data("checkpoint_packed/config.json")
    ));
    assert!(same_bytes(
        &dir.join("model.safetensors"),
        &data("checkpoint_packed/model.safetensors")
    ));
    assert!(!dir.join("README.md").exists());
    // Small files are stored under their git blob SHA-1 (the ETag), after checking it.
    let cfg = support::RepoFile {
        name: "config.json".into(),
        data: std::fs::read(data("checkpoint_packed/config.json")).unwrap(),
        lfs: false,
    };
    assert!(tmp
        .path()
        .join("models--test--tiny-hf/blobs")
        .join(cfg.git_sha1())
        .is_file());
}

#[test]
fn an_interrupted_download_resumes_with_a_range_request() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let h = hub(&srv.url, tmp.path());
    srv.state.lock().unwrap().drop_after = Some(300_000);
    let e = h.resolve(&r("test/tiny-gguf:i2_s")).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Network, "{e}");
    assert!(
        e.message.contains("interrupted") && e.message.contains("resume"),
        "{e}"
    );
    let sha = sha256_of(&data("gguf/tiny-i2_s.gguf"));
    let rc = RepoCache::new(tmp.path(), "test/tiny-gguf");
    let partial = rc.incomplete_path(&sha).metadata().unwrap().len();
    assert!(partial > 0 && partial <= 300_000, "{partial}");
    assert!(!rc.blob_path(&sha).exists());
    assert!(!rc.snapshot_file(COMMIT, "tiny-i2_s.gguf").exists());

    srv.clear_log();
    let p = h.resolve(&r("test/tiny-gguf:i2_s")).unwrap();
    assert!(same_bytes(&p, &data("gguf/tiny-i2_s.gguf")));
    let log = srv.log();
    assert!(
        log.iter()
            .any(|l| l.starts_with(&format!("GET /cdn-lfs/{sha} range=bytes={partial}-"))),
        "{log:?}"
    );
    assert!(!rc.incomplete_path(&sha).exists());
}

/// Several downloads of one file at once (threads here; processes, or Python's
/// `huggingface_hub`, take the same lock file): one downloads, the others wait for it and then
/// find the blob complete. Without the lock they appended to one partial file.
#[test]
fn concurrent_downloads_of_one_file_take_turns() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let endpoint = srv.url.clone();
    let paths: Vec<PathBuf> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|_| s.spawn(|| hub(&endpoint, tmp.path()).resolve(&r("test/tiny-gguf:i2_s"))))
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap().unwrap())
            .collect()
    });
    for p in &paths {
        assert!(same_bytes(p, &data("gguf/tiny-i2_s.gguf")));
    }
    let sha = sha256_of(&data("gguf/tiny-i2_s.gguf"));
    let gets = srv
        .log()
        .iter()
        .filter(|l| l.starts_with(&format!("GET /cdn-lfs/{sha}")))
        .count();
    assert_eq!(gets, 1, "{:?}", srv.log());
    let rc = RepoCache::new(tmp.path(), "test/tiny-gguf");
    assert!(!rc.incomplete_path(&sha).exists());
    assert!(rc.lock_path(&sha).starts_with(tmp.path().join(".locks")));
}

/// A renamed repository: the Hub redirects its old name's API and file URLs to the new name
/// (relative 307s); the model is found under the name the user gave.
#[test]
fn a_renamed_repository_is_followed() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let h = hub(&srv.url, tmp.path());
    srv.state
        .lock()
        .unwrap()
        .renamed
        .push(("old/tiny-name".into(), "test/tiny-gguf".into()));
    let p = h.resolve(&r("old/tiny-name:i2_s")).unwrap();
    assert!(same_bytes(&p, &data("gguf/tiny-i2_s.gguf")));
    assert!(p.starts_with(tmp.path().join("models--old--tiny-name")));
    let log = srv.log();
    assert!(
        log.iter()
            .any(|l| l.starts_with("GET /api/models/old/tiny-name/")),
        "{log:?}"
    );
    assert!(
        log.iter()
            .any(|l| l.starts_with("GET /api/models/test/tiny-gguf/")),
        "{log:?}"
    );
}

/// A body longer than the announced size is cut off and discarded, not written until the disk
/// is full.
#[test]
fn a_body_longer_than_announced_is_refused() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let h = hub(&srv.url, tmp.path());
    srv.state.lock().unwrap().overlong = 3 << 20;
    let e = h.resolve(&r("test/tiny-gguf:i2_s")).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Protocol, "{e}");
    assert!(e.message.contains("more than"), "{e}");
    let sha = sha256_of(&data("gguf/tiny-i2_s.gguf"));
    let rc = RepoCache::new(tmp.path(), "test/tiny-gguf");
    let left = rc
        .incomplete_path(&sha)
        .metadata()
        .map(|m| m.len())
        .unwrap_or(0);
    assert_eq!(left, 0);
    srv.state.lock().unwrap().overlong = 0;
    let p = h.resolve(&r("test/tiny-gguf:i2_s")).unwrap();
    assert!(same_bytes(&p, &data("gguf/tiny-i2_s.gguf")));
}

/// A 403 from the file server the Hub redirects to (an expired signed link) is not a token
/// problem: the error says to run again and does not send the user to HF_TOKEN.
#[test]
fn a_refusal_by_the_file_server_is_not_reported_as_a_token_problem() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let h = hub(&srv.url, tmp.path());
    srv.state.lock().unwrap().cdn_forbidden = true;
    let e = h.resolve(&r("test/tiny-gguf:i2_s")).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Network, "{e}");
    assert!(
        e.message.contains("file server")
            && e.message.contains("run the command again")
            && !e.message.contains("HF_TOKEN"),
        "{e}"
    );
    srv.state.lock().unwrap().cdn_forbidden = false;
    let p = h.resolve(&r("test/tiny-gguf:i2_s")).unwrap();
    assert!(same_bytes(&p, &data("gguf/tiny-i2_s.gguf")));
}

#[test]
fn a_checksum_mismatch_keeps_the_partial_file_and_never_uses_it() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let h = hub(&srv.url, tmp.path());
    srv.state.lock().unwrap().corrupt = true;
    let e = h.resolve(&r("test/tiny-gguf")).unwrap_err();
    assert_eq!(e.kind, ErrorKind::ChecksumMismatch, "{e}");
    let sha = sha256_of(&data("gguf/tiny-i2_s.gguf"));
    assert!(
        e.message.contains("checksum mismatch") && e.message.contains(&sha),
        "{e}"
    );
    assert!(!e.message.contains('\n'));
    let rc = RepoCache::new(tmp.path(), "test/tiny-gguf");
    assert!(rc.incomplete_path(&sha).is_file());
    assert!(!rc.blob_path(&sha).exists());
    assert!(!rc.snapshot_file(COMMIT, "tiny-i2_s.gguf").exists());
    // Not usable from the cache either.
    assert_eq!(
        h.resolve_cached(&r("test/tiny-gguf")).unwrap_err().kind,
        ErrorKind::NotCached
    );
    // Fixed server: the bad file is checked, discarded and downloaded again.
    srv.state.lock().unwrap().corrupt = false;
    let p = h.resolve(&r("test/tiny-gguf")).unwrap();
    assert!(same_bytes(&p, &data("gguf/tiny-i2_s.gguf")));
    assert!(!rc.incomplete_path(&sha).exists());
}

#[test]
fn missing_repositories_revisions_and_files_are_404() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let h = hub(&srv.url, tmp.path());
    let e = h.resolve(&r("test/nope")).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(
        e.message.contains("test/nope") && e.message.contains("404"),
        "{e}"
    );
    let e = h.resolve(&r("test/tiny-gguf@v9")).unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotFound);
    assert!(
        e.message.contains("revision") && e.message.contains("v9"),
        "{e}"
    );
    let e = h.resolve(&r("test/tiny-gguf:nothing.gguf")).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidReference);
    assert!(e.message.contains("nothing.gguf"), "{e}");
}

#[test]
fn private_repositories_need_hf_token_sent_as_a_bearer_token() {
    let srv = server();
    srv.state.lock().unwrap().token = Some("hf_secret".into());
    let tmp = tempfile::tempdir().unwrap();
    let e = hub(&srv.url, tmp.path())
        .resolve(&r("test/tiny-gguf"))
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unauthorized);
    assert!(
        e.message.contains("HF_TOKEN") && e.message.contains("401"),
        "{e}"
    );

    let mut cfg = HubConfig {
        endpoint: srv.url.clone(),
        cache_dir: tmp.path().to_path_buf(),
        token: Some("hf_wrong".into()),
        offline: false,
        progress: false,
    };
    let e = Hub::new(cfg.clone())
        .resolve(&r("test/tiny-gguf"))
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unauthorized);
    assert!(e.message.contains("refused the token"), "{e}");

    cfg.token = Some("hf_secret".into());
    srv.clear_log();
    let p = Hub::new(cfg).resolve(&r("test/tiny-gguf")).unwrap();
    assert!(same_bytes(&p, &data("gguf/tiny-i2_s.gguf")));
    for l in srv.log() {
        if l.starts_with("GET /api") || l.starts_with("HEAD") {
            assert!(l.ends_with("auth=Bearer hf_secret"), "{l}");
        }
    }
}

#[test]
fn offline_mode_uses_only_the_cache() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = HubConfig {
        endpoint: srv.url.clone(),
        cache_dir: tmp.path().to_path_buf(),
        token: None,
        offline: true,
        progress: false,
    };
    let e = Hub::new(cfg.clone())
        .resolve(&r("test/tiny-gguf"))
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotCached);
    assert!(
        e.message.contains("HF_HUB_OFFLINE") && e.message.contains("bitnet pull"),
        "{e}"
    );
    assert!(srv.log().is_empty());

    cfg.offline = false;
    let online = Hub::new(cfg.clone()).resolve(&r("test/tiny-gguf")).unwrap();
    let hf = Hub::new(cfg.clone()).resolve(&r("test/tiny-hf")).unwrap();
    srv.clear_log();
    cfg.offline = true;
    let off = Hub::new(cfg.clone());
    assert_eq!(off.resolve(&r("test/tiny-gguf")).unwrap(), online);
    assert_eq!(
        off.resolve(&r(&format!("test/tiny-gguf@{COMMIT}")))
            .unwrap(),
        online
    );
    assert_eq!(off.resolve(&r("test/tiny-hf")).unwrap(), hf);
    // Only what was downloaded is there.
    assert_eq!(
        off.resolve(&r("test/tiny-gguf:tq2_0")).unwrap_err().kind,
        ErrorKind::NotCached
    );
    assert!(srv.log().is_empty(), "{:?}", srv.log());
}

#[test]
fn a_sharded_model_cached_without_all_its_shards_is_not_used() {
    let file = |name: &str, data: &[u8], lfs: bool| support::RepoFile {
        name: name.into(),
        data: data.to_vec(),
        lfs,
    };
    let index = br#"{"metadata":{},"weight_map":{"a.weight":"model-00001-of-00002.safetensors","b.weight":"model-00002-of-00002.safetensors"}}"#;
    let sharded = support::Repo {
        id: "test/sharded-hf".into(),
        commit: HF_COMMIT.into(),
        files: vec![
            file("config.json", b"{}", false),
            file("model.safetensors.index.json", index, false),
            file("model-00001-of-00002.safetensors", b"shard one", true),
            file("model-00002-of-00002.safetensors", b"shard two", true),
        ],
    };
    let srv = HubServer::start(vec![sharded]);
    let tmp = tempfile::tempdir().unwrap();
    let mut cfg = HubConfig {
        endpoint: srv.url.clone(),
        cache_dir: tmp.path().to_path_buf(),
        token: None,
        offline: false,
        progress: false,
    };
    let dir = Hub::new(cfg.clone())
        .resolve(&r("test/sharded-hf"))
        .unwrap();
    // A pull cut off before the second shard.
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    cfg.offline = true;
    let e = Hub::new(cfg.clone())
        .resolve(&r("test/sharded-hf"))
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::NotCached, "{e}");
    assert!(
        e.message.contains("model-00002-of-00002.safetensors")
            && !e.message.contains("model-00001"),
        "{e}"
    );
    // Online, the missing shard is fetched and the snapshot is whole again.
    cfg.offline = false;
    assert_eq!(
        Hub::new(cfg.clone())
            .resolve(&r("test/sharded-hf"))
            .unwrap(),
        dir
    );
    assert_eq!(
        std::fs::read(dir.join("model-00002-of-00002.safetensors")).unwrap(),
        b"shard two"
    );
    cfg.offline = true;
    assert_eq!(Hub::new(cfg).resolve(&r("test/sharded-hf")).unwrap(), dir);
}

#[test]
fn without_network_the_cache_is_reused_and_otherwise_the_error_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let path = {
        let srv = server();
        hub(&srv.url, tmp.path())
            .resolve(&r("test/tiny-gguf"))
            .unwrap()
    };
    // A port nobody listens on.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let h = hub(&dead, tmp.path());
    assert_eq!(h.resolve(&r("test/tiny-gguf")).unwrap(), path);
    let e = h.resolve(&r("test/tiny-hf")).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Network);
    assert!(
        e.message.contains("cannot reach the Hugging Face Hub")
            && e.message.contains("HF_HUB_OFFLINE"),
        "{e}"
    );
}

#[cfg(target_os = "linux")]
#[test]
fn a_full_disk_is_reported_as_such() {
    if !Path::new("/dev/full").exists() {
        eprintln!("skipped: no /dev/full");
        return;
    }
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let rc = RepoCache::new(tmp.path(), "test/tiny-gguf");
    let sha = sha256_of(&data("gguf/tiny-i2_s.gguf"));
    std::fs::create_dir_all(rc.dir.join("blobs")).unwrap();
    // Every write to the partial file fails with ENOSPC.
    std::os::unix::fs::symlink("/dev/full", rc.incomplete_path(&sha)).unwrap();
    let e = hub(&srv.url, tmp.path())
        .resolve(&r("test/tiny-gguf"))
        .unwrap_err();
    assert_eq!(e.kind, ErrorKind::DiskFull, "{e}");
    assert!(
        e.message.contains("disk full") && e.message.contains("resume"),
        "{e}"
    );
}

#[test]
fn cached_models_are_listed_and_removed() {
    let srv = server();
    let tmp = tempfile::tempdir().unwrap();
    let h = hub(&srv.url, tmp.path());
    h.resolve(&r("test/tiny-gguf")).unwrap();
    h.resolve(&r("test/tiny-gguf:tq1_0")).unwrap();
    h.resolve(&r("test/tiny-hf")).unwrap();
    let list = cache::scan(tmp.path()).unwrap();
    let names: Vec<&str> = list.iter().map(|m| m.repo.as_str()).collect();
    assert_eq!(names, ["test/tiny-gguf", "test/tiny-hf"]);
    let g = &list[0];
    let want = std::fs::metadata(data("gguf/tiny-i2_s.gguf"))
        .unwrap()
        .len()
        + std::fs::metadata(data("gguf/tiny-tq1_0.gguf"))
            .unwrap()
            .len();
    assert_eq!(g.size, want);
    assert_eq!(g.refs, vec![("main".to_string(), COMMIT.to_string())]);
    assert_eq!(
        g.snapshots,
        vec![(
            COMMIT.to_string(),
            vec!["tiny-i2_s.gguf".to_string(), "tiny-tq1_0.gguf".to_string()]
        )]
    );

    let e = cache::remove(tmp.path(), &r("test/tiny-gguf:i2_s")).unwrap_err();
    assert_eq!(e.kind, ErrorKind::InvalidReference);
    let removed = cache::remove(tmp.path(), &r("test/tiny-gguf@main")).unwrap();
    assert!(removed.whole_repo && removed.bytes == want, "{removed:?}");
    let removed = cache::remove(tmp.path(), &r("test/tiny-hf")).unwrap();
    assert!(removed.whole_repo);
    assert!(cache::scan(tmp.path()).unwrap().is_empty());
    assert_eq!(
        cache::remove(tmp.path(), &r("test/tiny-hf"))
            .unwrap_err()
            .kind,
        ErrorKind::NotCached
    );
}
