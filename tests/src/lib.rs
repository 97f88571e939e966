//! The end-to-end test world, shared by the tests in `tests/tests/` and by `cargo xtask demo`.
//!
//! A [`World`] is three network namespaces made for one test and removed when it is dropped:
//!
//! ```text
//!  client (IPv4 only)        proxy (both)                          backend (IPv6 only)
//!  192.0.2.2, 192.0.2.3 ---- 192.0.2.1 | 2001:db8:1::1 ---------- 2001:db8:1::10
//! ```
//!
//! [`World::client_v6`] gives the client IPv6 too ([`CLIENT_V6`] and the proxy's
//! [`PROXY_FRONT_V6`] on the client link), for IPv6 clients.
//!
//! [`World::scale_out`] puts a router and a second proxy host in front of it, for BGP and ECMP
//! ([`bird`]). Only documentation prefixes are used and nothing is routed anywhere else.
//! Processes started in it ([`Service`]) are stopped by their PID when dropped.
#![warn(missing_docs)]

pub mod backends;
pub mod bird;
pub mod dns;
pub mod load;
pub mod packet;
pub mod packets;
mod process;
pub mod raw;
pub mod sockmap;
pub mod spliced;
pub mod tune;
mod world;

pub use process::{OpenFiles, Service, open_files, wait_for};
pub use world::{Ns, Uplink, World, require_root};

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The client namespace's first address.
pub const CLIENT_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));
/// The client namespace's second address, to tell two clients apart in backend logs.
pub const CLIENT_V4_B: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 3));
/// The proxy's address on the client side: what clients connect to.
pub const PROXY_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
/// The proxy's address on the backend side.
pub const PROXY_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1));
/// The proxy's IPv4 address on the backend link; only after [`World::route_direct`].
pub const PROXY_ROUTER_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
/// The backend's IPv4 address, only after [`World::route_direct`] (benchmarks' baseline).
pub const BACKEND_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 10));
/// The second proxy host's address on the backend link, in [`World::scale_out`].
pub const PROXY_B_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2));
/// The router's address on the client link, in [`World::scale_out`].
pub const ROUTER_CLIENT_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 1));
/// The client's address on the router link, in [`World::scale_out`] (the router reaches
/// [`CLIENT_V4`] and [`CLIENT_V4_B`] through it).
pub const CLIENT_LINK_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 2));
/// The client namespace's IPv6 address, only after [`World::client_v6`].
pub const CLIENT_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 0x10));
/// The proxy's IPv6 address on the client side, only after [`World::client_v6`]: what IPv6
/// clients connect to.
pub const PROXY_FRONT_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 1));
/// The backend namespace's IPv6 address (its only one unless [`World::route_direct`]).
pub const BACKEND_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10));

/// A positive number from the environment variable `name` (a test's size or count that a
/// person may raise to make a rare failure frequent), or `default`.
pub fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&v| v > 0)
        .unwrap_or(default)
}

/// The `spliced` binary under test: `$SPLICED_BIN` (set by `cargo xtask test`), else the
/// release build in this workspace.
pub fn spliced_bin() -> anyhow::Result<std::path::PathBuf> {
    let path = match std::env::var_os("SPLICED_BIN") {
        Some(p) => std::path::PathBuf::from(p),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/spliced"),
    };
    anyhow::ensure!(
        path.is_file(),
        "no spliced binary at {}: run `cargo xtask build` or `./x test`",
        path.display()
    );
    Ok(path)
}
