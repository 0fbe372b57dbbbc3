//! The body of the `gguf_reader` fuzz target (`fuzz/fuzz_targets/gguf_reader.rs`), kept here so
//! the regression tests (`tests/fuzz_regressions.rs`, over `tests/data/fuzz/gguf/`) run exactly
//! what the fuzzer ran.
//!
//! Any input may give an error; none may panic, hang or allocate hugely. On top of that the
//! harness checks that the reader and the codecs agree: a tensor that [`parse_header`] accepts
//! lies inside the buffer and has a byte size the row decoders accept. A disagreement is a
//! panic here, which the fuzzer reports as a crash.

use crate::codecs::{dequantize_row, ternary_row};
use crate::error::Result;
use crate::gguf::{parse_header, GgmlType, GgufHeader, TensorInfo};

/// Rows longer than this are not decoded (the harness allocates `ne0` floats per row).
pub const MAX_NE0: u64 = 1 << 16;
/// Rows decoded per tensor.
pub const MAX_ROWS: u64 = 4;

/// What [`check_gguf`] did with an input whose header parsed.
#[derive(Debug)]
pub struct Checked {
    pub header: GgufHeader,
    /// Rows decoded, over all tensors that decoded without error.
    pub rows_decoded: usize,
    /// Decode errors the file itself can cause (code 3 in an I2_S or TQ2_0 tensor), one per
    /// tensor at most.
    pub decode_errors: Vec<String>,
}

/// Parse `buf` as a GGUF file; if that works, describe every metadata value and decode the
/// first rows of every tensor whose rows are at most [`MAX_NE0`] long.
pub fn check_gguf(buf: &[u8]) -> Result<Checked> {
    let header = parse_header(buf)?;
    for (_, v) in &header.metadata {
        // `bitnet info` prints these; they must not panic on any string or array.
        let _ = v.summary();
    }
    let mut rows_decoded = 0;
    let mut decode_errors = Vec::new();
    for t in &header.tensors {
        match decode_tensor(buf, t) {
            Ok(rows) => rows_decoded += rows,
            Err(e) => decode_errors.push(format!("tensor {:?}: {e}", t.name)),
        }
    }
    Ok(Checked {
        header,
        rows_decoded,
        decode_errors,
    })
}

/// Decode the first rows of one tensor; returns the number of rows decoded.
fn decode_tensor(buf: &[u8], t: &TensorInfo) -> Result<usize> {
    let end = t.offset.checked_add(t.size).expect("tensor end overflows");
    assert!(
        end <= buf.len() as u64,
        "parse_header accepted tensor {:?} at {}..{end} in a {}-byte buffer",
        t.name,
        t.offset,
        buf.len()
    );
    let data = &buf[t.offset as usize..end as usize];
    let (ne0, n_rows) = (t.ne0(), t.n_rows());
    if ne0 > MAX_NE0 {
        return Ok(0);
    }
    let ne0 = ne0 as usize;
    let mut decoded = 0;

    if t.dtype != GgmlType::I2_S {
        assert_eq!(
            t.size % n_rows,
            0,
            "tensor {:?}: {} bytes do not split into {n_rows} rows",
            t.name,
            t.size
        );
        let row_bytes = (t.size / n_rows) as usize;
        let mut out = vec![0f32; ne0];
        for (r, row) in data
            .chunks_exact(row_bytes)
            .take(MAX_ROWS as usize)
            .enumerate()
        {
            // The reader accepted the size, so the decoder must accept the row.
            dequantize_row(t.dtype, row, &mut out).unwrap_or_else(|e| {
                panic!(
                    "tensor {:?} row {r} was accepted but does not decode: {e}",
                    t.name
                )
            });
            decoded += 1;
        }
    }

    if matches!(t.dtype, GgmlType::I2_S | GgmlType::TQ1_0 | GgmlType::TQ2_0) {
        let mut codes = vec![0u8; ne0];
        let n_total = t.n_elements() as usize;
        ternary_row(t.dtype, data, ne0, n_total, 0, &mut codes)?;
        assert!(
            codes.iter().all(|&c| c <= 2),
            "tensor {:?}: code above 2",
            t.name
        );
        decoded += 1;
    }
    Ok(decoded)
}
