//! Hostile and broken model files: each must give a one-line error that names the file and the
//! tensor or key at fault. Never a panic, an out-of-bounds read or a huge allocation.

use bitnet_engine::Model;
use bitnet_formats::gguf::{parse_header, GgufWriter};
use bitnet_formats::MetaValue;
use std::path::{Path, PathBuf};

fn data(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data/tiny")
        .join(rel)
}

/// A scratch directory, removed when the test ends.
fn tmp_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("bitnet-bad-{name}-"))
        .tempdir()
        .unwrap()
}

/// Rebuild a GGUF file through our writer so one thing can be changed.
fn rewrite(src: &Path, edit: impl FnOnce(&mut GgufWriter)) -> Vec<u8> {
    let bytes = std::fs::read(src).unwrap();
    let h = parse_header(&bytes).unwrap();
    let mut w = GgufWriter {
        version: h.version,
        alignment: h.alignment,
        metadata: h.metadata.clone(),
        tensors: Vec::new(),
    };
    for t in &h.tensors {
        let d = bytes[t.offset as usize..(t.offset + t.size) as usize].to_vec();
        w.tensors
            .push((t.name.clone(), t.dims.clone(), t.dtype.id(), d));
    }
    edit(&mut w);
    w.to_bytes()
}

fn load_err(path: &Path) -> String {
    let msg = match Model::load(path) {
        Ok(_) => panic!("{} loaded although it is broken", path.display()),
        Err(e) => e.to_string(),
    };
    assert!(!msg.contains('\n'), "error is not one line: {msg}");
    assert!(
        msg.contains(&path.display().to_string()),
        "error does not name the file: {msg}"
    );
    msg
}

#[test]
fn rewritten_file_still_loads() {
    // The harness itself must not break a good file, or the tests below prove nothing.
    let d = tmp_dir("ok");
    let p = d.path().join("same.gguf");
    std::fs::write(&p, rewrite(&data("gguf/tiny-i2_s.gguf"), |_| {})).unwrap();
    Model::load(&p).unwrap();
}

#[test]
fn truncated_files() {
    let d = tmp_dir("trunc");
    let bytes = std::fs::read(data("gguf/tiny-tq2_0.gguf")).unwrap();
    for (i, cut) in [0, 3, 10, 100, 5000, bytes.len() / 2, bytes.len() - 100]
        .into_iter()
        .enumerate()
    {
        let p = d.path().join(format!("cut{i}.gguf"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let msg = load_err(&p);
        assert!(
            msg.contains("truncated") || msg.contains("not a model") || msg.contains("too short"),
            "cut at {cut}: {msg}"
        );
    }
}

#[test]
fn tensor_past_the_end_names_the_tensor() {
    let d = tmp_dir("past");
    let mut bytes = std::fs::read(data("gguf/tiny-i2_s.gguf")).unwrap();
    let h = parse_header(&bytes).unwrap();
    let last = h.tensors.iter().max_by_key(|t| t.offset).unwrap().clone();
    bytes.truncate(last.offset as usize + 10);
    let p = d.path().join("past.gguf");
    std::fs::write(&p, &bytes).unwrap();
    let msg = load_err(&p);
    assert!(msg.contains(&last.name), "{msg}");
}

#[test]
fn unknown_tensor_type() {
    let d = tmp_dir("type");
    let p = d.path().join("type.gguf");
    std::fs::write(
        &p,
        rewrite(&data("gguf/tiny-i2_s.gguf"), |w| w.tensors[3].2 = 12),
    )
    .unwrap();
    let msg = load_err(&p);
    assert!(
        msg.contains("Q4_K") && msg.contains("does not read"),
        "{msg}"
    );
}

#[test]
fn overflowing_dimension() {
    let d = tmp_dir("dims");
    let p = d.path().join("dims.gguf");
    std::fs::write(
        &p,
        rewrite(&data("gguf/tiny-i2_s.gguf"), |w| {
            w.tensors[0].1 = vec![u64::MAX / 2, 4]
        }),
    )
    .unwrap();
    assert!(load_err(&p).contains("overflow"));
}

#[test]
fn missing_tensor() {
    let d = tmp_dir("missing");
    let p = d.path().join("missing.gguf");
    std::fs::write(
        &p,
        rewrite(&data("gguf/tiny-i2_s.gguf"), |w| {
            w.tensors.retain(|t| t.0 != "blk.2.ffn_up.weight")
        }),
    )
    .unwrap();
    assert!(load_err(&p).contains("missing tensor \"blk.2.ffn_up.weight\""));
}

#[test]
fn shape_that_does_not_match_the_hyperparameters() {
    let d = tmp_dir("shape");
    let p = d.path().join("shape.gguf");
    std::fs::write(
        &p,
        rewrite(&data("gguf/tiny-i2_s.gguf"), |w| {
            for (k, v) in w.metadata.iter_mut() {
                if k == "bitnet-25.feed_forward_length" {
                    *v = MetaValue::U32(512);
                }
            }
        }),
    )
    .unwrap();
    let msg = load_err(&p);
    assert!(
        msg.contains("ffn_gate.weight") && msg.contains("shape"),
        "{msg}"
    );
}

#[test]
fn metadata_of_the_wrong_type_or_absent() {
    let d = tmp_dir("meta");
    let p = d.path().join("meta.gguf");
    std::fs::write(
        &p,
        rewrite(&data("gguf/tiny-i2_s.gguf"), |w| {
            for (k, v) in w.metadata.iter_mut() {
                if k == "bitnet-25.block_count" {
                    *v = MetaValue::Str("four".into());
                }
            }
        }),
    )
    .unwrap();
    assert!(load_err(&p).contains("bitnet-25.block_count"));
    let p = d.path().join("noarch.gguf");
    std::fs::write(
        &p,
        rewrite(&data("gguf/tiny-i2_s.gguf"), |w| {
            w.metadata.retain(|(k, _)| k != "general.architecture")
        }),
    )
    .unwrap();
    assert!(load_err(&p).contains("general.architecture"));
    let p = d.path().join("hugeheads.gguf");
    std::fs::write(
        &p,
        rewrite(&data("gguf/tiny-i2_s.gguf"), |w| {
            for (k, v) in w.metadata.iter_mut() {
                if k == "bitnet-25.context_length" {
                    *v = MetaValue::U64(u64::MAX);
                }
            }
        }),
    )
    .unwrap();
    assert!(load_err(&p).contains("context length"));
}

#[test]
fn invalid_i2_s_code() {
    let d = tmp_dir("code3");
    let p = d.path().join("code3.gguf");
    std::fs::write(
        &p,
        rewrite(&data("gguf/tiny-i2_s.gguf"), |w| {
            let t = w
                .tensors
                .iter_mut()
                .find(|t| t.0 == "blk.0.attn_q.weight")
                .unwrap();
            t.3[7] = 0xFF;
        }),
    )
    .unwrap();
    let msg = load_err(&p);
    assert!(
        msg.contains("blk.0.attn_q.weight") && msg.contains("code 3"),
        "{msg}"
    );
}

#[test]
fn all_zero_ternary_tensor_warns() {
    let d = tmp_dir("zero");
    let p = d.path().join("zero.gguf");
    std::fs::write(
        &p,
        rewrite(&data("gguf/tiny-i2_s.gguf"), |w| {
            let t = w
                .tensors
                .iter_mut()
                .find(|t| t.0 == "blk.1.ffn_up.weight")
                .unwrap();
            let n = t.3.len() - 32;
            t.3[..n].fill(0x55); // every code 1 = weight 0
        }),
    )
    .unwrap();
    let m = Model::load(&p).unwrap();
    assert!(
        m.warnings
            .iter()
            .any(|w| w.contains("blk.1.ffn_up.weight") && w.contains("all zeros")),
        "{:?}",
        m.warnings
    );
}

#[test]
fn broken_hf_directories() {
    let d = tmp_dir("hf");
    // config.json that is not JSON.
    std::fs::write(d.path().join("config.json"), "{ not json").unwrap();
    assert!(load_err(d.path()).contains("config.json"));
    // Valid config, truncated safetensors.
    std::fs::copy(
        data("checkpoint_packed/config.json"),
        d.path().join("config.json"),
    )
    .unwrap();
    let st = std::fs::read(data("checkpoint_packed/model.safetensors")).unwrap();
    std::fs::write(d.path().join("model.safetensors"), &st[..st.len() / 2]).unwrap();
    assert!(load_err(d.path()).contains("model.safetensors"));
    // A config whose sizes do not match the tensors.
    let cfg = std::fs::read_to_string(data("checkpoint_packed/config.json"))
        .unwrap()
        .replace("\"intermediate_size\": 688", "\"intermediate_size\": 700");
    std::fs::write(d.path().join("config.json"), cfg).unwrap();
    std::fs::write(d.path().join("model.safetensors"), &st).unwrap();
    let msg = load_err(d.path());
    assert!(msg.contains("gate_proj") && msg.contains("shape"), "{msg}");
    // Missing weights file.
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    assert!(load_err(d.path()).contains("model.safetensors"));
}

#[test]
fn out_of_vocabulary_token_and_overlong_prompt() {
    let m = Model::load(&data("gguf/tiny-tq1_0.gguf")).unwrap();
    let mut s = m.new_session(8);
    assert!(m
        .forward(&mut s, &[1, 1024], false)
        .unwrap_err()
        .to_string()
        .contains("1024"));
    assert!(m
        .forward(&mut s, &[1; 9], false)
        .unwrap_err()
        .to_string()
        .contains("context"));
    // The session is still usable after the errors.
    m.forward(&mut s, &[1, 2, 3], false).unwrap();
}

/// A TQ1_0 matrix is one ternary matrix with one scale: a block with another scale is an error
/// naming the tensor, both repacked and used as stored (`--tq1-native`). A block of only zero
/// weights may carry any scale (converters write its own absmax, 0).
#[test]
fn tq1_0_block_scales_must_agree() {
    use bitnet_engine::model::LoadOptions;
    let d = tmp_dir("tq1scale");
    let src = data("gguf/tiny-tq1_0.gguf");
    let name = "blk.0.attn_q.weight";
    let edit_block = |zero_codes: bool| {
        rewrite(&src, |w| {
            let t = w.tensors.iter_mut().find(|t| t.0 == name).unwrap();
            assert_eq!(t.2, 34, "{name} is TQ1_0");
            let blk = &mut t.3[5 * 54..6 * 54];
            if zero_codes {
                blk[..48].fill(0x80); // five zero weights (trit 1) per byte
                blk[48..52].fill(0x7F); // four per byte
            }
            let d = half::f16::from_le_bytes([blk[52], blk[53]]).to_f32();
            blk[52..54].copy_from_slice(&half::f16::from_f32(d * 1.5 + 0.25).to_le_bytes());
        })
    };
    let native = LoadOptions {
        tq1_native: true,
        ..Default::default()
    };
    let p = d.path().join("scale.gguf");
    std::fs::write(&p, edit_block(false)).unwrap();
    let msg = load_err(&p);
    assert!(
        msg.contains(name) && msg.contains("different scales"),
        "{msg}"
    );
    let msg = Model::load_with(&p, &native).err().unwrap().to_string();
    assert!(
        msg.contains(name) && msg.contains("different scales"),
        "{msg}"
    );
    let p = d.path().join("zero-block.gguf");
    std::fs::write(&p, edit_block(true)).unwrap();
    let a = Model::load(&p).unwrap();
    let b = Model::load_with(&p, &native).unwrap();
    let (la, lb) = (&a.weights.layers[0].wq, &b.weights.layers[0].wq);
    assert_eq!(la.beta, lb.beta);
    assert!((0..la.cols).all(|c| la.value(5, c) == 0 && lb.value(5, c) == 0));
}

/// TQ2_0 matrices are used from the file as they are, so the load checks their blocks: code 3
/// is an error naming the tensor and where the code is, and so is a block with another scale.
#[test]
fn tq2_0_blocks_are_checked() {
    let d = tmp_dir("tq2");
    let src = data("gguf/tiny-tq2_0.gguf");
    let name = "blk.0.attn_q.weight";
    let edit = |f: fn(&mut [u8])| {
        rewrite(&src, |w| {
            let t = w.tensors.iter_mut().find(|t| t.0 == name).unwrap();
            assert_eq!(t.2, 35, "{name} is TQ2_0");
            f(&mut t.3[5 * 66..6 * 66]); // block 5: row 5 of this 256-column matrix
        })
    };
    let p = d.path().join("code3.gguf");
    std::fs::write(&p, edit(|b| b[7] |= 0b1100_0000)).unwrap();
    let msg = load_err(&p);
    assert!(
        msg.contains(name) && msg.contains("code 3") && msg.contains("block 0 of row 5"),
        "{msg}"
    );
    let p = d.path().join("scale.gguf");
    std::fs::write(
        &p,
        edit(|b| {
            let v = half::f16::from_le_bytes([b[64], b[65]]).to_f32();
            b[64..66].copy_from_slice(&half::f16::from_f32(v * 1.5 + 0.25).to_le_bytes());
        }),
    )
    .unwrap();
    let msg = load_err(&p);
    assert!(
        msg.contains(name) && msg.contains("different scales"),
        "{msg}"
    );
}
