//! Names and `#[repr(C)]` types shared across the kernel boundary.
//!
//! Both `proxy-ebpf` (compiled for `bpfel-unknown-none`) and `proxy-userspace` depend on this
//! crate, so a map's name or layout is written once and cannot drift between the two sides.
#![no_std]
#![warn(missing_docs)]

/// Name of the `SOCKHASH` that holds spliced sockets, keyed by socket cookie.
pub const MAP_SOCKETS: &str = "SPLICED_SOCKS";
/// Name of the hash map from a socket's cookie to its peer's cookie.
pub const MAP_PEERS: &str = "SPLICED_PEERS";
/// Name of the per-CPU array of kernel-side counters, indexed by [`Counter`].
pub const MAP_COUNTERS: &str = "SPLICED_COUNTERS";

/// Name of the `sk_skb/stream_verdict` program that redirects payload to the peer socket.
pub const PROG_STREAM_VERDICT: &str = "spliced_verdict";

/// Directory under bpffs where spliced pins its maps.
pub const PIN_DIR: &str = "/sys/fs/bpf/spliced";

/// Maximum number of sockets the `SOCKHASH` can hold (two per spliced connection).
pub const MAX_SOCKETS: u32 = 65_536;

/// Kernel-side counters, the index into [`MAP_COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// skbs redirected to the peer socket.
    Redirected = 0,
    /// Payload bytes redirected to the peer socket.
    RedirectedBytes = 1,
    /// skbs passed to the owning socket because no peer was registered.
    PassedNoPeer = 2,
    /// Redirects the kernel refused (peer gone from the map).
    RedirectFailed = 3,
    /// Zero-length skbs (a bare FIN) dropped on purpose.
    EmptyDropped = 4,
}

impl Counter {
    /// Number of counters; the length of [`MAP_COUNTERS`].
    pub const COUNT: u32 = 5;

    /// Every counter, in index order.
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Counter::Redirected,
        Counter::RedirectedBytes,
        Counter::PassedNoPeer,
        Counter::RedirectFailed,
        Counter::EmptyDropped,
    ];

    /// The counter's name as it appears in logs and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Redirected => "redirected_skbs",
            Counter::RedirectedBytes => "redirected_bytes",
            Counter::PassedNoPeer => "passed_no_peer",
            Counter::RedirectFailed => "redirect_failed",
            Counter::EmptyDropped => "empty_dropped",
        }
    }
}
