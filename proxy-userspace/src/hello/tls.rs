//! The TLS ClientHello: reassembled from records, read for SNI and ALPN, never decrypted.
//!
//! A ClientHello may span several TLS records (RFC 8446 §5.1 lets a sender fragment handshake
//! messages at any byte) and several TCP reads; post-quantum hellos carrying an X25519MLKEM768
//! key share are about 1.7 KB, more than one segment. [`parse_client_hello`] is given everything
//! read so far, walks the record headers, and decides as early as the bytes allow: the first byte
//! tells TLS from anything else, the first handshake byte tells a ClientHello from anything else,
//! and the handshake length tells whether the hello can fit under [`MAX_CLIENT_HELLO`].
//!
//! The ClientHello body is parsed with `tls-parser`. Its extension list is walked here instead,
//! because `tls-parser` 0.12's list parser stops silently at the first extension whose contents
//! it does not accept (an unknown code point with a shape it guesses wrong, or a future one),
//! dropping every extension after it, SNI included, and its SNI and ALPN parsers ignore trailing
//! garbage. Either way a hello with a broken or hidden name would route to the default site
//! instead of being refused. The walker treats every extension but SNI and ALPN as opaque bytes,
//! so GREASE, ECH, key shares of any size and extensions not yet invented pass through.

// Input-dependent indexing is the usual way such parsers panic; every access here is checked.
#![deny(clippy::indexing_slicing)]

use std::borrow::Cow;

use tls_parser::parse_tls_handshake_client_hello;

use super::HelloError;

/// The most bytes (records including their headers) a client may send before its ClientHello is
/// complete. 16 KiB is four times the largest hellos seen in the wild (post-quantum key shares
/// plus padding stay under 2 KiB) and bounds what one idle connection can make us hold.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;

/// A fatal `unrecognized_name` (112) alert record, version 0x0303: the RFC 6066 answer when no
/// site serves the SNI name, which browsers show as a name error rather than a network error.
pub const UNRECOGNIZED_NAME_ALERT: [u8; 7] = alert(112);

/// A fatal `handshake_failure` (40) alert record, version 0x0303: the generic refusal for a
/// ClientHello we could not use (malformed, too large, or no backend reachable).
pub const HANDSHAKE_FAILURE_ALERT: [u8; 7] = alert(40);

/// What the router needs from a ClientHello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientHello {
    /// The `host_name` from the server_name extension, ASCII-lowercased, trailing dot kept as
    /// sent (stripping it is the router's call). `None` when the client sent no SNI (IP-address
    /// connections, some scanners); routing then goes to the default site.
    pub sni: Option<String>,
    /// ALPN protocol names in the client's order, for the access log. Names that are not
    /// printable ASCII (RFC 8701 GREASE values) are left out.
    pub alpn: Vec<String>,
    /// `legacy_version` from the ClientHello body: 0x0303 for TLS 1.2 and 1.3 clients.
    pub legacy_version: u16,
}

/// TLS record content type `handshake`.
const CONTENT_HANDSHAKE: u8 = 22;
/// Handshake message type `client_hello`.
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const RECORD_HEADER_LEN: usize = 5;
const HANDSHAKE_HEADER_LEN: usize = 4;
/// RFC 8446 §5.1: a record carries at most 2^14 bytes of plaintext.
const MAX_RECORD_PAYLOAD: usize = 1 << 14;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
/// server_name `NameType` for a DNS host name, the only one defined.
const NAME_TYPE_HOST_NAME: u8 = 0;

const fn alert(description: u8) -> [u8; 7] {
    // content type 21 (alert), version 3.3, length 2, level 2 (fatal), description
    [21, 3, 3, 0, 2, 2, description]
}

/// Reads the ClientHello from `buf`, every byte read from the client so far.
///
/// `Ok(None)` means the hello is not complete yet and can still complete within
/// [`MAX_CLIENT_HELLO`] bytes: read more and call again with the longer buffer. `Ok(Some)` is
/// returned as soon as the hello's last byte is present; bytes after it (the rest of its record,
/// early data) are ignored and left for forwarding. An `Err` is final: more bytes cannot change
/// it, so the caller refuses the connection (`crate::outcome` says with which alert).
///
/// Record versions 0x0301 to 0x0303 are accepted (ClientHellos commonly use 0x0301), anything
/// else after a handshake content type is malformed; SSLv2-style hellos are [`HelloError::NotTls`].
pub fn parse_client_hello(buf: &[u8]) -> Result<Option<ClientHello>, HelloError> {
    // Bytes past the limit can never be part of an acceptable hello, so only the window is read;
    // this also bounds the work done when the caller calls again after every small read.
    let window = buf.get(..MAX_CLIENT_HELLO).unwrap_or(buf);
    match reassemble(window)? {
        Some(message) => parse_message(&message).map(Some),
        // The window is full and the hello still needs bytes: it cannot fit.
        None if buf.len() >= MAX_CLIENT_HELLO => Err(HelloError::TooLarge),
        None => Ok(None),
    }
}

/// Collects the handshake payloads of consecutive records until the first handshake message is
/// whole, and returns exactly that message (header included). `Ok(None)` when it is not whole
/// within `window`.
fn reassemble(window: &[u8]) -> Result<Option<Cow<'_, [u8]>>, HelloError> {
    let mut fragments: Vec<&[u8]> = Vec::new();
    let mut header = HandshakeHeader::default();
    let mut received = 0usize;
    let mut rest = window;
    loop {
        let first = fragments.is_empty();
        let Some(length) = record_header(rest, first)? else {
            return Ok(None);
        };
        let payload = rest.get(RECORD_HEADER_LEN..).unwrap_or_default();
        let (fragment, after) = payload.split_at_checked(length).unwrap_or((payload, &[]));
        for &byte in fragment.iter().take(HANDSHAKE_HEADER_LEN) {
            header.push(byte)?;
        }
        received = received.saturating_add(fragment.len());
        fragments.push(fragment);
        if let Some(total) = header.message_len()
            && received >= total
        {
            return Ok(Some(join(&fragments, total)));
        }
        if fragment.len() < length {
            // The record itself is still arriving.
            return Ok(None);
        }
        rest = after;
    }
}

/// Checks as much of the record header at the start of `rest` as has arrived, so that a wrong
/// first byte is refused without waiting for the other four. Returns the payload length once all
/// five bytes are there.
fn record_header(rest: &[u8], first: bool) -> Result<Option<usize>, HelloError> {
    // The first record decides whether this is TLS at all; a wrong byte in a later record is a
    // broken hello (an alert or change_cipher_spec must not interrupt a handshake message).
    let refuse = |what| {
        if first {
            HelloError::NotTls
        } else {
            HelloError::Malformed(what)
        }
    };
    if let Some(&content_type) = rest.first()
        && content_type != CONTENT_HANDSHAKE
    {
        return Err(refuse("non-handshake record inside the ClientHello"));
    }
    if let Some(&major) = rest.get(1)
        && major != 3
    {
        return Err(refuse("record version"));
    }
    if let Some(&minor) = rest.get(2)
        && !(1..=3).contains(&minor)
    {
        return Err(HelloError::Malformed("record version"));
    }
    // The high length byte alone can already show an oversized record.
    if let Some(&high) = rest.get(3)
        && usize::from(high) << 8 > MAX_RECORD_PAYLOAD
    {
        return Err(HelloError::Malformed("record longer than 2^14 bytes"));
    }
    let Some(&[high, low]) = rest.get(3..RECORD_HEADER_LEN) else {
        return Ok(None);
    };
    let length = usize::from(u16::from_be_bytes([high, low]));
    if length > MAX_RECORD_PAYLOAD {
        return Err(HelloError::Malformed("record longer than 2^14 bytes"));
    }
    if length == 0 {
        // RFC 8446 §5.1: zero-length handshake fragments are forbidden; allowing them would let
        // a client keep us walking empty records.
        return Err(HelloError::Malformed("empty handshake record"));
    }
    Ok(Some(length))
}

/// The 4-byte handshake header, which may itself arrive split across records.
#[derive(Default)]
struct HandshakeHeader {
    bytes: [u8; HANDSHAKE_HEADER_LEN],
    filled: usize,
}

impl HandshakeHeader {
    /// Takes the next handshake byte while the header is incomplete, refusing as soon as the
    /// type or the length is known to be unacceptable.
    fn push(&mut self, byte: u8) -> Result<(), HelloError> {
        let Some(slot) = self.bytes.get_mut(self.filled) else {
            return Ok(());
        };
        *slot = byte;
        self.filled += 1;
        if self.filled == 1 && byte != HANDSHAKE_CLIENT_HELLO {
            return Err(HelloError::NotClientHello);
        }
        if let Some(total) = self.message_len()
            && total.saturating_add(RECORD_HEADER_LEN) > MAX_CLIENT_HELLO
        {
            // Even in a single record the hello would need more than the limit.
            return Err(HelloError::TooLarge);
        }
        Ok(())
    }

    /// The whole message length (header included), once the header is complete.
    fn message_len(&self) -> Option<usize> {
        let [_, a, b, c] = self.bytes;
        (self.filled == HANDSHAKE_HEADER_LEN).then(|| {
            HANDSHAKE_HEADER_LEN + (usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c))
        })
    }
}

/// The first `total` bytes of the concatenated fragments, borrowed when one record holds them
/// all (the common case), copied otherwise.
fn join<'a>(fragments: &[&'a [u8]], total: usize) -> Cow<'a, [u8]> {
    if let [only] = fragments {
        return Cow::Borrowed(only.get(..total).unwrap_or(only));
    }
    let mut message = Vec::with_capacity(total);
    for fragment in fragments {
        let wanted = total.saturating_sub(message.len()).min(fragment.len());
        message.extend_from_slice(fragment.get(..wanted).unwrap_or_default());
    }
    Cow::Owned(message)
}

/// Parses a whole ClientHello handshake message (header included).
fn parse_message(message: &[u8]) -> Result<ClientHello, HelloError> {
    let body = message.get(HANDSHAKE_HEADER_LEN..).unwrap_or_default();
    let (rest, hello) = parse_tls_handshake_client_hello(body)
        .map_err(|_| HelloError::Malformed("ClientHello fields"))?;
    if !rest.is_empty() {
        // tls-parser treats a truncated extension block as "no extensions" and leaves it
        // unread: a length that disagrees with the contents must not hide the SNI.
        return Err(HelloError::Malformed(
            "ClientHello length disagrees with its contents",
        ));
    }
    let (sni, alpn) = match hello.ext {
        Some(block) => names_from_extensions(block)?,
        None => (None, Vec::new()),
    };
    Ok(ClientHello {
        sni,
        alpn,
        legacy_version: hello.version.0,
    })
}

/// A cursor over bytes that only hands out what is there: every read is checked, so malformed
/// lengths become `None` instead of a panic.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (taken, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(taken)
    }

    fn u8(&mut self) -> Option<u8> {
        let (&byte, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(byte)
    }

    fn u16(&mut self) -> Option<u16> {
        let &[a, b] = self.take(2)? else {
            return None;
        };
        Some(u16::from_be_bytes([a, b]))
    }

    /// A vector with a one-byte length prefix.
    fn vec_u8(&mut self) -> Option<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    /// A vector with a two-byte length prefix.
    fn vec_u16(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Walks the extension block: every extension must be whole and the block must hold nothing else,
/// and no extension type may appear twice (RFC 8446 §4.2), so a second SNI cannot disagree with
/// the first. Returns the SNI host name and the ALPN names.
fn names_from_extensions(block: &[u8]) -> Result<(Option<String>, Vec<String>), HelloError> {
    let mut extensions = Vec::new();
    let mut reader = Reader(block);
    while !reader.is_empty() {
        let extension = reader
            .u16()
            .and_then(|kind| Some((kind, reader.vec_u16()?)))
            .ok_or(HelloError::Malformed("truncated extension"))?;
        extensions.push(extension);
    }
    let mut kinds: Vec<u16> = extensions.iter().map(|&(kind, _)| kind).collect();
    kinds.sort_unstable();
    if kinds
        .windows(2)
        .any(|pair| matches!(pair, [a, b] if a == b))
    {
        return Err(HelloError::Malformed("duplicate extension"));
    }
    let mut sni = None;
    let mut alpn = Vec::new();
    for (kind, data) in extensions {
        match kind {
            EXT_SERVER_NAME => sni = server_name(data)?,
            EXT_ALPN => alpn = protocol_names(data)?,
            _ => {}
        }
    }
    Ok((sni, alpn))
}

/// The server_name extension (RFC 6066 §3): a non-empty list of (type, name), at most one
/// `host_name`. Other name types are skipped (none are defined, but the list format allows them).
fn server_name(data: &[u8]) -> Result<Option<String>, HelloError> {
    let mut outer = Reader(data);
    let list = outer
        .vec_u16()
        .filter(|list| !list.is_empty() && outer.is_empty())
        .ok_or(HelloError::Malformed("server_name list length"))?;
    let mut reader = Reader(list);
    let mut host = None;
    while !reader.is_empty() {
        let (kind, name) = reader
            .u8()
            .and_then(|kind| Some((kind, reader.vec_u16()?)))
            .ok_or(HelloError::Malformed("truncated server_name entry"))?;
        if kind != NAME_TYPE_HOST_NAME {
            continue;
        }
        if host.is_some() {
            return Err(HelloError::Malformed("two host_name entries"));
        }
        if !super::is_host_name(name) {
            return Err(HelloError::Malformed("server_name is not a host name"));
        }
        host = Some(super::lowercase_ascii(name));
    }
    Ok(host)
}

/// The ALPN extension (RFC 7301 §3.1): a non-empty list of non-empty protocol names.
fn protocol_names(data: &[u8]) -> Result<Vec<String>, HelloError> {
    let mut outer = Reader(data);
    let list = outer
        .vec_u16()
        .filter(|list| !list.is_empty() && outer.is_empty())
        .ok_or(HelloError::Malformed("ALPN list length"))?;
    let mut reader = Reader(list);
    let mut names = Vec::new();
    while !reader.is_empty() {
        let name = reader
            .vec_u8()
            .filter(|name| !name.is_empty())
            .ok_or(HelloError::Malformed("ALPN protocol name"))?;
        // Names are opaque bytes; only printable ones are worth logging.
        if name.iter().all(u8::is_ascii_graphic) {
            names.push(name.iter().copied().map(char::from).collect());
        }
    }
    Ok(names)
}

#[cfg(test)]
mod tests;
