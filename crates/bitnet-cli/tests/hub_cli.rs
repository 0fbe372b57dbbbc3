//! `bitnet pull`, `list`, `rm` and Hub references in `-m`, against the local stand-in for the
//! Hub of `crates/bitnet-hub/tests/support` (127.0.0.1 only), with `HF_HOME` in a temporary
//! directory.

#[path = "../../bitnet-hub/tests/support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use support::{repo_from_files, HubServer};

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn data(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data/tiny")
        .join(rel)
}

fn bitnet(home: &Path, endpoint: &str, offline: bool, args: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_bitnet"));
    c.args(args)
        .env("HF_HOME", home)
        .env("HF_ENDPOINT", endpoint)
        .env_remove("HF_HUB_CACHE")
        .env_remove("HUGGINGFACE_HUB_CACHE")
        .env_remove("HF_TOKEN")
        .env_remove("HUGGING_FACE_HUB_TOKEN");
    if offline {
        c.env("HF_HUB_OFFLINE", "1");
    } else {
        c.env_remove("HF_HUB_OFFLINE");
    }
    c.output().unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn server() -> HubServer {
    HubServer::start(vec![
        repo_from_files(
            "test/tiny-gguf",
            COMMIT,
            &[
                ("tiny-tq2_0.gguf", &data("gguf/tiny-tq2_0.gguf"), true),
                ("tiny-i2_s.gguf", &data("gguf/tiny-i2_s.gguf"), true),
            ],
        ),
        repo_from_files(
            "test/tiny-hf",
            COMMIT,
            &[
                ("config.json", &data("checkpoint_packed/config.json"), false),
                (
                    "model.safetensors",
                    &data("checkpoint_packed/model.safetensors"),
                    true,
                ),
            ],
        ),
    ])
}

#[test]
fn pull_list_run_and_rm() {
    let srv = server();
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    // pull prints the local path (in HF_HOME/hub, the huggingface_hub layout).
    let path = ok(&bitnet(h, &srv.url, false, &["pull", "test/tiny-gguf"]));
    let path = PathBuf::from(path.trim());
    assert_eq!(
        path,
        h.join("hub/models--test--tiny-gguf/snapshots")
            .join(COMMIT)
            .join("tiny-i2_s.gguf")
    );
    assert_eq!(
        std::fs::read(&path).unwrap(),
        std::fs::read(data("gguf/tiny-i2_s.gguf")).unwrap()
    );
    let dir = ok(&bitnet(h, &srv.url, false, &["pull", "test/tiny-hf"]));
    assert!(Path::new(dir.trim()).join("config.json").is_file());

    // A reference works wherever -m does, offline from the cache.
    let via_ref = ok(&bitnet(
        h,
        &srv.url,
        true,
        &[
            "run",
            "-m",
            "test/tiny-gguf",
            "-p",
            "Hello",
            "-n",
            "6",
            "--temp",
            "0",
        ],
    ));
    let via_path = ok(&bitnet(
        h,
        &srv.url,
        true,
        &[
            "run",
            "-m",
            path.to_str().unwrap(),
            "-p",
            "Hello",
            "-n",
            "6",
            "--temp",
            "0",
        ],
    ));
    assert_eq!(via_ref, via_path);
    let logits = ok(&bitnet(
        h,
        &srv.url,
        true,
        &["logits", "-m", "test/tiny-hf", "--tokens", "1,2"],
    ));
    assert!(
        logits.contains("\"n_vocab\": 1024") || logits.contains("\"n_vocab\":1024"),
        "{logits}"
    );
    let info = ok(&bitnet(
        h,
        &srv.url,
        true,
        &["info", "-m", "test/tiny-gguf"],
    ));
    assert!(info.contains("bitnet-25"), "{info}");
    // :quant selects another file (downloaded on demand).
    let tq2 = ok(&bitnet(
        h,
        &srv.url,
        false,
        &["tokenize", "-m", "test/tiny-gguf:TQ2_0", "--no-bos"],
    ));
    assert_eq!(tq2.trim(), "[]");
    // convert takes references too.
    let out = h.join("c.gguf");
    ok(&bitnet(
        h,
        &srv.url,
        true,
        &[
            "convert",
            "test/tiny-hf",
            "-o",
            out.to_str().unwrap(),
            "--type",
            "tq2_0",
        ],
    ));
    assert!(out.is_file());

    let list = ok(&bitnet(h, &srv.url, true, &["list"]));
    assert!(
        list.contains("test/tiny-gguf")
            && list.contains("tiny-i2_s.gguf")
            && list.contains("tiny-tq2_0.gguf"),
        "{list}"
    );
    assert!(
        list.contains("test/tiny-hf") && list.contains("main=0123456"),
        "{list}"
    );
    assert!(list.contains("MiB"), "{list}");

    let rm = ok(&bitnet(h, &srv.url, true, &["rm", "test/tiny-gguf"]));
    assert!(rm.contains("removed test/tiny-gguf"), "{rm}");
    let list = ok(&bitnet(h, &srv.url, true, &["list"]));
    assert!(
        !list.contains("test/tiny-gguf") && list.contains("test/tiny-hf"),
        "{list}"
    );
    // Gone from the cache: offline it is an error that says what to do.
    let o = bitnet(
        h,
        &srv.url,
        true,
        &["run", "-m", "test/tiny-gguf", "-p", "x"],
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("bitnet pull test/tiny-gguf") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
}

#[test]
fn reference_errors_are_one_clear_line() {
    let srv = server();
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let one_line = |o: &Output| -> String {
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        let lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("warning:")).collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(
            lines[0].starts_with("error: ") && !err.contains("panicked"),
            "{err}"
        );
        lines[0].to_string()
    };
    let e = one_line(&bitnet(h, &srv.url, false, &["pull", "test/nope"]));
    assert!(e.contains("test/nope") && e.contains("404"), "{e}");
    let e = one_line(&bitnet(
        h,
        &srv.url,
        false,
        &["run", "-m", "test/nope", "-p", "x"],
    ));
    assert!(e.contains("no local file or directory"), "{e}");
    let e = one_line(&bitnet(
        h,
        &srv.url,
        false,
        &["pull", "test/tiny-gguf:q4_k"],
    ));
    assert!(e.contains("q4_k"), "{e}");
    let e = one_line(&bitnet(h, &srv.url, false, &["pull", "not a ref"]));
    assert!(e.contains("OWNER/REPO"), "{e}");
    let e = one_line(&bitnet(
        h,
        "http://127.0.0.1:9",
        false,
        &["pull", "test/tiny-gguf"],
    ));
    assert!(e.contains("cannot reach"), "{e}");
    srv.state.lock().unwrap().token = Some("hf_x".into());
    let e = one_line(&bitnet(h, &srv.url, false, &["pull", "test/tiny-gguf"]));
    assert!(e.contains("HF_TOKEN"), "{e}");
    let e = one_line(&bitnet(h, &srv.url, false, &["rm", "test/tiny-gguf"]));
    assert!(e.contains("not in the cache"), "{e}");
}
