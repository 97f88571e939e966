#![allow(clippy::indexing_slicing, clippy::unwrap_used)]

use super::*;
use crate::hello::testutil::*;

fn parse(buf: &[u8]) -> Result<Option<RequestHead>, HelloError> {
    parse_request_head(buf)
}

fn host_of(buf: &[u8]) -> Result<Option<String>, HelloError> {
    parse(buf).map(|head| head.expect("complete head").host)
}

fn bad(what: &'static str) -> Result<Option<String>, HelloError> {
    Err(HelloError::BadRequest(what))
}

/// Asserts "need more" for every proper prefix and `expected` for the whole, fed one byte per
/// read and in every two-read split.
fn assert_streams(bytes: &[u8], expected: &Result<Option<RequestHead>, HelloError>) {
    let (result, used) = feed(&bytewise(bytes), parse);
    assert_eq!(&result, expected, "byte at a time");
    assert_eq!(used, bytes.len());
    for at in 0..=bytes.len() {
        let (result, used) = feed(&[&bytes[..at], &bytes[at..]], parse);
        assert_eq!(&result, expected, "split at {at}");
        assert_eq!(used, bytes.len(), "split at {at}");
    }
}

#[test]
fn simple_get_streams_at_every_split() {
    let bytes = b"GET /index.html HTTP/1.1\r\nHost: Site1.Example\r\nUser-Agent: curl/8\r\n\r\n";
    let expected = RequestHead {
        host: Some("site1.example".into()),
        method: "GET".into(),
        path: "/index.html".into(),
        head_len: bytes.len(),
    };
    assert_streams(bytes, &Ok(Some(expected)));
}

#[test]
fn body_after_the_head_is_not_part_of_it() {
    let head = b"POST /form HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\n\r\n";
    let mut bytes = head.to_vec();
    bytes.extend(b"hello");
    let parsed = parse(&bytes).unwrap().unwrap();
    assert_eq!(parsed.head_len, head.len());
    assert_eq!(parsed.method, "POST");
    // A body bigger than the head limit does not matter once the head is whole.
    bytes.extend(vec![b'x'; 2 * MAX_REQUEST_HEAD]);
    assert_eq!(parse(&bytes).unwrap().unwrap().head_len, head.len());
}

#[test]
fn host_with_port_and_ipv6_literals() {
    let cases: [(&[u8], &str); 8] = [
        (b"a.example:8080", "a.example"),
        (b"a.example:", "a.example"),
        (b"A.Example.", "a.example."),
        (b"192.0.2.7:80", "192.0.2.7"),
        (b"[2001:db8::1]:80", "2001:db8::1"),
        (b"[2001:DB8::A]", "2001:db8::a"),
        (b"[::ffff:192.0.2.1]:443", "::ffff:192.0.2.1"),
        (b"  a.example \t", "a.example"),
    ];
    for (value, expected) in cases {
        let bytes = [&b"GET / HTTP/1.1\r\nHost: "[..], value, b"\r\n\r\n"].concat();
        assert_eq!(host_of(&bytes), Ok(Some(expected.to_owned())), "{value:?}");
    }
}

#[test]
fn bad_host_values_are_refused() {
    for value in [
        &b"a.example:http"[..],
        b"a.example:65536",
        b"a.example:123456",
        b"a.example:+80",
        b"2001:db8::1",
        b"[2001:db8::1",
        b"[2001:db8::1]x",
        b"[2001:db8::1]:x",
        b"[fe80::1%25eth0]",
        b"[not-an-address]",
        b"user@a.example",
        b"a.example/path",
        b"a.example, b.example",
        b"*.example",
        b"a..example",
        b":80",
    ] {
        let bytes = [&b"GET / HTTP/1.1\r\nHost: "[..], value, b"\r\n\r\n"].concat();
        assert_eq!(host_of(&bytes), bad("Host is not host[:port]"), "{value:?}");
    }
}

#[test]
fn missing_and_empty_host() {
    assert_eq!(host_of(b"GET / HTTP/1.0\r\n\r\n"), Ok(None));
    assert_eq!(
        host_of(b"GET / HTTP/1.1\r\n\r\n"),
        bad("HTTP/1.1 request without Host")
    );
    assert_eq!(host_of(b"GET / HTTP/1.1\r\nHost:\r\n\r\n"), Ok(None));
    assert_eq!(host_of(b"GET / HTTP/1.1\r\nHost:   \r\n\r\n"), Ok(None));
}

#[test]
fn duplicate_host_is_refused() {
    let twice = b"GET / HTTP/1.1\r\nHost: a.example\r\nAccept: */*\r\nhOsT: b.example\r\n\r\n";
    assert_eq!(host_of(twice), bad("more than one Host header"));
    let same = b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: a.example\r\n\r\n";
    assert_eq!(host_of(same), bad("more than one Host header"));
}

#[test]
fn absolute_form_target_names_the_host() {
    let no_host = b"GET http://Proxy.Example:8080/x?y HTTP/1.1\r\n\r\n";
    let head = parse(no_host).unwrap().unwrap();
    assert_eq!(head.host.as_deref(), Some("proxy.example"));
    assert_eq!(head.path, "http://Proxy.Example:8080/x?y");
    // RFC 9112 §3.2.2: the target wins over Host.
    let both = b"GET HTTPS://[2001:db8::2]/ HTTP/1.1\r\nHost: other.example\r\n\r\n";
    assert_eq!(host_of(both), Ok(Some("2001:db8::2".into())));
    assert_eq!(
        host_of(b"GET http://a.example HTTP/1.1\r\n\r\n"),
        Ok(Some("a.example".into()))
    );
    assert_eq!(
        host_of(b"GET http://a.example?q HTTP/1.1\r\n\r\n"),
        Ok(Some("a.example".into()))
    );
    assert_eq!(
        host_of(b"GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n"),
        bad("absolute-form target without a host")
    );
    assert_eq!(
        host_of(b"GET http://u@a.example/ HTTP/1.1\r\n\r\n"),
        bad("Host is not host[:port]")
    );
    // A bad Host is refused even when the target names the host.
    assert_eq!(
        host_of(b"GET http://a.example/ HTTP/1.1\r\nHost: a b\r\n\r\n"),
        bad("Host is not host[:port]")
    );
    // Not absolute-form: a relative path that merely contains "http://".
    assert_eq!(
        host_of(b"GET /http://a.example HTTP/1.1\r\nHost: b.example\r\n\r\n"),
        Ok(Some("b.example".into()))
    );
}

#[test]
fn bare_lf_and_leading_empty_lines_are_accepted() {
    let bytes = b"\r\n\nGET / HTTP/1.1\nHost: a.example\n\n";
    let expected = RequestHead {
        host: Some("a.example".into()),
        method: "GET".into(),
        path: "/".into(),
        head_len: bytes.len(),
    };
    assert_streams(bytes, &Ok(Some(expected)));
}

#[test]
fn tls_on_the_http_port_is_refused_from_the_first_byte() {
    assert_eq!(parse(&[0x16]), Err(HelloError::NotHttp));
    assert_eq!(
        parse(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]),
        Err(HelloError::NotHttp)
    );
    assert_eq!(parse(b"\r\n\x16"), Err(HelloError::NotHttp));
    for first in [&b" "[..], b"\0", b"\x80", b"/", b"\t", b"(", b"@"] {
        assert_eq!(parse(first), Err(HelloError::NotHttp), "{first:?}");
    }
    assert_eq!(parse(b""), Ok(None));
    assert_eq!(parse(b"\r\n"), Ok(None));
    assert_eq!(parse(b"G"), Ok(None));
}

/// A CR that does not start a CRLF is httparse's to refuse: deciding "not HTTP" from a later
/// byte would give a prefix (BadRequest) and the whole (NotHttp) different answers. Found by
/// the hello_http fuzz target.
#[test]
fn stray_cr_before_the_request_line_is_a_bad_request_at_every_length() {
    let bytes = b"\r\r\xff GET";
    for len in 2..=bytes.len() {
        assert_eq!(
            parse(&bytes[..len]),
            Err(HelloError::BadRequest("invalid line ending")),
            "{len}"
        );
    }
    assert_eq!(parse(b"\r"), Ok(None));
    assert_eq!(parse(b"\r\n\n\r"), Ok(None));
    let crash = b"e\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\r\xff\xff\xff\xff\xff\xff\xffGE\xad\xad\xad\xad\xad\xad\xadh30\n\n";
    crate::hello::fuzz_check_http(crash);
}

#[test]
fn syntax_errors_are_bad_requests() {
    let cases: [&[u8]; 6] = [
        b"GET / HTTP/2.0\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"GET / HTTP/1.1\r\nHo st: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\0b\r\n\r\n",
        b"G\x01T / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\rHost: a\r\n\r\n",
    ];
    for bytes in cases {
        assert!(
            matches!(parse(bytes), Err(HelloError::BadRequest(_))),
            "{:?}",
            String::from_utf8_lossy(bytes)
        );
    }
}

/// A head of exactly `len` bytes, padded with a long header.
fn head_of_len(len: usize) -> Vec<u8> {
    let start = b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Pad: ";
    let end = b"\r\n\r\n";
    let pad = len - start.len() - end.len();
    [&start[..], &vec![b'p'; pad], end].concat()
}

#[test]
fn head_size_limit() {
    let at_limit = head_of_len(MAX_REQUEST_HEAD);
    assert_eq!(
        parse(&at_limit).unwrap().unwrap().head_len,
        MAX_REQUEST_HEAD
    );
    assert_eq!(parse(&at_limit[..MAX_REQUEST_HEAD - 1]), Ok(None));
    let over = head_of_len(MAX_REQUEST_HEAD + 1);
    assert_eq!(parse(&over[..MAX_REQUEST_HEAD - 1]), Ok(None));
    // At the limit without the blank line, no byte can make the head fit.
    assert_eq!(
        parse(&over[..MAX_REQUEST_HEAD]),
        Err(HelloError::HeadTooLarge)
    );
    assert_eq!(parse(&over), Err(HelloError::HeadTooLarge));
    assert_eq!(
        parse(&vec![b'G'; 3 * MAX_REQUEST_HEAD]),
        Err(HelloError::HeadTooLarge)
    );
    assert_eq!(
        parse(&b"\r\n".repeat(MAX_REQUEST_HEAD)),
        Err(HelloError::HeadTooLarge)
    );
}

#[test]
fn too_many_header_lines() {
    let head = |n: usize| {
        let mut bytes = b"GET / HTTP/1.1\r\nHost: a.example\r\n".to_vec();
        for i in 1..n {
            bytes.extend(format!("X-{i}: y\r\n").bytes());
        }
        bytes.extend(b"\r\n");
        bytes
    };
    assert!(parse(&head(MAX_HEADERS)).unwrap().is_some());
    assert_eq!(parse(&head(MAX_HEADERS + 1)), Err(HelloError::HeadTooLarge));
}

#[test]
fn responses_are_complete_and_honest() {
    let cases = [
        (response_400(), 400),
        (response_421(), 421),
        (response_431(), 431),
        (response_502(), 502),
        (response_504(), 504),
    ];
    for (bytes, code) in cases {
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut response = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(head_len) = response.parse(bytes).unwrap() else {
            panic!("{code}: incomplete head");
        };
        assert_eq!(response.code, Some(code));
        assert_eq!(response.version, Some(1));
        let header = |name: &str| {
            let h = response
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name));
            std::str::from_utf8(h.unwrap().value).unwrap().to_owned()
        };
        assert_eq!(header("Connection"), "close");
        let length: usize = header("Content-Length").parse().unwrap();
        assert_eq!(length, bytes.len() - head_len, "{code}: Content-Length");
    }
}

/// 20 000 random and mutated inputs: no panic, and every accepted head is consistent.
#[test]
fn random_and_mutated_inputs_never_panic() {
    let rng = Rng::new(0x4854_5450_0000_0001);
    let seeds: [&[u8]; 4] = [
        b"GET /index.html HTTP/1.1\r\nHost: a.example:8080\r\nAccept: */*\r\n\r\n",
        b"GET http://[2001:db8::1]/ HTTP/1.1\r\n\r\n",
        b"POST /x HTTP/1.0\nContent-Length: 2\n\nhi",
        b"\r\nOPTIONS * HTTP/1.1\r\nHost: b.example.\r\n\r\n",
    ];
    let mut accepted = 0;
    for round in 0..20_000 {
        let input = match round % 3 {
            0 => rng.bytes(rng.below(100)),
            _ => rng.mutate(rng.pick(&seeds)),
        };
        if let Ok(Some(head)) = parse(&input) {
            accepted += 1;
            assert!(head.head_len <= input.len());
            assert_eq!(parse(&input[..head.head_len]), Ok(Some(head)));
        }
        let mut selector = vec![rng.byte()];
        selector.extend_from_slice(&input);
        crate::hello::fuzz_check_http(&selector);
    }
    assert!(
        accepted > 500,
        "only {accepted} accepted: the mutations are not reaching deep"
    );
}
