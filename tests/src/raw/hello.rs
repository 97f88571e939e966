//! A TLS 1.3 ClientHello built from RFC 8446, like a current browser's, and its TLS records.
use super::stream::XorShift;

/// Named group X25519MLKEM768 (draft-ietf-tls-ecdhe-mlkem): ML-KEM-768 key plus X25519.
pub const GROUP_X25519MLKEM768: u16 = 0x11ec;
/// Named group x25519.
pub const GROUP_X25519: u16 = 0x001d;
/// Size of an X25519MLKEM768 client key share: a 1184-byte ML-KEM-768 encapsulation key
/// followed by a 32-byte X25519 public key.
pub const PQ_SHARE_LEN: usize = 1184 + 32;
/// The handshake-message length [`client_hello`] pads a post-quantum hello to (with the RFC
/// 7685 padding extension), about what Chrome sends.
pub const PQ_HELLO_LEN: usize = 1700;
/// A GREASE value (RFC 8701) used for a cipher suite, a group, a version and an extension.
const GREASE: u16 = 0x0a0a;
/// A second GREASE value, for the empty GREASE extension at the end.
const GREASE_2: u16 = 0x9a9a;

/// A fatal `unrecognized_name` alert as the proxy sends it for an unknown or missing name.
pub const ALERT_UNRECOGNIZED_NAME: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x70];
/// A fatal `handshake_failure` alert as the proxy sends it for other TLS refusals.
pub const ALERT_HANDSHAKE_FAILURE: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28];

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn put_u24(out: &mut Vec<u8>, v: usize) {
    let v = u32::try_from(v).expect("length fits in 24 bits");
    assert!(v < 1 << 24, "length {v} does not fit in 24 bits");
    out.extend_from_slice(&v.to_be_bytes()[1..]);
}

/// Appends `body` prefixed by its length as a big-endian u16.
fn put_vec16(out: &mut Vec<u8>, body: &[u8]) {
    put_u16(
        out,
        u16::try_from(body.len()).expect("vector fits in a u16 length"),
    );
    out.extend_from_slice(body);
}

/// Appends `body` prefixed by its length as a u8.
fn put_vec8(out: &mut Vec<u8>, body: &[u8]) {
    out.push(u8::try_from(body.len()).expect("vector fits in a u8 length"));
    out.extend_from_slice(body);
}

fn extension(out: &mut Vec<u8>, kind: u16, body: &[u8]) {
    put_u16(out, kind);
    put_vec16(out, body);
}

/// A well-formed ML-KEM-768 encapsulation key: 768 coefficients below q = 3329 packed 12 bits
/// each (1152 bytes), then a 32-byte seed. Random bytes would not pass the modulus check that
/// TLS servers supporting the group apply, so the coefficients are drawn mod q.
fn mlkem768_encapsulation_key(rng: &mut XorShift) -> Vec<u8> {
    const Q: u64 = 3329;
    let mut out = Vec::with_capacity(1184);
    for _ in 0..384 {
        let a = rng.next_u64() % Q;
        let b = rng.next_u64() % Q;
        out.push((a & 0xff) as u8);
        out.push(((a >> 8) | ((b & 0x0f) << 4)) as u8);
        out.push((b >> 4) as u8);
    }
    let mut seed = [0u8; 32];
    rng.fill(&mut seed);
    out.extend_from_slice(&seed);
    out
}

/// Builds a TLS 1.3 ClientHello handshake message (type, 24-bit length, body), laid out as RFC
/// 8446 §4.1.2 says, with contents like a current browser's:
///
/// - legacy_version 0x0303, a random, a 32-byte legacy session id, GREASE plus TLS 1.3 and 1.2
///   cipher suites, null compression;
/// - extensions: a leading GREASE extension, `server_name` (if `sni`), `supported_groups`,
///   `ec_point_formats`, `signature_algorithms`, ALPN (if `alpn` is not empty),
///   `supported_versions` (GREASE, 1.3, 1.2), `psk_key_exchange_modes`, `key_share`, and an
///   empty GREASE extension last.
///
/// With `pq_key_share` the key share holds an X25519MLKEM768 share ([`PQ_SHARE_LEN`] bytes)
/// before an x25519 share, and a `padding` extension brings the message to [`PQ_HELLO_LEN`]
/// bytes; without it there is only the x25519 share. Random fields are deterministic, derived
/// from the arguments, so the same call gives the same bytes.
pub fn client_hello(sni: Option<&str>, alpn: &[&str], pq_key_share: bool) -> Vec<u8> {
    let mut seed = 0x5eed_c1e0_0000_0001u64 ^ u64::from(pq_key_share);
    for b in sni
        .unwrap_or("")
        .bytes()
        .chain(alpn.iter().flat_map(|a| a.bytes()))
    {
        seed = seed.rotate_left(7) ^ u64::from(b);
    }
    let mut rng = XorShift::new(seed);

    let mut body = Vec::with_capacity(2048);
    put_u16(&mut body, 0x0303);
    let mut random = [0u8; 32];
    rng.fill(&mut random);
    body.extend_from_slice(&random);
    let mut session_id = [0u8; 32];
    rng.fill(&mut session_id);
    put_vec8(&mut body, &session_id);
    let suites: [u16; 8] = [
        GREASE, 0x1301, 0x1302, 0x1303, 0xc02b, 0xc02f, 0xc02c, 0xc030,
    ];
    let suites: Vec<u8> = suites.iter().flat_map(|s| s.to_be_bytes()).collect();
    put_vec16(&mut body, &suites);
    put_vec8(&mut body, &[0]);

    let mut ext = Vec::with_capacity(1800);
    extension(&mut ext, GREASE, &[]);
    if let Some(name) = sni {
        let mut entry = vec![0u8]; // name_type host_name
        put_vec16(&mut entry, name.as_bytes());
        let mut list = Vec::new();
        put_vec16(&mut list, &entry);
        extension(&mut ext, 0, &list);
    }
    let mut groups: Vec<u16> = vec![GREASE];
    if pq_key_share {
        groups.push(GROUP_X25519MLKEM768);
    }
    groups.extend([GROUP_X25519, 0x0017, 0x0018]);
    let groups: Vec<u8> = groups.iter().flat_map(|g| g.to_be_bytes()).collect();
    let mut list = Vec::new();
    put_vec16(&mut list, &groups);
    extension(&mut ext, 10, &list);
    extension(&mut ext, 11, &[1, 0]); // ec_point_formats: uncompressed
    let sigs: [u16; 8] = [
        0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601,
    ];
    let sigs: Vec<u8> = sigs.iter().flat_map(|s| s.to_be_bytes()).collect();
    let mut list = Vec::new();
    put_vec16(&mut list, &sigs);
    extension(&mut ext, 13, &list);
    if !alpn.is_empty() {
        let mut names = Vec::new();
        for proto in alpn {
            put_vec8(&mut names, proto.as_bytes());
        }
        let mut list = Vec::new();
        put_vec16(&mut list, &names);
        extension(&mut ext, 16, &list);
    }
    let versions: Vec<u8> = [GREASE, 0x0304, 0x0303]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect();
    let mut list = Vec::new();
    put_vec8(&mut list, &versions);
    extension(&mut ext, 43, &list);
    extension(&mut ext, 45, &[1, 1]); // psk_key_exchange_modes: psk_dhe_ke
    let mut shares = Vec::new();
    if pq_key_share {
        let mut share = mlkem768_encapsulation_key(&mut rng);
        let mut x25519 = [0u8; 32];
        rng.fill(&mut x25519);
        share.extend_from_slice(&x25519);
        assert_eq!(share.len(), PQ_SHARE_LEN);
        put_u16(&mut shares, GROUP_X25519MLKEM768);
        put_vec16(&mut shares, &share);
    }
    let mut x25519 = [0u8; 32];
    rng.fill(&mut x25519);
    put_u16(&mut shares, GROUP_X25519);
    put_vec16(&mut shares, &x25519);
    let mut list = Vec::new();
    put_vec16(&mut list, &shares);
    extension(&mut ext, 51, &list);
    if pq_key_share {
        // 4 (handshake header) + body + 2 (extensions length) + ext + 4 (padding header) + 4
        // (the final GREASE extension) + pad = PQ_HELLO_LEN.
        let used = 4 + body.len() + 2 + ext.len() + 4 + 4;
        let pad = PQ_HELLO_LEN
            .checked_sub(used)
            .expect("the PQ hello fits in PQ_HELLO_LEN");
        extension(&mut ext, 21, &vec![0u8; pad]);
    }
    extension(&mut ext, GREASE_2, &[]);
    put_vec16(&mut body, &ext);

    let mut message = Vec::with_capacity(4 + body.len());
    message.push(1); // client_hello
    put_u24(&mut message, body.len());
    message.extend_from_slice(&body);
    if pq_key_share {
        assert_eq!(message.len(), PQ_HELLO_LEN);
    }
    message
}

/// Wraps a handshake message into TLS records (content type 22, record version 0x0301), a new
/// record starting at each offset of `split_at` (offsets into `handshake`; unsorted, duplicate,
/// zero or out-of-range offsets are ignored, so no record is empty).
pub fn records(handshake: &[u8], split_at: &[usize]) -> Vec<u8> {
    let mut cuts: Vec<usize> = split_at
        .iter()
        .copied()
        .filter(|&c| c > 0 && c < handshake.len())
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    cuts.push(handshake.len());
    let mut out = Vec::with_capacity(handshake.len() + 5 * cuts.len());
    let mut start = 0;
    for end in cuts {
        let fragment = &handshake[start..end];
        assert!(
            fragment.len() <= 1 << 14,
            "a TLS record carries at most 16 KiB"
        );
        out.extend_from_slice(&[22, 3, 1]);
        put_vec16(&mut out, fragment);
        start = end;
    }
    out
}

/// `client_hello(sni, &["h2", "http/1.1"], false)` in a single record: the common case.
pub fn simple_hello(sni: &str) -> Vec<u8> {
    records(&client_hello(Some(sni), &["h2", "http/1.1"], false), &[])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks a ClientHello by RFC 8446's layout and returns its extensions as (type, body).
    fn walk(message: &[u8]) -> Vec<(u16, Vec<u8>)> {
        let u16_at = |b: &[u8], i: usize| usize::from(u16::from_be_bytes([b[i], b[i + 1]]));
        assert_eq!(message[0], 1, "client_hello");
        let len = (usize::from(message[1]) << 16) | u16_at(message, 2);
        assert_eq!(len + 4, message.len(), "handshake length");
        let body = &message[4..];
        assert_eq!(&body[..2], &[3, 3]);
        let mut i = 2 + 32;
        i += 1 + usize::from(body[i]);
        let suites = u16_at(body, i);
        assert!(suites % 2 == 0 && suites > 0);
        i += 2 + suites;
        i += 1 + usize::from(body[i]);
        let ext_len = u16_at(body, i);
        i += 2;
        assert_eq!(i + ext_len, body.len(), "extensions fill the rest exactly");
        let mut out = Vec::new();
        while i < body.len() {
            let kind = u16::from_be_bytes([body[i], body[i + 1]]);
            let l = u16_at(body, i + 2);
            out.push((kind, body[i + 4..i + 4 + l].to_vec()));
            i += 4 + l;
        }
        assert_eq!(i, body.len());
        out
    }

    #[test]
    fn hello_layout() {
        for pq in [false, true] {
            let hello = client_hello(Some("echo.example"), &["h2"], pq);
            let exts = walk(&hello);
            let kinds: Vec<u16> = exts.iter().map(|e| e.0).collect();
            for k in [0, 10, 13, 16, 43, 51] {
                assert_eq!(
                    kinds.iter().filter(|&&x| x == k).count(),
                    1,
                    "extension {k}"
                );
            }
            assert!(kinds.contains(&GREASE));
            let sni = &exts.iter().find(|e| e.0 == 0).expect("sni").1;
            assert_eq!(&sni[5..], b"echo.example");
            let shares = &exts.iter().find(|e| e.0 == 51).expect("key_share").1;
            if pq {
                assert_eq!(hello.len(), PQ_HELLO_LEN);
                assert_eq!(&shares[2..4], &GROUP_X25519MLKEM768.to_be_bytes());
                assert_eq!(
                    usize::from(u16::from_be_bytes([shares[4], shares[5]])),
                    PQ_SHARE_LEN
                );
            } else {
                assert!(hello.len() < 512);
                assert_eq!(&shares[2..4], &GROUP_X25519.to_be_bytes());
            }
        }
        assert!(
            walk(&client_hello(None, &[], false))
                .iter()
                .all(|e| e.0 != 0 && e.0 != 16)
        );
    }

    #[test]
    fn records_split_and_rejoin() {
        let hello = client_hello(Some("a.example"), &[], true);
        let wire = records(&hello, &[900, 3, 3, 0, 5000]);
        let mut joined = Vec::new();
        let mut rest = &wire[..];
        let mut count = 0;
        while !rest.is_empty() {
            assert_eq!(&rest[..3], &[22, 3, 1]);
            let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
            joined.extend_from_slice(&rest[5..5 + len]);
            rest = &rest[5 + len..];
            count += 1;
        }
        assert_eq!(count, 3);
        assert_eq!(joined, hello);
    }
}
