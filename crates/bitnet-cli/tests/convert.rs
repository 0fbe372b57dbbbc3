//! `bitnet convert` end to end (the binary): Hugging Face directories and GGUF files to each
//! GGUF type, checked tensor by tensor against the files the C++ converters made
//! (`tests/data/tiny/gguf`, `tests/data/falcon-tiny`), and by running the results against the
//! goldens made for exactly those weights (thresholds of the golden README, as in
//! `crates/bitnet-engine/tests/golden.rs`).

use bitnet_engine::Model;
use bitnet_formats::{GgmlType, GgufFile};
use safetensors::SafeTensors;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn data(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data")
        .join(rel)
}

fn bitnet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(args)
        // Never reach for a real Hub from the tests.
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap()
}

fn convert(input: &Path, out: &Path, ty: &str, extra: &[&str]) -> String {
    let mut args = vec![
        "convert",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--type",
        ty,
    ];
    args.extend_from_slice(extra);
    let o = bitnet(&args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "convert {ty} failed: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// The bytes of a tensor's data that carry meaning: I2_S without its 28 padding bytes (which
/// bitnet.cpp does not always zero), everything else whole.
fn meaningful(t: &bitnet_formats::TensorInfo, d: &[u8]) -> Vec<u8> {
    match t.dtype {
        GgmlType::I2_S => d[..d.len() - 28].to_vec(),
        _ => d.to_vec(),
    }
}

/// Every tensor of `want` is in `got` with the same type, dims and meaningful bytes (even the
/// sign of the zeros of F16 fallback matrices).
fn assert_same_tensors(got: &Path, want: &Path) {
    let (g, w) = (GgufFile::open(got).unwrap(), GgufFile::open(want).unwrap());
    assert_eq!(g.tensors().len(), w.tensors().len(), "tensor count");
    let mut bad = Vec::new();
    for wt in w.tensors() {
        let gt = g
            .tensor(&wt.name)
            .unwrap_or_else(|| panic!("{} missing", wt.name));
        assert_eq!(
            (gt.dtype, &gt.dims),
            (wt.dtype, &wt.dims),
            "{}: type or dims",
            wt.name
        );
        let (a, b) = (
            meaningful(gt, g.tensor_data(gt)),
            meaningful(wt, w.tensor_data(wt)),
        );
        if a != b {
            let first = a.iter().zip(&b).position(|(x, y)| x != y);
            bad.push(format!(
                "{} ({}) first differing byte {first:?}",
                wt.name, wt.dtype
            ));
        }
    }
    assert!(
        bad.is_empty(),
        "{} vs {}: {bad:#?}",
        got.display(),
        want.display()
    );
}

#[test]
fn master_checkpoint_gives_the_tensors_of_the_cpp_converters() {
    let tmp = tempfile::tempdir().unwrap();
    for ty in ["i2_s", "tq2_0", "tq1_0"] {
        let out = tmp.path().join(format!("tiny-{ty}.gguf"));
        convert(&data("tiny/checkpoint_master_bf16"), &out, ty, &[]);
        assert_same_tensors(&out, &data(&format!("tiny/gguf/tiny-{ty}.gguf")));
    }
}

#[test]
fn falcon_packed_checkpoint_gives_llama_cpps_tq2_0_file() {
    // Architecture `llama`, q/k rows permuted, d = f16(1/weight_scale), F16 embedding and head.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("falcon-tq2_0.gguf");
    convert(&data("falcon-tiny/checkpoint_packed"), &out, "tq2_0", &[]);
    assert_same_tensors(&out, &data("falcon-tiny/falcon-tiny-TQ2_0.gguf"));
    let g = GgufFile::open(&out).unwrap();
    assert_eq!(g.get_str("general.architecture").unwrap(), Some("llama"));
    assert_eq!(g.get_u64("general.file_type").unwrap(), Some(37));
    // The tokenizer came from tokenizer.json and encodes like it.
    let hf =
        bitnet_engine::tokenizer::Tokenizer::from_hf_dir(&data("falcon-tiny/checkpoint_packed"))
            .unwrap()
            .unwrap();
    let ours = bitnet_engine::tokenizer::Tokenizer::from_gguf(&g).unwrap();
    let text = "Hello world, this is a test: 12345 tokens.\n  x<|endoftext|>";
    assert_eq!(
        ours.encode(text, true).unwrap(),
        hf.encode(text, true).unwrap()
    );
    assert_eq!(ours.eos_id(), hf.eos_id());
    // And the model runs to its golden (the one made for llama.cpp's file: same weights).
    check_against_golden(
        &out,
        "falcon-tiny/golden_gguf.safetensors",
        "falcon-tiny/golden.json",
        Bars::Exact,
    );
}

/// Logit agreement bars.
#[derive(Clone, Copy, PartialEq)]
enum Bars {
    /// The golden was made for exactly these weights: len1 within 1e-4; longer prompts cosine
    /// >= 0.998, max |d| <= 0.6, mean |d| <= 0.06 per position.
    Exact,
    /// Same codes, scales in another storage precision (cross-format rule of the golden
    /// README): cosine >= 0.995, max |d| <= 1.0, mean |d| <= 0.15.
    CrossFormat,
}

fn f32s(st: &SafeTensors, key: &str) -> Vec<f32> {
    st.tensor(key)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn check_against_golden(model: &Path, golden: &str, prompts: &str, bars: Bars) {
    let m = Model::load(model).unwrap();
    let bytes = std::fs::read(data(golden)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let pj: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data(prompts)).unwrap()).unwrap();
    let v = m.config.n_vocab;
    for p in ["len1", "len7", "len64"] {
        let toks: Vec<u32> = pj["prompts"][p]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        let got = m
            .forward(&mut m.new_session(128), &toks, true)
            .unwrap()
            .to_vec();
        let want = f32s(&st, &format!("{p}.logits_all"));
        assert_eq!(got.len(), want.len());
        let (mut sum_abs, mut n) = (0f64, 0usize);
        for r in 0..toks.len() {
            let (g, w) = (&got[r * v..(r + 1) * v], &want[r * v..(r + 1) * v]);
            let (mut dot, mut ng, mut nw, mut max) = (0f64, 0f64, 0f64, 0f64);
            for (&a, &b) in g.iter().zip(w) {
                let (a, b) = (a as f64, b as f64);
                dot += a * b;
                ng += a * a;
                nw += b * b;
                max = max.max((a - b).abs());
                sum_abs += (a - b).abs();
                n += 1;
            }
            let cos = dot / (ng.sqrt() * nw.sqrt());
            let what = format!("{} {p} row {r}", model.display());
            match (bars, p) {
                (Bars::Exact, "len1") => assert!(max <= 1e-4, "{what}: max |d| {max}"),
                (Bars::Exact, _) => {
                    assert!(cos >= 0.998 && max <= 0.6, "{what}: cos {cos} max {max}")
                }
                (Bars::CrossFormat, _) => {
                    assert!(cos >= 0.995 && max <= 1.0, "{what}: cos {cos} max {max}")
                }
            }
        }
        let mean = sum_abs / n as f64;
        let bar = if bars == Bars::Exact { 0.06 } else { 0.15 };
        assert!(mean <= bar, "{} {p}: mean |d| {mean}", model.display());
    }
}

#[test]
fn converted_master_checkpoint_matches_the_goldens_of_the_reference_files() {
    let tmp = tempfile::tempdir().unwrap();
    for ty in ["i2_s", "tq2_0", "tq1_0"] {
        let out = tmp.path().join(format!("m-{ty}.gguf"));
        convert(&data("tiny/checkpoint_master_bf16"), &out, ty, &[]);
        check_against_golden(
            &out,
            &format!("tiny/gguf/golden_gguf-{ty}.safetensors"),
            "tiny/gguf/golden_gguf.json",
            Bars::Exact,
        );
    }
}

/// Every BitLinear of `a` and `b` has the same ternary codes; returns the largest relative
/// scale difference.
fn same_codes(a: &Model, b: &Model) -> f32 {
    let mut worst = 0f32;
    for (x, y) in a.weights.linears().zip(b.weights.linears()) {
        assert_eq!((x.rows, x.cols), (y.rows, y.cols), "{}", y.name);
        for r in 0..x.rows {
            for c in 0..x.cols {
                assert_eq!(x.value(r, c), y.value(r, c), "{} [{r}, {c}]", y.name);
            }
        }
        worst = worst.max((x.beta - y.beta).abs() / x.beta.abs());
    }
    worst
}

#[test]
fn packed_checkpoint_round_trips_to_every_type() {
    let tmp = tempfile::tempdir().unwrap();
    let src = Model::load(&data("tiny/checkpoint_packed")).unwrap();
    for ty in ["i2_s", "tq2_0", "tq1_0"] {
        let out = tmp.path().join(format!("p-{ty}.gguf"));
        let err = convert(&data("tiny/checkpoint_packed"), &out, ty, &[]);
        let m = Model::load(&out).unwrap();
        // The bf16 weight_scale is stored exactly (f32 for I2_S; f16 holds every bf16 value
        // of this size exactly).
        assert_eq!(same_codes(&src, &m), 0.0, "{ty}");
        // The C++ files were made from the master weights (f32 / f16 mean|W|), so their goldens
        // differ from these weights by the scale precision: the cross-format bars.
        check_against_golden(
            &out,
            &format!("tiny/gguf/golden_gguf-{ty}.safetensors"),
            "tiny/gguf/golden_gguf.json",
            Bars::CrossFormat,
        );
        // And against the golden of the packed checkpoint itself (bf16 embedding there, F16
        // here).
        check_against_golden(
            &out,
            "tiny/golden_packed.safetensors",
            "tiny/golden.json",
            Bars::CrossFormat,
        );
        let g = GgufFile::open(&out).unwrap();
        let (arch, ft) = if ty == "i2_s" {
            ("bitnet-b1.58", 40)
        } else {
            ("bitnet", if ty == "tq2_0" { 37 } else { 36 })
        };
        assert_eq!(g.get_str("general.architecture").unwrap(), Some(arch));
        assert_eq!(g.get_u64("general.file_type").unwrap(), Some(ft));
        // No tokenizer in this checkpoint, but a BitNet model gets the 2B4T chat template.
        assert!(err.contains("no tokenizer"), "{err}");
        assert_eq!(
            g.get_str("tokenizer.chat_template").unwrap(),
            Some(bitnet_engine::chat::BITNET_TEMPLATE)
        );
        if ty == "i2_s" {
            // Trap 7: ffn_down's 688-wide rows are written correctly, with a warning.
            assert!(
                err.contains("bitnet.cpp misreads") && err.contains("--bitnet-cpp-compat"),
                "{err}"
            );
            let t = g.tensor("blk.0.ffn_down.weight").unwrap();
            assert_eq!(t.dtype, GgmlType::I2_S);
            let d = g.tensor_data(t);
            assert!(
                d[d.len() - 28..].iter().all(|&b| b == 0),
                "padding after the scale is zero"
            );
        } else {
            assert_eq!(
                g.tensor("blk.0.ffn_down.weight").unwrap().dtype,
                GgmlType::F16
            );
        }
    }
}

#[test]
fn bitnet_cpp_compat_stores_misread_matrices_as_f16() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("compat.gguf");
    let err = convert(
        &data("tiny/checkpoint_packed"),
        &out,
        "i2_s",
        &["--bitnet-cpp-compat"],
    );
    assert!(!err.contains("misreads"), "{err}");
    let g = GgufFile::open(&out).unwrap();
    for t in g.tensors() {
        let want = if t.name.contains("ffn_down") {
            GgmlType::F16
        } else if t.name.contains("norm") {
            GgmlType::F32
        } else if t.name == "token_embd.weight" {
            GgmlType::F16
        } else {
            GgmlType::I2_S
        };
        assert_eq!(t.dtype, want, "{}", t.name);
    }
    let m = Model::load(&out).unwrap();
    // F16 holds the scale to f16 precision.
    let worst = same_codes(&Model::load(&data("tiny/checkpoint_packed")).unwrap(), &m);
    assert!(worst <= 2f32.powi(-11), "{worst}");
}

#[test]
fn gguf_files_convert_to_each_other_with_their_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let packed = Model::load(&data("tiny/checkpoint_packed")).unwrap();
    for (from, to) in [
        ("i2_s", "tq2_0"),
        ("tq2_0", "i2_s"),
        ("tq1_0", "tq2_0"),
        ("i2_s", "tq1_0"),
    ] {
        let src = data(&format!("tiny/gguf/tiny-{from}.gguf"));
        let out = tmp.path().join(format!("{from}-to-{to}.gguf"));
        let err = convert(&src, &out, to, &[]);
        let (a, b) = (Model::load(&src).unwrap(), Model::load(&out).unwrap());
        let worst = same_codes(&a, &b);
        // I2_S -> TQ rounds the f32 scale to f16 (and the TQ F16 fallback holds f16 anyway).
        assert!(
            worst <= 2f32.powi(-11),
            "{from} -> {to}: scale differs by {worst}"
        );
        same_codes(&packed, &b);
        // The tokenizer is carried over and encodes the same.
        let (ta, tb) = (a.tokenizer.clone().unwrap(), b.tokenizer.clone().unwrap());
        let text = "Hello world, this is a BitNet b1.58 test: 1234567 tokens.\n  x<|end_of_text|>";
        assert_eq!(
            ta.encode(text, true).unwrap(),
            tb.encode(text, true).unwrap()
        );
        let g = GgufFile::open(&out).unwrap();
        let template = g.get_str("tokenizer.chat_template").unwrap().unwrap();
        assert!(
            !template.contains("BITNETAssistant"),
            "the placeholder template was carried over"
        );
        if from == "i2_s" {
            // bitnet.cpp's placeholder (trap 9) is replaced by the 2B4T template.
            assert_eq!(template, bitnet_engine::chat::BITNET_TEMPLATE);
            assert!(err.contains("placeholder"), "{err}");
        }
        check_against_golden(
            &out,
            &format!("tiny/gguf/golden_gguf-{from}.safetensors"),
            "tiny/gguf/golden_gguf.json",
            if worst == 0.0 {
                Bars::Exact
            } else {
                Bars::CrossFormat
            },
        );
    }
}

#[test]
fn head_types_q8_0_and_q6_k() {
    let tmp = tempfile::tempdir().unwrap();
    for (head, ty) in [("q8_0", GgmlType::Q8_0), ("Q6_K", GgmlType::Q6_K)] {
        let out = tmp.path().join(format!("h-{head}.gguf"));
        convert(
            &data("tiny/checkpoint_master_bf16"),
            &out,
            "i2_s",
            &["--head-type", head],
        );
        let g = GgufFile::open(&out).unwrap();
        assert_eq!(g.tensor("token_embd.weight").unwrap().dtype, ty);
        check_against_golden(
            &out,
            "tiny/gguf/golden_gguf-i2_s.safetensors",
            "tiny/gguf/golden_gguf.json",
            Bars::CrossFormat,
        );
    }
    // An untied head gets the same type.
    let out = tmp.path().join("falcon-q8.gguf");
    convert(
        &data("falcon-tiny/checkpoint_packed"),
        &out,
        "i2_s",
        &["--head-type", "q8_0"],
    );
    let g = GgufFile::open(&out).unwrap();
    assert_eq!(g.get_str("general.architecture").unwrap(), Some("llama"));
    assert_eq!(g.tensor("output.weight").unwrap().dtype, GgmlType::Q8_0);
    check_against_golden(
        &out,
        "falcon-tiny/golden_gguf.safetensors",
        "falcon-tiny/golden.json",
        Bars::CrossFormat,
    );
}

#[test]
fn an_all_zero_ternary_tensor_gives_a_loud_warning() {
    // A copy of the packed checkpoint whose layer-1 up_proj is all zeros (code 1 = 0b01).
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("broken");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(
        data("tiny/checkpoint_packed/config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let mut bytes = std::fs::read(data("tiny/checkpoint_packed/model.safetensors")).unwrap();
    let name = "model.layers.1.mlp.up_proj.weight";
    let range = {
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let d = st.tensor(name).unwrap().data();
        let start = d.as_ptr() as usize - bytes.as_ptr() as usize;
        start..start + d.len()
    };
    bytes[range].iter_mut().for_each(|b| *b = 0x55);
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
    let out = tmp.path().join("broken.gguf");
    let err = convert(&dir, &out, "tq2_0", &[]);
    let line = err
        .lines()
        .find(|l| l.contains("all zeros"))
        .unwrap_or_else(|| panic!("no warning in: {err}"));
    assert!(
        line.starts_with("warning:") && line.contains(name) && line.contains("revision"),
        "{line}"
    );
    // The same warning when running it.
    let o = bitnet(&["logits", "-m", out.to_str().unwrap(), "--tokens", "1,2"]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("blk.1.ffn_up.weight")
            && err.contains("all zeros")
            && err.contains("revision"),
        "{err}"
    );
}

#[test]
fn convert_errors_are_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("x.gguf");
    for (input, ty, want) in [
        ("/no/such/dir", "i2_s", "no such file"),
        (
            data("tiny/golden.json").to_str().unwrap(),
            "i2_s",
            "golden.json",
        ),
        (
            data("tiny/checkpoint_packed").to_str().unwrap(),
            "q4_0",
            "q4_0",
        ),
    ] {
        let o = bitnet(&["convert", input, "-o", out.to_str().unwrap(), "--type", ty]);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(want) && !err.contains("panicked"), "{err}");
    }
    assert!(!out.exists());
}

/// Converting holds about one tensor beyond the memory-mapped input, never all the ternary
/// matrices at once: the peak anonymous memory of the process (its heap; the mapped input's
/// pages are file-backed and not counted), sampled while it runs, stays far below the size of
/// all the matrices repacked (48 MiB for this model, which a converter holding them all would
/// exceed; the lazy one peaks below 10 MiB).
#[cfg(target_os = "linux")]
#[test]
fn converting_holds_one_tensor_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.gguf");
    let o = bitnet(&[
        "synth",
        "--shape",
        "2b4t",
        "--hidden",
        "1024",
        "--ffn",
        "4096",
        "--heads",
        "8",
        "--kv-heads",
        "8",
        "--head-dim",
        "128",
        "--layers",
        "12",
        "--vocab",
        "300",
        "--type",
        "tq2_0",
        "-t",
        "2",
        "-o",
        input.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // 12 layers of 4 x 1024^2 + 3 x 4096 x 1024 weights, 4 per byte.
    let all_packed: u64 = 12 * (4 * 1024 * 1024 + 3 * 4096 * 1024) / 4;
    let out = tmp.path().join("out.gguf");
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args([
            "convert",
            input.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ])
        .args(["--type", "i2_s", "-t", "2"])
        .env("HF_HUB_OFFLINE", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = format!("/proc/{}/status", child.id());
    let mut peak_anon: u64 = 0;
    loop {
        if let Ok(s) = std::fs::read_to_string(&status) {
            if let Some(kb) = s
                .lines()
                .find_map(|l| l.strip_prefix("RssAnon:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            {
                peak_anon = peak_anon.max(kb * 1024);
            }
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(peak_anon > 0, "no sample of {status}");
    assert!(
        peak_anon < all_packed / 2,
        "converting took {:.1} MiB of anonymous memory: the {:.1} MiB of ternary matrices are held at once",
        peak_anon as f64 / (1 << 20) as f64,
        all_packed as f64 / (1 << 20) as f64
    );
}
