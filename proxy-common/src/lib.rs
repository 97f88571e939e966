//! Names and `#[repr(C)]` types shared across the kernel boundary.
//!
//! Both `proxy-ebpf` (compiled for `bpfel-unknown-none`) and `proxy-userspace` depend on this
//! crate, so a map's name or layout is written once and cannot drift between the two sides.
#![no_std]
#![warn(missing_docs)]

/// Name of the `SOCKHASH` that holds spliced sockets, keyed by socket cookie.
pub const MAP_SOCKETS: &str = "SPLICED_SOCKS";
/// Name of the `SOCKHASH` without programs that holds every spliced socket for its whole life.
/// Redirect targets are looked up here, so a redirect never misses a peer that is still being
/// inserted into [`MAP_SOCKETS`].
pub const MAP_HOLD: &str = "SPLICED_HOLD";
/// Name of the hash map of sockets to take out of [`MAP_SOCKETS`] (cookie to a state, see
/// [`DETACH_REQUESTED`]); [`PROG_DETACH`] does it under the socket's lock.
pub const MAP_DETACH: &str = "SPLICED_DETACH";
/// [`MAP_DETACH`] value: user space asks for the socket to be taken out.
pub const DETACH_REQUESTED: u32 = 0;
/// [`MAP_DETACH`] value: the socket was taken out of [`MAP_SOCKETS`].
pub const DETACH_DONE: u32 = 1;
/// [`MAP_DETACH`] value: the socket was found but was not in [`MAP_SOCKETS`].
pub const DETACH_ABSENT: u32 = 2;
/// Name of the hash map from a socket's cookie to its [`Pair`].
pub const MAP_PEERS: &str = "SPLICED_PEERS";
/// Name of the ring buffer that carries the cookie of a socket whose redirected count reached
/// its wake point ([`MAP_WAKE`]) to user space, so connections cost no polling.
pub const MAP_EVENTS: &str = "SPLICED_EVENTS";
/// Name of the hash map from a socket's cookie to the redirected byte count at which the
/// verdict reports at once: user space sets it where the peer's backlog would reach the limit,
/// so it can react before the kernel holds much more.
pub const MAP_WAKE: &str = "SPLICED_WAKE";

/// Name of the per-CPU array of kernel-side counters, indexed by [`Counter`].
pub const MAP_COUNTERS: &str = "SPLICED_COUNTERS";

/// Name of the one-element array holding the [`SkbOffsets`] the verdict reads the kernel's
/// structures with. User space fills it from the kernel's BTF before the program is attached.
pub const MAP_OFFSETS: &str = "SPLICED_OFFSETS";

/// Where the verdict finds, in the kernel's own structures, what it needs to tell bytes it
/// already forwarded from new ones: byte offsets read from `/sys/kernel/btf/vmlinux` at load
/// time (the layout differs between kernels and builds, so nothing is hard-coded).
///
/// `tcp_read_skb` hands the verdict every queued skb whole, even one that starts below the
/// socket's `copied_seq` (a retransmission that overlaps bytes already forwarded): the verdict
/// trims that part. See `docs/sockmap-duplication.md`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SkbOffsets {
    /// `struct sk_buff`, member `cb`: where `struct tcp_skb_cb` lives.
    pub skb_cb: u32,
    /// `struct sk_buff`, member `sk`: the socket that owns the skb.
    pub skb_sk: u32,
    /// `struct tcp_skb_cb`, member `seq`: the skb's first sequence number.
    pub cb_seq: u32,
    /// `struct tcp_sock`, member `copied_seq`: the next sequence number not yet consumed.
    pub tcp_copied_seq: u32,
}

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, four `u32`s, no padding, valid for any bit pattern.
unsafe impl aya::Pod for SkbOffsets {}

/// The most bytes one `bpf_skb_adjust_room` call may remove from an `sk_skb` (0xfff).
pub const TRIM_STEP: u32 = 4095;
/// The verdict trims at most this many steps of [`TRIM_STEP`] from one skb (about 512 KiB,
/// beyond any GSO skb); what is left is counted in [`Counter::TrimIncomplete`].
pub const TRIM_MAX_STEPS: u32 = 128;

/// Name of the `sk_skb/stream_verdict` program that redirects payload to the peer socket.
pub const PROG_STREAM_VERDICT: &str = "spliced_verdict";

/// Name of the `iter/tcp` program that takes the sockets listed in [`MAP_DETACH`] out of the
/// verdict map while holding each socket's lock, so no skb is in the middle of a verdict.
pub const PROG_DETACH: &str = "spliced_detach";

/// Directory under bpffs where spliced pins its maps.
pub const PIN_DIR: &str = "/sys/fs/bpf/spliced";

/// Maximum number of sockets the `SOCKHASH` can hold (two per spliced connection).
pub const MAX_SOCKETS: u32 = 65_536;

/// A spliced socket's entry in [`MAP_PEERS`]: where its data goes and how much went there.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pair {
    /// Cookie of the socket this one's data is redirected to.
    pub peer: u64,
    /// Bytes the verdict program redirected from this socket to the peer. Only this socket's
    /// verdict runs write it, and those are serialized by the socket lock.
    pub redirected: u64,
}

#[cfg(feature = "user")]
// SAFETY: `Pair` is `repr(C)`, two `u64`s, no padding, valid for any bit pattern.
unsafe impl aya::Pod for Pair {}

/// Kernel-side counters, the index into [`MAP_COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// skbs redirected to the peer socket.
    Redirected = 0,
    /// Payload bytes redirected to the peer socket.
    RedirectedBytes = 1,
    /// skbs dropped because no peer was registered (the insertion order rules it out; user
    /// space's byte accounting resets a connection that loses bytes this way).
    NoPeer = 2,
    /// Redirects the kernel refused (peer gone from the map).
    RedirectFailed = 3,
    /// Zero-length skbs (a bare FIN) dropped on purpose.
    EmptyDropped = 4,
    /// Sockets taken out of the verdict map under their lock (pauses for backpressure).
    Detached = 5,
    /// skbs that started below the socket's `copied_seq` and were trimmed to the new bytes.
    OldTrimmed = 6,
    /// Bytes trimmed off such skbs: old bytes that would otherwise have been forwarded twice.
    OldTrimmedBytes = 7,
    /// skbs holding only bytes already forwarded, dropped after trimming them to nothing.
    OldDropped = 8,
    /// skbs whose old part could not be trimmed entirely (a helper failed or the skb was
    /// longer than the trim loop allows). Should stay 0.
    TrimIncomplete = 9,
}

impl Counter {
    /// Number of counters; the length of [`MAP_COUNTERS`].
    pub const COUNT: u32 = 10;

    /// Every counter, in index order.
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::Redirected,
        Counter::RedirectedBytes,
        Counter::NoPeer,
        Counter::RedirectFailed,
        Counter::EmptyDropped,
        Counter::Detached,
        Counter::OldTrimmed,
        Counter::OldTrimmedBytes,
        Counter::OldDropped,
        Counter::TrimIncomplete,
    ];

    /// The counter's name as it appears in logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Redirected => "redirected_skbs",
            Counter::RedirectedBytes => "redirected_bytes",
            Counter::NoPeer => "dropped_no_peer",
            Counter::RedirectFailed => "redirect_failed",
            Counter::EmptyDropped => "empty_dropped",
            Counter::Detached => "detached",
            Counter::OldTrimmed => "old_trimmed_skbs",
            Counter::OldTrimmedBytes => "old_trimmed_bytes",
            Counter::OldDropped => "old_dropped_skbs",
            Counter::TrimIncomplete => "trim_incomplete",
        }
    }
}

/// Name of the XDP program that filters packets before the stack sees them.
pub const PROG_XDP: &str = "spliced_xdp";
/// Name of the IPv4 deny list: an LPM trie keyed by prefix length and address (4 bytes,
/// network order); any value means "deny".
pub const MAP_XDP_DENY4: &str = "SPLICED_XDP_DENY4";
/// Name of the IPv6 deny list: an LPM trie keyed by prefix length and address (16 bytes).
pub const MAP_XDP_DENY6: &str = "SPLICED_XDP_DENY6";
/// Name of the hash of guarded destination TCP ports (host order) to 1.
pub const MAP_XDP_PORTS: &str = "SPLICED_XDP_PORTS";
/// Name of the one-element array holding the [`SynLimit`] in force.
pub const MAP_XDP_LIMIT: &str = "SPLICED_XDP_LIMIT";
/// Name of the LRU hash from a source ([`xdp_source`]) to its [`SynBucket`].
pub const MAP_XDP_BUCKETS: &str = "SPLICED_XDP_BUCKETS";
/// Name of the per-CPU array of XDP counters, indexed by [`XdpCounter`].
pub const MAP_XDP_COUNTERS: &str = "SPLICED_XDP_COUNTERS";
/// Sources whose SYN buckets are remembered at once (least recently used ones are forgotten).
pub const XDP_MAX_SOURCES: u32 = 65_536;
/// Entries each deny list can hold.
pub const XDP_MAX_DENY: u32 = 16_384;
/// One token, in the bucket's units: buckets count nano-tokens so that refills need no floats.
pub const XDP_TOKEN: u64 = 1_000_000_000;

/// The SYN limit per source: `rate_per_second` tokens are added each second up to `burst`;
/// each SYN takes one. A rate of 0 means no limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynLimit {
    /// Tokens (SYNs) added per second.
    pub rate_per_second: u64,
    /// The most tokens a source can save up.
    pub burst: u64,
}

/// A source's token bucket.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SynBucket {
    /// Tokens left, in units of [`XDP_TOKEN`] per SYN.
    pub tokens: u64,
    /// When the bucket was last refilled (`bpf_ktime_get_ns`).
    pub last_ns: u64,
}

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, two `u64`s, no padding, valid for any bit pattern.
unsafe impl aya::Pod for SynLimit {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for SynBucket {}

/// The key a source's SYNs are counted under: IPv4 addresses whole (as `::ffff:a.b.c.d`), IPv6
/// addresses by their /64, the rest zero.
pub fn xdp_source(v4: Option<[u8; 4]>, v6: Option<[u8; 16]>) -> [u8; 16] {
    match (v4, v6) {
        (Some(a), _) => [
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
        ],
        (None, Some(a)) => [
            a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], 0, 0, 0, 0, 0, 0, 0, 0,
        ],
        (None, None) => [0; 16],
    }
}

/// XDP counters, the index into [`MAP_XDP_COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpCounter {
    /// TCP packets to a guarded port that passed the filter.
    Passed = 0,
    /// Packets to a guarded port dropped because the source is on the deny list.
    DroppedDeny = 1,
    /// SYNs to a guarded port dropped because the source exceeded its rate.
    DroppedRate = 2,
    /// Everything else (other protocols and ports, ARP, neighbour discovery): passed untouched.
    NotGuarded = 3,
    /// Packets too short or malformed to read up to the TCP ports, and non-first fragments:
    /// passed for the stack to judge.
    Unparsed = 4,
}

impl XdpCounter {
    /// Number of counters; the length of [`MAP_XDP_COUNTERS`].
    pub const COUNT: u32 = 5;

    /// Every counter, in index order.
    pub const ALL: [XdpCounter; Self::COUNT as usize] = [
        XdpCounter::Passed,
        XdpCounter::DroppedDeny,
        XdpCounter::DroppedRate,
        XdpCounter::NotGuarded,
        XdpCounter::Unparsed,
    ];

    /// The counter's name as it appears in logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            XdpCounter::Passed => "passed",
            XdpCounter::DroppedDeny => "dropped_deny",
            XdpCounter::DroppedRate => "dropped_rate",
            XdpCounter::NotGuarded => "not_guarded",
            XdpCounter::Unparsed => "unparsed",
        }
    }
}

/// Name of the `sock_ops` program of the packet engine that records every new connection's
/// initial sequence numbers in [`MAP_PACKET_ISN`] (`docs/packet-engine.md`, section 1).
pub const PROG_PACKET_ISN: &str = "spliced_packet_isn";
/// Name of the LRU hash from a socket's cookie to its [`IsnPair`].
pub const MAP_PACKET_ISN: &str = "SPLICED_PACKET_ISN";
/// Sockets whose ISNs [`MAP_PACKET_ISN`] remembers at once (least recently used ones are
/// forgotten: a connection whose entry is gone is refused the packet engine, `no_isn`).
pub const PACKET_ISN_ENTRIES: u32 = 65_536;

/// A connection's initial sequence numbers, as one of its sockets saw them when it became
/// established: constants, from which the packet engine's sequence offsets follow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IsnPair {
    /// The ISN this socket chose (its SYN's or SYN-ACK's sequence number).
    pub local_isn: u32,
    /// The ISN the peer chose.
    pub peer_isn: u32,
}

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, two `u32`s, no padding, valid for any bit pattern.
unsafe impl aya::Pod for IsnPair {}

/// Name of the TC ingress program of the packet engine that translates the segments of
/// handed-off connections (`docs/packet-engine.md`, section 2).
pub const PROG_PACKET_IN: &str = "spliced_packet_in";
/// The TC egress program that guards spliced's local sockets of a handed-off connection
/// (`docs/packet-engine.md`, 3.3).
pub const PROG_PACKET_OUT: &str = "spliced_packet_out";
/// Name of the hash map from a [`FlowKey`] (a segment's tuple as it arrives) to its [`Flow`].
pub const MAP_PACKET_FLOWS: &str = "SPLICED_PACKET_FLOWS";
/// Name of the per-CPU array of the packet engine's counters, indexed by [`PacketCounter`].
pub const MAP_PACKET_COUNTERS: &str = "SPLICED_PACKET_COUNTERS";
/// Name of the hash map of what spliced changes in an entry after inserting it ([`FlowKey`]
/// to [`FlowControl`]).
pub const MAP_PACKET_CONTROL: &str = "SPLICED_PACKET_CONTROL";
/// Name of the ring buffer of [`IcmpEvent`]s: a Packet Too Big or "fragmentation needed"
/// about a translated segment, which spliced translates and sends (`docs/packet-engine.md`,
/// section 7).
pub const MAP_PACKET_ICMP: &str = "SPLICED_PACKET_ICMP";
/// Name of the hash map from a local socket's [`FlowKey`] (its segments' tuple reversed, as
/// the entry that will translate its peer's segments is keyed) to the [`WindowClamp`] the
/// egress program applies to the windows that socket announces, from the moment a connection
/// is offered to the engine until its drain ends (`docs/packet-engine.md`, 3.6 item 12).
pub const MAP_PACKET_CLAMP: &str = "SPLICED_PACKET_CLAMP";
/// Name of the one-element array that counts the entries of [`MAP_PACKET_CLAMP`]: the egress
/// program looks the clamp up only while it is not zero.
pub const MAP_PACKET_CLAMPING: &str = "SPLICED_PACKET_CLAMPING";
/// Connections whose windows can be clamped at once (handoffs under way); beyond, a
/// connection is offered without the clamp.
pub const PACKET_MAX_CLAMPS: u32 = 4096;
/// Connections the packet engine can hold at once; [`MAP_PACKET_FLOWS`] has two entries each.
pub const PACKET_MAX_CONNECTIONS: u32 = 65_536;

/// [`FlowKey::family`] of an IPv4 segment.
pub const FAMILY_V4: u8 = 4;
/// [`FlowKey::family`] of an IPv6 segment.
pub const FAMILY_V6: u8 = 6;

/// The tuple of a TCP segment as it arrives, the key of [`MAP_PACKET_FLOWS`]. IPv4 addresses
/// are written as `::ffff:a.b.c.d`; ports are in network order, as in the header.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source address.
    pub saddr: [u8; 16],
    /// Destination address.
    pub daddr: [u8; 16],
    /// Source port, network order.
    pub sport: u16,
    /// Destination port, network order.
    pub dport: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// Zero.
    pub _pad: [u8; 3],
}

/// [`Flow::state`]: the handoff's drain (`docs/packet-engine.md`, 3.2): new data and ACKs at
/// or past the local end are translated; old data, and pure ACKs short of the local end, reach
/// the local socket, whose own segments the egress program reconciles with the translation.
pub const FLOW_DRAIN: u8 = 0;
/// [`Flow::state`]: every segment of the tuple is translated; the local socket sees nothing
/// and sends nothing.
pub const FLOW_ACTIVE: u8 = 1;
/// [`Flow::state`]: an RST crossed this entry (set by the program); later segments of the
/// tuple are dropped until spliced removes the pair.
pub const FLOW_RESET: u8 = 2;
/// [`Flow::flags`]: both connections negotiated timestamps; `TSval` and `TSecr` are
/// translated (design 4.3).
pub const FLOW_TS_TRANSLATE: u16 = 1 << 0;
/// [`Flow::flags`]: the sender negotiated timestamps but the receiver did not; the option
/// becomes NOPs (design 4.3: only the backend's connection has them).
pub const FLOW_TS_STRIP: u16 = 1 << 1;
/// [`Flow::flags`]: the sender negotiated SACK but the receiver did not; SACK options become
/// NOPs (design 4.4).
pub const FLOW_SACK_STRIP: u16 = 1 << 2;
/// [`Flow::flags`]: only one of the two connections negotiated ECN; the ECN field of the IP
/// header and the ECE and CWR flags are cleared, so routers drop instead of marking packets
/// whose receiver would ignore the mark.
pub const FLOW_ECN_CLEAR: u16 = 1 << 3;
/// [`Flow::flags`]: spliced itself sent a FIN on the local socket this entry's segments reach
/// (rule F during the drain); the egress program lets that FIN pass (design 3.3).
pub const FLOW_LOCAL_FIN: u16 = 1 << 4;
/// [`Flow::ts_ready`]: [`Flow::tsval_delta`] is set.
pub const FLOW_TSVAL_READY: u8 = 1 << 0;
/// [`Flow::ts_ready`]: [`Flow::tsecr_delta`] is set (copied from the other entry's
/// `tsval_delta`).
pub const FLOW_TSECR_READY: u8 = 1 << 1;
/// [`Flow::dir`]: the entry translates the client's segments towards the backend.
pub const FLOW_UP: u8 = 0;
/// [`Flow::dir`]: the entry translates the backend's segments towards the client.
pub const FLOW_DOWN: u8 = 1;

/// How the segments of one [`FlowKey`] are translated into segments of the other connection
/// (`docs/packet-engine.md`, section 5).
///
/// The first part, up to [`Flow::started_ns`], is written by spliced before the entry is
/// visible and is constant (but for `state`, `ack_floor` and [`FLOW_LOCAL_FIN`], which the
/// program takes over from the entry's [`FlowControl`], and [`FLOW_RESET`]). spliced never
/// writes an entry after inserting it. The rest is written by the program that translates
/// this entry's segments (racy between CPUs: approximate where it counts, monotonic `max`
/// updates where it tracks positions).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// [`FLOW_DRAIN`], [`FLOW_ACTIVE`] or [`FLOW_RESET`].
    pub state: u8,
    /// [`FLOW_UP`] (IPv4 in, IPv6 out) or [`FLOW_DOWN`] (IPv6 in, IPv4 out).
    pub dir: u8,
    /// How options and marks are handled: [`FLOW_TS_TRANSLATE`], [`FLOW_TS_STRIP`],
    /// [`FLOW_SACK_STRIP`], [`FLOW_ECN_CLEAR`], [`FLOW_LOCAL_FIN`].
    pub flags: u16,
    /// The interface the translated segment leaves by (`bpf_redirect_neigh`).
    pub out_ifindex: u32,
    /// The translated segment's source address (IPv4 as `::ffff:a.b.c.d`).
    pub new_saddr: [u8; 16],
    /// The translated segment's destination address (IPv4 as `::ffff:a.b.c.d`).
    pub new_daddr: [u8; 16],
    /// The translated segment's source port, network order.
    pub new_sport: u16,
    /// The translated segment's destination port, network order.
    pub new_dport: u16,
    /// The IPv6 flow label of translated segments (low 20 bits; up only).
    pub flow_label: u32,
    /// Added to the sequence number.
    pub seq_delta: u32,
    /// Subtracted from the acknowledgement number (the other direction's `seq_delta`).
    pub ack_delta: u32,
    /// In the sender's space, the first byte the local socket did not take before the handoff.
    pub seq_floor: u32,
    /// In the space of the sender's ACKs, the end of what the facing local socket had sent:
    /// a translated ACK is never lower, and a pure ACK below it is dropped.
    pub ack_floor: u32,
    /// The window scale the sender uses (its window field is shifted left by it).
    pub ws_in: u8,
    /// The window scale the receiver applies to the translated window field.
    pub ws_out: u8,
    /// 1 once the client started a new connection on this entry's tuple after the
    /// connection ended (set by `spliced_packet_in` on an `E_up` entry, design 2.1): the
    /// programs no longer touch the tuple's segments, and spliced ends the connection at once.
    /// A byte of its own, not a bit of `flags`, which `adopt` also writes.
    pub superseded: u8,
    /// Zero.
    pub _pad: u8,
    /// The sender's ISN + 1, for byte counts in the access log.
    pub stream_start: u32,
    /// `tsoffset` of the local socket on the output side (L' for up, L for down): its
    /// timestamp clock is `CLOCK_MONOTONIC` in milliseconds plus this. Translated `TSval`s
    /// continue that clock (design 4.3).
    pub out_tsoffset: u32,
    /// In the sender's space, the highest ACK the facing local socket sent since the insert
    /// (its `rcv_wup`): the egress program records it, and an ACK copy (design 3.2) carries
    /// it as its sequence number, which that socket then finds in its window. spliced starts
    /// it at `seq_floor`.
    pub local_rcv_next: u32,
    /// Socket cookie of the local socket this entry's sender talks to (L for up, L' for
    /// down): the egress program tells that socket's segments from translated ones by it.
    pub local_cookie: u64,
    /// When spliced accepted the connection (`CLOCK_BOOTTIME` nanoseconds), for the access log
    /// after a restart.
    pub started_ns: u64,
    /// Added to the sender's `TSval` (set by the program on the first segment it sees with
    /// a timestamp; [`FLOW_TSVAL_READY`]).
    pub tsval_delta: u32,
    /// Subtracted from the sender's `TSecr`: the other entry's `tsval_delta`, copied once it
    /// is set ([`FLOW_TSECR_READY`]); until then a translated `TSecr` is 0.
    pub tsecr_delta: u32,
    /// [`FLOW_TSVAL_READY`] and [`FLOW_TSECR_READY`].
    pub ts_ready: u8,
    /// 1 once the sender's FIN was seen ([`Flow::fin_seq`] is set).
    pub fin_seen: u8,
    /// Zero.
    pub _pad2: [u8; 2],
    /// Sequence number of the sender's FIN, in the sender's space.
    pub fin_seq: u32,
    /// Highest `seq + len` seen from the sender (a FIN counts one), in the sender's space;
    /// spliced starts it at `seq_floor`.
    pub high_end: u32,
    /// Highest ACK seen from the sender, in the sender's ACK space (the local socket's
    /// sequence space): what the sender holds of everything sent to it. spliced starts it at
    /// the local socket's ISN + 1.
    pub peer_acked: u32,
    /// The last ACK number emitted by translation towards the receiver (its own space);
    /// spliced starts it at the receiver's ISN + 1.
    pub last_ack_out: u32,
    /// The highest `TSval` the receiver was sent, by the translation or (in `DRAIN`) by the
    /// local socket facing it; translated `TSval`s are never below it.
    pub last_tsval_out: u32,
    /// The last window field emitted by translation towards the receiver.
    pub last_win_out: u16,
    /// Zero.
    pub _pad3: [u8; 6],
    /// Bytes of the sender's stream past `seq_floor` that the program saw (a FIN counts one):
    /// the sum of the advances of `high_end`, exact across sequence wraps. With spliced's own
    /// count before the handoff, the access log's bytes.
    pub stream_bytes: u64,
    /// Segments translated (GSO aggregates count once).
    pub segments: u64,
    /// Payload bytes translated (retransmissions included).
    pub bytes: u64,
    /// When a segment of the tuple was last seen (`bpf_ktime_get_ns`).
    pub last_seen_ns: u64,
}

/// What spliced changes about an entry after inserting it, in a map of its own
/// ([`MAP_PACKET_CONTROL`], same key as the entry): a map value can only be written whole, so
/// an update of a field of [`Flow`] from user space would write back, stale, every field the
/// program changed in between (a lost `peer_acked`, `high_end` or `tsval_delta` /
/// `ts_ready`). Only spliced writes this value and only the programs write [`Flow`] after the
/// insert; `spliced_packet_in` adopts these fields into the entry while it is in
/// [`FLOW_DRAIN`], and spliced reads both (`PacketTables::get`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowControl {
    /// 1: the drain is over, the entry is to be [`FLOW_ACTIVE`] (unless it is [`FLOW_RESET`]).
    pub active: u8,
    /// 1: spliced sent a FIN on the local socket this entry's segments reach
    /// ([`FLOW_LOCAL_FIN`]).
    pub local_fin: u8,
    /// 1: spliced read the sender's FIN from the local socket ([`Flow::fin_seen`]).
    pub fin_seen: u8,
    /// Zero.
    pub _pad: u8,
    /// The FIN's sequence number when `fin_seen` is 1 ([`Flow::fin_seq`]).
    pub fin_seq: u32,
    /// Raised by rule F ([`Flow::ack_floor`]; the entry's own is the higher of the two).
    pub ack_floor: u32,
}

#[cfg(feature = "user")]
// SAFETY: `repr(C)` of integers with explicit padding; any bit pattern is valid.
unsafe impl aya::Pod for FlowControl {}

/// What `spliced_packet_in` reports of an ICMP error about a translated segment
/// ([`MAP_PACKET_ICMP`]): an ICMPv6 Packet Too Big from the backend's side (the quoted
/// segment went `p6:ep -> b6:bp`; `key` is then the backend's entry, `b6:bp -> p6:ep`) or an
/// ICMPv4 "fragmentation needed" from the client's side (quoted `p4:443 -> c4:cp`; `key` the
/// client's entry). spliced sends the peer on the other side the same message in its own
/// family, about its own segment (design section 7).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IcmpEvent {
    /// The entry whose peer sends the segments the message is about: the quoted tuple,
    /// reversed. [`FlowKey::family`] says which message it was.
    pub key: FlowKey,
    /// The MTU the message names (Packet Too Big's MTU, or the next-hop MTU).
    pub mtu: u32,
    /// The quoted segment's sequence number (host order), in the space of the connection it
    /// was translated into.
    pub quoted_seq: u32,
}

#[cfg(feature = "user")]
// SAFETY: `repr(C)`: a `FlowKey` (40 bytes) and two `u32`s, no padding.
unsafe impl aya::Pod for IcmpEvent {}

/// How far a local socket's announced window may reach while its connection is offered to the
/// engine ([`MAP_PACKET_CLAMP`]; `docs/packet-engine.md`, 3.6 item 12). The kernel never moves
/// a right edge it announced back, so a socket's own window cannot be taken back; rewritten
/// on the way out, the peer (a sender that takes the window of every ACK that advances) never
/// learns the larger one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowClamp {
    /// While `anchored` is 0: the most bytes a window may offer past its ACK. This bounds
    /// what the peer has in flight, not what the socket holds: every ACK moves the edge on.
    pub limit: u32,
    /// While `anchored` is 1: the right edge no window may pass (a sequence number in the
    /// socket's receive space), so that what the socket takes in past the freeze is bounded
    /// whether or not anybody reads it.
    pub edge: u32,
    /// The scale of the socket's window field (its `tcpi_rcv_wscale`).
    pub wscale: u8,
    /// 0: `limit` applies; 1: `edge` applies.
    pub anchored: u8,
    /// Zero.
    pub _pad: [u8; 2],
}

#[cfg(feature = "user")]
// SAFETY: `repr(C)`, two `u32`s and four bytes, no implicit padding.
unsafe impl aya::Pod for WindowClamp {}

/// The window field a local socket's segment leaves with under `clamp`: its own `field` or
/// less, never an edge past the clamp's (rounded down by the scale). An anchored edge the ACK
/// already reached gives a zero window.
pub const fn clamped_window(field: u16, ack: u32, clamp: &WindowClamp) -> u16 {
    let allowed = if clamp.anchored != 0 {
        let ahead = clamp.edge.wrapping_sub(ack);
        if (ahead as i32) <= 0 { 0 } else { ahead }
    } else {
        clamp.limit
    };
    let ws = if clamp.wscale > 14 { 14 } else { clamp.wscale };
    let allowed = allowed >> ws;
    if (field as u32) > allowed {
        allowed as u16
    } else {
        field
    }
}
#[cfg(feature = "user")]
// SAFETY: `repr(C)` of byte arrays and integers with explicit padding; any bit pattern is valid.
unsafe impl aya::Pod for FlowKey {}
#[cfg(feature = "user")]
// SAFETY: as above (no implicit padding: every field sits at a multiple of its alignment).
unsafe impl aya::Pod for Flow {}

/// The packet engine's counters, the index into [`MAP_PACKET_COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketCounter {
    /// Client segments translated towards the backend.
    TranslatedUp = 0,
    /// Backend segments translated towards the client.
    TranslatedDown = 1,
    /// Payload bytes translated towards the backend.
    TranslatedBytesUp = 2,
    /// Payload bytes translated towards the client.
    TranslatedBytesDown = 3,
    /// Segments of an entry that is not `ACTIVE`, passed to the local stack.
    PassedLocal = 4,
    /// SYNs on a tuple with an entry whose connection is not over, dropped.
    SynOnEntry = 5,
    /// Pure ACKs below the entry's `ack_floor`, dropped (old, reordered).
    OldAckDropped = 6,
    /// Segments that arrived with a TTL or hop limit of 1 or less, dropped.
    TtlExpired = 7,
    /// IPv4 fragments of a tuple with an entry, dropped.
    FragDropped = 8,
    /// IPv4 segments with a source route (or malformed options) on a tuple with an entry,
    /// dropped.
    IpOptionsDropped = 9,
    /// A helper failed half-way through a translation; the segment was dropped.
    TranslateFailed = 10,
    /// `bpf_redirect_neigh` refused the translated segment.
    RedirectFailed = 11,
    /// SACK blocks translated.
    SackBlocks = 12,
    /// IPv4 segments whose options were cut out before translation.
    IpOptionsStripped = 13,
    /// Window fields capped at 65535 because the receiver's scale is smaller than the
    /// sender's and the offered window does not fit.
    WindowSaturated = 14,
    /// IPv6 segments with extension headers on a tuple with an entry, dropped (not
    /// translated, and the local socket must not see them either).
    Ipv6ExtDropped = 15,
    /// Timestamp options turned into NOPs (towards a side that did not negotiate them).
    TimestampsStripped = 16,
    /// Segments of a tuple whose entry is `RESET`, dropped.
    ResetDropped = 17,
    /// SYNs from the local stack on a tuple with an entry (a `connect()` that picked a port
    /// a translated connection still uses), dropped.
    LocalSynDropped = 18,
    /// Segments from a local socket whose entry is `ACTIVE` or `RESET`, dropped.
    LocalDropped = 19,
    /// RSTs from a local socket in `DRAIN`, dropped.
    LocalRstDropped = 20,
    /// FINs from a local socket in `DRAIN` that spliced did not send, dropped.
    LocalFinDropped = 21,
    /// Pure ACKs from a local socket in `DRAIN` that say nothing the translation did not
    /// already say, dropped.
    LocalAckDropped = 22,
    /// Segments from a local socket in `DRAIN` whose ACK, window or `TSval` was raised to
    /// agree with the translation.
    LocalRewritten = 23,
    /// Segments from a local socket in `DRAIN` that passed (rewritten or not).
    LocalPassed = 24,
    /// Timestamp options translated.
    TimestampsTranslated = 25,
    /// Segments of a connection whose timestamps are translated without the option in the
    /// usual place (NOP, NOP, timestamp first): left untranslated.
    TimestampLayoutUnknown = 26,
    /// SACK options turned into NOPs (towards a side that did not negotiate SACK).
    SackStripped = 27,
    /// Pure ACK copies of translated segments given to the local socket in `DRAIN` (design
    /// 3.2): the ACK rode on a segment the local socket never sees, and it still owes bytes.
    AckCopies = 28,
    /// ACK copies that arrived once the drain was over, or could not be made: dropped.
    AckCopyDropped = 29,
    /// ICMPv6 Packet Too Big messages quoting a segment translated towards a backend (the
    /// tuple of an entry), reported to spliced ([`MAP_PACKET_ICMP`]) and passed on.
    IcmpPtbSeen = 30,
    /// ICMPv4 "fragmentation needed" messages quoting a segment translated towards a client,
    /// reported to spliced and passed on.
    IcmpFragNeededSeen = 31,
    /// ICMP reports that did not fit the ring buffer (spliced is not reading it).
    IcmpEventLost = 32,
    /// SYNs from a client on the tuple of a connection that ended (both FINs seen, or an
    /// RST): the client started a new connection from the same port, the entry is marked
    /// [`Flow::superseded`] and the SYN goes to the stack (design 2.1).
    SynSuperseded = 33,
    /// Segments of a local socket whose window the clamp lowered ([`WindowClamp`]).
    WindowClamped = 34,
}

impl PacketCounter {
    /// Number of counters; the length of [`MAP_PACKET_COUNTERS`].
    pub const COUNT: u32 = 35;

    /// Every counter, in index order.
    pub const ALL: [PacketCounter; Self::COUNT as usize] = [
        PacketCounter::TranslatedUp,
        PacketCounter::TranslatedDown,
        PacketCounter::TranslatedBytesUp,
        PacketCounter::TranslatedBytesDown,
        PacketCounter::PassedLocal,
        PacketCounter::SynOnEntry,
        PacketCounter::OldAckDropped,
        PacketCounter::TtlExpired,
        PacketCounter::FragDropped,
        PacketCounter::IpOptionsDropped,
        PacketCounter::TranslateFailed,
        PacketCounter::RedirectFailed,
        PacketCounter::SackBlocks,
        PacketCounter::IpOptionsStripped,
        PacketCounter::WindowSaturated,
        PacketCounter::Ipv6ExtDropped,
        PacketCounter::TimestampsStripped,
        PacketCounter::ResetDropped,
        PacketCounter::LocalSynDropped,
        PacketCounter::LocalDropped,
        PacketCounter::LocalRstDropped,
        PacketCounter::LocalFinDropped,
        PacketCounter::LocalAckDropped,
        PacketCounter::LocalRewritten,
        PacketCounter::LocalPassed,
        PacketCounter::TimestampsTranslated,
        PacketCounter::TimestampLayoutUnknown,
        PacketCounter::SackStripped,
        PacketCounter::AckCopies,
        PacketCounter::AckCopyDropped,
        PacketCounter::IcmpPtbSeen,
        PacketCounter::IcmpFragNeededSeen,
        PacketCounter::IcmpEventLost,
        PacketCounter::SynSuperseded,
        PacketCounter::WindowClamped,
    ];

    /// The counter's name as it appears in logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            PacketCounter::TranslatedUp => "translated_up",
            PacketCounter::TranslatedDown => "translated_down",
            PacketCounter::TranslatedBytesUp => "translated_bytes_up",
            PacketCounter::TranslatedBytesDown => "translated_bytes_down",
            PacketCounter::PassedLocal => "passed_local",
            PacketCounter::SynOnEntry => "syn_on_entry",
            PacketCounter::OldAckDropped => "old_ack_dropped",
            PacketCounter::TtlExpired => "ttl_expired",
            PacketCounter::FragDropped => "frag_dropped",
            PacketCounter::IpOptionsDropped => "ip_options_dropped",
            PacketCounter::TranslateFailed => "translate_failed",
            PacketCounter::RedirectFailed => "redirect_failed",
            PacketCounter::SackBlocks => "sack_blocks",
            PacketCounter::IpOptionsStripped => "ip_options_stripped",
            PacketCounter::WindowSaturated => "window_saturated",
            PacketCounter::Ipv6ExtDropped => "ipv6_ext_dropped",
            PacketCounter::TimestampsStripped => "timestamps_stripped",
            PacketCounter::ResetDropped => "reset_dropped",
            PacketCounter::LocalSynDropped => "local_syn_dropped",
            PacketCounter::LocalDropped => "local_dropped",
            PacketCounter::LocalRstDropped => "local_rst_dropped",
            PacketCounter::LocalFinDropped => "local_fin_dropped",
            PacketCounter::LocalAckDropped => "local_ack_dropped",
            PacketCounter::LocalRewritten => "local_rewritten",
            PacketCounter::LocalPassed => "local_passed",
            PacketCounter::TimestampsTranslated => "timestamps_translated",
            PacketCounter::TimestampLayoutUnknown => "timestamp_layout_unknown",
            PacketCounter::SackStripped => "sack_stripped",
            PacketCounter::AckCopies => "ack_copies",
            PacketCounter::AckCopyDropped => "ack_copy_dropped",
            PacketCounter::IcmpPtbSeen => "icmp_ptb_seen",
            PacketCounter::IcmpFragNeededSeen => "icmp_frag_needed_seen",
            PacketCounter::IcmpEventLost => "icmp_event_lost",
            PacketCounter::SynSuperseded => "syn_superseded",
            PacketCounter::WindowClamped => "window_clamped",
        }
    }
}

/// The window field to send when the sender's field `win` is scaled by `ws_in` and the
/// receiver scales the field it gets by `ws_out`: never more than the sender offered, at
/// most 65535.
pub const fn rescale_window(win: u16, ws_in: u8, ws_out: u8) -> u16 {
    let field = scaled_field(win, ws_in, ws_out);
    if field > 0xffff { 0xffff } else { field as u16 }
}

/// The window field (scale `ws_in`) of a segment whose ACK the translation raised by `raised`
/// bytes (to `ack_floor`, design 3.2): shrunk by as much, rounded down, so the right edge the
/// receiver learns stays where the sender put it (`ack + window`). Unchanged, it would move
/// the edge `raised` bytes past the sender's buffer, and a receiver that fills it gets its
/// segments dropped as beyond the window while the local socket still owes the bytes below
/// the floor.
pub const fn shrink_window(win: u16, ws_in: u8, raised: u32) -> u16 {
    let ws_in = if ws_in > 14 { 14 } else { ws_in };
    let bytes = (win as u64) << ws_in;
    let left = bytes.saturating_sub(raised as u64);
    (left >> ws_in) as u16
}

/// The window field (scale `ws_in`) of an ACK copy whose ACK was cut by `cut` bytes (down to
/// `ack_floor`, design 3.2): widened by as much, rounded down and capped at the field's
/// largest value, so the local socket still learns the right edge the sender offered
/// (`ack + window`). Unchanged, the edge would fall `cut` bytes short: the peer can
/// acknowledge past the floor bytes the translation brought it, and then sends no new ACK
/// until the local socket's last bytes arrive, which that short edge holds back (a drain
/// stalled for good under bulk both ways, docs/packet-engine.md 3.6).
pub const fn widen_window(win: u16, ws_in: u8, cut: u32) -> u16 {
    let ws_in = if ws_in > 14 { 14 } else { ws_in };
    let bytes = ((win as u64) << ws_in) + cut as u64;
    let field = bytes >> ws_in;
    if field > 0xffff { 0xffff } else { field as u16 }
}

/// Whether [`rescale_window`] had to cap the window: the sender offered more than the
/// receiver's scale can express (counted as `window_saturated`; it caps the sender's peer's
/// rate at `65535 << ws_out` bytes per round trip).
pub const fn window_saturates(win: u16, ws_in: u8, ws_out: u8) -> bool {
    scaled_field(win, ws_in, ws_out) > 0xffff
}

const fn scaled_field(win: u16, ws_in: u8, ws_out: u8) -> u64 {
    // Scales are at most 14; anything larger is treated as 14, as TCP does.
    let ws_in = if ws_in > 14 { 14 } else { ws_in };
    let ws_out = if ws_out > 14 { 14 } else { ws_out };
    ((win as u64) << ws_in) >> ws_out
}

/// The value to give a checksum helper for a 4-byte field `raw` (as it lies in memory, read
/// as a little-endian `u32`) that starts `offset` bytes into the checksummed data.
///
/// The Internet checksum adds 16-bit words counted from the start. A field at an even offset
/// contributes its two halves as they are; at an odd offset its bytes straddle three words,
/// and it contributes what the same field rotated by one byte would at an even offset. TCP
/// options need not be aligned, so SACK blocks may start at odd offsets.
pub const fn csum_word(raw: u32, offset: usize) -> u32 {
    if offset.is_multiple_of(2) {
        raw
    } else {
        raw.rotate_right(8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clamp_before_the_freeze_bounds_the_window_past_each_ack() {
        let clamp = WindowClamp {
            limit: 64 << 10,
            wscale: 7,
            ..WindowClamp::default()
        };
        // 6 MiB offered: 64 KiB is what the peer learns, whatever the ACK.
        assert_eq!(clamped_window(49152, 1000, &clamp), 512);
        assert_eq!(clamped_window(49152, u32::MAX - 5, &clamp), 512);
        // A smaller window of the socket's own stays.
        assert_eq!(clamped_window(300, 1000, &clamp), 300);
    }

    #[test]
    fn an_anchored_clamp_holds_the_right_edge_and_closes_at_it() {
        let clamp = WindowClamp {
            edge: 10 + (64 << 10),
            wscale: 7,
            anchored: 1,
            ..WindowClamp::default()
        };
        assert_eq!(clamped_window(49152, 10, &clamp), 512);
        // Every byte the socket took in since moves the edge no further: rounded down, so the
        // peer's edge (ack + field << 7) stays at or below the clamp's.
        let field = clamped_window(49152, 10 + 1000, &clamp);
        assert!(10 + 1000 + (u32::from(field) << 7) <= clamp.edge);
        assert_eq!(field, (((64 << 10) - 1000) >> 7) as u16);
        assert_eq!(clamped_window(49152, clamp.edge, &clamp), 0);
        assert_eq!(clamped_window(49152, clamp.edge + 5000, &clamp), 0);
        // Across the wrap of the sequence space.
        let wrapped = WindowClamp { edge: 100, ..clamp };
        assert_eq!(clamped_window(49152, u32::MAX - 155, &wrapped), 2);
    }

    /// RFC 1071 over `data`.
    fn checksum(data: &[u8]) -> u16 {
        let mut sum = 0u32;
        for pair in data.chunks(2) {
            let hi = u32::from(pair[0]) << 8;
            let lo = pair.get(1).map_or(0, |&b| u32::from(b));
            sum += hi | lo;
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// RFC 1624 incremental update as the kernel's `inet_proto_csum_replace4` does it (on a
    /// checksum that is complete): HC' = ~(~HC + ~m + m'), in 16-bit halves.
    fn replace4(check: u16, from: u32, to: u32) -> u16 {
        let halves = |v: u32| {
            let b = v.to_le_bytes();
            u32::from(u16::from_be_bytes([b[0], b[1]]))
                + u32::from(u16::from_be_bytes([b[2], b[3]]))
        };
        let mut sum = u32::from(!check) + (0x1fffe - halves(from)) + halves(to);
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    #[test]
    fn replacing_a_field_at_any_offset_keeps_the_checksum_right() {
        let mut data = [0u8; 41];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37) ^ 0x5a;
        }
        for offset in [2usize, 3, 4, 5, 22, 23, 36] {
            let check = checksum(&data);
            let old = u32::from_le_bytes([
                data[offset],
                data[offset + 1],
                data[offset + 2],
                data[offset + 3],
            ]);
            let new_value = u32::from_be(old).wrapping_sub(0x8765_4321).to_be();
            data[offset..offset + 4].copy_from_slice(&new_value.to_le_bytes());
            let patched = replace4(check, csum_word(old, offset), csum_word(new_value, offset));
            assert_eq!(patched, checksum(&data), "field at offset {offset}");
        }
    }

    #[test]
    fn window_rescaling_never_promises_more() {
        assert_eq!(rescale_window(1000, 7, 7), 1000);
        assert_eq!(rescale_window(1000, 7, 5), 4000);
        // 1000 << 5 = 32000 bytes; in units of 128 that is 250.
        assert_eq!(rescale_window(1000, 5, 7), 250);
        // Rounded down: 3 << 0 = 3 bytes is 0 units of 4.
        assert_eq!(rescale_window(3, 0, 2), 0);
        assert_eq!(rescale_window(0xffff, 7, 0), 0xffff);
        assert_eq!(rescale_window(0xffff, 14, 14), 0xffff);
        assert_eq!(rescale_window(1, 200, 0), 1 << 14);
        assert!(window_saturates(0x8000, 7, 6));
        assert!(!window_saturates(0x7fff, 7, 6));
        assert!(!window_saturates(0xffff, 7, 7));
    }

    #[test]
    fn a_raised_ack_keeps_the_right_edge_of_the_window() {
        // 100 units of 128 bytes, ACK raised by 1000 bytes: 11800 bytes left, 92 units.
        assert_eq!(shrink_window(100, 7, 1000), 92);
        assert_eq!(shrink_window(100, 0, 0), 100);
        assert_eq!(shrink_window(100, 0, 99), 1);
        // Raised past the whole window: closed, never wrapped.
        assert_eq!(shrink_window(10, 7, 1 << 20), 0);
        assert_eq!(shrink_window(0xffff, 14, u32::MAX), 0);
    }

    #[test]
    fn an_ack_copy_cut_to_the_floor_keeps_the_senders_right_edge() {
        // 100 << 7 + 1000 bytes = 13,800: field 107 (13,696), never past the edge.
        assert_eq!(widen_window(100, 7, 1000), 107);
        assert_eq!(widen_window(100, 0, 0), 100);
        assert_eq!(widen_window(100, 0, 99), 199);
        assert_eq!(widen_window(0, 10, 35_840), 35);
        assert_eq!(widen_window(0xfff0, 0, 1 << 20), 0xffff);
        assert_eq!(widen_window(0xffff, 14, u32::MAX), 0xffff);
    }

    #[test]
    fn map_types_have_the_designed_layout() {
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<Flow>(), 168);
        assert_eq!(size_of::<FlowControl>(), 12);
        assert_eq!(core::mem::offset_of!(Flow, local_cookie), 80);
        assert_eq!(core::mem::offset_of!(Flow, tsval_delta), 96);
        assert_eq!(core::mem::offset_of!(Flow, stream_bytes), 136);
        assert_eq!(core::mem::offset_of!(Flow, last_seen_ns), 160);
    }
}
