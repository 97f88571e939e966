//! Golden bytes written by hand from the spec's layout, limits, and round trips through an
//! independent parser (`ppp`, see `roundtrip.rs`).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};

use super::roundtrip::{V1_MAX_LEN, check_header, crc32c_bitwise, fuzz_check_roundtrip};
use super::*;

const SIG: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];

fn sa(s: &str) -> SocketAddr {
    match s.parse() {
        Ok(a) => a,
        Err(e) => panic!("bad test address {s:?}: {e}"),
    }
}

fn v1(header: &Header<'_>) -> String {
    let mut out = Vec::new();
    encode_v1(header, &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn v2(header: &Header<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    match encode_v2(header, &mut out) {
        Ok(()) => out,
        Err(e) => panic!("encode_v2 failed: {e}"),
    }
}

/// Bytes 12.. of a v2 header: concatenates the hand-written parts after the signature.
fn v2_bytes(parts: &[&[u8]]) -> Vec<u8> {
    let mut v = SIG.to_vec();
    for p in parts {
        v.extend_from_slice(p);
    }
    v
}

/// Recomputes the CRC32C TLV at `at` (the offset of its 4-byte value) with the `crc32c` crate
/// over the header with that field zeroed, as the spec defines it.
fn assert_crc_field(bytes: &[u8], at: usize) {
    let mut zeroed = bytes.to_vec();
    zeroed[at..at + 4].fill(0);
    let want = crc32c::crc32c(&zeroed);
    assert_eq!(bytes[at..at + 4], want.to_be_bytes());
    assert_eq!(want, crc32c_bitwise(&zeroed));
}

#[test]
fn crc32c_crate_is_castagnoli() {
    // The CRC-32C check value from the catalogue of CRC parameters; CRC-32 (IEEE) gives 0xCBF43926.
    assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(crc32c_bitwise(b"123456789"), 0xE306_9283);
}

#[test]
fn v1_tcp4_golden() {
    let h = Header::new(sa("192.0.2.1:56324"), sa("198.51.100.7:443"));
    assert_eq!(v1(&h), "PROXY TCP4 192.0.2.1 198.51.100.7 56324 443\r\n");
    let h = Header::new(sa("0.0.0.0:0"), sa("255.255.255.255:65535"));
    assert_eq!(v1(&h), "PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n");
}

#[test]
fn v1_tcp6_golden_canonical_text() {
    // Two equal zero runs: RFC 5952 compresses the first; single zero groups stay "0".
    let h = Header::new(sa("[2001:db8::1]:65535"), sa("[2001:db8:0:0:1:0:0:10]:443"));
    assert_eq!(
        v1(&h),
        "PROXY TCP6 2001:db8::1 2001:db8::1:0:0:10 65535 443\r\n"
    );
    let h = Header::new(sa("[2001:DB8:0:1:0:0:0:1]:0"), sa("[::]:8443"));
    assert_eq!(v1(&h), "PROXY TCP6 2001:db8:0:1::1 :: 0 8443\r\n");
    // IPv4-compatible (not mapped) addresses are IPv6 and stay TCP6.
    let h = Header::new(sa("[::c000:201]:1"), sa("[::1]:2"));
    assert_eq!(v1(&h), "PROXY TCP6 ::c000:201 ::1 1 2\r\n");
}

#[test]
fn v1_mapped_is_tcp4() {
    let h = Header::new(
        sa("[::ffff:192.0.2.1]:40000"),
        sa("[::ffff:198.51.100.7]:443"),
    );
    assert_eq!(v1(&h), "PROXY TCP4 192.0.2.1 198.51.100.7 40000 443\r\n");
    let h = Header::new(sa("[::ffff:192.0.2.1]:40000"), sa("198.51.100.7:443"));
    assert_eq!(v1(&h), "PROXY TCP4 192.0.2.1 198.51.100.7 40000 443\r\n");
}

#[test]
fn v1_mixed_families_map_ipv4_into_tcp6() {
    let h = Header::new(sa("[::ffff:192.0.2.1]:40000"), sa("[2001:db8::443]:443"));
    assert_eq!(
        v1(&h),
        "PROXY TCP6 ::ffff:192.0.2.1 2001:db8::443 40000 443\r\n"
    );
    let h = Header::new(sa("[2001:db8::7]:40000"), sa("198.51.100.7:80"));
    assert_eq!(
        v1(&h),
        "PROXY TCP6 2001:db8::7 ::ffff:198.51.100.7 40000 80\r\n"
    );
}

#[test]
fn v1_ignores_tlv_fields_and_scope_ids() {
    let mut h = Header::new(
        SocketAddr::V6(SocketAddrV6::new(
            "fe80::1".parse().unwrap_or(Ipv6Addr::UNSPECIFIED),
            1234,
            7,
            3,
        )),
        sa("[fe80::2]:443"),
    );
    h.authority = Some("site1.example");
    h.unique_id = Some(&[0; 200]);
    h.crc32c = true;
    assert_eq!(v1(&h), "PROXY TCP6 fe80::1 fe80::2 1234 443\r\n");
    let mut out = Vec::new();
    assert_eq!(encode(Version::V1, &h, &mut out), Ok(()));
    assert_eq!(out, v1(&h).as_bytes());
}

#[test]
fn v1_longest_line_fits_the_spec() {
    let max = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535";
    let h = Header::new(sa(max), sa(max));
    let line = v1(&h);
    assert_eq!(
        line,
        "PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff \
         ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
    );
    assert_eq!(line.len(), 104);
    assert!(line.len() <= V1_MAX_LEN);
    // The longest TCP4 line, for completeness.
    let h = Header::new(sa("255.255.255.255:65535"), sa("255.255.255.255:65535"));
    assert_eq!(v1(&h).len(), 56);
}

#[test]
fn v2_ipv4_golden_no_tlvs() {
    let h = Header::new(sa("192.0.2.1:56324"), sa("198.51.100.7:443"));
    let want = v2_bytes(&[
        &[0x21, 0x11, 0x00, 0x0C],
        &[192, 0, 2, 1],
        &[198, 51, 100, 7],
        &[0xDC, 0x04],
        &[0x01, 0xBB],
    ]);
    assert_eq!(v2(&h), want);
    assert_eq!(want.len(), 28);
}

#[test]
fn v2_ipv4_authority_crc_golden() {
    let mut h = Header::new(sa("192.0.2.1:56324"), sa("198.51.100.7:443"));
    h.authority = Some("site1.example");
    h.crc32c = true;
    let want = v2_bytes(&[
        // 12 address bytes + 3+13 authority + 3+4 crc = 35
        &[0x21, 0x11, 0x00, 0x23],
        &[192, 0, 2, 1, 198, 51, 100, 7, 0xDC, 0x04, 0x01, 0xBB],
        &[0x02, 0x00, 0x0D],
        b"site1.example",
        // CRC32C computed independently (bitwise Castagnoli over the zero-field header).
        &[0x03, 0x00, 0x04, 0x64, 0x79, 0xB8, 0x74],
    ]);
    let got = v2(&h);
    assert_eq!(got, want);
    assert_crc_field(&got, got.len() - 4);
}

#[test]
fn v2_ipv6_all_tlvs_golden() {
    let id = UniqueId::from_u128(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef);
    let h = Header {
        source: sa("[2001:db8::1]:65535"),
        destination: sa("[2001:db8:1::10]:443"),
        authority: Some("site1.example"),
        unique_id: Some(id.as_bytes()),
        crc32c: true,
    };
    let want = v2_bytes(&[
        // 36 + (3+13) + (3+4) + (3+32) = 94
        &[0x21, 0x21, 0x00, 0x5E],
        &[
            0x20, 0x01, 0x0D, 0xB8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01,
        ],
        &[
            0x20, 0x01, 0x0D, 0xB8, 0, 0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ],
        &[0xFF, 0xFF, 0x01, 0xBB],
        &[0x02, 0x00, 0x0D],
        b"site1.example",
        &[0x03, 0x00, 0x04, 0x2C, 0x57, 0x9E, 0x75],
        &[0x05, 0x00, 0x20],
        b"0123456789abcdef0123456789abcdef",
    ]);
    let got = v2(&h);
    assert_eq!(got, want);
    assert_eq!(got.len(), 16 + 94);
    assert_crc_field(&got, 16 + 36 + 16 + 3);
}

#[test]
fn v2_mapped_is_af_inet_and_mixed_is_af_inet6() {
    let h = Header::new(sa("[::ffff:192.0.2.1]:1"), sa("198.51.100.7:2"));
    let want = v2_bytes(&[
        &[0x21, 0x11, 0x00, 0x0C],
        &[192, 0, 2, 1, 198, 51, 100, 7, 0, 1, 0, 2],
    ]);
    assert_eq!(v2(&h), want);

    let h = Header::new(sa("192.0.2.1:1"), sa("[2001:db8::443]:2"));
    let want = v2_bytes(&[
        &[0x21, 0x21, 0x00, 0x24],
        &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF, 192, 0, 2, 1],
        &[
            0x20, 0x01, 0x0D, 0xB8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x04, 0x43,
        ],
        &[0, 1, 0, 2],
    ]);
    assert_eq!(v2(&h), want);
}

#[test]
fn v2_appends_and_crc_covers_only_the_header() {
    let mut h = Header::new(sa("192.0.2.1:56324"), sa("198.51.100.7:443"));
    h.crc32c = true;
    let alone = v2(&h);
    let mut out = b"already here".to_vec();
    assert_eq!(encode(Version::V2, &h, &mut out), Ok(()));
    assert_eq!(&out[..12], b"already here");
    assert_eq!(&out[12..], alone);
    assert_crc_field(&alone, alone.len() - 4);
}

#[test]
fn version_none_appends_nothing() {
    let mut h = Header::new(sa("192.0.2.1:1"), sa("192.0.2.2:2"));
    // Even values v2 would refuse: no header, no error.
    h.unique_id = Some(&[1; 129]);
    let mut out = b"hello".to_vec();
    assert_eq!(encode(Version::None, &h, &mut out), Ok(()));
    assert_eq!(out, b"hello");
    assert_eq!(Version::default(), Version::None);
}

fn v2_result(h: &Header<'_>) -> Result<Vec<u8>, EncodeError> {
    let mut out = vec![0xEE];
    let r = encode_v2(h, &mut out);
    if r.is_err() {
        assert_eq!(out, [0xEE], "an error must leave the buffer as it was");
    }
    r.map(|()| out.split_off(1))
}

#[test]
fn unique_id_limit_is_128() {
    let mut h = Header::new(sa("192.0.2.1:1"), sa("192.0.2.2:2"));
    let id = [b'u'; 129];
    h.unique_id = Some(&id[..128]);
    let ok = v2_result(&h);
    assert!(ok.is_ok());
    check_header(&h);
    h.unique_id = Some(&id);
    assert_eq!(v2_result(&h), Err(EncodeError::UniqueIdTooLong(129)));
    check_header(&h);
}

#[test]
fn authority_limit_is_255_printable_ascii() {
    let name = "a".repeat(256);
    let mut h = Header::new(sa("192.0.2.1:1"), sa("192.0.2.2:2"));
    h.authority = Some(&name[..255]);
    assert!(v2_result(&h).is_ok());
    check_header(&h);
    h.authority = Some(&name);
    assert_eq!(v2_result(&h), Err(EncodeError::AuthorityTooLong(256)));

    for (bad, at) in [
        ("site 1.example", 4),
        ("site1.example\r\n", 13),
        ("\0", 0),
        ("bücher.example", 1),
        ("x\u{7f}", 1),
    ] {
        h.authority = Some(bad);
        assert_eq!(
            v2_result(&h),
            Err(EncodeError::AuthorityNotAscii(at)),
            "{bad:?}"
        );
        check_header(&h);
    }
    // What a Host header may legitimately hold.
    for good in [
        "example.com:8080",
        "[2001:db8::1]:443",
        "xn--bcher-kva.example",
        "~!",
    ] {
        h.authority = Some(good);
        assert!(v2_result(&h).is_ok(), "{good:?}");
        check_header(&h);
    }
}

#[test]
fn empty_values_are_omitted() {
    let bare = Header::new(sa("[2001:db8::1]:1"), sa("[2001:db8::2]:2"));
    let mut h = bare.clone();
    h.authority = Some("");
    h.unique_id = Some(b"");
    assert_eq!(v2_result(&h), v2_result(&bare));
    assert_eq!(v2(&h).len(), 16 + 36);
}

#[test]
fn largest_v2_header() {
    let name = "n".repeat(AUTHORITY_MAX_LEN);
    let h = Header {
        source: sa("[2001:db8::1]:65535"),
        destination: sa("[2001:db8::2]:65535"),
        authority: Some(&name),
        unique_id: Some(&[b'u'; UNIQUE_ID_MAX_LEN]),
        crc32c: true,
    };
    let got = v2(&h);
    assert_eq!(got.len(), 16 + 36 + 258 + 7 + 131);
    assert_eq!(got[14..16], 432u16.to_be_bytes());
    check_header(&h);
}

#[test]
fn unique_id_formats_hex() {
    let id = UniqueId::new([0xFF; 16]);
    assert_eq!(id.as_bytes(), [b'f'; 32]);
    let id = UniqueId::from_u128(0x0001_0203_0405_0607_0809_0a0b_0c0d_0e0f);
    assert_eq!(id.to_string(), "000102030405060708090a0b0c0d0e0f");
    assert_eq!(UniqueId::from_u128(0).as_bytes(), [b'0'; 32]);
}

#[test]
fn errors_display() {
    let e = EncodeError::UniqueIdTooLong(129);
    assert_eq!(
        e.to_string(),
        "PROXY v2 unique id is 129 bytes, more than 128"
    );
    assert_eq!(
        EncodeError::AuthorityTooLong(300).to_string(),
        "PROXY v2 authority is 300 bytes, more than 255"
    );
    let boxed: Box<dyn Error> = Box::new(EncodeError::AuthorityNotAscii(3));
    assert_eq!(
        boxed.to_string(),
        "PROXY v2 authority has a byte outside printable US-ASCII at index 3"
    );
}

/// Every family pairing (v4, v6, mapped v4, mixed, IPv4-compatible, link-local with a scope id)
/// times every TLV combination, read back by `ppp`.
#[test]
fn ppp_reads_every_family_and_tlv_combination() {
    let ips = [
        "0.0.0.0",
        "255.255.255.255",
        "192.0.2.1",
        "198.51.100.7",
        "::",
        "::1",
        "2001:db8::1",
        "2001:db8:0:0:1:0:0:10",
        "2001:db8:1::10",
        "fe80::1%2",
        "1:0:0:2:0:0:0:3",
        "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        "::ffff:192.0.2.1",
        "::ffff:0.0.0.0",
        "::192.0.2.1",
    ];
    let ports = [0u16, 1, 443, 65535];
    let addrs: Vec<SocketAddr> = ips
        .iter()
        .flat_map(|ip| {
            ports.iter().map(move |p| {
                if ip.contains(':') {
                    sa(&format!("[{ip}]:{p}"))
                } else {
                    sa(&format!("{ip}:{p}"))
                }
            })
        })
        .collect();
    static UNIQUE: UniqueId = UniqueId::from_u128(42);
    // Each TLV alone, none, and all together.
    let with = |authority: Option<&'static str>, id: bool, crc| {
        move |source, destination| Header {
            source,
            destination,
            authority,
            unique_id: id.then_some(UNIQUE.as_bytes()),
            crc32c: crc,
        }
    };
    let combos = [
        with(None, false, false),
        with(Some("site1.example"), false, false),
        with(None, true, false),
        with(None, false, true),
        with(Some("site1.example"), true, true),
    ];
    let (mut tcp4, mut tcp6) = (0, 0);
    for &source in &addrs {
        for &destination in &addrs {
            for make in &combos {
                let h = make(source, destination);
                check_header(&h);
                match v2(&h)[13] {
                    0x11 => tcp4 += 1,
                    0x21 => tcp6 += 1,
                    other => panic!("family byte {other:#x}"),
                }
            }
        }
    }
    // 6 of the 15 addresses end up IPv4 (4 plain, 2 mapped).
    assert_eq!(tcp4, (6 * 4) * (6 * 4) * 5);
    assert_eq!(tcp4 + tcp6, addrs.len() * addrs.len() * 5);
}

/// xorshift64: deterministic, no extra dependency.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn port(&mut self) -> u16 {
        match self.below(4) {
            0 => 0,
            1 => 65535,
            _ => self.next() as u16,
        }
    }

    fn addr(&mut self) -> SocketAddr {
        let port = self.port();
        let v4 = Ipv4Addr::from(self.next() as u32);
        match self.below(4) {
            0 => SocketAddr::from((v4, port)),
            1 => SocketAddr::from((v4.to_ipv6_mapped(), port)),
            2 => {
                let bits = (u128::from(self.next()) << 64) | u128::from(self.next());
                SocketAddr::from((Ipv6Addr::from(bits), port))
            }
            _ => {
                // Zero runs in random places.
                let mut g = [0u16; 8];
                for s in &mut g {
                    if self.below(2) == 0 {
                        *s = self.next() as u16;
                    }
                }
                SocketAddr::from((Ipv6Addr::from(g), port))
            }
        }
    }

    /// A length that often lands on or next to `limit`.
    fn len_near(&mut self, limit: usize) -> usize {
        match self.below(4) {
            0 => limit,
            1 => limit + 1,
            2 => 0,
            _ => self.below(limit as u64 + 2) as usize,
        }
    }
}

#[test]
fn generated_headers_round_trip() {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let pool: Vec<u8> = (0..512).map(|_| rng.next() as u8).collect();
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..10_000 {
        let auth_len = rng.len_near(AUTHORITY_MAX_LEN);
        let authority: String = (0..auth_len)
            .map(|_| match rng.below(200) {
                0 => ' ',
                1 => 'é',
                _ => char::from(b'a' + rng.below(26) as u8),
            })
            .collect();
        let id_len = rng.len_near(UNIQUE_ID_MAX_LEN);
        let h = Header {
            source: rng.addr(),
            destination: rng.addr(),
            authority: (rng.below(2) == 0).then_some(authority.as_str()),
            unique_id: (rng.below(2) == 0).then_some(&pool[100..100 + id_len]),
            crc32c: rng.below(2) == 0,
        };
        check_header(&h);
        if v2_result(&h).is_ok() {
            accepted += 1;
        } else {
            refused += 1;
        }
    }
    // Both paths really ran.
    assert!(
        accepted > 2_000 && refused > 2_000,
        "{accepted} / {refused}"
    );
}

#[test]
fn fuzz_check_over_generated_inputs() {
    fuzz_check_roundtrip(&[]);
    fuzz_check_roundtrip(&[0xFF; 64]);
    fuzz_check_roundtrip(&[0xFF; 2048]);
    let mut rng = XorShift(0xD1B5_4A32_D192_ED03);
    for i in 0..4_000 {
        let len = rng.below(if i % 2 == 0 { 64 } else { 900 }) as usize;
        let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        fuzz_check_roundtrip(&data);
    }
}
