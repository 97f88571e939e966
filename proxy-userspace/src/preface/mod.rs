//! What the backend receives first: PROXY protocol v1/v2 headers; and, in [`receive`], the
//! header a trusted balancer in front of us sends first.
//!
//! Encoders for HAProxy's PROXY protocol (`proxy-protocol.txt`), version 1 (one text line) and
//! version 2 (binary, with TLVs). Sans-IO: every function appends bytes to a caller-owned
//! `Vec<u8>` so the caller can put header and buffered hello into one `write`. The encoders are
//! total: every [`Header`] gives bytes or a typed [`EncodeError`], never a panic, and on error
//! nothing is appended.
//!
//! Address families. A dual-stack listener reports IPv4 clients as IPv4-mapped IPv6
//! (`::ffff:a.b.c.d`); the backend wants to see the IPv4 client, so mapped addresses are unmapped
//! and sent as `TCP4` / `AF_INET`. If the two ends still differ in family afterwards (an IPv4
//! client on a listener whose local address is plain IPv6), the header has no way to say "mixed":
//! we then map the IPv4 end back into `::ffff:a.b.c.d` and send `TCP6` / `AF_INET6`, which is
//! lossless, rather than `UNKNOWN` / `LOCAL`, which would make the backend fall back to the
//! proxy's own address and lose the client. IPv6 scope ids and flow labels have no field in the
//! protocol and are dropped.

use std::error::Error;
use std::fmt;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

// The round-trip check reads our headers back with `ppp`, a dev-dependency, or an optional one
// that the fuzz crate turns on with the `fuzz` feature.
pub mod receive;
#[cfg(any(test, all(fuzzing, feature = "fuzz")))]
mod roundtrip;
#[cfg(test)]
mod tests;

#[cfg(any(test, fuzzing))]
pub use receive::fuzz_check_receive;
#[cfg(any(test, all(fuzzing, feature = "fuzz")))]
pub use roundtrip::fuzz_check_roundtrip;

/// Which header a site wants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Version {
    /// No header: the backend sees the client's bytes only (the default; a backend that does not
    /// expect a PROXY header breaks on one).
    #[default]
    None,
    /// The human-readable text line (`PROXY TCP4 ...\r\n`); carries addresses only.
    V1,
    /// The binary header; carries addresses plus the TLVs in [`Header`].
    V2,
}

/// Everything a header can carry. Built per connection.
#[derive(Debug, Clone)]
pub struct Header<'a> {
    /// The client as the proxy saw it.
    pub source: SocketAddr,
    /// The address the client connected to (the listener's local address).
    pub destination: SocketAddr,
    /// The requested host name (SNI or `Host`), v2 only (`PP2_TYPE_AUTHORITY`). At most
    /// [`AUTHORITY_MAX_LEN`] bytes of printable US-ASCII; an empty value is omitted.
    pub authority: Option<&'a str>,
    /// A connection id the backend can log, v2 only (`PP2_TYPE_UNIQUE_ID`). At most
    /// [`UNIQUE_ID_MAX_LEN`] bytes; an empty value is omitted. See [`UniqueId`].
    pub unique_id: Option<&'a [u8]>,
    /// v2 only: append `PP2_TYPE_CRC32C`, a checksum over the whole header.
    pub crc32c: bool,
}

impl<'a> Header<'a> {
    /// A header with the two addresses and no TLVs.
    pub const fn new(source: SocketAddr, destination: SocketAddr) -> Self {
        Header {
            source,
            destination,
            authority: None,
            unique_id: None,
            crc32c: false,
        }
    }
}

/// Why a header could not be encoded. Only v2 fails: v1 carries addresses only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncodeError {
    /// `unique_id` is longer than [`UNIQUE_ID_MAX_LEN`] bytes (the spec's limit); carries the length.
    UniqueIdTooLong(usize),
    /// `authority` is longer than [`AUTHORITY_MAX_LEN`] bytes; carries the length.
    AuthorityTooLong(usize),
    /// `authority` has a byte outside printable US-ASCII (the spec says US-ASCII; controls and
    /// spaces would also let a client inject into the backend's logs); carries its index.
    AuthorityNotAscii(usize),
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::UniqueIdTooLong(n) => write!(
                f,
                "PROXY v2 unique id is {n} bytes, more than {UNIQUE_ID_MAX_LEN}"
            ),
            EncodeError::AuthorityTooLong(n) => write!(
                f,
                "PROXY v2 authority is {n} bytes, more than {AUTHORITY_MAX_LEN}"
            ),
            EncodeError::AuthorityNotAscii(i) => write!(
                f,
                "PROXY v2 authority has a byte outside printable US-ASCII at index {i}"
            ),
        }
    }
}

impl Error for EncodeError {}

/// The 12 bytes every v2 header starts with (chosen by the spec to never parse as HTTP, TLS, ...).
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest `PP2_TYPE_UNIQUE_ID` value the spec allows.
pub const UNIQUE_ID_MAX_LEN: usize = 128;
/// The longest authority we send: a DNS name is at most 253 characters, and HAProxy rejects the
/// whole header as bad when this TLV is longer (`HA_PP2_AUTHORITY_MAX`).
pub const AUTHORITY_MAX_LEN: usize = 255;

/// Version 2 in the high nibble, command PROXY (1) in the low one.
const V2_CMD_PROXY: u8 = 0x21;
/// Address family in the high nibble, `SOCK_STREAM` (1) in the low one.
const V2_FAM_TCP4: u8 = 0x11;
const V2_FAM_TCP6: u8 = 0x21;
/// Signature, ver_cmd, fam, 16-bit length.
const V2_FIXED_LEN: usize = 16;
const TLV_HEADER_LEN: usize = 3;
const PP2_TYPE_AUTHORITY: u8 = 0x02;
const PP2_TYPE_CRC32C: u8 = 0x03;
const PP2_TYPE_UNIQUE_ID: u8 = 0x05;
const CRC32C_LEN: usize = 4;

/// The longest payload after the fixed 16 bytes: IPv6 addresses plus every TLV at its maximum.
const V2_MAX_PAYLOAD: usize = 36
    + (TLV_HEADER_LEN + AUTHORITY_MAX_LEN)
    + (TLV_HEADER_LEN + CRC32C_LEN)
    + (TLV_HEADER_LEN + UNIQUE_ID_MAX_LEN);
// Proves at compile time that the length field and every TLV length fit in 16 bits once the
// per-field limits are checked, so the narrowing casts in `encode_v2` cannot truncate.
const _: () = assert!(V2_MAX_PAYLOAD <= u16::MAX as usize);

/// Appends the header `version` asks for to `out`; [`Version::None`] appends nothing.
///
/// On error `out` is left as it was.
pub fn encode(version: Version, header: &Header<'_>, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    match version {
        Version::None => Ok(()),
        Version::V1 => {
            encode_v1(header, out);
            Ok(())
        }
        Version::V2 => encode_v2(header, out),
    }
}

/// Appends a v1 line: `PROXY TCP4|TCP6 <src> <dst> <srcport> <dstport>\r\n`.
///
/// v1 has no TLVs, so `authority`, `unique_id` and `crc32c` are ignored, and it cannot
/// fail. IPv6 is written in RFC 5952 canonical form (lowercase, longest zero run as `::`).
pub fn encode_v1(header: &Header<'_>, out: &mut Vec<u8>) {
    // `write!` into a Vec cannot fail (running out of memory aborts instead of returning an
    // error), so the io::Result carries no information.
    let _ = match Endpoints::from_header(header) {
        Endpoints::V4 {
            src,
            dst,
            src_port,
            dst_port,
        } => write!(out, "PROXY TCP4 {src} {dst} {src_port} {dst_port}\r\n"),
        Endpoints::V6 {
            src,
            dst,
            src_port,
            dst_port,
        } => write!(out, "PROXY TCP6 {src} {dst} {src_port} {dst_port}\r\n"),
    };
}

/// Appends a v2 binary header with command PROXY, `SOCK_STREAM`, and the TLVs `header` asks for.
///
/// TLVs are written in ascending type order: AUTHORITY (0x02), CRC32C (0x03), UNIQUE_ID (0x05).
/// Empty values are omitted: a zero-length host name or id tells the
/// backend nothing, and refusing the client over it would hurt more than it helps. Values over
/// their limit, or a non-printable-ASCII authority, are errors; then `out` is left as it was.
pub fn encode_v2(header: &Header<'_>, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let authority = non_empty(header.authority.map(str::as_bytes));
    let unique_id = non_empty(header.unique_id);
    if let Some(a) = authority {
        if a.len() > AUTHORITY_MAX_LEN {
            return Err(EncodeError::AuthorityTooLong(a.len()));
        }
        if let Some(i) = a.iter().position(|b| !b.is_ascii_graphic()) {
            return Err(EncodeError::AuthorityNotAscii(i));
        }
    }
    if let Some(u) = unique_id
        && u.len() > UNIQUE_ID_MAX_LEN
    {
        return Err(EncodeError::UniqueIdTooLong(u.len()));
    }

    let endpoints = Endpoints::from_header(header);
    let tlv_len = |v: Option<&[u8]>| v.map_or(0, |v| TLV_HEADER_LEN + v.len());
    // Bounded by V2_MAX_PAYLOAD thanks to the checks above (see the const assertion).
    let payload_len = endpoints.v2_len()
        + tlv_len(authority)
        + if header.crc32c {
            TLV_HEADER_LEN + CRC32C_LEN
        } else {
            0
        }
        + tlv_len(unique_id);

    let start = out.len();
    out.reserve(V2_FIXED_LEN + payload_len);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(V2_CMD_PROXY);
    match endpoints {
        Endpoints::V4 {
            src,
            dst,
            src_port,
            dst_port,
        } => {
            out.push(V2_FAM_TCP4);
            out.extend_from_slice(&(payload_len as u16).to_be_bytes());
            out.extend_from_slice(&src.octets());
            out.extend_from_slice(&dst.octets());
            out.extend_from_slice(&src_port.to_be_bytes());
            out.extend_from_slice(&dst_port.to_be_bytes());
        }
        Endpoints::V6 {
            src,
            dst,
            src_port,
            dst_port,
        } => {
            out.push(V2_FAM_TCP6);
            out.extend_from_slice(&(payload_len as u16).to_be_bytes());
            out.extend_from_slice(&src.octets());
            out.extend_from_slice(&dst.octets());
            out.extend_from_slice(&src_port.to_be_bytes());
            out.extend_from_slice(&dst_port.to_be_bytes());
        }
    }
    push_tlv(out, PP2_TYPE_AUTHORITY, authority);
    // The checksum covers the whole header with its own field zeroed: write zeros, hash, patch.
    let crc_at = header.crc32c.then(|| {
        push_tlv(out, PP2_TYPE_CRC32C, Some(&[0; CRC32C_LEN]));
        out.len() - CRC32C_LEN
    });
    push_tlv(out, PP2_TYPE_UNIQUE_ID, unique_id);
    if let Some(at) = crc_at {
        let crc = crc32c::crc32c(&out[start..]);
        out[at..at + CRC32C_LEN].copy_from_slice(&crc.to_be_bytes());
    }
    Ok(())
}

/// A 128-bit connection id formatted for `PP2_TYPE_UNIQUE_ID`: 32 lowercase hex digits.
///
/// The caller supplies the 128 bits (randomness, a counter, or both). Hex rather than raw bytes
/// because backends expose the value as text (nginx `$proxy_protocol_tlv_unique_id`, HAProxy
/// `fc_pp_unique_id`) and it should survive a log line; 32 bytes is well under the 128 allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UniqueId([u8; 32]);

impl UniqueId {
    /// Formats 16 bytes, most significant first.
    pub const fn new(id: [u8; 16]) -> Self {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut text = [0; 32];
        // A `while` loop so the id can be built in a `const` or `static`.
        let mut i = 0;
        while i < id.len() {
            text[2 * i] = HEX[(id[i] >> 4) as usize];
            text[2 * i + 1] = HEX[(id[i] & 0x0f) as usize];
            i += 1;
        }
        UniqueId(text)
    }

    /// Formats a 128-bit number, big-endian.
    pub const fn from_u128(id: u128) -> Self {
        Self::new(id.to_be_bytes())
    }

    /// The value to put in [`Header::unique_id`].
    pub const fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for UniqueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0
            .iter()
            .try_for_each(|&b| fmt::Write::write_char(f, char::from(b)))
    }
}

/// Both ends in one family, after the unmapping rules in the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoints {
    V4 {
        src: Ipv4Addr,
        dst: Ipv4Addr,
        src_port: u16,
        dst_port: u16,
    },
    V6 {
        src: Ipv6Addr,
        dst: Ipv6Addr,
        src_port: u16,
        dst_port: u16,
    },
}

impl Endpoints {
    fn from_header(header: &Header<'_>) -> Self {
        let (src_port, dst_port) = (header.source.port(), header.destination.port());
        match (unmap(header.source.ip()), unmap(header.destination.ip())) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => Endpoints::V4 {
                src,
                dst,
                src_port,
                dst_port,
            },
            // Mixed families: map the IPv4 end into IPv6 (see the module docs for why).
            (src, dst) => Endpoints::V6 {
                src: as_v6(src),
                dst: as_v6(dst),
                src_port,
                dst_port,
            },
        }
    }

    /// Bytes the addresses take in a v2 payload.
    fn v2_len(&self) -> usize {
        match self {
            Endpoints::V4 { .. } => 4 + 4 + 2 + 2,
            Endpoints::V6 { .. } => 16 + 16 + 2 + 2,
        }
    }
}

fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    }
}

fn as_v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

fn non_empty(value: Option<&[u8]>) -> Option<&[u8]> {
    value.filter(|v| !v.is_empty())
}

/// Appends one TLV if there is a value; the caller has checked its length fits in 16 bits.
fn push_tlv(out: &mut Vec<u8>, kind: u8, value: Option<&[u8]>) {
    if let Some(value) = value {
        out.push(kind);
        out.extend_from_slice(&(value.len() as u16).to_be_bytes());
        out.extend_from_slice(value);
    }
}
