//! Fuzz the GGUF reader: `parse_header` on arbitrary bytes, then the row decoders on the first
//! rows of every tensor it accepts. The body lives in `bitnet_formats::fuzz_harness` so the
//! regression tests (`crates/bitnet-formats/tests/fuzz_regressions.rs`) run the same code.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = bitnet_formats::fuzz_harness::check_gguf(data);
});
