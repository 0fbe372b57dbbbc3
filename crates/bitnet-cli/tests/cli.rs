//! The `bitnet` binary end to end: the stable `logits` interface, `tokenize`, `run`, `info`,
//! and the one-line errors users see.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

fn data(rel: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data/tiny")
        .join(rel)
        .display()
        .to_string()
}

fn bitnet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(args)
        .output()
        .unwrap()
}

fn bitnet_stdin(args: &[&str], input: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A command that fails before reading stdin (a bad model path) closes the pipe first:
    // that race is not the test's subject, its exit status and stderr are.
    if let Err(e) = child.stdin.take().unwrap().write_all(input) {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

/// A failure: non-zero exit, one line on stderr starting with "error:", no panic.
fn one_line_error(o: &Output) -> String {
    assert!(!o.status.success(), "unexpected success");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("warning:")).collect();
    assert_eq!(lines.len(), 1, "not one line: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    lines[0].to_string()
}

fn golden_logits_all(rel: &str, key: &str) -> Vec<f32> {
    let bytes = std::fs::read(data(rel)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor(key)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn logits_json_shape_and_values() {
    let toks = "1,17,1023,300,5,512,42"; // the golden len7 prompt
    let want = golden_logits_all("gguf/golden_gguf-i2_s.safetensors", "len7.logits_all");
    let model = data("gguf/tiny-i2_s.gguf");
    for all in [false, true] {
        let mut args = vec!["logits", "-m", &model, "--tokens", toks];
        if all {
            args.push("--all");
        }
        let out = stdout(&bitnet(&args));
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["n_vocab"], 1024);
        let rows = v["logits"].as_array().unwrap();
        assert_eq!(rows.len(), if all { 7 } else { 1 });
        let first = if all { 0 } else { 6 };
        for (r, row) in rows.iter().enumerate() {
            let row: Vec<f32> = row
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            assert_eq!(row.len(), 1024);
            let golden = &want[(first + r) * 1024..(first + r + 1) * 1024];
            // Multi-token bar of the golden README: max |d| <= 0.6 per position.
            let max = row
                .iter()
                .zip(golden)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(max <= 0.6, "row {r}: max |d| {max}");
        }
    }
}

/// `--tq1-native` (a global option: before or after the subcommand) runs the TQ1_0 kernels on
/// the file's blocks; the integer sums are exact either way, so the logits equal the repacked
/// run's to the last printed digit, for one token (GEMV) and a 7-token prompt (GEMM).
#[test]
fn tq1_native_logits_equal_the_repacked_ones() {
    let model = data("gguf/tiny-tq1_0.gguf");
    let toks = "1,17,1023,300,5,512,42";
    let base = stdout(&bitnet(&[
        "logits", "-m", &model, "--tokens", toks, "--all",
    ]));
    let native = stdout(&bitnet(&[
        "--tq1-native",
        "logits",
        "-m",
        &model,
        "--tokens",
        toks,
        "--all",
    ]));
    assert!(base.contains("[[") && base.len() > 1000);
    assert_eq!(native, base);
    let one = |extra: &[&str]| {
        let mut args = vec!["logits", "-m", &model, "--tokens", "42"];
        args.extend_from_slice(extra);
        stdout(&bitnet(&args))
    };
    assert_eq!(one(&["--tq1-native"]), one(&[]));
    // The option did take effect: `bench` names the layout it ran.
    let bench = |extra: &[&str]| {
        let mut args = vec![
            "bench", "-m", &model, "-p", "8", "-n", "2", "-r", "1", "-t", "1",
        ];
        args.extend_from_slice(extra);
        stdout(&bitnet(&args))
    };
    assert!(bench(&["--tq1-native"]).contains("TQ1_0 native,"));
    assert!(bench(&[]).contains("TQ1_0,"));
}

#[test]
fn logits_numbers_round_trip_exactly() {
    // The printed decimal must parse back to the very f32 the engine computed.
    let model =
        bitnet_engine::Model::load(std::path::Path::new(&data("gguf/tiny-tq2_0.gguf"))).unwrap();
    let lib = model
        .forward(&mut model.new_session(3), &[1, 17, 42], false)
        .unwrap()
        .to_vec();
    let out = stdout(&bitnet(&[
        "logits",
        "-m",
        &data("gguf/tiny-tq2_0.gguf"),
        "--tokens",
        "1,17,42",
    ]));
    let inner = out.split("[[").nth(1).unwrap().split("]]").next().unwrap();
    let printed: Vec<f32> = inner
        .split(", ")
        .map(|s| s.parse::<f32>().unwrap())
        .collect();
    assert_eq!(printed, lib);
}

#[test]
fn logits_bad_input() {
    let m = data("gguf/tiny-i2_s.gguf");
    assert!(one_line_error(&bitnet(&["logits", "-m", &m, "--tokens", "1,x"])).contains("\"x\""));
    let e = one_line_error(&bitnet(&["logits", "-m", &m, "--tokens", "1,1024"]));
    assert!(e.contains("1024") && e.contains("tiny-i2_s.gguf"), "{e}");
    assert!(one_line_error(&bitnet(&[
        "logits",
        "-m",
        "/no/such/model.gguf",
        "--tokens",
        "1"
    ]))
    .contains("/no/such/model.gguf"));
}

#[test]
fn tokenize_reads_stdin_exactly() {
    let text = "Hello world, this is a BitNet b1.58 test: 1234567 tokens.\n  x";
    let want = [
        39, 68, 270, 78, 307, 265, 911, 11, 723, 370, 266, 448, 277, 45, 343, 286, 16, 13, 20, 23,
        1004, 25, 220, 643, 18, 19, 20, 21, 22, 721, 304, 220, 220, 87,
    ];
    let ids = |o: Output| -> Vec<u32> { serde_json::from_str(&stdout(&o)).unwrap() };
    // bitnet.cpp's file asks for BOS (1022); llama.cpp's TQ files do not.
    let got = ids(bitnet_stdin(
        &["tokenize", "-m", &data("gguf/tiny-i2_s.gguf")],
        text.as_bytes(),
    ));
    assert_eq!(got[0], 1022);
    assert_eq!(&got[1..], &want);
    assert_eq!(
        ids(bitnet_stdin(
            &["tokenize", "-m", &data("gguf/tiny-i2_s.gguf"), "--no-bos"],
            text.as_bytes()
        )),
        want
    );
    assert_eq!(
        ids(bitnet_stdin(
            &["tokenize", "-m", &data("gguf/tiny-tq2_0.gguf")],
            text.as_bytes()
        )),
        want
    );
    // A trailing newline is kept, special-token text becomes its token, BOS is never doubled.
    let nl = ids(bitnet_stdin(
        &["tokenize", "-m", &data("gguf/tiny-tq1_0.gguf")],
        b"x\n",
    ));
    assert_eq!(nl.len(), 2);
    assert_eq!(
        ids(bitnet_stdin(
            &["tokenize", "-m", &data("gguf/tiny-tq1_0.gguf")],
            b"a<|end_of_text|>"
        )),
        vec![64, 1023]
    );
    assert_eq!(
        ids(bitnet_stdin(
            &["tokenize", "-m", &data("gguf/tiny-i2_s.gguf")],
            b"<|begin_of_text|>a"
        )),
        vec![1022, 64]
    );
}

#[test]
fn tokenize_errors() {
    one_line_error(&bitnet_stdin(
        &["tokenize", "-m", &data("gguf/tiny-i2_s.gguf")],
        &[0xff, 0xfe],
    ));
    one_line_error(&bitnet_stdin(
        &["tokenize", "-m", &data("checkpoint_packed")],
        b"x",
    ));
}

#[test]
fn run_is_deterministic_and_greedy_matches_the_library() {
    let m = data("gguf/tiny-i2_s.gguf");
    let a = stdout(&bitnet(&[
        "run", "-m", &m, "-p", "Hello", "-n", "12", "-s", "7",
    ]));
    let b = stdout(&bitnet(&[
        "run", "-m", &m, "-p", "Hello", "-n", "12", "-s", "7",
    ]));
    assert_eq!(a, b);
    let greedy = stdout(&bitnet(&[
        "run", "-m", &m, "-p", "Hello", "-n", "12", "--temp", "0",
    ]));
    // The library's own greedy continuation of the same prompt.
    let path = std::path::Path::new(&m);
    assert_eq!(greedy, library_greedy(path, Default::default()));
    // `--no-mmap` (global, before or after the subcommand) only changes where the weights live.
    let base = ["run", "-m", &m, "-p", "Hello", "-n", "12", "--temp", "0"];
    for args in [
        [&["--no-mmap"][..], &base].concat(),
        [&base[..], &["--no-mmap"]].concat(),
    ] {
        assert_eq!(stdout(&bitnet(&args)), greedy, "{args:?}");
    }
    // `--kv-type f16` runs with an f16 cache: the library's greedy text with one.
    let f16 = bitnet_engine::model::LoadOptions {
        kv_type: bitnet_engine::model::KvType::F16,
        ..Default::default()
    };
    let args = [&base[..], &["--kv-type", "f16"]].concat();
    assert_eq!(
        stdout(&bitnet(&args)),
        library_greedy(path, f16),
        "{args:?}"
    );
    let args = [&base[..], &["--kv-type", "q4_0"]].concat();
    assert!(one_line_error(&bitnet(&args)).contains("q4_0"));
    // `--head-type q8_0`: the library's greedy text with the head requantized at load.
    let q8 = bitnet_engine::model::LoadOptions {
        head_type: Some(bitnet_engine::model::HeadType::Q8_0),
        ..Default::default()
    };
    let args = [&base[..], &["--head-type", "q8_0"]].concat();
    assert_eq!(stdout(&bitnet(&args)), library_greedy(path, q8), "{args:?}");
    let args = [&base[..], &["--head-type", "q3"]].concat();
    assert!(one_line_error(&bitnet(&args)).contains("--head-type"));
    // chat and serve take it too, and refuse a bad one before loading or listening.
    let chat = ["chat", "-m", &m, "--head-type", "q3"];
    let serve = ["serve", "-m", &m, "--head-type", "q3", "--port", "1"];
    for args in [&chat[..], &serve[..]] {
        assert!(
            one_line_error(&bitnet(args)).contains("--head-type"),
            "{args:?}"
        );
    }
}

/// Twelve greedy tokens after "Hello" from the library, with a newline as `bitnet run` ends.
fn library_greedy(path: &std::path::Path, opts: bitnet_engine::model::LoadOptions) -> String {
    let model = bitnet_engine::Model::load_with(path, &opts).unwrap();
    let tok = model.tokenizer.clone().unwrap();
    let mut ids = tok.encode("Hello", true).unwrap();
    let mut s = model.new_session(64);
    let mut logits = model.forward(&mut s, &ids, false).unwrap().to_vec();
    let mut out = Vec::new();
    for _ in 0..12 {
        let next = logits
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (i, &x)| if x > b.1 { (i, x) } else { b },
            )
            .0 as u32;
        if tok.stop_ids().contains(&next) {
            break;
        }
        out.push(next);
        ids.push(next);
        logits = model.forward(&mut s, &[next], false).unwrap().to_vec();
    }
    format!("{}\n", tok.decode(&out))
}

#[test]
fn run_errors() {
    let m = data("gguf/tiny-i2_s.gguf");
    assert!(
        one_line_error(&bitnet(&["run", "-m", &m, "-p", "x", "--temp", "-1"]))
            .contains("temperature")
    );
    assert!(
        one_line_error(&bitnet(&["run", "-m", &m, "-p", "x", "--top-p", "1.5"])).contains("top")
    );
    let long = "word ".repeat(200);
    assert!(
        one_line_error(&bitnet(&["run", "-m", &m, "-p", &long, "-c", "64"])).contains("context")
    );
    assert!(one_line_error(&bitnet(&[
        "run",
        "-m",
        &data("checkpoint_packed"),
        "-p",
        "x"
    ]))
    .contains("tokenizer"));
}

#[test]
fn info_lists_hyperparameters_and_tensors() {
    let out = stdout(&bitnet(&["info", "-m", &data("gguf/tiny-tq1_0.gguf")]));
    for want in [
        "architecture:      bitnet",
        "hidden size:       256",
        "FFN size:          688",
        "8 / 2 (head dim 32)",
        "blk.3.ffn_down.weight",
        "TQ1_0",
        "F16",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    let out = stdout(&bitnet(&["info", "-m", &data("checkpoint_packed")]));
    assert!(
        out.contains("model.layers.0.self_attn.q_proj.weight") && out.contains("autobitlinear"),
        "{out}"
    );
    one_line_error(&bitnet(&["info", "-m", &data("golden.json")]));
}
