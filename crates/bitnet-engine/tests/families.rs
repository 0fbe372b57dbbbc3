//! Model families that differ from 2B4T only in their files: 1bitLLM's bitnet_b1_58 layout
//! (`model_type: llama`, `BitnetForCausalLM`, sub-norms named `inner_attn_ln` /
//! `ffn_layernorm`), and configs as messy as the real ones (duplicate JSON keys).
//!
//! No golden model of the 1bitLLM layout exists, so these tests build one from the golden
//! `tiny` checkpoint by renaming and re-declaring it: the result must be the same model, with
//! bit-identical logits (the same numbers flow through the same forward pass).

use bitnet_engine::config::Activation;
use bitnet_engine::weights::{hf_scale_direction, ScaleDirection};
use bitnet_engine::Model;
use bitnet_formats::safetensors_dir::HfDir;
use safetensors::tensor::TensorView;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn data(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data")
        .join(rel)
}

/// Copy a checkpoint directory, renaming tensors with `rename` and writing `config`.
fn rewrite_checkpoint(src: &Path, dst: &Path, config: &str, rename: impl Fn(&str) -> String) {
    std::fs::create_dir_all(dst).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, TensorView)> = st
        .iter()
        .map(|(n, v)| {
            let v = TensorView::new(v.dtype(), v.shape().to_vec(), v.data()).unwrap();
            (rename(n), v)
        })
        .collect();
    safetensors::serialize_to_file(views, None, &dst.join("model.safetensors")).unwrap();
    std::fs::write(dst.join("config.json"), config).unwrap();
}

fn logits(path: &Path, tokens: &[u32]) -> Vec<f32> {
    let m = Model::load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut s = m.new_session(64);
    m.forward(&mut s, tokens, true).unwrap().to_vec()
}

fn load_error(path: &Path) -> String {
    match Model::load(path) {
        Ok(_) => panic!("{} loaded, but must be refused", path.display()),
        Err(e) => e.to_string(),
    }
}

const PROMPT: [u32; 7] = [5, 900, 17, 256, 1000, 3, 77];

fn onebitllm_rename(n: &str) -> String {
    n.replace("self_attn.attn_sub_norm", "self_attn.inner_attn_ln")
        .replace("mlp.ffn_sub_norm", "mlp.ffn_layernorm")
}

/// The tiny (2B4T-family) master checkpoint's config.json, re-declared as 1bitLLM declares
/// its models: `model_type: llama`, architecture `BitnetForCausalLM`, no quantization_config
/// (fp16 master weights quantized online).
fn onebitllm_config(hidden_act: &str, architecture: &str) -> String {
    let mut c: Value = serde_json::from_str(
        &std::fs::read_to_string(data("tiny/checkpoint_master_bf16/config.json")).unwrap(),
    )
    .unwrap();
    c["model_type"] = json!("llama");
    c["architectures"] = json!([architecture]);
    c["hidden_act"] = json!(hidden_act);
    c.as_object_mut().unwrap().remove("quantization_config");
    c.to_string()
}

#[test]
fn onebitllm_layout_runs_as_the_bitnet_graph() {
    let src = data("tiny/checkpoint_master_bf16");
    let tmp = tempfile::tempdir().unwrap();
    let dst = tmp.path().join("onebitllm");
    // Keep the golden model's relu² so the two directories describe the same model.
    rewrite_checkpoint(
        &src,
        &dst,
        &onebitllm_config("relu2", "BitnetForCausalLM"),
        onebitllm_rename,
    );
    let m = Model::load(&dst).unwrap();
    assert_eq!(m.config.arch, "bitnet");
    assert!(m.config.sub_norms);
    assert_eq!(m.config.activation, Activation::Relu2);
    drop(m);
    let want = logits(&src, &PROMPT);
    let got = logits(&dst, &PROMPT);
    assert_eq!(got.len(), want.len());
    let differing = got
        .iter()
        .zip(&want)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(differing, 0, "logits differ from the original layout's");

    // As 1bitLLM ships them: SiLU with sub-norms.
    let silu = tmp.path().join("onebitllm-silu");
    rewrite_checkpoint(
        &src,
        &silu,
        &onebitllm_config("silu", "BitnetForCausalLM"),
        onebitllm_rename,
    );
    let m = Model::load(&silu).unwrap();
    assert_eq!(
        (m.config.activation, m.config.sub_norms),
        (Activation::Silu, true)
    );
    let l = logits(&silu, &PROMPT);
    assert!(l.iter().all(|x| x.is_finite()));
    assert_ne!(l, want, "SiLU must change the output of a relu² model");
}

#[test]
fn inconsistent_onebitllm_declarations_are_errors() {
    let src = data("tiny/checkpoint_master_bf16");
    let tmp = tempfile::tempdir().unwrap();
    // Declares BitnetForCausalLM but has transformers' sub-norm names: neither layout for sure.
    let a = tmp.path().join("a");
    rewrite_checkpoint(
        &src,
        &a,
        &onebitllm_config("silu", "BitnetForCausalLM"),
        |n| n.to_string(),
    );
    let e = load_error(&a);
    assert!(e.contains("BitnetForCausalLM") && e.contains("lack"), "{e}");
    // A plain Llama model with 1bitLLM sub-norm tensors.
    let b = tmp.path().join("b");
    rewrite_checkpoint(
        &src,
        &b,
        &onebitllm_config("silu", "LlamaForCausalLM"),
        onebitllm_rename,
    );
    let e = load_error(&b);
    assert!(e.contains("plain llama") && e.contains("have"), "{e}");
}

/// HF1BitLLM's config.json lists `quantization_config` twice. Python's json module keeps the
/// last value; so must we (it decides whether the scale multiplies or divides).
#[test]
fn duplicate_json_keys_keep_the_last_value_as_python_does() {
    let src = data("falcon-tiny/checkpoint_packed");
    if !src.exists() {
        panic!("missing fixture {}", src.display());
    }
    let text = std::fs::read_to_string(src.join("config.json")).unwrap();
    let tail = text.trim_end().strip_suffix('}').unwrap().trim_end();
    let tmp = tempfile::tempdir().unwrap();
    let copy = |name: &str, extra: &str| {
        let dst = tmp.path().join(name);
        rewrite_checkpoint(&src, &dst, &format!("{tail},\n  {extra}\n}}\n"), |n| {
            n.to_string()
        });
        dst
    };
    // The file's own quantization_config (no linear_class: divide) comes first, then a second one.
    let multiply_last = copy(
        "multiply-last",
        r#""quantization_config": {"quant_method": "bitnet", "linear_class": "autobitlinear"}"#,
    );
    let divide_last = copy(
        "divide-last",
        r#""quantization_config": {"quant_method": "bitnet", "linear_class": "bitlinear"}"#,
    );
    let dir = |p: &Path| hf_scale_direction(&HfDir::open(p).unwrap()).unwrap();
    assert_eq!(dir(&multiply_last), ScaleDirection::Multiply);
    assert_eq!(dir(&divide_last), ScaleDirection::Divide);
    // And the direction reaches the output: the original (divide) and divide-last agree
    // exactly, multiply-last does not.
    let want = logits(&src, &PROMPT);
    assert_eq!(logits(&divide_last, &PROMPT), want);
    assert_ne!(logits(&multiply_last, &PROMPT), want);
}
