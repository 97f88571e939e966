//! spliced's kernel side.
//!
//! `spliced_verdict` is an `sk_skb/stream_verdict` program attached to the `SOCKHASH` that holds
//! both sockets of every spliced connection. For each skb arriving on a socket it looks up the
//! peer's cookie and redirects the skb to the peer's egress queue, so the payload never reaches
//! user space.
#![no_std]
#![no_main]
// The program macros generate a `pub fn` entry point that receives the kernel's raw context
// pointer; that is how every eBPF program is called and cannot be marked `unsafe`.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

use aya_ebpf::{
    EbpfContext as _,
    bindings::sk_action,
    helpers::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, PerCpuArray, SockHash},
    programs::SkBuffContext,
};
use proxy_common::{Counter, MAX_SOCKETS};

/// Both sockets of every spliced connection, keyed by their own cookie.
#[map(name = "SPLICED_SOCKS")]
static SOCKS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// Socket cookie to the peer socket's cookie.
#[map(name = "SPLICED_PEERS")]
static PEERS: HashMap<u64, u64> = HashMap::with_max_entries(MAX_SOCKETS, 0);

/// Per-CPU counters: the bpf target has no atomic read-modify-write.
#[map(name = "SPLICED_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);

#[inline(always)]
fn count(counter: Counter, by: u64) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
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
    // SAFETY: the value is copied out before any other map operation.
    let Some(mut peer) = (unsafe { PEERS.get(&cookie) }).copied() else {
        // No peer yet: hand the data to the socket so user space forwards it.
        count(Counter::PassedNoPeer, 1);
        return sk_action::SK_PASS;
    };
    let action = SOCKS.redirect_skb(&ctx, &mut peer, 0) as u32;
    if action == sk_action::SK_PASS {
        count(Counter::Redirected, 1);
        count(Counter::RedirectedBytes, u64::from(len));
    } else {
        count(Counter::RedirectFailed, 1);
    }
    action
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
