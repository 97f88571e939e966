//! PROXY header receiver (a trusted balancer's header in front of the hello): parse the input
//! whole and as prefixes, and check that split reads agree, a header never depends on the bytes
//! after it, the length limits hold, and announced addresses survive our own encoder.
//!
//! The check lives in the library (`src/preface/receive.rs`), compiled for its unit tests and,
//! with `--cfg fuzzing`, for this target, so both run the same code.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| spliced::fuzz::fuzz_check_receive(data));
