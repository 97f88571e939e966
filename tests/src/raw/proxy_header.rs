//! Recognising PROXY protocol headers (v1 and v2) at the start of a backend connection, from
//! HAProxy's specification rather than the proxy's own parser.
use std::net::SocketAddr;

use anyhow::{Result, bail};

/// The 12-byte PROXY protocol v2 signature.
pub const PROXY_V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// A PROXY header found at the start of a backend connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyHeader {
    /// 1 or 2.
    pub version: u8,
    /// Its length in bytes; the payload starts right after it.
    pub len: usize,
}

/// What the start of a connection says about a PROXY header: not there, maybe (need more
/// bytes), or there with its length. Malformed headers are reported as errors.
pub(super) fn detect_proxy_header(buf: &[u8]) -> Result<Option<Option<ProxyHeader>>> {
    const V1: &[u8] = b"PROXY ";
    let n = buf.len().min(V1.len());
    if buf[..n] == V1[..n] {
        if buf.len() < V1.len() {
            return Ok(None);
        }
        return match buf.windows(2).position(|w| w == b"\r\n") {
            Some(i) if i + 2 <= 107 => Ok(Some(Some(ProxyHeader {
                version: 1,
                len: i + 2,
            }))),
            Some(_) => bail!("PROXY v1 line longer than 107 bytes"),
            None if buf.len() >= 107 => bail!("PROXY v1 line without CRLF in 107 bytes"),
            None => Ok(None),
        };
    }
    let n = buf.len().min(PROXY_V2_SIGNATURE.len());
    if buf[..n] == PROXY_V2_SIGNATURE[..n] {
        if buf.len() < 16 {
            return Ok(None);
        }
        let len = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        return Ok(Some(Some(ProxyHeader { version: 2, len })));
    }
    Ok(Some(None))
}

/// A decoded PROXY v2 header with an IPv4 address pair (what a client in the client namespace
/// produces).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyV2Inet {
    /// Version and command byte (0x21 = version 2, PROXY).
    pub ver_cmd: u8,
    /// Family and protocol byte (0x11 = AF_INET, STREAM).
    pub family: u8,
    /// Source address and port: the client.
    pub source: SocketAddr,
    /// Destination address and port: what the client connected to.
    pub destination: SocketAddr,
    /// Total header length (16 + the length field).
    pub len: usize,
}

/// Decodes a v2 header with AF_INET addresses at the start of `buf`.
pub fn parse_proxy_v2_inet(buf: &[u8]) -> Result<ProxyV2Inet> {
    if buf.len() < 28 || buf[..12] != PROXY_V2_SIGNATURE {
        bail!(
            "no PROXY v2 header with AF_INET addresses in {:02x?}",
            &buf[..buf.len().min(28)]
        );
    }
    let len = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len < 28 || buf.len() < len {
        bail!("PROXY v2 header length {len} does not fit its addresses or the data");
    }
    let ip = |at: usize| std::net::Ipv4Addr::new(buf[at], buf[at + 1], buf[at + 2], buf[at + 3]);
    let port = |at: usize| u16::from_be_bytes([buf[at], buf[at + 1]]);
    Ok(ProxyV2Inet {
        ver_cmd: buf[12],
        family: buf[13],
        source: SocketAddr::new(ip(16).into(), port(24)),
        destination: SocketAddr::new(ip(20).into(), port(26)),
        len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_header_detection() {
        let v1 = b"PROXY TCP4 192.0.2.2 192.0.2.1 1 443\r\nrest";
        assert_eq!(
            detect_proxy_header(v1).expect("ok"),
            Some(Some(ProxyHeader {
                version: 1,
                len: 38
            }))
        );
        assert_eq!(detect_proxy_header(b"PRO").expect("ok"), None);
        assert_eq!(
            detect_proxy_header(b"\x16\x03\x01").expect("ok"),
            Some(None)
        );
        let mut v2 = PROXY_V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[
            0x21, 0x11, 0, 12, 192, 0, 2, 2, 192, 0, 2, 1, 0x9c, 0x40, 1, 0xbb,
        ]);
        assert_eq!(
            detect_proxy_header(&v2).expect("ok"),
            Some(Some(ProxyHeader {
                version: 2,
                len: 28
            }))
        );
        let parsed = parse_proxy_v2_inet(&v2).expect("parses");
        assert_eq!(parsed.source, "192.0.2.2:40000".parse().expect("addr"));
        assert_eq!(parsed.destination, "192.0.2.1:443".parse().expect("addr"));
    }
}
