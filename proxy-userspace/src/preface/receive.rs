//! Reading a PROXY header that a trusted balancer in front of us sends first (the receiver side
//! of HAProxy's `proxy-protocol.txt`), sans-IO: [`parse`] looks at the bytes read so far and says
//! "need more", "done, the header is the first `len` bytes", or why it refuses.
//!
//! The receiver rules we follow, from the spec:
//! - The header is required (the caller asks only for sources in `accept_proxy`), and must be
//!   the very first bytes: anything else is [`ReceiveError::NoHeader`]. We never guess.
//! - v1 is one line of at most [`V1_MAX_LEN`] bytes, `\r\n` included: `PROXY TCP4|TCP6 <src>
//!   <dst> <srcport> <dstport>\r\n`, single spaces, addresses of the named family, decimal
//!   ports without leading zeros. `PROXY UNKNOWN` ignores the rest of its line and keeps the
//!   connection's own addresses.
//! - v2 is the 12-byte signature, version 2, command `LOCAL` or `PROXY`, a family byte and a
//!   16-bit length. `LOCAL` (a balancer's health check) keeps the connection's own addresses
//!   and ignores the rest of the block, as the spec says. With `PROXY`, `AF_UNSPEC` keeps the
//!   connection's own addresses too; `TCP4` and `TCP6` carry the client; UDP and `AF_UNIX` make
//!   no sense in front of a TCP proxy and are refused rather than silently ignored. The block
//!   must hold the family's addresses; what follows is TLVs, which must each fit exactly. They
//!   are skipped, except `PP2_TYPE_CRC32C`, which, when present, must be 4 bytes, appear once
//!   and match the checksum of the whole header with its value zeroed. The checksum is the
//!   `crc32c` crate's, as for the headers we send: one implementation both ways, widely used,
//!   with the CPU's CRC32C instructions (SSE4.2, ARMv8) where present, and checked against
//!   the catalogue's check value in the encoder's tests.
//! - A v2 header is at most [`V2_MAX_LEN`] bytes (refused from its length field, before its
//!   body is read), which bounds what one connection buffers.
//! - The header's length is exact: [`Parsed::Complete`] says how many bytes it took, and the
//!   bytes after it belong to the hello. The answer never depends on bytes past the header.
//!
//! The parser is consistent under split reads: an answer other than [`Parsed::Incomplete`]
//! for a prefix of the input is the answer for the whole input, so the caller can act on the
//! first one it gets.

use std::error::Error;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{V2_SIGNATURE, Version};

#[cfg(test)]
mod tests;

/// The longest v1 line the spec allows, `\r\n` included.
pub const V1_MAX_LEN: usize = 107;
/// The longest v2 header we take: 16 fixed bytes and a block of up to 4 KiB. The addresses
/// take at most 36 bytes; the rest is room for the TLVs balancers send (HAProxy's SSL and
/// unique-id TLVs, cloud providers' endpoint ids), far beyond what they use, and small enough
/// that a connection from a balancer holds no more than a hello would.
pub const V2_MAX_LEN: usize = 16 + 4096;

/// The 6 bytes every v1 header starts with.
const V1_PREFIX: &[u8] = b"PROXY ";
const V2_FIXED_LEN: usize = 16;
const PP2_TYPE_CRC32C: u8 = 0x03;

/// A header read from a trusted source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// v1 or v2 (never [`Version::None`]).
    pub version: Version,
    /// The client and the address it connected to, or `None` when the header says to keep the
    /// connection's own (v2 `LOCAL`, v2 `AF_UNSPEC`, v1 `UNKNOWN`).
    pub addresses: Option<Addresses>,
}

/// The two ends a header announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// The client, as the balancer saw it.
    pub source: SocketAddr,
    /// What the client connected to (the balancer's address).
    pub destination: SocketAddr,
}

/// What [`parse`] found in the bytes read so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// The header is not complete yet: read more.
    Incomplete,
    /// The header, and how many bytes it took; the hello starts right after them.
    Complete {
        /// What the header says.
        header: Received,
        /// Its length in bytes.
        len: usize,
    },
}

/// Why a header is refused. Each is the balancer's (or an impostor's) fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiveError {
    /// The first bytes are neither `PROXY ` nor the v2 signature.
    NoHeader,
    /// A v1 line without `\r\n` within [`V1_MAX_LEN`] bytes.
    V1TooLong,
    /// A v1 line that breaks the grammar; says where.
    V1Malformed(&'static str),
    /// A v2 version other than 2.
    V2Version(u8),
    /// A v2 command other than `LOCAL` (0) or `PROXY` (1).
    V2Command(u8),
    /// A v2 family and transport we do not take (UDP, `AF_UNIX`, unknown values).
    V2Family(u8),
    /// A v2 length field that makes the header longer than [`V2_MAX_LEN`]; carries the total.
    V2TooLong(usize),
    /// A v2 block shorter than its family's addresses.
    V2ShortAddresses,
    /// A v2 TLV that does not fit the block, or a second or mis-sized CRC32C TLV.
    V2BadTlv(&'static str),
    /// The v2 CRC32C TLV does not match the header.
    Crc32cMismatch,
}

impl fmt::Display for ReceiveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReceiveError::NoHeader => f.write_str("no PROXY header from a source in accept_proxy"),
            ReceiveError::V1TooLong => {
                write!(f, "PROXY v1 line without CRLF within {V1_MAX_LEN} bytes")
            }
            ReceiveError::V1Malformed(what) => write!(f, "PROXY v1 line: {what}"),
            ReceiveError::V2Version(v) => write!(f, "PROXY v2 header with version {v}"),
            ReceiveError::V2Command(c) => write!(f, "PROXY v2 header with command {c}"),
            ReceiveError::V2Family(fam) => {
                write!(f, "PROXY v2 header with unsupported family 0x{fam:02x}")
            }
            ReceiveError::V2TooLong(n) => {
                write!(f, "PROXY v2 header of {n} bytes, more than {V2_MAX_LEN}")
            }
            ReceiveError::V2ShortAddresses => {
                f.write_str("PROXY v2 header shorter than its addresses")
            }
            ReceiveError::V2BadTlv(what) => write!(f, "PROXY v2 TLV: {what}"),
            ReceiveError::Crc32cMismatch => f.write_str("PROXY v2 header fails its CRC32C"),
        }
    }
}

impl Error for ReceiveError {}

/// Whether `buf` starts like a PROXY header (or is too short to tell): how a hello refused
/// from an untrusted source is recognised as a forged header.
pub fn looks_like_header(buf: &[u8]) -> bool {
    let starts = |sig: &[u8]| {
        let n = buf.len().min(sig.len());
        n > 0 && buf[..n] == sig[..n]
    };
    starts(V1_PREFIX) || starts(&V2_SIGNATURE)
}

/// Reads the PROXY header at the start of `buf`, the bytes received so far.
pub fn parse(buf: &[u8]) -> Result<Parsed, ReceiveError> {
    let is_prefix_of = |sig: &[u8]| {
        let n = buf.len().min(sig.len());
        buf[..n] == sig[..n]
    };
    if is_prefix_of(V1_PREFIX) {
        if buf.len() < V1_PREFIX.len() {
            return Ok(Parsed::Incomplete);
        }
        return parse_v1(buf);
    }
    if is_prefix_of(&V2_SIGNATURE) {
        return parse_v2(buf);
    }
    Err(ReceiveError::NoHeader)
}

fn parse_v1(buf: &[u8]) -> Result<Parsed, ReceiveError> {
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= V1_MAX_LEN {
            Err(ReceiveError::V1TooLong)
        } else {
            Ok(Parsed::Incomplete)
        };
    };
    let len = lf + 1;
    let Some(line) = buf[..lf].strip_suffix(b"\r") else {
        return Err(ReceiveError::V1Malformed("line ends without CR"));
    };
    let line = &line[V1_PREFIX.len()..];
    let header = |addresses| {
        Ok(Parsed::Complete {
            header: Received {
                version: Version::V1,
                addresses,
            },
            len,
        })
    };
    // UNKNOWN: the spec says to ignore the rest of the line.
    if line == b"UNKNOWN" || line.starts_with(b"UNKNOWN ") {
        return header(None);
    }
    let Ok(line) = std::str::from_utf8(line) else {
        return Err(ReceiveError::V1Malformed("bytes outside ASCII"));
    };
    let mut fields = line.split(' ');
    let mut next = |what| fields.next().ok_or(ReceiveError::V1Malformed(what));
    let family = next("no protocol")?;
    let (src, dst) = (next("no source address")?, next("no destination address")?);
    let (src_port, dst_port) = (next("no source port")?, next("no destination port")?);
    if fields.next().is_some() {
        return Err(ReceiveError::V1Malformed("more than six fields"));
    }
    let (src, dst): (IpAddr, IpAddr) = match family {
        "TCP4" => (
            v1_addr::<Ipv4Addr>(src, "bad IPv4 source address")?.into(),
            v1_addr::<Ipv4Addr>(dst, "bad IPv4 destination address")?.into(),
        ),
        "TCP6" => (
            v1_addr::<Ipv6Addr>(src, "bad IPv6 source address")?.into(),
            v1_addr::<Ipv6Addr>(dst, "bad IPv6 destination address")?.into(),
        ),
        _ => {
            return Err(ReceiveError::V1Malformed(
                "protocol is not TCP4, TCP6 or UNKNOWN",
            ));
        }
    };
    header(Some(Addresses {
        source: SocketAddr::new(src, v1_port(src_port)?),
        destination: SocketAddr::new(dst, v1_port(dst_port)?),
    }))
}

fn v1_addr<T: std::str::FromStr>(text: &str, what: &'static str) -> Result<T, ReceiveError> {
    // A zone id (`%eth0`) means nothing on the far side of the balancer.
    if text.contains('%') {
        return Err(ReceiveError::V1Malformed(what));
    }
    text.parse().map_err(|_| ReceiveError::V1Malformed(what))
}

fn v1_port(text: &str) -> Result<u16, ReceiveError> {
    let bad = ReceiveError::V1Malformed("bad port");
    let digits = !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit());
    if !digits || (text.len() > 1 && text.starts_with('0')) {
        return Err(bad);
    }
    text.parse().map_err(|_| bad)
}

fn parse_v2(buf: &[u8]) -> Result<Parsed, ReceiveError> {
    if buf.len() < V2_FIXED_LEN {
        return Ok(Parsed::Incomplete);
    }
    let (ver_cmd, family) = (buf[12], buf[13]);
    if ver_cmd >> 4 != 2 {
        return Err(ReceiveError::V2Version(ver_cmd >> 4));
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        other => return Err(ReceiveError::V2Command(other)),
    };
    let len = V2_FIXED_LEN + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > V2_MAX_LEN {
        return Err(ReceiveError::V2TooLong(len));
    }
    let Some(header) = buf.get(..len) else {
        return Ok(Parsed::Incomplete);
    };
    let block = &header[V2_FIXED_LEN..];
    let done = |addresses| {
        Ok(Parsed::Complete {
            header: Received {
                version: Version::V2,
                addresses,
            },
            len,
        })
    };
    if local {
        // The spec: a receiver uses the real connection endpoints and discards the block,
        // family included.
        return done(None);
    }
    let (addresses, addresses_len) = match family {
        0x00 => (None, 0),
        0x11 => {
            let a = block.get(..12).ok_or(ReceiveError::V2ShortAddresses)?;
            let ip = |at: usize| Ipv4Addr::new(a[at], a[at + 1], a[at + 2], a[at + 3]);
            let port = |at: usize| u16::from_be_bytes([a[at], a[at + 1]]);
            let addresses = Addresses {
                source: SocketAddr::new(ip(0).into(), port(8)),
                destination: SocketAddr::new(ip(4).into(), port(10)),
            };
            (Some(addresses), 12)
        }
        0x21 => {
            let a = block.get(..36).ok_or(ReceiveError::V2ShortAddresses)?;
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&a[at..at + 16]);
                Ipv6Addr::from(octets)
            };
            let port = |at: usize| u16::from_be_bytes([a[at], a[at + 1]]);
            let addresses = Addresses {
                source: SocketAddr::new(ip(0).into(), port(32)),
                destination: SocketAddr::new(ip(16).into(), port(34)),
            };
            (Some(addresses), 36)
        }
        other => return Err(ReceiveError::V2Family(other)),
    };
    check_tlvs(header, V2_FIXED_LEN + addresses_len)?;
    done(addresses)
}

/// Walks the TLVs of `header` from `at` to its end; verifies a CRC32C TLV if there is one.
fn check_tlvs(header: &[u8], mut at: usize) -> Result<(), ReceiveError> {
    let mut crc_at = None;
    while at < header.len() {
        let Some(&[kind, hi, lo]) = header.get(at..at + 3) else {
            return Err(ReceiveError::V2BadTlv("truncated TLV header"));
        };
        let value = at + 3;
        let end = value + usize::from(u16::from_be_bytes([hi, lo]));
        if end > header.len() {
            return Err(ReceiveError::V2BadTlv("a TLV runs past the header"));
        }
        if kind == PP2_TYPE_CRC32C {
            if end - value != 4 {
                return Err(ReceiveError::V2BadTlv("CRC32C value is not 4 bytes"));
            }
            if crc_at.replace(value).is_some() {
                return Err(ReceiveError::V2BadTlv("two CRC32C TLVs"));
            }
        }
        at = end;
    }
    if let Some(at) = crc_at {
        // The checksum covers the whole header with its own value zeroed.
        let want = u32::from_be_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]]);
        let crc = crc32c::crc32c(&header[..at]);
        let crc = crc32c::crc32c_append(crc, &[0; 4]);
        let crc = crc32c::crc32c_append(crc, &header[at + 4..]);
        if crc != want {
            return Err(ReceiveError::Crc32cMismatch);
        }
    }
    Ok(())
}

#[cfg(any(test, fuzzing))]
/// The body of the `preface_receive` fuzz target. Panics if [`parse`] breaks one of its
/// promises on `data`:
/// - a prefix gives [`Parsed::Incomplete`] or the whole input's answer (split reads agree);
/// - a complete header is at most [`V1_MAX_LEN`] or [`V2_MAX_LEN`] bytes, and reads the same
///   from its own bytes alone (it never looks past its length);
/// - incomplete input is shorter than the limits;
/// - announced addresses, encoded again by our own encoder, read back the same.
pub fn fuzz_check_receive(data: &[u8]) {
    let whole = parse(data);
    // Every prefix for short inputs; for long ones, a spread of them (the check runs per input).
    let step = if data.len() <= 256 { 1 } else { 61 };
    for at in (0..data.len())
        .step_by(step)
        .chain([data.len().saturating_sub(1)])
    {
        let early = parse(&data[..at]);
        assert!(
            early == Ok(Parsed::Incomplete) || early == whole,
            "prefix of {at} bytes gave {early:?}, whole input of {} gave {whole:?}",
            data.len()
        );
    }
    match whole {
        Ok(Parsed::Incomplete) => assert!(data.len() < V2_MAX_LEN, "incomplete past the limit"),
        Ok(Parsed::Complete { header, len }) => {
            let limit = match header.version {
                Version::V1 => V1_MAX_LEN,
                _ => V2_MAX_LEN,
            };
            assert!(
                len <= data.len() && len <= limit,
                "length {len} out of bounds"
            );
            assert_eq!(
                parse(&data[..len]),
                whole,
                "the header depends on later bytes"
            );
            if let Some(a) = header.addresses {
                let mut out = Vec::new();
                let sent = super::Header::new(a.source, a.destination);
                if super::encode(header.version, &sent, &mut out).is_err() {
                    panic!("could not encode {a:?} again");
                }
                let again = parse(&out);
                let Ok(Parsed::Complete {
                    header: back,
                    len: back_len,
                }) = again
                else {
                    panic!("our own header for {a:?} reads as {again:?}");
                };
                assert_eq!(back_len, out.len());
                let canonical = |s: SocketAddr| (s.ip().to_canonical(), s.port());
                let back = back
                    .addresses
                    .map(|b| (canonical(b.source), canonical(b.destination)));
                assert_eq!(back, Some((canonical(a.source), canonical(a.destination))));
            }
        }
        Err(_) => {}
    }
}
