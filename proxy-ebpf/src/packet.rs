//! The packet engine's kernel side (`docs/packet-engine.md`).
//!
//! `spliced_packet_isn` is a `sock_ops` program attached to spliced's cgroup (v2). When a
//! connection of one of spliced's sockets becomes established it records the two initial
//! sequence numbers, keyed by the socket's cookie: the sequence offsets of a handed-off
//! connection are built from them, and they never change afterwards.
//!
//! `spliced_packet_in` is a TC ingress program: it translates each segment of a handed-off
//! connection into a segment of the other connection (section 2 of the design).
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        __sk_buff, BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_INGRESS, BPF_F_NO_PREALLOC, BPF_F_PSEUDO_HDR,
        BPF_F_RECOMPUTE_CSUM, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT,
    },
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    helpers::{bpf_csum_diff, bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_redirect_neigh},
    macros::{btf_map, classifier, sock_ops},
    programs::{SockOpsContext, TcContext},
};
use proxy_common::{
    FAMILY_V4, FAMILY_V6, FLOW_ACTIVE, FLOW_DRAIN, FLOW_ECN_CLEAR, FLOW_LOCAL_FIN, FLOW_RESET,
    FLOW_SACK_STRIP, FLOW_TS_STRIP, FLOW_TS_TRANSLATE, FLOW_TSECR_READY, FLOW_TSVAL_READY, FLOW_UP,
    Flow, FlowControl, FlowKey, IcmpEvent, IsnPair, PACKET_ISN_ENTRIES, PACKET_MAX_CLAMPS,
    PACKET_MAX_CONNECTIONS, PacketCounter, WindowClamp, clamped_window, csum_word, rescale_window,
    shrink_window, widen_window, window_saturates,
};

const ISN_ENTRIES: usize = PACKET_ISN_ENTRIES as usize;

/// Socket cookie to the connection's ISNs, written once when the socket becomes established.
#[btf_map]
static SPLICED_PACKET_ISN: LruHashMap<u64, IsnPair, ISN_ENTRIES> = LruHashMap::new();

/// Records the ISNs of every socket of the cgroup that becomes established, actively
/// (`connect`) or passively (`accept`).
///
/// `tcp_init_transfer` runs both callbacks right after the handshake, before any data can have
/// been acknowledged or consumed: there `snd_una` is the socket's own ISN plus one (its SYN was
/// just acknowledged) and `rcv_nxt` the peer's plus one (checked against `TCP_REPAIR` +
/// `TCP_QUEUE_SEQ` by `tests/tests/packet_facts.rs`). No callback flag is needed for them.
#[sock_ops]
pub fn spliced_packet_isn(ctx: SockOpsContext) -> u32 {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        // SAFETY: the context is the kernel's `struct bpf_sock_ops`; the verifier checks the
        // field reads.
        let (snd_una, rcv_nxt) = unsafe { ((*ctx.ops).snd_una, (*ctx.ops).rcv_nxt) };
        // SAFETY: the helper only reads the socket of this context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        let isn = IsnPair {
            local_isn: snd_una.wrapping_sub(1),
            peer_isn: rcv_nxt.wrapping_sub(1),
        };
        // A failed insert leaves no entry: that connection is refused the engine (`no_isn`).
        let _ = SPLICED_PACKET_ISN.insert(&cookie, &isn, 0);
    }
    // `sock_ops` programs return 1; the value is ignored for these callbacks.
    1
}

/// The translation table: a segment's tuple as it arrives to how it is rewritten. A plain
/// hash, never LRU: evicting a live entry would turn its connection into resets. Not
/// preallocated: entries are allocated as connections are handed off, so an idle table costs
/// nothing.
#[btf_map]
static SPLICED_PACKET_FLOWS: HashMap<FlowKey, Flow, FLOW_ENTRIES, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

/// What spliced changes about an entry after inserting it (same key; written only by
/// spliced, read here): `spliced_packet_in` adopts it while the entry is in `DRAIN`
/// ([`adopt`]), `spliced_packet_out` reads the FIN and the end of the drain from it.
#[btf_map]
static SPLICED_PACKET_CONTROL: HashMap<
    FlowKey,
    FlowControl,
    FLOW_ENTRIES,
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Per-CPU counters (the bpf target has no atomic read-modify-write).
#[btf_map]
static SPLICED_PACKET_COUNTERS: PerCpuArray<u64, { PacketCounter::COUNT as usize }> =
    PerCpuArray::new();

/// ICMP errors about translated segments, for spliced to translate and send (design
/// section 7): the program reports, it builds no ICMP itself. 64 KiB hold over a thousand
/// reports; spliced rate-limits what it sends per connection anyway.
#[btf_map]
static SPLICED_PACKET_ICMP: RingBuf<IcmpEvent, { 64 * 1024 }> = RingBuf::new();

/// The windows of local sockets whose connection is being offered to the engine, keyed as the
/// entry that will translate their peer's segments (design 3.6 item 12). Written only by
/// spliced.
#[btf_map]
static SPLICED_PACKET_CLAMP: HashMap<
    FlowKey,
    WindowClamp,
    { PACKET_MAX_CLAMPS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Element 0: how many entries `SPLICED_PACKET_CLAMP` holds (spliced keeps it). Other traffic
/// pays this array read on a miss in the table, and the clamp's hash lookup only while it is
/// not 0 (a handoff under way).
#[btf_map]
static SPLICED_PACKET_CLAMPING: Array<u32, 1> = Array::new();

/// The largest table (two entries per connection). spliced creates `SPLICED_PACKET_FLOWS` and
/// `SPLICED_PACKET_CONTROL` with `2 * packet.max_connections` entries instead
/// (`PacketTables::load_sized`): a full table refuses the next handoff (`table_full`).
const FLOW_ENTRIES: usize = 2 * PACKET_MAX_CONNECTIONS as usize;

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const IPV4_MAX_OPTION_BYTES: usize = 40;
/// IPv6 extension headers followed before giving up (as the XDP filter).
const MAX_EXT_HEADERS: usize = 6;
const IPOPT_END: u8 = 0;
const IPOPT_NOOP: u8 = 1;
const IPOPT_LSRR: u8 = 0x83;
const IPOPT_SSRR: u8 = 0x89;
/// `BPF_ADJ_ROOM_NET`: room is made or removed right after the network header.
const BPF_ADJ_ROOM_NET: u32 = 0;
// TCP header fields, from the start of the header.
const TCP_SEQ: usize = 4;
const TCP_ACK: usize = 8;
const TCP_FLAGS: usize = 13;
const TCP_WINDOW: usize = 14;
const TCP_CSUM: usize = 16;
const TCP_HLEN: usize = 20;
const TCP_MAX_HLEN: usize = 60;
const TCP_MAX_SACK_BLOCKS: usize = 4;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_SACK: u8 = 5;
const TCPOPT_TIMESTAMP: u8 = 8;
const TCPOLEN_TIMESTAMP: u8 = 10;
const TCPOLEN_TIMESTAMP_ALIGNED: usize = 12;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK_FLAG: u8 = 0x10;
const TCP_ECE: u8 = 0x40;
const TCP_CWR: u8 = 0x80;
/// The ECN field: the low two bits of the TOS byte or traffic class.
const IP_ECN_MASK: u8 = 0x03;

#[inline(always)]
fn count(counter: PacketCounter, by: u64) {
    if let Some(slot) = SPLICED_PACKET_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot is only touched by this CPU while the program runs.
        unsafe { *slot += by };
    }
}

/// Sequence comparison modulo 2^32, as the kernel's `before()`.
#[inline(always)]
fn before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
}

/// Sequence comparison modulo 2^32, as the kernel's `after()`.
#[inline(always)]
fn after(a: u32, b: u32) -> bool {
    before(b, a)
}

/// What the parser found in a segment that may belong to an entry.
#[derive(Default)]
struct Segment {
    key: FlowKey,
    /// Where the TCP header starts.
    l4: usize,
    /// TCP payload length, from the IP header (not the skb: a NIC may pad short frames).
    payload: u32,
    /// TTL or hop limit.
    ttl: u8,
    /// TOS or traffic class.
    tos: u8,
    /// IP header length in bytes: 20 for IPv4 without options, 40 for IPv6.
    ip_hlen: usize,
    /// IPv4 fragment bits (MF or an offset) set.
    fragment: bool,
    /// IPv6 with extension headers before TCP: only `key` is meaningful.
    ipv6_ext: bool,
}

/// The fixed part of a TCP header, and the timestamp option if it sits where Linux, the BSDs
/// and Windows put it.
#[derive(Default)]
struct Tcp {
    seq: u32,
    ack: u32,
    flags: u32,
    /// `TSval` (host order), when the options open with NOP, NOP, timestamp.
    tsval: u32,
    /// [`TS_FIXED`], [`TS_ELSEWHERE`] or 0 (no options).
    ts: u32,
}

/// [`Tcp::ts`]: the options open with NOP, NOP, timestamp.
const TS_FIXED: u32 = 1;
/// [`Tcp::ts`]: the header has options, but not a timestamp option in that place.
const TS_ELSEWHERE: u32 = 2;

/// What a translated segment told its receiver, for the entry (design 3.3: the egress program
/// keeps the local socket's segments from contradicting it).
#[derive(Default)]
struct Emitted {
    /// 1 when the segment carries an ACK (`ack` is then set).
    has_ack: u32,
    ack: u32,
    win: u16,
}

#[inline(always)]
fn read_tcp(ctx: &TcContext, l4: usize) -> Option<Tcp> {
    let h: [u8; 20] = ctx.load(l4).ok()?;
    let doff = usize::from(h[12] >> 4) * 4;
    let mut tsval = 0;
    let mut ts = 0;
    if doff >= TCP_HLEN + TCPOLEN_TIMESTAMP_ALIGNED {
        let o: [u8; 8] = ctx.load(l4 + TCP_HLEN).ok()?;
        if o[0..4] == [TCPOPT_NOP, TCPOPT_NOP, TCPOPT_TIMESTAMP, TCPOLEN_TIMESTAMP] {
            tsval = u32::from_be_bytes([o[4], o[5], o[6], o[7]]);
            ts = TS_FIXED;
        } else {
            ts = TS_ELSEWHERE;
        }
    } else if doff > TCP_HLEN {
        ts = TS_ELSEWHERE;
    }
    Some(Tcp {
        seq: u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
        ack: u32::from_be_bytes([h[8], h[9], h[10], h[11]]),
        flags: u32::from(h[13]),
        tsval,
        ts,
    })
}

/// The key of the entry that translates the other direction: this entry's translated tuple,
/// reversed.
#[inline(always)]
fn peer_key(f: &Flow) -> FlowKey {
    FlowKey {
        saddr: f.new_daddr,
        daddr: f.new_saddr,
        sport: f.new_dport,
        dport: f.new_sport,
        family: if f.dir == FLOW_UP {
            FAMILY_V6
        } else {
            FAMILY_V4
        },
        _pad: [0; 3],
    }
}

/// The other entry of the connection whose entry `f` is (under `key`): the one `peer_key(f)`
/// finds, but only if it names `key` in turn. Between spliced's two inserts, and after a
/// client reused its port, `peer_key(f)` can find another connection's entry (the client
/// entry of the connection before, superseded), whose values belong to other sockets'
/// clocks and sequence spaces (traced: a local socket's `TSval` set from one made the
/// backend's `ts_recent` another clock, and every translated segment then failed PAWS).
#[inline(always)]
fn peer_of(f: &Flow, key: &FlowKey) -> Option<*mut Flow> {
    let peer = SPLICED_PACKET_FLOWS.get_ptr_mut(&peer_key(f))?;
    // SAFETY: the entry stays valid while this program runs; only read here.
    let back = peer_key(unsafe { &*peer });
    same_key(&back, key).then_some(peer)
}

/// Field by field (a byte loop the verifier follows; no `memcmp` on this target).
#[inline(always)]
fn same_key(a: &FlowKey, b: &FlowKey) -> bool {
    if a.sport != b.sport || a.dport != b.dport || a.family != b.family {
        return false;
    }
    for i in 0..16 {
        if a.saddr[i] != b.saddr[i] || a.daddr[i] != b.daddr[i] {
            return false;
        }
    }
    true
}

/// `spliced_packet_in`: translates the segments of handed-off connections into segments of
/// the other connection and sends them out of the interface their entry names.
///
/// Everything that matches no entry, and everything the parser cannot read to the TCP ports
/// (ARP, neighbour discovery, non-TCP, truncated headers, more than 6 IPv6 extension headers,
/// VLAN tags), leaves unchanged with [`TCX_NEXT`] (the next program of the chain, or the
/// stack): one hash lookup per TCP segment is the cost to other traffic. An entry in `DRAIN` passes old data and short pure ACKs to the local socket
/// (design 3.2); `ACTIVE` translates everything; `RESET` drops.
///
/// The tracking, the decision and the timestamps are functions of their own (not inlined):
/// the verifier then explores the translation once per outcome, not once per path through
/// them (inlined, it gave up at a million instructions).
#[classifier]
pub fn spliced_packet_in(ctx: TcContext) -> i32 {
    let mut seg = Segment::default();
    if parse_apart(&ctx, &mut seg) == 0 {
        // Not TCP (or not readable as such): an ICMP error about a translated segment is
        // reported to spliced; everything goes on unchanged.
        icmp_apart(&ctx);
        return TCX_NEXT;
    }
    let Some(flow) = SPLICED_PACKET_FLOWS.get_ptr_mut(&seg.key) else {
        return TCX_NEXT;
    };
    // SAFETY: the entry stays valid while this program runs; spliced wrote its constant part
    // before inserting it. Read in place (a copy does not fit the 512-byte stack); the
    // translation reads only the constant part through `f`, the functions below write only
    // the live part.
    let f = unsafe { &*flow };
    // SAFETY: the context is the program's `__sk_buff`, readable for its whole run.
    let (mark, ifindex) = unsafe {
        let skb = ctx.as_ptr() as *const __sk_buff;
        ((*skb).mark, (*skb).ifindex)
    };
    if mark == ACK_COPY_MARK {
        ctx.set_mark(0);
        if f.state == FLOW_DRAIN && !seg.ipv6_ext && ack_copy(&ctx, &seg, flow) == 0 {
            count(PacketCounter::AckCopies, 1);
            return TC_ACT_OK;
        }
        count(PacketCounter::AckCopyDropped, 1);
        return TC_ACT_SHOT;
    }
    if f.superseded != 0 {
        // The client started a new connection on this tuple: its segments are the stack's.
        return TCX_NEXT;
    }
    let mut tcp = Tcp::default();
    let readable = if seg.ipv6_ext {
        0
    } else {
        read_tcp_apart(&ctx, seg.l4, &mut tcp)
    };
    if readable != 0
        && tcp.flags & u32::from(TCP_SYN | TCP_ACK_FLAG | TCP_RST) == u32::from(TCP_SYN)
    {
        // Design 2.1: a SYN on the tuple of a connection that is over starts a new one (as
        // a kernel's TIME_WAIT lets it); on a live one it is dropped.
        if supersede(flow, &seg.key) != 0 {
            count(PacketCounter::SynSuperseded, 1);
            return TCX_NEXT;
        }
    }
    if f.state == FLOW_RESET {
        count(PacketCounter::ResetDropped, 1);
        return TC_ACT_SHOT;
    }
    if seg.ipv6_ext {
        // Extension headers on a translated tuple: not translated (rare from a backend), and
        // the segment must not reach the silent local socket either.
        count(PacketCounter::Ipv6ExtDropped, 1);
        return TC_ACT_SHOT;
    }
    if readable == 0 {
        return TC_ACT_OK;
    }
    if tcp.flags & u32::from(TCP_SYN) != 0 {
        count(PacketCounter::SynOnEntry, 1);
        return TC_ACT_SHOT;
    }
    if f.state == FLOW_DRAIN {
        adopt(flow, &seg.key);
    }
    let news = track(flow, &tcp, seg.payload);
    if passes_to_local(flow, &tcp, seg.payload) != 0 {
        if local_ack_in_window(&ctx, seg.l4, flow, &tcp, seg.payload) != 0 {
            count(PacketCounter::TranslateFailed, 1);
            return TC_ACT_SHOT;
        }
        count(PacketCounter::PassedLocal, 1);
        return TC_ACT_OK;
    }
    if news & TRACK_LOCAL_NEEDS_ACK != 0 && f.state == FLOW_DRAIN {
        // Design 3.2: the ACK rides on a segment the local socket will not see, and that
        // socket still owes bytes below `ack_floor`. A clone of the segment, marked, comes
        // back through this program on the same interface's ingress, where `ack_copy` cuts
        // it to a pure ACK; the segment itself is translated below (the clone shares its
        // data until one of them is written, so each sees the segment as it arrived).
        ctx.set_mark(ACK_COPY_MARK);
        let cloned = ctx.clone_redirect(ifindex, u64::from(BPF_F_INGRESS));
        ctx.set_mark(mark);
        if cloned.is_err() {
            count(PacketCounter::AckCopyDropped, 1);
        }
    }
    if f.flags & FLOW_TS_TRANSLATE != 0 && timestamps(&ctx, flow, &seg.key, seg.l4, tcp.ts) != 0 {
        count(PacketCounter::TranslateFailed, 1);
        return TC_ACT_SHOT;
    }
    let mut out = Emitted::default();
    match translate_apart(&ctx, &seg, f, &mut out) {
        0 => {
            // SAFETY: as above; only this direction's program writes these counters, and a
            // lost increment between CPUs only makes them approximate.
            unsafe {
                (*flow).segments += 1;
                (*flow).bytes += u64::from(seg.payload);
                if out.has_ack != 0 {
                    (*flow).last_ack_out = out.ack;
                }
                (*flow).last_win_out = out.win;
            }
            let (segments, bytes) = if f.dir == FLOW_UP {
                (
                    PacketCounter::TranslatedUp,
                    PacketCounter::TranslatedBytesUp,
                )
            } else {
                (
                    PacketCounter::TranslatedDown,
                    PacketCounter::TranslatedBytesDown,
                )
            };
            count(segments, 1);
            count(bytes, u64::from(seg.payload));
            // SAFETY: no parameters: the kernel looks the route and neighbour up itself.
            let rc = unsafe { bpf_redirect_neigh(f.out_ifindex, core::ptr::null_mut(), 0, 0) };
            if rc as i32 != TC_ACT_REDIRECT {
                count(PacketCounter::RedirectFailed, 1);
                return TC_ACT_SHOT;
            }
            TC_ACT_REDIRECT
        }
        code if code > 0 => {
            // The counter of the reason, plus one.
            let index = (code - 1) as u32;
            if let Some(slot) = SPLICED_PACKET_COUNTERS.get_ptr_mut(index) {
                // SAFETY: as in `count`.
                unsafe { *slot += 1 };
            }
            TC_ACT_SHOT
        }
        _ => {
            // A helper failed after the segment may have been changed: it cannot go anywhere.
            count(PacketCounter::TranslateFailed, 1);
            TC_ACT_SHOT
        }
    }
}

/// [`translate`] in a frame of its own (its stack, the new IP header and the checksum
/// buffers, would add to the caller's): 0 with `out` filled when the segment is to be
/// redirected, the dropping counter's index plus one, or a negative error.
#[inline(never)]
fn translate_apart(ctx: &TcContext, seg: &Segment, f: &Flow, out: &mut Emitted) -> i64 {
    match translate(ctx, seg, f) {
        Ok(Verdict::Redirect(emitted)) => {
            *out = emitted;
            0
        }
        Ok(Verdict::Drop(counter)) => i64::from(counter as u32) + 1,
        Err(e) => {
            if e < 0 {
                e
            } else {
                -1
            }
        }
    }
}

/// [`parse`] in a frame of its own: its buffers then do not stay on the stack of
/// `spliced_packet_in` while the translation runs (the verifier adds the frames of a call
/// chain up to 512 bytes).
/// Returns 1 with `out` filled, or 0. (Plain integers and pointers across calls: the BTF the
/// linker makes of a Rust `Option` returned from a real function is refused by the kernel.)
#[inline(never)]
fn parse_apart(ctx: &TcContext, out: &mut Segment) -> u32 {
    match parse(ctx) {
        Some(seg) => {
            *out = seg;
            1
        }
        None => 0,
    }
}

const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMPV6_PKT_TOOBIG: u8 = 2;
/// The fixed part of an ICMP or ICMPv6 error, before the quoted packet.
const ICMP_HLEN: usize = 8;

/// Design section 7: an ICMPv6 Packet Too Big quoting a segment `p6:ep -> b6:bp` that has an
/// entry (`b6:bp -> p6:ep`, the backend's), or an ICMPv4 "fragmentation needed" quoting
/// `p4:443 -> c4:cp` (the client's entry `c4:cp -> p4:443`), is reported to spliced with the
/// MTU and the quoted sequence number, and counted. The message itself goes on to the stack
/// either way (the local socket of the tuple may use it). In a frame of its own, off the TCP
/// path: only packets the TCP parser gave up on come here. Returns 1 when reported.
#[inline(never)]
fn icmp_apart(ctx: &TcContext) -> u32 {
    let mut event = IcmpEvent::default();
    if icmp_error(ctx, &mut event).is_none() {
        return 0;
    }
    if SPLICED_PACKET_FLOWS.get_ptr(&event.key).is_none() {
        return 0;
    }
    count(
        if event.key.family == FAMILY_V6 {
            PacketCounter::IcmpPtbSeen
        } else {
            PacketCounter::IcmpFragNeededSeen
        },
        1,
    );
    if SPLICED_PACKET_ICMP.output(&event, 0).is_err() {
        count(PacketCounter::IcmpEventLost, 1);
        return 0;
    }
    1
}

/// Reads a Packet Too Big or a "fragmentation needed" that quotes a TCP segment into `out`:
/// the quoted tuple reversed (the key of the entry whose peer sent it), the MTU, the quoted
/// sequence number. `None` for anything else.
#[inline(always)]
fn icmp_error(ctx: &TcContext, out: &mut IcmpEvent) -> Option<()> {
    let proto = u16::from_be(ctx.load::<u16>(12).ok()?);
    let (tcp_at, quoted_src, quoted_dst, mtu, family) = if proto == ETH_P_IPV6 {
        let head: [u8; 8] = ctx.load(ETH_HLEN).ok()?;
        if head[0] >> 4 != 6 || head[6] != IPPROTO_ICMPV6 {
            return None;
        }
        let icmp: [u8; ICMP_HLEN] = ctx.load(ETH_HLEN + IPV6_HLEN).ok()?;
        if icmp[0] != ICMPV6_PKT_TOOBIG || icmp[1] != 0 {
            return None;
        }
        let quoted = ETH_HLEN + IPV6_HLEN + ICMP_HLEN;
        // Quoted: version, next header 6 (no extension headers: translation sends none).
        let q: [u8; 8] = ctx.load(quoted).ok()?;
        if q[0] >> 4 != 6 || q[6] != IPPROTO_TCP {
            return None;
        }
        let src: [u8; 16] = ctx.load(quoted + 8).ok()?;
        let dst: [u8; 16] = ctx.load(quoted + 24).ok()?;
        let mtu = u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]);
        (quoted + IPV6_HLEN, src, dst, mtu, FAMILY_V6)
    } else if proto == ETH_P_IP {
        let h: [u8; IPV4_HLEN] = ctx.load(ETH_HLEN).ok()?;
        let ihl = usize::from(h[0] & 0x0f) * 4;
        if h[0] >> 4 != 4 || ihl < IPV4_HLEN || h[9] != IPPROTO_ICMP {
            return None;
        }
        // A fragment (MF or an offset) is not read.
        if u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0 {
            return None;
        }
        let icmp: [u8; ICMP_HLEN] = ctx.load(ETH_HLEN + ihl).ok()?;
        if icmp[0] != ICMP_DEST_UNREACH || icmp[1] != ICMP_FRAG_NEEDED {
            return None;
        }
        let quoted = ETH_HLEN + ihl + ICMP_HLEN;
        let q: [u8; IPV4_HLEN] = ctx.load(quoted).ok()?;
        let qihl = usize::from(q[0] & 0x0f) * 4;
        if q[0] >> 4 != 4 || qihl < IPV4_HLEN || q[9] != IPPROTO_TCP {
            return None;
        }
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        src[10] = 0xff;
        src[11] = 0xff;
        dst[10] = 0xff;
        dst[11] = 0xff;
        src[12..16].copy_from_slice(&q[12..16]);
        dst[12..16].copy_from_slice(&q[16..20]);
        let mtu = u32::from(u16::from_be_bytes([icmp[6], icmp[7]]));
        (quoted + qihl, src, dst, mtu, FAMILY_V4)
    } else {
        return None;
    };
    // Ports and sequence number: the 8 bytes every ICMP error quotes at least.
    let t: [u8; 8] = ctx.load(tcp_at).ok()?;
    out.key = FlowKey {
        saddr: quoted_dst,
        daddr: quoted_src,
        sport: u16::from_ne_bytes([t[2], t[3]]),
        dport: u16::from_ne_bytes([t[0], t[1]]),
        family,
        _pad: [0; 3],
    };
    out.mtu = mtu;
    out.quoted_seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
    Some(())
}

/// [`read_tcp`] in a frame of its own, as [`parse_apart`].
#[inline(never)]
fn read_tcp_apart(ctx: &TcContext, l4: usize, out: &mut Tcp) -> u32 {
    match read_tcp(ctx, l4) {
        Some(tcp) => {
            *out = tcp;
            1
        }
        None => 0,
    }
}

/// Design 2.1: a client's SYN (no ACK, no RST) on the client's entry (`E_up`) of a
/// connection that is over (either entry `RESET`, or both FINs seen) means the client closed
/// its socket and opened a new connection from the same port. The entry is marked
/// [`Flow::superseded`] and the SYN goes to the stack: from then on neither program touches
/// the tuple, and spliced's sweeper ends the old connection at once. Returns 1 when it did;
/// 0 (the SYN is dropped as before) on a backend's entry or a connection still going. A FIN
/// spliced recorded in the control value and the entry has not adopted yet counts as seen.
#[inline(never)]
fn supersede(flow: *mut Flow, key: &FlowKey) -> u32 {
    // SAFETY: as in `track`.
    let f = unsafe { &*flow };
    if f.dir != FLOW_UP {
        return 0;
    }
    let peer_key = peer_key(f);
    let Some(peer) = peer_of(f, key) else {
        return 0;
    };
    // SAFETY: the peer entry stays valid while this program runs; only read.
    let (peer_state, peer_fin) = unsafe { ((*peer).state, (*peer).fin_seen) };
    let over = f.state == FLOW_RESET
        || peer_state == FLOW_RESET
        || (fin_recorded(f.fin_seen, key) && fin_recorded(peer_fin, &peer_key));
    if !over {
        return 0;
    }
    // SAFETY: as in `track`; a plain byte store, read by both programs and spliced.
    unsafe { (*flow).superseded = 1 };
    1
}

/// Whether the sender of the entry `key` sent its FIN: the entry saw it (`seen`), or spliced
/// recorded it in the control value (design 3.4 step 4) and no segment adopted it yet.
#[inline(always)]
fn fin_recorded(seen: u8, key: &FlowKey) -> bool {
    if seen != 0 {
        return true;
    }
    // SAFETY: the control value stays valid while this program runs; only read.
    SPLICED_PACKET_CONTROL
        .get_ptr(key)
        .is_some_and(|c| unsafe { (*c).fin_seen } != 0)
}

/// [`track`]'s result: the segment's ACK is news to the local socket facing the sender (it
/// is past every ACK seen before, and the highest before it was short of `ack_floor`).
const TRACK_LOCAL_NEEDS_ACK: u32 = 1;

/// The mark of an ACK copy on its way back into `spliced_packet_in` (ASCII "SPAK"). Other
/// traffic with this mark on the programs' interfaces is not looked at differently unless
/// its tuple has an entry.
const ACK_COPY_MARK: u32 = 0x5350_414b;

/// Design 3.2 step 4 and section 5, for every segment of the tuple, passed or translated:
/// the sender's stream end and bytes (a FIN counts one), its FIN, the highest ACK it sent,
/// when it was last seen, and the timestamp delta on the first timestamp seen. Returns
/// [`TRACK_LOCAL_NEEDS_ACK`] or 0.
#[inline(never)]
fn track(flow: *mut Flow, tcp: &Tcp, payload: u32) -> u32 {
    let fin = tcp.flags & u32::from(TCP_FIN) != 0;
    let end = tcp.seq.wrapping_add(payload).wrapping_add(u32::from(fin));
    // SAFETY: the entry stays valid while this program runs. Monotonic updates of the live
    // part, by the program of this direction only; a race between CPUs loses at most one
    // `max` step, which the next segment makes up.
    unsafe {
        let now = bpf_ktime_get_ns();
        let high_end = (*flow).high_end;
        if after(end, high_end) {
            (*flow).stream_bytes += u64::from(end.wrapping_sub(high_end));
            (*flow).high_end = end;
        }
        if fin && (*flow).fin_seen == 0 {
            (*flow).fin_seq = tcp.seq.wrapping_add(payload);
            (*flow).fin_seen = 1;
        }
        let mut news = 0;
        if tcp.flags & u32::from(TCP_ACK_FLAG) != 0 && after(tcp.ack, (*flow).peer_acked) {
            if before((*flow).peer_acked, (*flow).ack_floor) {
                news = TRACK_LOCAL_NEEDS_ACK;
            }
            (*flow).peer_acked = tcp.ack;
        }
        (*flow).last_seen_ns = now;
        if (*flow).flags & FLOW_TS_TRANSLATE != 0
            && (*flow).ts_ready & FLOW_TSVAL_READY == 0
            && tcp.ts == TS_FIXED
        {
            // Continue the clock of the local socket on the output side: its next TSval
            // would have been at least this (design 4.3).
            let clock = ((now / 1_000_000) as u32).wrapping_add((*flow).out_tsoffset);
            (*flow).tsval_delta = clock.wrapping_add(1).wrapping_sub(tcp.tsval);
            (*flow).ts_ready |= FLOW_TSVAL_READY;
        }
        news
    }
}

/// In `DRAIN`, takes over what spliced changed in the entry's [`FlowControl`]: the raised
/// `ack_floor`, a FIN spliced read from the local socket, and the end of the drain (`ACTIVE`,
/// after which spliced changes nothing). Every field only moves one way and the control value
/// is replaced whole, so CPUs adopting at once write the same values (a CPU that read the
/// value before a raise writes a lower floor at worst until the next segment).
#[inline(never)]
fn adopt(flow: *mut Flow, key: &FlowKey) -> u32 {
    let Some(control) = SPLICED_PACKET_CONTROL.get_ptr(key) else {
        return 0;
    };
    // SAFETY: the control value stays valid while this program runs; it is only read.
    let c = unsafe { &*control };
    // SAFETY: as in `track`.
    unsafe {
        if after(c.ack_floor, (*flow).ack_floor) {
            (*flow).ack_floor = c.ack_floor;
        }
        if c.fin_seen != 0 && (*flow).fin_seen == 0 {
            (*flow).fin_seq = c.fin_seq;
            (*flow).fin_seen = 1;
        }
        if c.local_fin != 0 {
            (*flow).flags |= FLOW_LOCAL_FIN;
        }
        if c.active != 0 && (*flow).state == FLOW_DRAIN {
            (*flow).state = FLOW_ACTIVE;
        }
    }
    0
}

/// Design 3.2: in `DRAIN`, a segment the local socket must see (1) rather than the
/// translation (0): data and FINs wholly below `seq_floor`, pure ACKs short of `ack_floor`.
/// An RST is translated, and sets the entry `RESET` (in any state).
#[inline(never)]
fn passes_to_local(flow: *mut Flow, tcp: &Tcp, payload: u32) -> u32 {
    // SAFETY: as in `track`.
    let f = unsafe { &*flow };
    if tcp.flags & u32::from(TCP_RST) != 0 {
        // SAFETY: as in `track`.
        unsafe { (*flow).state = FLOW_RESET };
        return 0;
    }
    if f.state == FLOW_ACTIVE {
        return 0;
    }
    let fin = tcp.flags & u32::from(TCP_FIN) != 0;
    let pass = if payload > 0 || fin {
        let end = tcp.seq.wrapping_add(payload).wrapping_add(u32::from(fin));
        !after(end, f.seq_floor)
    } else {
        tcp.flags & u32::from(TCP_ACK_FLAG) == 0 || before(tcp.ack, f.ack_floor)
    };
    u32::from(pass)
}

/// Design 3.2: a pure ACK that passes to the local socket in `DRAIN` carries the sequence
/// number an ACK copy would (`local_rcv_next`, never below `seq_floor`). The sender's own,
/// its next byte, is past everything the translation carried since the insert, and once that
/// is more than the local socket's receive window the socket drops the ACK as beyond it
/// (`tcp_sequence`): under bulk both ways the client's duplicate ACKs for L's retransmissions
/// never reached L, which kept retransmitting bytes the client held (docs 3.6, traced).
/// Returns non-zero when a helper failed.
#[inline(never)]
fn local_ack_in_window(
    ctx: &TcContext,
    l4: usize,
    flow: *mut Flow,
    tcp: &Tcp,
    payload: u32,
) -> i64 {
    // SAFETY: as in `track`; only read.
    let f = unsafe { &*flow };
    if payload != 0
        || f.state != FLOW_DRAIN
        || tcp.flags & u32::from(TCP_ACK_FLAG | TCP_FIN | TCP_SYN | TCP_RST)
            != u32::from(TCP_ACK_FLAG)
    {
        return 0;
    }
    let seq = local_ack_seq(f);
    if seq == tcp.seq {
        return 0;
    }
    let (old, new) = (tcp.seq.to_be(), seq.to_be());
    if ctx
        .l4_csum_replace(l4 + TCP_CSUM, u64::from(old), u64::from(new), 4)
        .is_err()
        || ctx.store(l4 + TCP_SEQ, &new, 0).is_err()
    {
        return -1;
    }
    0
}

/// The sequence number of a pure ACK for the local socket in `DRAIN` (an ACK copy, or a
/// peer's ACK that passes to it): the last ACK that socket sent (`local_rcv_next`), never
/// below `seq_floor`, so the socket finds it in its window (`tcp_sequence`).
#[inline(always)]
fn local_ack_seq(f: &Flow) -> u32 {
    if after(f.local_rcv_next, f.seq_floor) {
        f.local_rcv_next
    } else {
        f.seq_floor
    }
}

/// Design 3.2, the ACK copy: a clone of a segment whose ACK the local socket needs (marked
/// [`ACK_COPY_MARK`] by this program a moment ago, see `spliced_packet_in`) becomes a pure
/// ACK for that socket: the payload is cut, FIN/PSH/URG/ECN flags are cleared, the ACK is
/// at most `ack_floor` (what lies above is the translation's; the window then grows by the
/// bytes cut, `widen_window`, so the right edge stays the sender's), and the sequence number
/// is the last ACK the socket sent (`local_rcv_next`, never below `seq_floor`), so the socket
/// finds it inside its window (`tcp_sequence`) and processes the ACK. Timestamps and SACK
/// blocks are the sender's own, in the local socket's spaces already.
/// Returns 0 when the copy may go to the stack.
#[inline(never)]
fn ack_copy(ctx: &TcContext, seg: &Segment, flow: *mut Flow) -> u32 {
    // SAFETY: as in `track`; only read.
    let f = unsafe { &*flow };
    u32::from(make_ack_copy(ctx, seg, f).is_err())
}

#[inline(always)]
fn make_ack_copy(ctx: &TcContext, seg: &Segment, f: &Flow) -> Result<(), i64> {
    let l4 = seg.l4;
    let h: [u8; TCP_HLEN] = ctx.load(l4)?;
    let doff = usize::from(h[12] >> 4) * 4;
    if !(TCP_HLEN..=TCP_MAX_HLEN).contains(&doff) || h[13] & TCP_ACK_FLAG == 0 {
        return Err(-1);
    }
    let raw_ack = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
    let raw_win = u16::from_be_bytes([h[14], h[15]]);
    let (ack, win) = if after(raw_ack, f.ack_floor) {
        let cut = raw_ack.wrapping_sub(f.ack_floor);
        (f.ack_floor, widen_window(raw_win, f.ws_in, cut))
    } else {
        (raw_ack, raw_win)
    };
    let seq = local_ack_seq(f);
    // Linearizes, unclones and trims (`__bpf_skb_change_tail`); `skb->csum` follows for
    // CHECKSUM_COMPLETE, and every store below recomputes it as well.
    ctx.change_tail((l4 + doff) as u32, 0)?;
    let recompute = u64::from(BPF_F_RECOMPUTE_CSUM);
    let tcp_len = doff as u16;
    if seg.key.family == FAMILY_V4 {
        // Total length, identification, fragment word, TTL and protocol, and the header
        // checksum, stored at once: the checksum follows the length (RFC 1624).
        let mut w: [u8; 10] = ctx.load(ETH_HLEN + 2)?;
        let old_len = u16::from_be_bytes([w[0], w[1]]);
        let new_len = seg.ip_hlen as u16 + tcp_len;
        let old_check = u16::from_be_bytes([w[8], w[9]]);
        let mut sum = u32::from(!old_check) + u32::from(!old_len) + u32::from(new_len);
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        let check = !(sum as u16);
        w[0..2].copy_from_slice(&new_len.to_be_bytes());
        w[8..10].copy_from_slice(&check.to_be_bytes());
        ctx.store(ETH_HLEN + 2, &w, recompute)?;
    } else {
        ctx.store(ETH_HLEN + 4, &tcp_len.to_be(), recompute)?;
    }
    let mut head = [0u8; 12];
    head[0..4].copy_from_slice(&seq.to_be_bytes());
    head[4..8].copy_from_slice(&ack.to_be_bytes());
    head[8] = h[12];
    head[9] = TCP_ACK_FLAG;
    head[10..12].copy_from_slice(&win.to_be_bytes());
    ctx.store(l4 + TCP_SEQ, &head, recompute)?;
    // The checksum, whole: the pseudo-header, then the header with the checksum field as 0.
    let mut sum = u64::from(tcp_len) + u64::from(IPPROTO_TCP);
    let (from, words) = if seg.key.family == FAMILY_V4 {
        (12, 2)
    } else {
        (0, 8)
    };
    for i in 0..8 {
        if i < words {
            let j = from + i * 2;
            sum += u64::from(u16::from_be_bytes([seg.key.saddr[j], seg.key.saddr[j + 1]]));
            sum += u64::from(u16::from_be_bytes([seg.key.daddr[j], seg.key.daddr[j + 1]]));
        }
    }
    for i in 0..TCP_MAX_HLEN / 4 {
        if i * 4 >= doff {
            break;
        }
        let w = u32::from_be(ctx.load::<u32>(l4 + i * 4)?);
        if i * 4 == TCP_CSUM {
            // The checksum is the word's upper half; the urgent pointer the lower.
            sum += u64::from(w & 0xffff);
        } else {
            sum += u64::from(w >> 16) + u64::from(w & 0xffff);
        }
    }
    // At most 38 words of 16 bits: two folds leave 17 bits at most, the third none.
    for _ in 0..3 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let check = (!(sum as u16)).to_be();
    ctx.store(l4 + TCP_CSUM, &check, recompute)?;
    Ok(())
}

/// Design 4.3, on a segment about to be translated: `TSval + tsval_delta`, and
/// `TSecr - tsecr_delta` or 0 while the other direction's delta is not known yet (0 stays 0).
/// Only the option opening the options as NOP, NOP, timestamp is translated; elsewhere it is
/// counted and left. Returns non-zero when a helper failed.
#[inline(never)]
fn timestamps(ctx: &TcContext, flow: *mut Flow, key: &FlowKey, l4: usize, ts: u32) -> i64 {
    if ts == TS_ELSEWHERE {
        count(PacketCounter::TimestampLayoutUnknown, 1);
    }
    if ts != TS_FIXED {
        return 0;
    }
    let at = l4 + TCP_HLEN + 4;
    let Ok(old) = ctx.load::<[u32; 2]>(at) else {
        return -1;
    };
    // SAFETY: as in `track`.
    let f = unsafe { &*flow };
    let mut tsval = u32::from_be(old[0]).wrapping_add(f.tsval_delta);
    // Never behind what this receiver last got, from the translation or from the local
    // socket (`spliced_packet_out` records the local socket's TSvals here too): a translated
    // segment the sender stamped a few ms before the local socket's last one would fail PAWS
    // at the receiver once that one set `ts_recent` (design 4.3, the handoff's two clocks).
    if f.last_tsval_out != 0 && before(tsval, f.last_tsval_out) {
        tsval = f.last_tsval_out;
    }
    let tsecr = translate_tsecr(flow, key, u32::from_be(old[1]));
    let new = [tsval.to_be(), tsecr.to_be()];
    let csum = l4 + TCP_CSUM;
    if ctx
        .l4_csum_replace(csum, u64::from(old[0]), u64::from(new[0]), 4)
        .is_err()
        || ctx
            .l4_csum_replace(csum, u64::from(old[1]), u64::from(new[1]), 4)
            .is_err()
        || ctx.store(at, &new, 0).is_err()
    {
        return -1;
    }
    // SAFETY: as in `track`; a race between CPUs may lower it by the few ms between their
    // segments, which the next segment makes up.
    unsafe { (*flow).last_tsval_out = tsval };
    count(PacketCounter::TimestampsTranslated, 1);
    0
}

/// `TSecr - tsecr_delta`, where `tsecr_delta` is the other entry's `tsval_delta` (the receiver
/// echoes values that direction's translation made); 0 until that is known, and 0 stays 0.
/// A `TSecr` of 0 only costs the receiver one RTT sample (design 4.3).
#[inline(always)]
fn translate_tsecr(flow: *mut Flow, key: &FlowKey, tsecr: u32) -> u32 {
    if tsecr == 0 {
        return 0;
    }
    // SAFETY: as in `track`.
    let f = unsafe { &*flow };
    if f.ts_ready & FLOW_TSECR_READY != 0 {
        return tsecr.wrapping_sub(f.tsecr_delta);
    }
    let Some(peer) = peer_of(f, key) else {
        return 0;
    };
    // SAFETY: the peer entry stays valid while this program runs; `tsval_delta` is written
    // before `ts_ready` by its own program, and a torn read only yields one wrong TSecr, which
    // the receiver's RTT filter rejects.
    let (ready, delta) = unsafe { ((*peer).ts_ready, (*peer).tsval_delta) };
    if ready & FLOW_TSVAL_READY == 0 {
        return 0;
    }
    // SAFETY: as in `track`.
    unsafe {
        (*flow).tsecr_delta = delta;
        (*flow).ts_ready |= FLOW_TSECR_READY;
    }
    tsecr.wrapping_sub(delta)
}

/// The verdict for a segment that is none of our business: `TCX_NEXT` under tcx, the next
/// program attached to the hook runs, and after the last one the segment goes on as with
/// `TCX_PASS` (`tcx_run` / `tcx_action_code`, `net/core/dev.c`); the same value is
/// `TC_ACT_UNSPEC` for a clsact filter. `TC_ACT_OK` (`TCX_PASS`) would end the chain, and a
/// program attached after ours (another spliced during an upgrade, any other tool) would
/// never see other traffic.
const TCX_NEXT: i32 = -1;

enum Verdict {
    Redirect(Emitted),
    Drop(PacketCounter),
}

/// `spliced_packet_out`: guards the local sockets of a handed-off connection (design 3.3).
///
/// A segment is the local stack's own when its socket's cookie is the `local_cookie` of the
/// entry found by its tuple reversed: translated segments carry the sending socket of another
/// namespace or none (design, section 11 item 5), never L or L'. A SYN on such a tuple is
/// dropped whoever sends it (translation never emits one). In `DRAIN` the local socket's
/// segments are made to agree with what the translation already told the peer; in `ACTIVE`
/// and `RESET` they are dropped. While a connection is offered (no entry yet, and through
/// `DRAIN`) its local sockets' windows are clamped (design 3.6 item 12). Everything else
/// leaves untouched.
#[classifier]
pub fn spliced_packet_out(ctx: TcContext) -> i32 {
    let Some(seg) = parse(&ctx) else {
        return TCX_NEXT;
    };
    if seg.ipv6_ext || seg.fragment {
        return TCX_NEXT;
    }
    let key = FlowKey {
        saddr: seg.key.daddr,
        daddr: seg.key.saddr,
        sport: seg.key.dport,
        dport: seg.key.sport,
        family: seg.key.family,
        _pad: [0; 3],
    };
    let Some(entry) = SPLICED_PACKET_FLOWS.get_ptr_mut(&key) else {
        // A connection being offered: its local sockets' windows are clamped until the
        // entries exist (and through the drain, below).
        if clamping()
            && let Some(tcp) = read_tcp(&ctx, seg.l4)
            && clamp_window(&ctx, seg.l4, &tcp, &key).is_err()
        {
            count(PacketCounter::TranslateFailed, 1);
            return TC_ACT_SHOT;
        }
        return TCX_NEXT;
    };
    // SAFETY: the entry stays valid while this program runs; only `local_rcv_next` is
    // written here.
    let e = unsafe { &*entry };
    if e.superseded != 0 {
        // The client's new connection on this tuple (design 2.1): the stack's own segments,
        // its SYN-ACK first, leave untouched.
        return TCX_NEXT;
    }
    let Some(tcp) = read_tcp(&ctx, seg.l4) else {
        return TC_ACT_OK;
    };
    if tcp.flags & u32::from(TCP_SYN) != 0 {
        count(PacketCounter::LocalSynDropped, 1);
        return TC_ACT_SHOT;
    }
    // SAFETY: the helper only reads the skb's socket.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if cookie != e.local_cookie {
        return TCX_NEXT;
    }
    // spliced's changes since the insert (the entry has them only once a segment of the
    // other side came by).
    let (active, local_fin) = match SPLICED_PACKET_CONTROL.get_ptr(&key) {
        // SAFETY: as above; only spliced writes it.
        Some(c) => unsafe { ((*c).active != 0, (*c).local_fin != 0) },
        None => (false, false),
    };
    if e.state != FLOW_DRAIN || active {
        count(PacketCounter::LocalDropped, 1);
        return TC_ACT_SHOT;
    }
    if tcp.flags & u32::from(TCP_RST) != 0 {
        count(PacketCounter::LocalRstDropped, 1);
        return TC_ACT_SHOT;
    }
    if tcp.flags & u32::from(TCP_ACK_FLAG) != 0 && after(tcp.ack, e.local_rcv_next) {
        // The socket's `rcv_wup` (`tcp_select_window` sets it to `rcv_nxt` as the ACK
        // leaves): the sequence number an ACK copy for it carries (`ack_copy`). Only this
        // socket's segments write it, under the socket's lock.
        // SAFETY: as above.
        unsafe { (*entry).local_rcv_next = tcp.ack };
    }
    let fin = tcp.flags & u32::from(TCP_FIN) != 0;
    if fin && e.flags & FLOW_LOCAL_FIN == 0 && !local_fin {
        count(PacketCounter::LocalFinDropped, 1);
        return TC_ACT_SHOT;
    }
    // What the translation last told this segment's receiver: the entry of the other
    // direction.
    let Some(peer) = peer_of(e, &key) else {
        count(PacketCounter::LocalPassed, 1);
        return TC_ACT_OK;
    };
    // SAFETY: as above.
    let p = unsafe { &*peer };
    // The socket's own window, where it goes out (an ACK newer than the translation's), stays
    // within the clamp: a peer given the socket's full window in the drain would send past
    // what the far peer can take while the socket still delivers what it holds.
    if clamping() && clamp_window(&ctx, seg.l4, &tcp, &key).is_err() {
        count(PacketCounter::TranslateFailed, 1);
        return TC_ACT_SHOT;
    }
    match reconcile(&ctx, seg.l4, e, p, &tcp, seg.payload == 0 && !fin) {
        Ok(Some(changed)) => {
            if changed {
                count(PacketCounter::LocalRewritten, 1);
            }
            count(PacketCounter::LocalPassed, 1);
            TC_ACT_OK
        }
        Ok(None) => {
            count(PacketCounter::LocalAckDropped, 1);
            TC_ACT_SHOT
        }
        Err(_) => {
            count(PacketCounter::TranslateFailed, 1);
            TC_ACT_SHOT
        }
    }
}

/// Whether any local socket's window is clamped now.
#[inline(always)]
fn clamping() -> bool {
    SPLICED_PACKET_CLAMPING.get(0).is_some_and(|n| *n != 0)
}

/// Lowers the window field of a local socket's segment (tuple reversed: `key`) to what its
/// clamp allows, if it has one (design 3.6 item 12). SYNs and RSTs keep theirs.
#[inline(always)]
fn clamp_window(ctx: &TcContext, l4: usize, tcp: &Tcp, key: &FlowKey) -> Result<(), i64> {
    if tcp.flags & u32::from(TCP_SYN | TCP_RST) != 0 || tcp.flags & u32::from(TCP_ACK_FLAG) == 0 {
        return Ok(());
    }
    let Some(clamp) = SPLICED_PACKET_CLAMP.get_ptr(key) else {
        return Ok(());
    };
    // SAFETY: the value stays valid while this program runs; only spliced writes it.
    let clamp = unsafe { &*clamp };
    let old: u16 = ctx.load(l4 + TCP_WINDOW)?;
    let win = clamped_window(u16::from_be(old), tcp.ack, clamp);
    if win == u16::from_be(old) {
        return Ok(());
    }
    let new = win.to_be();
    ctx.l4_csum_replace(l4 + TCP_CSUM, u64::from(old), u64::from(new), 2)?;
    ctx.store(l4 + TCP_WINDOW, &new, 0)?;
    count(PacketCounter::WindowClamped, 1);
    Ok(())
}

/// A local socket's segment in `DRAIN`, made to agree with the translation towards the same
/// receiver (`p`'s `last_*_out`): the ACK never goes back (and takes the translation's window
/// with it), the `TSval` never goes back (PAWS), and a pure ACK that says nothing new is
/// dropped (`None`). `Some(true)` when something was rewritten.
#[inline(always)]
fn reconcile(
    ctx: &TcContext,
    l4: usize,
    e: &Flow,
    p: &Flow,
    tcp: &Tcp,
    pure_ack: bool,
) -> Result<Option<bool>, i64> {
    let csum = l4 + TCP_CSUM;
    let mut changed = false;
    let mut ack = tcp.ack;
    if tcp.flags & u32::from(TCP_ACK_FLAG) != 0 && before(tcp.ack, p.last_ack_out) {
        ack = p.last_ack_out;
        if pure_ack {
            return Ok(None);
        }
        let old = tcp.ack.to_be();
        let new = ack.to_be();
        ctx.l4_csum_replace(csum, u64::from(old), u64::from(new), 4)?;
        ctx.store(l4 + TCP_ACK, &new, 0)?;
        let old_win: u16 = ctx.load(l4 + TCP_WINDOW)?;
        let win = p.last_win_out.to_be();
        ctx.l4_csum_replace(csum, u64::from(old_win), u64::from(win), 2)?;
        ctx.store(l4 + TCP_WINDOW, &win, 0)?;
        changed = true;
    }
    if pure_ack && !after(ack, p.last_ack_out) {
        return Ok(None);
    }
    // The `TSval` is the translation's last one, whether the local socket's clock is behind
    // it or ahead: behind, the receiver would drop the segment by PAWS; ahead, it would move
    // the receiver's `ts_recent` past the translated segments still on their way, stamped
    // by the far peer before this one and delayed on a loaded CPU, and those would fail PAWS
    // (design 4.3; traced: a retransmitted burst 3 ms behind a local pure ACK).
    if e.flags & FLOW_TS_TRANSLATE != 0
        && p.last_tsval_out != 0
        && tcp.ts == TS_FIXED
        && tcp.tsval != p.last_tsval_out
    {
        let at = l4 + TCP_HLEN + 4;
        let old = tcp.tsval.to_be();
        let new = p.last_tsval_out.to_be();
        ctx.l4_csum_replace(csum, u64::from(old), u64::from(new), 4)?;
        ctx.store(at, &new, 0)?;
        changed = true;
    }
    Ok(Some(changed))
}

/// Reads the headers up to the TCP ports; `None` for anything that is not a TCP segment this
/// program can read.
#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Segment> {
    let proto = u16::from_be(ctx.load::<u16>(12).ok()?);
    let mut key = FlowKey::default();
    let (l4, payload, ttl, tos, ip_hlen, fragment) = if proto == ETH_P_IP {
        let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
        if vihl >> 4 != 4 || ctx.load::<u8>(ETH_HLEN + 9).ok()? != IPPROTO_TCP {
            return None;
        }
        let ihl = usize::from(vihl & 0x0f) * 4;
        if ihl < IPV4_HLEN {
            return None;
        }
        let tos: u8 = ctx.load(ETH_HLEN + 1).ok()?;
        let tot_len = u16::from_be(ctx.load::<u16>(ETH_HLEN + 2).ok()?);
        let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + 6).ok()?) & 0x3fff;
        if frag & 0x1fff != 0 {
            // A non-first fragment has no TCP header.
            return None;
        }
        let ttl: u8 = ctx.load(ETH_HLEN + 8).ok()?;
        let addrs: [u8; 8] = ctx.load(ETH_HLEN + 12).ok()?;
        key.saddr[10] = 0xff;
        key.saddr[11] = 0xff;
        key.daddr[10] = 0xff;
        key.daddr[11] = 0xff;
        key.saddr[12..16].copy_from_slice(&addrs[0..4]);
        key.daddr[12..16].copy_from_slice(&addrs[4..8]);
        key.family = FAMILY_V4;
        let l4 = ETH_HLEN + ihl;
        let doff = usize::from(ctx.load::<u8>(l4 + 12).ok()? >> 4) * 4;
        let payload = usize::from(tot_len).saturating_sub(ihl + doff);
        (l4, payload, ttl, tos, ihl, frag != 0)
    } else if proto == ETH_P_IPV6 {
        let head: [u8; 8] = ctx.load(ETH_HLEN).ok()?;
        if head[0] >> 4 != 6 {
            return None;
        }
        let tos = (head[0] << 4) | (head[1] >> 4);
        let payload_len = usize::from(u16::from_be_bytes([head[4], head[5]]));
        key.saddr = ctx.load(ETH_HLEN + 8).ok()?;
        key.daddr = ctx.load(ETH_HLEN + 24).ok()?;
        key.family = FAMILY_V6;
        if head[6] != IPPROTO_TCP {
            // Extension headers: only the tuple is read, so a matched segment can be dropped;
            // nothing else of it is used (and the verifier explores the translation only
            // with the fixed offset below).
            let l4 = ipv6_tcp_offset(ctx, head[6])?;
            let ports: [u16; 2] = ctx.load(l4).ok()?;
            key.sport = ports[0];
            key.dport = ports[1];
            return Some(Segment {
                key,
                l4: ETH_HLEN + IPV6_HLEN,
                payload: 0,
                ttl: head[7],
                tos,
                ip_hlen: IPV6_HLEN,
                fragment: false,
                ipv6_ext: true,
            });
        }
        let l4 = ETH_HLEN + IPV6_HLEN;
        let doff = usize::from(ctx.load::<u8>(l4 + 12).ok()? >> 4) * 4;
        let payload = payload_len.saturating_sub(doff);
        (l4, payload, head[7], tos, IPV6_HLEN, false)
    } else {
        return None;
    };
    let ports: [u16; 2] = ctx.load(l4).ok()?;
    key.sport = ports[0];
    key.dport = ports[1];
    Some(Segment {
        key,
        l4,
        payload: payload as u32,
        ttl,
        tos,
        ip_hlen,
        fragment,
        ipv6_ext: false,
    })
}

/// Where the TCP header starts in an IPv6 packet whose first next-header is `next`, following
/// up to [`MAX_EXT_HEADERS`] extension headers as the XDP filter does; `None` for anything
/// else, non-first fragments included.
#[inline(always)]
fn ipv6_tcp_offset(ctx: &TcContext, mut next: u8) -> Option<usize> {
    let mut at = ETH_HLEN + IPV6_HLEN;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            IPPROTO_TCP => return Some(at),
            // Hop-by-hop, routing, destination options: length in 8-octet units after the first.
            0 | 43 | 60 => {
                let e: [u8; 2] = ctx.load(at).ok()?;
                next = e[0];
                at += (usize::from(e[1]) + 1) * 8;
            }
            // Fragment: only the first fragment has the TCP header.
            44 => {
                let e: [u8; 4] = ctx.load(at).ok()?;
                if u16::from_be_bytes([e[2], e[3]]) >> 3 != 0 {
                    return None;
                }
                next = e[0];
                at += 8;
            }
            // Authentication header: length in 4-octet units minus 2.
            51 => {
                let e: [u8; 2] = ctx.load(at).ok()?;
                next = e[0];
                at += (usize::from(e[1]) + 2) * 4;
            }
            _ => return None,
        }
    }
    None
}

/// Rewrites the segment in place into one of the other connection (ports, sequence and
/// acknowledgement numbers, window, then the IP header and the checksum's pseudo-header).
#[inline(always)]
fn translate(ctx: &TcContext, seg: &Segment, f: &Flow) -> Result<Verdict, i64> {
    let v4_in = seg.key.family == FAMILY_V4;
    if seg.fragment {
        return Ok(Verdict::Drop(PacketCounter::FragDropped));
    }
    if seg.ttl <= 1 {
        return Ok(Verdict::Drop(PacketCounter::TtlExpired));
    }
    // Read again: the caller's copy carries what its branches learnt, and the verifier would
    // explore this function once per combination.
    let flags: u8 = ctx.load(seg.l4 + TCP_FLAGS)?;
    let mut l4 = seg.l4;
    if v4_in && seg.ip_hlen != IPV4_HLEN {
        // IPv4 options are not translated (RFC 7915 drops them too): they are cut out, right
        // after the 20-byte header, keeping the GSO size. A source route is not ours to drop
        // silently from the path, so such a segment is dropped whole.
        if source_routed(ctx, seg.ip_hlen)? {
            return Ok(Verdict::Drop(PacketCounter::IpOptionsDropped));
        }
        let options = (seg.ip_hlen - IPV4_HLEN) as i32;
        ctx.adjust_room(
            -options,
            BPF_ADJ_ROOM_NET,
            u64::from(BPF_F_ADJ_ROOM_FIXED_GSO),
        )?;
        count(PacketCounter::IpOptionsStripped, 1);
        l4 = ETH_HLEN + IPV4_HLEN;
    }
    let csum = l4 + TCP_CSUM;
    if f.flags & FLOW_ECN_CLEAR != 0 && flags & (TCP_ECE | TCP_CWR) != 0 {
        // The flags share a 16-bit word with the data offset.
        let word: [u8; 2] = ctx.load(l4 + TCP_FLAGS - 1)?;
        let new = [word[0], word[1] & !(TCP_ECE | TCP_CWR)];
        ctx.l4_csum_replace(
            csum,
            u64::from(u16::from_ne_bytes(word)),
            u64::from(u16::from_ne_bytes(new)),
            2,
        )?;
        ctx.store(l4 + TCP_FLAGS - 1, &new, 0)?;
    }

    // Ports: values stay in network order, as the checksum helpers want them.
    let ports = [f.new_sport, f.new_dport];
    let old: [u16; 2] = ctx.load(l4)?;
    ctx.l4_csum_replace(csum, u64::from(old[0]), u64::from(ports[0]), 2)?;
    ctx.l4_csum_replace(csum, u64::from(old[1]), u64::from(ports[1]), 2)?;
    ctx.store(l4, &ports, 0)?;

    let seq_raw: u32 = ctx.load(l4 + TCP_SEQ)?;
    let seq = u32::from_be(seq_raw).wrapping_add(f.seq_delta).to_be();
    ctx.l4_csum_replace(csum, u64::from(seq_raw), u64::from(seq), 4)?;
    ctx.store(l4 + TCP_SEQ, &seq, 0)?;

    let mut has_ack = 0;
    let mut ack_out = 0;
    // Bytes the ACK was raised by: the window shrinks by as much (`shrink_window`).
    let mut raised = 0u32;
    if flags & TCP_ACK_FLAG != 0 {
        let ack_raw: u32 = ctx.load(l4 + TCP_ACK)?;
        let mut ack = u32::from_be(ack_raw);
        if before(ack, f.ack_floor) {
            // Below what the local socket already had acknowledged to the receiver: an old,
            // reordered pure ACK says nothing; a segment with data or a FIN keeps its content
            // and acknowledges the floor (the receiver would drop an ACK that far behind).
            if seg.payload == 0 && flags & (TCP_FIN | TCP_RST) == 0 {
                return Ok(Verdict::Drop(PacketCounter::OldAckDropped));
            }
            raised = f.ack_floor.wrapping_sub(ack);
            ack = f.ack_floor;
        }
        let ack = ack.wrapping_sub(f.ack_delta);
        has_ack = 1;
        ack_out = ack;
        let ack = ack.to_be();
        ctx.l4_csum_replace(csum, u64::from(ack_raw), u64::from(ack), 4)?;
        ctx.store(l4 + TCP_ACK, &ack, 0)?;
    }

    let win_raw: u16 = ctx.load(l4 + TCP_WINDOW)?;
    let win_in = shrink_window(u16::from_be(win_raw), f.ws_in, raised);
    let win = rescale_window(win_in, f.ws_in, f.ws_out).to_be();
    if window_saturates(win_in, f.ws_in, f.ws_out) {
        count(PacketCounter::WindowSaturated, 1);
    }
    if win != win_raw {
        ctx.l4_csum_replace(csum, u64::from(win_raw), u64::from(win), 2)?;
        ctx.store(l4 + TCP_WINDOW, &win, 0)?;
    }

    translate_options(ctx, l4, f)?;

    if v4_in {
        to_v6(ctx, seg, f, l4)?;
    } else {
        to_v4(ctx, seg, f)?;
    }
    Ok(Verdict::Redirect(Emitted {
        has_ack,
        ack: ack_out,
        win: u16::from_be(win),
    }))
}

/// Whether the IPv4 options (the `ihl` bytes of header less 20) hold a loose or strict source
/// route.
#[inline(always)]
fn source_routed(ctx: &TcContext, ihl: usize) -> Result<bool, i64> {
    let mut off = IPV4_HLEN;
    for _ in 0..IPV4_MAX_OPTION_BYTES {
        if off >= ihl {
            return Ok(false);
        }
        let kind: u8 = ctx.load(ETH_HLEN + off)?;
        match kind {
            IPOPT_END => return Ok(false),
            IPOPT_NOOP => off += 1,
            IPOPT_LSRR | IPOPT_SSRR => return Ok(true),
            _ => {
                let len = usize::from(ctx.load::<u8>(ETH_HLEN + off + 1)?);
                if len < 2 {
                    // Malformed: the stack would refuse it, and so do we.
                    return Ok(true);
                }
                off += len;
            }
        }
    }
    Ok(false)
}

/// The options: timestamps turned into NOPs at their fixed place (see [`strip_timestamp`];
/// translated ones were done before, by [`timestamps`]), then the walk to the SACK option, whose blocks are translated
/// into the receiver's sequence space (`- ack_delta`: they acknowledge data like the ACK
/// field) or turned into NOPs towards a receiver without SACK. Everything else is left alone:
/// MSS and window scale only occur on SYNs, which are never translated.
#[inline(always)]
fn translate_options(ctx: &TcContext, l4: usize, f: &Flow) -> Result<(), i64> {
    if f.flags & FLOW_TS_STRIP != 0 {
        strip_timestamp(ctx, l4)?;
    }
    let Some((off, len)) = find_sack(ctx, l4)? else {
        return Ok(());
    };
    let strip = f.flags & FLOW_SACK_STRIP != 0;
    if strip {
        // Kind and length become two NOPs; a 2-byte field at an odd offset adds to the sum
        // with its bytes swapped, and NOP, NOP reads the same either way.
        let old: [u8; 2] = ctx.load(l4 + off)?;
        let old = if off % 2 == 0 { old } else { [old[1], old[0]] };
        let nops = [TCPOPT_NOP; 2];
        ctx.l4_csum_replace(
            l4 + TCP_CSUM,
            u64::from(u16::from_ne_bytes(old)),
            u64::from(u16::from_ne_bytes(nops)),
            2,
        )?;
        ctx.store(l4 + off, &nops, 0)?;
        count(PacketCounter::SackStripped, 1);
    }
    let blocks = (len - 2) / 8;
    // Blocks and edges unrolled, apart from the walk: nested loops make the verifier explore
    // every combination of paths.
    for b in 0..TCP_MAX_SACK_BLOCKS {
        if b >= blocks {
            break;
        }
        let at = off + 2 + 8 * b;
        translate_sack_edge(ctx, l4, at, f.ack_delta, strip)?;
        translate_sack_edge(ctx, l4, at + 4, f.ack_delta, strip)?;
        if !strip {
            count(PacketCounter::SackBlocks, 1);
        }
    }
    Ok(())
}

/// Where the SACK option starts in the TCP header and its length, if there is one where
/// Linux, the BSDs and Windows put it: after NOP, NOP, either opening the options or after an
/// aligned timestamp option (NOP, NOP, timestamp). Fixed places, no walk: with a walk over
/// the options the verifier gave up at a million instructions once the handoff states were
/// added. A SACK option anywhere else is left untranslated; the receiver then discards its
/// blocks as invalid (RFC 2018 lets it), which costs recovery speed, not data.
#[inline(always)]
fn find_sack(ctx: &TcContext, l4: usize) -> Result<Option<(usize, usize)>, i64> {
    let doff = usize::from(ctx.load::<u8>(l4 + 12)? >> 4) * 4;
    for at in [TCP_HLEN, TCP_HLEN + TCPOLEN_TIMESTAMP_ALIGNED] {
        if at + 4 > doff {
            return Ok(None);
        }
        let head: [u8; 4] = ctx.load(l4 + at)?;
        if head[0] != TCPOPT_NOP || head[1] != TCPOPT_NOP {
            return Ok(None);
        }
        if head[2] == TCPOPT_SACK {
            let len = usize::from(head[3]);
            if len < 10 || (len - 2) % 8 != 0 || at + 2 + len > doff {
                return Ok(None);
            }
            return Ok(Some((at + 2, len)));
        }
        if head[2] != TCPOPT_TIMESTAMP {
            return Ok(None);
        }
    }
    Ok(None)
}

/// Turns the timestamp option into NOPs when it opens the options in the layout RFC 7323
/// (appendix A) recommends and Linux, the BSDs and Windows send: NOP, NOP, then the option,
/// so the 12 bytes are three aligned words. Only that fixed place is looked at (a walk and a
/// per-byte rewrite made the verifier give up); a timestamp option anywhere else is left.
#[inline(always)]
fn strip_timestamp(ctx: &TcContext, l4: usize) -> Result<(), i64> {
    let doff = usize::from(ctx.load::<u8>(l4 + 12)? >> 4) * 4;
    if doff < TCP_HLEN + TCPOLEN_TIMESTAMP_ALIGNED {
        return Ok(());
    }
    let head: [u8; 4] = ctx.load(l4 + TCP_HLEN)?;
    if head != [TCPOPT_NOP, TCPOPT_NOP, TCPOPT_TIMESTAMP, TCPOLEN_TIMESTAMP] {
        return Ok(());
    }
    let nops = u32::from_ne_bytes([TCPOPT_NOP; 4]);
    for w in 0..3 {
        let at = l4 + TCP_HLEN + 4 * w;
        let raw: u32 = ctx.load(at)?;
        ctx.l4_csum_replace(l4 + TCP_CSUM, u64::from(raw), u64::from(nops), 4)?;
        ctx.store(at, &nops, 0)?;
    }
    count(PacketCounter::TimestampsStripped, 1);
    Ok(())
}

/// Moves one SACK edge at `at` (from the TCP header's start) back by `delta`, or turns its
/// four bytes into NOPs.
#[inline(always)]
fn translate_sack_edge(
    ctx: &TcContext,
    l4: usize,
    at: usize,
    delta: u32,
    strip: bool,
) -> Result<(), i64> {
    let raw: u32 = ctx.load(l4 + at)?;
    let new = if strip {
        u32::from_ne_bytes([TCPOPT_NOP; 4])
    } else {
        u32::from_be(raw).wrapping_sub(delta).to_be()
    };
    ctx.l4_csum_replace(
        l4 + TCP_CSUM,
        u64::from(csum_word(raw, at)),
        u64::from(csum_word(new, at)),
        4,
    )?;
    ctx.store(l4 + at, &new, 0)?;
    Ok(())
}

/// The pseudo-header part of the TCP checksum, from the old addresses to the new ones. The
/// protocol and length words are the same in the IPv4 and IPv6 pseudo-headers. No
/// `BPF_F_IPV6`: the new IP header is stored with `BPF_F_RECOMPUTE_CSUM`, so only the
/// checksum field's own change is missing from `skb->csum`, and only the IPv4 semantics of
/// the helper take it out (`docs/packet-engine.md`, 2.2 step 5).
#[inline(always)]
fn pseudo_header(
    ctx: &TcContext,
    csum: usize,
    old: &mut [u32],
    new: &mut [u32],
) -> Result<(), i64> {
    // SAFETY: both buffers are on this stack and their sizes are passed with them.
    let diff = unsafe {
        bpf_csum_diff(
            old.as_mut_ptr(),
            (old.len() * 4) as u32,
            new.as_mut_ptr(),
            (new.len() * 4) as u32,
            0,
        )
    };
    if diff < 0 {
        return Err(diff);
    }
    ctx.l4_csum_replace(csum, 0, diff as u32 as u64, u64::from(BPF_F_PSEUDO_HDR))?;
    Ok(())
}

/// Client to backend: the 20-byte IPv4 header becomes a 40-byte IPv6 header. `l4` is where
/// the TCP header is now (after any options were cut out); the IPv4 header's length fields
/// still count the options.
#[inline(always)]
fn to_v6(ctx: &TcContext, seg: &Segment, f: &Flow, l4: usize) -> Result<(), i64> {
    let mut old = [0u32; 2];
    let mut new = [0u32; 8];
    old[0] = u32::from_ne_bytes([
        seg.key.saddr[12],
        seg.key.saddr[13],
        seg.key.saddr[14],
        seg.key.saddr[15],
    ]);
    old[1] = u32::from_ne_bytes([
        seg.key.daddr[12],
        seg.key.daddr[13],
        seg.key.daddr[14],
        seg.key.daddr[15],
    ]);
    for i in 0..4 {
        let j = i * 4;
        new[i] = u32::from_ne_bytes([
            f.new_saddr[j],
            f.new_saddr[j + 1],
            f.new_saddr[j + 2],
            f.new_saddr[j + 3],
        ]);
        new[4 + i] = u32::from_ne_bytes([
            f.new_daddr[j],
            f.new_daddr[j + 1],
            f.new_daddr[j + 2],
            f.new_daddr[j + 3],
        ]);
    }
    pseudo_header(ctx, l4 + TCP_CSUM, &mut old, &mut new)?;
    let tot_len = u16::from_be(ctx.load::<u16>(ETH_HLEN + 2)?);
    ctx.change_proto(ETH_P_IPV6.to_be(), 0)?;
    let mut h = [0u8; IPV6_HLEN];
    let label = f.flow_label & 0x000f_ffff;
    let tos = outgoing_tos(seg.tos, f);
    h[0] = 0x60 | (tos >> 4);
    h[1] = (tos << 4) | (label >> 16) as u8;
    h[2] = (label >> 8) as u8;
    h[3] = label as u8;
    let payload_len = tot_len.saturating_sub(seg.ip_hlen as u16).to_be_bytes();
    h[4] = payload_len[0];
    h[5] = payload_len[1];
    h[6] = IPPROTO_TCP;
    h[7] = seg.ttl - 1;
    h[8..24].copy_from_slice(&f.new_saddr);
    h[24..40].copy_from_slice(&f.new_daddr);
    ctx.store(ETH_HLEN, &h, u64::from(BPF_F_RECOMPUTE_CSUM))?;
    ctx.store(12, &ETH_P_IPV6.to_be(), 0)?;
    Ok(())
}

/// Backend to client: the 40-byte IPv6 header becomes a 20-byte IPv4 header.
#[inline(always)]
fn to_v4(ctx: &TcContext, seg: &Segment, f: &Flow) -> Result<(), i64> {
    let mut old = [0u32; 8];
    let mut new = [0u32; 2];
    for i in 0..4 {
        let j = i * 4;
        old[i] = u32::from_ne_bytes([
            seg.key.saddr[j],
            seg.key.saddr[j + 1],
            seg.key.saddr[j + 2],
            seg.key.saddr[j + 3],
        ]);
        old[4 + i] = u32::from_ne_bytes([
            seg.key.daddr[j],
            seg.key.daddr[j + 1],
            seg.key.daddr[j + 2],
            seg.key.daddr[j + 3],
        ]);
    }
    new[0] = u32::from_ne_bytes([
        f.new_saddr[12],
        f.new_saddr[13],
        f.new_saddr[14],
        f.new_saddr[15],
    ]);
    new[1] = u32::from_ne_bytes([
        f.new_daddr[12],
        f.new_daddr[13],
        f.new_daddr[14],
        f.new_daddr[15],
    ]);
    pseudo_header(ctx, seg.l4 + TCP_CSUM, &mut old, &mut new)?;
    let payload_len = u16::from_be(ctx.load::<u16>(ETH_HLEN + 4)?);
    ctx.change_proto(ETH_P_IP.to_be(), 0)?;
    let mut h = [0u8; IPV4_HLEN];
    h[0] = 0x45;
    h[1] = outgoing_tos(seg.tos, f);
    let tot_len = payload_len.saturating_add(IPV4_HLEN as u16).to_be_bytes();
    h[2] = tot_len[0];
    h[3] = tot_len[1];
    // ID 0, DF.
    h[6] = 0x40;
    h[8] = seg.ttl - 1;
    h[9] = IPPROTO_TCP;
    h[12..16].copy_from_slice(&f.new_saddr[12..16]);
    h[16..20].copy_from_slice(&f.new_daddr[12..16]);
    let check = ipv4_checksum(&h).to_be_bytes();
    h[10] = check[0];
    h[11] = check[1];
    ctx.store(ETH_HLEN, &h, u64::from(BPF_F_RECOMPUTE_CSUM))?;
    ctx.store(12, &ETH_P_IP.to_be(), 0)?;
    Ok(())
}

/// The TOS or traffic class of the translated segment: the sender's, without the ECN field
/// when only one side negotiated ECN.
#[inline(always)]
fn outgoing_tos(tos: u8, f: &Flow) -> u8 {
    if f.flags & FLOW_ECN_CLEAR != 0 {
        tos & !IP_ECN_MASK
    } else {
        tos
    }
}

/// The IPv4 header checksum of a header whose checksum field is zero.
#[inline(always)]
fn ipv4_checksum(h: &[u8; IPV4_HLEN]) -> u16 {
    let mut sum = 0u32;
    for i in 0..IPV4_HLEN / 2 {
        sum += u32::from(u16::from_be_bytes([h[2 * i], h[2 * i + 1]]));
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}
