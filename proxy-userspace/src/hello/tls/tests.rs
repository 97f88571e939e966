#![allow(clippy::indexing_slicing, clippy::unwrap_used)]

use super::*;
use crate::hello::testutil::*;

fn parse(buf: &[u8]) -> Result<Option<ClientHello>, HelloError> {
    parse_client_hello(buf)
}

fn hello(sni: Option<&str>, alpn: &[&str]) -> ClientHello {
    ClientHello {
        sni: sni.map(String::from),
        alpn: alpn.iter().map(|s| s.to_string()).collect(),
        legacy_version: 0x0303,
    }
}

/// Asserts the parser says "need more" for every proper prefix of `bytes` and gives `expected`
/// for the whole: one byte per read, then every two-read split.
fn assert_streams(bytes: &[u8], expected: &ClientHello) {
    let (result, used) = feed(&bytewise(bytes), parse);
    assert_eq!(result, Ok(Some(expected.clone())), "byte at a time");
    assert_eq!(used, bytes.len(), "answered before the last byte");
    for at in 0..=bytes.len() {
        let (result, used) = feed(&[&bytes[..at], &bytes[at..]], parse);
        assert_eq!(result, Ok(Some(expected.clone())), "split at {at}");
        assert_eq!(used, bytes.len(), "split at {at}");
    }
}

/// Same message, given record cuts and version.
fn in_records(message: &[u8], cuts: &[usize]) -> Vec<u8> {
    records_cut_at(message, cuts, 0x0301)
}

// --- hellos that must parse -------------------------------------------------------------------

#[test]
fn post_quantum_hello_is_bigger_than_a_segment_and_parses() {
    let h = chrome_like_hello(Some("www.Example.com"), 1);
    assert!(h.bytes.len() > 1700, "{} bytes", h.bytes.len());
    assert_eq!(
        parse(&h.bytes),
        Ok(Some(hello(Some("www.example.com"), &["h2", "http/1.1"])))
    );
}

#[test]
fn post_quantum_hello_streams_in_one_two_and_three_records() {
    for records in 1..=3 {
        let h = chrome_like_hello(Some("a.example"), records);
        assert_streams(&h.bytes, &h.expected);
    }
}

#[test]
fn captured_openssl_hellos_stream() {
    assert_streams(
        &captured_openssl_hello(),
        &hello(Some("a.example"), &["h2", "http/1.1"]),
    );
    assert_streams(&captured_openssl_hello_without_sni(), &hello(None, &[]));
}

#[test]
fn captured_hello_split_into_records_at_every_position() {
    let bytes = captured_openssl_hello();
    let message = &bytes[5..];
    let expected = hello(Some("a.example"), &["h2", "http/1.1"]);
    for cut in 1..message.len() {
        let two = in_records(message, &[cut]);
        assert_eq!(
            parse(&two),
            Ok(Some(expected.clone())),
            "record cut at {cut}"
        );
        // A read boundary right before, at and after the record boundary.
        for read in [cut + 4, cut + 5, cut + 6, cut + 10, cut + 11] {
            let (result, _) = feed(&[&two[..read], &two[read..]], parse);
            assert_eq!(
                result,
                Ok(Some(expected.clone())),
                "record cut {cut}, read cut {read}"
            );
        }
    }
}

#[test]
fn three_records_with_every_read_split() {
    let h = chrome_like_hello(Some("a.example"), 1);
    let len = h.message.len();
    // Record cuts inside the handshake header, inside the key share, near the end.
    for cuts in [[1, 2], [3, 4], [4, 900], [600, 1300], [len - 2, len - 1]] {
        let bytes = in_records(&h.message, &cuts);
        assert_streams(&bytes, &h.expected);
    }
}

#[test]
fn every_byte_in_its_own_record() {
    let message = client_hello_message(&[sni_ext(b"tiny.example"), alpn_ext(&[b"h2"])]);
    let cuts: Vec<usize> = (1..message.len()).collect();
    let bytes = in_records(&message, &cuts);
    assert_eq!(bytes.len(), message.len() * 6);
    assert_streams(&bytes, &hello(Some("tiny.example"), &["h2"]));
}

#[test]
fn record_versions_tls10_to_tls12_are_accepted() {
    let message = client_hello_message(&[sni_ext(b"a.example")]);
    for version in [0x0301, 0x0302, 0x0303] {
        let bytes = records_cut_at(&message, &[], version);
        assert_eq!(
            parse(&bytes),
            Ok(Some(hello(Some("a.example"), &[]))),
            "{version:#x}"
        );
    }
}

#[test]
fn answer_comes_with_the_last_hello_byte_even_mid_record() {
    // The record carries two extra bytes after the ClientHello: the hello is already whole, and
    // whatever follows is the backend's business.
    let message = client_hello_message(&[sni_ext(b"a.example")]);
    let mut payload = message.clone();
    payload.extend([0xde, 0xad]);
    let bytes = in_records(&payload, &[]);
    let (result, used) = feed(&bytewise(&bytes), parse);
    assert_eq!(result, Ok(Some(hello(Some("a.example"), &[]))));
    assert_eq!(used, bytes.len() - 2);
}

#[test]
fn bytes_after_the_hello_do_not_change_the_answer() {
    let mut bytes = captured_openssl_hello();
    let expected = parse(&bytes);
    bytes.extend([23, 3, 3, 0, 5, 1, 2, 3, 4, 5]); // early data, say
    assert_eq!(parse(&bytes), expected);
    bytes.extend(vec![0u8; MAX_CLIENT_HELLO]); // more than the limit in total
    assert_eq!(parse(&bytes), expected);
}

#[test]
fn no_sni_means_default_site() {
    let h = chrome_like_hello(None, 2);
    assert_eq!(parse(&h.bytes).unwrap().unwrap().sni, None);
    // A hello without any extension block at all (pre-TLS 1.2 clients).
    let bare = in_records(&client_hello_message_raw(&[]), &[]);
    assert_eq!(parse(&bare), Ok(Some(hello(None, &[]))));
    // server_name with only an unknown name type: no host name either.
    let other = ext(0, &vec16(&[&[7u8][..], &vec16(b"x")].concat()));
    assert_eq!(
        parse(&in_records(&client_hello_message(&[other]), &[])),
        Ok(Some(hello(None, &[])))
    );
}

#[test]
fn sni_is_lowercased_and_trailing_dot_kept() {
    let bytes = in_records(&client_hello_message(&[sni_ext(b"WWW.Example.COM.")]), &[]);
    assert_eq!(
        parse(&bytes).unwrap().unwrap().sni.as_deref(),
        Some("www.example.com.")
    );
}

#[test]
fn alpn_grease_names_are_left_out() {
    let exts = [alpn_ext(&[b"\xfa\xfa", b"h2", b"http/1.1"])];
    let bytes = in_records(&client_hello_message(&exts), &[]);
    assert_eq!(parse(&bytes).unwrap().unwrap().alpn, ["h2", "http/1.1"]);
}

/// tls-parser 0.12's extension-list parser stops at the first extension it cannot parse and
/// reports success for what came before: relying on it would lose the SNI here.
#[test]
fn extension_tls_parser_rejects_does_not_hide_the_sni() {
    // post_handshake_auth (49) must be empty for tls-parser; 13172 (NPN) too. Both with data.
    let exts = [
        ext(49, &[1]),
        ext(13172, &[1, 2]),
        sni_ext(b"hidden.example"),
    ];
    let block = exts.concat();
    let (rest, parsed) = tls_parser::parse_tls_client_hello_extensions(&block).unwrap();
    assert!(
        parsed.is_empty() && rest.len() == block.len(),
        "tls-parser changed: update the module docs"
    );
    let bytes = in_records(&client_hello_message(&exts), &[]);
    assert_eq!(parse(&bytes), Ok(Some(hello(Some("hidden.example"), &[]))));
}

/// Where tls-parser does parse the whole list, it must agree with the walker.
#[test]
fn walker_agrees_with_tls_parser_on_well_formed_hellos() {
    for h in [
        chrome_like_hello(Some("a.example"), 1),
        chrome_like_hello(None, 1),
    ] {
        let (_, tls_parser::TlsMessageHandshake::ClientHello(ch)) =
            tls_parser::parse_tls_handshake_msg_client_hello(&h.message[4..]).unwrap()
        else {
            panic!("not a ClientHello")
        };
        let (rest, exts) = tls_parser::parse_tls_client_hello_extensions(ch.ext.unwrap()).unwrap();
        assert!(rest.is_empty());
        let mut sni = None;
        let mut alpn = Vec::new();
        for e in exts {
            match e {
                tls_parser::TlsExtension::SNI(names) => {
                    sni = names
                        .first()
                        .map(|(_, n)| String::from_utf8(n.to_vec()).unwrap());
                }
                tls_parser::TlsExtension::ALPN(names) => {
                    alpn = names
                        .iter()
                        .map(|n| String::from_utf8(n.to_vec()).unwrap())
                        .collect();
                }
                _ => {}
            }
        }
        let ours = parse(&h.bytes).unwrap().unwrap();
        assert_eq!((ours.sni, ours.alpn), (sni, alpn));
    }
}

// --- refusals ---------------------------------------------------------------------------------

#[test]
fn empty_input_needs_more() {
    assert_eq!(parse(b""), Ok(None));
}

#[test]
fn non_tls_is_refused_from_the_first_byte() {
    for first in [
        &b"G"[..],
        b"GET / HTTP/1.1\r\n",
        b"\x80",
        b"\x00",
        b"\xff",
        b"\x15",
        b"\x14",
        b"\x17",
    ] {
        assert_eq!(parse(first), Err(HelloError::NotTls), "{first:?}");
    }
    // An SSLv2-compatible ClientHello (two-byte header with the high bit set).
    let sslv2 = [
        0x80, 0x2e, 0x01, 0x03, 0x01, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10,
    ];
    assert_eq!(parse(&sslv2), Err(HelloError::NotTls));
    // A handshake content type followed by something that is not a TLS version.
    assert_eq!(parse(&[22, 0]), Err(HelloError::NotTls));
    assert_eq!(parse(&[22]), Ok(None));
}

#[test]
fn alert_and_change_cipher_spec_records_are_refused() {
    assert_eq!(parse(&HANDSHAKE_FAILURE_ALERT), Err(HelloError::NotTls));
    let message = client_hello_message(&[sni_ext(b"a.example")]);
    let first = in_records(&message[..10], &[]);
    for interloper in [&[21u8, 3, 3, 0, 2, 2, 40][..], &[20, 3, 3, 0, 1, 1]] {
        let mut bytes = first.clone();
        bytes.extend_from_slice(&interloper[..1]);
        assert!(
            matches!(parse(&bytes), Err(HelloError::Malformed(_))),
            "{interloper:?}"
        );
    }
}

#[test]
fn server_hello_and_other_handshakes_are_not_client_hellos() {
    for kind in [0u8, 2, 4, 11, 20, 255] {
        let bytes = in_records(&handshake(kind, &[0; 40]), &[]);
        // Decided by the sixth byte, the handshake type.
        assert_eq!(
            parse(&bytes[..6]),
            Err(HelloError::NotClientHello),
            "type {kind}"
        );
        assert_eq!(parse(&bytes[..5]), Ok(None));
    }
}

#[test]
fn record_header_errors() {
    assert!(
        matches!(parse(&[22, 3, 0]), Err(HelloError::Malformed(_))),
        "SSL 3.0 record"
    );
    assert!(
        matches!(parse(&[22, 3, 4]), Err(HelloError::Malformed(_))),
        "record version 3.4"
    );
    assert!(
        matches!(
            parse(&[22, 3, 1, 0x40, 0x01]),
            Err(HelloError::Malformed(_))
        ),
        "2^14 + 1"
    );
    assert!(
        matches!(parse(&[22, 3, 1, 0x41]), Err(HelloError::Malformed(_))),
        "high byte alone"
    );
    assert!(matches!(
        parse(&[22, 3, 1, 0xff, 0xff]),
        Err(HelloError::Malformed(_))
    ));
    assert!(
        matches!(parse(&[22, 3, 1, 0, 0]), Err(HelloError::Malformed(_))),
        "empty record"
    );
    assert_eq!(
        parse(&[22, 3, 1, 0x40, 0x00]),
        Ok(None),
        "2^14 exactly is a legal record"
    );
    assert_eq!(parse(&[22, 3, 1, 0x40]), Ok(None));
    // An empty record after the first one, too.
    let message = client_hello_message(&[]);
    let mut bytes = in_records(&message[..3], &[]);
    bytes.extend([22, 3, 3, 0, 0]);
    assert!(matches!(parse(&bytes), Err(HelloError::Malformed(_))));
}

#[test]
fn handshake_length_over_the_limit_is_refused_from_the_header() {
    // The largest message that fits in one record under the limit: 5 + 4 + len == MAX.
    let fits = MAX_CLIENT_HELLO - 9;
    let header = |len: usize| {
        let l = u32::try_from(len).unwrap().to_be_bytes();
        vec![22, 3, 1, 0x40, 0x00, 1, l[1], l[2], l[3]]
    };
    assert_eq!(parse(&header(fits)), Ok(None));
    assert_eq!(parse(&header(fits + 1)), Err(HelloError::TooLarge));
    assert_eq!(parse(&header(16 * 1024)), Err(HelloError::TooLarge));
    assert_eq!(parse(&header(0xff_ffff)), Err(HelloError::TooLarge));
    // The same header spread over four one-byte records.
    let mut split = in_records(&header(fits + 1)[5..8], &[1, 2]);
    assert_eq!(parse(&split), Ok(None));
    split.extend([22, 3, 1, 0, 1, header(fits + 1)[8]]);
    assert_eq!(parse(&split), Err(HelloError::TooLarge));
}

/// A hello padded so that its records total `total` bytes on the wire.
fn padded_hello(total: usize, records: usize) -> Vec<u8> {
    let base = client_hello_message(&[sni_ext(b"a.example"), ext(21, &[])]);
    let message_len = total - 5 * records;
    let padding = message_len - base.len();
    let message = client_hello_message(&[sni_ext(b"a.example"), ext(21, &vec![0; padding])]);
    assert_eq!(message.len(), message_len);
    let cuts: Vec<usize> = (1..records).map(|i| i * message.len() / records).collect();
    let bytes = in_records(&message, &cuts);
    assert_eq!(bytes.len(), total);
    bytes
}

#[test]
fn exactly_at_the_limit_is_accepted_one_over_is_not() {
    let expected = Ok(Some(hello(Some("a.example"), &[])));
    for records in [1, 2, 3] {
        let at_limit = padded_hello(MAX_CLIENT_HELLO, records);
        assert_eq!(parse(&at_limit), expected, "{records} records");
        assert_eq!(parse(&at_limit[..MAX_CLIENT_HELLO - 1]), Ok(None));
    }
    // One record cannot hold one more byte at all (handshake header check).
    assert_eq!(
        parse(&padded_hello(MAX_CLIENT_HELLO + 1, 1)[..9]),
        Err(HelloError::TooLarge)
    );
    // Two records can, but the second would end past the limit.
    let over = padded_hello(MAX_CLIENT_HELLO + 1, 2);
    assert_eq!(parse(&over[..MAX_CLIENT_HELLO - 1]), Ok(None));
    assert_eq!(parse(&over[..MAX_CLIENT_HELLO]), Err(HelloError::TooLarge));
    assert_eq!(parse(&over), Err(HelloError::TooLarge));
}

#[test]
fn many_tiny_records_run_into_the_limit() {
    // One handshake byte per record costs six bytes per byte: a 3 KB hello needs 18 KB.
    let message = client_hello_message(&[sni_ext(b"a.example"), ext(21, &[0; 3000])]);
    let cuts: Vec<usize> = (1..message.len()).collect();
    let bytes = in_records(&message, &cuts);
    assert_eq!(parse(&bytes[..MAX_CLIENT_HELLO - 1]), Ok(None));
    assert_eq!(parse(&bytes), Err(HelloError::TooLarge));
}

fn malformed(exts: &[Vec<u8>]) -> Result<Option<ClientHello>, HelloError> {
    parse(&in_records(&client_hello_message(exts), &[]))
}

#[test]
fn bad_sni_is_refused() {
    let long = "a.".repeat(128);
    for name in [
        &b"a b.example"[..],
        b"*.example",
        b"exa\0mple",
        b"caf\xc3\xa9.example",
        b"a/b",
        b"a..example",
        b".",
        b"",
        long.as_bytes(),
    ] {
        assert!(
            matches!(malformed(&[sni_ext(name)]), Err(HelloError::Malformed(_))),
            "{name:?}"
        );
    }
}

#[test]
fn bad_server_name_structure_is_refused() {
    let two_names = ext(
        0,
        &vec16(&[&[0u8][..], &vec16(b"a.example"), &[0], &vec16(b"b.example")].concat()),
    );
    let list_too_long = ext(0, &[0, 20, 0, 0, 1, b'a']);
    let list_too_short = ext(0, &[0, 3, 0, 0, 2, b'a', b'b']);
    let entry_truncated = ext(0, &[0, 4, 0, 0, 9, b'a']);
    let empty_list = ext(0, &[0, 0]);
    let empty_extension = ext(0, &[]);
    for e in [
        two_names,
        list_too_long,
        list_too_short,
        entry_truncated,
        empty_list,
        empty_extension,
    ] {
        assert!(
            matches!(
                malformed(std::slice::from_ref(&e)),
                Err(HelloError::Malformed(_))
            ),
            "{e:?}"
        );
    }
}

#[test]
fn bad_alpn_is_refused() {
    for e in [
        ext(16, &[]),
        ext(16, &[0, 0]),
        ext(16, &[0, 1, 0]),                // empty protocol name
        ext(16, &[0, 3, 5, b'h', b'2']),    // name runs past the list
        ext(16, &[0, 3, 2, b'h', b'2', 9]), // list shorter than the extension
    ] {
        assert!(
            matches!(
                malformed(std::slice::from_ref(&e)),
                Err(HelloError::Malformed(_))
            ),
            "{e:?}"
        );
    }
}

#[test]
fn duplicate_extensions_are_refused() {
    let twice_sni = [sni_ext(b"a.example"), sni_ext(b"b.example")];
    assert_eq!(
        malformed(&twice_sni),
        Err(HelloError::Malformed("duplicate extension"))
    );
    let twice_padding = [ext(21, &[0]), sni_ext(b"a.example"), ext(21, &[0])];
    assert_eq!(
        malformed(&twice_padding),
        Err(HelloError::Malformed("duplicate extension"))
    );
}

#[test]
fn truncated_extensions_are_malformed_not_a_panic() {
    let good = client_hello_message(&chrome_like_extensions(Some("a.example")));
    // Drop bytes from the end of the message but keep its lengths: every cut is an extension
    // block that ends early.
    for cut in 1..300 {
        let mut message = good[..good.len() - cut].to_vec();
        let body_len = u32::try_from(message.len() - 4).unwrap().to_be_bytes();
        message[1..4].copy_from_slice(&body_len[1..]);
        let result = parse(&in_records(&message, &[]));
        assert!(
            matches!(result, Err(HelloError::Malformed(_))),
            "cut {cut}: {result:?}"
        );
    }
    // An extension whose length runs past the block, the block length being right.
    let block = vec16(&[0, 0, 0, 9, 0, 7]);
    let result = parse(&in_records(&client_hello_message_raw(&block), &[]));
    assert_eq!(result, Err(HelloError::Malformed("truncated extension")));
    // A block length that promises more than the message holds.
    let result = parse(&in_records(&client_hello_message_raw(&[0, 9, 0, 0]), &[]));
    assert!(matches!(result, Err(HelloError::Malformed(_))));
    // A lone byte where an extension header should be.
    let result = parse(&in_records(&client_hello_message_raw(&vec16(&[0])), &[]));
    assert_eq!(result, Err(HelloError::Malformed("truncated extension")));
}

#[test]
fn truncated_body_fields_are_malformed() {
    let good = client_hello_message(&[sni_ext(b"a.example")]);
    // 83 bytes hold every field before the extension block; a body cut anywhere in them is broken.
    for len in 0..83 {
        let message = handshake(1, &good[4..4 + len]);
        let result = parse(&in_records(&message, &[]));
        assert!(
            matches!(result, Err(HelloError::Malformed(_))),
            "body of {len} bytes: {result:?}"
        );
    }
}

#[test]
fn alerts_are_well_formed_records() {
    assert_eq!(
        UNRECOGNIZED_NAME_ALERT,
        [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 112]
    );
    assert_eq!(
        HANDSHAKE_FAILURE_ALERT,
        [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 40]
    );
    for alert in [UNRECOGNIZED_NAME_ALERT, HANDSHAKE_FAILURE_ALERT] {
        let (_, record) = tls_parser::parse_tls_plaintext(&alert).unwrap();
        assert!(matches!(
            record.msg.as_slice(),
            [tls_parser::TlsMessage::Alert(a)] if a.severity == tls_parser::TlsAlertSeverity::Fatal
        ));
    }
}

// --- robustness -------------------------------------------------------------------------------

/// 20 000 random and mutated inputs: no panic, and every accepted hello is consistent with a
/// re-parse of a longer buffer and carries a valid name.
#[test]
fn random_and_mutated_inputs_never_panic() {
    let rng = Rng::new(0x7115_4e11_0000_0001);
    let seeds = [
        chrome_like_hello(Some("a.example"), 1).bytes,
        chrome_like_hello(Some("b.example"), 3).bytes,
        captured_openssl_hello(),
        captured_openssl_hello_without_sni(),
        in_records(
            &client_hello_message(&[sni_ext(b"x.example"), alpn_ext(&[b"h2"])]),
            &[3, 40],
        ),
    ];
    let mut accepted = 0;
    for round in 0..20_000 {
        let input = match round % 4 {
            0 => rng.bytes(rng.below(200)),
            1 => {
                // Random bytes behind a plausible record header, to get past the first checks.
                let mut v = vec![22, 3, 1 + rng.below(3) as u8, 0, 0, 1];
                v.extend(rng.bytes(rng.below(300)));
                let len = v.len() - 5;
                v[3..5].copy_from_slice(&u16_be(len));
                v
            }
            _ => rng.mutate(rng.pick(&seeds)),
        };
        let result = parse(&input);
        if let Ok(Some(h)) = &result {
            accepted += 1;
            let mut longer = input.clone();
            longer.extend(rng.bytes(8));
            assert_eq!(parse(&longer), result, "{input:02x?}");
            if let Some(sni) = &h.sni {
                assert!(crate::hello::is_host_name(sni.as_bytes()));
            }
        }
        let mut selector = vec![rng.byte()];
        selector.extend_from_slice(&input);
        crate::hello::fuzz_check_tls(&selector);
    }
    // Mutations that keep the hello valid (e.g. in the random or padding bytes) must happen.
    assert!(
        accepted > 1000,
        "only {accepted} accepted: the mutations are not reaching deep"
    );
}
