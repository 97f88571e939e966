//! Raw protocol pieces for tests that talk to the proxy byte by byte: a TLS ClientHello
//! builder, a deterministic byte stream with a verifier for bulk transfers, a scriptable test
//! backend that records what it receives, and helpers to read the proxy's access log.
//!
//! Nothing here depends on the proxy's own code: the hello is built from RFC 8446 and the PROXY
//! headers are recognised from HAProxy's specification, so the tests check the proxy against
//! the protocols rather than against itself.
use std::{
    ffi::{OsStr, OsString},
    io::{self, Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::Command,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{BACKEND_V6, Ns, PROXY_V4, Service, World};

// ---------------------------------------------------------------------------------------------
// TLS ClientHello
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Deterministic streams
// ---------------------------------------------------------------------------------------------

/// xorshift64* (Vigna): small, fast, good enough to make every 64 KiB block of a test stream
/// look unrelated to every other.
#[derive(Clone, Debug)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator from `seed` (any value; zero is remapped, since xorshift's state must not
    /// be zero).
    pub fn new(seed: u64) -> XorShift {
        XorShift(splitmix64(seed) | 1)
    }

    /// The next 64-bit output.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Fills `out` with output bytes.
    pub fn fill(&mut self, out: &mut [u8]) {
        let (words, rest) = out.as_chunks_mut::<8>();
        for word in words {
            *word = self.next_u64().to_le_bytes();
        }
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Size of one block of a [`Stream`].
pub const BLOCK: usize = 64 * 1024;

/// An endless deterministic byte stream: block `k` (bytes `k*64KiB ..`) is xorshift64* output
/// seeded from `(seed, k)`, so any offset can be produced without generating what is before it,
/// and a byte that arrives at the wrong offset (lost, duplicated or reordered data) differs from
/// the expected one with overwhelming probability.
pub struct Stream {
    seed: u64,
    block_no: u64,
    block: Vec<u8>,
}

impl Stream {
    /// The stream for `seed`.
    pub fn new(seed: u64) -> Stream {
        let mut s = Stream {
            seed,
            block_no: u64::MAX,
            block: vec![0; BLOCK],
        };
        s.load(0);
        s
    }

    fn load(&mut self, block_no: u64) {
        if self.block_no != block_no {
            let mut rng = XorShift::new(self.seed ^ splitmix64(block_no.wrapping_add(1)));
            rng.fill(&mut self.block);
            self.block_no = block_no;
        }
    }

    /// The bytes of the block holding `offset`, from `offset` to the block's end.
    pub fn at(&mut self, offset: u64) -> &[u8] {
        self.load(offset / BLOCK as u64);
        &self.block[(offset % BLOCK as u64) as usize..]
    }

    /// Fills `out` with the stream's bytes starting at `offset`.
    pub fn fill(&mut self, mut offset: u64, out: &mut [u8]) {
        let mut done = 0;
        while done < out.len() {
            let src = self.at(offset);
            let n = src.len().min(out.len() - done);
            out[done..done + n].copy_from_slice(&src[..n]);
            done += n;
            offset += n as u64;
        }
    }

    /// The first `len` bytes, as one vector (for small amounts).
    pub fn prefix(seed: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0; len];
        Stream::new(seed).fill(0, &mut out);
        out
    }
}

/// Writes bytes `0..len` of the stream `seed` to `out`, a block at a time.
pub fn send_stream(out: &mut impl Write, seed: u64, len: u64) -> io::Result<()> {
    send_stream_range(out, seed, 0, len)
}

/// Writes bytes `from..to` of the stream `seed` to `out`, a block at a time (to send a stream
/// in parts, with something else happening in between).
pub fn send_stream_range(out: &mut impl Write, seed: u64, from: u64, to: u64) -> io::Result<()> {
    let mut stream = Stream::new(seed);
    let mut offset = from;
    while offset < to {
        let chunk = stream.at(offset);
        let n = chunk
            .len()
            .min(usize::try_from(to - offset).unwrap_or(usize::MAX));
        out.write_all(&chunk[..n])?;
        offset += n as u64;
    }
    Ok(())
}

/// Checks a received byte sequence against the stream `seed`, position by position.
pub struct Verifier {
    stream: Stream,
    received: u64,
    expected: u64,
}

impl Verifier {
    /// Expects exactly `expected` bytes of the stream `seed`.
    pub fn new(seed: u64, expected: u64) -> Verifier {
        Verifier {
            stream: Stream::new(seed),
            received: 0,
            expected,
        }
    }

    /// Checks the next received bytes. Fails at the first byte that differs from the stream
    /// (naming its offset) or that goes past the expected length.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            if self.received >= self.expected {
                bail!(
                    "received more than the {} expected bytes ({} extra in this read)",
                    self.expected,
                    data.len()
                );
            }
            let offset = self.received;
            let want = self.stream.at(offset);
            let room = usize::try_from(self.expected - offset).unwrap_or(usize::MAX);
            let n = want.len().min(data.len()).min(room);
            if data[..n] != want[..n] {
                let i = data[..n]
                    .iter()
                    .zip(&want[..n])
                    .position(|(a, b)| a != b)
                    .unwrap_or_default();
                bail!(
                    "stream mismatch at offset {}: got {:#04x}, expected {:#04x} \
                     (bytes lost, duplicated or reordered)",
                    offset + i as u64,
                    data[i],
                    want[i]
                );
            }
            self.received += n as u64;
            data = &data[n..];
        }
        Ok(())
    }

    /// Bytes verified so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Fails unless every expected byte arrived.
    pub fn finish(&self) -> Result<()> {
        if self.received != self.expected {
            bail!(
                "stream ended after {} of {} bytes",
                self.received,
                self.expected
            );
        }
        Ok(())
    }
}

/// Reads `from` to end of stream (or error), checking everything against `verifier`; returns
/// how many bytes were read. Stops at the first mismatch.
pub fn receive_stream(from: &mut impl Read, verifier: &mut Verifier) -> Result<u64> {
    let mut buf = vec![0u8; BLOCK];
    let mut total = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(e).with_context(|| format!("reading after {total} bytes"));
            }
        };
        total += n as u64;
        verifier.feed(&buf[..n])?;
    }
}

// ---------------------------------------------------------------------------------------------
// PROXY protocol recognition
// ---------------------------------------------------------------------------------------------

/// The 12-byte PROXY protocol v2 signature.
pub const PROXY_V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// A PROXY header found at the start of a backend connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyHeader {
    /// 1 or 2.
    pub version: u8,
    /// Its length in bytes; the payload starts right after it.
    pub len: usize,
}

/// What the start of a connection says about a PROXY header: not there, maybe (need more
/// bytes), or there with its length. Malformed headers are reported as errors.
fn detect_proxy_header(buf: &[u8]) -> Result<Option<Option<ProxyHeader>>> {
    const V1: &[u8] = b"PROXY ";
    let n = buf.len().min(V1.len());
    if buf[..n] == V1[..n] {
        if buf.len() < V1.len() {
            return Ok(None);
        }
        return match buf.windows(2).position(|w| w == b"\r\n") {
            Some(i) if i + 2 <= 107 => Ok(Some(Some(ProxyHeader {
                version: 1,
                len: i + 2,
            }))),
            Some(_) => bail!("PROXY v1 line longer than 107 bytes"),
            None if buf.len() >= 107 => bail!("PROXY v1 line without CRLF in 107 bytes"),
            None => Ok(None),
        };
    }
    let n = buf.len().min(PROXY_V2_SIGNATURE.len());
    if buf[..n] == PROXY_V2_SIGNATURE[..n] {
        if buf.len() < 16 {
            return Ok(None);
        }
        let len = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
        return Ok(Some(Some(ProxyHeader { version: 2, len })));
    }
    Ok(Some(None))
}

/// A decoded PROXY v2 header with an IPv4 address pair (what a client in the client namespace
/// produces).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyV2Inet {
    /// Version and command byte (0x21 = version 2, PROXY).
    pub ver_cmd: u8,
    /// Family and protocol byte (0x11 = AF_INET, STREAM).
    pub family: u8,
    /// Source address and port: the client.
    pub source: SocketAddr,
    /// Destination address and port: what the client connected to.
    pub destination: SocketAddr,
    /// Total header length (16 + the length field).
    pub len: usize,
}

/// Decodes a v2 header with AF_INET addresses at the start of `buf`.
pub fn parse_proxy_v2_inet(buf: &[u8]) -> Result<ProxyV2Inet> {
    if buf.len() < 28 || buf[..12] != PROXY_V2_SIGNATURE {
        bail!(
            "no PROXY v2 header with AF_INET addresses in {:02x?}",
            &buf[..buf.len().min(28)]
        );
    }
    let len = 16 + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len < 28 || buf.len() < len {
        bail!("PROXY v2 header length {len} does not fit its addresses or the data");
    }
    let ip = |at: usize| std::net::Ipv4Addr::new(buf[at], buf[at + 1], buf[at + 2], buf[at + 3]);
    let port = |at: usize| u16::from_be_bytes([buf[at], buf[at + 1]]);
    Ok(ProxyV2Inet {
        ver_cmd: buf[12],
        family: buf[13],
        source: SocketAddr::new(ip(16).into(), port(24)),
        destination: SocketAddr::new(ip(20).into(), port(26)),
        len,
    })
}

// ---------------------------------------------------------------------------------------------
// Test backend
// ---------------------------------------------------------------------------------------------

/// Seed of the stream clients send in bulk tests (after their hello).
pub const SEED_UP: u64 = 0x0123_4567_89ab_cdef;
/// Seed of the stream bulk backends send.
pub const SEED_DOWN: u64 = 0xfedc_ba98_7654_3210;
/// How many leading bytes of each connection a [`TestBackend`] keeps.
pub const RECORD_PREFIX: usize = 64 * 1024;

/// What a [`TestBackend`] does with each connection.
#[derive(Clone, Debug)]
pub enum Behavior {
    /// Echoes every byte after the PROXY header (if any) back, in order; when the proxy
    /// half-closes, finishes echoing and then shuts down its own write side.
    Echo,
    /// Skips the PROXY header (if any) and then `hello_len` bytes, then reads and verifies
    /// `bytes_each_way` bytes of the [`SEED_UP`] stream followed by end of stream, while
    /// concurrently sending `bytes_each_way` bytes of the [`SEED_DOWN`] stream and then
    /// shutting down its write side.
    Bulk {
        /// Bytes each way after the hello.
        bytes_each_way: u64,
        /// Length of the hello that precedes the client's stream.
        hello_len: usize,
    },
    /// Sends `greeting` right after accepting, before reading anything, then behaves like
    /// [`Behavior::Echo`].
    ServerFirst {
        /// What to send first.
        greeting: Vec<u8>,
    },
    /// Sends `greeting`, shuts down its write side at once (the backend half-closes first),
    /// then reads and records everything until the proxy's end of stream.
    ServerClosesFirst {
        /// What to send before the half-close.
        greeting: Vec<u8>,
    },
}

/// What one backend connection received.
#[derive(Clone, Default)]
pub struct ConnRecord {
    /// The proxy's address as the backend saw it.
    pub peer: Option<SocketAddr>,
    /// The first [`RECORD_PREFIX`] bytes received, PROXY header included.
    pub first: Vec<u8>,
    /// Every byte received, PROXY header included.
    pub total: u64,
    /// The PROXY header at the start, if there was one.
    pub proxy: Option<ProxyHeader>,
    /// Bytes sent back to the proxy.
    pub sent: u64,
    /// Whether the proxy's end of stream (read returning 0) was seen.
    pub saw_eof: bool,
    /// For [`Behavior::Bulk`]: stream bytes verified (after the hello).
    pub verified: u64,
    /// The connection's handler is done (successfully or not).
    pub finished: bool,
    /// What went wrong, if anything (I/O error, stream mismatch).
    pub error: Option<String>,
}

impl std::fmt::Debug for ConnRecord {
    /// Like a derived `Debug`, but shows only the first 48 received bytes (and their length),
    /// so failure messages stay readable.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = &self.first[..self.first.len().min(48)];
        f.debug_struct("ConnRecord")
            .field("peer", &self.peer)
            .field(
                "first",
                &format_args!("{} bytes, starting {shown:02x?}", self.first.len()),
            )
            .field("total", &self.total)
            .field("proxy", &self.proxy)
            .field("sent", &self.sent)
            .field("saw_eof", &self.saw_eof)
            .field("verified", &self.verified)
            .field("finished", &self.finished)
            .field("error", &self.error)
            .finish()
    }
}

impl ConnRecord {
    /// The recorded bytes after the PROXY header.
    pub fn payload(&self) -> &[u8] {
        let skip = self
            .proxy
            .as_ref()
            .map_or(0, |h| h.len)
            .min(self.first.len());
        &self.first[skip..]
    }
}

type Shared = Arc<Mutex<ConnRecord>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A TCP server in the backend namespace, on `[2001:db8:1::10]:port`, serving every
/// connection on its own thread with a [`Behavior`] and recording what arrived. Dropping it
/// stops accepting, shuts down open connections and joins the threads (bounded).
pub struct TestBackend {
    /// The address it listens on.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    records: Arc<Mutex<Vec<Shared>>>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
    acceptor: Option<JoinHandle<()>>,
}

/// How long a backend connection may wait for one read or write before giving up.
const IO_TIMEOUT: Duration = Duration::from_secs(120);

impl TestBackend {
    /// Binds `[2001:db8:1::10]:port` inside the world's backend namespace and starts serving.
    pub fn start(world: &World, port: u16, behavior: Behavior) -> Result<TestBackend> {
        let addr = SocketAddr::new(BACKEND_V6, port);
        let listener = world
            .within(Ns::Backend, move || TcpListener::bind(addr))?
            .with_context(|| format!("binding the test backend on {addr}"))?;
        // std listens with a backlog of 128; hundreds of simultaneous connections need more
        // (listen(2) again on a listening socket only changes the backlog).
        nix::sys::socket::listen(&listener, nix::sys::socket::Backlog::new(4096)?)
            .context("raising the test backend's listen backlog")?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let records: Arc<Mutex<Vec<Shared>>> = Arc::default();
        let streams: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let threads: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let acceptor = {
            let (stop, records, streams, threads) = (
                stop.clone(),
                records.clone(),
                streams.clone(),
                threads.clone(),
            );
            std::thread::Builder::new()
                .name(format!("backend-{port}"))
                .spawn(move || {
                    accept_loop(&listener, &behavior, &stop, &records, &streams, &threads);
                })?
        };
        Ok(TestBackend {
            addr,
            stop,
            records,
            streams,
            threads,
            acceptor: Some(acceptor),
        })
    }

    /// A snapshot of every connection accepted so far, in accept order.
    pub fn connections(&self) -> Vec<ConnRecord> {
        lock(&self.records)
            .iter()
            .map(|r| lock(r).clone())
            .collect()
    }

    /// Waits up to `timeout` until at least `n` connections have finished; returns the
    /// snapshot.
    pub fn wait_finished(&self, n: usize, timeout: Duration) -> Result<Vec<ConnRecord>> {
        let deadline = Instant::now() + timeout;
        loop {
            let conns = self.connections();
            if conns.iter().filter(|c| c.finished).count() >= n {
                return Ok(conns);
            }
            if Instant::now() >= deadline {
                bail!(
                    "timed out after {timeout:?}: {} of {n} backend connections finished \
                     ({} accepted)",
                    conns.iter().filter(|c| c.finished).count(),
                    conns.len()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for stream in lock(&self.streams).drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let threads: Vec<JoinHandle<()>> = lock(&self.threads).drain(..).collect();
        for thread in threads {
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            if thread.is_finished() {
                let _ = thread.join();
            }
        }
    }
}

fn accept_loop(
    listener: &TcpListener,
    behavior: &Behavior,
    stop: &AtomicBool,
    records: &Mutex<Vec<Shared>>,
    streams: &Mutex<Vec<TcpStream>>,
    threads: &Mutex<Vec<JoinHandle<()>>>,
) {
    while !stop.load(Ordering::SeqCst) {
        let (stream, peer) = match listener.accept() {
            Ok(pair) => pair,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            Err(_) => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
        };
        let record: Shared = Arc::new(Mutex::new(ConnRecord {
            peer: Some(peer),
            ..ConnRecord::default()
        }));
        lock(records).push(record.clone());
        if let Ok(clone) = stream.try_clone() {
            lock(streams).push(clone);
        }
        let behavior = behavior.clone();
        let spawned = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                let result = serve(stream, &behavior, &record);
                let mut r = lock(&record);
                if let Err(e) = result {
                    r.error = Some(format!("{e:#}"));
                }
                r.finished = true;
            });
        if let Ok(handle) = spawned {
            let mut threads = lock(threads);
            threads.retain(|t| !t.is_finished());
            threads.push(handle);
        }
    }
}

/// Reads into `buf`, recording the bytes; returns what `read` returned.
fn read_recorded(stream: &mut TcpStream, buf: &mut [u8], record: &Shared) -> io::Result<usize> {
    let n = loop {
        match stream.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => break other?,
        }
    };
    let mut r = lock(record);
    if n == 0 {
        r.saw_eof = true;
    } else {
        r.total += n as u64;
        let room = RECORD_PREFIX.saturating_sub(r.first.len()).min(n);
        r.first.extend_from_slice(&buf[..room]);
    }
    Ok(n)
}

/// Reads until the PROXY header question is decided. Returns the bytes read after the header
/// (to be treated as payload) and whether the peer already closed.
fn read_preface(stream: &mut TcpStream, record: &Shared) -> Result<(Vec<u8>, bool)> {
    let mut head = Vec::new();
    let mut buf = vec![0u8; BLOCK];
    loop {
        let n = read_recorded(stream, &mut buf, record)?;
        head.extend_from_slice(&buf[..n]);
        match detect_proxy_header(&head)? {
            Some(header) => {
                let skip = header.as_ref().map_or(0, |h| h.len);
                if head.len() < skip {
                    if n == 0 {
                        bail!("connection closed inside the PROXY header");
                    }
                    continue;
                }
                lock(record).proxy = header;
                return Ok((head.split_off(skip), n == 0));
            }
            // A prefix of a PROXY signature and then end of stream: it was payload after all.
            None if n == 0 => return Ok((head, true)),
            None => {}
        }
    }
}

fn write_counted(stream: &mut TcpStream, data: &[u8], record: &Shared) -> io::Result<()> {
    stream.write_all(data)?;
    lock(record).sent += data.len() as u64;
    Ok(())
}

fn serve(mut stream: TcpStream, behavior: &Behavior, record: &Shared) -> Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    match behavior {
        Behavior::Echo => echo(&mut stream, record),
        Behavior::ServerFirst { greeting } => {
            write_counted(&mut stream, greeting, record)?;
            echo(&mut stream, record)
        }
        Behavior::ServerClosesFirst { greeting } => {
            write_counted(&mut stream, greeting, record)?;
            stream.shutdown(Shutdown::Write)?;
            let (_, mut closed) = read_preface(&mut stream, record)?;
            let mut buf = vec![0u8; BLOCK];
            while !closed {
                closed = read_recorded(&mut stream, &mut buf, record)? == 0;
            }
            Ok(())
        }
        Behavior::Bulk {
            bytes_each_way,
            hello_len,
        } => bulk(stream, *bytes_each_way, *hello_len, record),
    }
}

fn echo(stream: &mut TcpStream, record: &Shared) -> Result<()> {
    let (first, closed) = read_preface(stream, record)?;
    write_counted(stream, &first, record)?;
    if !closed {
        let mut buf = vec![0u8; BLOCK];
        loop {
            let n = read_recorded(stream, &mut buf, record)?;
            if n == 0 {
                break;
            }
            write_counted(stream, &buf[..n], record)?;
        }
    }
    stream.shutdown(Shutdown::Write)?;
    Ok(())
}

fn bulk(mut stream: TcpStream, bytes: u64, hello_len: usize, record: &Shared) -> Result<()> {
    let mut sender_stream = stream.try_clone()?;
    let sender_record = record.clone();
    let sender = std::thread::Builder::new()
        .name("bulk-send".into())
        .spawn(move || {
            let result = send_stream(&mut sender_stream, SEED_DOWN, bytes)
                .and_then(|()| sender_stream.shutdown(Shutdown::Write));
            if result.is_ok() {
                lock(&sender_record).sent = bytes;
            }
            result
        })?;
    let received = (|| -> Result<()> {
        let (mut first, mut closed) = read_preface(&mut stream, record)?;
        let mut buf = vec![0u8; BLOCK];
        // The hello may still be arriving.
        while first.len() < hello_len && !closed {
            let n = read_recorded(&mut stream, &mut buf, record)?;
            closed = n == 0;
            first.extend_from_slice(&buf[..n]);
        }
        if first.len() < hello_len {
            bail!(
                "connection closed after {} of the {hello_len} hello bytes",
                first.len()
            );
        }
        let mut verifier = Verifier::new(SEED_UP, bytes);
        verifier.feed(&first[hello_len..])?;
        while !closed {
            let n = read_recorded(&mut stream, &mut buf, record)?;
            closed = n == 0;
            verifier.feed(&buf[..n])?;
            lock(record).verified = verifier.received();
        }
        lock(record).verified = verifier.received();
        verifier.finish()
    })();
    if received.is_err() {
        // Unblock the sender so the thread ends.
        let _ = stream.shutdown(Shutdown::Both);
    }
    let sent = sender
        .join()
        .map_err(|_| anyhow::anyhow!("the bulk sender panicked"))?;
    received?;
    sent.context("sending the bulk stream")?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Clients and the access log
// ---------------------------------------------------------------------------------------------

/// Connects from the client namespace to the proxy's `port`, with `TCP_NODELAY` and read and
/// write timeouts of `timeout`.
pub fn connect(world: &World, port: u16, timeout: Duration) -> Result<TcpStream> {
    let addr = SocketAddr::new(PROXY_V4, port);
    let stream = world
        .within(Ns::Client, move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        })?
        .with_context(|| format!("connecting to {addr} from the client namespace"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(stream)
}

/// How a read-to-the-end ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// Orderly end of stream (FIN).
    Eof,
    /// The connection was reset.
    Reset,
    /// The read timeout passed with the connection still open.
    TimedOut,
    /// Another error.
    Error(io::ErrorKind),
}

impl End {
    /// Whether the peer closed the connection (FIN or RST).
    pub fn closed(&self) -> bool {
        matches!(self, End::Eof | End::Reset)
    }
}

/// Reads until end of stream, reset, error or `limit` bytes; returns the bytes and how it
/// ended. Each read is bounded by the stream's read timeout.
pub fn read_to_end(stream: &mut TcpStream, limit: usize) -> (Vec<u8>, End) {
    let mut out = Vec::new();
    let mut buf = vec![0u8; BLOCK];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (out, End::Eof),
            Ok(n) => {
                out.extend_from_slice(&buf[..n]);
                if out.len() >= limit {
                    return (out, End::Error(io::ErrorKind::FileTooLarge));
                }
            }
            Err(e) => match e.kind() {
                io::ErrorKind::Interrupted => {}
                io::ErrorKind::ConnectionReset => return (out, End::Reset),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                    return (out, End::TimedOut);
                }
                kind => return (out, End::Error(kind)),
            },
        }
    }
}

/// The value of `key=` in an access-log line (quoted values are returned with their quotes).
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let prefix = format!("{key}=");
    line.split(' ')
        .find_map(|part| part.strip_prefix(prefix.as_str()))
}

/// Waits up to `timeout` for the access-log line of the connection whose client address is
/// `client` (the client socket's local address) and returns it.
pub fn log_line_for(spliced: &Service, client: SocketAddr, timeout: Duration) -> Result<String> {
    let want = client.to_string();
    let deadline = Instant::now() + timeout;
    loop {
        let text = spliced.stdout_text();
        if let Some(line) = text
            .lines()
            .find(|l| field(l, "client") == Some(want.as_str()))
        {
            return Ok(line.to_owned());
        }
        if Instant::now() >= deadline {
            bail!(
                "no access-log line for client {client} after {timeout:?}; log:\n{text}\n\
                 diagnostics:\n{}",
                spliced.stderr_text()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------------
// Starting spliced with options, and sockets for hand-written peers
// ---------------------------------------------------------------------------------------------

/// How to start `spliced run` beyond its configuration file: extra arguments, environment, a
/// program to run it under, and the name its files get.
#[derive(Clone, Debug, Default)]
pub struct Launch {
    name: String,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    wrapper: Vec<OsString>,
}

impl Launch {
    /// A launch whose configuration, standard output and standard error go to `<name>.toml`,
    /// `<name>.out` and `<name>.err`.
    pub fn named(name: &str) -> Launch {
        Launch {
            name: name.to_owned(),
            ..Launch::default()
        }
    }

    /// Adds an argument after `run --config FILE` (e.g. `--pin-dir`).
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Launch {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Sets an environment variable for spliced (e.g. `RUST_LOG`).
    pub fn env(mut self, key: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Launch {
        self.env
            .push((key.as_ref().to_owned(), value.as_ref().to_owned()));
        self
    }

    /// Runs spliced under `argv` (a program and its arguments, e.g. `strace -f -o FILE` or
    /// `setpriv --reuid=65534`); spliced's own command line follows them.
    pub fn wrapped<S: AsRef<OsStr>>(mut self, argv: &[S]) -> Launch {
        self.wrapper = argv.iter().map(|a| a.as_ref().to_owned()).collect();
        self
    }

    fn service_name(&self) -> &str {
        if self.name.is_empty() {
            "spliced"
        } else {
            &self.name
        }
    }

    /// Appends the wrapper's arguments and spliced's command line to `cmd`, which already
    /// names the first program to run.
    fn finish(&self, cmd: &mut Command, config: &Path) -> Result<()> {
        cmd.args(self.wrapper.iter().skip(1));
        if !self.wrapper.is_empty() {
            cmd.arg(crate::spliced_bin()?);
        }
        cmd.args(["run", "--config"]).arg(config).args(&self.args);
        for (key, value) in &self.env {
            cmd.env(key, value);
        }
        Ok(())
    }

    /// The program `cmd` starts with: the wrapper's, else spliced itself.
    fn program(&self) -> Result<OsString> {
        match self.wrapper.first() {
            Some(program) => Ok(program.clone()),
            None => Ok(crate::spliced_bin()?.into_os_string()),
        }
    }
}

/// Like [`crate::backends::spliced`] (the proxy namespace, waiting for `ports` to listen), with
/// the extras of `launch`. An empty `ports` does not wait at all (for runs expected to fail).
pub fn spliced_with(
    world: &World,
    config: &str,
    ports: &[u16],
    launch: &Launch,
) -> Result<Service> {
    let name = launch.service_name();
    let path = world.dir().join(format!("{name}.toml"));
    std::fs::write(&path, config)?;
    let mut cmd = world.command(Ns::Proxy, launch.program()?);
    launch.finish(&mut cmd, &path)?;
    let mut service = Service::start(name, cmd, world.dir())?;
    for &port in ports {
        crate::backends::wait_listening(world, Ns::Proxy, port, &mut service)?;
    }
    Ok(service)
}

/// Starts spliced in the test process's own namespaces (not under `ip netns exec`), so its pins
/// land in this mount namespace's bpffs: for listeners on loopback. Files go to `dir`; waits
/// until every port in `ports` listens.
pub fn spliced_here(dir: &Path, config: &str, ports: &[u16], launch: &Launch) -> Result<Service> {
    let name = launch.service_name();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config)?;
    let mut cmd = Command::new(launch.program()?);
    launch.finish(&mut cmd, &path)?;
    let mut service = Service::start(name, cmd, dir)?;
    for &port in ports {
        crate::wait_for(
            &format!("a listener on port {port}"),
            Duration::from_secs(10),
            || {
                service.check_running()?;
                let out = Command::new("ss")
                    .args(["-Hltn", &format!("sport = :{port}")])
                    .output()?;
                Ok(!out.stdout.is_empty())
            },
        )?;
    }
    Ok(service)
}

/// A TCP port on `ip` that nothing in this namespace listens on right now (the kernel picks
/// it; it may be taken again before it is used, which is unlikely among high ports).
pub fn free_port(ip: std::net::IpAddr) -> Result<u16> {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0))?;
    Ok(listener.local_addr()?.port())
}

/// A listener on `addr` inside `ns`, for tests that write their own server.
pub fn listen_in(world: &World, ns: Ns, addr: SocketAddr) -> Result<TcpListener> {
    world
        .within(ns, move || TcpListener::bind(addr))?
        .with_context(|| format!("binding {addr} in the {ns:?} namespace"))
}

/// Accepts one connection within `timeout`, with `TCP_NODELAY` and read and write timeouts of
/// `io_timeout` on it.
pub fn accept_within(
    listener: &TcpListener,
    timeout: Duration,
    io_timeout: Duration,
) -> Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                bail!(
                    "no connection to {:?} within {timeout:?}",
                    listener.local_addr()
                )
            }
            Err(e) => return Err(e).context("accepting"),
        }
    };
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(io_timeout))?;
    stream.set_write_timeout(Some(io_timeout))?;
    Ok(stream)
}

/// Closes `stream` abruptly: with `SO_LINGER` 0 the kernel sends RST instead of FIN and throws
/// away whatever was not sent.
pub fn reset(stream: TcpStream) -> Result<()> {
    nix::sys::socket::setsockopt(
        &stream,
        nix::sys::socket::sockopt::Linger,
        &nix::libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )?;
    drop(stream);
    Ok(())
}

/// Reads exactly `len` bytes within the stream's read timeout (for a hello or a greeting).
pub fn read_exactly(stream: &mut TcpStream, len: usize) -> Result<Vec<u8>> {
    let mut out = vec![0u8; len];
    stream
        .read_exact(&mut out)
        .with_context(|| format!("reading {len} bytes"))?;
    Ok(out)
}

/// Runs `client(i)` for `i` in `0..n`, each on its own thread inside the client namespace, all
/// at once, and returns the addresses of those that succeeded and a message for each failure.
pub fn run_clients(
    world: &World,
    n: usize,
    client: impl Fn(usize) -> Result<SocketAddr> + Sync,
) -> Result<(Vec<SocketAddr>, Vec<String>)> {
    // Threads spawned from a thread inside the client namespace are in it too.
    let results: Vec<Result<SocketAddr>> = world.within(Ns::Client, || {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..n)
                .map(|i| {
                    let client = &client;
                    std::thread::Builder::new()
                        .stack_size(256 * 1024)
                        .spawn_scoped(s, move || client(i))
                        .expect("spawning a client thread")
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("client panicked")))
                })
                .collect()
        })
    })?;
    let mut addrs = Vec::new();
    let mut failures = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(addr) => addrs.push(addr),
            Err(e) => failures.push(format!("client {i}: {e:#}")),
        }
    }
    Ok((addrs, failures))
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

    #[test]
    fn stream_is_positional_and_verifier_catches_faults() {
        let data = Stream::prefix(7, 3 * BLOCK + 100);
        let mut at = vec![0u8; 1000];
        Stream::new(7).fill(BLOCK as u64 - 500, &mut at);
        assert_eq!(at, data[BLOCK - 500..BLOCK + 500]);
        assert_ne!(data[..BLOCK], data[BLOCK..2 * BLOCK]);

        let mut v = Verifier::new(7, data.len() as u64);
        for chunk in data.chunks(7777) {
            v.feed(chunk).expect("in order");
        }
        v.finish().expect("complete");
        assert!(v.feed(&[0]).is_err(), "an extra byte is caught");

        let mut lost = data.clone();
        lost.remove(BLOCK + 3);
        let e = Verifier::new(7, data.len() as u64)
            .feed(&lost)
            .expect_err("loss is caught");
        assert!(e.to_string().contains("offset"), "{e}");
        let mut swapped = data.clone();
        swapped.swap(10, 20);
        assert!(Verifier::new(7, data.len() as u64).feed(&swapped).is_err());
        let mut short = Verifier::new(7, data.len() as u64);
        short.feed(&data[..100]).expect("prefix");
        assert!(short.finish().is_err());
    }

    #[test]
    fn proxy_header_detection() {
        let v1 = b"PROXY TCP4 192.0.2.2 192.0.2.1 1 443\r\nrest";
        assert_eq!(
            detect_proxy_header(v1).expect("ok"),
            Some(Some(ProxyHeader {
                version: 1,
                len: 38
            }))
        );
        assert_eq!(detect_proxy_header(b"PRO").expect("ok"), None);
        assert_eq!(
            detect_proxy_header(b"\x16\x03\x01").expect("ok"),
            Some(None)
        );
        let mut v2 = PROXY_V2_SIGNATURE.to_vec();
        v2.extend_from_slice(&[
            0x21, 0x11, 0, 12, 192, 0, 2, 2, 192, 0, 2, 1, 0x9c, 0x40, 1, 0xbb,
        ]);
        assert_eq!(
            detect_proxy_header(&v2).expect("ok"),
            Some(Some(ProxyHeader {
                version: 2,
                len: 28
            }))
        );
        let parsed = parse_proxy_v2_inet(&v2).expect("parses");
        assert_eq!(parsed.source, "192.0.2.2:40000".parse().expect("addr"));
        assert_eq!(parsed.destination, "192.0.2.1:443".parse().expect("addr"));
    }
}
