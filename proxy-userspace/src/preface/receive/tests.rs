//! The receiver against hand-written headers from the spec, our own encoder, and every split.

use std::net::SocketAddr;

use super::super::{Header, UniqueId, encode};
use super::*;

fn sa(s: &str) -> SocketAddr {
    match s.parse() {
        Ok(a) => a,
        Err(e) => panic!("bad test address {s:?}: {e}"),
    }
}

fn complete(header: Received, len: usize) -> Result<Parsed, ReceiveError> {
    Ok(Parsed::Complete { header, len })
}

fn with(version: Version, source: &str, destination: &str) -> Received {
    Received {
        version,
        addresses: Some(Addresses {
            source: sa(source),
            destination: sa(destination),
        }),
    }
}

const KEEP_V1: Received = Received {
    version: Version::V1,
    addresses: None,
};
const KEEP_V2: Received = Received {
    version: Version::V2,
    addresses: None,
};

/// Feeds `header` followed by a hello as every prefix: incomplete until the header's last
/// byte, then always the header with its own length, whatever follows.
fn assert_every_split(header: &[u8], want: Received) {
    let hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfcGET / HTTP/1.1\r\n";
    let input = [header, &hello[..]].concat();
    for at in 0..=input.len() {
        let got = parse(&input[..at]);
        if at < header.len() {
            assert_eq!(got, Ok(Parsed::Incomplete), "prefix of {at} bytes");
        } else {
            assert_eq!(got, complete(want, header.len()), "prefix of {at} bytes");
        }
    }
    fuzz_check_receive(&input);
}

/// Every prefix of `bad` is incomplete or the same error, and the whole gives `error`.
fn assert_refused(bad: &[u8], error: ReceiveError) {
    assert_eq!(parse(bad), Err(error), "{:?}", String::from_utf8_lossy(bad));
    for at in 0..bad.len() {
        let got = parse(&bad[..at]);
        assert!(
            got == Ok(Parsed::Incomplete) || got == Err(error),
            "prefix of {at} bytes gave {got:?}"
        );
    }
    fuzz_check_receive(bad);
}

#[test]
fn v1_tcp4_tcp6_and_unknown() {
    assert_every_split(
        b"PROXY TCP4 192.0.2.7 198.51.100.1 4711 443\r\n",
        with(Version::V1, "192.0.2.7:4711", "198.51.100.1:443"),
    );
    assert_every_split(
        b"PROXY TCP6 2001:db8:c::10 2001:db8::1 65535 0\r\n",
        with(Version::V1, "[2001:db8:c::10]:65535", "[2001:db8::1]:0"),
    );
    assert_every_split(b"PROXY UNKNOWN\r\n", KEEP_V1);
    // The spec: a receiver ignores whatever UNKNOWN is followed by on its line.
    assert_every_split(
        b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",
        KEEP_V1,
    );
}

#[test]
fn v1_longest_line_is_107_bytes() {
    // The spec's worst case: TCP6 with two full-length addresses and 5-digit ports is 104
    // bytes; pad with a long UNKNOWN line to reach exactly 107.
    let mut line = b"PROXY UNKNOWN ".to_vec();
    line.resize(V1_MAX_LEN - 2, b'x');
    line.extend_from_slice(b"\r\n");
    assert_eq!(line.len(), V1_MAX_LEN);
    assert_every_split(&line, KEEP_V1);
    let mut long = b"PROXY UNKNOWN ".to_vec();
    long.resize(V1_MAX_LEN - 1, b'x');
    long.extend_from_slice(b"\r\n");
    assert_refused(&long, ReceiveError::V1TooLong);
    // A line that never ends is refused at 107 bytes, not buffered further.
    let endless = [&b"PROXY "[..], &[b'a'; 200]].concat();
    assert_refused(&endless, ReceiveError::V1TooLong);
}

#[test]
fn v1_malformed_lines() {
    let malformed = |line: &[u8]| {
        let got = parse(line);
        assert!(
            matches!(got, Err(ReceiveError::V1Malformed(_))),
            "{:?} gave {got:?}",
            String::from_utf8_lossy(line)
        );
        fuzz_check_receive(line);
    };
    malformed(b"PROXY TCP4 192.0.2.7 198.51.100.1 4711 443\n");
    malformed(b"PROXY TCP4 192.0.2.7 198.51.100.1 4711\r\n");
    malformed(b"PROXY TCP4 192.0.2.7 198.51.100.1 4711 443 1\r\n");
    malformed(b"PROXY TCP4  192.0.2.7 198.51.100.1 4711 443\r\n");
    malformed(b"PROXY TCP4 2001:db8::1 198.51.100.1 4711 443\r\n");
    malformed(b"PROXY TCP6 192.0.2.7 2001:db8::1 4711 443\r\n");
    malformed(b"PROXY TCP6 fe80::1%eth0 2001:db8::1 4711 443\r\n");
    malformed(b"PROXY TCP4 192.0.2.007 198.51.100.1 4711 443\r\n");
    malformed(b"PROXY TCP4 192.0.2.7 198.51.100.1 04711 443\r\n");
    malformed(b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 443\r\n");
    malformed(b"PROXY TCP4 192.0.2.7 198.51.100.1 +4711 443\r\n");
    malformed(b"PROXY UDP4 192.0.2.7 198.51.100.1 4711 443\r\n");
    malformed(b"PROXY tcp4 192.0.2.7 198.51.100.1 4711 443\r\n");
    malformed(b"PROXY \r\n");
    malformed(b"PROXY TCP4 192.0.2.7 198.51.100.1 47\xff1 443\r\n");
}

#[test]
fn no_header() {
    for bytes in [
        &b"\x16\x03\x01\x02\x00\x01"[..],
        b"GET / HTTP/1.1\r\n",
        b"PROXY\r\n",
        b"PROXYTCP4",
        b"\r\n\r\n\0\r\nQUIx",
        b"\r\n\r\nGET",
    ] {
        assert_refused(bytes, ReceiveError::NoHeader);
    }
    assert_eq!(parse(b""), Ok(Parsed::Incomplete));
    assert_eq!(parse(b"PROX"), Ok(Parsed::Incomplete));
    assert_eq!(parse(b"\r\n\r\n\0\r\nQU"), Ok(Parsed::Incomplete));
}

#[test]
fn looks_like_header_recognises_both_signatures() {
    assert!(looks_like_header(b"PROXY TCP4 1"));
    assert!(looks_like_header(b"PRO"));
    assert!(looks_like_header(&V2_SIGNATURE));
    assert!(looks_like_header(b"\r\n\r\n"));
    assert!(!looks_like_header(b""));
    assert!(!looks_like_header(b"\x16\x03\x01"));
    assert!(!looks_like_header(b"GET / HTTP/1.1\r\n"));
    assert!(!looks_like_header(b"PUT / HTTP/1.1\r\n"));
}

/// A v2 header: signature, ver_cmd, family, then `block` with its length.
fn v2(ver_cmd: u8, family: u8, block: &[u8]) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    out.push(ver_cmd);
    out.push(family);
    out.extend_from_slice(&u16::try_from(block.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(block);
    out
}

const V4_BLOCK: [u8; 12] = [192, 0, 2, 7, 198, 51, 100, 1, 0x12, 0x67, 0x01, 0xbb];

#[test]
fn v2_tcp4_tcp6_local_unspec() {
    let tcp4 = with(Version::V2, "192.0.2.7:4711", "198.51.100.1:443");
    assert_every_split(&v2(0x21, 0x11, &V4_BLOCK), tcp4);
    let mut block6 = Vec::new();
    block6.extend_from_slice(&[
        0x20, 0x01, 0x0d, 0xb8, 0, 0x0c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ]);
    block6.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    block6.extend_from_slice(&[0x12, 0x67, 0x01, 0xbb]);
    assert_every_split(
        &v2(0x21, 0x21, &block6),
        with(Version::V2, "[2001:db8:c::10]:4711", "[2001:db8::1]:443"),
    );
    // LOCAL: the real endpoints, whatever the family and block say (even nonsense).
    assert_every_split(&v2(0x20, 0x00, &[]), KEEP_V2);
    assert_every_split(&v2(0x20, 0x11, &V4_BLOCK), KEEP_V2);
    assert_every_split(&v2(0x20, 0x77, &[1, 2, 3]), KEEP_V2);
    // AF_UNSPEC with PROXY: the real endpoints; TLVs still walked.
    assert_every_split(&v2(0x21, 0x00, &[]), KEEP_V2);
    assert_every_split(&v2(0x21, 0x00, &[0x04, 0, 2, 0, 0]), KEEP_V2);
}

#[test]
fn v2_tlvs_are_skipped_when_well_formed() {
    let mut block = V4_BLOCK.to_vec();
    // NOOP with 3 bytes, AUTHORITY "a.", an empty UNIQUE_ID, and an SSL TLV with sub-TLVs.
    block.extend_from_slice(&[0x04, 0, 3, 0, 0, 0, 0x02, 0, 2, b'a', b'.', 0x05, 0, 0]);
    block.extend_from_slice(&[0x20, 0, 5, 0x01, 0, 0, 0, 0]);
    assert_every_split(
        &v2(0x21, 0x11, &block),
        with(Version::V2, "192.0.2.7:4711", "198.51.100.1:443"),
    );
}

#[test]
fn v2_refusals() {
    assert_refused(&v2(0x11, 0x11, &V4_BLOCK), ReceiveError::V2Version(1));
    assert_refused(&v2(0x31, 0x11, &V4_BLOCK), ReceiveError::V2Version(3));
    assert_refused(&v2(0x22, 0x11, &V4_BLOCK), ReceiveError::V2Command(2));
    for family in [0x12, 0x22, 0x31, 0x32, 0x10, 0x13, 0x41, 0x01] {
        assert_refused(&v2(0x21, family, &V4_BLOCK), ReceiveError::V2Family(family));
    }
    assert_refused(
        &v2(0x21, 0x11, &V4_BLOCK[..11]),
        ReceiveError::V2ShortAddresses,
    );
    assert_refused(&v2(0x21, 0x21, &[0; 35]), ReceiveError::V2ShortAddresses);
    let bad_tlv = |tail: &[u8]| v2(0x21, 0x11, &[&V4_BLOCK[..], tail].concat());
    assert_refused(
        &bad_tlv(&[0x04]),
        ReceiveError::V2BadTlv("truncated TLV header"),
    );
    assert_refused(
        &bad_tlv(&[0x04, 0]),
        ReceiveError::V2BadTlv("truncated TLV header"),
    );
    assert_refused(
        &bad_tlv(&[0x04, 0, 2, 0]),
        ReceiveError::V2BadTlv("a TLV runs past the header"),
    );
    assert_refused(
        &bad_tlv(&[0x03, 0, 3, 0, 0, 0]),
        ReceiveError::V2BadTlv("CRC32C value is not 4 bytes"),
    );
    // Too long is known from the length field alone: the body is never waited for.
    let mut too_long = V2_SIGNATURE.to_vec();
    too_long.extend_from_slice(&[0x21, 0x11, 0x10, 0x01]);
    assert_refused(&too_long, ReceiveError::V2TooLong(16 + 0x1001));
    let mut longest = V2_SIGNATURE.to_vec();
    longest.extend_from_slice(&[0x21, 0x11, 0x10, 0x00]);
    assert_eq!(parse(&longest), Ok(Parsed::Incomplete));
}

/// Our own encoder's output reads back as what went in, with every TLV we send.
#[test]
fn round_trip_through_our_encoder() {
    let id = UniqueId::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
    for (source, destination) in [
        ("192.0.2.7:4711", "198.51.100.1:443"),
        ("[2001:db8:c::10]:50000", "[2001:db8:c::1]:80"),
        ("[::ffff:192.0.2.7]:4711", "[::ffff:192.0.2.1]:443"),
    ] {
        let want = |version| {
            let canon = |s: &str| {
                let a = sa(s);
                SocketAddr::new(a.ip().to_canonical(), a.port())
            };
            Received {
                version,
                addresses: Some(Addresses {
                    source: canon(source),
                    destination: canon(destination),
                }),
            }
        };
        for version in [Version::V1, Version::V2] {
            for tlvs in 0..8u8 {
                let header = Header {
                    authority: (tlvs & 1 != 0).then_some("site1.example"),
                    unique_id: (tlvs & 2 != 0).then_some(id.as_bytes()),
                    crc32c: tlvs & 4 != 0,
                    ..Header::new(sa(source), sa(destination))
                };
                let mut bytes = Vec::new();
                if let Err(e) = encode(version, &header, &mut bytes) {
                    panic!("encoding {header:?}: {e}");
                }
                assert_every_split(&bytes, want(version));
            }
        }
    }
}

#[test]
fn v2_crc32c_is_verified() {
    let header = Header {
        crc32c: true,
        authority: Some("site1.example"),
        ..Header::new(sa("192.0.2.7:4711"), sa("198.51.100.1:443"))
    };
    let mut good = Vec::new();
    if let Err(e) = encode(Version::V2, &header, &mut good) {
        panic!("{e}");
    }
    assert!(matches!(parse(&good), Ok(Parsed::Complete { .. })));
    // Any flipped bit after the command is caught: in the family, the addresses, another TLV
    // or the checksum itself. (A command turned into LOCAL is not: the spec has the receiver
    // discard a LOCAL block unread, and HAProxy does the same.)
    // Zeros follow, so that a longer length field finds bytes to read. The CRC TLV's own type
    // byte is left out: changed, it makes the (optional) checksum absent, which no receiver
    // can tell from a header sent without one.
    let crc_type_at = 16 + 12 + 3 + "site1.example".len();
    for at in (13..good.len()).filter(|&at| at != crc_type_at) {
        let mut bad = [&good[..], &[0; 300]].concat();
        bad[at] ^= 0x01;
        let got = parse(&bad);
        assert!(got.is_err(), "a flipped bit at {at} gave {got:?}");
    }
    // The checksum at its offset: signature 12, ver/fam/len 4, addresses 12, authority TLV.
    let crc_at = crc_type_at + 3;
    let mut bad = good.clone();
    bad[crc_at] ^= 0xff;
    assert_refused(&bad, ReceiveError::Crc32cMismatch);
    // Two CRC TLVs are refused even if both are right.
    let mut block = V4_BLOCK.to_vec();
    block.extend_from_slice(&[0x03, 0, 4, 0, 0, 0, 0, 0x03, 0, 4, 0, 0, 0, 0]);
    assert_refused(
        &v2(0x21, 0x11, &block),
        ReceiveError::V2BadTlv("two CRC32C TLVs"),
    );
}

#[test]
fn fuzz_check_accepts_odd_inputs() {
    for input in [
        &b""[..],
        b"P",
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\nrest",
        &[0x0d; 300],
        b"\r\n\r\n\0\r\nQUIT\n\x21\x21\x00\x24",
    ] {
        fuzz_check_receive(input);
    }
}
