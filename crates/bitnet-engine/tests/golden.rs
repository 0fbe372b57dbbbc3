//! The engine against the golden reference data (transformers, f32) for the `tiny` model in
//! every format: end-to-end logits, greedy continuations, per-op checks, and cross-format
//! agreement. Thresholds are those recommended in shared/golden/DETAILS.md ("Recommended
//! thresholds for the Rust engine", f32 engine); each is restated where it is used.

use bitnet_engine::config::Activation;
use bitnet_engine::model::MAX_CHUNK;
use bitnet_engine::{Model, Session};
use bitnet_kernels::quant::quantize_row;
use safetensors::SafeTensors;
use std::collections::HashMap;
use std::path::PathBuf;

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/tiny")
}

/// The Llama-architecture family (Falcon3 1.58-bit style: SiLU, no sub-norms, dividing scale,
/// untied head, adjacent-pair RoPE in its GGUF).
const FALCON: &str = "../falcon-tiny/";

/// All tensors of a safetensors file as (shape, f32 values); int8 tensors are widened.
fn load_tensors(rel: &str) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(data_dir().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.iter()
        .map(|(name, v)| {
            let d = v.data();
            let vals: Vec<f32> = match v.dtype() {
                safetensors::Dtype::F32 => d
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
                safetensors::Dtype::I8 => d.iter().map(|&b| b as i8 as f32).collect(),
                other => panic!("unexpected dtype {other:?}"),
            };
            (name.to_string(), (v.shape().to_vec(), vals))
        })
        .collect()
}

fn golden_json(rel: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(data_dir().join(rel)).unwrap()).unwrap()
}

fn prompt(name: &str) -> Vec<u32> {
    prompt_of("", name)
}

fn prompt_of(base: &str, name: &str) -> Vec<u32> {
    golden_json(&format!("{base}golden.json"))["prompts"][name]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

struct RowStats {
    cos: f64,
    max_abs: f64,
    sum_abs: f64,
    argmax_ok: bool,
}

fn compare_row(got: &[f32], want: &[f32]) -> RowStats {
    assert_eq!(got.len(), want.len());
    let (mut dot, mut ng, mut nw, mut max_abs, mut sum_abs) = (0f64, 0f64, 0f64, 0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        assert!(g.is_finite(), "non-finite logit");
        let (g, w) = (g as f64, w as f64);
        dot += g * w;
        ng += g * g;
        nw += w * w;
        max_abs = max_abs.max((g - w).abs());
        sum_abs += (g - w).abs();
    }
    // Same argmax wherever the golden's top1 - top2 margin exceeds 0.5.
    let argmax = |v: &[f32]| {
        v.iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (i, &x)| if x > b.1 { (i, x) } else { b },
            )
            .0
    };
    let mut sorted = want.to_vec();
    sorted.sort_by(|a, b| b.partial_cmp(a).unwrap());
    let margin = sorted[0] - sorted[1];
    RowStats {
        cos: dot / (ng.sqrt() * nw.sqrt()),
        max_abs,
        sum_abs,
        argmax_ok: margin <= 0.5 || argmax(got) == argmax(want),
    }
}

/// Multi-token bar (DETAILS.md threshold 3): per-position cosine >= 0.998, max |d| <= 0.6,
/// mean |d| <= 0.06 over all positions and the vocabulary, same argmax where the margin > 0.5.
/// The worst correct variant measured there reached cos 0.99898, max 0.44, mean 0.054, so
/// these bars pass a correct engine and fail any structural bug (those give cos << 0.99).
fn assert_rows_close(what: &str, got: &[f32], want: &[f32], n_vocab: usize) {
    let rows = want.len() / n_vocab;
    let mut sum_abs = 0.0;
    for r in 0..rows {
        let s = compare_row(
            &got[r * n_vocab..(r + 1) * n_vocab],
            &want[r * n_vocab..(r + 1) * n_vocab],
        );
        assert!(s.cos >= 0.998, "{what}: row {r} cosine {}", s.cos);
        assert!(s.max_abs <= 0.6, "{what}: row {r} max |d| {}", s.max_abs);
        assert!(
            s.argmax_ok,
            "{what}: row {r} argmax differs although the golden margin > 0.5"
        );
        sum_abs += s.sum_abs;
    }
    let mean = sum_abs / want.len() as f64;
    assert!(mean <= 0.06, "{what}: mean |d| {mean}");
}

/// Single-token bar (threshold 2): every f32 variant agreed to <= 3e-6; use atol 1e-4.
fn assert_single_token_close(what: &str, got: &[f32], want: &[f32]) {
    let s = compare_row(got, want);
    assert!(
        s.max_abs <= 1e-4,
        "{what}: len1 max |d| = {} > 1e-4",
        s.max_abs
    );
}

/// End-to-end logits of one forward over each prompt (no cache reuse), and greedy decoding with
/// the KV cache, against the golden of exactly this file.
fn check_model(model_rel: &str, golden_rel: &str, greedy_json: &str, greedy_fmt: &str) {
    let opts = bitnet_engine::model::LoadOptions::default();
    check_model_with(model_rel, golden_rel, greedy_json, greedy_fmt, &opts)
}

fn check_model_with(
    model_rel: &str,
    golden_rel: &str,
    greedy_json: &str,
    greedy_fmt: &str,
    opts: &bitnet_engine::model::LoadOptions,
) {
    let base = if model_rel.starts_with(FALCON) {
        FALCON
    } else {
        ""
    };
    let model = Model::load_with(&data_dir().join(model_rel), opts).unwrap();
    let v = model.config.n_vocab;
    let golden = load_tensors(golden_rel);
    let greedy = &golden_json(greedy_json)["formats"][greedy_fmt]["greedy"];
    for p in ["len1", "len7", "len64"] {
        let toks = prompt_of(base, p);
        let mut s = model.new_session(256);
        let got = model.forward(&mut s, &toks, true).unwrap().to_vec();
        let want = &golden[&format!("{p}.logits_all")].1;
        let what = format!("{model_rel} {p}");
        if p == "len1" {
            assert_single_token_close(&what, &got, want);
        } else {
            assert_rows_close(&what, &got, want, v);
        }
        check_greedy(&model, &toks, &golden, &greedy[p], &what);
    }
}

/// Greedy continuation (threshold 5): compare our argmax with the golden token at every step;
/// a difference is accepted only where the golden top1 - top2 margin is < 0.5, and decoding
/// continues teacher-forced on the golden token. Every step's logits must also meet the
/// multi-token bar against `gen_step_logits` (the golden's own cached decoding).
fn check_greedy(
    model: &Model,
    prompt: &[u32],
    golden: &HashMap<String, (Vec<usize>, Vec<f32>)>,
    g: &serde_json::Value,
    what: &str,
) {
    let p = what.rsplit(' ').next().unwrap();
    let v = model.config.n_vocab;
    let tokens: Vec<u32> = g["new_tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    let margins: Vec<f64> = g["top1_minus_top2"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_f64().unwrap())
        .collect();
    let step_logits = &golden[&format!("{p}.gen_step_logits")].1;
    let mut s: Session = model.new_session(256);
    let mut logits = model.forward(&mut s, prompt, false).unwrap().to_vec();
    let mut mismatches = 0;
    for (i, &want) in tokens.iter().enumerate() {
        assert_rows_close(
            &format!("{what} greedy step {i}"),
            &logits,
            &step_logits[i * v..(i + 1) * v],
            v,
        );
        let ours = logits
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |b, (j, &x)| if x > b.1 { (j, x) } else { b },
            )
            .0 as u32;
        if ours != want {
            assert!(
                margins[i] < 0.5,
                "{what}: greedy step {i} chose {ours}, golden {want} with margin {}",
                margins[i]
            );
            mismatches += 1;
        }
        logits = model.forward(&mut s, &[want], false).unwrap().to_vec();
    }
    assert!(
        mismatches <= 3,
        "{what}: {mismatches} near-tie greedy mismatches"
    );
}

#[test]
fn hf_packed_checkpoint_matches_golden() {
    check_model(
        "checkpoint_packed",
        "golden_packed.safetensors",
        "golden.json",
        "packed",
    );
}

#[test]
fn hf_master_bf16_checkpoint_matches_golden() {
    check_model(
        "checkpoint_master_bf16",
        "golden_master.safetensors",
        "golden.json",
        "master",
    );
}

#[test]
fn gguf_i2_s_matches_golden() {
    check_model(
        "gguf/tiny-i2_s.gguf",
        "gguf/golden_gguf-i2_s.safetensors",
        "gguf/golden_gguf.json",
        "i2_s",
    );
}

#[test]
fn gguf_tq2_0_matches_golden() {
    check_model(
        "gguf/tiny-tq2_0.gguf",
        "gguf/golden_gguf-tq2_0.safetensors",
        "gguf/golden_gguf.json",
        "tq2_0",
    );
}

#[test]
fn gguf_tq1_0_matches_golden() {
    check_model(
        "gguf/tiny-tq1_0.gguf",
        "gguf/golden_gguf-tq1_0.safetensors",
        "gguf/golden_gguf.json",
        "tq1_0",
    );
}

/// `--tq1-native`: the TQ1_0 matrices are used as stored (from the file map, no heap copy) with
/// the codes and scales of the repacked load, and the logits meet the same golden bars through
/// the TQ1_0 kernels (prompts of 7 and 64 tokens take the blocked GEMM, greedy steps the
/// one-token path).
#[test]
fn gguf_tq1_0_native_matches_golden() {
    use bitnet_engine::model::LoadOptions;
    use bitnet_kernels::ternary::Layout;
    let path = data_dir().join("gguf/tiny-tq1_0.gguf");
    let opts = LoadOptions {
        tq1_native: true,
        ..Default::default()
    };
    let native = Model::load_with(&path, &opts).unwrap();
    let repacked = Model::load(&path).unwrap();
    let mut kept = 0;
    for (a, b) in repacked.weights.linears().zip(native.weights.linears()) {
        if b.layout == Layout::Tq1 {
            kept += 1;
            assert!(b.data.is_mapped(), "{}", b.name);
            assert_eq!(a.layout, Layout::I2s);
        }
        assert_eq!(a.beta.to_bits(), b.beta.to_bits(), "{}", b.name);
        for r in 0..a.rows {
            for c in 0..a.cols {
                assert_eq!(a.value(r, c), b.value(r, c), "{} [{r}, {c}]", b.name);
            }
        }
    }
    assert!(kept >= 5, "only {kept} matrices kept as TQ1_0");
    assert!(native.weights.ternary_bytes_held() < repacked.weights.ternary_bytes_held());
    // Both kernels give exact integer sums: the logits are the same bits.
    for p in ["len1", "len7", "len64"] {
        let toks = prompt(p);
        let run = |m: &Model| {
            m.forward(&mut m.new_session(128), &toks, true)
                .unwrap()
                .to_vec()
        };
        let (a, b) = (run(&repacked), run(&native));
        assert!(
            a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{p}"
        );
    }
    check_model_with(
        "gguf/tiny-tq1_0.gguf",
        "gguf/golden_gguf-tq1_0.safetensors",
        "gguf/golden_gguf.json",
        "tq1_0",
        &opts,
    );
}

/// Per-op checks on the len7 intermediates (threshold 1): int8 activations exact (a mismatch
/// is allowed only where x*s lies within 1e-4 of a rounding boundary), activation scales
/// exact, and each projection within rtol 1e-5 of the golden given the golden input.
fn check_ops(model_rel: &str, hidden_rel: &str) {
    let model = Model::load(&data_dir().join(model_rel)).unwrap();
    let h = load_tensors(hidden_rel);
    let c = &model.config;
    let nt = 7;
    let mut checked_int8 = 0;
    for (l, w) in model.weights.layers.iter().enumerate() {
        let key = |s: &str| format!("layer.{l}.{s}");
        // Which golden tensor is the input of each BitLinear. (Without sub-norms, o_proj reads
        // the attention output and down_proj the gated product.)
        let (o_in, down_in) = if c.sub_norms {
            ("self_attn.attn_sub_norm", "mlp.ffn_sub_norm")
        } else {
            ("self_attn.attn_core_out", "mlp.act_times_up")
        };
        let cases = [
            (
                "self_attn.q_proj",
                "input_layernorm",
                vec![
                    ("self_attn.q_proj", &w.wq),
                    ("self_attn.k_proj", &w.wk),
                    ("self_attn.v_proj", &w.wv),
                ],
            ),
            ("self_attn.o_proj", o_in, vec![("self_attn.o_proj", &w.wo)]),
            (
                "mlp.gate_proj",
                "post_attention_layernorm",
                vec![("mlp.gate_proj", &w.w_gate), ("mlp.up_proj", &w.w_up)],
            ),
            ("mlp.down_proj", down_in, vec![("mlp.down_proj", &w.w_down)]),
        ];
        for (act_name, input_name, projections) in cases {
            let x = &h
                .get(&key(input_name))
                .unwrap_or_else(|| panic!("{hidden_rel}: no {}", key(input_name)))
                .1;
            let cols = x.len() / nt;
            let want_q = &h[&key(&format!("{act_name}.act_q_int8"))].1;
            let want_s = &h[&key(&format!("{act_name}.act_scale"))].1;
            for t in 0..nt {
                let row = &x[t * cols..(t + 1) * cols];
                let mut q = vec![0i8; cols];
                let (s, _) = quantize_row(row, &mut q);
                assert_eq!(
                    s, want_s[t],
                    "layer {l} {act_name} token {t}: activation scale"
                );
                for i in 0..cols {
                    if q[i] as f32 != want_q[t * cols + i] {
                        let frac = (row[i] * s).abs().fract();
                        assert!(
                            (frac - 0.5).abs() < 1e-4,
                            "layer {l} {act_name} token {t} element {i}: int8 {} vs {}",
                            q[i],
                            want_q[t * cols + i]
                        );
                    }
                    checked_int8 += 1;
                }
            }
            for (proj, lin) in projections {
                let got = model.apply_bitlinear(lin, x, nt);
                let want = &h[&key(proj)].1;
                for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-5 * w.abs().max(1.0),
                        "layer {l} {proj} element {i}: {g} vs {w}"
                    );
                }
            }
        }
        // The gating (relu^2 or SiLU) given the golden projections.
        let (g, u, want) = (
            &h[&key("mlp.gate_proj")].1,
            &h[&key("mlp.up_proj")].1,
            &h[&key("mlp.act_times_up")].1,
        );
        for i in 0..want.len() {
            let act = match c.activation {
                Activation::Relu2 => g[i].max(0.0) * g[i].max(0.0),
                Activation::Silu => g[i] / (1.0 + (-g[i]).exp()),
            };
            let err = (act * u[i] - want[i]).abs();
            assert!(
                err <= 1e-5 * want[i].abs() + 1e-6,
                "layer {l} gating element {i}"
            );
        }
    }
    assert!(checked_int8 >= c.n_layer * nt * (c.n_embd * 3 + c.n_ff));
}

#[test]
fn per_op_checks_packed() {
    check_ops("checkpoint_packed", "hidden_len7_packed.safetensors");
}

#[test]
fn per_op_checks_master() {
    check_ops("checkpoint_master_bf16", "hidden_len7_master.safetensors");
}

/// Feeding a prompt in pieces through the KV cache gives exactly the logits of one pass: each
/// position's arithmetic does not depend on the chunking (chat reuses the cache this way).
#[test]
fn chunked_prefill_is_bit_identical_to_one_pass() {
    let model = Model::load(&data_dir().join("gguf/tiny-i2_s.gguf")).unwrap();
    let toks = prompt("len64");
    let mut a = model.new_session(128);
    let whole = model.forward(&mut a, &toks, true).unwrap().to_vec();
    let mut b = model.new_session(128);
    let mut pieces = Vec::new();
    for chunk in [&toks[..5], &toks[5..6], &toks[6..40], &toks[40..]] {
        pieces.extend_from_slice(model.forward(&mut b, chunk, true).unwrap());
    }
    assert_eq!(whole, pieces);
}

/// A prompt longer than `MAX_CHUNK` in one call is split inside `forward`; the result must
/// be exactly that of feeding the pieces one call at a time.
#[test]
fn prompt_longer_than_a_chunk_is_bit_identical_to_pieces() {
    let model = Model::load(&data_dir().join("gguf/tiny-i2_s.gguf")).unwrap();
    let base = prompt("len64");
    let n = 2 * MAX_CHUNK + 3;
    let toks: Vec<u32> = base.iter().cycle().take(n).copied().collect();
    let mut a = model.new_session(n);
    let whole = model.forward(&mut a, &toks, true).unwrap().to_vec();
    let mut b = model.new_session(n);
    let mut pieces = Vec::new();
    for chunk in toks.chunks(MAX_CHUNK - 7) {
        pieces.extend_from_slice(model.forward(&mut b, chunk, true).unwrap());
    }
    assert_eq!(whole.len(), n * model.config.n_vocab);
    assert_eq!(whole, pieces);
}

/// Cross-format rule (golden README): the packed checkpoint and the GGUF files made from the
/// same model have identical ternary codes, scales equal within their storage precision, and
/// logits within cos >= 0.995, mean |d| <= 0.15, max |d| <= 1.0.
#[test]
fn formats_agree_with_each_other() {
    let reference = Model::load(&data_dir().join("checkpoint_packed")).unwrap();
    for (rel, rel_tol) in [
        ("gguf/tiny-i2_s.gguf", 2f32.powi(-8)),
        ("gguf/tiny-tq2_0.gguf", 2f32.powi(-8)),
        ("gguf/tiny-tq1_0.gguf", 2f32.powi(-8)),
        ("checkpoint_master_bf16", 2f32.powi(-8)),
    ] {
        let other = Model::load(&data_dir().join(rel)).unwrap();
        for (a, b) in reference.weights.linears().zip(other.weights.linears()) {
            assert_eq!((a.rows, a.cols), (b.rows, b.cols));
            for r in 0..a.rows {
                for c in 0..a.cols {
                    assert_eq!(a.value(r, c), b.value(r, c), "{rel}: {} [{r}, {c}]", b.name);
                }
            }
            // bf16 (packed) vs f32/f16 storage: both round the same mean|W|; bf16 has 8 bits.
            assert!(
                (a.beta - b.beta).abs() <= rel_tol * a.beta.abs(),
                "{rel}: {} scale {} vs {}",
                b.name,
                b.beta,
                a.beta
            );
        }
        let v = reference.config.n_vocab;
        let toks = prompt("len64");
        let la = reference
            .forward(&mut reference.new_session(128), &toks, true)
            .unwrap()
            .to_vec();
        let lb = other
            .forward(&mut other.new_session(128), &toks, true)
            .unwrap()
            .to_vec();
        let mut sum = 0.0;
        for r in 0..toks.len() {
            let s = compare_row(&lb[r * v..(r + 1) * v], &la[r * v..(r + 1) * v]);
            assert!(
                s.cos >= 0.995 && s.max_abs <= 1.0,
                "{rel}: row {r} cos {} max {}",
                s.cos,
                s.max_abs
            );
            sum += s.sum_abs;
        }
        assert!(
            sum / la.len() as f64 <= 0.15,
            "{rel}: mean |d| {}",
            sum / la.len() as f64
        );
    }
}

#[test]
fn falcon_packed_checkpoint_matches_golden() {
    check_model(
        "../falcon-tiny/checkpoint_packed",
        "../falcon-tiny/golden_packed.safetensors",
        "../falcon-tiny/golden.json",
        "packed",
    );
}

#[test]
fn falcon_master_checkpoint_matches_golden() {
    check_model(
        "../falcon-tiny/checkpoint_master_bf16",
        "../falcon-tiny/golden_master.safetensors",
        "../falcon-tiny/golden.json",
        "master",
    );
}

#[test]
fn falcon_gguf_tq2_0_matches_golden() {
    check_model(
        "../falcon-tiny/falcon-tiny-TQ2_0.gguf",
        "../falcon-tiny/golden_gguf.safetensors",
        "../falcon-tiny/golden.json",
        "gguf",
    );
}

#[test]
fn falcon_per_op_checks() {
    check_ops(
        "../falcon-tiny/checkpoint_packed",
        "../falcon-tiny/hidden_len7_packed.safetensors",
    );
    check_ops(
        "../falcon-tiny/checkpoint_master_bf16",
        "../falcon-tiny/hidden_len7_master.safetensors",
    );
}

#[test]
fn falcon_family_configuration_comes_from_the_files() {
    use bitnet_engine::config::RopeStyle;
    for (rel, rope) in [
        ("../falcon-tiny/checkpoint_packed", RopeStyle::Neox),
        ("../falcon-tiny/falcon-tiny-TQ2_0.gguf", RopeStyle::Adjacent),
    ] {
        let m = Model::load(&data_dir().join(rel)).unwrap();
        let c = &m.config;
        assert_eq!(
            (c.activation, c.sub_norms, c.tied_head, c.rope_style),
            (Activation::Silu, false, false, rope),
            "{rel}"
        );
        assert_eq!(
            (c.rope_theta, c.rms_eps, c.head_dim, c.n_head_kv),
            (1000042.0, 1e-6, 32, 4),
            "{rel}"
        );
    }
}

/// Continuous batching: sequences run together give exactly the logits they give alone
/// (every per-token computation is independent of the batch).
/// An f16 KV cache (`--kv-type f16`) rounds keys and values, so the strict single-token bar
/// (1e-4, met by f32) does not apply: the int8 activation after attention can round the
/// other way. Every row, single-token ones included, must still meet the multi-token bars of
/// the golden README (cosine >= 0.998, max |d| <= 0.6, mean <= 0.06, same argmax where the
/// margin > 0.5), and a session cannot silently change cache type.
#[test]
fn f16_kv_cache_meets_the_multi_token_bars() {
    use bitnet_engine::model::{KvType, LoadOptions};
    let opts = LoadOptions {
        kv_type: KvType::F16,
        ..Default::default()
    };
    for (model_rel, golden_rel) in [
        ("gguf/tiny-i2_s.gguf", "gguf/golden_gguf-i2_s.safetensors"),
        ("checkpoint_packed", "golden_packed.safetensors"),
    ] {
        let mut model = Model::load_with(&data_dir().join(model_rel), &opts).unwrap();
        let golden = load_tensors(golden_rel);
        for p in ["len1", "len7", "len64"] {
            let mut s = model.new_session(128);
            assert_eq!(s.kv_type(), KvType::F16);
            let got = model.forward(&mut s, &prompt(p), true).unwrap().to_vec();
            let want = &golden[&format!("{p}.logits_all")].1;
            assert_rows_close(
                &format!("{model_rel} {p} f16 KV"),
                &got,
                want,
                model.config.n_vocab,
            );
        }
        let mut s = model.new_session(16);
        model.kv_type = KvType::F32;
        let err = model.forward(&mut s, &prompt("len7"), false).unwrap_err();
        assert!(err.to_string().contains("KV cache holds f16"), "{err}");
    }
}

#[test]
fn batched_sequences_equal_separate_runs() {
    use bitnet_engine::model::KvType;
    let mut model = Model::load(&data_dir().join("gguf/tiny-tq1_0.gguf")).unwrap();
    for kv in [KvType::F32, KvType::F16] {
        model.kv_type = kv;
        batched_equal_separate(&model);
    }
}

fn batched_equal_separate(model: &Model) {
    use bitnet_engine::model::{BatchItem, Workspace};
    let v = model.config.n_vocab;
    let a: Vec<u32> = prompt("len64")[..20].to_vec();
    let b: Vec<u32> = prompt("len7");
    // Alone: a's prompt then one more token; b's prompt.
    let mut sa = model.new_session(64);
    let alone_a1 = model.forward(&mut sa, &a[..19], false).unwrap().to_vec();
    let alone_a2 = model.forward(&mut sa, &a[19..], false).unwrap().to_vec();
    let mut sb = model.new_session(64);
    let alone_b = model.forward(&mut sb, &b, false).unwrap().to_vec();
    // Together: step 1 has a's prompt alone; step 2 mixes a's decode token with b's prompt.
    let (mut ta, mut tb) = (model.new_session(64), model.new_session(64));
    let mut ws = Workspace::default();
    let l1 = model
        .forward_batch(
            &mut ws,
            &mut [BatchItem {
                session: &mut ta,
                tokens: &a[..19],
            }],
        )
        .unwrap()
        .to_vec();
    assert_eq!(l1, alone_a1);
    let l2 = model
        .forward_batch(
            &mut ws,
            &mut [
                BatchItem {
                    session: &mut ta,
                    tokens: &a[19..],
                },
                BatchItem {
                    session: &mut tb,
                    tokens: &b,
                },
            ],
        )
        .unwrap()
        .to_vec();
    assert_eq!(&l2[..v], &alone_a2[..]);
    assert_eq!(&l2[v..], &alone_b[..]);
    assert_eq!((ta.pos(), tb.pos()), (20, 7));
}
