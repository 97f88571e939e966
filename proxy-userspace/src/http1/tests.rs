#![allow(clippy::indexing_slicing, clippy::unwrap_used)]

use super::tests_support::{Run, run};
use super::*;

/// Frames `input` whole and split in two at every byte, and one byte per read; all must agree.
#[track_caller]
fn run_everywhere(input: &[u8]) -> Run {
    let whole = run(input, input.len().max(1));
    assert_eq!(run(input, 1), whole, "one byte per read");
    for at in 1..input.len() {
        // Two reads: `at` bytes, then the rest.
        let split = run_two(input, at);
        assert_eq!(split, whole, "split at {at}");
    }
    whole
}

/// Like [`run`] with exactly two reads.
fn run_two(input: &[u8], at: usize) -> Run {
    let mut framer = tests_support::framer();
    let mut out = Vec::new();
    let mut heads = Vec::new();
    let mut consumed = 0;
    let mut available = at;
    loop {
        let buffered = &input[consumed..available];
        match framer.step(buffered, &mut out) {
            Err(e) => {
                return Run {
                    out,
                    heads,
                    end: Err(e),
                    consumed,
                };
            }
            Ok(RequestStep::NeedMore) if available < input.len() => available = input.len(),
            Ok(RequestStep::AwaitSwitch) if consumed < input.len() => {
                available = input.len();
                framer.resume();
            }
            Ok(RequestStep::NeedMore | RequestStep::AwaitSwitch) => {
                return Run {
                    out,
                    heads,
                    end: Ok(consumed),
                    consumed,
                };
            }
            Ok(RequestStep::Head(head)) => {
                consumed += head.len;
                heads.push(head.host);
            }
            Ok(RequestStep::Body { len, .. }) => {
                out.extend_from_slice(&buffered[..len]);
                consumed += len;
            }
        }
    }
}

const ADDED: &str =
    "X-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Port: 80\r\n";

#[test]
fn pipelined_requests_each_get_the_header_at_every_split() {
    let input = b"GET /a HTTP/1.1\r\nHost: a.example\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n\
POST /b HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\n\r\nhello\
POST /c HTTP/1.1\r\nHost: B.example\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
\r\nGET /d HTTP/1.0\r\n\r\n";
    let result = run_everywhere(input);
    let expected = format!(
        "GET /a HTTP/1.1\r\nHost: a.example\r\n{ADDED}\r\n\
POST /b HTTP/1.1\r\nHost: a.example\r\nContent-Length: 5\r\n{ADDED}\r\nhello\
POST /c HTTP/1.1\r\nHost: B.example\r\nTransfer-Encoding: chunked\r\n{ADDED}\r\n3\r\nabc\r\n0\r\n\r\n\
\r\nGET /d HTTP/1.0\r\n{ADDED}\r\n"
    );
    assert_eq!(String::from_utf8_lossy(&result.out), expected);
    assert_eq!(
        result.heads,
        [
            Some("a.example".to_string()),
            Some("a.example".to_string()),
            Some("b.example".to_string()),
            None
        ]
    );
    assert_eq!(result.end, Ok(input.len()));
}

#[test]
fn every_smuggling_case_is_refused_at_every_split() {
    let cases: [(&[u8], RequestError); 16] = [
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            RequestError::ContentLengthAndTransferEncoding,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            RequestError::ConflictingContentLength,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 4\r\n\r\n",
            RequestError::ConflictingContentLength,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\n",
            RequestError::InvalidContentLength,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            RequestError::BadTransferEncoding,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
            RequestError::BadTransferEncoding,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            RequestError::BadTransferEncoding,
        ),
        (
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            RequestError::BadTransferEncoding,
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n 2\r\n\r\n",
            RequestError::ObsFold,
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\n\tX-A: 1\r\n\r\n",
            RequestError::ObsFold,
        ),
        (
            b"GET / HTTP/1.1\nHost: a\r\n\r\n",
            RequestError::BareLineEnding,
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a\rX: y\r\n\r\n",
            RequestError::BareLineEnding,
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nX: \x00\r\n\r\n",
            RequestError::Nul,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            RequestError::InvalidChunk,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcd\r\n",
            RequestError::InvalidChunk,
        ),
        (
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            RequestError::Malformed("more than one Host header"),
        ),
    ];
    for (input, error) in cases {
        let result = run_everywhere(input);
        assert_eq!(
            result.end,
            Err(error),
            "{:?}",
            String::from_utf8_lossy(input)
        );
        // Nothing of a refused head goes on.
        assert!(
            result.heads.is_empty() || error == RequestError::InvalidChunk,
            "{:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn a_later_bad_request_stops_after_the_good_ones() {
    let input = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
    let result = run_everywhere(input);
    assert_eq!(result.heads.len(), 1);
    assert_eq!(result.end, Err(RequestError::ConflictingContentLength));
}

/// The host of a later request is remembered from an earlier one only when nothing but the
/// same single Host value with an origin-form target could decide it.
#[test]
fn a_repeated_host_is_still_read_by_the_rules() {
    let same = b"GET / HTTP/1.1\r\nHost: A.example:80\r\n\r\nGET /x HTTP/1.1\r\nHost:  A.example:80 \r\n\r\n\
GET http://b.example/ HTTP/1.1\r\nHost: A.example:80\r\n\r\nGET / HTTP/1.1\r\nHost: A.example:80\r\n\r\n";
    let result = run_everywhere(same);
    let a = Some("a.example".to_string());
    let b = Some("b.example".to_string());
    assert_eq!(result.heads, [a.clone(), a.clone(), b, a.clone()]);
    assert_eq!(result.end, Ok(same.len()));
    let twice = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n";
    let result = run_everywhere(twice);
    assert_eq!(result.heads.len(), 1);
    assert_eq!(
        result.end,
        Err(RequestError::Malformed("more than one Host header"))
    );
    let missing = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\n\r\n";
    let result = run_everywhere(missing);
    assert_eq!(result.heads.len(), 1);
    assert_eq!(
        result.end,
        Err(RequestError::Malformed("HTTP/1.1 request without Host"))
    );
}

#[test]
fn head_limit() {
    let mut input = b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: ".to_vec();
    input.extend(vec![b'x'; 5000]);
    input.extend(b"\r\n\r\n");
    assert_eq!(run(&input, 100).end, Err(RequestError::HeadTooLarge));
    assert_eq!(
        run(&input, input.len()).end,
        Err(RequestError::HeadTooLarge)
    );
    // Just under the limit is fine.
    let fits = format!(
        "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
        "y".repeat(4096 - 33)
    );
    assert_eq!(fits.len(), 4095);
    assert_eq!(run(fits.as_bytes(), 7).end, Ok(fits.len()));
}

#[test]
fn identical_content_lengths_and_codings_before_chunked_pass() {
    let input = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2, 2\r\n\r\nokPOST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n";
    assert_eq!(run_everywhere(input).end, Ok(input.len()));
}

/// Bytes of a request that asks to switch protocols are not read past until the response
/// decides; then they go on as they are.
#[test]
fn upgrade_waits_for_the_response() {
    let forwarding = Forwarding {
        header: ForwardedHeader::None,
        client: SocketAddr::from(([192, 0, 2, 7], 4711)),
        port: 80,
        trusted: false,
    };
    let mut framer = RequestFramer::new(forwarding, 4096);
    let mut out = Vec::new();
    let input = b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x05hello";
    let Ok(RequestStep::Head(head)) = framer.step(input, &mut out) else {
        panic!("head expected");
    };
    assert!(head.pending.upgrade && head.ends_message);
    assert_eq!(
        framer.step(&input[head.len..], &mut out),
        Ok(RequestStep::AwaitSwitch)
    );
    assert!(
        String::from_utf8_lossy(&out)
            .ends_with("X-Forwarded-Proto: http\r\nX-Forwarded-Port: 80\r\n\r\n")
    );
    let connect = b"CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n";
    let mut framer = RequestFramer::new(forwarding, 4096);
    let Ok(RequestStep::Head(head)) = framer.step(connect, &mut out) else {
        panic!("head expected");
    };
    assert!(head.pending.connect);
    assert_eq!(framer.step(&[], &mut out), Ok(RequestStep::AwaitSwitch));
    framer.resume();
    assert_eq!(framer.step(&[], &mut out), Ok(RequestStep::NeedMore));
}

fn rewritten(head: &str, header: ForwardedHeader, client: &str, trusted: bool) -> String {
    let forwarding = Forwarding {
        header,
        client: client.parse().unwrap(),
        port: 8080,
        trusted,
    };
    let mut framer = RequestFramer::new(forwarding, 4096);
    let mut out = Vec::new();
    let step = framer.step(head.as_bytes(), &mut out);
    assert!(matches!(step, Ok(RequestStep::Head(_))), "{step:?}");
    String::from_utf8(out).unwrap()
}

#[test]
fn forwarded_syntax_and_trust() {
    let head = "GET / HTTP/1.1\r\nHost: a\r\nx-forwarded-for: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Forwarded-Proto: https\r\nAccept: */*\r\n\r\n";
    assert_eq!(
        rewritten(head, ForwardedHeader::Forwarded, "192.0.2.7:4711", false),
        "GET / HTTP/1.1\r\nHost: a\r\nAccept: */*\r\nForwarded: for=\"192.0.2.7:4711\";proto=http\r\n\
X-Forwarded-Proto: http\r\nX-Forwarded-Port: 8080\r\n\r\n"
    );
    assert_eq!(
        rewritten(
            head,
            ForwardedHeader::Forwarded,
            "[2001:db8::1]:4711",
            false
        ),
        "GET / HTTP/1.1\r\nHost: a\r\nAccept: */*\r\nForwarded: for=\"[2001:db8::1]:4711\";proto=http\r\n\
X-Forwarded-Proto: http\r\nX-Forwarded-Port: 8080\r\n\r\n"
    );
    // A trusted load balancer's own headers are kept and appended to.
    assert_eq!(
        rewritten(
            head,
            ForwardedHeader::XForwardedFor,
            "[::ffff:198.51.100.9]:1000",
            true
        ),
        "GET / HTTP/1.1\r\nHost: a\r\nForwarded: for=6.6.6.6\r\nX-Forwarded-Proto: https\r\nAccept: */*\r\n\
X-Forwarded-For: 6.6.6.6, 198.51.100.9\r\nX-Forwarded-Port: 8080\r\n\r\n"
    );
    assert_eq!(
        rewritten(head, ForwardedHeader::Forwarded, "198.51.100.9:1000", true),
        "GET / HTTP/1.1\r\nHost: a\r\nx-forwarded-for: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nAccept: */*\r\n\
Forwarded: for=6.6.6.6, for=\"198.51.100.9:1000\";proto=http\r\nX-Forwarded-Port: 8080\r\n\r\n"
    );
}

/// Feeds responses split at every byte with the given requests; returns the head statuses'
/// lengths and where each response ended.
fn frame_responses(
    input: &[u8],
    requests: &[Pending],
    read: usize,
) -> Result<Vec<usize>, ResponseError> {
    let mut framer = ResponseFramer::new();
    let mut pending: std::collections::VecDeque<Pending> = requests.iter().copied().collect();
    let mut ends = Vec::new();
    let mut at = 0;
    let mut available = read.min(input.len());
    loop {
        match framer.step(&input[at..available], pending.front().copied())? {
            ResponseStep::NeedMore if available >= input.len() => return Ok(ends),
            ResponseStep::NeedMore => available = (available + read).min(input.len()),
            ResponseStep::Head(head) => {
                at += head.len;
                if head.tunnel {
                    ends.push(at);
                    return Ok(ends);
                }
                if head.ends_message && !head.interim {
                    pending.pop_front();
                    ends.push(at);
                }
            }
            ResponseStep::Body { len, ends_message } => {
                at += len;
                if ends_message {
                    pending.pop_front();
                    ends.push(at);
                }
            }
        }
        available = available.max(at);
    }
}

#[test]
fn responses_are_framed_at_every_split() {
    let get = Pending::default();
    let head = Pending {
        head: true,
        ..Pending::default()
    };
    let upgrade = Pending {
        upgrade: true,
        ..Pending::default()
    };
    let parts: [&[u8]; 6] = [
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nContent-Length: 999\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x02hi",
    ];
    let input = parts.concat();
    let requests = [get, head, get, get, get, upgrade];
    let mut expected = Vec::new();
    let mut at = 0;
    for part in &parts[..5] {
        at += part.len();
        expected.push(at);
    }
    expected.push(at + parts[5].len() - 4);
    for read in 1..=input.len() {
        assert_eq!(
            frame_responses(&input, &requests, read),
            Ok(expected.clone()),
            "read {read}"
        );
    }
    // Without a length the body runs to the close.
    let until_close = b"HTTP/1.0 200 OK\r\n\r\nall of it";
    assert_eq!(frame_responses(until_close, &[get], 3), Ok(vec![]));
    let bad = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
    assert!(frame_responses(bad, &[get], 100).is_err());
    let unasked = b"HTTP/1.1 101 Switching Protocols\r\n\r\n";
    assert!(frame_responses(unasked, &[get], 100).is_err());
}

#[test]
fn fuzz_check_on_samples() {
    for sample in [
        &b"\x05GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi"[..],
        b"\x00",
        b"",
        b"\xffPOST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n\r\n",
    ] {
        fuzz_check_requests(sample);
    }
}

/// What the fuzz target checks, on mutations of real request streams (a stand-in for a fuzzer
/// run on stable).
#[test]
fn fuzz_check_on_mutated_streams() {
    let rng = crate::hello::testutil::Rng::new(14);
    let corpus: [&[u8]; 3] = [
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\nPOST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\nGET / HTTP/1.0\r\n\r\n",
        b"\r\nGET /chat HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: ws\r\n\r\n\x81\x00GET / HTTP/1.1\r\n\r\n",
    ];
    for _ in 0..3000 {
        let mut data = vec![rng.byte()];
        data.extend(rng.mutate(rng.pick(&corpus)));
        fuzz_check_requests(&data);
    }
}
