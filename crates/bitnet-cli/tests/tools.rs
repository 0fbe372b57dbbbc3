//! The benchmarking and quality tools end to end: `bitnet synth` (files our engine loads, with
//! the requested shapes, a third of each ternary code, a working tokenizer and the converters'
//! F16 fallback), `bitnet bench` (JSON records with llama-bench's keys) and `bitnet perplexity`
//! (finite perplexity, KL divergence of a run against itself exactly 0).

use bitnet_engine::config::Activation;
use bitnet_engine::Model;
use bitnet_formats::{GgmlType, GgufFile};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Run the binary, failing (not hanging) if it takes more than two minutes.
fn bitnet(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if t0.elapsed() > Duration::from_secs(120) {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "bitnet {args:?} did not finish in 120 s (hang?); stdout so far: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn one_line_error(o: &Output) -> String {
    assert!(!o.status.success(), "unexpected success");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.starts_with("warning:")).collect();
    assert_eq!(lines.len(), 1, "not one line: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    lines[0].to_string()
}

fn synth(dir: &Path, name: &str, args: &[&str]) -> PathBuf {
    let path = dir.join(name);
    let mut all = vec!["synth", "-o", path.to_str().unwrap()];
    all.extend_from_slice(args);
    ok(bitnet(&all));
    assert!(!dir.join(format!("{name}.partial")).exists());
    path
}

/// Fractions of -1, 0, +1 over every ternary weight of the model.
fn code_fractions(m: &Model) -> [f64; 3] {
    let mut n = [0u64; 3];
    for lin in m.weights.linears() {
        for r in 0..lin.rows {
            for c in 0..lin.cols {
                n[(lin.value(r, c) + 1) as usize] += 1;
            }
        }
    }
    let total = (n[0] + n[1] + n[2]) as f64;
    [
        n[0] as f64 / total,
        n[1] as f64 / total,
        n[2] as f64 / total,
    ]
}

#[test]
fn synth_tiny_round_trips_in_every_type() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = [768u32, 17, 42, 300, 5, 1000];
    let mut reference: Option<Vec<f32>> = None;
    for (ty, arch, file_type, ggml) in [
        ("i2_s", "bitnet-b1.58", 40, GgmlType::I2_S),
        ("tq2_0", "bitnet", 37, GgmlType::TQ2_0),
        ("tq1_0", "bitnet", 36, GgmlType::TQ1_0),
    ] {
        let path = synth(
            dir.path(),
            &format!("tiny-{ty}.gguf"),
            &["--shape", "tiny", "--type", ty, "--seed", "5"],
        );
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.get_str("general.architecture").unwrap(), Some(arch));
        assert_eq!(g.get_u64("general.file_type").unwrap(), Some(file_type));
        assert_eq!(g.tensors().len(), 1 + 4 * 11 + 1);
        for t in g.tensors() {
            let ternary = [
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_gate",
                "ffn_up",
            ]
            .iter()
            .any(|s| t.name.contains(s));
            let down = t.name.contains("ffn_down");
            let want = if ternary || (down && ggml == GgmlType::I2_S) {
                // 688-wide rows: a multiple of 128 elements in all (I2_S), not of 256 (TQ).
                ggml
            } else if down || t.name == "token_embd.weight" {
                GgmlType::F16
            } else {
                GgmlType::F32
            };
            assert_eq!(t.dtype, want, "{} in {ty}", t.name);
        }
        drop(g);

        let m = Model::load(&path).unwrap();
        assert!(m.warnings.is_empty(), "{:?}", m.warnings);
        let c = &m.config;
        assert_eq!(
            (
                c.n_embd,
                c.n_ff,
                c.n_layer,
                c.n_head,
                c.n_head_kv,
                c.head_dim
            ),
            (256, 688, 4, 8, 2, 32)
        );
        assert_eq!((c.n_vocab, c.n_ctx_train), (1024, 4096));
        assert_eq!(c.activation, Activation::Relu2);
        assert!(c.sub_norms && c.tied_head);
        for f in code_fractions(&m) {
            assert!(
                (f - 1.0 / 3.0).abs() < 0.01,
                "{ty}: {:?}",
                code_fractions(&m)
            );
        }
        let down = &m.weights.layers[0].w_down;
        if ggml == GgmlType::I2_S {
            assert_eq!(down.stored_as, "I2_S");
        } else {
            assert!(
                down.stored_as.starts_with("F16 ternary"),
                "{}",
                down.stored_as
            );
        }

        // Tokenizer: BOS/EOS/EOT at the top ids as in Llama 3, text round trips.
        let tok = m.tokenizer.as_ref().unwrap();
        assert_eq!((tok.bos_id(), tok.eos_id()), (Some(768), Some(769)));
        assert_eq!(tok.token_id("<|eot_id|>"), Some(777));
        assert!(tok.stop_ids().contains(&777));
        let text = "Hello world, the little engine ran 123 times!";
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(ids[0], 768);
        assert!(ids.len() < text.len(), "no merges used: {ids:?}");
        assert_eq!(tok.decode(&ids[1..]), text);
        assert_eq!(tok.encode("a<|eot_id|>", false).unwrap().last(), Some(&777));

        // The same seed is the same model in every type: identical logits.
        let mut s = m.new_session(16);
        let logits = m.forward(&mut s, &tokens, true).unwrap().to_vec();
        assert!(logits.iter().all(|x| x.is_finite()));
        match &reference {
            None => reference = Some(logits),
            Some(r) => assert!(r == &logits, "{ty} logits differ from i2_s"),
        }
    }
}

#[test]
fn synth_other_families_load_with_their_settings() {
    let dir = tempfile::tempdir().unwrap();
    // Falcon3 shape, scaled down: llama architecture, SiLU, no sub-norms, untied head,
    // explicit head dim, Falcon3's RoPE base and epsilon.
    let small = [
        "--hidden",
        "256",
        "--ffn",
        "512",
        "--layers",
        "2",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--vocab",
        "600",
    ];
    for ty in ["i2_s", "tq2_0"] {
        let mut args = vec!["--shape", "falcon3-1b", "--type", ty, "--head-dim", "64"];
        args.extend_from_slice(&small);
        let path = synth(dir.path(), &format!("falcon-{ty}.gguf"), &args);
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.get_str("general.architecture").unwrap(), Some("llama"));
        assert_eq!(
            g.get_u64("general.file_type").unwrap(),
            Some(if ty == "i2_s" { 40 } else { 37 })
        );
        assert_eq!(g.tensor("output.weight").unwrap().dtype, GgmlType::F16);
        assert!(g.tensor("blk.0.attn_sub_norm.weight").is_none());
        drop(g);
        let m = Model::load(&path).unwrap();
        let c = &m.config;
        assert_eq!(c.arch, "llama");
        assert_eq!((c.head_dim, c.q_dim(), c.kv_dim()), (64, 256, 128));
        assert_eq!(c.activation, Activation::Silu);
        assert!(!c.sub_norms && !c.tied_head);
        assert_eq!((c.rope_theta, c.rms_eps), (1000042.0, 1e-6));
        let mut s = m.new_session(8);
        let l = m.forward(&mut s, &[1, 2, 3], false).unwrap();
        assert!(l.iter().all(|x| x.is_finite()));
    }

    // 1bitLLM bitnet_b1_58 shape: `bitnet` architecture with sub-norms and SiLU, tied head
    // (llama.cpp's `bitnet` graph has no output tensor).
    // A hidden size of 320 does not fit 256-blocks: every ternary slot but ffn_down (512 wide)
    // falls back to F16 in TQ2_0.
    let path = synth(
        dir.path(),
        "b158.gguf",
        &[
            "--shape",
            "bitnet_b1_58-3b",
            "--type",
            "tq2_0",
            "--hidden",
            "320",
            "--ffn",
            "512",
            "--layers",
            "2",
            "--heads",
            "4",
            "--kv-heads",
            "4",
            "--vocab",
            "700",
        ],
    );
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.get_str("general.architecture").unwrap(), Some("bitnet"));
    assert_eq!(g.get_str("bitnet.hidden_activation").unwrap(), Some("silu"));
    assert!(g.tensor("output.weight").is_none());
    assert_eq!(
        g.tensor("blk.1.attn_q.weight").unwrap().dtype,
        GgmlType::F16
    );
    assert_eq!(
        g.tensor("blk.1.ffn_down.weight").unwrap().dtype,
        GgmlType::TQ2_0
    );
    drop(g);
    let m = Model::load(&path).unwrap();
    assert_eq!(m.config.activation, Activation::Silu);
    assert!(m.config.sub_norms && m.config.tied_head);
    assert_eq!((m.config.head_dim, m.config.n_vocab), (80, 700));
    assert!(m.warnings.is_empty(), "{:?}", m.warnings);

    // Bad overrides are one-line errors.
    let bad = dir.path().join("bad.gguf");
    let e = one_line_error(&bitnet(&[
        "synth",
        "--shape",
        "tiny",
        "--heads",
        "7",
        "-o",
        bad.to_str().unwrap(),
    ]));
    assert!(e.contains("multiple"), "{e}");
    let e = one_line_error(&bitnet(&[
        "synth",
        "--shape",
        "tiny",
        "--type",
        "q4_0",
        "-o",
        bad.to_str().unwrap(),
    ]));
    assert!(e.contains("q4_0"), "{e}");
    let e = one_line_error(&bitnet(&[
        "synth",
        "--shape",
        "7b",
        "-o",
        bad.to_str().unwrap(),
    ]));
    assert!(e.contains("2b4t"), "{e}");
    assert!(!bad.exists());
}

#[test]
fn bench_reports_llama_bench_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = synth(dir.path(), "tiny.gguf", &["--shape", "tiny"]);
    let m = path.to_str().unwrap();
    let out = ok(bitnet(&[
        "bench", "-m", m, "-p", "8,16", "-n", "4", "-t", "1,2", "-r", "2", "--json",
    ]));
    let v: Value = serde_json::from_str(&out).unwrap();
    let recs = v.as_array().unwrap();
    let tests: Vec<(&str, u64)> = recs
        .iter()
        .map(|r| {
            (
                r["test"].as_str().unwrap(),
                r["n_threads"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        tests,
        [
            ("pp8", 1),
            ("pp16", 1),
            ("tg4", 1),
            ("pp8", 2),
            ("pp16", 2),
            ("tg4", 2)
        ]
    );
    for r in recs {
        for key in [
            "n_prompt",
            "n_gen",
            "n_threads",
            "avg_ts",
            "stddev_ts",
            "samples_ts",
            "samples_ns",
            "avg_ns",
            "model_filename",
            "model_size",
            "model_n_params",
            "cpu_info",
            "load_time_ms",
        ] {
            assert!(r.get(key).is_some(), "missing {key}: {r}");
        }
        assert_eq!(
            (r["type_k"].as_str(), r["type_v"].as_str()),
            (Some("f32"), Some("f32"))
        );
        let avg = r["avg_ts"].as_f64().unwrap();
        let sd = r["stddev_ts"].as_f64().unwrap();
        assert!(
            avg.is_finite() && avg > 0.0 && sd.is_finite() && sd >= 0.0,
            "{r}"
        );
        let samples = r["samples_ts"].as_array().unwrap();
        assert_eq!(samples.len(), 2);
        assert!(samples.iter().all(|s| s.as_f64().unwrap() > 0.0));
        assert_eq!(r["model_n_params"].as_u64(), Some(3_037_120));
        let test = r["test"].as_str().unwrap();
        let (np, ng) = (
            r["n_prompt"].as_u64().unwrap(),
            r["n_gen"].as_u64().unwrap(),
        );
        assert_eq!(
            test,
            if np > 0 {
                format!("pp{np}")
            } else {
                format!("tg{ng}")
            }
        );
    }
    let bench_json = |args: &[&str]| -> Value {
        let all = [&["bench", "-m", m, "-r", "1", "--json"][..], args].concat();
        serde_json::from_str(&ok(bitnet(&all))).unwrap()
    };
    // `-d`: the same tests with a filled context, named and recorded as llama-bench does.
    let v = bench_json(&["-p", "8", "-n", "4", "-d", "0,16"]);
    let got: Vec<(&str, u64)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["test"].as_str().unwrap(), r["n_depth"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        got,
        [("pp8", 0), ("tg4", 0), ("pp8 @ d16", 16), ("tg4 @ d16", 16)]
    );
    let err = one_line_error(&bitnet(&["bench", "-m", m, "-p", "8", "-d", "1000000"]));
    assert!(err.contains("depth 1000000"), "{err}");
    // `--kv-type f16` reaches the engine (llama-bench's type_k / type_v keys).
    let v = bench_json(&["-p", "8", "-n", "0", "--kv-type", "f16"]);
    assert_eq!(v[0]["type_k"].as_str(), Some("f16"), "{v}");
    assert_eq!(v[0]["type_v"].as_str(), Some("f16"), "{v}");

    // The markdown table.
    let out = ok(bitnet(&[
        "bench", "-m", m, "-p", "8", "-n", "2", "-t", "1", "-r", "1",
    ]));
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("| model | size | params | backend | threads | test | t/s |"));
    assert!(
        lines[2].contains("| pp8 |") && lines[2].contains(" ± "),
        "{out}"
    );
    assert!(lines[3].contains("| tg2 |"), "{out}");
    assert!(out.contains("peak RSS"), "{out}");

    // The requantized head.
    let out = ok(bitnet(&[
        "bench",
        "-m",
        m,
        "-p",
        "8",
        "-n",
        "2",
        "-t",
        "1",
        "-r",
        "1",
        "--json",
        "--head-type",
        "q8_0",
    ]));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(v[0]["head_type"].as_str().unwrap().contains("Q8_0"), "{v}");

    let e = one_line_error(&bitnet(&["bench", "-m", m, "-p", "0", "-n", "0"]));
    assert!(e.contains("nothing to test"), "{e}");
    let e = one_line_error(&bitnet(&["bench", "-m", m, "--head-type", "q4_0"]));
    assert!(e.contains("q4_0"), "{e}");
}

#[test]
fn perplexity_and_kl_divergence() {
    let dir = tempfile::tempdir().unwrap();
    let i2s = synth(dir.path(), "a.gguf", &["--shape", "tiny", "--type", "i2_s"]);
    let tq1 = synth(
        dir.path(),
        "b.gguf",
        &["--shape", "tiny", "--type", "tq1_0"],
    );
    let other = synth(dir.path(), "c.gguf", &["--shape", "tiny", "--seed", "9"]);
    let text_path = dir.path().join("text.txt");
    let words = [
        "the", "engine", "ran", "through", "hills", "and", "valleys", "with", "bread", "tea",
    ];
    let text: Vec<&str> = (0..600)
        .map(|i| words[(i * 7 + i / 3) % words.len()])
        .collect();
    std::fs::write(&text_path, text.join(" ")).unwrap();
    let (a, b, c, t) = (
        i2s.to_str().unwrap(),
        tq1.to_str().unwrap(),
        other.to_str().unwrap(),
        text_path.to_str().unwrap(),
    );
    let logp = dir.path().join("base.logp");
    let lp = logp.to_str().unwrap();

    let plain = ok(bitnet(&[
        "perplexity",
        "-m",
        a,
        "-f",
        t,
        "--ctx",
        "32",
        "--chunks",
        "3",
    ]));
    assert!(plain.starts_with("[1]"), "{plain}");
    assert!(plain.contains("Final estimate: PPL = "), "{plain}");

    let run = |args: &[&str]| -> Value {
        let mut all = vec!["perplexity", "--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&ok(bitnet(&all))).unwrap()
    };
    let v = run(&[
        "-m",
        a,
        "-f",
        t,
        "--ctx",
        "32",
        "--chunks",
        "3",
        "--save-logits",
        lp,
    ]);
    let ppl = v["ppl"].as_f64().unwrap();
    assert!(ppl.is_finite() && ppl > 1.0, "{v}");
    assert!(v["ppl_stderr"].as_f64().unwrap() > 0.0);
    // 3 windows of 32 tokens, rows 16..30 scored: 15 per window.
    assert_eq!(v["n_scored"].as_u64(), Some(45));
    assert_eq!(
        std::fs::metadata(&logp).unwrap().len(),
        24 + 4 * 96 + 2 * 45 * 1024
    );

    // Against itself, and against the same model stored as TQ1_0: exactly 0 and 100%.
    for m in [a, b] {
        let v = run(&["-m", m, "--kl-divergence", lp]);
        assert_eq!(v["kld_mean"].as_f64(), Some(0.0), "{v}");
        assert_eq!(v["kld_max"].as_f64(), Some(0.0), "{v}");
        assert_eq!(v["same_top_pct"].as_f64(), Some(100.0), "{v}");
        assert_eq!(v["ppl_ratio"].as_f64(), Some(1.0), "{v}");
        assert_eq!(v["ppl"].as_f64(), Some(ppl), "{v}");
    }
    // A different model: positive divergence, and the text must match when given.
    let v = run(&["-m", c, "--kl-divergence", lp, "-f", t]);
    let kld = v["kld_mean"].as_f64().unwrap();
    assert!(kld.is_finite() && kld > 0.0, "{v}");
    assert!(v["kld_max"].as_f64().unwrap() >= v["kld_p99"].as_f64().unwrap());
    assert!(v["kld_stderr"].as_f64().unwrap() > 0.0);

    // The output head requantized to Q8_0 or Q6_K: a small cost, measured; the 6-bit head's
    // is the larger (its steps are about four times coarser).
    let kld_of = |head: &str| {
        let v = run(&["-m", a, "--kl-divergence", lp, "--head-type", head]);
        eprintln!("--head-type {head}: {v}");
        let kld = v["kld_mean"].as_f64().unwrap();
        assert!(kld > 0.0 && kld < 0.05, "{v}");
        assert!(v["same_top_pct"].as_f64().unwrap() > 80.0, "{v}");
        kld
    };
    let (kld_q8, kld_q6) = (kld_of("q8_0"), kld_of("q6_k"));
    assert!(kld_q6 > kld_q8, "q6_k {kld_q6} vs q8_0 {kld_q8}");
    // Q6_K blocks are 256 wide: a 320-wide model is refused with a way out.
    let narrow = synth(
        dir.path(),
        "n.gguf",
        &["--shape", "tiny", "--hidden", "320"],
    );
    let e = one_line_error(&bitnet(&[
        "perplexity",
        "-m",
        narrow.to_str().unwrap(),
        "-f",
        t,
        "--head-type",
        "q6_k",
    ]));
    assert!(e.contains("multiple of 256") && e.contains("q8_0"), "{e}");

    let short = dir.path().join("short.txt");
    std::fs::write(&short, "only a few words").unwrap();
    let e = one_line_error(&bitnet(&[
        "perplexity",
        "-m",
        a,
        "-f",
        short.to_str().unwrap(),
        "--ctx",
        "32",
    ]));
    assert!(e.contains("fewer than one window"), "{e}");
    let e = one_line_error(&bitnet(&["perplexity", "-m", a, "--kl-divergence", t]));
    assert!(e.contains("not a log-probabilities file"), "{e}");
    let e = one_line_error(&bitnet(&[
        "perplexity",
        "-m",
        a,
        "--kl-divergence",
        lp,
        "-f",
        short.to_str().unwrap(),
    ]));
    assert!(e.contains("does not tokenize"), "{e}");
}
