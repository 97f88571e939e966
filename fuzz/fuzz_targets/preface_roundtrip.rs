//! PROXY header encoder round trip: derive a header (addresses, ports, optional TLVs) from the
//! input, encode v1 and v2 with `spliced::preface`, and check that an independent parser (`ppp`)
//! reads back exactly what went in, or that v2 refuses exactly the out-of-limit values.
//!
//! The check itself lives in the library (`src/preface/roundtrip.rs`, compiled there only under
//! `cfg(test)` because `ppp` is a dev-dependency) and is included here by path, so the unit
//! tests and the fuzzer run the same code.
#![no_main]

use libfuzzer_sys::fuzz_target;
// Brought into the crate root because the shared check reaches them through `super::`.
#[allow(unused_imports)]
use spliced::preface::{
    ALPN_MAX_LEN, AUTHORITY_MAX_LEN, EncodeError, Header, UNIQUE_ID_MAX_LEN, V1_MAX_LEN, Version,
    encode, encode_v1, encode_v2,
};

#[path = "../../proxy-userspace/src/preface/roundtrip.rs"]
#[allow(dead_code)]
mod roundtrip;

fuzz_target!(|data: &[u8]| {
    roundtrip::fuzz_check_roundtrip(data);
});
