//! The HTTP/1.x request head: read up to the blank line for the Host to route on.
//!
//! Parsing is done by `httparse`, which is widely fuzzed; this module adds the size limit, the
//! early "this is not HTTP" decision, and the rules for which host a request names. Like httparse,
//! it accepts bare LF line endings (RFC 9112 §2.2 allows a recipient to) and skips empty lines
//! before the request line.

// Input-dependent indexing is the usual way such parsers panic; every access here is checked.
#![deny(clippy::indexing_slicing)]

use std::net::Ipv6Addr;

use super::HelloError;

/// The longest request head (request line, header lines, blank line) [`parse_request_head`]
/// waits for; the proxy itself uses the configured `max_request_head` (16 KiB unless set).
#[cfg(any(test, fuzzing))]
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// The most header lines we read; more is refused like a head that is too long (431).
pub const MAX_HEADERS: usize = 64;

/// What the router needs from a request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// The requested host, ASCII-lowercased, without port or IPv6 brackets (`[2001:db8::1]:80`
    /// gives `2001:db8::1`), trailing dot kept as sent. Taken from an absolute-form request
    /// target if there is one (RFC 9112 §3.2.2: the target then wins over `Host`), else from the
    /// `Host` header. `None` for an HTTP/1.0 request without `Host`, or an empty `Host`: routing
    /// then goes to the default site.
    pub host: Option<String>,
    /// The request method as sent (`GET`), for the access log.
    pub method: String,
    /// The request target as sent (`/index.html`, or `http://a.example/` in absolute form), for
    /// the access log.
    pub path: String,
    /// The length of the head in bytes, including the blank line that ends it. Bytes after it
    /// are body or a pipelined request.
    pub head_len: usize,
}

/// Reads the request head from `buf`, every byte read from the client so far.
///
/// `Ok(None)` means the head has not ended yet and still can within [`MAX_REQUEST_HEAD`] bytes:
/// read more and call again. At exactly [`MAX_REQUEST_HEAD`] bytes without the end of the head
/// the answer is already [`HelloError::HeadTooLarge`], since no further byte can make it fit.
/// An `Err` is final (`crate::outcome` says what the client is told).
///
/// A first byte that cannot begin a request line gives [`HelloError::NotHttp`] at once, so a TLS
/// ClientHello sent to the HTTP port is refused without waiting for more bytes. An HTTP/1.1
/// request without `Host` is a [`HelloError::BadRequest`] (RFC 9112 §3.2), as is more than one
/// `Host` or a `Host` that is not a host name or bracketed IPv6 address with an optional port.
#[cfg(any(test, fuzzing))]
pub fn parse_request_head(buf: &[u8]) -> Result<Option<RequestHead>, HelloError> {
    parse_request_head_within(buf, MAX_REQUEST_HEAD)
}

/// `parse_request_head` with `limit` bytes in place of `MAX_REQUEST_HEAD` (the configured
/// `max_request_head`).
pub fn parse_request_head_within(
    buf: &[u8],
    limit: usize,
) -> Result<Option<RequestHead>, HelloError> {
    let window = buf.get(..limit).unwrap_or(buf);
    if let Some(first) = first_request_line_byte(window)
        && !is_token_byte(first)
    {
        return Err(HelloError::NotHttp);
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let head_len = match request.parse(window) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= limit => {
            return Err(HelloError::HeadTooLarge);
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(error) => return Err(from_httparse(error)),
    };
    let (Some(method), Some(path), Some(version)) = (request.method, request.path, request.version)
    else {
        // httparse fills all three for a complete request; refuse rather than assume.
        return Err(HelloError::BadRequest("incomplete request line"));
    };

    let host = request_host(path, version, request.headers)?;
    Ok(Some(RequestHead {
        host,
        method: method.to_owned(),
        path: path.to_owned(),
        head_len,
    }))
}

/// The host a parsed request names (see [`RequestHead::host`]), or why it cannot be routed.
pub(crate) fn request_host(
    path: &str,
    version: u8,
    headers: &[httparse::Header<'_>],
) -> Result<Option<String>, HelloError> {
    let mut host_values = headers
        .iter()
        .filter(|header| header.name.eq_ignore_ascii_case("host"))
        .map(|header| header.value);
    let host_value = host_values.next();
    if host_values.next().is_some() {
        return Err(HelloError::BadRequest("more than one Host header"));
    }
    // An invalid Host is refused even when the target names the host: the backend would refuse
    // it too (RFC 9112 §3.2), and we must not route on a request the backend reads differently.
    let from_header = match host_value {
        Some(value) => host_of_authority(value.trim_ascii())?,
        None => None,
    };
    let host = match absolute_form_authority(path) {
        Some(authority) => Some(host_of_authority(authority)?.ok_or(HelloError::BadRequest(
            "absolute-form target without a host",
        ))?),
        None if host_value.is_none() && version >= 1 => {
            return Err(HelloError::BadRequest("HTTP/1.1 request without Host"));
        }
        None => from_header,
    };
    Ok(host)
}

/// `400 Bad Request`: the head is not a request we can route (bad or missing Host, bad syntax).
pub fn response_400() -> &'static [u8] {
    b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\
      Connection: close\r\n\r\nbad request\n"
}

/// `421 Misdirected Request`: this proxy does not serve the requested host (RFC 9110 §15.5.20),
/// which tells clients reusing a connection for another name to open a new one.
pub fn response_421() -> &'static [u8] {
    b"HTTP/1.1 421 Misdirected Request\r\nContent-Type: text/plain\r\nContent-Length: 20\r\n\
      Connection: close\r\n\r\nmisdirected request\n"
}

/// `431 Request Header Fields Too Large`: the head is over `max_request_head` bytes or
/// [`MAX_HEADERS`] lines (RFC 6585 §5).
pub fn response_431() -> &'static [u8] {
    b"HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain\r\n\
      Content-Length: 32\r\nConnection: close\r\n\r\nrequest header fields too large\n"
}

/// `502 Bad Gateway`: the site's backend cannot be reached.
pub fn response_502() -> &'static [u8] {
    b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\n\
      Content-Length: 28\r\nConnection: close\r\n\r\nthe backend is unreachable.\n"
}

/// `504 Gateway Timeout`: the site's backend did not accept the connection in time.
pub fn response_504() -> &'static [u8] {
    b"HTTP/1.1 504 Gateway Timeout\r\nContent-Type: text/plain\r\n\
      Content-Length: 35\r\nConnection: close\r\n\r\nthe backend did not answer in time\n"
}

/// The first byte of the request line, after the empty lines httparse skips (`\r\n` or `\n`).
/// `None` when it has not arrived, or when a `\r` is not followed by `\n`: httparse refuses that
/// itself, and deciding it here too could give a prefix a different answer than the whole.
fn first_request_line_byte(window: &[u8]) -> Option<u8> {
    let mut rest = window;
    loop {
        match rest {
            [b'\r', b'\n', tail @ ..] | [b'\n', tail @ ..] => rest = tail,
            [b'\r', ..] | [] => return None,
            [first, ..] => return Some(*first),
        }
    }
}

/// RFC 9110 §5.6.2 `tchar`: the bytes a method token is made of.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn from_httparse(error: httparse::Error) -> HelloError {
    match error {
        httparse::Error::TooManyHeaders => HelloError::HeadTooLarge,
        httparse::Error::HeaderName => HelloError::BadRequest("invalid header name"),
        httparse::Error::HeaderValue => HelloError::BadRequest("invalid header value"),
        httparse::Error::NewLine => HelloError::BadRequest("invalid line ending"),
        httparse::Error::Status => HelloError::BadRequest("invalid status"),
        httparse::Error::Token => HelloError::BadRequest("invalid method or target"),
        httparse::Error::Version => HelloError::BadRequest("unsupported HTTP version"),
    }
}

/// The authority of an `http://` or `https://` absolute-form request target, up to the first
/// `/`, `?` or `#`; `None` for origin-form (`/path`) and every other form.
fn absolute_form_authority(target: &str) -> Option<&[u8]> {
    let target = target.as_bytes();
    let after_scheme = [&b"http://"[..], b"https://"].iter().find_map(|scheme| {
        let (head, rest) = target.split_at_checked(scheme.len())?;
        head.eq_ignore_ascii_case(scheme).then_some(rest)
    })?;
    let end = after_scheme
        .iter()
        .position(|b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(after_scheme.len());
    after_scheme.get(..end)
}

/// The host of `host[:port]` or `[ipv6][:port]`, lowercased; `None` when empty (an empty Host
/// is valid for a target without authority, RFC 9110 §7.2). User info, IPv6 zones, unbracketed
/// IPv6 and non-numeric ports are refused.
fn host_of_authority(authority: &[u8]) -> Result<Option<String>, HelloError> {
    const BAD: HelloError = HelloError::BadRequest("Host is not host[:port]");
    if authority.is_empty() {
        return Ok(None);
    }
    let (host, port) = if let Some(bracketed) = authority.strip_prefix(b"[") {
        let close = bracketed.iter().position(|&b| b == b']').ok_or(BAD)?;
        let (address, rest) = bracketed.split_at_checked(close).ok_or(BAD)?;
        let valid = std::str::from_utf8(address).is_ok_and(|text| text.parse::<Ipv6Addr>().is_ok());
        if !valid {
            return Err(BAD);
        }
        (address, rest.get(1..).unwrap_or_default())
    } else {
        let colon = authority
            .iter()
            .position(|&b| b == b':')
            .unwrap_or(authority.len());
        let (name, rest) = authority.split_at_checked(colon).ok_or(BAD)?;
        if !super::is_host_name(name) {
            return Err(BAD);
        }
        (name, rest)
    };
    // RFC 3986 allows an empty port after the colon.
    let port_ok = port.is_empty()
        || port.strip_prefix(b":").is_some_and(|digits| {
            digits.is_empty()
                || (digits.iter().all(u8::is_ascii_digit)
                    && std::str::from_utf8(digits).is_ok_and(|text| text.parse::<u16>().is_ok()))
        });
    if !port_ok {
        return Err(BAD);
    }
    Ok(Some(super::lowercase_ascii(host)))
}

#[cfg(test)]
mod tests;
