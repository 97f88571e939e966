//! Reading the name a client asks for: TLS ClientHello (SNI) and HTTP request head (Host).
//!
//! Both parsers are sans-IO and stateless: the accept loop hands them every byte read from the
//! client so far and gets back "need more" (`Ok(None)`), the parsed hello, or a [`HelloError`]
//! that says why the connection is refused. Nothing is consumed or rewritten; the caller forwards
//! the whole buffer to the backend unchanged. Each parser looks at no more than its size limit
//! ([`tls::MAX_CLIENT_HELLO`], the configured `max_request_head`), so calling it again after every read
//! costs at most one pass over a bounded buffer.
//!
//! The parsers are total: any input gives a value or an error, never a panic. `fuzz_check_tls`
//! and `fuzz_check_http` (compiled for tests and under `cfg(fuzzing)`, as quinn does) hold the
//! properties the fuzz targets in `fuzz/` check, so the unit tests exercise them on stable too.

pub mod http;
pub mod tls;

#[cfg(test)]
pub(crate) mod testutil;

use std::fmt;

/// Why a hello was refused.
///
/// Each variant is one outcome an operator may want to count (`crate::outcome` names it); the
/// `&'static str` details only go into log lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelloError {
    /// The first bytes cannot start a TLS handshake record: plain HTTP sent to a TLS port, an
    /// SSLv2-style hello, or random bytes. Decided from the first one or two bytes.
    NotTls,
    /// A TLS handshake whose first message is not a ClientHello (for example a ServerHello).
    NotClientHello,
    /// The ClientHello cannot be complete within [`tls::MAX_CLIENT_HELLO`] buffered bytes.
    TooLarge,
    /// TLS records or ClientHello contents that break the protocol; the text says what.
    Malformed(&'static str),
    /// The first bytes cannot start an HTTP request line (a TLS hello sent to an HTTP port).
    NotHttp,
    /// The HTTP request head does not end within its limit (`max_request_head`), or has more
    /// header lines than we keep.
    HeadTooLarge,
    /// An HTTP request head that is not a valid request, or whose Host cannot be used; the text
    /// says what.
    BadRequest(&'static str),
}

impl fmt::Display for HelloError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HelloError::NotTls => f.write_str("not a TLS handshake"),
            HelloError::NotClientHello => {
                f.write_str("TLS handshake does not start with ClientHello")
            }
            HelloError::TooLarge => {
                write!(f, "ClientHello larger than {} bytes", tls::MAX_CLIENT_HELLO)
            }
            HelloError::Malformed(what) => write!(f, "malformed ClientHello: {what}"),
            HelloError::NotHttp => f.write_str("not an HTTP request"),
            HelloError::HeadTooLarge => write!(
                f,
                "HTTP request head larger than max_request_head or {} header lines",
                http::MAX_HEADERS
            ),
            HelloError::BadRequest(what) => write!(f, "bad HTTP request: {what}"),
        }
    }
}

impl std::error::Error for HelloError {}

/// Whether `name` is a DNS host name we are willing to route on: ASCII letters, digits, `-` and
/// `_` in non-empty labels of at most 63 bytes, separated by dots, with an optional trailing dot.
///
/// `_` is allowed because real host names carry it even though RFC 952 does not; `*` and
/// everything else is refused so that a name can never look like a wildcard pattern or smuggle
/// bytes into log lines. IPv4 literals pass (digits and dots); the router decides about them.
fn is_host_name(name: &[u8]) -> bool {
    let labels = name.strip_suffix(b".").unwrap_or(name);
    !labels.is_empty()
        && name.len() <= 255
        && labels.split(|&b| b == b'.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .iter()
                    .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Lowercases an ASCII host name into a `String`: routing compares names case-insensitively, and
/// doing it once here lets every later stage compare bytes.
fn lowercase_ascii(name: &[u8]) -> String {
    name.iter()
        .map(|&b| char::from(b.to_ascii_lowercase()))
        .collect()
}

#[cfg(any(test, fuzzing))]
/// Where the fuzz targets cut their input in two: the first byte picks the position, the rest is
/// the input, so the fuzzer can steer the split independently of the bytes being parsed.
fn fuzz_split(data: &[u8]) -> Option<(&[u8], &[u8])> {
    let (&selector, input) = data.split_first()?;
    let at = usize::from(selector).saturating_mul(input.len()) / 255;
    let prefix = input.get(..at).unwrap_or(input);
    Some((input, prefix))
}

#[cfg(any(test, fuzzing))]
/// The body of the `hello_tls` fuzz target: parses `data[1..]` whole and a prefix of it chosen by
/// `data[0]`, and panics if the results disagree or a parsed hello breaks its invariants.
///
/// A prefix may say "need more" where the whole input says more, but if it gives an answer it must
/// be the same answer: the accept loop acts on the first answer it gets.
pub fn fuzz_check_tls(data: &[u8]) {
    let Some((input, prefix)) = fuzz_split(data) else {
        return;
    };
    let whole = tls::parse_client_hello(input);
    let early = tls::parse_client_hello(prefix);
    assert!(
        early == Ok(None) || early == whole,
        "prefix of {} bytes gave {early:?}, whole input of {} bytes gave {whole:?}",
        prefix.len(),
        input.len()
    );
    match &whole {
        Ok(None) => assert!(
            input.len() < tls::MAX_CLIENT_HELLO,
            "need more past the limit"
        ),
        Ok(Some(hello)) => {
            if let Some(sni) = &hello.sni {
                assert!(is_host_name(sni.as_bytes()), "bad SNI accepted: {sni:?}");
                assert_eq!(*sni, sni.to_ascii_lowercase(), "SNI not lowercased");
            }
            for protocol in &hello.alpn {
                assert!(
                    !protocol.is_empty() && protocol.bytes().all(|b| b.is_ascii_graphic()),
                    "bad ALPN protocol kept: {protocol:?}"
                );
            }
        }
        Err(_) => {}
    }
}

#[cfg(any(test, fuzzing))]
/// The body of the `hello_http` fuzz target: parses `data[1..]` whole and a prefix of it chosen by
/// `data[0]`, and panics if the results disagree or a parsed head breaks its invariants.
pub fn fuzz_check_http(data: &[u8]) {
    let Some((input, prefix)) = fuzz_split(data) else {
        return;
    };
    let whole = http::parse_request_head(input);
    let early = http::parse_request_head(prefix);
    assert!(
        early == Ok(None) || early == whole,
        "prefix of {} bytes gave {early:?}, whole input of {} bytes gave {whole:?}",
        prefix.len(),
        input.len()
    );
    match &whole {
        Ok(None) => assert!(
            input.len() < http::MAX_REQUEST_HEAD,
            "need more past the limit"
        ),
        Ok(Some(head)) => {
            assert!(
                head.head_len <= input.len() && head.head_len <= http::MAX_REQUEST_HEAD,
                "head_len {} out of range",
                head.head_len
            );
            // The head is complete by itself: parsing just those bytes must give the same head.
            let exact = input.get(..head.head_len).unwrap_or(input);
            assert_eq!(
                http::parse_request_head(exact).as_ref(),
                Ok(&Some(head.clone()))
            );
            if let Some(host) = &head.host {
                let plain = is_host_name(host.as_bytes());
                let ipv6 = host.parse::<std::net::Ipv6Addr>().is_ok();
                assert!(plain || ipv6, "bad Host accepted: {host:?}");
                assert_eq!(*host, host.to_ascii_lowercase(), "Host not lowercased");
            }
        }
        Err(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::{Rng, captured_openssl_hello, chrome_like_hello};
    use super::*;

    #[test]
    fn display_carries_the_detail() {
        let text = HelloError::Malformed("duplicate extension").to_string();
        assert_eq!(text, "malformed ClientHello: duplicate extension");
        assert!(HelloError::TooLarge.to_string().contains("16384"));
        assert!(
            HelloError::HeadTooLarge
                .to_string()
                .contains("larger than max_request_head")
        );
    }

    #[test]
    fn host_names() {
        for good in [
            &b"a"[..],
            b"a.example",
            b"A-b_c.example.",
            b"192.0.2.1",
            b"xn--bcher-kva.example",
        ] {
            assert!(is_host_name(good), "{good:?}");
        }
        let long_label = [b'a'; 64];
        let long_name = b"a.".repeat(128);
        for bad in [
            &b""[..],
            b".",
            b"..",
            b"a..b",
            b".a",
            b"*.example",
            b"a b",
            b"a\0b",
            b"caf\xc3\xa9.example",
            b"a.example..",
            &long_label,
            &long_name,
        ] {
            assert!(!is_host_name(bad), "{bad:?}");
        }
    }

    /// Runs the fuzz targets' checks on stable: random bytes, valid hellos cut anywhere, and
    /// mutated hellos and heads.
    #[test]
    fn fuzz_checks_hold_on_generated_inputs() {
        let rng = Rng::new(0x5eed_f022);
        let hellos = [
            chrome_like_hello(Some("www.example.com"), 1).bytes,
            chrome_like_hello(None, 3).bytes,
            captured_openssl_hello(),
        ];
        let heads: [&[u8]; 3] = [
            b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n",
            b"POST http://[2001:db8::1]:8080/x HTTP/1.1\r\nHost: b\r\nContent-Length: 3\r\n\r\nabc",
            b"\r\nGET / HTTP/1.0\nUser-Agent: x\n\n",
        ];
        for round in 0..600 {
            let mut tls = vec![rng.byte()];
            let mut http = vec![rng.byte()];
            match round % 3 {
                0 => {
                    tls.extend(rng.bytes(rng.below(64)));
                    http.extend(rng.bytes(rng.below(64)));
                }
                1 => {
                    tls.extend(rng.pick(&hellos));
                    http.extend_from_slice(rng.pick(&heads));
                }
                _ => {
                    tls.extend(rng.mutate(rng.pick(&hellos)));
                    http.extend(rng.mutate(rng.pick(&heads)));
                }
            }
            fuzz_check_tls(&tls);
            fuzz_check_http(&http);
        }
        fuzz_check_tls(&[]);
        fuzz_check_http(&[]);
    }
}
