//! spliced's kernel side.
//!
//! `spliced_verdict` is an `sk_skb/stream_verdict` program attached to the `SOCKHASH` that holds
//! both sockets of every spliced connection. For each skb arriving on a socket it looks up the
//! peer's cookie and redirects the skb to the peer's egress queue, so the payload never reaches
//! user space. The maps carry BTF, so `bpftool map dump` shows their keys and values by name.
#![no_std]
#![no_main]
// The program macros generate a `pub fn` entry point that receives the kernel's raw context
// pointer; that is how every eBPF program is called and cannot be marked `unsafe`.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use aya_ebpf::{
    EbpfContext as _,
    bindings::sk_action,
    btf_maps::{HashMap, PerCpuArray, RingBuf, SockHash},
    helpers::bpf_get_socket_cookie,
    macros::{btf_map, stream_verdict},
    programs::SkBuffContext,
};
use aya_log_ebpf::{debug, warn};
use proxy_common::{Counter, MAX_SOCKETS, PROGRESS_STEP, Pair};

const MAX: usize = MAX_SOCKETS as usize;

/// Sockets whose data the verdict redirects, keyed by their own cookie.
#[btf_map]
static SPLICED_SOCKS: SockHash<u64, MAX> = SockHash::new();

/// Every spliced socket for its whole life; redirect targets are looked up here, so a socket
/// whose peer is still being inserted into `SPLICED_SOCKS` never loses a redirect.
#[btf_map]
static SPLICED_HOLD: SockHash<u64, MAX> = SockHash::new();

/// Paused sockets, cookie to the bytes passed to their own queue since the pause: their data
/// stays on their own socket for user space, which trusts end of stream only once it has read
/// that many bytes (the kernel may report EOF while passed skbs still wait to be queued).
#[btf_map]
static SPLICED_PAUSED: HashMap<u64, u64, MAX> = HashMap::new();

/// Socket cookie to its peer and the bytes redirected so far.
#[btf_map]
static SPLICED_PEERS: HashMap<u64, Pair, MAX> = HashMap::new();

/// Cookies of sockets whose redirected bytes crossed a [`PROGRESS_STEP`] boundary: user space
/// checks those connections' backlogs instead of polling every connection.
#[btf_map]
static SPLICED_EVENTS: RingBuf<u64, { 256 * 1024 }> = RingBuf::new();

/// Paused sockets user space asks to resume: cookie to the passed bytes it already wrote to the
/// peer. Redirecting resumes only when that equals what was passed, so order is kept.
#[btf_map]
static SPLICED_RESUME: HashMap<u64, u64, MAX> = HashMap::new();

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
    if let Some(passed) = SPLICED_PAUSED.get_ptr_mut(&cookie) {
        // SAFETY: only this socket's verdict runs write its entry, serialized by its lock.
        let passed_now = unsafe { *passed };
        // SAFETY: copied out at once.
        let caught_up = unsafe { SPLICED_RESUME.get(&cookie) }.is_some_and(|&w| w == passed_now);
        if caught_up {
            // Every byte passed so far is already in the peer's TCP queue: this skb and the
            // ones after it can go through the kernel again without overtaking anything.
            let _ = SPLICED_PAUSED.remove(&cookie);
            let _ = SPLICED_RESUME.remove(&cookie);
            count(Counter::Resumed, 1);
            return redirect(&ctx, cookie, len);
        }
        // SAFETY: as above.
        unsafe { *passed = passed_now + u64::from(len) };
        // The peer is not keeping up: keep the bytes here, charged to this socket's receive
        // memory, so TCP closes the window instead of the peer's queue growing without end.
        count(Counter::PassedPaused, 1);
        return sk_action::SK_PASS;
    }
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
        if before / PROGRESS_STEP != after / PROGRESS_STEP {
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
