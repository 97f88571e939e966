//! ICMP "Packet Too Big" across the translation (`docs/packet-engine.md`, section 7).
//!
//! A router beyond the proxy that cannot forward a translated segment tells the proxy (the
//! segment's source), not the peer that sent it: `spliced_packet_in` reports such a message
//! for a tuple with an entry ([`IcmpEvent`]) and spliced tells the peer the same thing in its
//! own family, about its own segment, from the proxy's address:
//! - an ICMPv6 Packet Too Big about `p6:ep -> b6:bp` becomes an ICMPv4 "fragmentation needed"
//!   to the client about `c4:cp -> p4:443`, next-hop MTU `mtu - 20`;
//! - an ICMPv4 "fragmentation needed" about `p4:443 -> c4:cp` becomes an ICMPv6 Packet Too Big
//!   to the backend about `b6:bp -> p6:ep`, MTU `max(1280, mtu + 20)`.
//!
//! The quoted sequence number is moved into the peer's space (`quoted_seq - ack_delta` of the
//! entry): Linux accepts such a message only if it lies between the socket's `snd_una` and
//! `snd_nxt` (`tcp_v4_err`, `tcp_v6_err`), then lowers the path MTU and the MSS and
//! retransmits. At most one message per connection per [`RATE`].
//!
//! The builders and the translation are sans-IO ([`reply`], [`frag_needed`],
//! [`packet_too_big`]); [`Sender`] owns the raw sockets (`IPPROTO_RAW`, in the namespace of
//! the process, where the proxy's addresses are) and [`RateLimit`] the per-connection clock.
use std::{
    collections::HashMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use nix::sys::socket::{
    AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrIn, SockaddrIn6, sendto,
    socket,
};
use proxy_common::{FAMILY_V4, FAMILY_V6, FLOW_DOWN, FLOW_UP, Flow, FlowKey, IcmpEvent};

/// At most one message per connection this often.
pub const RATE: Duration = Duration::from_millis(100);
/// The smallest MTU an IPv6 link may have (RFC 8200); Linux ignores a smaller Packet Too Big.
pub const IPV6_MIN_MTU: u32 = 1280;
/// The smallest MTU an IPv4 host must accept (RFC 791).
const IPV4_MIN_MTU: u32 = 68;
/// Length of the "fragmentation needed" [`frag_needed`] builds: IPv4 header, ICMP header, the
/// quoted IPv4 header and the 8 bytes of TCP header every ICMP error carries.
pub const FRAG_NEEDED_LEN: usize = 20 + 8 + 20 + 8;
/// Length of the Packet Too Big [`packet_too_big`] builds: IPv6 header, ICMPv6 header, the
/// quoted IPv6 header and 8 bytes of TCP header.
pub const PACKET_TOO_BIG_LEN: usize = 40 + 8 + 40 + 8;
/// The hop limit (TTL) of the messages spliced sends.
const HOPS: u8 = 64;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_ICMPV6: u8 = 58;

/// The TCP segment an ICMP error quotes: its tuple and sequence number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quoted<A> {
    /// The segment's source.
    pub src: A,
    /// The segment's destination.
    pub dst: A,
    /// Its sequence number.
    pub seq: u32,
}

/// A message to send: where, and the whole packet, IP header included.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// An ICMPv4 "fragmentation needed" to a client.
    V4 {
        /// The client.
        to: Ipv4Addr,
        /// [`frag_needed`]'s packet.
        packet: [u8; FRAG_NEEDED_LEN],
    },
    /// An ICMPv6 Packet Too Big to a backend.
    V6 {
        /// The backend.
        to: Ipv6Addr,
        /// [`packet_too_big`]'s packet.
        packet: [u8; PACKET_TOO_BIG_LEN],
    },
}

/// The message for the peer on the other side of `event`, `flow` being the entry of its key
/// (the entry whose peer sent the quoted segment's original): `None` when the event and the
/// entry do not go together or the MTU is one no stack would accept.
pub fn reply(event: &IcmpEvent, flow: &Flow) -> Option<Reply> {
    // The entry's translated tuple is the peer's segment reversed: `new_saddr:new_sport` is
    // the proxy's side facing the peer, `new_daddr:new_dport` the peer.
    let sport = u16::from_be(flow.new_sport);
    let dport = u16::from_be(flow.new_dport);
    // The quoted segment was translated from the peer's with `+ seq_delta` of the peer's
    // entry, which is this entry's `ack_delta`.
    let seq = event.quoted_seq.wrapping_sub(flow.ack_delta);
    match (event.key.family, flow.dir) {
        // A Packet Too Big from the backend's side; `flow` is `E_down`: tell the client.
        (FAMILY_V6, FLOW_DOWN) => {
            if event.mtu < IPV6_MIN_MTU {
                return None;
            }
            let proxy = Ipv6Addr::from(flow.new_saddr).to_ipv4_mapped()?;
            let client = Ipv6Addr::from(flow.new_daddr).to_ipv4_mapped()?;
            let mtu = u16::try_from(event.mtu - 20).unwrap_or(u16::MAX);
            let quoted = Quoted {
                src: SocketAddrV4::new(client, dport),
                dst: SocketAddrV4::new(proxy, sport),
                seq,
            };
            Some(Reply::V4 {
                to: client,
                packet: frag_needed(proxy, client, mtu, &quoted),
            })
        }
        // A "fragmentation needed" from the client's side; `flow` is `E_up`: tell the backend.
        (FAMILY_V4, FLOW_UP) => {
            if event.mtu < IPV4_MIN_MTU {
                return None;
            }
            let proxy = Ipv6Addr::from(flow.new_saddr);
            let backend = Ipv6Addr::from(flow.new_daddr);
            let mtu = event.mtu.saturating_add(20).max(IPV6_MIN_MTU);
            let quoted = Quoted {
                src: SocketAddrV6::new(backend, dport, 0, 0),
                dst: SocketAddrV6::new(proxy, sport, 0, 0),
                seq,
            };
            Some(Reply::V6 {
                to: backend,
                packet: packet_too_big(proxy, backend, mtu, &quoted),
            })
        }
        _ => None,
    }
}

/// An ICMPv4 destination unreachable, code 4 ("fragmentation needed and DF set", RFC 1191)
/// from `from` to `to` with next-hop MTU `mtu`, quoting an IPv4 header of the segment
/// `quoted` (DF, protocol 6) and its first 8 TCP bytes (ports, sequence number). Both IPv4
/// headers and the ICMP checksum are complete.
pub fn frag_needed(
    from: Ipv4Addr,
    to: Ipv4Addr,
    mtu: u16,
    quoted: &Quoted<SocketAddrV4>,
) -> [u8; FRAG_NEEDED_LEN] {
    let mut p = [0u8; FRAG_NEEDED_LEN];
    // Outer header: precedence "internetwork control", as Linux's own ICMP errors.
    ipv4_header(
        &mut p[..20],
        0xc0,
        FRAG_NEEDED_LEN as u16,
        0,
        IPPROTO_ICMP,
        from,
        to,
    );
    p[20] = 3;
    p[21] = 4;
    p[26..28].copy_from_slice(&mtu.to_be_bytes());
    // The quoted header, as the segment left its sender: DF, TCP; its length as a segment
    // without payload (only its first 8 TCP bytes follow, which is all a receiver reads).
    ipv4_header(
        &mut p[28..48],
        0,
        40,
        0x4000,
        IPPROTO_TCP,
        *quoted.src.ip(),
        *quoted.dst.ip(),
    );
    tcp_start(
        &mut p[48..56],
        quoted.src.port(),
        quoted.dst.port(),
        quoted.seq,
    );
    let sum = checksum(&[&p[20..]]);
    p[22..24].copy_from_slice(&sum.to_be_bytes());
    p
}

/// An ICMPv6 Packet Too Big (RFC 4443) from `from` to `to` with MTU `mtu`, quoting an IPv6
/// header of the segment `quoted` and its first 8 TCP bytes. The ICMPv6 checksum (over the
/// pseudo-header) is complete.
pub fn packet_too_big(
    from: Ipv6Addr,
    to: Ipv6Addr,
    mtu: u32,
    quoted: &Quoted<SocketAddrV6>,
) -> [u8; PACKET_TOO_BIG_LEN] {
    let mut p = [0u8; PACKET_TOO_BIG_LEN];
    let icmp_len = (PACKET_TOO_BIG_LEN - 40) as u16;
    ipv6_header(&mut p[..40], icmp_len, IPPROTO_ICMPV6, from, to);
    p[40] = 2;
    p[41] = 0;
    p[44..48].copy_from_slice(&mtu.to_be_bytes());
    // The quoted header: a segment without payload, as in `frag_needed`.
    ipv6_header(
        &mut p[48..88],
        20,
        IPPROTO_TCP,
        *quoted.src.ip(),
        *quoted.dst.ip(),
    );
    tcp_start(
        &mut p[88..96],
        quoted.src.port(),
        quoted.dst.port(),
        quoted.seq,
    );
    let pseudo = pseudo_header_v6(&from, &to, u32::from(icmp_len), IPPROTO_ICMPV6);
    let sum = checksum(&[&pseudo, &p[40..]]);
    p[42..44].copy_from_slice(&sum.to_be_bytes());
    p
}

fn ipv4_header(
    h: &mut [u8],
    tos: u8,
    total: u16,
    frag: u16,
    proto: u8,
    src: Ipv4Addr,
    dst: Ipv4Addr,
) {
    h[0] = 0x45;
    h[1] = tos;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[6..8].copy_from_slice(&frag.to_be_bytes());
    h[8] = HOPS;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&[&h[..20]]);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
}

fn ipv6_header(h: &mut [u8], payload: u16, next: u8, src: Ipv6Addr, dst: Ipv6Addr) {
    h[0] = 0x60;
    h[4..6].copy_from_slice(&payload.to_be_bytes());
    h[6] = next;
    h[7] = HOPS;
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
}

fn tcp_start(t: &mut [u8], sport: u16, dport: u16, seq: u32) {
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
}

fn pseudo_header_v6(src: &Ipv6Addr, dst: &Ipv6Addr, len: u32, next: u8) -> [u8; 40] {
    let mut p = [0u8; 40];
    p[..16].copy_from_slice(&src.octets());
    p[16..32].copy_from_slice(&dst.octets());
    p[32..36].copy_from_slice(&len.to_be_bytes());
    p[39] = next;
    p
}

/// The Internet checksum (RFC 1071) of the concatenation of `parts` (each of even length but
/// the last), checksum fields counted as they are (zero when computing).
pub fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    for part in parts {
        let (words, rest) = part.as_chunks::<2>();
        for w in words {
            sum += u32::from(u16::from_be_bytes(*w));
        }
        if let [last] = rest {
            sum += u32::from(*last) << 8;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// One message per connection (the key of the event's entry) per `every`.
pub struct RateLimit {
    every: Duration,
    last: HashMap<FlowKey, Instant>,
}

impl RateLimit {
    /// At most one per `every` for each key.
    pub fn new(every: Duration) -> Self {
        RateLimit {
            every,
            last: HashMap::new(),
        }
    }

    /// Whether a message for `key` may go at `now` (and if so, `now` is its last).
    pub fn allow(&mut self, key: &FlowKey, now: Instant) -> bool {
        if let Some(last) = self.last.get(key)
            && now.saturating_duration_since(*last) < self.every
        {
            return false;
        }
        // Forget connections that have been quiet for a while, so the map stays small.
        if self.last.len() >= 1024 {
            let every = self.every;
            self.last
                .retain(|_, t| now.saturating_duration_since(*t) < every);
        }
        self.last.insert(*key, now);
        true
    }
}

/// The raw sockets the messages leave by (`IPPROTO_RAW`: the header is ours), in the network
/// namespace of the process that opened them.
pub struct Sender {
    v4: OwnedFd,
    v6: OwnedFd,
}

impl Sender {
    /// Opens both sockets (needs `CAP_NET_RAW`).
    pub fn open() -> Result<Self> {
        let flags = SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC;
        let v4 = socket(AddressFamily::Inet, SockType::Raw, flags, SockProtocol::Raw)
            .context("opening a raw IPv4 socket for ICMP")?;
        // An IPv6 `IPPROTO_RAW` socket implies `IPV6_HDRINCL` (Linux 4.5 and later).
        let v6 = socket(
            AddressFamily::Inet6,
            SockType::Raw,
            flags,
            SockProtocol::Raw,
        )
        .context("opening a raw IPv6 socket for ICMP")?;
        Ok(Sender { v4, v6 })
    }

    /// Sends `reply` (non-blocking: a full socket buffer drops it, as a router would).
    pub fn send(&self, reply: &Reply) -> nix::Result<usize> {
        match reply {
            Reply::V4 { to, packet } => sendto(
                self.v4.as_raw_fd(),
                packet,
                &SockaddrIn::from(SocketAddrV4::new(*to, 0)),
                MsgFlags::MSG_DONTWAIT,
            ),
            Reply::V6 { to, packet } => sendto(
                self.v6.as_raw_fd(),
                packet,
                &SockaddrIn6::from(SocketAddrV6::new(*to, 0, 0, 0)),
                MsgFlags::MSG_DONTWAIT,
            ),
        }
    }
}

/// An [`IcmpEvent`] from the bytes of a ring buffer record; `None` if it is not one.
pub fn parse_event(bytes: &[u8]) -> Option<IcmpEvent> {
    if bytes.len() < size_of::<IcmpEvent>() {
        return None;
    }
    // SAFETY: the length was checked, `IcmpEvent` is `repr(C)` of integers and byte arrays
    // (valid for any bit pattern), and the read is unaligned.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<IcmpEvent>()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapped(ip: Ipv4Addr) -> [u8; 16] {
        ip.to_ipv6_mapped().octets()
    }

    const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
    const PROXY4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    const PROXY6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
    const BACKEND: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);

    /// `E_down` of a connection `192.0.2.2:40000 -> 192.0.2.1:443` handed to
    /// `[2001:db8:1::1]:50000 -> [2001:db8:1::10]:8443`, client seq + 1000 = backend seq.
    fn down() -> (FlowKey, Flow) {
        let key = FlowKey {
            saddr: BACKEND.octets(),
            daddr: PROXY6.octets(),
            sport: 8443u16.to_be(),
            dport: 50000u16.to_be(),
            family: FAMILY_V6,
            _pad: [0; 3],
        };
        let flow = Flow {
            dir: FLOW_DOWN,
            new_saddr: mapped(PROXY4),
            new_daddr: mapped(CLIENT),
            new_sport: 443u16.to_be(),
            new_dport: 40000u16.to_be(),
            seq_delta: 77,
            ack_delta: 1000,
            ..Flow::default()
        };
        (key, flow)
    }

    /// `E_up` of the same connection; backend seq + 77 = client-connection seq.
    fn up() -> (FlowKey, Flow) {
        let key = FlowKey {
            saddr: mapped(CLIENT),
            daddr: mapped(PROXY4),
            sport: 40000u16.to_be(),
            dport: 443u16.to_be(),
            family: FAMILY_V4,
            _pad: [0; 3],
        };
        let flow = Flow {
            dir: FLOW_UP,
            new_saddr: PROXY6.octets(),
            new_daddr: BACKEND.octets(),
            new_sport: 50000u16.to_be(),
            new_dport: 8443u16.to_be(),
            seq_delta: 1000,
            ack_delta: 77,
            ..Flow::default()
        };
        (key, flow)
    }

    fn be16(p: &[u8], at: usize) -> u16 {
        u16::from_be_bytes([p[at], p[at + 1]])
    }

    fn be32(p: &[u8], at: usize) -> u32 {
        u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]])
    }

    /// A Packet Too Big about the backend connection's segment at 5000 (1500 bytes that did
    /// not fit 1280) becomes a "fragmentation needed" to the client from the proxy, MTU 1260,
    /// quoting the client's own segment (seq 4000) `c4:cp -> p4:443`; every checksum holds.
    #[test]
    fn a_packet_too_big_becomes_fragmentation_needed_for_the_client() {
        let (key, flow) = down();
        let event = IcmpEvent {
            key,
            mtu: 1280,
            quoted_seq: 5000,
        };
        let Some(Reply::V4 { to, packet: p }) = reply(&event, &flow) else {
            panic!("no IPv4 reply");
        };
        assert_eq!(to, CLIENT);
        // Outer IPv4 header.
        assert_eq!(p[0], 0x45);
        assert_eq!(be16(&p, 2), FRAG_NEEDED_LEN as u16);
        assert_eq!(p[9], IPPROTO_ICMP);
        assert_eq!(p[12..16], PROXY4.octets());
        assert_eq!(p[16..20], CLIENT.octets());
        assert_eq!(checksum(&[&p[..20]]), 0, "outer header checksum");
        // ICMP: type 3 code 4, next-hop MTU.
        assert_eq!((p[20], p[21]), (3, 4));
        assert_eq!(be16(&p, 24), 0, "unused");
        assert_eq!(be16(&p, 26), 1260);
        assert_eq!(checksum(&[&p[20..]]), 0, "ICMP checksum");
        // The quoted header: the client's segment towards the proxy, DF, TCP.
        assert_eq!(p[28], 0x45);
        assert_eq!(be16(&p, 34) & 0x4000, 0x4000, "DF");
        assert_eq!(p[37], IPPROTO_TCP);
        assert_eq!(p[40..44], CLIENT.octets());
        assert_eq!(p[44..48], PROXY4.octets());
        assert_eq!(checksum(&[&p[28..48]]), 0, "quoted header checksum");
        // Ports and the sequence number in the client's space.
        assert_eq!((be16(&p, 48), be16(&p, 50)), (40000, 443));
        assert_eq!(be32(&p, 52), 4000);
    }

    /// The mirror: a "fragmentation needed" about the client connection's segment becomes a
    /// Packet Too Big to the backend, MTU + 20 but never under 1280, quoting the backend's
    /// segment `b6:bp -> p6:ep`; the ICMPv6 checksum over the pseudo-header holds.
    #[test]
    fn fragmentation_needed_becomes_a_packet_too_big_for_the_backend() {
        let (key, flow) = up();
        for (mtu, expected) in [(1400, 1420), (576, 1280), (1500, 1520)] {
            let event = IcmpEvent {
                key,
                mtu,
                quoted_seq: 50,
            };
            let Some(Reply::V6 { to, packet: p }) = reply(&event, &flow) else {
                panic!("no IPv6 reply");
            };
            assert_eq!(to, BACKEND);
            assert_eq!(p[0] >> 4, 6);
            assert_eq!(
                be16(&p, 4),
                (PACKET_TOO_BIG_LEN - 40) as u16,
                "payload length"
            );
            assert_eq!(p[6], IPPROTO_ICMPV6);
            assert_eq!(p[8..24], PROXY6.octets());
            assert_eq!(p[24..40], BACKEND.octets());
            assert_eq!((p[40], p[41]), (2, 0));
            assert_eq!(be32(&p, 44), expected);
            let pseudo = pseudo_header_v6(&PROXY6, &BACKEND, (PACKET_TOO_BIG_LEN - 40) as u32, 58);
            assert_eq!(checksum(&[&pseudo, &p[40..]]), 0, "ICMPv6 checksum");
            // Quoted: the backend's segment towards the proxy.
            assert_eq!(p[48] >> 4, 6);
            assert_eq!(p[54], IPPROTO_TCP);
            assert_eq!(p[56..72], BACKEND.octets());
            assert_eq!(p[72..88], PROXY6.octets());
            assert_eq!((be16(&p, 88), be16(&p, 90)), (8443, 50000));
            // 50 - 77, wrapped: sequence arithmetic.
            assert_eq!(be32(&p, 92), 50u32.wrapping_sub(77));
        }
    }

    /// An event with the other direction's entry, or an MTU no stack accepts, gives nothing.
    #[test]
    fn mismatched_or_impossible_events_give_nothing() {
        let (key, flow) = down();
        let (up_key, up_flow) = up();
        let event = |key, mtu| IcmpEvent {
            key,
            mtu,
            quoted_seq: 1,
        };
        assert_eq!(reply(&event(key, 1280), &up_flow), None);
        assert_eq!(reply(&event(up_key, 1400), &flow), None);
        assert_eq!(reply(&event(key, 1279), &flow), None);
        assert_eq!(reply(&event(up_key, 67), &up_flow), None);
    }

    /// The checksum against a known value (RFC 1071's example bytes) and an odd length.
    #[test]
    fn the_internet_checksum() {
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(checksum(&[&data]), !0xddf2);
        assert_eq!(checksum(&[&data[..4], &data[4..]]), !0xddf2);
        assert_eq!(checksum(&[&[0xab]]), !0xab00);
    }

    #[test]
    fn one_message_per_connection_per_100_ms() {
        let (a, _) = down();
        let (b, _) = up();
        let mut limit = RateLimit::new(RATE);
        let t = Instant::now();
        assert!(limit.allow(&a, t));
        assert!(!limit.allow(&a, t + Duration::from_millis(99)));
        assert!(limit.allow(&b, t + Duration::from_millis(1)));
        assert!(limit.allow(&a, t + Duration::from_millis(100)));
        assert!(!limit.allow(&a, t + Duration::from_millis(150)));
    }

    #[test]
    fn an_event_reads_from_its_record() {
        let (key, _) = down();
        let event = IcmpEvent {
            key,
            mtu: 1280,
            quoted_seq: 0xdead_beef,
        };
        // SAFETY: reading the bytes of a `repr(C)` value without padding.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                std::ptr::from_ref(&event).cast::<u8>(),
                size_of::<IcmpEvent>(),
            )
        };
        assert_eq!(parse_event(bytes), Some(event));
        assert_eq!(parse_event(&bytes[1..]), None);
    }
}
