//! ClientHello parser: never panics, and a prefix of the input (cut where the first byte says)
//! either needs more bytes or gives the same answer as the whole input.
//!
//! `cargo xtask fuzz --minutes N --target hello_tls`; the same checks run on stable in
//! `cargo test -p proxy-userspace --lib hello`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| spliced::fuzz::fuzz_check_tls(data));
