//! Test helpers: a ClientHello builder, captured hellos, a deterministic random generator, and a
//! driver that feeds a parser the way the accept loop does.

use std::cell::Cell;

use super::tls::ClientHello;

/// xorshift64*: deterministic, so a failing input can be reproduced from the seed alone. The
/// state is a `Cell` so calls can nest (`rng.mutate(rng.pick(..))`).
pub struct Rng(Cell<u64>);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(Cell::new(seed | 1))
    }

    pub fn next(&self) -> u64 {
        let mut x = self.0.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform enough in `0..n` (0 when `n` is 0).
    pub fn below(&self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }

    pub fn byte(&self) -> u8 {
        self.next() as u8
    }

    pub fn bytes(&self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.byte()).collect()
    }

    pub fn pick<'a, T>(&self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// A few random edits: overwrite, bit flip, insert, delete, truncate, or an "interesting"
    /// value (0, 0xff, lengths) at a random place, the way a mutating fuzzer would.
    pub fn mutate(&self, input: &[u8]) -> Vec<u8> {
        let mut out = input.to_vec();
        for _ in 0..=self.below(4) {
            let at = self.below(out.len() + 1);
            match self.below(7) {
                0 if at < out.len() => out[at] = self.byte(),
                1 if at < out.len() => out[at] ^= 1 << self.below(8),
                2 => out.insert(at, self.byte()),
                3 if at < out.len() => {
                    out.remove(at);
                }
                4 => out.truncate(at),
                5 if at < out.len() => out[at] = *self.pick(&[0x00, 0xff, 0x01, 0x40, 0x7f, 0x80]),
                _ if at + 1 < out.len() => {
                    let v = *self.pick(&[0u16, 1, 0xffff, 0x4000, 0x4001, 0x0303]);
                    out[at..at + 2].copy_from_slice(&v.to_be_bytes());
                }
                _ => {}
            }
        }
        out
    }
}

/// Calls `parse` on a growing buffer, one chunk at a time, as the accept loop does, and returns
/// the first answer with how many bytes had been given. Asserts that every earlier call said
/// "need more".
pub fn feed<T: std::fmt::Debug, E: std::fmt::Debug>(
    chunks: &[&[u8]],
    parse: impl Fn(&[u8]) -> Result<Option<T>, E>,
) -> (Result<Option<T>, E>, usize) {
    let mut buf = Vec::new();
    let mut last = Ok(None);
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        last = parse(&buf);
        if !matches!(last, Ok(None)) {
            return (last, buf.len());
        }
    }
    (last, buf.len())
}

/// Every split of `bytes` into one-byte reads.
pub fn bytewise(bytes: &[u8]) -> Vec<&[u8]> {
    bytes.chunks(1).collect()
}

pub fn u16_be(v: usize) -> [u8; 2] {
    u16::try_from(v).expect("fits in u16").to_be_bytes()
}

/// `data` with a two-byte length prefix.
pub fn vec16(data: &[u8]) -> Vec<u8> {
    [&u16_be(data.len())[..], data].concat()
}

/// `data` with a one-byte length prefix.
pub fn vec8(data: &[u8]) -> Vec<u8> {
    [&[u8::try_from(data.len()).expect("fits in u8")][..], data].concat()
}

/// One extension: type, length, data.
pub fn ext(kind: u16, data: &[u8]) -> Vec<u8> {
    [&kind.to_be_bytes()[..], &vec16(data)].concat()
}

pub fn sni_ext(name: &[u8]) -> Vec<u8> {
    ext(0, &vec16(&[&[0u8][..], &vec16(name)].concat()))
}

pub fn alpn_ext(names: &[&[u8]]) -> Vec<u8> {
    let list: Vec<u8> = names.iter().flat_map(|name| vec8(name)).collect();
    ext(16, &vec16(&list))
}

/// A ClientHello handshake message (type 1, 24-bit length) around a TLS 1.2-shaped body with
/// the given extension block bytes (already length-prefixed or not, as the test needs).
pub fn client_hello_message_raw(extension_block: &[u8]) -> Vec<u8> {
    let mut body = vec![0x03, 0x03];
    body.extend((0..32u8).map(|i| i.wrapping_mul(7)));
    body.extend(vec8(&[0x5a; 32]));
    // GREASE, the three TLS 1.3 suites, two TLS 1.2 suites.
    let suites: Vec<u8> = [0x1a1au16, 0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f]
        .iter()
        .flat_map(|s| s.to_be_bytes())
        .collect();
    body.extend(vec16(&suites));
    body.extend([1, 0]);
    body.extend_from_slice(extension_block);
    handshake(1, &body)
}

/// A handshake message of the given type.
pub fn handshake(kind: u8, body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len()).expect("small").to_be_bytes();
    [&[kind][..], &len[1..], body].concat()
}

/// A ClientHello handshake message with these extensions.
pub fn client_hello_message(extensions: &[Vec<u8>]) -> Vec<u8> {
    client_hello_message_raw(&vec16(&extensions.concat()))
}

/// Wraps a handshake message into records whose payloads end at the given cut points.
pub fn records_cut_at(message: &[u8], cuts: &[usize], version: u16) -> Vec<u8> {
    let mut out = Vec::new();
    let mut start = 0;
    for &end in cuts.iter().chain(std::iter::once(&message.len())) {
        let fragment = &message[start..end];
        out.extend([22]);
        out.extend(version.to_be_bytes());
        out.extend(u16_be(fragment.len()));
        out.extend_from_slice(fragment);
        start = end;
    }
    out
}

/// A hello as bytes on the wire plus what the parser should make of it.
pub struct TestHello {
    pub bytes: Vec<u8>,
    pub message: Vec<u8>,
    pub expected: ClientHello,
}

/// The extensions of a current browser offering post-quantum key exchange: GREASE first and
/// last, SNI, ALPN h2 + http/1.1, supported_versions, X25519MLKEM768 (1216-byte share) plus
/// x25519 key shares, an ECH outer extension, extensions tls-parser does not know, padding.
pub fn chrome_like_extensions(sni: Option<&str>) -> Vec<Vec<u8>> {
    let mut key_share = Vec::new();
    key_share.extend([0x4a, 0x4a]);
    key_share.extend(vec16(&[0]));
    key_share.extend(0x11ecu16.to_be_bytes());
    key_share.extend(vec16(
        &(0..1216u32)
            .map(|i| (i * 31 % 251) as u8)
            .collect::<Vec<_>>(),
    ));
    key_share.extend(0x001du16.to_be_bytes());
    key_share.extend(vec16(&[0x42; 32]));
    let groups: Vec<u8> = [0x4a4au16, 0x11ec, 0x001d, 0x0017, 0x0018]
        .iter()
        .flat_map(|g| g.to_be_bytes())
        .collect();
    let sigalgs: Vec<u8> = [
        0x0403u16, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601,
    ]
    .iter()
    .flat_map(|g| g.to_be_bytes())
    .collect();
    let mut exts = vec![ext(0x0a0a, &[])];
    if let Some(name) = sni {
        exts.push(sni_ext(name.as_bytes()));
    }
    exts.extend([
        ext(23, &[]),                          // extended_master_secret
        ext(0xff01, &[0]),                     // renegotiation_info
        ext(10, &vec16(&groups)),              // supported_groups
        ext(11, &[1, 0]),                      // ec_point_formats
        ext(35, &[]),                          // session_ticket
        alpn_ext(&[b"h2", b"http/1.1"]),       // ALPN
        ext(5, &[1, 0, 0, 0, 0]),              // status_request
        ext(13, &vec16(&sigalgs)),             // signature_algorithms
        ext(18, &[]),                          // signed_certificate_timestamp
        ext(51, &vec16(&key_share)),           // key_share
        ext(45, &[1, 1]),                      // psk_key_exchange_modes
        ext(43, &[6, 0x6a, 0x6a, 3, 4, 3, 3]), // supported_versions (GREASE, 1.3, 1.2)
        ext(27, &[2, 0, 2]),                   // compress_certificate
        ext(0x44cd, &vec16(&vec8(b"h2"))),     // application_settings (unknown)
        ext(
            0xfe0d,
            &[0, 0, 1, 0, 1, 0x9c, 0, 0x20]
                .iter()
                .copied()
                .chain([0x11; 32])
                .chain(vec16(&[0x22; 144]))
                .collect::<Vec<_>>(),
        ), // encrypted_client_hello (outer)
        ext(0x1a1a, &[0]),                     // GREASE with a byte
        ext(21, &[0; 27]),                     // padding
    ]);
    exts
}

/// A Chrome-like post-quantum ClientHello (~1.8 KB) split into `records` records of roughly
/// equal size, record version 0x0301.
pub fn chrome_like_hello(sni: Option<&str>, records: usize) -> TestHello {
    let message = client_hello_message(&chrome_like_extensions(sni));
    let cuts: Vec<usize> = (1..records).map(|i| i * message.len() / records).collect();
    TestHello {
        bytes: records_cut_at(&message, &cuts, 0x0301),
        message,
        expected: ClientHello {
            sni: sni.map(str::to_ascii_lowercase),
            alpn: vec!["h2".into(), "http/1.1".into()],
            legacy_version: 0x0303,
        },
    }
}

fn from_hex(lines: &[&str]) -> Vec<u8> {
    let hex: String = lines.concat();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

/// What `openssl s_client -connect 127.0.0.1:PORT -servername a.example -alpn h2,http/1.1`
/// (OpenSSL 3.0.22) sent to a loopback listener: one record, version 0x0301, 333 bytes.
pub fn captured_openssl_hello() -> Vec<u8> {
    from_hex(&[
        "160301014801000144030336ec21ff34787e38a08175632367a3e83986e6293782a29dffed5d4ca66025c32021bef58d",
        "826e3394f364a2e78eb5b4d15d2e391d4f4971751e4b28716b0eac19003e130213031301c02cc030009fcca9cca8ccaa",
        "c02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d009c003d003c0035002f00ff010000bd",
        "0000000e000c000009612e6578616d706c65000b000403000102000a00160014001d0017001e00190018010001010102",
        "01030104002300000010000e000c02683208687474702f312e310016000000170000000d002a00280403050306030807",
        "08080809080a080b080408050806040105010601030303010302040205020602002b0009080304030303020301002d00",
        "020101003300260024001d0020d83f2fdc9dacdea9bf578df914b71497ff80800bfcab2fcf0163906b9d5b1f1f",
    ])
}

/// The same client with `-noservername`: no server_name extension, no ALPN, 297 bytes.
pub fn captured_openssl_hello_without_sni() -> Vec<u8> {
    from_hex(&[
        "1603010124010001200303d546c72ce1559124faed7903f627a52ce882fc8e87c6f3641ed9d07128e4608d20e7c2e99a",
        "1343e472440026ed9a4835039b06c0f175325c1bab74479a67887ac9003e130213031301c02cc030009fcca9cca8ccaa",
        "c02bc02f009ec024c028006bc023c0270067c00ac0140039c009c0130033009d009c003d003c0035002f00ff01000099",
        "000b000403000102000a00160014001d0017001e0019001801000101010201030104002300000016000000170000000d",
        "002a0028040305030603080708080809080a080b080408050806040105010601030303010302040205020602002b0009",
        "080304030303020301002d00020101003300260024001d0020c2f9d55b02b67642a4fea43425d4d8baa44d6c7c57f842",
        "b33b7c9d8f8b770367",
    ])
}
