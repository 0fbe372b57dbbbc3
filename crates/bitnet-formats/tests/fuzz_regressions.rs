//! Regression cases for the GGUF reader, kept from fuzzing (`fuzz/`, target `gguf_reader`).
//!
//! Every file in `tests/data/fuzz/gguf/` goes through the fuzz target's own body,
//! [`check_gguf`]: it must return (Ok or Err), never panic. The files are:
//! - `seed_*`: valid files from `fuzz/make_seeds.py`; they must parse and decode cleanly.
//! - `hostile_*`: hand-made files with one defect each (also from `make_seeds.py
//!   --regressions`); each must be the error listed in [`HOSTILE`].
//! - `corpus_*`: small inputs libFuzzer kept for new coverage; anything goes but a panic.
//! - `crash_*`: inputs that once crashed the harness (none so far).

use bitnet_formats::fuzz_harness::check_gguf;
use bitnet_formats::gguf::parse_header;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn case_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/data/fuzz/gguf")
}

/// All case files, sorted, as (file name, bytes).
fn cases() -> Vec<(String, Vec<u8>)> {
    let dir = case_dir();
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    out
}

fn case(name: &str) -> Vec<u8> {
    let p = case_dir().join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Hostile files and what their error message must contain (every listed piece).
const HOSTILE: &[(&str, &[&str])] = &[
    (
        "huge_tensor_count",
        &["tensor count", "larger than the rest of the file"],
    ),
    (
        "huge_kv_count",
        &["metadata count", "larger than the rest of the file"],
    ),
    (
        "huge_string_length",
        &["metadata key", "larger than the rest of the file"],
    ),
    (
        "huge_array_count",
        &["a.big", "larger than the rest of the file"],
    ),
    (
        "nested_arrays_too_deep",
        &["\"a.deep\"", "nested too deeply"],
    ),
    ("dims_overflow_u64", &["\"t.over\"", "overflow"]),
    ("dims_too_many_elements", &["\"t.big\"", "overflow"]),
    ("zero_dimension", &["\"t.zero\"", "zero dimension"]),
    ("five_dims", &["\"t.five\"", "5 dimensions"]),
    (
        "offset_past_end",
        &["\"t.far\"", "needs bytes", "truncated"],
    ),
    ("offset_overflows", &["\"t.wrap\"", "offset overflows"]),
    ("offset_misaligned", &["\"t.odd\"", "not aligned to 32"]),
    (
        "data_truncated",
        &["\"t.short\"", "needs bytes", "truncated"],
    ),
    (
        "unknown_tensor_type",
        &["\"t.q4\"", "Q4_0", "does not read"],
    ),
    ("unknown_tensor_type_id", &["\"t.what\"", "1000 (unknown)"]),
    (
        "unknown_value_type",
        &["\"a.t13\"", "unknown value type 13"],
    ),
    (
        "unknown_array_type",
        &["\"a.arr\"", "unknown array element type 99"],
    ),
    (
        "alignment_not_power_of_two",
        &["general.alignment", "power of two", "48"],
    ),
    (
        "alignment_zero",
        &["general.alignment", "power of two", "got 0"],
    ),
    (
        "alignment_string",
        &["general.alignment", "power of two", "\"32\""],
    ),
    ("bad_bool", &["\"a.bool\"", "invalid bool byte 2"]),
    ("bad_utf8_key", &["metadata key", "not valid UTF-8"]),
    ("duplicate_key", &["\"a.x\"", "appears twice"]),
    ("duplicate_tensor", &["\"t.dup\"", "appears twice"]),
    (
        "q8_0_row_not_block_multiple",
        &["\"t.q8\"", "Q8_0", "multiple of 32", "33"],
    ),
    (
        "i2_s_not_multiple_of_128",
        &["\"t.i2\"", "I2_S", "multiple of 128"],
    ),
    ("truncated_metadata", &["truncated"]),
    ("bad_magic", &["not a GGUF file", "magic"]),
    ("bad_version", &["unsupported GGUF version 4"]),
];

#[test]
fn every_case_returns_without_panicking() {
    let cases = cases();
    assert!(
        cases.len() >= HOSTILE.len(),
        "{} holds only {} files",
        case_dir().display(),
        cases.len()
    );
    for (name, bytes) in &cases {
        // A panic here fails the test with the harness's message; name the file first.
        let result = std::panic::catch_unwind(|| check_gguf(bytes).map(|c| c.rows_decoded));
        assert!(result.is_ok(), "{name}: the fuzz harness panicked");
    }
}

#[test]
fn seeds_parse_and_decode_cleanly() {
    let mut n = 0;
    for (name, bytes) in cases().iter().filter(|(n, _)| n.starts_with("seed_")) {
        let c = check_gguf(bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(c.decode_errors.is_empty(), "{name}: {:?}", c.decode_errors);
        // Row-blocked tensors decode up to 4 rows, ternary ones also row 0 through ternary_row.
        assert!(c.rows_decoded >= c.header.tensors.len(), "{name}");
        n += 1;
    }
    assert!(n >= 3, "expected seed_* files");

    let c = check_gguf(&case("seed_every_tensor_type.gguf")).unwrap();
    let types: Vec<&str> = c.header.tensors.iter().map(|t| t.dtype.name()).collect();
    assert_eq!(
        types,
        ["F32", "F16", "BF16", "Q8_0", "Q6_K", "TQ1_0", "TQ2_0", "I2_S"]
    );
    // F32 2 rows, F16 2, BF16 1, Q8_0 2, Q6_K 1, TQ1_0 1 + 1, TQ2_0 2 + 1, I2_S 1.
    assert_eq!(c.rows_decoded, 14);
    let c = check_gguf(&case("seed_every_value_type.gguf")).unwrap();
    assert_eq!(c.header.metadata.len(), 27);
}

#[test]
fn hostile_cases_give_the_right_error() {
    for (name, pieces) in HOSTILE {
        let file = format!("hostile_{name}.gguf");
        let err = parse_header(&case(&file)).expect_err(&file).message;
        for p in *pieces {
            assert!(
                err.contains(p),
                "{file}: error {err:?} does not mention {p:?}"
            );
        }
        // The harness gives the same error.
        assert_eq!(check_gguf(&case(&file)).unwrap_err().message, err);
    }
}

#[test]
fn i2_s_code_3_parses_but_does_not_decode() {
    let c = check_gguf(&case("hostile_i2_s_code_3.gguf")).unwrap();
    assert_eq!(c.decode_errors.len(), 1, "{:?}", c.decode_errors);
    assert!(
        c.decode_errors[0].contains("\"t.i2s\"")
            && c.decode_errors[0].contains("invalid I2_S code 3"),
        "{:?}",
        c.decode_errors
    );
}

#[test]
fn every_hostile_file_is_listed() {
    for (name, _) in cases() {
        if let Some(stem) = name
            .strip_prefix("hostile_")
            .and_then(|s| s.strip_suffix(".gguf"))
        {
            assert!(
                stem == "i2_s_code_3" || HOSTILE.iter().any(|(n, _)| *n == stem),
                "{name} has no expected error in HOSTILE"
            );
        }
    }
}

/// A hang found while fuzzing (by reasoning about the parser's cost, not by libFuzzer, whose
/// inputs were capped at 64 KiB): duplicate metadata keys were found by scanning every earlier
/// key, so 200,000 keys (a 4 MB file) took about three minutes. The file is built here rather
/// than kept in tests/data.
#[test]
fn many_metadata_keys_parse_in_linear_time() {
    let n: u64 = 200_000;
    let mut buf = b"GGUF".to_vec();
    buf.extend_from_slice(&3u32.to_le_bytes());
    buf.extend_from_slice(&0u64.to_le_bytes());
    buf.extend_from_slice(&n.to_le_bytes());
    for i in 0..n {
        let key = format!("k{i:07}");
        buf.extend_from_slice(&(key.len() as u64).to_le_bytes());
        buf.extend_from_slice(key.as_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes()); // u8
        buf.push(1);
    }
    let t = Instant::now();
    let h = parse_header(&buf).unwrap();
    assert_eq!(h.metadata.len(), n as usize);
    // Linear parsing takes tens of milliseconds; the quadratic check took minutes.
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());

    // The same file with its last key renamed to the first is still refused.
    let tail = buf.len() - 5 - 8;
    buf[tail..tail + 8].copy_from_slice(b"k0000000");
    let e = parse_header(&buf).unwrap_err().message;
    assert!(e.contains("\"k0000000\" appears twice"), "{e}");
}
