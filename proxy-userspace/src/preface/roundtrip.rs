//! The PROXY round-trip check shared by the unit tests and the fuzz target: encode a header,
//! read it back with an independent implementation (the `ppp` crate), compare.
//!
//! Compiled for the unit tests (`ppp` is a dev-dependency) and, for the fuzz target
//! (`fuzz/fuzz_targets/preface_roundtrip.rs`), under `cfg(fuzzing)` with the `fuzz` feature,
//! which brings `ppp` in as an optional dependency.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use super::{
    AUTHORITY_MAX_LEN, EncodeError, Header, UNIQUE_ID_MAX_LEN, Version, encode, encode_v1,
    encode_v2,
};

/// The longest v1 line the spec allows, `\r\n` included. Ours are at most 104 bytes.
pub(crate) const V1_MAX_LEN: usize = 107;

/// Derives a [`Header`] from arbitrary bytes and checks that v1 and v2 encodings read back
/// (with `ppp`) as exactly what was put in, or that v2 refuses exactly the invalid values.
#[doc(hidden)]
pub fn fuzz_check_roundtrip(data: &[u8]) {
    check_header(&header_from_bytes(data));
}

/// Reads bytes front to back; past the end it yields zeros and empty slices, so every input,
/// however short, gives a header.
struct Bytes<'a>(&'a [u8]);

impl<'a> Bytes<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }

    fn u8(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0; N];
        for (dst, src) in a.iter_mut().zip(self.take(N)) {
            *dst = *src;
        }
        a
    }

    /// Kind 0: IPv4; 1: IPv6; 2: IPv4-mapped IPv6; 3: IPv6 with the groups named by a mask byte
    /// zeroed, so zero runs of every length and position come up.
    fn socket_addr(&mut self, kind: u8) -> SocketAddr {
        let ip = match kind & 3 {
            0 => IpAddr::V4(Ipv4Addr::from(self.array::<4>())),
            1 => IpAddr::V6(Ipv6Addr::from(self.array::<16>())),
            2 => IpAddr::V6(Ipv4Addr::from(self.array::<4>()).to_ipv6_mapped()),
            _ => {
                let zeros = self.u8();
                let mut groups = [0u16; 8];
                for (i, g) in groups.iter_mut().enumerate() {
                    if zeros & (1 << i) == 0 {
                        *g = self.u16();
                    }
                }
                IpAddr::V6(Ipv6Addr::from(groups))
            }
        };
        let port = self.u16();
        match ip {
            IpAddr::V4(v4) => SocketAddr::V4(SocketAddrV4::new(v4, port)),
            // A scope id has no field in the protocol; vary it to show it is ignored.
            IpAddr::V6(v6) => SocketAddr::V6(SocketAddrV6::new(v6, port, 0, u32::from(self.u8()))),
        }
    }
}

/// Layout: flags (bits 0-1 source kind, 2-3 destination kind, 4 authority, 6 unique id,
/// 7 CRC32C; bit 5 is unused), source, destination, then each present value as a length and its bytes.
/// Lengths reach past the limits so the error paths are exercised too.
pub(crate) fn header_from_bytes(data: &[u8]) -> Header<'_> {
    let mut r = Bytes(data);
    let flags = r.u8();
    let source = r.socket_addr(flags);
    let destination = r.socket_addr(flags >> 2);
    let mut header = Header::new(source, destination);
    if flags & 0x10 != 0 {
        let len = usize::from(r.u16() % 300);
        let raw = r.take(len);
        // The longest valid UTF-8 prefix, so arbitrary bytes still make a &str.
        let valid = match std::str::from_utf8(raw) {
            Ok(s) => s.len(),
            Err(e) => e.valid_up_to(),
        };
        header.authority = std::str::from_utf8(&raw[..valid]).ok();
    }
    if flags & 0x40 != 0 {
        let len = usize::from(r.u8());
        header.unique_id = Some(r.take(len));
    }
    header.crc32c = flags & 0x80 != 0;
    header
}

/// What a receiver must see: both ends IPv4 if both are IPv4 or IPv4-mapped, otherwise both
/// IPv6 with any IPv4 end written as `::ffff:a.b.c.d`. Spelled out with segments rather than
/// the helpers the encoder uses.
#[derive(Debug, PartialEq)]
enum Expected {
    Tcp4(Ipv4Addr, Ipv4Addr, u16, u16),
    Tcp6(Ipv6Addr, Ipv6Addr, u16, u16),
}

fn expected(header: &Header<'_>) -> Expected {
    fn as_v4(ip: IpAddr) -> Option<Ipv4Addr> {
        match ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(v6) => {
                let s = v6.segments();
                (s[..6] == [0, 0, 0, 0, 0, 0xffff]).then(|| {
                    let [a, b] = s[6].to_be_bytes();
                    let [c, d] = s[7].to_be_bytes();
                    Ipv4Addr::new(a, b, c, d)
                })
            }
        }
    }
    fn as_v6(ip: IpAddr) -> Ipv6Addr {
        match ip {
            IpAddr::V4(v4) => {
                let [a, b, c, d] = v4.octets();
                Ipv6Addr::new(
                    0,
                    0,
                    0,
                    0,
                    0,
                    0xffff,
                    u16::from_be_bytes([a, b]),
                    u16::from_be_bytes([c, d]),
                )
            }
            IpAddr::V6(v6) => v6,
        }
    }
    let (sp, dp) = (header.source.port(), header.destination.port());
    let (s, d) = (header.source.ip(), header.destination.ip());
    match (as_v4(s), as_v4(d)) {
        (Some(s4), Some(d4)) => Expected::Tcp4(s4, d4, sp, dp),
        (s4, d4) => Expected::Tcp6(
            as_v6(s4.map_or(s, IpAddr::V4)),
            as_v6(d4.map_or(d, IpAddr::V4)),
            sp,
            dp,
        ),
    }
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit: slow but independent of
/// the `crc32c` crate the encoder uses.
pub(crate) fn crc32c_bitwise(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Encodes `header` as v1 and v2 and checks both against `ppp`; panics on any mismatch.
pub(crate) fn check_header(header: &Header<'_>) {
    let want = expected(header);
    check_v1(header, &want);
    check_v2(header, &want);

    let mut none = vec![0xAA];
    assert_eq!(encode(Version::None, header, &mut none), Ok(()));
    assert_eq!(none, [0xAA], "Version::None must append nothing");
}

fn check_v1(header: &Header<'_>, want: &Expected) {
    // Start with a byte in the buffer to prove the encoder appends.
    let mut out = vec![b'x'];
    encode_v1(header, &mut out);
    let line = &out[1..];
    assert!(line.len() <= V1_MAX_LEN, "v1 line is {} bytes", line.len());
    assert!(line.ends_with(b"\r\n"));
    let parsed = match ppp::v1::Header::try_from(line) {
        Ok(p) => p,
        Err(e) => panic!(
            "ppp rejects our v1 line {:?}: {e:?}",
            String::from_utf8_lossy(line)
        ),
    };
    assert_eq!(
        parsed.header.len(),
        line.len(),
        "ppp read a different length"
    );
    let got = match parsed.addresses {
        ppp::v1::Addresses::Tcp4(a) => Expected::Tcp4(
            a.source_address,
            a.destination_address,
            a.source_port,
            a.destination_port,
        ),
        ppp::v1::Addresses::Tcp6(a) => Expected::Tcp6(
            a.source_address,
            a.destination_address,
            a.source_port,
            a.destination_port,
        ),
        ppp::v1::Addresses::Unknown => panic!("v1 said UNKNOWN for {header:?}"),
    };
    assert_eq!(&got, want, "v1 {:?}", String::from_utf8_lossy(line));

    let mut via_encode = vec![b'x'];
    assert_eq!(encode(Version::V1, header, &mut via_encode), Ok(()));
    assert_eq!(via_encode, out);
}

fn check_v2(header: &Header<'_>, want: &Expected) {
    fn non_empty(v: Option<&[u8]>) -> Option<&[u8]> {
        v.filter(|v| !v.is_empty())
    }
    let authority = non_empty(header.authority.map(str::as_bytes));
    let unique_id = non_empty(header.unique_id);

    // Which errors the values deserve; the encoder may report any one of them.
    let mut allowed_errors = Vec::new();
    if let Some(a) = authority {
        if a.len() > AUTHORITY_MAX_LEN {
            allowed_errors.push(EncodeError::AuthorityTooLong(a.len()));
        }
        if let Some(i) = a.iter().position(|&b| !(0x21..=0x7e).contains(&b)) {
            allowed_errors.push(EncodeError::AuthorityNotAscii(i));
        }
    }
    if let Some(u) = unique_id
        && u.len() > UNIQUE_ID_MAX_LEN
    {
        allowed_errors.push(EncodeError::UniqueIdTooLong(u.len()));
    }

    let mut out = vec![b'x'];
    let result = encode_v2(header, &mut out);
    let mut via_encode = vec![b'x'];
    assert_eq!(encode(Version::V2, header, &mut via_encode), result);
    assert_eq!(via_encode, out);
    if let Err(e) = result {
        assert!(
            allowed_errors.contains(&e),
            "unexpected {e:?} for {header:?}"
        );
        assert_eq!(out, [b'x'], "an error must leave the buffer as it was");
        return;
    }
    assert!(allowed_errors.is_empty(), "accepted {header:?}");
    let bytes = &out[1..];

    let parsed = match ppp::v2::Header::try_from(bytes) {
        Ok(p) => p,
        Err(e) => panic!("ppp rejects our v2 header {bytes:02x?}: {e:?}"),
    };
    assert_eq!(parsed.len(), bytes.len(), "ppp read a different length");
    assert_eq!(
        parsed.length(),
        usize::from(u16::from_be_bytes([bytes[14], bytes[15]]))
    );
    assert_eq!(parsed.command, ppp::v2::Command::Proxy);
    assert_eq!(parsed.protocol, ppp::v2::Protocol::Stream);
    let got = match parsed.addresses {
        ppp::v2::Addresses::IPv4(a) => Expected::Tcp4(
            a.source_address,
            a.destination_address,
            a.source_port,
            a.destination_port,
        ),
        ppp::v2::Addresses::IPv6(a) => Expected::Tcp6(
            a.source_address,
            a.destination_address,
            a.source_port,
            a.destination_port,
        ),
        other => panic!("v2 addresses {other:?} for {header:?}"),
    };
    assert_eq!(&got, want, "v2 {bytes:02x?}");

    // Walk the TLVs with ppp, remembering where the CRC32C value sits.
    let mut tlvs = Vec::new();
    let mut offset = bytes.len() - parsed.tlv_bytes().len();
    let mut crc_at = None;
    for tlv in parsed.tlvs() {
        let tlv = match tlv {
            Ok(t) => t,
            Err(e) => panic!("ppp rejects our TLVs {bytes:02x?}: {e:?}"),
        };
        if tlv.kind == 0x03 {
            crc_at = Some(offset + 3);
        }
        offset += 3 + tlv.value.len();
        tlvs.push((tlv.kind, tlv.value.to_vec()));
    }
    assert_eq!(offset, bytes.len(), "TLVs do not end where the header does");

    let mut want_tlvs = Vec::new();
    if let Some(a) = authority {
        want_tlvs.push((0x02, a.to_vec()));
    }
    if let Some(at) = crc_at.filter(|_| header.crc32c) {
        let mut zeroed = bytes.to_vec();
        zeroed[at..at + 4].fill(0);
        want_tlvs.push((0x03, crc32c_bitwise(&zeroed).to_be_bytes().to_vec()));
    } else if header.crc32c {
        panic!("no CRC32C TLV in {bytes:02x?}");
    }
    if let Some(u) = unique_id {
        want_tlvs.push((0x05, u.to_vec()));
    }
    assert_eq!(tlvs, want_tlvs, "TLVs of {bytes:02x?}");
}
