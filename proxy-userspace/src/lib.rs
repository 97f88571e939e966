//! spliced: an edge reverse proxy that routes TLS on SNI and HTTP on `Host` from IPv4 clients to
//! IPv6 backends, optionally announces the client with a PROXY protocol header, and moves the
//! payload with the cheapest engine available (kernel sockmap splicing, `splice(2)`, or copy).
//!
//! Modules follow a connection's path: `config` and `route` decide where it goes, `hello` reads
//! the name, `preface` builds what the backend sees first, then `forward` moves the bytes and
//! `outcome` names how it ended. The public surface is only what the `spliced` binary, the
//! fuzz targets and (for the packet engine's kernel programs, until the engine is wired in)
//! the end-to-end tests use, so the compiler reports everything else that nothing calls.
#![warn(missing_docs)]

mod access;
mod config;
mod conn;
mod dns;
mod ebpf;
mod forward;
#[cfg(test)]
mod fuzz_replay;
mod hello;
mod http1;
mod instance;
mod limits;
mod listen;
mod metrics;
mod name;
mod notify;
mod outcome;
mod packet;
mod packet_expiry;
mod preface;
mod route;
mod runtime_thread;
mod server;
mod shared;
mod shed;
pub mod status;
mod sys;
mod upgrade;

pub use access::Format as LogFormat;
pub use config::{Config, ConfigError, Table as ConfigTable};
/// The packet engine's kernel programs, which the end-to-end tests drive directly while the
/// engine is being built (`docs/packet-engine.md`).
pub use ebpf::{
    Freeze, HandedOff, Handoff, HandoffError, HandoffLimits, IsnRecorder, PacketTables,
    SocketClock, Wscale, peer_key,
};
pub use server::{Options, Server};

/// For `spliced check`: when `config` may load the packet engine, whether this host can give
/// it (`TCP_REPAIR`, cgroup v2, the interfaces and their MTU), as a summary or what is wrong,
/// and whether it is required (`forwarding = "packet"`: a failure stops the start) or only
/// for `auto` (a `[packet]` section: a failure leaves `auto` without it); `None` when nothing
/// may use it.
pub fn packet_preflight(config: &Config) -> Option<(bool, anyhow::Result<String>)> {
    use forward::choose::PacketLoad;
    let required = match forward::choose::packet_load(config) {
        PacketLoad::No => return None,
        PacketLoad::Required => true,
        PacketLoad::ForAuto => false,
    };
    Some((required, packet::Packet::preflight(config.packet())))
}
pub use upgrade::{Upgraded, ask_to_upgrade, without_upgrade_from};

/// The checks the fuzz targets in `fuzz/` run; the unit tests run them on stable too.
#[cfg(fuzzing)]
pub mod fuzz {
    pub use crate::hello::{fuzz_check_http, fuzz_check_tls};
    pub use crate::http1::fuzz_check_requests;
    pub use crate::preface::fuzz_check_receive;
    #[cfg(feature = "fuzz")]
    pub use crate::preface::fuzz_check_roundtrip;
}
