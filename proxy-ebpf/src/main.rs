//! spliced's kernel side.
//!
//! `spliced_verdict` is an `sk_skb/stream_verdict` program attached to the `SOCKHASH` that holds
//! both sockets of every spliced connection. For each skb arriving on a socket it looks up the
//! peer's cookie and redirects the skb to the peer's egress queue, so the payload never reaches
//! user space. The maps carry BTF, so `bpftool map dump` shows their keys and values by name.
//! `spliced_xdp` (module `xdp`) is the edge filter attached to network interfaces.
//! Module `packet` holds the packet engine's programs (`docs/packet-engine.md`).
#![no_std]
#![no_main]
// The program macros generate a `pub fn` entry point that receives the kernel's raw context
// pointer; that is how every eBPF program is called and cannot be marked `unsafe`.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use aya_ebpf::{
    EbpfContext as _,
    bindings::sk_action,
    btf_maps::{Array, HashMap, PerCpuArray, RingBuf, SockHash},
    helpers::{bpf_get_socket_cookie, bpf_map_delete_elem, bpf_probe_read_kernel},
    macros::{btf_map, stream_verdict},
    programs::SkBuffContext,
};
use aya_log_ebpf::{debug, warn};
use core::ffi::c_void;

mod packet;
mod xdp;
use proxy_common::{
    Counter, DETACH_ABSENT, DETACH_DONE, MAX_SOCKETS, Pair, SkbOffsets, TRIM_MAX_STEPS, TRIM_STEP,
};

const MAX: usize = MAX_SOCKETS as usize;

/// Sockets whose data the verdict redirects, keyed by their own cookie.
#[btf_map]
static SPLICED_SOCKS: SockHash<u64, MAX> = SockHash::new();

/// Every spliced socket for its whole life; redirect targets are looked up here, so a socket
/// whose peer is still being inserted into `SPLICED_SOCKS` never loses a redirect.
#[btf_map]
static SPLICED_HOLD: SockHash<u64, MAX> = SockHash::new();

/// Sockets user space wants out of `SPLICED_SOCKS` (cookie to `DETACH_REQUESTED`);
/// `spliced_detach` removes them while it holds the socket's lock and records the outcome.
#[btf_map]
static SPLICED_DETACH: HashMap<u64, u32, MAX> = HashMap::new();

/// Socket cookie to its peer and the bytes redirected so far.
#[btf_map]
static SPLICED_PEERS: HashMap<u64, Pair, MAX> = HashMap::new();

/// Cookies of sockets whose redirected bytes reached their wake point (`SPLICED_WAKE`): user
/// space checks those connections' backlogs instead of polling every connection.
#[btf_map]
static SPLICED_EVENTS: RingBuf<u64, { 256 * 1024 }> = RingBuf::new();

/// Socket cookie to a redirected byte count at which user space wants to hear about it at once
/// (the point where the peer's backlog would reach the pause threshold).
#[btf_map]
static SPLICED_WAKE: HashMap<u64, u64, MAX> = HashMap::new();

/// Where `TCP_SKB_CB(skb)->seq`, `skb->sk` and `tcp_sk(sk)->copied_seq` are, from the
/// kernel's BTF; user space fills it before attaching the verdict.
#[btf_map]
static SPLICED_OFFSETS: Array<SkbOffsets, 1> = Array::new();

/// Per-CPU counters: the bpf target has no atomic read-modify-write.
#[btf_map]
static SPLICED_COUNTERS: PerCpuArray<u64, { Counter::COUNT as usize }> = PerCpuArray::new();

#[inline(always)]
fn count(counter: Counter, by: u64) {
    if let Some(slot) = SPLICED_COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: a per-CPU slot is only touched by this CPU while the program runs.
        unsafe { *slot += by };
    }
}

#[stream_verdict]
pub fn spliced_verdict(ctx: SkBuffContext) -> u32 {
    let len = ctx.len();
    // A bare FIN arrives as a zero-length skb; redirecting or passing it loses data still queued
    // for the peer, so drop it: user space learns of the FIN from the socket (EPOLLRDHUP).
    if len == 0 {
        count(Counter::EmptyDropped, 1);
        return sk_action::SK_DROP;
    }
    let len = match trim_old(&ctx, len) {
        Some(len) => len,
        None => {
            // Every byte was forwarded before: the skb is now empty, and `tcp_eat_skb` leaves
            // `copied_seq` alone for an empty skb.
            count(Counter::OldDropped, 1);
            return sk_action::SK_DROP;
        }
    };
    // SAFETY: the helper only reads the socket the skb belongs to.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    redirect(&ctx, cookie, len)
}

/// Removes from the head of the skb the bytes below the socket's `copied_seq`, which the
/// verdict already consumed, and returns the length left (`None` if nothing is left).
///
/// `tcp_read_skb` hands over each queued skb whole. TCP queues whole a segment that partly
/// overlaps bytes already received (a retransmission, or one from the out-of-order queue), so
/// without this the old bytes would be forwarded a second time, and `tcp_eat_skb` would move
/// `copied_seq` past `rcv_nxt`. The verdict runs under the socket lock and each earlier skb's
/// `tcp_eat_skb` has run, so `copied_seq` is exactly where the new bytes start; `tcp_eat_skb`
/// then advances it by the trimmed length.
#[inline(always)]
fn trim_old(ctx: &SkBuffContext, len: u32) -> Option<u32> {
    // A zeroed entry means user space gave no offsets (a diagnostic mode): change nothing.
    let Some(off) = SPLICED_OFFSETS.get(0).filter(|o| o.skb_cb != 0) else {
        return Some(len);
    };
    // The context of an `sk_skb` program is the kernel's `struct sk_buff`.
    let skb = ctx.as_ptr() as usize;
    // SAFETY: reads of kernel memory at offsets from the kernel's BTF; a bad address makes the
    // helper fail, it never faults.
    let seq =
        unsafe { bpf_probe_read_kernel((skb + (off.skb_cb + off.cb_seq) as usize) as *const u32) };
    // SAFETY: as above.
    let sk = unsafe { bpf_probe_read_kernel((skb + off.skb_sk as usize) as *const usize) };
    let (Ok(seq), Ok(sk)) = (seq, sk) else {
        count(Counter::TrimIncomplete, 1);
        return Some(len);
    };
    if sk == 0 {
        return Some(len);
    }
    // SAFETY: as above.
    let Ok(copied) =
        (unsafe { bpf_probe_read_kernel((sk + off.tcp_copied_seq as usize) as *const u32) })
    else {
        count(Counter::TrimIncomplete, 1);
        return Some(len);
    };
    // Sequence numbers wrap: the skb starts below `copied_seq` when the difference, taken as
    // signed, is positive.
    let old = copied.wrapping_sub(seq) as i32;
    if old <= 0 {
        return Some(len);
    }
    let old = (old as u32).min(len);
    let mut left = old;
    for _ in 0..TRIM_MAX_STEPS {
        if left == 0 {
            break;
        }
        let step = if left < TRIM_STEP { left } else { TRIM_STEP };
        // `sk_skb_adjust_room` with a negative difference pulls bytes off the head.
        if ctx.adjust_room(-(step as i32), 0, 0).is_err() {
            break;
        }
        left -= step;
    }
    let trimmed = old - left;
    count(Counter::OldTrimmed, 1);
    count(Counter::OldTrimmedBytes, u64::from(trimmed));
    if left != 0 {
        count(Counter::TrimIncomplete, 1);
    }
    let now = ctx.len();
    if now == 0 { None } else { Some(now) }
}

/// Redirects the skb to the peer registered for `cookie`, counting what went.
#[inline(always)]
fn redirect(ctx: &SkBuffContext, cookie: u64, len: u32) -> u32 {
    let Some(pair) = SPLICED_PEERS.get_ptr_mut(&cookie) else {
        // No peer (the insertion order rules it out). User space never reads a socket in the
        // map, so passing would only park the bytes there; its byte accounting notices what
        // was not redirected and resets the connection.
        count(Counter::NoPeer, 1);
        return sk_action::SK_DROP;
    };
    // SAFETY: the entry stays valid for this run; only this socket's verdict writes it.
    let mut peer = unsafe { (*pair).peer };
    if SPLICED_HOLD.redirect_skb(ctx, &mut peer, 0) as u32 == sk_action::SK_PASS {
        // SAFETY: as above.
        let before = unsafe { (*pair).redirected };
        let after = before + u64::from(len);
        // SAFETY: as above.
        unsafe { (*pair).redirected = after };
        if before == 0 {
            debug!(ctx, "socket {} now splices into {}", cookie, peer);
        }
        // SAFETY: copied out at once.
        let wake_at = unsafe { SPLICED_WAKE.get(&cookie) }
            .copied()
            .unwrap_or(u64::MAX);
        // Only the wake point wakes user space: progress alone is read from this map when
        // someone asks, so a transfer costs no wake-up per megabyte.
        if before < wake_at && after >= wake_at {
            // A full ring only delays the wake-up until user space's next poll.
            let _ = SPLICED_EVENTS.output(&cookie, 0);
        }
        count(Counter::Redirected, 1);
        count(Counter::RedirectedBytes, u64::from(len));
        sk_action::SK_PASS
    } else {
        // The peer is no longer held (the connection is being torn down): as above, the bytes
        // are dropped and user space's accounting notices if the connection was not ending.
        count(Counter::RedirectFailed, 1);
        warn!(
            ctx,
            "redirect from socket {} to {} failed; dropped", cookie, peer
        );
        sk_action::SK_DROP
    }
}

/// `iter/tcp`: takes the sockets listed in `SPLICED_DETACH` out of `SPLICED_SOCKS`.
///
/// Removing a socket from the verdict map from user space races with the verdict: an skb that
/// `tcp_read_skb` has already unlinked from the receive queue is dropped when it then finds no
/// program. The TCP iterator runs this program with the socket locked, and the verdict only
/// runs under that lock, so no skb is in flight here. Once out of the map, the socket's data
/// stays in its TCP receive queue, charged to it, and TCP flow control holds the sender back.
/// (It stays in `SPLICED_HOLD`, so its psock and the other direction's redirects survive.)
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/tcp")]
pub fn spliced_detach(ctx: *mut c_void) -> i32 {
    // `struct bpf_iter__tcp { struct bpf_iter_meta *meta; struct sock_common *sk_common; .. }`
    // SAFETY: the context is that struct; the verifier checks the access against its BTF.
    let sk = unsafe { *ctx.cast::<*mut c_void>().add(1) };
    if sk.is_null() {
        return 0;
    }
    // SAFETY: `sk` is a socket the iterator holds.
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    let Some(state) = SPLICED_DETACH.get_ptr_mut(&cookie) else {
        return 0;
    };
    let key = cookie;
    // SAFETY: deleting from a socket hash is allowed in iterators; the key lives on the stack.
    let rc = unsafe {
        bpf_map_delete_elem(
            core::ptr::from_ref(&SPLICED_SOCKS).cast_mut().cast(),
            core::ptr::from_ref(&key).cast(),
        )
    };
    // SAFETY: the entry stays valid while this program runs.
    unsafe { *state = if rc == 0 { DETACH_DONE } else { DETACH_ABSENT } };
    count(Counter::Detached, 1);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
