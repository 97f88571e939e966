//! HTTP/1.1 framing for sites that get the client's address in a header (`forwarded_header`).
//!
//! Sans-IO, like `hello`: [`RequestFramer`] and [`ResponseFramer`] are handed the bytes read
//! so far and say what their first bytes are (a head, body bytes to pass on unchanged, or "need
//! more"); `forward::http` does the reading and writing. Bodies are never buffered: a body step
//! only names how many bytes pass. A request head is rewritten only by removing and adding the
//! forwarding header lines; every other byte goes on as the client sent it. Responses are not
//! changed at all, only framed, so that the response to the next request is found.
//!
//! Anything two HTTP parsers could read differently (request smuggling) is refused with a
//! [`RequestError`] that names the reason; the connection then gets a `400` and closes.

// Input-dependent indexing is the usual way such parsers panic; every access here is checked.
#![deny(clippy::indexing_slicing)]

mod chunked;
mod response;
#[cfg(test)]
mod tests;

use std::{fmt, io::Write as _, mem::MaybeUninit, net::SocketAddr};

use chunked::{Chunk, Chunked};
pub use response::{ResponseError, ResponseFramer, ResponseStep};

use crate::{config::ForwardedHeader, hello::HelloError};

/// The most header lines a request head may have; more is refused like a head too long.
const MAX_HEADERS: usize = crate::hello::http::MAX_HEADERS;

/// Why a request was refused. Each is its own outcome (`crate::outcome`), so an operator can
/// see which kind of bad input arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestError {
    /// Both `Content-Length` and `Transfer-Encoding` (RFC 9112 §6.1: the classic smuggling).
    ContentLengthAndTransferEncoding,
    /// Several `Content-Length` values that differ.
    ConflictingContentLength,
    /// A `Content-Length` that is not a decimal number.
    InvalidContentLength,
    /// A `Transfer-Encoding` whose last coding is not `chunked`, that has `chunked` twice, or
    /// that an HTTP/1.0 request sent.
    BadTransferEncoding,
    /// A header line continued on the next line (obsolete line folding, RFC 9112 §5.2).
    ObsFold,
    /// A CR or LF alone where the head needs CRLF.
    BareLineEnding,
    /// A chunked body that breaks the coding.
    InvalidChunk,
    /// The head does not end within the configured limit, or has too many lines.
    HeadTooLarge,
    /// A NUL byte in the head.
    Nul,
    /// Any other bad head (request line, header syntax, Host); the text says what.
    Malformed(&'static str),
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RequestError::ContentLengthAndTransferEncoding => {
                "both Content-Length and Transfer-Encoding"
            }
            RequestError::ConflictingContentLength => "Content-Length values differ",
            RequestError::InvalidContentLength => "Content-Length is not a number",
            RequestError::BadTransferEncoding => "Transfer-Encoding other than a final chunked",
            RequestError::ObsFold => "obsolete line folding",
            RequestError::BareLineEnding => "bare CR or LF in the head",
            RequestError::InvalidChunk => "invalid chunked body",
            RequestError::HeadTooLarge => "request head over the size limit",
            RequestError::Nul => "NUL byte in the head",
            RequestError::Malformed(what) => what,
        })
    }
}

impl std::error::Error for RequestError {}

impl From<HelloError> for RequestError {
    fn from(error: HelloError) -> RequestError {
        match error {
            HelloError::HeadTooLarge => RequestError::HeadTooLarge,
            HelloError::BadRequest(what) => RequestError::Malformed(what),
            _ => RequestError::Malformed("not an HTTP request"),
        }
    }
}

/// What the header lines added to each request say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forwarding {
    /// `X-Forwarded-For` or `Forwarded`; with `None` only the proto and port lines are added.
    pub header: ForwardedHeader,
    /// The client's address and port, as the proxy's socket saw them.
    pub client: SocketAddr,
    /// The port the client connected to (`X-Forwarded-Port`).
    pub port: u16,
    /// Whether the client is a trusted proxy: its own forwarding headers are then kept and
    /// appended to, instead of removed.
    pub trusted: bool,
}

/// What a complete request head says, for the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Bytes of input the head took (the rewritten head is in the output buffer).
    pub len: usize,
    /// The host it names, as the hello parser reads it, for routing.
    pub host: Option<String>,
    /// What the response to it will be framed by.
    pub pending: Pending,
    /// Whether the request ends with its head (no body).
    pub ends_message: bool,
}

/// What the response framer must know about the request it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pending {
    /// A `HEAD` request: the response has no body whatever its headers say.
    pub head: bool,
    /// A `CONNECT`: a 2xx response turns the connection into a tunnel.
    pub connect: bool,
    /// Asked to switch protocols (`Upgrade` and `Connection: upgrade`): a 101 turns the
    /// connection into a byte stream.
    pub upgrade: bool,
}

/// What the first bytes of a request stream are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestStep {
    /// Nothing can be decided from these bytes: read more.
    NeedMore,
    /// A complete head; its rewritten form was appended to the output buffer.
    Head(RequestHead),
    /// The next `len` bytes are body, passed on unchanged.
    Body {
        /// How many.
        len: usize,
        /// Whether they end the request.
        ends_message: bool,
    },
    /// The last request asked to switch protocols and is complete: nothing more is read until
    /// its response says whether the switch happened ([`RequestFramer::resume`] if not).
    AwaitSwitch,
}

/// Frames a client's requests, one after the other, and rewrites their heads.
#[derive(Debug, Clone)]
pub struct RequestFramer {
    state: State,
    forwarding: Forwarding,
    /// The values of the lines added to each head, formatted once for the connection.
    ours: Ours,
    limit: usize,
    /// Where the head's line not yet checked starts.
    scanned: usize,
    /// Whether the request line was seen (empty lines before it are allowed).
    request_line: bool,
    /// Whether the request in progress asked to switch protocols.
    switch_after_body: bool,
    /// The last request's only `Host` value (trimmed) with an origin-form target, and the host
    /// it gave: a connection's requests nearly always name the same host.
    last_host: Option<(Vec<u8>, Option<String>)>,
}

#[derive(Debug, Clone)]
enum State {
    Head,
    Length(u64),
    Chunked(Chunked),
    AwaitSwitch,
}

impl RequestFramer {
    /// A framer for a new connection: the first request head comes next. Heads longer than
    /// `limit` bytes are refused.
    pub fn new(forwarding: Forwarding, limit: usize) -> RequestFramer {
        RequestFramer {
            state: State::Head,
            forwarding,
            ours: Ours::new(&forwarding),
            limit,
            scanned: 0,
            request_line: false,
            switch_after_body: false,
            last_host: None,
        }
    }

    /// Says what the first bytes of `input` (everything read and not yet consumed) are. For a
    /// head, the rewritten head is appended to `out`. An error is final.
    pub fn step(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<RequestStep, RequestError> {
        match &mut self.state {
            State::Head => self.head(input, out),
            State::AwaitSwitch => Ok(RequestStep::AwaitSwitch),
            State::Length(left) => {
                if input.is_empty() {
                    return Ok(RequestStep::NeedMore);
                }
                let n = usize::try_from(*left).map_or(input.len(), |l| l.min(input.len()));
                *left -= n as u64;
                let ends_message = *left == 0;
                if ends_message {
                    self.end_message();
                }
                Ok(RequestStep::Body {
                    len: n,
                    ends_message,
                })
            }
            State::Chunked(chunked) => match chunked.step(input) {
                Err(_) => Err(RequestError::InvalidChunk),
                Ok(Chunk::NeedMore) => Ok(RequestStep::NeedMore),
                Ok(Chunk::Pass(len)) => Ok(RequestStep::Body {
                    len,
                    ends_message: false,
                }),
                Ok(Chunk::End(len)) => {
                    self.end_message();
                    Ok(RequestStep::Body {
                        len,
                        ends_message: true,
                    })
                }
            },
        }
    }

    /// The response to the request that asked to switch protocols did not switch: framing
    /// goes on with the next request.
    pub fn resume(&mut self) {
        if matches!(self.state, State::AwaitSwitch) {
            self.state = State::Head;
        }
    }

    fn end_message(&mut self) {
        self.state = if self.switch_after_body {
            State::AwaitSwitch
        } else {
            State::Head
        };
    }

    fn head(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<RequestStep, RequestError> {
        let Some(len) = self.scan(input)? else {
            return Ok(RequestStep::NeedMore);
        };
        self.scanned = 0;
        self.request_line = false;
        let head = input.get(..len).ok_or(RequestError::HeadTooLarge)?;
        // Uninitialised: httparse writes each header it finds, and an initialised array would
        // be written whole (2 KiB) for every request.
        let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut []);
        match request.parse_with_uninit_headers(head, &mut headers) {
            Ok(httparse::Status::Complete(n)) if n == len => {}
            Ok(_) => return Err(RequestError::Malformed("incomplete request head")),
            Err(httparse::Error::TooManyHeaders) => return Err(RequestError::HeadTooLarge),
            Err(_) => return Err(RequestError::Malformed("invalid request head")),
        }
        let (Some(method), Some(path), Some(version)) =
            (request.method, request.path, request.version)
        else {
            return Err(RequestError::Malformed("incomplete request line"));
        };
        let host = self.host(path, version, request.headers)?;
        let framing = framing(request.headers, version)?;
        let pending = Pending {
            head: method == "HEAD",
            connect: method == "CONNECT",
            upgrade: framing.upgrade,
        };
        self.switch_after_body = pending.connect || pending.upgrade;
        self.state = match framing.body {
            Body::Chunked => State::Chunked(Chunked::new()),
            Body::Length(n) if n > 0 => State::Length(n),
            Body::Length(_) => State::Head,
        };
        let ends_message = matches!(self.state, State::Head);
        if ends_message {
            self.end_message();
        }
        rewrite(head, request.headers, &self.forwarding, &self.ours, out);
        Ok(RequestStep::Head(RequestHead {
            len,
            host,
            pending,
            ends_message,
        }))
    }

    /// The host a request names ([`crate::hello::http::request_host`]). With an origin-form
    /// target and one `Host` line, the host depends on that line's value alone: when it is the
    /// last request's, so is the answer.
    fn host(
        &mut self,
        path: &str,
        version: u8,
        headers: &[httparse::Header<'_>],
    ) -> Result<Option<String>, RequestError> {
        let mut hosts = headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case("host"));
        let single = match (hosts.next(), hosts.next()) {
            (Some(only), None) if path.starts_with('/') => Some(only.value.trim_ascii()),
            _ => None,
        };
        if let (Some(value), Some((last, host))) = (single, &self.last_host)
            && value == last.as_slice()
        {
            return Ok(host.clone());
        }
        let host = crate::hello::http::request_host(path, version, headers)?;
        self.last_host = single.map(|value| (value.to_vec(), host.clone()));
        Ok(host)
    }

    /// Checks the head's line endings and bytes, line by line from where the last call
    /// stopped; gives the head's length once its empty line arrived.
    fn scan(&mut self, input: &[u8]) -> Result<Option<usize>, RequestError> {
        let window = input.get(..self.limit).unwrap_or(input);
        let more = |framer: &mut RequestFramer, pos: usize| {
            framer.scanned = pos;
            if input.len() >= framer.limit {
                Err(RequestError::HeadTooLarge)
            } else {
                Ok(None)
            }
        };
        let mut pos = self.scanned;
        loop {
            let rest = window.get(pos..).unwrap_or_default();
            let Some(at) = rest
                .iter()
                .position(|&b| b == b'\r' || b == b'\n' || b == 0)
            else {
                return more(self, pos);
            };
            match (rest.get(at), rest.get(at + 1)) {
                (Some(0), _) => return Err(RequestError::Nul),
                (Some(b'\n'), _) => return Err(RequestError::BareLineEnding),
                (Some(b'\r'), None) => return more(self, pos),
                (Some(b'\r'), Some(b'\n')) => {}
                _ => return Err(RequestError::BareLineEnding),
            }
            let next = pos + at + 2;
            if at == 0 {
                if self.request_line {
                    return Ok(Some(next));
                }
                // Empty lines before the request line are allowed (RFC 9112 §2.2).
                pos = next;
                continue;
            }
            if self.request_line {
                // The line after this one must be seen to rule out a fold.
                match window.get(next) {
                    None => return more(self, pos),
                    Some(b' ' | b'\t') => return Err(RequestError::ObsFold),
                    Some(_) => {}
                }
            } else if matches!(rest.first(), Some(b' ' | b'\t')) {
                return Err(RequestError::Malformed(
                    "whitespace before the request line",
                ));
            }
            self.request_line = true;
            pos = next;
        }
    }
}

/// The specific reason a head the hello parser refused breaks the rules on bytes (a NUL, a fold,
/// a bare CR or LF), so that the first request of a connection is counted like any later one.
pub fn byte_error(head: &[u8], limit: usize) -> Option<RequestError> {
    let forwarding = Forwarding {
        header: ForwardedHeader::None,
        client: SocketAddr::from(([0, 0, 0, 0], 0)),
        port: 0,
        trusted: false,
    };
    let error = RequestFramer::new(forwarding, limit).scan(head).err()?;
    matches!(
        error,
        RequestError::Nul | RequestError::ObsFold | RequestError::BareLineEnding
    )
    .then_some(error)
}

/// How a request's body is framed.
enum Body {
    Length(u64),
    Chunked,
}

struct Framing {
    body: Body,
    upgrade: bool,
}

/// Reads the framing headers, refusing every combination two parsers could read differently.
fn framing(headers: &[httparse::Header<'_>], version: u8) -> Result<Framing, RequestError> {
    let named = |name: &'static str| {
        headers
            .iter()
            .filter(move |h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value)
    };
    let has_cl = named("content-length").next().is_some();
    let has_te = named("transfer-encoding").next().is_some();
    if has_cl && has_te {
        return Err(RequestError::ContentLengthAndTransferEncoding);
    }
    let mut length: Option<u64> = None;
    for value in named("content-length") {
        for item in value.split(|&b| b == b',') {
            let item = item.trim_ascii();
            if item.is_empty() || item.len() > 18 || !item.iter().all(u8::is_ascii_digit) {
                return Err(RequestError::InvalidContentLength);
            }
            let n = item.iter().fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
            match length {
                Some(first) if first != n => return Err(RequestError::ConflictingContentLength),
                _ => length = Some(n),
            }
        }
    }
    let body = if has_te {
        if version == 0 {
            return Err(RequestError::BadTransferEncoding);
        }
        let codings: Vec<&[u8]> = named("transfer-encoding")
            .flat_map(|v| v.split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .collect();
        let chunked = |c: &[u8]| c.eq_ignore_ascii_case(b"chunked");
        let valid = codings
            .iter()
            .all(|c| !c.is_empty() && c.iter().all(|&b| is_token_byte(b)));
        if !valid
            || codings.iter().filter(|c| chunked(c)).count() != 1
            || !codings.last().is_some_and(|c| chunked(c))
        {
            return Err(RequestError::BadTransferEncoding);
        }
        Body::Chunked
    } else {
        Body::Length(length.unwrap_or(0))
    };
    let connection_upgrade = named("connection")
        .flat_map(|v| v.split(|&b| b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"));
    let upgrade = connection_upgrade && named("upgrade").next().is_some();
    Ok(Framing { body, upgrade })
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// What the lines added to each request say, formatted once per connection: the client's
/// address is the same on every request.
#[derive(Debug, Clone)]
struct Ours {
    /// The value of `X-Forwarded-For` (the address) or `Forwarded` (`for=...;proto=http`);
    /// empty when neither is added.
    value: Vec<u8>,
    /// The `X-Forwarded-Port` value.
    port: Vec<u8>,
}

impl Ours {
    fn new(forwarding: &Forwarding) -> Ours {
        let client = SocketAddr::new(
            forwarding.client.ip().to_canonical(),
            forwarding.client.port(),
        );
        let mut value = Vec::new();
        // Writing to a Vec cannot fail.
        let _ = match forwarding.header {
            ForwardedHeader::XForwardedFor => write!(value, "{}", client.ip()),
            // RFC 7239 §4: a node with a port is not a token (':' is not a tchar), so it is
            // quoted; IPv6 is bracketed as well.
            ForwardedHeader::Forwarded => write!(value, "for=\"{client}\";proto=http"),
            ForwardedHeader::None => Ok(()),
        };
        Ours {
            value,
            port: forwarding.port.to_string().into_bytes(),
        }
    }

    /// Appends our lines: the forwarding header after what a trusted client already said in
    /// it (`prior`), then the proto and port lines unless the client's were kept.
    fn append(
        &self,
        header: ForwardedHeader,
        prior: &[&[u8]],
        kept_proto: bool,
        kept_port: bool,
        out: &mut Vec<u8>,
    ) {
        let name: &[u8] = match header {
            ForwardedHeader::XForwardedFor => b"X-Forwarded-For: ",
            ForwardedHeader::Forwarded => b"Forwarded: ",
            ForwardedHeader::None => b"",
        };
        if !name.is_empty() {
            out.extend_from_slice(name);
            for p in prior {
                out.extend_from_slice(p);
                out.extend_from_slice(b", ");
            }
            out.extend_from_slice(&self.value);
            out.extend_from_slice(b"\r\n");
        }
        if !kept_proto {
            out.extend_from_slice(b"X-Forwarded-Proto: http\r\n");
        }
        if !kept_port {
            out.extend_from_slice(b"X-Forwarded-Port: ");
            out.extend_from_slice(&self.port);
            out.extend_from_slice(b"\r\n");
        }
    }
}

/// The header lines a client may not set unless it is trusted.
const FORWARDING_HEADERS: [&str; 4] = [
    "x-forwarded-for",
    "forwarded",
    "x-forwarded-proto",
    "x-forwarded-port",
];

fn is_forwarding_header(name: &[u8]) -> bool {
    FORWARDING_HEADERS
        .iter()
        .any(|h| name.eq_ignore_ascii_case(h.as_bytes()))
}

/// Appends `head` to `out` with the forwarding lines removed and ours added before the empty
/// line. `head` is a complete, checked head: every line ends with CRLF, and `headers` are its
/// header lines as httparse read them, in order.
fn rewrite(
    head: &[u8],
    headers: &[httparse::Header<'_>],
    forwarding: &Forwarding,
    ours: &Ours,
    out: &mut Vec<u8>,
) {
    out.reserve(head.len() + 128);
    if !headers
        .iter()
        .any(|h| is_forwarding_header(h.name.as_bytes()))
    {
        // Nothing to remove (the usual case): every line but the empty one that ends the head
        // goes on as it came, in one copy.
        out.extend_from_slice(head.get(..head.len().saturating_sub(2)).unwrap_or(head));
        ours.append(forwarding.header, &[], false, false, out);
        out.extend_from_slice(b"\r\n");
        return;
    }
    let own = match forwarding.header {
        ForwardedHeader::XForwardedFor => Some("x-forwarded-for"),
        ForwardedHeader::Forwarded => Some("forwarded"),
        ForwardedHeader::None => None,
    };
    // What a trusted client already said, to append to.
    let mut prior: Vec<&[u8]> = Vec::new();
    let mut kept_proto = false;
    let mut kept_port = false;
    let mut lines = head.split_inclusive(|&b| b == b'\n');
    // Empty lines before the request line, then the request line itself.
    for line in lines.by_ref() {
        out.extend_from_slice(line);
        if line != b"\r\n" {
            break;
        }
    }
    for line in lines.take(headers.len()) {
        let colon = line.iter().position(|&b| b == b':').unwrap_or(line.len());
        let (name, rest) = line.split_at(colon);
        if !is_forwarding_header(name) {
            out.extend_from_slice(line);
            continue;
        }
        if !forwarding.trusted {
            continue;
        }
        if own.is_some_and(|o| name.eq_ignore_ascii_case(o.as_bytes())) {
            let value = rest.get(1..).unwrap_or_default().trim_ascii();
            if !value.is_empty() {
                prior.push(value);
            }
            continue;
        }
        kept_proto |= name.eq_ignore_ascii_case(b"x-forwarded-proto");
        kept_port |= name.eq_ignore_ascii_case(b"x-forwarded-port");
        out.extend_from_slice(line);
    }
    ours.append(forwarding.header, &prior, kept_proto, kept_port, out);
    out.extend_from_slice(b"\r\n");
}

#[cfg(any(test, fuzzing))]
/// The body of the `http_requests` fuzz target: frames `data[1..]` whole, and again in reads
/// cut where `data[0]` says, and panics if the two disagree, if a step makes no progress, or if
/// the output is not the input with only forwarding lines changed.
pub fn fuzz_check_requests(data: &[u8]) {
    let Some((&selector, input)) = data.split_first() else {
        return;
    };
    let whole = tests_support::run(input, input.len().max(1));
    let split = tests_support::run(input, usize::from(selector % 64) + 1);
    assert_eq!(whole, split, "split {} disagrees", selector % 64 + 1);
    // Without forwarding lines of its own, the output is what was consumed plus ours.
    let lowercase = input.to_ascii_lowercase();
    if !lowercase.windows(9).any(|w| w == b"forwarded") {
        let ours =
            b"X-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Port: 80\r\n";
        let mut stripped = Vec::with_capacity(whole.out.len());
        let mut rest = whole.out.as_slice();
        while let Some(at) = rest.windows(ours.len()).position(|w| w == ours) {
            stripped.extend_from_slice(rest.get(..at).unwrap_or_default());
            rest = rest.get(at + ours.len()..).unwrap_or_default();
        }
        stripped.extend_from_slice(rest);
        assert_eq!(
            stripped,
            input.get(..whole.consumed).unwrap_or_default(),
            "output is not the input plus our lines"
        );
    }
}

#[cfg(any(test, fuzzing))]
/// Drives a [`RequestFramer`] the way `forward::http` does, for tests and fuzzing.
pub(crate) mod tests_support {
    use super::*;

    /// What a run produced: the bytes sent on, the heads seen, and the error or where it
    /// stopped.
    #[derive(Debug, PartialEq, Eq)]
    pub(crate) struct Run {
        pub out: Vec<u8>,
        pub heads: Vec<Option<String>>,
        pub end: Result<usize, RequestError>,
        pub consumed: usize,
    }

    /// The framer the checks run: X-Forwarded-For for an untrusted client, a 4 KiB head limit.
    pub(crate) fn framer() -> RequestFramer {
        let forwarding = Forwarding {
            header: ForwardedHeader::XForwardedFor,
            client: SocketAddr::from(([192, 0, 2, 7], 4711)),
            port: 80,
            trusted: false,
        };
        RequestFramer::new(forwarding, 4096)
    }

    /// Feeds `input` at most `read` bytes at a time; a switch request resumes at once.
    pub(crate) fn run(input: &[u8], read: usize) -> Run {
        let mut framer = framer();
        let mut out = Vec::new();
        let mut heads = Vec::new();
        let mut at = 0;
        let mut available = read.min(input.len());
        loop {
            let buffered = input.get(at..available).unwrap_or_default();
            let step = match framer.step(buffered, &mut out) {
                Ok(step) => step,
                Err(e) => {
                    return Run {
                        out,
                        heads,
                        end: Err(e),
                        consumed: at,
                    };
                }
            };
            match step {
                RequestStep::NeedMore | RequestStep::AwaitSwitch if available >= input.len() => {
                    if matches!(step, RequestStep::AwaitSwitch) && at < input.len() {
                        framer.resume();
                        continue;
                    }
                    return Run {
                        out,
                        heads,
                        end: Ok(at),
                        consumed: at,
                    };
                }
                RequestStep::NeedMore => available = (available + read).min(input.len()),
                RequestStep::AwaitSwitch => framer.resume(),
                RequestStep::Head(head) => {
                    assert!(head.len > 0 && head.len <= buffered.len());
                    at += head.len;
                    heads.push(head.host);
                }
                RequestStep::Body { len, .. } => {
                    assert!(len > 0 && len <= buffered.len());
                    out.extend_from_slice(buffered.get(..len).unwrap_or_default());
                    at += len;
                }
            }
            available = available.max(at);
        }
    }
}
