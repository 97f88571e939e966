//! Request framer for header sites: never panics, and framing the input in one read or in reads
//! cut where the first byte says gives the same requests, output and error.
//!
//! `cargo xtask fuzz --minutes N --target http_requests`; the same checks run on stable in
//! `cargo test -p proxy-userspace --lib http1`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| spliced::fuzz::fuzz_check_requests(data));
