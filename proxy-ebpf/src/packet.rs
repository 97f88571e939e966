//! The packet engine's kernel side (`docs/packet-engine.md`).
//!
//! `spliced_packet_isn` is a `sock_ops` program attached to spliced's cgroup (v2). When a
//! connection of one of spliced's sockets becomes established it records the two initial
//! sequence numbers, keyed by the socket's cookie: the sequence offsets of a handed-off
//! connection are built from them, and they never change afterwards.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB},
    btf_maps::LruHashMap,
    helpers::bpf_get_socket_cookie,
    macros::{btf_map, sock_ops},
    programs::SockOpsContext,
};
use proxy_common::{IsnPair, PACKET_ISN_ENTRIES};

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
