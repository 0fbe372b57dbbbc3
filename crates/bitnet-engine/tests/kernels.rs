//! The fast kernels at the model level: every ISA this CPU runs gives the scalar reference's
//! logits (ternary sums are exact; only the float head's summation order differs), and the
//! requantized Q8_0 head stays close to the stored F16 one.

use bitnet_engine::model::{HeadType, LoadOptions};
use bitnet_engine::Model;
use bitnet_kernels::Isa;
use std::path::PathBuf;

fn tiny(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/data/tiny")
        .join(rel)
}

const TOKENS: &[u32] = &[1, 17, 42, 300, 7, 999, 5, 64, 128, 3, 77];

fn all_logits(m: &Model) -> Vec<f32> {
    let mut s = m.new_session(64);
    let mut out = m.forward(&mut s, TOKENS, true).unwrap().to_vec();
    // Then two decode steps, as generation does.
    for &t in &[11u32, 12] {
        out.extend_from_slice(m.forward(&mut s, &[t], false).unwrap());
    }
    out
}

struct Diff {
    max_abs: f32,
    mean_abs: f32,
    min_cos: f32,
    argmax_same: usize,
    rows: usize,
}

fn diff(a: &[f32], b: &[f32], v: usize) -> Diff {
    let mut d = Diff {
        max_abs: 0.0,
        mean_abs: 0.0,
        min_cos: 1.0,
        argmax_same: 0,
        rows: a.len() / v,
    };
    let argmax = |x: &[f32]| {
        x.iter()
            .enumerate()
            .max_by(|p, q| p.1.total_cmp(q.1))
            .unwrap()
            .0
    };
    for (ra, rb) in a.chunks(v).zip(b.chunks(v)) {
        let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
        for (&x, &y) in ra.iter().zip(rb) {
            d.max_abs = d.max_abs.max((x - y).abs());
            d.mean_abs += (x - y).abs() / a.len() as f32;
            dot += x as f64 * y as f64;
            na += x as f64 * x as f64;
            nb += y as f64 * y as f64;
        }
        d.min_cos = d.min_cos.min((dot / (na.sqrt() * nb.sqrt())) as f32);
        d.argmax_same += usize::from(argmax(ra) == argmax(rb));
    }
    d
}

#[test]
fn every_isa_gives_the_scalar_logits() {
    for rel in [
        "gguf/tiny-i2_s.gguf",
        "gguf/tiny-tq2_0.gguf",
        "checkpoint_packed",
    ] {
        let mut m = Model::load(&tiny(rel)).unwrap();
        m.isa = Isa::Scalar;
        let want = all_logits(&m);
        for isa in Isa::all_available() {
            m.isa = isa;
            let got = all_logits(&m);
            let d = diff(&got, &want, m.config.n_vocab);
            assert!(
                d.max_abs < 1e-4 && d.argmax_same == d.rows,
                "{rel} {}: max |d| {}",
                isa.name(),
                d.max_abs
            );
        }
    }
}

#[test]
fn head_type_names_parse() {
    assert_eq!("f16".parse::<HeadType>().unwrap(), HeadType::F16);
    assert_eq!("Q8_0".parse::<HeadType>().unwrap(), HeadType::Q8_0);
    assert_eq!("q6_k".parse::<HeadType>().unwrap(), HeadType::Q6_K);
    let e = "q4_0".parse::<HeadType>().unwrap_err().to_string();
    assert!(e.contains("q4_0") && e.contains("q8_0"), "{e}");
}

/// The cost of the requantized heads on the tiny golden model (printed with `--nocapture`):
/// logits against the stored F16 head, at every prompt position and two decode steps. Q8_0
/// moves a weight by at most 1/254 of its block's largest, Q6_K by 1/64 of its 16-group's
/// scale: the Q6_K bars are four times looser.
#[test]
fn requantized_heads_stay_close_to_the_f16_head() {
    let path = tiny("gguf/tiny-i2_s.gguf");
    let f16 = Model::load(&path).unwrap();
    assert_eq!(f16.weights.head_type_name(), "F16");
    let a = all_logits(&f16);
    let load = |t| {
        let opts = LoadOptions {
            head_type: Some(t),
            ..LoadOptions::default()
        };
        Model::load_with(&path, &opts).unwrap()
    };
    for (t, name, max_abs, min_cos) in [
        (HeadType::Q8_0, "Q8_0 (requantized)", 0.1, 0.9999),
        (HeadType::Q6_K, "Q6_K (requantized)", 0.4, 0.9996),
    ] {
        let m = load(t);
        assert_eq!(m.weights.head_type_name(), name);
        let d = diff(&all_logits(&m), &a, f16.config.n_vocab);
        eprintln!(
            "{name} vs f16 head, tiny model, {} rows: max |d| {:.5}, mean |d| {:.6}, min cos {:.7}, same argmax {}/{}",
            d.rows, d.max_abs, d.mean_abs, d.min_cos, d.argmax_same, d.rows
        );
        assert!(
            d.min_cos > min_cos && d.max_abs < max_abs,
            "{name}: {}",
            d.max_abs
        );
        assert!(d.argmax_same >= d.rows - 1, "{name}");
    }

    // "f16" keeps the head as stored.
    assert_eq!(all_logits(&load(HeadType::F16)), a);
}

/// The requantized Q6_K head through the engine's matmul (the fast kernel this CPU has)
/// against its own rows decoded by the format codec and multiplied in f64.
#[test]
fn q6_k_head_matmul_matches_its_decoded_rows() {
    use bitnet_engine::weights::RequantizedHead;
    let path = tiny("gguf/tiny-i2_s.gguf");
    let opts = LoadOptions {
        head_type: Some(HeadType::Q6_K),
        ..LoadOptions::default()
    };
    let m = Model::load_with(&path, &opts).unwrap();
    let Some(RequantizedHead::Q6_K(q)) = &m.weights.head_requantized else {
        panic!("no Q6_K head");
    };
    let mut row = vec![0f32; q.cols];
    let x: Vec<f32> = (0..q.cols)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
        .collect();
    let mut out = vec![0f32; q.rows];
    q.matmul(m.isa, &x, 1, &mut out);
    for r in (0..q.rows).step_by(97) {
        q.row(r, &mut row);
        let exact: f64 = row.iter().zip(&x).map(|(&w, &v)| w as f64 * v as f64).sum();
        let bound: f64 = row
            .iter()
            .zip(&x)
            .map(|(&w, &v)| (w as f64 * v as f64).abs())
            .sum();
        // The input's int8 rounding: at most half a step, 1/254 of max |x| = 1.
        let l1: f64 = row.iter().map(|&w| w.abs() as f64).sum();
        assert!(
            (out[r] as f64 - exact).abs() <= l1 / 254.0 + 1e-5 * bound,
            "row {r}: {} vs {exact}",
            out[r]
        );
    }
}

/// `--no-mmap`: the ternary matrices (used from the file map, or repacked on the heap) and the
/// tied head move into one anonymous mapping, with the same bytes and bit-identical logits; a
/// requantized head leaves the embedding in the map.
#[test]
fn no_mmap_moves_streamed_weights_and_changes_nothing_else() {
    use bitnet_engine::model::HeadType;
    use bitnet_engine::weights::Bytes;
    let opts = |no_mmap, head_type| LoadOptions {
        no_mmap,
        head_type,
        ..Default::default()
    };
    for rel in [
        "gguf/tiny-i2_s.gguf",
        "gguf/tiny-tq2_0.gguf",
        "gguf/tiny-tq1_0.gguf",
        "checkpoint_packed",
    ] {
        let path = tiny(rel);
        let plain = Model::load(&path).unwrap();
        let moved = Model::load_with(&path, &opts(true, None)).unwrap();
        for (a, b) in plain.weights.linears().zip(moved.weights.linears()) {
            assert!(*a.data == *b.data, "{rel}: {}", a.name);
            assert!(
                matches!(b.data, Bytes::Anon(..)),
                "{rel}: {} not moved",
                a.name
            );
        }
        assert!(
            moved.weights.head.is_none(),
            "{rel}: the tiny models tie the head"
        );
        assert!(matches!(moved.weights.embed.data, Bytes::Anon(..)), "{rel}");
        assert!(
            *moved.weights.embed.data == *plain.weights.embed.data,
            "{rel}"
        );
        assert_eq!(all_logits(&moved), all_logits(&plain), "{rel}");

        let q8 = Model::load_with(&path, &opts(true, Some(HeadType::Q8_0))).unwrap();
        assert!(!matches!(q8.weights.embed.data, Bytes::Anon(..)), "{rel}");
        let plain_q8 = Model::load_with(&path, &opts(false, Some(HeadType::Q8_0))).unwrap();
        assert_eq!(all_logits(&q8), all_logits(&plain_q8), "{rel}");
    }
}
