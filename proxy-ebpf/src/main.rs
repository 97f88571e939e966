//! spliced's kernel side.
//!
//! `spliced_verdict` is an `sk_skb/stream_verdict` program attached to the `SOCKHASH` that holds
//! both sockets of every spliced connection. For each skb arriving on a socket it looks up the
//! peer's cookie and redirects the skb to the peer's egress queue, so the payload never reaches
//! user space. The maps carry BTF, so `bpftool map dump` shows their keys and values by name.
//! `spliced_xdp` (module `xdp`) is the edge filter attached to network interfaces.
#![no_std]
#![no_main]
// The program macros generate a `pub fn` entry point that receives the kernel's raw context
// pointer; that is how every eBPF program is called and cannot be marked `unsafe`.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use aya_ebpf::{
    EbpfContext as _,
    bindings::sk_action,
    btf_maps::{HashMap, PerCpuArray, RingBuf, SockHash},
    helpers::{bpf_get_socket_cookie, bpf_map_delete_elem},
    macros::{btf_map, stream_verdict},
    programs::SkBuffContext,
};
use aya_log_ebpf::{debug, warn};
use core::ffi::c_void;

mod xdp;
use proxy_common::{Counter, DETACH_ABSENT, DETACH_DONE, MAX_SOCKETS, PROGRESS_STEP, Pair};

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

/// Cookies of sockets whose redirected bytes crossed a [`PROGRESS_STEP`] boundary: user space
/// checks those connections' backlogs instead of polling every connection.
#[btf_map]
static SPLICED_EVENTS: RingBuf<u64, { 256 * 1024 }> = RingBuf::new();

/// Socket cookie to a redirected byte count at which user space wants to hear about it at once
/// (the point where the peer's backlog would reach the pause threshold).
#[btf_map]
static SPLICED_WAKE: HashMap<u64, u64, MAX> = HashMap::new();

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
    // for the peer, so drop it and let user space see EOF through read() == 0.
    if len == 0 {
        count(Counter::EmptyDropped, 1);
        return sk_action::SK_DROP;
    }
    // SAFETY: the helper only reads the socket the skb belongs to.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    redirect(&ctx, cookie, len)
}

/// Redirects the skb to the peer registered for `cookie`, counting what went.
#[inline(always)]
fn redirect(ctx: &SkBuffContext, cookie: u64, len: u32) -> u32 {
    let Some(pair) = SPLICED_PEERS.get_ptr_mut(&cookie) else {
        // No peer: hand the data to the socket so user space forwards it.
        count(Counter::PassedNoPeer, 1);
        return sk_action::SK_PASS;
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
        if before / PROGRESS_STEP != after / PROGRESS_STEP || (before < wake_at && after >= wake_at)
        {
            // A full ring only delays the wake-up until the next step; nothing is lost.
            let _ = SPLICED_EVENTS.output(&cookie, 0);
        }
        count(Counter::Redirected, 1);
        count(Counter::RedirectedBytes, u64::from(len));
        sk_action::SK_PASS
    } else {
        // The peer is no longer held (it is being torn down): passing keeps the bytes on this
        // socket, where user space sees them, instead of dropping them silently.
        count(Counter::RedirectFailed, 1);
        warn!(
            ctx,
            "redirect from socket {} to {} failed; passing to user space", cookie, peer
        );
        sk_action::SK_PASS
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
