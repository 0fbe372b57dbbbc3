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

/// The cost of the 8-bit head on the tiny golden model (printed with `--nocapture`): logits
/// against the stored F16 head, at every prompt position and two decode steps.
#[test]
fn q8_0_head_stays_close_to_the_f16_head() {
    let path = tiny("gguf/tiny-i2_s.gguf");
    let f16 = Model::load(&path).unwrap();
    let opts = LoadOptions {
        head_type: Some(HeadType::Q8_0),
        ..LoadOptions::default()
    };
    let q8 = Model::load_with(&path, &opts).unwrap();
    assert_eq!(q8.weights.head_type_name(), "Q8_0 (requantized)");
    assert_eq!(f16.weights.head_type_name(), "F16");
    let (a, b) = (all_logits(&f16), all_logits(&q8));
    let d = diff(&b, &a, f16.config.n_vocab);
    eprintln!(
        "q8_0 vs f16 head, tiny model, {} rows: max |d| {:.5}, mean |d| {:.6}, min cos {:.7}, same argmax {}/{}",
        d.rows, d.max_abs, d.mean_abs, d.min_cos, d.argmax_same, d.rows
    );
    assert!(d.min_cos > 0.9999 && d.max_abs < 0.1, "{}", d.max_abs);
    assert!(d.argmax_same >= d.rows - 1);

    // "f16" keeps the head as stored; q6_k is refused with a clear message.
    let same = Model::load_with(
        &path,
        &LoadOptions {
            head_type: Some(HeadType::F16),
            ..LoadOptions::default()
        },
    )
    .unwrap();
    assert_eq!(all_logits(&same), a);
    let e = Model::load_with(
        &path,
        &LoadOptions {
            head_type: Some(HeadType::Q6_K),
            ..LoadOptions::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("q6_k"), "{e}");
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
