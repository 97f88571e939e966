//! Hand-built TCP SYN packets for end-to-end tests of the XDP SYN filter.
//!
//! Two ways out:
//!
//! - [`send_syns_v4`] and [`send_syns_v6`] push a bounded number of well-formed SYNs through a
//!   raw IP socket (`IPPROTO_RAW`, header included), so the kernel routes them like any other
//!   packet of the calling thread's network namespace. Source addresses may be spoofed.
//! - [`send_frames`] hands complete Ethernet frames to one interface through an `AF_PACKET`
//!   socket. This is the way for packets the IP stack would refuse or rewrite: truncated
//!   headers, VLAN tags, nonsense lengths.
//!
//! The builders ([`syn_v4`], [`syn_v6`], [`syn_v4_with_options`], [`syn_v6_with_ext`],
//! [`ethernet`]) only make bytes and need no privileges. Every SYN they make is the same
//! 24-byte TCP header: ports, the given sequence number, acknowledgment 0, data offset 6, only
//! the SYN flag, window 64240, and one MSS option (1460 for IPv4, 1440 for IPv6); the TCP and
//! IPv4 header checksums are filled in (RFC 791, RFC 793, RFC 8200 §8.1).
//!
//! Sending needs `CAP_NET_RAW` in the namespace the thread is in, and the socket is created in
//! the calling thread's network namespace: call the senders from inside
//! [`World::within`](crate::World::within).
use std::{
    ffi::CString,
    io,
    mem::size_of,
    net::{Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd, OwnedFd},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail, ensure};
use nix::{
    libc,
    sys::{
        socket::{self, AddressFamily, SockFlag, SockProtocol, SockType, sockopt},
        time::TimeVal,
    },
};

/// IP protocol number of TCP, the last "next header" of every packet built here.
pub const IPPROTO_TCP: u8 = 6;
/// IPv6 extension header type: hop-by-hop options (RFC 8200 §4.3).
pub const EXT_HOP_BY_HOP: u8 = 0;
/// IPv6 extension header type: routing header (RFC 8200 §4.4).
pub const EXT_ROUTING: u8 = 43;
/// IPv6 extension header type: destination options (RFC 8200 §4.6).
pub const EXT_DEST_OPTS: u8 = 60;
/// The IPv6 option type used to fill long hop-by-hop and destination options headers: 0x1e,
/// reserved for experiments (RFC 4727), whose top bits 00 tell a receiver that does not know it
/// to skip it, and whose data never changes en route.
pub const OPT_EXPERIMENT: u8 = 0x1e;
/// Ethertype of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// Ethertype of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// Ethertype (TPID) of an IEEE 802.1Q VLAN tag.
pub const ETHERTYPE_VLAN: u16 = 0x8100;
/// Length of the TCP header of every SYN built here: 20 bytes plus a 4-byte MSS option.
pub const TCP_SYN_LEN: usize = 24;
/// Length of an IPv4 header without options.
pub const IPV4_HEADER_LEN: usize = 20;
/// Length of the fixed IPv6 header.
pub const IPV6_HEADER_LEN: usize = 40;
/// Longest IPv4 options field: IHL is 4 bits, so at most 15 × 4 − 20 bytes.
pub const IPV4_MAX_OPTIONS: usize = 40;
/// Lowest source port [`sport_for`] hands out.
pub const SPORT_MIN: u16 = 1024;
/// Length of an Ethernet header without a VLAN tag.
pub const ETHERNET_HEADER_LEN: usize = 14;

const MSS_V4: u16 = 1460;
const MSS_V6: u16 = 1440;
const TCP_WINDOW: u16 = 64240;
const TCP_FLAG_SYN: u8 = 0x02;
const TTL: u8 = 64;
/// How long one blocked `send` may wait before the loop looks at the clock again.
const SEND_TIMEOUT_CAP: Duration = Duration::from_millis(100);
/// Pause after the kernel says its queues are full (`ENOBUFS`, `EAGAIN`).
const BACKOFF: Duration = Duration::from_micros(200);
/// How long [`send_frames`] keeps retrying one frame the kernel has no room for.
const FRAME_RETRY_FOR: Duration = Duration::from_secs(2);

// ---------------------------------------------------------------------------------------------
// Checksums
// ---------------------------------------------------------------------------------------------

/// The Internet checksum (RFC 1071) of the concatenation of `parts`: the one's complement of the
/// one's-complement sum of its 16-bit big-endian words, an odd last byte padded with zero.
///
/// Parts are joined as one byte stream, so a part of odd length shifts the ones after it; that
/// is what a pseudo-header followed by a segment needs. Over bytes that already hold a correct
/// checksum the result is 0.
pub fn internet_checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u64 = 0;
    let mut high = true;
    for part in parts {
        for &byte in *part {
            sum += if high {
                u64::from(byte) << 8
            } else {
                u64::from(byte)
            };
            high = !high;
        }
    }
    // At most four folds are needed for a u64; loop until nothing is carried.
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // `sum` is now at most 0xffff.
    !u16::try_from(sum).unwrap_or(u16::MAX)
}

/// The IPv4 pseudo-header TCP checksums cover (RFC 793 §3.1).
fn pseudo_header_v4(src: Ipv4Addr, dst: Ipv4Addr, tcp_len: usize) -> [u8; 12] {
    let mut p = [0u8; 12];
    p[0..4].copy_from_slice(&src.octets());
    p[4..8].copy_from_slice(&dst.octets());
    p[9] = IPPROTO_TCP;
    p[10..12].copy_from_slice(&u16_len(tcp_len).to_be_bytes());
    p
}

/// The IPv6 pseudo-header upper-layer checksums cover (RFC 8200 §8.1): the final destination,
/// the upper-layer length (not the payload length: extension headers are not counted) and the
/// upper-layer protocol (TCP, whatever extension headers come first).
fn pseudo_header_v6(src: Ipv6Addr, dst: Ipv6Addr, tcp_len: usize) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[0..16].copy_from_slice(&src.octets());
    p[16..32].copy_from_slice(&dst.octets());
    let len = u32::try_from(tcp_len).unwrap_or(u32::MAX);
    p[32..36].copy_from_slice(&len.to_be_bytes());
    p[39] = IPPROTO_TCP;
    p
}

/// `len` as a 16-bit length field; a length that does not fit saturates at 65535 (which only
/// happens for deliberately oversized test packets and makes them malformed, not a panic).
fn u16_len(len: usize) -> u16 {
    u16::try_from(len).unwrap_or(u16::MAX)
}

// ---------------------------------------------------------------------------------------------
// Builders
// ---------------------------------------------------------------------------------------------

/// A SYN's TCP header with its checksum field still zero.
fn tcp_syn(sport: u16, dport: u16, seq: u32, mss: u16) -> [u8; TCP_SYN_LEN] {
    let mut t = [0u8; TCP_SYN_LEN];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    // Acknowledgment number 0 (bytes 8..12).
    t[12] = u8::try_from(TCP_SYN_LEN / 4).unwrap_or(0) << 4; // data offset in 32-bit words
    t[13] = TCP_FLAG_SYN;
    t[14..16].copy_from_slice(&TCP_WINDOW.to_be_bytes());
    // Checksum (16..18) and urgent pointer (18..20) stay 0.
    // Option: maximum segment size (kind 2, length 4).
    t[20] = 2;
    t[21] = 4;
    t[22..24].copy_from_slice(&mss.to_be_bytes());
    t
}

/// Writes the TCP checksum into `tcp` (a TCP header whose checksum field is zero) for the
/// given pseudo-header.
fn fill_tcp_checksum(pseudo: &[u8], tcp: &mut [u8]) {
    let sum = internet_checksum(&[pseudo, tcp]);
    if let Some(field) = tcp.get_mut(16..18) {
        field.copy_from_slice(&sum.to_be_bytes());
    }
}

/// An IPv4 header identification derived from the sequence number, never 0 (the kernel would
/// replace 0 with its own choice on a raw socket).
fn ip_id(seq: u32) -> u16 {
    let id = ((seq >> 16) as u16) ^ (seq as u16);
    if id == 0 { 1 } else { id }
}

/// Builds one IPv4 packet carrying a TCP SYN from `src:sport` to `dst:dport` with sequence
/// number `seq`: a 20-byte IPv4 header (DF set, TTL 64, identification derived from `seq`,
/// correct header checksum) and the 24-byte TCP header described in the module documentation.
/// The result is [`IPV4_HEADER_LEN`] + [`TCP_SYN_LEN`] bytes long.
pub fn syn_v4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, seq: u32) -> Vec<u8> {
    syn_v4_with_options(src, dst, sport, dport, seq, &[])
}

/// Like [`syn_v4`] but with `options` in the IPv4 header.
///
/// The options are copied as given and padded with zero bytes (End of Option List) to a
/// multiple of 4; IHL becomes 5 plus the padded length in 32-bit words, and the total length
/// and header checksum cover them. At most [`IPV4_MAX_OPTIONS`] bytes fit in an IPv4 header:
/// longer `options` are cut to 40 bytes. The options are not interpreted, so nonsense options
/// (for a malformed-packet test) are fine; use `&[1; n]` (NOPs) for harmless ones.
///
/// Note that a raw IP socket rewrites the IPv4 checksum and total length (see
/// [`send_syns_v4`]); send these through [`send_frames`] to have them arrive byte for byte.
pub fn syn_v4_with_options(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    seq: u32,
    options: &[u8],
) -> Vec<u8> {
    let options = options.get(..IPV4_MAX_OPTIONS).unwrap_or(options);
    let padded = options.len().div_ceil(4) * 4;
    let header_len = IPV4_HEADER_LEN + padded;
    let total = header_len + TCP_SYN_LEN;

    let mut p = Vec::with_capacity(total);
    p.push(0x40 | u8::try_from(header_len / 4).unwrap_or(0x0f)); // version 4, IHL
    p.push(0); // DSCP / ECN
    p.extend_from_slice(&u16_len(total).to_be_bytes());
    p.extend_from_slice(&ip_id(seq).to_be_bytes());
    p.extend_from_slice(&0x4000u16.to_be_bytes()); // flags: DF, fragment offset 0
    p.push(TTL);
    p.push(IPPROTO_TCP);
    p.extend_from_slice(&[0, 0]); // header checksum, filled in below
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(options);
    p.resize(header_len, 0);
    let sum = internet_checksum(&[&p]);
    p[10..12].copy_from_slice(&sum.to_be_bytes());

    let mut tcp = tcp_syn(sport, dport, seq, MSS_V4);
    fill_tcp_checksum(&pseudo_header_v4(src, dst, TCP_SYN_LEN), &mut tcp);
    p.extend_from_slice(&tcp);
    p
}

/// Builds one IPv6 packet carrying a TCP SYN from `[src]:sport` to `[dst]:dport` with sequence
/// number `seq`: the 40-byte IPv6 header (traffic class and flow label 0, hop limit 64, next
/// header TCP, payload length 24) and the TCP header described in the module documentation,
/// its checksum over the IPv6 pseudo-header. The result is [`IPV6_HEADER_LEN`] +
/// [`TCP_SYN_LEN`] bytes long.
pub fn syn_v6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, seq: u32) -> Vec<u8> {
    syn_v6_with_ext(src, dst, sport, dport, seq, &[])
}

/// Like [`syn_v6`] but with a chain of extension headers between the IPv6 header and TCP.
///
/// Each element of `ext` is `(type, length)`: `type` is the extension header's protocol number
/// (the value the previous header's "next header" field gets: [`EXT_HOP_BY_HOP`] 0,
/// [`EXT_ROUTING`] 43, [`EXT_DEST_OPTS`] 60), `length` its "Hdr Ext Len", in 8-octet units not
/// counting the first 8 octets, so the header is `(length + 1) * 8` bytes. A `length` above
/// 255 is cut to 255. The headers are chained in the order given, the last one's next header
/// is TCP, and the IPv6 payload length counts them all.
///
/// Bodies:
/// - hop-by-hop (0) and destination options (60): options every receiver skips. An 8-byte
///   header (`length` 0) holds one PadN option; longer ones hold [`OPT_EXPERIMENT`] options
///   (unknown, "skip if not recognised") followed by at most 7 bytes of PadN/Pad1, because
///   Linux drops headers with more than 7 bytes of padding in a row (RFC 4942 §2.1.9.5);
/// - routing (43): routing type 0 with segments left 0 and zero addresses, which a receiver
///   must ignore (RFC 8200 §4.4). A well-formed type-0 header has an even `length` (two units
///   per address); an odd one is legal for the chain but not for type 0;
/// - any other type: next header and length as described, the rest zero. The caller is
///   responsible for what that means (for example a fragment header, 44, is always 8 bytes,
///   so give it `length` 0).
///
/// The TCP checksum covers the IPv6 pseudo-header with TCP as upper-layer protocol and the TCP
/// length, as RFC 8200 §8.1 says. A routing header with segments left 0 does not change the
/// final destination, so `dst` is used. If the chain makes the payload longer than 65535
/// bytes, the payload length saturates at 65535.
///
/// Checked against Linux 6.x receiving through a veth: chains of these three types, each
/// `length` 0..=255, are accepted and the SYN reaches TCP, provided a hop-by-hop header comes
/// only first (anywhere else the stack drops it) and the packet fits the link MTU (a
/// `length` of 255 makes a 2048-byte header, more than a 1500-byte MTU).
pub fn syn_v6_with_ext(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    sport: u16,
    dport: u16,
    seq: u32,
    ext: &[(u8, usize)],
) -> Vec<u8> {
    let mut chain = Vec::new();
    for (i, &(kind, length)) in ext.iter().enumerate() {
        let next = ext.get(i + 1).map_or(IPPROTO_TCP, |&(k, _)| k);
        let length = u8::try_from(length).unwrap_or(u8::MAX);
        extension_header(&mut chain, kind, next, length);
    }
    let payload_len = chain.len() + TCP_SYN_LEN;

    let mut p = Vec::with_capacity(IPV6_HEADER_LEN + payload_len);
    p.extend_from_slice(&[0x60, 0, 0, 0]); // version 6, traffic class 0, flow label 0
    p.extend_from_slice(&u16_len(payload_len).to_be_bytes());
    p.push(ext.first().map_or(IPPROTO_TCP, |&(k, _)| k));
    p.push(TTL); // hop limit
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&chain);

    let mut tcp = tcp_syn(sport, dport, seq, MSS_V6);
    fill_tcp_checksum(&pseudo_header_v6(src, dst, TCP_SYN_LEN), &mut tcp);
    p.extend_from_slice(&tcp);
    p
}

/// Appends one extension header of type `kind` whose next header is `next`, `(length + 1) * 8`
/// bytes long.
fn extension_header(out: &mut Vec<u8>, kind: u8, next: u8, length: u8) {
    let total = (usize::from(length) + 1) * 8;
    let start = out.len();
    out.push(next);
    out.push(length);
    match kind {
        EXT_HOP_BY_HOP | EXT_DEST_OPTS => fill_options(out, total - 2),
        EXT_ROUTING => {
            out.push(0); // routing type 0
            out.push(0); // segments left 0
            // 4 reserved bytes, then `length / 2` addresses: all zero.
        }
        _ => {}
    }
    out.resize(start + total, 0);
}

/// Appends exactly `len` bytes of options that any IPv6 receiver skips.
///
/// Up to 7 bytes are plain padding: one PadN (type 1, zero data) or, for a single byte, Pad1.
/// Longer bodies cannot be padding alone, since Linux (following RFC 4942 §2.1.9.5) drops a
/// header with more than 7 consecutive padding bytes. They are filled with
/// [`OPT_EXPERIMENT`] options of at most 255 zero data bytes, then padding for the rest (at
/// most 7 bytes). The biggest header, 2048 bytes, takes 8 such options, within Linux's default
/// limit of 8 non-padding options per header (`net.ipv6.max_{hbh,dst}_opts_number`).
fn fill_options(out: &mut Vec<u8>, len: usize) {
    let mut left = len;
    // Each turn writes at least one byte, so this runs at most `len` times (in fact at most 9).
    while left > 0 {
        let (kind, data) = match left {
            1 => {
                out.push(0); // Pad1
                break;
            }
            2..=7 => (1, left - 2), // PadN: the end
            _ => (OPT_EXPERIMENT, (left - 2).min(255)),
        };
        out.push(kind);
        out.push(u8::try_from(data).unwrap_or(u8::MAX));
        out.resize(out.len() + data, 0);
        left -= data + 2;
    }
}

/// Builds an Ethernet II frame: destination and source MAC, an optional IEEE 802.1Q tag, the
/// ethertype, then `payload`.
///
/// With `vlan: Some(tci)` a tag is inserted after the source MAC: TPID 0x8100 then `tci` as
/// given, so the VLAN ID is its low 12 bits and priority/DEI bits may be set too; `ethertype`
/// follows the tag. No frame check sequence is added (the NIC or veth does without) and the
/// frame is not padded to the 60-byte Ethernet minimum, so a short payload reaches XDP exactly
/// as short as it is built (veth does not pad either).
pub fn ethernet(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    vlan: Option<u16>,
    ethertype: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETHERNET_HEADER_LEN + 4 + payload.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    if let Some(tci) = vlan {
        f.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
        f.extend_from_slice(&tci.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The source port of the `index`-th packet of a run starting at `base`: `base + index`,
/// wrapping from 65535 back to [`SPORT_MIN`] (1024), so ports stay in `1024..=65535`. A `base`
/// below 1024 is taken as 1024.
pub fn sport_for(base: u16, index: u64) -> u16 {
    const SPAN: u64 = 65536 - SPORT_MIN as u64; // ports 1024..=65535
    let offset = (u64::from(base.max(SPORT_MIN) - SPORT_MIN) + index % SPAN) % SPAN;
    // `offset < SPAN`, so the sum is at most 65535.
    SPORT_MIN.saturating_add(u16::try_from(offset).unwrap_or(u16::MAX))
}

/// A sequence of well-spread 32-bit numbers (SplitMix64) for initial sequence numbers: not
/// cryptographic, only different from packet to packet and from run to run.
struct Isn(u64);

impl Isn {
    /// Seeded from the clock, the process and `salt`.
    fn new(salt: u64) -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self(nanos ^ (u64::from(std::process::id()) << 32) ^ salt)
    }

    fn next_u32(&mut self) -> u32 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) as u32
    }
}

// ---------------------------------------------------------------------------------------------
// Sockets
// ---------------------------------------------------------------------------------------------

/// A C socket address structure that may be handed to the kernel as it is.
///
/// # Safety
///
/// Implementors must be plain-old-data `sockaddr_*` structures from `libc`, whose whole size is
/// a valid address length for their family.
unsafe trait RawSockaddr: Sized {}
// SAFETY: all three are libc's definitions of the kernel's structures.
unsafe impl RawSockaddr for libc::sockaddr_in {}
// SAFETY: as above.
unsafe impl RawSockaddr for libc::sockaddr_in6 {}
// SAFETY: as above.
unsafe impl RawSockaddr for libc::sockaddr_ll {}

/// An all-zero socket address structure, to fill in field by field.
fn zeroed_sockaddr<A: RawSockaddr>() -> A {
    // SAFETY: `RawSockaddr` types are plain C structures of integers and byte arrays, for which
    // all zero bytes is a valid value.
    unsafe { std::mem::zeroed() }
}

fn sockaddr_len<A: RawSockaddr>() -> libc::socklen_t {
    // A socket address structure is at most 128 bytes.
    libc::socklen_t::try_from(size_of::<A>()).unwrap_or(libc::socklen_t::MAX)
}

/// `sendto(2)` of `buf` to `addr`; returns how many bytes the kernel took.
fn send_to<A: RawSockaddr>(fd: &OwnedFd, buf: &[u8], addr: &A) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reading `buf.len()` bytes, and `addr` points to a live `A` of
    // `sockaddr_len::<A>()` bytes, a socket address structure (the `RawSockaddr` contract).
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            0,
            std::ptr::from_ref(addr).cast(),
            sockaddr_len::<A>(),
        )
    };
    // A negative return, the only one that does not convert, means failure.
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// `bind(2)` to `addr`.
fn bind_to<A: RawSockaddr>(fd: &OwnedFd, addr: &A) -> io::Result<()> {
    // SAFETY: `addr` points to a live `A` of `sockaddr_len::<A>()` bytes, a socket address
    // structure (the `RawSockaddr` contract).
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::from_ref(addr).cast(),
            sockaddr_len::<A>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `setsockopt(2)` of an integer option (nix 0.32 has no `IP_HDRINCL` / `IPV6_HDRINCL`).
pub fn set_int_option(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: the option value is a live `c_int` and its size is passed with it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(&value).cast(),
            sockaddr_len_of_int(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn sockaddr_len_of_int() -> libc::socklen_t {
    libc::socklen_t::try_from(size_of::<libc::c_int>()).unwrap_or(4)
}

/// Whether a failed send is worth retrying: the kernel's queues are momentarily full, the send
/// timed out, or a signal interrupted it.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOBUFS | libc::EAGAIN | libc::EINTR)
    )
}

/// A raw socket of `family` for `IPPROTO_RAW`, with a send timeout so that no single send can
/// outlast `max_time` by much.
fn raw_ip_socket(family: AddressFamily, what: &str, max_time: Duration) -> Result<OwnedFd> {
    let fd = socket::socket(
        family,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::Raw,
    )
    .with_context(|| {
        format!("creating a raw {what} socket (IPPROTO_RAW; needs CAP_NET_RAW in this namespace)")
    })?;
    let timeout = max_time.clamp(Duration::from_millis(1), SEND_TIMEOUT_CAP);
    let micros = libc::suseconds_t::try_from(timeout.as_micros()).unwrap_or(100_000);
    socket::setsockopt(&fd, sockopt::SendTimeout, &TimeVal::new(0, micros))
        .with_context(|| format!("setting SO_SNDTIMEO on the raw {what} socket"))?;
    Ok(fd)
}

/// Sends packets made by `build(index)` (for `index` counting up from 0) to `addr` until
/// `count` are sent or `max_time` has passed, retrying transient failures until then.
fn send_loop<A: RawSockaddr>(
    fd: &OwnedFd,
    addr: &A,
    what: &str,
    count: u64,
    max_time: Duration,
    mut build: impl FnMut(u64) -> Vec<u8>,
) -> Result<u64> {
    let deadline = Instant::now() + max_time;
    let mut sent: u64 = 0;
    let mut packet = Vec::new();
    let mut built_for = None;
    // Every turn either sends one packet (at most `count` times) or runs into the clock.
    while sent < count && Instant::now() < deadline {
        if built_for != Some(sent) {
            packet = build(sent);
            built_for = Some(sent);
        }
        match send_to(fd, &packet, addr) {
            Ok(n) if n == packet.len() => sent += 1,
            Ok(n) => bail!(
                "the kernel took {n} of the {} bytes of {what} SYN number {sent}",
                packet.len()
            ),
            Err(e) if is_transient(&e) => std::thread::sleep(BACKOFF),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("sending {what} SYN number {sent} of {count}"));
            }
        }
    }
    Ok(sent)
}

/// Sends up to `count` TCP SYNs over IPv4 from `src` to `dst:dport`, built by [`syn_v4`].
///
/// The `i`-th packet (from 0) has source port [`sport_for`]`(sport_base, i)`, that is
/// `sport_base + i` wrapping within 1024..=65535, and its own pseudo-random initial sequence
/// number. Stops after `count` packets or once `max_time` has passed, whichever comes first
/// (a send blocked on a full socket buffer waits at most 100 ms before the clock is checked
/// again), and returns how many packets were sent. `ENOBUFS`/`EAGAIN` from the kernel are
/// retried until the time is up; other errors end the run with an error.
///
/// The socket is `AF_INET`/`SOCK_RAW`/`IPPROTO_RAW` with `IP_HDRINCL` on, so:
/// - it is created in the calling thread's network namespace: call this from inside the
///   sending namespace (`world.within(Ns::Client, || send_syns_v4(..))`), with `CAP_NET_RAW`;
/// - the packet is routed by `dst` in that namespace and leaves with the header as built;
///   `src` may be any address (spoofing is allowed with a header-including socket), but
///   replies go wherever `src` routes;
/// - the kernel rewrites the IPv4 total length and header checksum (same values here) and would
///   fill in a zero source address or identification.
///
/// If the SYNs reach a listening socket, the destination answers with SYN-ACKs, and the
/// sending namespace's own stack answers those with RSTs when `src` is one of its addresses.
pub fn send_syns_v4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    dport: u16,
    sport_base: u16,
    count: u64,
    max_time: Duration,
) -> Result<u64> {
    let fd = raw_ip_socket(AddressFamily::Inet, "IPv4", max_time)?;
    set_int_option(&fd, libc::IPPROTO_IP, libc::IP_HDRINCL, 1)
        .context("setting IP_HDRINCL on the raw IPv4 socket")?;
    let mut addr: libc::sockaddr_in = zeroed_sockaddr();
    addr.sin_family = libc::AF_INET as libc::sa_family_t;
    addr.sin_addr.s_addr = u32::from_ne_bytes(dst.octets());
    let mut isn = Isn::new((u64::from(u32::from(src)) << 16) ^ u64::from(dport));
    send_loop(&fd, &addr, "IPv4", count, max_time, |i| {
        syn_v4(src, dst, sport_for(sport_base, i), dport, isn.next_u32())
    })
}

/// Sends up to `count` TCP SYNs over IPv6 from `src` to `[dst]:dport`, built by [`syn_v6`];
/// ports, sequence numbers, time limit, retries and result as for [`send_syns_v4`].
///
/// The socket is `AF_INET6`/`SOCK_RAW`/`IPPROTO_RAW`. On Linux such a socket sends the IPv6
/// header the caller supplies (header-include mode is on for `IPPROTO_RAW`; `IPV6_HDRINCL` is
/// also set where the kernel has it, 4.5 and later). What follows from that:
/// - as for IPv4, the socket lives in the calling thread's network namespace (call from inside
///   it, with `CAP_NET_RAW`) and the packet is routed by `dst` there;
/// - unlike IPv4, the kernel changes nothing in the header: no checksum (IPv6 has none), no
///   length fix-up, no source fill-in, so `src` is sent as given (spoofing works);
/// - `dst` should be a global address: the destination socket address carries no scope ID, so
///   link-local destinations cannot be chosen an interface;
/// - a packet larger than the route's MTU fails with `EMSGSIZE` (not an issue for a SYN).
pub fn send_syns_v6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    dport: u16,
    sport_base: u16,
    count: u64,
    max_time: Duration,
) -> Result<u64> {
    let fd = raw_ip_socket(AddressFamily::Inet6, "IPv6", max_time)?;
    match set_int_option(&fd, libc::IPPROTO_IPV6, libc::IPV6_HDRINCL, 1) {
        // Kernels before 4.5 lack the option; IPPROTO_RAW includes the header there anyway.
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => {}
        other => other.context("setting IPV6_HDRINCL on the raw IPv6 socket")?,
    }
    let mut addr: libc::sockaddr_in6 = zeroed_sockaddr();
    addr.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    // sin6_port stays 0: for a raw socket it would be a protocol number, 0 means the socket's.
    addr.sin6_addr.s6_addr = dst.octets();
    let mut isn = Isn::new(((u128::from(src) as u64) << 16) ^ u64::from(dport));
    send_loop(&fd, &addr, "IPv6", count, max_time, |i| {
        syn_v6(src, dst, sport_for(sport_base, i), dport, isn.next_u32())
    })
}

/// The interface index of `ifname` in the calling thread's network namespace.
fn ifindex_of(ifname: &str) -> Result<libc::c_int> {
    let name = CString::new(ifname).with_context(|| format!("interface name {ifname:?}"))?;
    // SAFETY: `name` is a NUL-terminated string that lives across the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("looking up interface {ifname:?} in this network namespace"));
    }
    libc::c_int::try_from(index).with_context(|| format!("interface index {index} of {ifname:?}"))
}

/// Sends each of `frames`, a complete Ethernet frame (destination MAC first, no FCS), out of
/// interface `ifname`, in order, through an `AF_PACKET`/`SOCK_RAW` socket bound to it.
///
/// The frames go to the driver as they are: nothing is checked, fixed or padded, so this is the
/// way to deliver truncated or otherwise malformed packets and VLAN-tagged frames to the XDP
/// program on the other end of a veth pair. Each frame must hold at least the 14-byte Ethernet
/// header (the kernel refuses shorter ones without `CAP_SYS_RAWIO`) and at most the MTU plus
/// header (plus 4 for a VLAN tag). The socket's protocol is 0, so it receives nothing.
///
/// `ifname` is looked up in the calling thread's network namespace, so call this from inside
/// the namespace that holds the interface; it needs `CAP_NET_RAW` there. A frame the kernel has
/// no room for is retried for up to two seconds; any other failure is an error naming the
/// frame (earlier frames have been sent).
pub fn send_frames(ifname: &str, frames: &[Vec<u8>]) -> Result<()> {
    let ifindex = ifindex_of(ifname)?;
    let fd = socket::socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("creating an AF_PACKET socket (needs CAP_NET_RAW in this namespace)")?;
    let mut addr: libc::sockaddr_ll = zeroed_sockaddr();
    addr.sll_family = libc::AF_PACKET as libc::c_ushort;
    addr.sll_ifindex = ifindex;
    bind_to(&fd, &addr).with_context(|| format!("binding an AF_PACKET socket to {ifname}"))?;

    for (i, frame) in frames.iter().enumerate() {
        let Some(header) = frame.get(..ETHERNET_HEADER_LEN) else {
            bail!(
                "frame {i} is {} bytes, shorter than an Ethernet header ({ETHERNET_HEADER_LEN})",
                frame.len()
            );
        };
        // Say where the frame goes explicitly as well: the interface, the destination MAC and
        // the outer ethertype (for the skb's protocol; 0x8100 for a tagged frame).
        let mut to = addr;
        to.sll_protocol = u16::from_be_bytes([header[12], header[13]]).to_be();
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&header[..6]);

        let give_up = Instant::now() + FRAME_RETRY_FOR;
        // Every turn sends the frame, fails, or runs into the clock.
        loop {
            match send_to(&fd, frame, &to) {
                Ok(n) if n == frame.len() => break,
                Ok(n) => bail!(
                    "the kernel took {n} of the {} bytes of frame {i}",
                    frame.len()
                ),
                Err(e) if is_transient(&e) && Instant::now() < give_up => {
                    std::thread::sleep(BACKOFF);
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("sending frame {i} ({} bytes) on {ifname}", frame.len())
                    });
                }
            }
        }
    }
    Ok(())
}

/// The MAC address of interface `ifname` in the calling thread's network namespace.
///
/// This asks the kernel (`SIOCGIFHWADDR` on a throwaway UDP socket) rather than reading
/// `/sys/class/net/IF/address`: sysfs shows the namespace it was mounted in, not the one a
/// thread entered with `setns` (as [`World::within`](crate::World::within) does), so inside
/// `within` it would show the test process's own interfaces or none. Needs no privileges; fails
/// if the interface does not exist there or is not Ethernet-like.
pub fn mac_of(ifname: &str) -> Result<[u8; 6]> {
    let name = ifname.as_bytes();
    ensure!(
        !name.is_empty() && name.len() < libc::IFNAMSIZ && !name.contains(&0),
        "{ifname:?} is not a valid interface name"
    );
    let fd = socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("creating a UDP socket to ask for a MAC address")?;
    // SAFETY: `ifreq` is a C structure of integers, arrays and a union of those; all zero bytes
    // is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(name) {
        *dst = src as libc::c_char;
    }
    // SAFETY: `ifr` is a live, writable `ifreq` holding a NUL-terminated name (it was zeroed
    // and the name is shorter than IFNAMSIZ), as SIOCGIFHWADDR expects.
    let rc = unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::SIOCGIFHWADDR as libc::Ioctl,
            std::ptr::from_mut(&mut ifr),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("reading the MAC address of {ifname:?} (SIOCGIFHWADDR)"));
    }
    // SAFETY: SIOCGIFHWADDR succeeded, so the union holds the hardware address.
    let hw = unsafe { ifr.ifr_ifru.ifru_hwaddr };
    ensure!(
        hw.sa_family == libc::ARPHRD_ETHER,
        "{ifname:?} is not an Ethernet interface (hardware type {})",
        hw.sa_family
    );
    let mut mac = [0u8; 6];
    for (dst, &src) in mac.iter_mut().zip(&hw.sa_data) {
        *dst = src as u8;
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
    const D4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    const S6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);
    const D6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);

    fn be16(b: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([b[at], b[at + 1]])
    }

    /// Checks the TCP header at `tcp` against what the builders promise.
    fn check_tcp(tcp: &[u8], sport: u16, dport: u16, seq: u32, mss: u16) {
        assert_eq!(tcp.len(), TCP_SYN_LEN);
        assert_eq!(be16(tcp, 0), sport);
        assert_eq!(be16(tcp, 2), dport);
        assert_eq!(u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]), seq);
        assert_eq!(&tcp[8..12], &[0, 0, 0, 0], "ack");
        assert_eq!(usize::from(tcp[12] >> 4) * 4, TCP_SYN_LEN, "data offset");
        assert_eq!(tcp[13], 0x02, "only SYN");
        assert_eq!(&tcp[20..22], &[2, 4], "MSS option");
        assert_eq!(be16(tcp, 22), mss);
        assert_ne!(be16(tcp, 16), 0, "checksum filled in");
    }

    #[test]
    fn checksum_matches_known_answers() {
        // The IPv4 header example commonly used for RFC 1071 (checksum field zeroed): 0xb861.
        let header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&[&header]), 0xb861);
        // RFC 1071 §3 example: words 0001 f203 f4f5 f6f7 sum to ddf2 (with carries folded).
        assert_eq!(
            internet_checksum(&[&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]]),
            !0xddf2
        );
        // An odd byte is padded on the right, and parts join as one stream.
        assert_eq!(internet_checksum(&[&[0x12]]), !0x1200);
        assert_eq!(
            internet_checksum(&[&[0x12], &[0x34, 0x56]]),
            internet_checksum(&[&[0x12, 0x34, 0x56]])
        );
        assert_eq!(internet_checksum(&[]), 0xffff);
    }

    #[test]
    fn syn_v4_is_well_formed() {
        let p = syn_v4(S4, D4, 40000, 443, 0xdead_beef);
        assert_eq!(p.len(), IPV4_HEADER_LEN + TCP_SYN_LEN);
        assert_eq!(p[0], 0x45, "version 4, IHL 5");
        assert_eq!(usize::from(be16(&p, 2)), p.len(), "total length");
        assert_eq!(be16(&p, 6), 0x4000, "DF, offset 0");
        assert_eq!(p[8], 64, "TTL");
        assert_eq!(p[9], IPPROTO_TCP);
        assert_ne!(be16(&p, 4), 0, "identification");
        assert_eq!(&p[12..16], &S4.octets());
        assert_eq!(&p[16..20], &D4.octets());
        assert_eq!(internet_checksum(&[&p[..20]]), 0, "IPv4 header checksum");

        let tcp = &p[20..];
        check_tcp(tcp, 40000, 443, 0xdead_beef, 1460);
        let pseudo = pseudo_header_v4(S4, D4, tcp.len());
        assert_eq!(internet_checksum(&[&pseudo, tcp]), 0, "TCP checksum");
    }

    #[test]
    fn tcp_checksum_catches_a_changed_byte() {
        let mut p = syn_v4(S4, D4, 40000, 443, 7);
        p[IPV4_HEADER_LEN + 7] ^= 0x10;
        let pseudo = pseudo_header_v4(S4, D4, TCP_SYN_LEN);
        assert_ne!(internet_checksum(&[&pseudo, &p[IPV4_HEADER_LEN..]]), 0);
        // And the pseudo-header counts: the right segment under another source fails.
        let p = syn_v4(S4, D4, 40000, 443, 7);
        let other = pseudo_header_v4(Ipv4Addr::new(192, 0, 2, 3), D4, TCP_SYN_LEN);
        assert_ne!(internet_checksum(&[&other, &p[IPV4_HEADER_LEN..]]), 0);
    }

    #[test]
    fn syn_v4_options_set_ihl_and_padding() {
        for (n, ihl) in [
            (0, 5),
            (1, 6),
            (3, 6),
            (4, 6),
            (5, 7),
            (39, 15),
            (40, 15),
            (41, 15),
            (100, 15),
        ] {
            let options: Vec<u8> = (0..n).map(|i| if i == 0 { 7 } else { 1 }).collect();
            let p = syn_v4_with_options(S4, D4, 1234, 80, 99, &options);
            let header_len = usize::from(p[0] & 0x0f) * 4;
            assert_eq!(p[0] >> 4, 4);
            assert_eq!(p[0] & 0x0f, ihl, "IHL for {n} option bytes");
            assert_eq!(p.len(), header_len + TCP_SYN_LEN);
            assert_eq!(usize::from(be16(&p, 2)), p.len(), "total length");
            assert_eq!(
                internet_checksum(&[&p[..header_len]]),
                0,
                "header checksum, {n} bytes"
            );
            let kept = n.min(IPV4_MAX_OPTIONS);
            assert_eq!(&p[20..20 + kept], &options[..kept]);
            assert!(
                p[20 + kept..header_len].iter().all(|&b| b == 0),
                "zero padding"
            );
            let tcp = &p[header_len..];
            check_tcp(tcp, 1234, 80, 99, 1460);
            let pseudo = pseudo_header_v4(S4, D4, tcp.len());
            assert_eq!(
                internet_checksum(&[&pseudo, tcp]),
                0,
                "TCP checksum, {n} bytes"
            );
        }
    }

    /// Walks an IPv6 packet's extension headers; returns the (type, Hdr Ext Len) of each and the
    /// offset of the upper-layer header, checking each header's body on the way.
    fn walk_v6(p: &[u8]) -> (Vec<(u8, usize)>, u8, usize) {
        let mut seen = Vec::new();
        let mut next = p[6];
        let mut at = IPV6_HEADER_LEN;
        while matches!(next, EXT_HOP_BY_HOP | EXT_ROUTING | EXT_DEST_OPTS) {
            assert!(seen.len() < 64, "runaway chain");
            let len = (usize::from(p[at + 1]) + 1) * 8;
            assert!(at + len <= p.len(), "extension header inside the packet");
            let body = &p[at + 2..at + len];
            if next == EXT_ROUTING {
                assert_eq!(&body[..2], &[0, 0], "type 0, segments left 0");
                assert!(body[2..].iter().all(|&b| b == 0));
            } else {
                // The options must be skippable ones that fill the header exactly.
                let mut i = 0;
                while i < body.len() {
                    match body[i] {
                        0 => i += 1,
                        1 | OPT_EXPERIMENT => {
                            let n = usize::from(body[i + 1]);
                            assert!(body[i + 2..i + 2 + n].iter().all(|&b| b == 0));
                            i += 2 + n;
                        }
                        other => panic!("unexpected option type {other}"),
                    }
                }
                assert_eq!(i, body.len(), "options end with the header");
            }
            seen.push((next, usize::from(p[at + 1])));
            next = p[at];
            at += len;
        }
        (seen, next, at)
    }

    #[test]
    fn syn_v6_is_well_formed() {
        let p = syn_v6(S6, D6, 50000, 8443, 1);
        assert_eq!(p.len(), IPV6_HEADER_LEN + TCP_SYN_LEN);
        assert_eq!(p[0] >> 4, 6);
        assert_eq!(usize::from(be16(&p, 4)), TCP_SYN_LEN, "payload length");
        assert_eq!(p[6], IPPROTO_TCP);
        assert_eq!(p[7], 64);
        assert_eq!(&p[8..24], &S6.octets());
        assert_eq!(&p[24..40], &D6.octets());
        let tcp = &p[IPV6_HEADER_LEN..];
        check_tcp(tcp, 50000, 8443, 1, 1440);
        let pseudo = pseudo_header_v6(S6, D6, tcp.len());
        assert_eq!(internet_checksum(&[&pseudo, tcp]), 0, "TCP checksum");
    }

    #[test]
    fn syn_v6_extension_chain_parses_back() {
        let chains: [&[(u8, usize)]; 7] = [
            &[],
            &[(EXT_HOP_BY_HOP, 0)],
            &[(EXT_DEST_OPTS, 3)],
            &[(EXT_ROUTING, 2)],
            &[(EXT_HOP_BY_HOP, 0), (EXT_ROUTING, 0), (EXT_DEST_OPTS, 1)],
            &[(EXT_HOP_BY_HOP, 40), (EXT_DEST_OPTS, 255)],
            &[
                (EXT_DEST_OPTS, 0),
                (EXT_DEST_OPTS, 0),
                (EXT_DEST_OPTS, 0),
                (EXT_DEST_OPTS, 0),
            ],
        ];
        for chain in chains {
            let p = syn_v6_with_ext(S6, D6, 50000, 8443, 0x0102_0304, chain);
            let ext_len: usize = chain.iter().map(|&(_, l)| (l + 1) * 8).sum();
            assert_eq!(
                p.len(),
                IPV6_HEADER_LEN + ext_len + TCP_SYN_LEN,
                "{chain:?}"
            );
            assert_eq!(
                usize::from(be16(&p, 4)),
                ext_len + TCP_SYN_LEN,
                "payload length {chain:?}"
            );
            let (seen, upper, at) = walk_v6(&p);
            assert_eq!(seen, chain, "chain parses back");
            assert_eq!(upper, IPPROTO_TCP, "last next header is TCP");
            assert_eq!(at + TCP_SYN_LEN, p.len());
            let tcp = &p[at..];
            check_tcp(tcp, 50000, 8443, 0x0102_0304, 1440);
            // Upper-layer length, not payload length, in the pseudo-header.
            let pseudo = pseudo_header_v6(S6, D6, TCP_SYN_LEN);
            assert_eq!(
                internet_checksum(&[&pseudo, tcp]),
                0,
                "TCP checksum {chain:?}"
            );
        }
    }

    #[test]
    fn syn_v6_odd_extensions() {
        // Too long a Hdr Ext Len is cut to 255.
        let p = syn_v6_with_ext(S6, D6, 1, 2, 3, &[(EXT_DEST_OPTS, 1000)]);
        let (seen, _, _) = walk_v6(&p);
        assert_eq!(seen, [(EXT_DEST_OPTS, 255)]);
        // An unknown type: chained correctly, body zero, and the walk stops at it.
        let p = syn_v6_with_ext(S6, D6, 1, 2, 3, &[(EXT_HOP_BY_HOP, 0), (44, 0)]);
        let (seen, upper, at) = walk_v6(&p);
        assert_eq!(seen, [(EXT_HOP_BY_HOP, 0)]);
        assert_eq!((upper, at), (44, IPV6_HEADER_LEN + 8));
        assert_eq!(&p[at..at + 8], &[IPPROTO_TCP, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(usize::from(be16(&p, 4)), 16 + TCP_SYN_LEN);
    }

    #[test]
    fn options_fill_exactly_and_as_linux_accepts() {
        // Every body an options header can have: (length + 1) * 8 - 2 bytes.
        for units in 0..=255usize {
            let len = (units + 1) * 8 - 2;
            let mut out = Vec::new();
            fill_options(&mut out, len);
            assert_eq!(out.len(), len);
            let (mut i, mut padding, mut others) = (0, 0, 0);
            while i < out.len() {
                if out[i] == 0 {
                    padding += 1;
                    i += 1;
                    continue;
                }
                let optlen = usize::from(out[i + 1]) + 2;
                if out[i] == 1 {
                    padding += optlen;
                } else {
                    assert_eq!(out[i], OPT_EXPERIMENT);
                    others += 1;
                    padding = 0;
                }
                assert!(
                    padding <= 7,
                    "at most 7 padding bytes in a row, length {units}"
                );
                i += optlen;
            }
            assert_eq!(i, len);
            assert!(others <= 8, "at most 8 non-padding options, length {units}");
        }
        // The shortest header is one PadN of 4 zero bytes.
        let mut out = Vec::new();
        fill_options(&mut out, 6);
        assert_eq!(out, [1, 4, 0, 0, 0, 0]);
    }

    #[test]
    fn ethernet_layout() {
        let dst = [0x02, 0, 0, 0, 0, 1];
        let src = [0x02, 0, 0, 0, 0, 2];
        let payload = syn_v4(S4, D4, 1, 2, 3);
        let f = ethernet(dst, src, None, ETHERTYPE_IPV4, &payload);
        assert_eq!(&f[..6], &dst);
        assert_eq!(&f[6..12], &src);
        assert_eq!(be16(&f, 12), ETHERTYPE_IPV4);
        assert_eq!(&f[14..], &payload[..]);

        let f = ethernet(dst, src, Some(0x2064), ETHERTYPE_IPV6, &[0xaa]);
        assert_eq!(f.len(), 19, "tagged, not padded");
        assert_eq!(be16(&f, 12), ETHERTYPE_VLAN);
        assert_eq!(be16(&f, 14), 0x2064, "TCI as given");
        assert_eq!(be16(&f, 16), ETHERTYPE_IPV6);
        assert_eq!(f[18], 0xaa);
    }

    #[test]
    fn source_ports_cycle_within_range() {
        assert_eq!(sport_for(40000, 0), 40000);
        assert_eq!(sport_for(40000, 5), 40005);
        assert_eq!(sport_for(65535, 0), 65535);
        assert_eq!(sport_for(65535, 1), 1024);
        assert_eq!(sport_for(65530, 10), 1028);
        assert_eq!(sport_for(80, 0), 1024, "bases below 1024 are raised");
        assert_eq!(sport_for(1024, 64512), 1024, "a full cycle comes back");
        assert_eq!(sport_for(2000, u64::MAX), sport_for(2000, u64::MAX % 64512));
        for i in 0..200_000u64 {
            assert!(sport_for(60000, i) >= SPORT_MIN);
        }
    }

    #[test]
    fn sequence_numbers_vary() {
        let mut isn = Isn::new(1);
        let first: Vec<u32> = (0..64).map(|_| isn.next_u32()).collect();
        let mut sorted = first.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), first.len(), "no repeats in a short run");
    }

    #[test]
    fn ip_id_is_never_zero() {
        assert_ne!(ip_id(0), 0);
        assert_ne!(ip_id(0x1234_1234), 0);
        assert_eq!(ip_id(0x1234_0000), 0x1234);
    }

    #[test]
    fn bad_interface_names_are_errors() {
        assert!(mac_of("").is_err());
        assert!(mac_of("a-name-that-is-far-too-long").is_err());
        assert!(mac_of("nul\0inside").is_err());
        assert!(send_frames("nul\0inside", &[]).is_err());
    }
}
