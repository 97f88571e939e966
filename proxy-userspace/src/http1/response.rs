//! Framing a backend's responses (RFC 9112 §6.3), without changing a byte: only to know where
//! each one ends, so that the next request's response is found and a switch of protocols is
//! seen.

use std::{fmt, mem::MaybeUninit};

use super::{
    Pending,
    chunked::{Chunk, Chunked},
};

/// The longest response head we wait for (cookies make them longer than requests).
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// The most header lines a response may have.
const MAX_RESPONSE_HEADERS: usize = 128;

/// A response we cannot frame: the connection is closed, since the client may already hold
/// part of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseError(&'static str);

impl fmt::Display for ResponseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad response from the backend: {}", self.0)
    }
}

impl std::error::Error for ResponseError {}

/// What a complete response head says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHead {
    /// Bytes the head took; they pass on unchanged.
    pub len: usize,
    /// A 1xx other than 101: the final response to the same request follows.
    pub interim: bool,
    /// The connection is now a byte stream (101 to an upgrade, 2xx to a CONNECT).
    pub tunnel: bool,
    /// Whether the response ends with its head.
    pub ends_message: bool,
}

/// What the first bytes of a response stream are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseStep {
    /// Read more.
    NeedMore,
    /// A complete head.
    Head(ResponseHead),
    /// The next `len` bytes are body.
    Body {
        /// How many.
        len: usize,
        /// Whether they end the response (never for a body delimited by the close).
        ends_message: bool,
    },
}

/// Frames a backend's responses, one after the other.
#[derive(Debug)]
pub struct ResponseFramer {
    state: State,
}

#[derive(Debug)]
enum State {
    Head,
    Length(u64),
    Chunked(Chunked),
    UntilClose,
}

impl Default for ResponseFramer {
    fn default() -> Self {
        ResponseFramer::new()
    }
}

impl ResponseFramer {
    /// A framer whose first response head comes next.
    pub fn new() -> ResponseFramer {
        ResponseFramer { state: State::Head }
    }

    /// Says what the first bytes of `input` are. `request` is the request the next response
    /// head answers (`None` if the backend answers none: it is framed as for a `GET`).
    pub fn step(
        &mut self,
        input: &[u8],
        request: Option<Pending>,
    ) -> Result<ResponseStep, ResponseError> {
        match &mut self.state {
            State::Head => self.head(input, request.unwrap_or_default()),
            State::UntilClose => Ok(if input.is_empty() {
                ResponseStep::NeedMore
            } else {
                ResponseStep::Body {
                    len: input.len(),
                    ends_message: false,
                }
            }),
            State::Length(left) => {
                if input.is_empty() {
                    return Ok(ResponseStep::NeedMore);
                }
                let n = usize::try_from(*left).map_or(input.len(), |l| l.min(input.len()));
                *left -= n as u64;
                let ends_message = *left == 0;
                if ends_message {
                    self.state = State::Head;
                }
                Ok(ResponseStep::Body {
                    len: n,
                    ends_message,
                })
            }
            State::Chunked(chunked) => match chunked.step(input) {
                Err(_) => Err(ResponseError("invalid chunked body")),
                Ok(Chunk::NeedMore) => Ok(ResponseStep::NeedMore),
                Ok(Chunk::Pass(len)) => Ok(ResponseStep::Body {
                    len,
                    ends_message: false,
                }),
                Ok(Chunk::End(len)) => {
                    self.state = State::Head;
                    Ok(ResponseStep::Body {
                        len,
                        ends_message: true,
                    })
                }
            },
        }
    }

    fn head(&mut self, input: &[u8], request: Pending) -> Result<ResponseStep, ResponseError> {
        let window = input.get(..MAX_RESPONSE_HEAD).unwrap_or(input);
        // Uninitialised: httparse writes each header it finds, and an initialised array would
        // be written whole (4 KiB) on every call.
        let mut headers = [const { MaybeUninit::uninit() }; MAX_RESPONSE_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            window,
            &mut headers,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if input.len() >= MAX_RESPONSE_HEAD => {
                return Err(ResponseError("head too large"));
            }
            Ok(httparse::Status::Partial) => return Ok(ResponseStep::NeedMore),
            Err(_) => return Err(ResponseError("invalid head")),
        };
        let status = response.code.ok_or(ResponseError("no status"))?;
        let named = |name: &'static str| {
            response
                .headers
                .iter()
                .filter(move |h| h.name.eq_ignore_ascii_case(name))
                .map(|h| h.value)
        };
        let head = |state: State, interim: bool, tunnel: bool| {
            let ends_message = matches!(state, State::Head);
            (
                state,
                ResponseHead {
                    len,
                    interim,
                    tunnel,
                    ends_message,
                },
            )
        };
        let (state, parsed) = match status {
            101 if request.upgrade => head(State::Head, false, true),
            101 => return Err(ResponseError("101 to a request that asked for no upgrade")),
            100..=199 => head(State::Head, true, false),
            200..=299 if request.connect => head(State::Head, false, true),
            204 | 304 => head(State::Head, false, false),
            _ if request.head => head(State::Head, false, false),
            _ if named("transfer-encoding").next().is_some() => {
                let last = named("transfer-encoding")
                    .flat_map(|v| v.split(|&b| b == b','))
                    .map(<[u8]>::trim_ascii)
                    .next_back();
                if last.is_some_and(|c| c.eq_ignore_ascii_case(b"chunked")) {
                    head(State::Chunked(Chunked::new()), false, false)
                } else {
                    head(State::UntilClose, false, false)
                }
            }
            _ => match content_length(named("content-length"))? {
                Some(0) => head(State::Head, false, false),
                Some(n) => head(State::Length(n), false, false),
                None => head(State::UntilClose, false, false),
            },
        };
        self.state = state;
        Ok(ResponseStep::Head(parsed))
    }
}

/// The one length that every `Content-Length` value says, if any.
fn content_length<'a>(
    values: impl Iterator<Item = &'a [u8]>,
) -> Result<Option<u64>, ResponseError> {
    let mut length = None;
    for item in values.flat_map(|v| v.split(|&b| b == b',')) {
        let item = item.trim_ascii();
        let n = std::str::from_utf8(item)
            .ok()
            .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|t| t.parse::<u64>().ok())
            .ok_or(ResponseError("invalid Content-Length"))?;
        if length.is_some_and(|first| first != n) {
            return Err(ResponseError("differing Content-Length values"));
        }
        length = Some(n);
    }
    Ok(length)
}
