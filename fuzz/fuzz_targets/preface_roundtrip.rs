//! PROXY header encoder round trip: derive a header (addresses, ports, optional TLVs) from the
//! input, encode v1 and v2 with `spliced::preface`, and check that an independent parser (`ppp`)
//! reads back exactly what went in, or that v2 refuses exactly the out-of-limit values.
//!
//! The check lives in the library (`src/preface/roundtrip.rs`), compiled for its unit tests and,
//! with `--cfg fuzzing` and the `fuzz` feature, for this target, so both run the same code.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| spliced::fuzz::fuzz_check_roundtrip(data));
