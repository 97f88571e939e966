//! How a connection ended: one vocabulary for the access log, the metrics and the refusal the
//! client gets.
//!
//! Every stage reports its failures with its own typed error ([`HelloError`], [`RouteError`],
//! [`ForwardError`], ...); this module maps each of them to one [`Outcome`]. An outcome knows its
//! name (the `outcome=` field of the access log and the `outcome` label of
//! `spliced_connections_total`; dashboards and tests match these strings, so they never change),
//! who failed ([`Source`], as pingora's `ErrorSource` says it), and what the client is told
//! before the socket closes ([`Outcome::refusal`]).
//!
//! [`Failure`] carries an outcome together with the error text (the `detail=` field).

use std::{fmt::Display, io};

use crate::{
    config::Protocol,
    forward::http::{HttpError, Refusal},
    forward::{ForwardError, Side},
    hello::{HelloError, http, tls},
    http1::RequestError,
    preface::receive::ReceiveError,
    route::RouteError,
};

/// Who failed, for reading an outcome at a glance (and the `source` label of the failure metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The client: it sent something we cannot route, went silent, or went away.
    Client,
    /// The backend: it could not be reached, or its socket failed.
    Backend,
    /// The proxy itself: its configuration has no answer, or a limit it enforces ended the
    /// connection.
    Proxy,
}

impl Source {
    /// Every source, in the order metrics list them.
    pub const ALL: [Source; 3] = [Source::Client, Source::Backend, Source::Proxy];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Source::Client => "client",
            Source::Backend => "backend",
            Source::Proxy => "proxy",
        }
    }
}

/// How one connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions were forwarded to their end.
    Ok,
    /// The hello did not complete within `client_hello_timeout`.
    HelloTimeout,
    /// The client closed before its hello was complete.
    ClientClosedBeforeHello,
    /// The client's socket failed (before or while forwarding).
    ClientError,
    /// [`HelloError::NotTls`].
    NotTls,
    /// [`HelloError::NotClientHello`].
    NotClientHello,
    /// [`HelloError::TooLarge`].
    TooLarge,
    /// [`HelloError::Malformed`].
    Malformed,
    /// [`HelloError::NotHttp`].
    NotHttp,
    /// [`HelloError::HeadTooLarge`].
    HeadTooLarge,
    /// [`HelloError::BadRequest`].
    BadRequest,
    /// [`RouteError::MissingName`].
    MissingName,
    /// [`RouteError::UnknownName`].
    UnknownName,
    /// The site has no backend for this listener's protocol.
    NoBackendForProtocol,
    /// The backend did not accept within `connect_timeout`.
    BackendConnectTimeout,
    /// Connecting to the backend failed.
    BackendUnreachable,
    /// The PROXY header could not be encoded.
    PrefaceError,
    /// The backend's socket failed (writing the preface, or while forwarding).
    BackendError,
    /// The client reset the connection while forwarding.
    ClientReset,
    /// The backend reset the connection while forwarding.
    BackendReset,
    /// Writing to the client found it gone.
    ClientClosed,
    /// Writing to the backend found it gone.
    BackendClosed,
    /// The client's socket timed out in the kernel while forwarding.
    ClientIdleTimeout,
    /// The backend's socket timed out in the kernel while forwarding.
    BackendIdleTimeout,
    /// No byte moved either way for `idle_timeout`.
    IdleTimeout,
    /// The kernel's byte counts for a spliced direction disagreed (it moved more bytes than
    /// arrived): both sides were reset rather than pass on a corrupted stream.
    KernelAccounting,
    /// [`RequestError::ContentLengthAndTransferEncoding`].
    ContentLengthAndTransferEncoding,
    /// [`RequestError::ConflictingContentLength`].
    ConflictingContentLength,
    /// [`RequestError::InvalidContentLength`].
    InvalidContentLength,
    /// [`RequestError::BadTransferEncoding`].
    BadTransferEncoding,
    /// [`RequestError::ObsFold`].
    ObsFold,
    /// [`RequestError::BareLineEnding`].
    BareLineEnding,
    /// [`RequestError::InvalidChunk`].
    InvalidChunk,
    /// [`RequestError::Nul`].
    NulInHead,
    /// A later request on a header site's connection named another site.
    MisdirectedRequest,
    /// A header site's backend sent something that is not an HTTP response.
    BadResponse,
    /// Still open when the SIGTERM grace period ended: cut (with a reset) as the process stops.
    Shutdown,
    /// Closed before its hello was complete to free descriptors for new connections: the
    /// process was near its descriptor limit and this was among the oldest waiting for a hello.
    ShedBeforeHello,
    /// A client outside the listener's `accept_proxy` sent what starts like a PROXY header: it
    /// is never trusted, so it was read as a hello and refused as garbage.
    ProxyHeaderUntrusted,
    /// A source in `accept_proxy` sent something other than a PROXY header first.
    ProxyHeaderMissing,
    /// A source in `accept_proxy` sent a PROXY header that breaks the spec (the detail says
    /// how: length, grammar, family, TLVs, CRC32C).
    ProxyHeaderInvalid,
    /// Accepted over `max_connections` and closed at once.
    OverMaxConnections,
    /// Accepted over its source's `max_connections_per_source` and closed at once.
    OverMaxConnectionsPerSource,
    /// A name for a `[dns]` backend does not exist (NXDOMAIN) or has no AAAA record (also what
    /// a CNAME loop ends in); refused like an unknown name.
    DnsNotFound,
    /// A name for a `[dns]` backend has addresses, but none inside `allowed_backends` that may
    /// be used (the detail lists each with its reason).
    DnsNotAllowed,
    /// The lookup for a `[dns]` backend took longer than `[dns] timeout`.
    DnsTimeout,
    /// The name servers failed (SERVFAIL, REFUSED, unreachable).
    DnsError,
}

impl Outcome {
    /// Every outcome, so metrics can show each one from zero before it first happens.
    pub const ALL: [Outcome; 47] = [
        Outcome::Ok,
        Outcome::HelloTimeout,
        Outcome::ClientClosedBeforeHello,
        Outcome::ClientError,
        Outcome::NotTls,
        Outcome::NotClientHello,
        Outcome::TooLarge,
        Outcome::Malformed,
        Outcome::NotHttp,
        Outcome::HeadTooLarge,
        Outcome::BadRequest,
        Outcome::MissingName,
        Outcome::UnknownName,
        Outcome::NoBackendForProtocol,
        Outcome::BackendConnectTimeout,
        Outcome::BackendUnreachable,
        Outcome::PrefaceError,
        Outcome::BackendError,
        Outcome::ClientReset,
        Outcome::BackendReset,
        Outcome::ClientClosed,
        Outcome::BackendClosed,
        Outcome::ClientIdleTimeout,
        Outcome::BackendIdleTimeout,
        Outcome::IdleTimeout,
        Outcome::KernelAccounting,
        Outcome::ContentLengthAndTransferEncoding,
        Outcome::ConflictingContentLength,
        Outcome::InvalidContentLength,
        Outcome::BadTransferEncoding,
        Outcome::ObsFold,
        Outcome::BareLineEnding,
        Outcome::InvalidChunk,
        Outcome::NulInHead,
        Outcome::MisdirectedRequest,
        Outcome::BadResponse,
        Outcome::Shutdown,
        Outcome::ShedBeforeHello,
        Outcome::ProxyHeaderUntrusted,
        Outcome::ProxyHeaderMissing,
        Outcome::ProxyHeaderInvalid,
        Outcome::OverMaxConnections,
        Outcome::OverMaxConnectionsPerSource,
        Outcome::DnsNotFound,
        Outcome::DnsNotAllowed,
        Outcome::DnsTimeout,
        Outcome::DnsError,
    ];

    /// The stable snake_case name in the access log and the metrics.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::HelloTimeout => "client_hello_timeout",
            Outcome::ClientClosedBeforeHello => "client_closed_before_hello",
            Outcome::ClientError => "client_error",
            Outcome::NotTls => "not_tls",
            Outcome::NotClientHello => "not_client_hello",
            Outcome::TooLarge => "too_large",
            Outcome::Malformed => "malformed",
            Outcome::NotHttp => "not_http",
            Outcome::HeadTooLarge => "head_too_large",
            Outcome::BadRequest => "bad_request",
            Outcome::MissingName => "missing_name",
            Outcome::UnknownName => "unknown_name",
            Outcome::NoBackendForProtocol => "no_backend_for_protocol",
            Outcome::BackendConnectTimeout => "backend_connect_timeout",
            Outcome::BackendUnreachable => "backend_unreachable",
            Outcome::PrefaceError => "preface_error",
            Outcome::BackendError => "backend_error",
            Outcome::ClientReset => "client_reset",
            Outcome::BackendReset => "backend_reset",
            Outcome::ClientClosed => "client_closed",
            Outcome::BackendClosed => "backend_closed",
            Outcome::ClientIdleTimeout => "client_idle_timeout",
            Outcome::BackendIdleTimeout => "backend_idle_timeout",
            Outcome::IdleTimeout => "idle_timeout",
            Outcome::KernelAccounting => "kernel_accounting",
            Outcome::ContentLengthAndTransferEncoding => "content_length_and_transfer_encoding",
            Outcome::ConflictingContentLength => "conflicting_content_length",
            Outcome::InvalidContentLength => "invalid_content_length",
            Outcome::BadTransferEncoding => "bad_transfer_encoding",
            Outcome::ObsFold => "obs_fold",
            Outcome::BareLineEnding => "bare_line_ending",
            Outcome::InvalidChunk => "invalid_chunk",
            Outcome::NulInHead => "nul_in_head",
            Outcome::MisdirectedRequest => "misdirected_request",
            Outcome::BadResponse => "bad_response",
            Outcome::Shutdown => "shutdown",
            Outcome::ShedBeforeHello => "shed_before_hello",
            Outcome::ProxyHeaderUntrusted => "proxy_header_untrusted",
            Outcome::ProxyHeaderMissing => "proxy_header_missing",
            Outcome::ProxyHeaderInvalid => "proxy_header_invalid",
            Outcome::OverMaxConnections => "over_max_connections",
            Outcome::OverMaxConnectionsPerSource => "over_max_connections_per_source",
            Outcome::DnsNotFound => "dns_not_found",
            Outcome::DnsNotAllowed => "dns_not_allowed",
            Outcome::DnsTimeout => "dns_timeout",
            Outcome::DnsError => "dns_error",
        }
    }

    /// Who failed; `None` for [`Outcome::Ok`].
    pub fn source(self) -> Option<Source> {
        match self {
            Outcome::Ok => None,
            Outcome::HelloTimeout
            | Outcome::ClientClosedBeforeHello
            | Outcome::ClientError
            | Outcome::NotTls
            | Outcome::NotClientHello
            | Outcome::TooLarge
            | Outcome::Malformed
            | Outcome::NotHttp
            | Outcome::HeadTooLarge
            | Outcome::BadRequest
            | Outcome::MissingName
            | Outcome::UnknownName
            | Outcome::ClientReset
            | Outcome::ClientClosed
            | Outcome::ClientIdleTimeout
            | Outcome::ContentLengthAndTransferEncoding
            | Outcome::ConflictingContentLength
            | Outcome::InvalidContentLength
            | Outcome::BadTransferEncoding
            | Outcome::ObsFold
            | Outcome::BareLineEnding
            | Outcome::InvalidChunk
            | Outcome::NulInHead
            | Outcome::MisdirectedRequest
            | Outcome::ProxyHeaderUntrusted
            | Outcome::ProxyHeaderMissing
            | Outcome::ProxyHeaderInvalid
            | Outcome::DnsNotFound
            // One source wanted more than its share.
            | Outcome::OverMaxConnectionsPerSource => Some(Source::Client),
            Outcome::BackendConnectTimeout
            | Outcome::BackendUnreachable
            | Outcome::BackendError
            | Outcome::BackendReset
            | Outcome::BackendClosed
            | Outcome::BackendIdleTimeout
            | Outcome::BadResponse => Some(Source::Backend),
            // The configuration has no backend for this port, the header cannot be encoded, or
            // our own idle limit ended a connection both peers left silent.
            Outcome::NoBackendForProtocol
            | Outcome::PrefaceError
            | Outcome::IdleTimeout
            | Outcome::KernelAccounting
            | Outcome::Shutdown
            | Outcome::ShedBeforeHello
            | Outcome::OverMaxConnections
            // The fence refused what DNS said, or the name servers failed us.
            | Outcome::DnsNotAllowed
            | Outcome::DnsTimeout
            | Outcome::DnsError => Some(Source::Proxy),
        }
    }

    /// What the client is told before the connection closes, in its listener's protocol: a TLS
    /// alert or an HTTP response; `None` when it gets nothing.
    ///
    /// Only outcomes decided before the backend got its preface have a refusal: after that the
    /// client may already have received the backend's bytes. The exception is a header site's
    /// refused request, which is decided between responses (`forward::http`).
    pub fn refusal(self, protocol: Protocol) -> Option<&'static [u8]> {
        let (alert, response): (&'static [u8], _) = match self {
            // RFC 6066: no site serves the name (browsers show a name error, not a network one);
            // RFC 9110 §15.5.20: clients reusing a connection for another name open a new one.
            Outcome::MissingName
            | Outcome::UnknownName
            | Outcome::NoBackendForProtocol
            | Outcome::MisdirectedRequest
            // A DNS backend that cannot be used is, to the client, a name nobody serves.
            | Outcome::DnsNotFound
            | Outcome::DnsNotAllowed
            | Outcome::DnsTimeout
            | Outcome::DnsError => (&tls::UNRECOGNIZED_NAME_ALERT, http::response_421()),
            Outcome::BackendUnreachable => (&tls::HANDSHAKE_FAILURE_ALERT, http::response_502()),
            Outcome::BackendConnectTimeout => (&tls::HANDSHAKE_FAILURE_ALERT, http::response_504()),
            Outcome::HeadTooLarge => (&tls::HANDSHAKE_FAILURE_ALERT, http::response_431()),
            // A TLS client on the HTTP port gets a 400 it will not read, as every HTTP server
            // answers bytes it cannot parse.
            Outcome::NotTls
            | Outcome::NotClientHello
            | Outcome::TooLarge
            | Outcome::Malformed
            | Outcome::NotHttp
            | Outcome::BadRequest
            | Outcome::ContentLengthAndTransferEncoding
            | Outcome::ConflictingContentLength
            | Outcome::InvalidContentLength
            | Outcome::BadTransferEncoding
            | Outcome::ObsFold
            | Outcome::BareLineEnding
            | Outcome::InvalidChunk
            | Outcome::NulInHead
            | Outcome::ProxyHeaderUntrusted => (&tls::HANDSHAKE_FAILURE_ALERT, http::response_400()),
            Outcome::Ok
            | Outcome::HelloTimeout
            | Outcome::ClientClosedBeforeHello
            | Outcome::ClientError
            | Outcome::PrefaceError
            | Outcome::BackendError
            | Outcome::ClientReset
            | Outcome::BackendReset
            | Outcome::ClientClosed
            | Outcome::BackendClosed
            | Outcome::ClientIdleTimeout
            | Outcome::BackendIdleTimeout
            | Outcome::IdleTimeout
            | Outcome::KernelAccounting
            | Outcome::BadResponse
            | Outcome::Shutdown
            | Outcome::ShedBeforeHello
            // A balancer that breaks the protocol gets no answer, as HAProxy gives none: our
            // bytes would reach its client as if the site had sent them.
            | Outcome::ProxyHeaderMissing
            | Outcome::ProxyHeaderInvalid
            // Closed before anything is read: see crate::limits for why a close.
            | Outcome::OverMaxConnections
            | Outcome::OverMaxConnectionsPerSource => return None,
        };
        Some(match protocol {
            Protocol::Tls => alert,
            Protocol::Http => response,
        })
    }

    /// Where this outcome sits in [`Outcome::ALL`], for counters kept in an array.
    pub fn index(self) -> usize {
        // The enum is fieldless and ALL lists it in declaration order (a test checks).
        self as usize
    }
}

impl From<&HelloError> for Outcome {
    fn from(error: &HelloError) -> Outcome {
        match error {
            HelloError::NotTls => Outcome::NotTls,
            HelloError::NotClientHello => Outcome::NotClientHello,
            HelloError::TooLarge => Outcome::TooLarge,
            HelloError::Malformed(_) => Outcome::Malformed,
            HelloError::NotHttp => Outcome::NotHttp,
            HelloError::HeadTooLarge => Outcome::HeadTooLarge,
            HelloError::BadRequest(_) => Outcome::BadRequest,
        }
    }
}

impl From<&ReceiveError> for Outcome {
    fn from(error: &ReceiveError) -> Outcome {
        match error {
            ReceiveError::NoHeader => Outcome::ProxyHeaderMissing,
            _ => Outcome::ProxyHeaderInvalid,
        }
    }
}

impl From<ReceiveError> for Failure {
    fn from(error: ReceiveError) -> Failure {
        Failure::new(Outcome::from(&error), error)
    }
}

impl From<RouteError> for Outcome {
    fn from(error: RouteError) -> Outcome {
        match error {
            RouteError::MissingName => Outcome::MissingName,
            RouteError::UnknownName => Outcome::UnknownName,
        }
    }
}

impl From<crate::dns::FailureKind> for Outcome {
    fn from(kind: crate::dns::FailureKind) -> Outcome {
        use crate::dns::FailureKind;
        match kind {
            FailureKind::NotFound => Outcome::DnsNotFound,
            FailureKind::NotAllowed => Outcome::DnsNotAllowed,
            FailureKind::Timeout => Outcome::DnsTimeout,
            FailureKind::Error => Outcome::DnsError,
        }
    }
}

impl From<&ForwardError> for Outcome {
    fn from(error: &ForwardError) -> Outcome {
        if error.is_kernel_accounting() {
            return Outcome::KernelAccounting;
        }
        match (error.side, error.error.kind()) {
            (Side::Client, io::ErrorKind::ConnectionReset) => Outcome::ClientReset,
            (Side::Backend, io::ErrorKind::ConnectionReset) => Outcome::BackendReset,
            (Side::Client, io::ErrorKind::BrokenPipe) => Outcome::ClientClosed,
            (Side::Backend, io::ErrorKind::BrokenPipe) => Outcome::BackendClosed,
            (Side::Client, io::ErrorKind::TimedOut) => Outcome::ClientIdleTimeout,
            (Side::Backend, io::ErrorKind::TimedOut) => Outcome::BackendIdleTimeout,
            (Side::Client, _) => Outcome::ClientError,
            (Side::Backend, _) => Outcome::BackendError,
        }
    }
}

impl From<RequestError> for Outcome {
    fn from(error: RequestError) -> Outcome {
        match error {
            RequestError::ContentLengthAndTransferEncoding => {
                Outcome::ContentLengthAndTransferEncoding
            }
            RequestError::ConflictingContentLength => Outcome::ConflictingContentLength,
            RequestError::InvalidContentLength => Outcome::InvalidContentLength,
            RequestError::BadTransferEncoding => Outcome::BadTransferEncoding,
            RequestError::ObsFold => Outcome::ObsFold,
            RequestError::BareLineEnding => Outcome::BareLineEnding,
            RequestError::InvalidChunk => Outcome::InvalidChunk,
            RequestError::HeadTooLarge => Outcome::HeadTooLarge,
            RequestError::Nul => Outcome::NulInHead,
            RequestError::Malformed(_) => Outcome::BadRequest,
        }
    }
}

impl From<Refusal> for Failure {
    fn from(refusal: Refusal) -> Failure {
        match refusal {
            Refusal::Request(error) => Failure::new(Outcome::from(error), error),
            Refusal::Misdirected => Failure::new(
                Outcome::MisdirectedRequest,
                "a later request names another site",
            ),
        }
    }
}

impl From<HttpError> for Failure {
    fn from(error: HttpError) -> Failure {
        match error {
            HttpError::Forward(error) => error.into(),
            HttpError::Response(error) => Failure::new(Outcome::BadResponse, error),
        }
    }
}

/// A connection that did not end [`Outcome::Ok`]: how it ended, and the error text, if any, for
/// the access log's `detail=` field.
#[derive(Debug)]
pub struct Failure {
    /// How it ended.
    pub outcome: Outcome,
    /// What the failing layer said (an OS error, a parser's reason).
    pub detail: Option<String>,
}

impl Failure {
    /// `outcome`, explained by `error`.
    pub fn new(outcome: Outcome, error: impl Display) -> Failure {
        Failure {
            outcome,
            detail: Some(error.to_string()),
        }
    }
}

impl From<Outcome> for Failure {
    fn from(outcome: Outcome) -> Failure {
        Failure {
            outcome,
            detail: None,
        }
    }
}

impl From<HelloError> for Failure {
    fn from(error: HelloError) -> Failure {
        Failure::new(Outcome::from(&error), error)
    }
}

impl From<RouteError> for Failure {
    fn from(error: RouteError) -> Failure {
        // The outcome says it all: "unknown_name" needs no detail.
        Outcome::from(error).into()
    }
}

impl From<ForwardError> for Failure {
    fn from(error: ForwardError) -> Failure {
        Failure::new(Outcome::from(&error), error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_declaration_order_and_names_are_unique_snake_case() {
        for (i, outcome) in Outcome::ALL.iter().enumerate() {
            assert_eq!(outcome.index(), i, "{outcome:?}");
            let name = outcome.name();
            assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
            let same = Outcome::ALL.iter().filter(|o| o.name() == name).count();
            assert_eq!(same, 1, "{name} named twice");
        }
    }

    /// Names that dashboards, the end-to-end tests and older log readers match on.
    #[test]
    fn names_are_the_published_ones() {
        let names: Vec<&str> = Outcome::ALL.iter().map(|o| o.name()).collect();
        for published in [
            "ok",
            "client_hello_timeout",
            "client_closed_before_hello",
            "not_tls",
            "not_client_hello",
            "too_large",
            "malformed",
            "not_http",
            "head_too_large",
            "bad_request",
            "missing_name",
            "unknown_name",
            "backend_connect_timeout",
            "backend_unreachable",
            "client_reset",
            "backend_reset",
            "idle_timeout",
            "content_length_and_transfer_encoding",
            "conflicting_content_length",
            "bad_transfer_encoding",
            "obs_fold",
            "bare_line_ending",
            "invalid_chunk",
            "nul_in_head",
            "misdirected_request",
            "proxy_header_untrusted",
            "proxy_header_missing",
            "proxy_header_invalid",
            "dns_not_found",
            "dns_not_allowed",
            "dns_timeout",
            "dns_error",
        ] {
            assert!(names.contains(&published), "{published}");
        }
    }

    #[test]
    fn errors_map_to_their_outcome() {
        let reset = |side: Side| ForwardError {
            side,
            error: io::ErrorKind::ConnectionReset.into(),
        };
        assert_eq!(Outcome::from(&reset(Side::Client)).name(), "client_reset");
        assert_eq!(Outcome::from(&reset(Side::Backend)).name(), "backend_reset");
        let other = ForwardError {
            side: Side::Backend,
            error: io::ErrorKind::Other.into(),
        };
        assert_eq!(Outcome::from(&other), Outcome::BackendError);
        assert_eq!(
            Outcome::from(RouteError::MissingName).name(),
            "missing_name"
        );
        assert_eq!(
            Outcome::from(&HelloError::Malformed("x")).name(),
            "malformed"
        );
        let failure = Failure::from(HelloError::BadRequest("more than one Host header"));
        assert_eq!(failure.outcome, Outcome::BadRequest);
        assert_eq!(
            failure.detail.as_deref(),
            Some("bad HTTP request: more than one Host header")
        );
    }

    #[test]
    fn refusals() {
        let tls = |o: Outcome| o.refusal(Protocol::Tls);
        let http = |o: Outcome| o.refusal(Protocol::Http);
        assert_eq!(
            tls(Outcome::UnknownName),
            Some(&tls::UNRECOGNIZED_NAME_ALERT[..])
        );
        assert_eq!(
            tls(Outcome::MissingName),
            Some(&tls::UNRECOGNIZED_NAME_ALERT[..])
        );
        assert_eq!(
            tls(Outcome::NotTls),
            Some(&tls::HANDSHAKE_FAILURE_ALERT[..])
        );
        assert_eq!(http(Outcome::UnknownName), Some(http::response_421()));
        assert_eq!(
            http(Outcome::BackendUnreachable),
            Some(http::response_502())
        );
        assert_eq!(
            http(Outcome::BackendConnectTimeout),
            Some(http::response_504())
        );
        assert_eq!(http(Outcome::HeadTooLarge), Some(http::response_431()));
        assert_eq!(http(Outcome::NotHttp), Some(http::response_400()));
        // After the preface the client may hold backend bytes: nothing more is sent.
        for o in [Outcome::Ok, Outcome::HelloTimeout, Outcome::ClientReset] {
            assert_eq!(tls(o), None);
            assert_eq!(http(o), None);
        }
    }

    #[test]
    fn only_ok_has_no_source() {
        for o in Outcome::ALL {
            assert_eq!(o.source().is_none(), o == Outcome::Ok, "{o:?}");
        }
    }
}
