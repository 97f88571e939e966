//! `cargo xtask fuzz-seeds`: writes the seed corpus of every fuzz target into
//! `fuzz/corpus/<target>/`, one small file per case, named for what it is.
//!
//! The seeds are what the parsers meet in practice and what an attacker would start from, so a
//! campaign begins past the easy structure instead of discovering it byte by byte:
//! - `hello_tls`: ClientHellos captured from this machine's `openssl s_client` and `curl`
//!   (kept once captured: their random fields change on every capture), browser-like hellos
//!   with GREASE, a post-quantum key share, an ECH outer extension, fragmented over several
//!   records, and broken ones (truncated, oversized lengths, a second hello, a PROXY header in
//!   front);
//! - `hello_http` and `http_requests`: request heads and streams: keep-alive, pipelined,
//!   chunked with extensions and trailers, `Expect: 100-continue`, upgrades, `CONNECT`, and the
//!   smuggling attempts the framer must refuse (CL with TE, two lengths, TE not ending in
//!   chunked, obs-fold, bare LF, NUL, oversized heads);
//! - `preface_roundtrip`: header descriptions in the layout `header_from_bytes` reads (flags,
//!   addresses, then authority and unique id), for every address kind and TLV, at and past the
//!   limits;
//! - `preface_receive`: PROXY headers as a balancer sends them in front of a hello (v1 TCP4,
//!   TCP6, UNKNOWN, the longest line; v2 PROXY and LOCAL, every family, TLVs, a right and a
//!   wrong CRC32C) and the broken ones the receiver must refuse.
//!
//! The first byte of a `hello_*` or `http_requests` input is not parsed: it says where the
//! check cuts the input (a prefix, or the read size), so each seed picks one.

use std::{
    fs,
    io::Read as _,
    net::TcpListener,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use spliced_tests::raw::hello::{client_hello, records};

/// Writes every seed, replacing generated ones and keeping captured ones that exist.
pub fn write(fuzz_dir: &Path) -> Result<()> {
    let corpus = fuzz_dir.join("corpus");
    let mut written = 0;
    for (target, seeds) in [
        ("hello_tls", tls_seeds()),
        ("hello_http", http_head_seeds()),
        ("http_requests", request_stream_seeds()),
        ("preface_roundtrip", preface_seeds()),
        ("preface_receive", receive_seeds()),
    ] {
        let dir = corpus.join(target);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for (name, bytes) in seeds {
            let path = dir.join(name);
            fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
            written += 1;
        }
    }
    written += capture_real_hellos(&corpus.join("hello_tls"))?;
    eprintln!(
        "fuzz-seeds: wrote {written} seeds under {}",
        corpus.display()
    );
    Ok(())
}

fn u16be(v: usize) -> [u8; 2] {
    u16::try_from(v).unwrap_or(u16::MAX).to_be_bytes()
}

fn vec16(body: &[u8]) -> Vec<u8> {
    let mut out = u16be(body.len()).to_vec();
    out.extend_from_slice(body);
    out
}

fn vec8(body: &[u8]) -> Vec<u8> {
    let mut out = vec![u8::try_from(body.len()).unwrap_or(u8::MAX)];
    out.extend_from_slice(body);
    out
}

fn ext(kind: u16, body: &[u8]) -> Vec<u8> {
    let mut out = kind.to_be_bytes().to_vec();
    out.extend(vec16(body));
    out
}

fn sni(name: &[u8]) -> Vec<u8> {
    let mut entry = vec![0];
    entry.extend(vec16(name));
    ext(0, &vec16(&entry))
}

fn alpn(names: &[&[u8]]) -> Vec<u8> {
    let list: Vec<u8> = names.iter().flat_map(|n| vec8(n)).collect();
    ext(16, &vec16(&list))
}

/// A ClientHello handshake message (type, 24-bit length, body) with these extensions, TLS 1.2
/// legacy fields and a fixed random.
fn hello_message(extensions: &[Vec<u8>]) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend((0u8..32).map(|i| i.wrapping_mul(37)));
    body.extend(vec8(&[0x5e; 32]));
    body.extend(vec16(&[0x13, 0x01, 0x13, 0x02, 0xc0, 0x2f]));
    body.extend(vec8(&[0]));
    body.extend(vec16(&extensions.concat()));
    let len = u32::try_from(body.len()).unwrap_or(0).to_be_bytes();
    let mut message = vec![1, len[1], len[2], len[3]];
    message.extend(body);
    message
}

/// `selector` then `bytes`: the selector picks where the check cuts the input.
fn seed(selector: u8, bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![selector];
    out.extend_from_slice(bytes);
    out
}

type Seeds = Vec<(&'static str, Vec<u8>)>;

fn tls_seeds() -> Seeds {
    let browser = client_hello(Some("site1.example"), &["h2", "http/1.1"], false);
    let pq = client_hello(Some("www.site1.example"), &["h2", "http/1.1"], true);
    let no_sni = client_hello(None, &["h2"], false);
    // ECH (draft-ietf-tls-esni, type 0xfe0d) outer: the SNI is the public name, the real one is
    // encrypted in the payload; the proxy routes on the outer SNI.
    let mut ech_body = vec![0, 0, 1, 0, 1, 0x42]; // outer, HPKE suite, config id
    ech_body.extend(vec16(&[0x11; 32])); // enc
    ech_body.extend(vec16(&[0x22; 200])); // payload
    let ech = hello_message(&[
        ext(0x2a2a, &[]),
        sni(b"public.example"),
        ext(0xfe0d, &ech_body),
        alpn(&[b"h2"]),
        ext(43, &vec8(&[0x7a, 0x7a, 3, 4])),
    ]);
    let grease_everywhere = hello_message(&[
        ext(0x0a0a, &[]),
        sni(b"site2.example"),
        ext(10, &vec16(&[0x1a, 0x1a, 0, 0x1d])),
        alpn(&[b"h2", b"http/1.1"]),
        ext(0xfafa, &[0]),
    ]);
    let message_len = browser.len();
    let mut seeds: Seeds = vec![
        ("browser-sni-alpn", seed(0x80, &records(&browser, &[]))),
        ("browser-no-sni", seed(0x40, &records(&no_sni, &[]))),
        ("browser-pq-keyshare", seed(0xc0, &records(&pq, &[]))),
        // The PQ hello over two records as Chrome sends it, and in many small fragments.
        ("pq-two-records", seed(0x90, &records(&pq, &[1200]))),
        (
            "fragmented-every-100",
            seed(
                0x30,
                &records(
                    &browser,
                    &(1..=message_len / 100).map(|i| i * 100).collect::<Vec<_>>(),
                ),
            ),
        ),
        (
            "fragmented-header-split",
            seed(0x10, &records(&browser, &[1, 2, 3, 4])),
        ),
        ("ech-outer", seed(0x70, &records(&ech, &[]))),
        (
            "grease-everywhere",
            seed(0xa0, &records(&grease_everywhere, &[])),
        ),
        (
            "sni-uppercase-trailing-dot",
            seed(
                0xff,
                &records(&hello_message(&[sni(b"WWW.Site1.Example.")]), &[]),
            ),
        ),
        (
            "sni-ip-literal",
            seed(0xff, &records(&hello_message(&[sni(b"192.0.2.1")]), &[])),
        ),
        (
            "sni-invalid-bytes",
            seed(
                0xff,
                &records(&hello_message(&[sni(b"a b\0.example")]), &[]),
            ),
        ),
        (
            "sni-two-names",
            seed(
                0xff,
                &records(&hello_message(&[sni(b"a.example"), sni(b"b.example")]), &[]),
            ),
        ),
        (
            "alpn-empty-protocol",
            seed(0xff, &records(&hello_message(&[alpn(&[b"h2", b""])]), &[])),
        ),
        (
            "no-extensions",
            seed(0x60, &records(&hello_message(&[]), &[])),
        ),
        // Too long for the 16 KiB limit: padding extension in records of 16 KiB.
        (
            "oversized-padding",
            seed(
                0xf0,
                &records(
                    &hello_message(&[sni(b"big.example"), ext(21, &[0; 17000])]),
                    &[16384],
                ),
            ),
        ),
    ];
    let framed = records(&browser, &[]);
    seeds.push((
        "truncated-mid-extension",
        seed(0xff, framed.get(..framed.len() / 2).unwrap_or(&framed)),
    ));
    let mut length_lies = framed.clone();
    if let Some(b) = length_lies.get_mut(8) {
        *b = 0xff; // handshake length larger than the record
    }
    seeds.push(("handshake-length-lies", seed(0xff, &length_lies)));
    let mut two = framed.clone();
    two.extend_from_slice(&framed);
    seeds.push(("two-hellos-back-to-back", seed(0x80, &two)));
    seeds.push((
        "alert-record-first",
        seed(0xff, &[&[21, 3, 3, 0, 2, 2, 40][..], &framed].concat()),
    ));
    seeds.push((
        "sslv2-compatible-hello",
        seed(
            0xff,
            &[0x80, 0x2e, 1, 3, 1, 0, 0x15, 0, 0, 0, 0x10, 0, 0, 4],
        ),
    ));
    seeds.push((
        "proxy-v1-before-hello",
        seed(0x20, &[PROXY_V1, &framed].concat()),
    ));
    seeds.push((
        "proxy-v2-before-hello",
        seed(0x20, &[&proxy_v2()[..], &framed].concat()),
    ));
    seeds.push((
        "http-request-on-tls-port",
        seed(0xff, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
    ));
    seeds
}

/// A PROXY v1 line as a client that should not send one might.
const PROXY_V1: &[u8] = b"PROXY TCP4 192.0.2.7 198.51.100.1 4711 443\r\n";

/// A PROXY v2 header (TCP over IPv4) with an authority TLV.
fn proxy_v2() -> Vec<u8> {
    let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    out.extend_from_slice(&[0x21, 0x11]);
    let mut addresses = vec![192, 0, 2, 7, 198, 51, 100, 1, 0x12, 0x67, 1, 0xbb];
    addresses.push(2); // PP2_TYPE_AUTHORITY
    addresses.extend(vec16(b"site1.example"));
    out.extend(vec16(&addresses));
    out
}

/// Heads that only the routing parser reads (the first request of a connection).
const HEADS: &[(&str, &[u8])] = &[
    ("get-host", b"GET / HTTP/1.1\r\nHost: site1.example\r\n\r\n"),
    (
        "host-with-port",
        b"GET /a?b=c HTTP/1.1\r\nHost: site1.example:8080\r\nAccept: */*\r\n\r\n",
    ),
    (
        "host-uppercase-trailing-dot",
        b"GET / HTTP/1.1\r\nHOST: WWW.Site1.Example.\r\n\r\n",
    ),
    (
        "host-ipv6-literal",
        b"GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n",
    ),
    ("host-ipv4", b"GET / HTTP/1.1\r\nHost: 192.0.2.1\r\n\r\n"),
    ("host-missing", b"GET / HTTP/1.1\r\nUser-Agent: x\r\n\r\n"),
    ("host-empty", b"GET / HTTP/1.1\r\nHost: \r\n\r\n"),
    (
        "host-twice",
        b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
    ),
    (
        "host-bad-bytes",
        b"GET / HTTP/1.1\r\nHost: a b.example\r\n\r\n",
    ),
    (
        "host-userinfo",
        b"GET / HTTP/1.1\r\nHost: user@site1.example\r\n\r\n",
    ),
    (
        "absolute-form",
        b"GET http://other.example/x HTTP/1.1\r\nHost: site1.example\r\n\r\n",
    ),
    ("http10-no-host", b"GET / HTTP/1.0\r\n\r\n"),
    ("http09", b"GET /\r\n\r\n"),
    (
        "options-star",
        b"OPTIONS * HTTP/1.1\r\nHost: site1.example\r\n\r\n",
    ),
    (
        "connect-authority",
        b"CONNECT site1.example:443 HTTP/1.1\r\nHost: site1.example:443\r\n\r\n",
    ),
    ("bare-lf", b"GET / HTTP/1.1\nHost: site1.example\n\n"),
    (
        "obs-fold-host",
        b"GET / HTTP/1.1\r\nHost: a.example\r\n b.example\r\n\r\n",
    ),
    (
        "space-before-colon",
        b"GET / HTTP/1.1\r\nHost : evil.example\r\nHost: site1.example\r\n\r\n",
    ),
    (
        "nul-in-head",
        b"GET / HTTP/1.1\r\nHost: site1.example\0evil\r\n\r\n",
    ),
    (
        "leading-crlf",
        b"\r\n\r\nGET / HTTP/1.1\r\nHost: site1.example\r\n\r\n",
    ),
    (
        "lowercase-method",
        b"get / HTTP/1.1\r\nHost: site1.example\r\n\r\n",
    ),
    (
        "tls-hello-on-http-port",
        b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00",
    ),
];

fn http_head_seeds() -> Seeds {
    let mut seeds: Seeds = HEADS
        .iter()
        .enumerate()
        .map(|(i, (name, head))| {
            // Spread the cut over the whole range across the seeds.
            let selector = u8::try_from(i * 47 % 256).unwrap_or(0xff);
            (*name, seed(selector, head))
        })
        .collect();
    let curl = b"GET /index.html HTTP/1.1\r\nHost: site1.example\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n";
    seeds.push(("curl-get", seed(0x80, curl)));
    let browser = b"GET /path/page?q=1 HTTP/1.1\r\nHost: www.site2.example\r\nConnection: keep-alive\r\nUpgrade-Insecure-Requests: 1\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36\r\nAccept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\nAccept-Encoding: gzip, deflate\r\nAccept-Language: en-US,en;q=0.9\r\nCookie: a=b; c=d\r\n\r\n";
    seeds.push(("browser-get", seed(0xc0, browser)));
    seeds.push((
        "proxy-v1-before-request",
        seed(0x30, &[PROXY_V1, curl].concat()),
    ));
    seeds.push((
        "proxy-v2-before-request",
        seed(0x30, &[&proxy_v2()[..], curl].concat()),
    ));
    // Just past the 8 KiB head limit, with the Host at the end.
    let mut big = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 8200));
    big.extend_from_slice(b"\r\nHost: site1.example\r\n\r\n");
    seeds.push(("head-over-limit", seed(0xff, &big)));
    seeds.push(("pipelined-second-host", seed(0xff, PIPELINED)));
    seeds
}

const PIPELINED: &[u8] = b"GET /1 HTTP/1.1\r\nHost: site1.example\r\n\r\nGET /2 HTTP/1.1\r\nHost: site1.example\r\n\r\nGET /3 HTTP/1.1\r\nHost: other.example\r\n\r\n";

/// Whole request streams for the framer of header sites (4 KiB head limit in the check).
const STREAMS: &[(&str, &[u8])] = &[
    ("keep-alive-two-gets", b"GET /a HTTP/1.1\r\nHost: site1.example\r\n\r\nGET /b HTTP/1.1\r\nHost: site1.example\r\nConnection: close\r\n\r\n"),
    ("pipelined-three", PIPELINED),
    ("post-content-length", b"POST /form HTTP/1.1\r\nHost: site1.example\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 11\r\n\r\na=1&b=2&c=3GET / HTTP/1.1\r\nHost: site1.example\r\n\r\n"),
    ("chunked-with-extension-and-trailer", b"POST /up HTTP/1.1\r\nHost: site1.example\r\nTransfer-Encoding: chunked\r\n\r\n5;name=value\r\nhello\r\nA\r\n0123456789\r\n0\r\nX-Trailer: t\r\n\r\nGET /next HTTP/1.1\r\nHost: site1.example\r\n\r\n"),
    ("chunked-uppercase-hex", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1F\r\n0123456789012345678901234567890\r\n0\r\n\r\n"),
    ("expect-100-continue", b"PUT /file HTTP/1.1\r\nHost: site1.example\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\ndata"),
    ("websocket-upgrade", b"GET /ws HTTP/1.1\r\nHost: site1.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58"),
    ("connect-tunnel", b"CONNECT site1.example:443 HTTP/1.1\r\nHost: site1.example:443\r\n\r\n\x16\x03\x01\x00\x00"),
    ("head-request", b"HEAD / HTTP/1.1\r\nHost: site1.example\r\n\r\nGET / HTTP/1.1\r\nHost: site1.example\r\n\r\n"),
    ("http10-keep-alive", b"GET / HTTP/1.0\r\nHost: site1.example\r\nConnection: keep-alive\r\n\r\n"),
    ("client-xff-removed", b"GET / HTTP/1.1\r\nHost: site1.example\r\nX-Forwarded-For: 10.0.0.1\r\nForwarded: for=10.0.0.1\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Port: 443\r\nx-forwarded-for: 10.0.0.2\r\n\r\n"),
    ("misdirected-second-host", b"GET / HTTP/1.1\r\nHost: site1.example\r\n\r\nGET / HTTP/1.1\r\nHost: evil.example\r\n\r\n"),
    ("smuggle-cl-te", b"POST / HTTP/1.1\r\nHost: site1.example\r\nContent-Length: 13\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nSMUGGLED"),
    ("smuggle-te-cl", b"POST / HTTP/1.1\r\nHost: site1.example\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n"),
    ("smuggle-two-content-lengths", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
    ("smuggle-content-length-list", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello"),
    ("smuggle-content-length-sign", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\nhello"),
    ("smuggle-content-length-huge", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999999\r\n\r\n"),
    ("smuggle-te-chunked-not-last", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n"),
    ("smuggle-te-obfuscated", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n"),
    ("smuggle-te-http10", b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("smuggle-obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n Transfer-Encoding: chunked\r\n\r\n"),
    ("smuggle-bare-lf-in-chunk", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n"),
    ("smuggle-chunk-size-overflow", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFF1\r\nx\r\n0\r\n\r\n"),
    ("smuggle-chunk-missing-crlf", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX0\r\n\r\n"),
    ("smuggle-nul-in-header", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\0c\r\n\r\n"),
    ("smuggle-get-with-body", b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 41\r\n\r\nGET /admin HTTP/1.1\r\nHost: internal\r\n\r\n"),
];

fn request_stream_seeds() -> Seeds {
    let mut seeds: Seeds = STREAMS
        .iter()
        .enumerate()
        .map(|(i, (name, stream))| {
            // The selector's low 6 bits are the read size - 1: one byte at a time, a few
            // bytes, and everything at once all come up.
            let selector = [0u8, 2, 6, 15, 63][i % 5];
            (*name, seed(selector, stream))
        })
        .collect();
    let mut big = b"GET / HTTP/1.1\r\nHost: a\r\nX-Pad: ".to_vec();
    big.extend(std::iter::repeat_n(b'p', 4100));
    big.extend_from_slice(b"\r\n\r\n");
    seeds.push(("head-over-4k-limit", seed(63, &big)));
    seeds.push((
        "proxy-v1-before-request",
        seed(7, &[PROXY_V1, HEADS[0].1].concat()),
    ));
    seeds
}

fn preface_seeds() -> Seeds {
    // Layout: flags (bits 0-1 source kind, 2-3 destination kind: 0 IPv4, 1 IPv6, 2 IPv4-mapped,
    // 3 IPv6 with groups zeroed by a mask byte; bit 4 authority, 6 unique id, 7 CRC32C), then
    // each address (and port, and for IPv6 a scope byte), then each present value as length
    // and bytes.
    let v4 = |a: [u8; 4], port: u16| [&a[..], &port.to_be_bytes()].concat();
    let v6 = |a: [u8; 16], port: u16| [&a[..], &port.to_be_bytes(), &[0]].concat();
    let doc6 = [
        0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];
    let client6 = [
        0x20, 0x01, 0x0d, 0xb8, 0xa, 0xb, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7,
    ];
    let authority = [&2u16.to_be_bytes()[..], b"a."].concat();
    let long_authority = [&299u16.to_be_bytes()[..], &[b'x'; 299][..]].concat();
    let mut seeds: Seeds = vec![
        (
            "v4-v4",
            [
                &[0x00][..],
                &v4([192, 0, 2, 7], 4711),
                &v4([198, 51, 100, 1], 443),
            ]
            .concat(),
        ),
        (
            "v6-v6",
            [&[0x05][..], &v6(client6, 4711), &v6(doc6, 443)].concat(),
        ),
        (
            "v4-v6-mixed",
            [&[0x04][..], &v4([192, 0, 2, 7], 4711), &v6(doc6, 80)].concat(),
        ),
        (
            "mapped-mapped",
            [
                &[0x0a][..],
                &v4([192, 0, 2, 7], 1),
                &[0],
                &v4([198, 51, 100, 1], 2),
                &[0],
            ]
            .concat(),
        ),
        // Zero runs: groups 2-5 and groups 0-7 (the unspecified address).
        (
            "v6-zero-runs",
            [
                // Source: mask, groups 0, 1, 6, 7 (2001:db8::1), port 4711, scope.
                &[0x0f, 0x3c][..],
                &[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 1, 0x12, 0x67, 0],
                // Destination: every group zero (::), port 443, scope.
                &[0xff, 0x01, 0xbb, 0],
            ]
            .concat(),
        ),
        (
            "authority",
            [
                &[0x10][..],
                &v4([192, 0, 2, 7], 4711),
                &v4([198, 51, 100, 1], 443),
                &[0, 13],
                b"site1.example",
            ]
            .concat(),
        ),
        (
            "authority-utf8-cut",
            [&[0x10][..], &[0; 12], &[0, 4], b"\xc3\xa9\xc3"].concat(),
        ),
        (
            "authority-over-limit",
            [&[0x10][..], &[0; 12], &long_authority].concat(),
        ),
        (
            "unique-id",
            [&[0x40][..], &[0; 12], &[16], &[0xab; 16]].concat(),
        ),
        (
            "unique-id-over-limit",
            [&[0x40][..], &[0; 12], &[255], &[0xcd; 255]].concat(),
        ),
        (
            "crc32c",
            [
                &[0x80][..],
                &v4([192, 0, 2, 7], 4711),
                &v4([198, 51, 100, 1], 443),
            ]
            .concat(),
        ),
        (
            "everything",
            [
                &[0xd5][..],
                &v6(client6, 65535),
                &v6(doc6, 0),
                &authority,
                &[3],
                b"id!",
            ]
            .concat(),
        ),
        ("empty", Vec::new()),
    ];
    // A real v1 and v2 header read as a description: odd values the layout still accepts.
    seeds.push(("real-v1-line", PROXY_V1.to_vec()));
    seeds.push(("real-v2-header", proxy_v2()));
    seeds
}

/// A v2 header: signature, `ver_cmd`, family, then `block` with its length.
fn v2_header(ver_cmd: u8, family: u8, block: &[u8]) -> Vec<u8> {
    let mut out = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    out.extend_from_slice(&[ver_cmd, family]);
    out.extend(vec16(block));
    out
}

/// Headers in front of a hello, as the receiver meets them (the whole input is parsed).
fn receive_seeds() -> Seeds {
    const HELLO: &[u8] = b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00";
    const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: site1.example\r\n\r\n";
    let v4 = [192, 0, 2, 7, 198, 51, 100, 1, 0x12, 0x67, 0x01, 0xbb];
    let mut v6 = vec![
        0x20, 0x01, 0x0d, 0xb8, 0, 0x0c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
    ];
    v6.extend_from_slice(&[
        0x20, 0x01, 0x0d, 0xb8, 0, 0x0c, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1,
    ]);
    v6.extend_from_slice(&[0x12, 0x67, 0x01, 0xbb]);
    let tlvs = [
        &[0x02][..],
        &vec16(b"site1.example"),
        &[0x05],
        &vec16(b"0123456789abcdef"),
        &[0x20],
        &vec16(&[0x01, 0, 0, 0, 0]),
        &[0x04],
        &vec16(&[0; 7]),
    ]
    .concat();
    // CRC32C over the header with its value zeroed, as the spec defines it.
    let with_crc = |good: bool| {
        let mut header = v2_header(0x21, 0x11, &[&v4[..], &[0x03, 0, 4, 0, 0, 0, 0]].concat());
        let crc = crc32c_bitwise(&header) ^ u32::from(!good);
        let at = header.len() - 4;
        header[at..].copy_from_slice(&crc.to_be_bytes());
        header
    };
    let then = |header: &[u8], rest: &[u8]| [header, rest].concat();
    let mut longest = b"PROXY UNKNOWN ".to_vec();
    longest.resize(105, b'f');
    longest.extend_from_slice(b"\r\n");
    let long = [&longest[..104], b"ff\r\n"].concat();
    vec![
        ("v1-tcp4", then(PROXY_V1, HELLO)),
        (
            "v1-tcp6",
            then(b"PROXY TCP6 2001:db8:c::10 2001:db8:c::1 4711 443\r\n", GET),
        ),
        ("v1-unknown", then(b"PROXY UNKNOWN\r\n", HELLO)),
        ("v1-longest", then(&longest, HELLO)),
        ("v1-too-long", long),
        (
            "v1-bare-lf",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 4711 443\n".to_vec(),
        ),
        (
            "v1-leading-zero-port",
            b"PROXY TCP4 192.0.2.7 198.51.100.1 04711 443\r\n".to_vec(),
        ),
        ("v2-tcp4", then(&v2_header(0x21, 0x11, &v4), HELLO)),
        ("v2-tcp6", then(&v2_header(0x21, 0x21, &v6), GET)),
        (
            "v2-tlvs",
            then(&v2_header(0x21, 0x11, &[&v4[..], &tlvs].concat()), HELLO),
        ),
        ("v2-local", then(&v2_header(0x20, 0x00, &[]), HELLO)),
        ("v2-local-with-block", v2_header(0x20, 0x11, &v4)),
        ("v2-unspec", v2_header(0x21, 0x00, &[])),
        ("v2-udp4", v2_header(0x21, 0x12, &v4)),
        ("v2-unix", v2_header(0x21, 0x31, &[0; 216])),
        ("v2-short-addresses", v2_header(0x21, 0x21, &v4)),
        (
            "v2-truncated-tlv",
            v2_header(0x21, 0x11, &[&v4[..], &[0x04, 0, 9]].concat()),
        ),
        ("v2-crc32c", then(&with_crc(true), HELLO)),
        ("v2-crc32c-wrong", with_crc(false)),
        ("v2-bad-version", v2_header(0x11, 0x11, &v4)),
        ("v2-too-long", v2_header(0x21, 0x11, &[0; 5000])),
        ("no-header-tls", HELLO.to_vec()),
        ("no-header-http", GET.to_vec()),
    ]
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit: the seeds need a right
/// checksum and xtask does not otherwise depend on a CRC crate.
fn crc32c_bitwise(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Captures the ClientHello that `openssl s_client` and `curl` on this machine send, for
/// each client and option set whose file does not exist yet. Returns how many were written.
/// A client missing on this machine is skipped with a note.
fn capture_real_hellos(dir: &Path) -> Result<usize> {
    let cases: [(&str, &str); 5] = [
        (
            "openssl-tls13-sni",
            "openssl s_client -servername site1.example -connect 127.0.0.1:PORT",
        ),
        (
            "openssl-no-sni",
            "openssl s_client -noservername -connect 127.0.0.1:PORT",
        ),
        (
            "openssl-tls12-alpn",
            "openssl s_client -tls1_2 -alpn h2,http/1.1 -servername site2.example -connect 127.0.0.1:PORT",
        ),
        (
            "curl-https",
            "curl -sk --max-time 2 --connect-to site1.example:443:127.0.0.1:PORT https://site1.example/",
        ),
        (
            "curl-tls12-max",
            "curl -sk --max-time 2 --tls-max 1.2 --connect-to site3.example:443:127.0.0.1:PORT https://site3.example/",
        ),
    ];
    let mut written = 0;
    for (name, command) in cases {
        let path = dir.join(format!("captured-{name}"));
        if path.exists() {
            continue;
        }
        let listener = TcpListener::bind("127.0.0.1:0").context("binding a capture listener")?;
        let port = listener.local_addr()?.port().to_string();
        let argv: Vec<String> = command
            .split(' ')
            .map(|a| a.replace("PORT", &port))
            .collect();
        let (program, args) = argv.split_first().context("empty command")?;
        let mut cmd = Command::new(program);
        cmd.args(args);
        let mut child = match cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(child) => child,
            Err(e) => {
                eprintln!("fuzz-seeds: not capturing {name}: {program}: {e}");
                continue;
            }
        };
        let hello = read_hello(&listener);
        let _ = child.kill();
        let _ = child.wait();
        let hello = hello.with_context(|| format!("capturing {name}"))?;
        fs::write(&path, seed(0x80, &hello))
            .with_context(|| format!("writing {}", path.display()))?;
        written += 1;
    }
    Ok(written)
}

/// Accepts one connection and reads until the TLS records hold a whole handshake message (or
/// 3 s pass), returning the bytes read.
fn read_hello(listener: &TcpListener) -> Result<Vec<u8>> {
    let (mut socket, _) = listener.accept().context("accepting the client")?;
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    let start = Instant::now();
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    while start.elapsed() < Duration::from_secs(3) && !whole_hello(&bytes) {
        match socket.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(buf.get(..n).unwrap_or_default()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::ensure!(
        whole_hello(&bytes),
        "got {} bytes, not a whole ClientHello",
        bytes.len()
    );
    Ok(bytes)
}

/// Whether `bytes`, TLS handshake records, hold a whole first handshake message.
fn whole_hello(bytes: &[u8]) -> bool {
    let mut payload = Vec::new();
    let mut rest = bytes;
    while let [22, _, _, hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        let Some(fragment) = tail.get(..len) else {
            break;
        };
        payload.extend_from_slice(fragment);
        rest = tail.get(len..).unwrap_or_default();
    }
    match payload.get(1..4) {
        Some(&[a, b, c]) => {
            payload.len() >= 4 + (usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c))
        }
        _ => false,
    }
}
